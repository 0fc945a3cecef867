import itertools
import math

import pytest
import torch

from lib_delta import DECAY_SHAPES, LambdaSchedule, guard_delta
from lib_delta.schedule import decay_factor


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_decay_shapes_start_at_one_and_never_rise(shape):
    values = [decay_factor(shape, u / 100) for u in range(101)]
    assert values[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(values))
    assert all(0.0 <= v <= 1.0 for v in values)
    if shape != "constant":
        assert values[-1] == pytest.approx(0.0, abs=1e-12)
        assert values[50] == pytest.approx(0.5)


def test_named_shape_values():
    assert decay_factor("linear", 0.25) == pytest.approx(0.75)
    assert decay_factor("cosine", 0.25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert decay_factor("sigmoid", 0.1) > decay_factor("linear", 0.1)  # flat start, steep middle
    with pytest.raises(ValueError, match="unknown decay shape 'cubic'"):
        decay_factor("cubic", 0.5)


def test_window_is_half_open_and_zero_outside():
    s = LambdaSchedule(2.0, start=0.2, end=0.6)
    assert s.at(0.0) == 0.0 and not s.active(0.19)
    assert s.at(0.2) == 2.0 and s.active(0.2)
    assert s.at(0.59) == 2.0
    assert s.at(0.6) == 0.0 and not s.active(0.6)
    assert [s.at_step(i, 10) for i in range(10)] == [0, 0, 2, 2, 2, 2, 0, 0, 0, 0]


def test_decay_runs_across_the_window_only():
    s = LambdaSchedule(1.0, start=0.5, end=1.0, decay="linear")
    assert s.at(0.5) == 1.0
    assert s.at(0.75) == pytest.approx(0.5)
    assert s.at(0.4) == 0.0


def test_full_window_is_active_at_every_step_and_lambda_zero_never():
    assert all(LambdaSchedule(0.5).active(i / 7) for i in range(7))
    assert not any(LambdaSchedule(0.0).active(i / 7) for i in range(7))


def test_bad_schedules():
    with pytest.raises(ValueError, match="start <= end"):
        LambdaSchedule(1.0, start=0.7, end=0.3)
    with pytest.raises(ValueError, match="unknown decay shape"):
        LambdaSchedule(1.0, decay="exp")


def test_guard_caps_large_deltas_per_sample_and_leaves_small_ones():
    target = torch.ones(2, 4, 2, 2)
    delta = torch.stack([torch.full((4, 2, 2), 0.1), torch.full((4, 2, 2), 5.0)])
    out = guard_delta(delta, target, max_ratio=0.5)
    assert torch.equal(out[0], delta[0])  # 0.1 < 0.5: untouched
    rms = out[1].pow(2).mean().sqrt()
    assert rms.item() == pytest.approx(0.5)
    # Direction is preserved.
    torch.testing.assert_close(out[1] / out[1].norm(), delta[1] / delta[1].norm())


def test_guard_off():
    delta = torch.randn(1, 4, 2, 2) * 100
    assert guard_delta(delta, torch.ones_like(delta), 0.0) is delta
