"""How strongly the delta applies over the course of sampling, and the optional guard on its size.

Progress is the fraction of the pass's denoiser calls already made (0 at the first call). The delta applies inside the
window ``start <= progress < end``; inside it, lambda decays from its full value by one of :data:`DECAY_SHAPES`
(``u`` runs from 0 at the window's start to 1 at its end). Outside the window the weight is exactly 0, and the host
does not run the source legs at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DECAY_SHAPES = ("constant", "linear", "cosine", "sigmoid")

_SIGMOID_STEEPNESS = 10.0


def decay_factor(shape: str, u: float) -> float:
    """Weight in [0, 1] of a decay shape at position ``u`` in [0, 1] of the window (1 at ``u = 0``)."""
    u = min(max(u, 0.0), 1.0)
    if shape == "constant":
        return 1.0
    if shape == "linear":
        return 1.0 - u
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    if shape == "sigmoid":
        # A logistic step centred mid-window, rescaled so that it is exactly 1 at u=0 and 0 at u=1.
        def s(v: float) -> float:
            return 1.0 / (1.0 + math.exp(_SIGMOID_STEEPNESS * (v - 0.5)))

        return (s(u) - s(1.0)) / (s(0.0) - s(1.0))
    raise ValueError(f"unknown decay shape {shape!r}; choose one of {', '.join(DECAY_SHAPES)}")


@dataclass(frozen=True)
class LambdaSchedule:
    """lambda over progress: ``scale`` inside ``[start, end)`` shaped by ``decay``, 0 outside."""

    scale: float
    start: float = 0.0
    end: float = 1.0
    decay: str = "constant"

    def __post_init__(self) -> None:
        if self.decay not in DECAY_SHAPES:
            raise ValueError(f"unknown decay shape {self.decay!r}; choose one of {', '.join(DECAY_SHAPES)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"window must satisfy 0 <= start <= end <= 1; got start={self.start}, end={self.end}")

    def active(self, progress: float) -> bool:
        """Whether the source legs are needed at this progress."""
        return self.scale != 0 and self.start <= progress < self.end

    def at(self, progress: float) -> float:
        """lambda at ``progress`` in [0, 1)."""
        if not self.active(progress):
            return 0.0
        width = self.end - self.start
        return self.scale * decay_factor(self.decay, (progress - self.start) / width)

    def at_step(self, step: int, total_steps: int) -> float:
        """lambda at denoiser call ``step`` of ``total_steps`` (progress = step / total_steps).

        Some samplers make more calls than they announce (PLMS's warm-up call); those count as the last position, so
        a window that runs to the end covers them too.
        """
        total = max(total_steps, 1)
        return self.at(min(step, total - 1) / total)


def guard_delta(scaled_delta: torch.Tensor, target_denoised: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Cap each sample's RMS of ``lambda * delta`` at ``max_ratio`` times the RMS of the target's prediction.

    A large lambda, or a source pair whose difference is much larger than the target's own signal, can make the delta
    dominate and burn the image; the guard keeps the target's structure while leaving small deltas untouched.
    ``max_ratio <= 0`` disables it.
    """
    if max_ratio <= 0:
        return scaled_delta
    dims = tuple(range(1, scaled_delta.ndim))
    delta_rms = scaled_delta.float().pow(2).mean(dim=dims).sqrt()
    target_rms = target_denoised.float().pow(2).mean(dim=dims).sqrt()
    limit = max_ratio * target_rms
    factor = torch.where(delta_rms > limit, limit / delta_rms.clamp_min(1e-12), torch.ones_like(delta_rms))
    return scaled_delta * factor.to(scaled_delta.dtype).view(-1, *([1] * (scaled_delta.ndim - 1)))
