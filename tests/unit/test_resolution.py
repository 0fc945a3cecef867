"""Source legs on a coarser grid (``source_resolution``): factor rules, exact pooled noise, odd sizes, and an exactly
solvable spatial model (stationary Gaussian fields) where DS with pooled legs is compared with the exact answer."""

import pytest
import torch
import torch.nn.functional as F

from lib_delta.analytic_field import (
    DT,
    StationaryField,
    band,
    ds_native,
    natural_spectrum,
    transfer_error,
)
from lib_delta.delta import source_delta
from lib_delta.errors import DeltaSamplingError
from lib_delta.latent import LatentMap
from lib_delta.params import DeltaParams
from lib_delta.resolution import pool_sample, pooled_size, pooling_factor, upsample_delta


@pytest.mark.parametrize(
    ("setting", "width", "height", "family", "factor"),
    [
        ("target", 2048, 2048, "sd1", 1),
        ("native", 1024, 1024, "sd1", 2),  # SD1.5 legs at 512² for an SDXL target at 1024²
        ("native", 1216, 832, "sd1", 2),
        ("native", 768, 768, "sd1", 1),  # 384² would be below 80% of 512²: stay at the target's grid
        ("native", 2048, 2048, "sd1", 4),
        ("native", 1024, 1024, "sd2", 1),
        ("native", 1536, 1536, "sd2", 2),
        ("native", 2048, 2048, "sdxl", 2),
        ("native", 512, 512, "sdxl", 1),
        ("3", 512, 512, "sdxl", 3),
        ("2", 64, 64, "sd1", 1),  # an 8 x 8 latent: the legs' grid (a multiple of 8) cannot be smaller
        ("4", 128, 128, "sd1", 2),  # 16 x 16: k = 4 would pad back to 8 x 8, so k = 2
        ("2", 136, 72, "sd1", 2),  # 17 x 9 -> 16 x 8
    ],
)
def test_pooling_factor_rule(setting, width, height, family, factor):
    assert pooling_factor(setting, width, height, family) == factor


def test_setting_is_validated_and_accepts_a_number():
    assert DeltaParams.create(source_resolution=2).source_resolution == "2"
    assert DeltaParams.create(source_resolution="native").source_resolution == "native"
    with pytest.raises(DeltaSamplingError, match="source_resolution: expected one of target, native"):
        DeltaParams.create(source_resolution="half")
    with pytest.raises(DeltaSamplingError, match="source_resolution"):
        DeltaParams.create(source_resolution=5)


def _legs(record):
    def legs(x, sigma):
        record.append((x, sigma))
        base = torch.tanh(x) * 0.5
        return base, base + 0.1 * torch.sin(3 * x) + 0.05 * sigma.view(-1, 1, 1, 1)

    return legs


def test_factor_one_is_todays_delta_bitwise():
    x = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 0.5])
    latent_map = LatentMap.between("sd1", "sdxl")
    seen_default, seen_one = [], []
    today = source_delta(x, sigma, _legs(seen_default), latent_map)
    one = source_delta(x, sigma, _legs(seen_one), latent_map, factor=1)
    assert torch.equal(today, one)
    assert torch.equal(seen_default[0][0], seen_one[0][0]) and seen_one[0][0].shape == x.shape


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_pooled_noise_has_sigma_over_k(factor):
    # x = x0 + sigma * eps  =>  pool(x) - pool(x0) = sigma * pool(eps), i.i.d. with standard deviation sigma / k
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 4, 96, 96, dtype=DT, generator=generator) * 2 + 1  # 96: no padding for k = 2, 3, 4
    sigma = torch.full((8,), 7.0, dtype=DT)
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, dtype=DT, generator=generator)
    pooled_x, pooled_sigma = pool_sample(x, sigma, factor)
    noise = pooled_x - F.avg_pool2d(x0, factor)
    assert torch.equal(pooled_sigma, sigma / factor)
    n = noise.numel()
    # the sample standard deviation of n Gaussians is within about 1/sqrt(2n) (relative) of the true one
    assert abs(noise.std().item() / (7.0 / factor) - 1) < 4 / (2 * n) ** 0.5
    # and the pooled cells are uncorrelated: neighbours' correlation ~ 0
    corr = (noise[..., :-1] * noise[..., 1:]).mean() / noise.var()
    assert abs(corr.item()) < 4 / n**0.5


def test_pooling_commutes_with_the_latent_map():
    x = torch.randn(1, 4, 16, 16, dtype=DT)
    latent_map = LatentMap.between("sdxl", "sd1")
    torch.testing.assert_close(F.avg_pool2d(latent_map.sample_to_source(x), 2),
                               latent_map.sample_to_source(F.avg_pool2d(x, 2)))


@pytest.mark.parametrize(("height", "width", "factor"), [(13, 21, 2), (9, 9, 3), (128, 128, 2), (152, 104, 2),
                                                         (7, 5, 4)])
def test_odd_sizes_pad_to_the_unet_multiple_and_crop_back(height, width, factor):
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([1.0, 2.0])
    seen = []
    delta = source_delta(x, sigma, _legs(seen), LatentMap.between("sd1", "sd1"), factor=factor)
    legs_x = seen[0][0]
    assert legs_x.shape[-2:] == (pooled_size(height, factor), pooled_size(width, factor))
    assert legs_x.shape[-2] % 8 == 0 and legs_x.shape[-1] % 8 == 0
    assert delta.shape == x.shape and bool(torch.isfinite(delta).all())


def test_upsampling_keeps_a_constant_and_nearest_keeps_block_means():
    const = torch.full((1, 4, 8, 8), 0.3, dtype=DT)
    for mode in ("bilinear", "nearest"):
        torch.testing.assert_close(upsample_delta(const, 2, (16, 16), mode), torch.full((1, 4, 16, 16), 0.3, dtype=DT))
    d = torch.randn(1, 4, 8, 8, dtype=DT)
    torch.testing.assert_close(F.avg_pool2d(upsample_delta(d, 2, (16, 16), "nearest"), 2), d)
    with pytest.raises(DeltaSamplingError, match="upsample mode"):
        upsample_delta(d, 2, (16, 16), "bicubic")


# --- the exactly solvable spatial model -------------------------------------------------------------------------------

N = 32


def fields(adaptation: str) -> tuple[StationaryField, StationaryField]:
    psd = natural_spectrum(N)
    base = StationaryField(torch.zeros(4, dtype=DT), psd)
    if adaptation == "mean":
        return base, StationaryField(torch.tensor([0.5, -0.3, 0.2, 0.0], dtype=DT), psd)
    low, high = {"low": (0.0, 0.0625), "mid": (0.0625, 0.2), "high": (0.3, 0.75)}[adaptation]
    return base, StationaryField(base.mean.clone(), psd + 2.0 * band(N, low, high))


def test_field_sampling_and_pooled_spectrum_match_their_formulas():
    base, _ = fields("low")
    generator = torch.Generator().manual_seed(3)
    samples = base.sample(400, generator)
    periodogram = (torch.fft.fft2(samples).abs() ** 2).mean(dim=0) / N**2
    ratio = (periodogram / base.psd).mean()
    assert abs(ratio.item() - 1) < 0.02
    pooled = base.pooled(2)
    coarse = F.avg_pool2d(samples, 2)
    periodogram_k = (torch.fft.fft2(coarse).abs() ** 2).mean(dim=0) / (N // 2) ** 2
    assert abs((periodogram_k / pooled.psd).mean().item() - 1) < 0.03


def test_full_resolution_legs_give_the_exact_adapted_denoiser():
    base, adapted = fields("mid")
    generator = torch.Generator().manual_seed(4)
    x = adapted.sample(3, generator) + 2.0 * torch.randn(3, 4, N, N, dtype=DT, generator=generator)
    sigma = torch.tensor([2.0, 0.3, 9.0], dtype=DT)
    torch.testing.assert_close(ds_native(x, sigma, base, base, adapted, factor=1), adapted.denoise(x, sigma),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("upsample", ["bilinear", "nearest"])
@pytest.mark.parametrize("sigma", [0.2, 1.0, 5.0, 30.0])
def test_a_mean_change_transfers_exactly_at_any_factor(upsample, sigma):
    # The DC of the pooled field has the same signal-to-noise ratio (S(0)/k² against sigma²/k²), so the pooled legs'
    # delta is exactly the full-resolution one: a constant, which both upsamplers reproduce.
    base, adapted = fields("mean")
    for factor in (2, 4):
        error, share = transfer_error(base, adapted, sigma, factor, upsample=upsample, count=4)
        assert error < 1e-10 and abs(share - 1) < 1e-10


@pytest.mark.parametrize("sigma", [1.0, 5.0])
def test_low_frequencies_transfer_high_ones_are_lost(sigma):
    low_error, low_share = transfer_error(*fields("low"), sigma, 2, count=8)
    high_error, high_share = transfer_error(*fields("high"), sigma, 2, count=8)
    assert low_error < 0.25 and low_share > 0.85
    assert high_share < 0.1 and high_error > 0.9
