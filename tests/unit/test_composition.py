"""CFG over AND-composed prompts as each host combines them (lib_delta.composition)."""

from __future__ import annotations

import torch

from lib_delta.composition import combine_a1111, combine_forge, forge_terms


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a1111_sums_each_images_own_weighted_terms():
    cond, uncond = rows(3), rows(2, 1)
    conds_list = [[(0, 1.0), (1, 0.6)], [(2, -0.5)]]
    got = combine_a1111(cond, uncond, conds_list, 7.0)
    torch.testing.assert_close(got[0], uncond[0] + 7 * (cond[0] - uncond[0]) + 4.2 * (cond[1] - uncond[0]))
    torch.testing.assert_close(got[1], uncond[1] - 3.5 * (cond[2] - uncond[1]))


def test_forge_equals_a1111_when_the_images_share_their_weights():
    cond, uncond = rows(4), rows(2, 1)
    conds_list = [[(0, 1.0), (1, 0.6)], [(2, 1.0), (3, 0.6)]]
    torch.testing.assert_close(combine_forge(cond, uncond, conds_list, 5.0),
                               combine_a1111(cond, uncond, conds_list, 5.0), rtol=0, atol=1e-12)
    single = [[(0, 1.0)], [(1, 1.0)]]  # no AND: plain CFG
    torch.testing.assert_close(combine_forge(cond, uncond, single, 5.0), uncond + 5 * (cond[:2] - uncond))


def test_forge_takes_the_last_images_weights_and_the_shortest_images_terms():
    conds_list = [[(0, 1.0), (1, 0.6), (2, 0.3)], [(3, 1.0), (4, 1.0)]]
    assert forge_terms(conds_list) == [([0, 3], 1.0), ([1, 4], 1.0)]
    cond, uncond = rows(5), rows(2, 1)
    as_forge_reads_it = [[(0, 1.0), (1, 1.0)], [(3, 1.0), (4, 1.0)]]
    torch.testing.assert_close(combine_forge(cond, uncond, conds_list, 5.0),
                               combine_a1111(cond, uncond, as_forge_reads_it, 5.0), rtol=0, atol=1e-12)
    assert not torch.allclose(combine_forge(cond, uncond, conds_list, 5.0),
                              combine_a1111(cond, uncond, conds_list, 5.0))


def test_forge_without_the_uncond_scales_the_weighted_terms_by_their_sum():
    cond = rows(2)
    got = combine_forge(cond, None, [[(0, 1.0), (1, 0.6)]], 1.0)
    torch.testing.assert_close(got[0], cond[0] + 0.6 * cond[1])  # A1111 would give cond[0] + 0.6 (cond[1] - cond[0])
    torch.testing.assert_close(combine_forge(cond, None, [[(0, 1.0)]], 1.0)[0], cond[0])
