"""delta_denoised proven on Gaussian data, where every denoiser has a closed form."""

import functools

import pytest
import torch

from lib_delta import DeltaSamplingError, LatentMap, delta_denoised, delta_eps
from lib_delta.analytic import GaussianMixture
from lib_delta.timesteps import DiscreteSchedule

from conftest import DIM, SHAPE, Case, random_gaussian, random_mixture

PAIRS = [("sd1", "sdxl"), ("sdxl", "sd1"), ("sd1", "sd2"), ("flux", "chroma")]  # flow pairs: test_flow.py


def noisy(dist, sigma, seed=3):
    g = torch.Generator().manual_seed(seed)
    z = dist.sample(len(sigma), g)
    shape = (len(sigma), DIM // 4, 2, 2) if dist.dim == DIM else None
    eps = torch.randn(len(sigma), dist.dim, dtype=torch.float64, generator=g)
    return (z + sigma[:, None] * eps).reshape(shape)


def mixed_sigmas(n=48):
    # Whole range and beyond, shuffled so that one batch mixes very different noise levels.
    s = torch.logspace(-3, 2.5, n, dtype=torch.float64)
    return s[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def as_channels(case_target_fmt):
    return 16 if case_target_fmt in ("sd3", "flux", "chroma") else 4


@pytest.mark.parametrize(("target", "source"), PAIRS)
@pytest.mark.parametrize("family", ["gaussian", "mixture"])
def test_lambda_one_equals_exact_denoiser_of_shifted_target(target, source, family):
    channels = as_channels(target)
    dim = channels * 4
    g = torch.Generator().manual_seed(11)
    if family == "gaussian":
        dist = GaussianMixture.gaussian(torch.randn(dim, dtype=torch.float64, generator=g),
                                        torch.rand(dim, dtype=torch.float64, generator=g) + 0.2)
    else:
        dist = GaussianMixture(torch.tensor([0.3, 0.7], dtype=torch.float64),
                               torch.randn(2, dim, dtype=torch.float64, generator=g) * 2,
                               torch.rand(2, dim, dtype=torch.float64, generator=g) * 0.5 + 0.1)
    m = LatentMap.between(target, source)
    shift = torch.randn(dim, dtype=torch.float64, generator=g)
    base = dist.affine(m.ratio, m.offset)
    adapted = base.shifted(shift)
    expected = dist.shifted(shift / m.ratio)

    sigma = mixed_sigmas()
    x = (expected.sample(len(sigma), g) + sigma[:, None] * torch.randn(len(sigma), dim, dtype=torch.float64,
                                                                         generator=g)).reshape(-1, channels, 2, 2)
    got = delta_denoised(x, sigma, dist.denoise(x, sigma), base.denoise, adapted.denoise,
                         scale=1.0, source=source, target=target)
    torch.testing.assert_close(got, expected.denoise(x, sigma), rtol=0, atol=1e-10)


def test_float32_inputs_stay_close(gaussian_case: Case):
    c = gaussian_case
    sigma = mixed_sigmas().float()
    x = noisy(c.expected, sigma.double()).float()
    got = delta_denoised(x, sigma, c.target.denoise(x, sigma), c.base.denoise, c.adapted.denoise,
                         scale=1.0, source=c.source_fmt, target=c.target_fmt)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, c.expected.denoise(x, sigma), rtol=1e-4, atol=1e-4)


def test_scale_is_linear(gaussian_case: Case):
    c = gaussian_case
    sigma = mixed_sigmas(8)
    x = noisy(c.target, sigma)
    d_t = c.target.denoise(x, sigma)
    one = delta_denoised(x, sigma, d_t, c.base.denoise, c.adapted.denoise, scale=1.0, source="sdxl", target="sd1")
    two_half = delta_denoised(x, sigma, d_t, c.base.denoise, c.adapted.denoise, scale=2.5, source="sdxl",
                              target="sd1")
    torch.testing.assert_close(two_half - d_t, 2.5 * (one - d_t))


def _forbidden(*_args):
    raise AssertionError("the source pair must not be called")


def test_lambda_zero_is_bitwise_identity_without_calling_the_source():
    x = torch.randn(2, *SHAPE)
    d_t = torch.randn(2, *SHAPE)
    out = delta_denoised(x, torch.ones(2), d_t, _forbidden, _forbidden, scale=0.0, source="sdxl", target="sd1")
    assert out is d_t


def test_base_is_adapted_is_bitwise_identity_without_calling_the_source():
    x = torch.randn(2, *SHAPE)
    d_t = torch.randn(2, *SHAPE)
    out = delta_denoised(x, torch.ones(2), d_t, _forbidden, _forbidden, scale=3.0, source="sd1", target="sd1")
    assert out is d_t


def test_equal_models_add_an_exact_zero_delta():
    # Two distinct but identical callables: the delta is computed and is exactly 0, leaving D_t bitwise unchanged.
    dist = random_gaussian(5)
    x, sigma = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    d_t = torch.randn(3, *SHAPE, dtype=torch.float64)
    twin = functools.partial(dist.denoise)  # a different object computing the same thing
    out = delta_denoised(x, sigma, d_t, dist.denoise, twin, scale=1.7, source="sdxl", target="sd1")
    assert torch.equal(out, d_t)


@pytest.mark.parametrize("leg", ["base", "adapted"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_leg_is_named(leg, bad):
    def broken(x, s):
        out = x.clone()
        out[0, 0, 0, 0] = bad
        return out

    good = random_gaussian(2).denoise
    base, adapted = (broken, good) if leg == "base" else (good, broken)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(DeltaSamplingError, match=f"source {leg} model returned non-finite"):
        delta_denoised(x, torch.ones(2, dtype=torch.float64), x, base, adapted, scale=1.0, source="sd1",
                       target="sd1")


def test_mixing_channel_counts_is_refused_even_at_lambda_zero():
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(DeltaSamplingError, match="16-channel source"):
        delta_denoised(x, torch.ones(1), x, _forbidden, _forbidden, scale=0.0, source="flux", target="sdxl")


def test_bad_shapes_and_scale():
    d = random_gaussian(1).denoise
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    with pytest.raises(DeltaSamplingError, match="sigma must have shape"):
        delta_denoised(x, torch.ones(3), x, d, random_gaussian(2).denoise, scale=1.0, source="sd1", target="sd1")
    with pytest.raises(DeltaSamplingError, match="target_denoised has shape"):
        delta_denoised(x, torch.ones(2), x[:1], d, random_gaussian(2).denoise, scale=1.0, source="sd1",
                       target="sd1")
    with pytest.raises(DeltaSamplingError, match="channels"):
        y = torch.randn(2, 3, 2, 2)
        delta_denoised(y, torch.ones(2), y, d, random_gaussian(2).denoise, scale=1.0, source="sd1", target="sd1")
    with pytest.raises(DeltaSamplingError, match="scale must be a finite number"):
        delta_denoised(x, torch.ones(2), x, d, random_gaussian(2).denoise, scale=float("nan"), source="sd1",
                       target="sd1")


@pytest.mark.parametrize(("target", "source"), PAIRS[:3])
def test_eps_space_delta_equals_eps_of_shifted_target(target, source):
    case = Case(target, source, random_mixture(4))
    schedule = DiscreteSchedule()
    t = torch.tensor([1.0, 21.0, 250.5, 500.0, 777.25, 999.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    a = schedule.alpha_cumprod_at(t)[:, None]
    z = case.expected.sample(len(t), g)
    x_t = (a.sqrt() * z + (1 - a).sqrt() * torch.randn(len(t), DIM, dtype=torch.float64, generator=g))
    x_t = x_t.reshape(-1, *SHAPE)

    def eps_of(dist):
        sigma = schedule.t_to_sigma(t)
        x = x_t * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
        return (x - dist.denoise(x, sigma)) / sigma.view(-1, 1, 1, 1)

    got = delta_eps(x_t, t, eps_of(case.target), case.base.denoise, case.adapted.denoise, scale=1.0,
                    source=source, target=target)
    torch.testing.assert_close(got, eps_of(case.expected), rtol=0, atol=1e-9)
