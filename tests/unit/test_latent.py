import pytest
import torch

from lib_delta import LATENT_FORMATS, DeltaSamplingError, LatentFormat, LatentMap, resolve_format


def test_shipped_formats():
    assert (LATENT_FORMATS["sd1"].channels, LATENT_FORMATS["sd1"].scale, LATENT_FORMATS["sd1"].shift) == (4, 0.18215, 0)
    assert LATENT_FORMATS["sd2"].scale == 0.18215
    assert (LATENT_FORMATS["sdxl"].channels, LATENT_FORMATS["sdxl"].scale) == (4, 0.13025)
    assert (LATENT_FORMATS["sd3"].channels, LATENT_FORMATS["sd3"].scale, LATENT_FORMATS["sd3"].shift) == (
        16, 1.5305, 0.0609)
    assert (LATENT_FORMATS["flux"].channels, LATENT_FORMATS["flux"].scale, LATENT_FORMATS["flux"].shift) == (
        16, 0.3611, 0.1159)


def test_map_coefficients_follow_from_the_format_definition():
    # real = z / scale + shift must be preserved: z_s / s_s + shift_s == z_t / s_t + shift_t.
    for t_name in LATENT_FORMATS:
        for s_name in LATENT_FORMATS:
            t, s = LATENT_FORMATS[t_name], LATENT_FORMATS[s_name]
            if t.channels != s.channels or (t.vae != s.vae and (t.flow or s.flow)):
                continue  # refused (test_four_and_sixteen..., test_flow_families_...)
            m = LatentMap.between(t, s)
            z_t = torch.randn(2, t.channels, 3, 3, dtype=torch.float64)
            z_s = m.sample_to_source(z_t)
            torch.testing.assert_close(z_s / s.scale + s.shift, z_t / t.scale + t.shift)


def test_sd1_sd2_is_identity_and_sdxl_rescales():
    assert LatentMap.between("sd1", "sd2").is_identity
    m = LatentMap.between("sd1", "sdxl")
    assert m.ratio == pytest.approx(0.13025 / 0.18215) and m.offset == 0
    x = torch.ones(1, 4, 1, 1)
    assert LatentMap.between("sd1", "sd2").sample_to_source(x) is x


def test_noise_level_and_delta_use_the_linear_part_only():
    m = LatentMap.between(LatentFormat("toy-a", 16, 1.5305, 0.0609), LatentFormat("toy-b", 16, 0.3611, 0.1159))
    assert m.offset != 0
    sigma = torch.tensor([2.0])
    assert m.sigma_to_source(sigma).item() == pytest.approx(2.0 * m.ratio)
    d = torch.full((1, 16, 1, 1), 3.0)
    torch.testing.assert_close(m.delta_to_target(d), d / m.ratio)


def test_four_and_sixteen_channel_formats_are_refused():
    with pytest.raises(DeltaSamplingError, match=r"16-channel source \(sd3\).*4-channel target \(sdxl\)"):
        LatentMap.between("sdxl", "sd3")


def test_unknown_format_name():
    with pytest.raises(DeltaSamplingError, match=r"unknown latent format 'sd4'.*sd1"):
        resolve_format("sd4")
    custom = LatentFormat("toy", 4, 1.0)
    assert resolve_format(custom) is custom
    assert resolve_format("SDXL") is LATENT_FORMATS["sdxl"]


def test_flow_families_pair_within_a_vae_and_are_refused_across():
    for target, source in (("sd3", "sd3"), ("flux", "chroma"), ("chroma", "flux")):
        m = LatentMap.between(target, source)
        assert m.is_identity and m.flow and m.grid_multiple == 2
    assert not LatentMap.between("sd1", "sdxl").flow and LatentMap.between("sd1", "sdxl").grid_multiple == 8
    with pytest.raises(DeltaSamplingError, match=r"flux source \(flux VAE\) with a sd3 target \(sd3 VAE\)"):
        LatentMap.between("sd3", "flux")
    with pytest.raises(DeltaSamplingError, match=r"sd3 source \(sd3 VAE\) with a chroma target \(flux VAE\)"):
        LatentMap.between("chroma", "sd3")
    with pytest.raises(DeltaSamplingError, match=r"4-channel source \(sd1\) with a 16-channel target \(sd3\)"):
        LatentMap.between("sd3", "sd1")
    # a 16-channel format that is not a flow (a custom one) does not pair with a flow family either
    with pytest.raises(DeltaSamplingError, match=r"toy source"):
        LatentMap.between("sd3", LatentFormat("toy", 16, 1.5305, 0.0609))
