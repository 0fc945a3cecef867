"""Classifier-free guidance over composed prompts (``a cat AND a dog:0.6``), as each host combines them.

Host-free (torch only). A source leg must combine its rows the way the target's host does, or DS(A, A, B, lambda 1)
is no longer B's own image. ``conds_list`` is the webui's ``reconstruct_multicond_batch`` composition: per image, a
list of ``(row of cond_out, weight)``, one entry per AND-term.

* A1111 (``CFGDenoiser.combine_denoised``): per image, ``uncond + sum_j w_j * scale * (cond_j - uncond)``.
* Forge (``backend/sampling/condition.compile_weighted_conditions`` and ``sampling_function_inner``): the terms are
  taken position by position across the batch, at most as many as the image with the fewest has, each weighted by the
  *last* image's weight for that position. The weighted mean of the terms is guided with ``scale * sum(w)`` (``scale``
  alone when the weights sum to 1). With the uncond skipped (Forge's CFG-1 shortcut) the uncond prediction is zero.
  For a batch whose images share their weights this is A1111's sum in another order.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Composition", "combine_a1111", "combine_forge", "forge_terms"]

Composition = list[list[tuple[int, float]]]  # per image: (row of cond_out, weight) per AND-term


def combine_a1111(cond_out: torch.Tensor, uncond_out: torch.Tensor, conds_list: Composition,
                  cond_scale: float) -> torch.Tensor:
    """The A1111 webui's ``CFGDenoiser.combine_denoised``."""
    denoised = uncond_out.clone()
    for i, conds in enumerate(conds_list):
        for cond_index, weight in conds:
            denoised[i] += (cond_out[cond_index] - uncond_out[i]) * (weight * cond_scale)
    return denoised


def forge_terms(conds_list: Composition) -> list[tuple[list[int], float]]:
    """Forge's ``compile_weighted_conditions``: per AND-term position, (one row per image, the last image's weight);
    positions beyond the shortest image's term count are dropped, as ``zip`` drops them there."""
    return [([index for index, _ in column], column[-1][1]) for column in zip(*conds_list, strict=False)]


def combine_forge(cond_out: torch.Tensor, uncond_out: torch.Tensor | None, conds_list: Composition,
                  cond_scale: float) -> torch.Tensor:
    """Forge's ``calc_cond_uncond_batch`` + ``sampling_function_inner`` (no cfg function installed); ``uncond_out``
    None: the uncond was skipped (its prediction is then zero)."""
    terms = forge_terms(conds_list)
    first = cond_out[terms[0][0]]
    summed = torch.zeros_like(first)
    count = torch.full_like(first, 1e-37)  # Forge's out_count starts at 1e-37
    for rows, weight in terms:
        summed += cond_out[rows] * weight
        count += weight
    cond_pred = summed / count
    uncond_pred = torch.zeros_like(first) if uncond_out is None else uncond_out
    strength = sum(weight for _, weight in terms)
    if not math.isclose(strength, 1.0):
        return uncond_pred + (cond_pred - uncond_pred) * cond_scale * strength
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale
