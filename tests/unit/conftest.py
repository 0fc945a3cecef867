import pytest
import torch

from lib_delta.analytic import GaussianMixture
from lib_delta.latent import LatentMap

SHAPE = (4, 2, 2)
DIM = 16


def random_gaussian(seed: int, mean_scale: float = 1.0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(DIM, dtype=torch.float64, generator=g) * mean_scale
    var = torch.rand(DIM, dtype=torch.float64, generator=g) * 1.5 + 0.2
    return GaussianMixture.gaussian(mean, var)


def random_mixture(seed: int, k: int = 3) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(k, dtype=torch.float64, generator=g) + 0.2
    means = torch.randn(k, DIM, dtype=torch.float64, generator=g) * 1.5
    var = torch.rand(k, DIM, dtype=torch.float64, generator=g) * 0.5 + 0.1
    return GaussianMixture(w / w.sum(), means, var)


class Case:
    """A target B, a source pair that is B seen through the latent map (A) and A moved by a shift (A')."""

    def __init__(self, target_fmt: str, source_fmt: str, target: GaussianMixture, seed: int = 7) -> None:
        self.target_fmt, self.source_fmt = target_fmt, source_fmt
        self.map = LatentMap.between(target_fmt, source_fmt)
        g = torch.Generator().manual_seed(seed)
        self.shift_source = torch.randn(DIM, dtype=torch.float64, generator=g)
        self.target = target
        self.base = target.affine(self.map.ratio, self.map.offset)
        self.adapted = self.base.shifted(self.shift_source)
        # What lambda = 1 must produce: the target moved by the shift brought back into target units.
        self.expected = target.shifted(self.shift_source / self.map.ratio)


@pytest.fixture
def gaussian_case() -> Case:
    return Case("sd1", "sdxl", random_gaussian(1))
