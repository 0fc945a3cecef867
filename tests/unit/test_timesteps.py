import pytest
import torch

from lib_delta.timesteps import DiscreteSchedule, scaled_linear_alphas_cumprod, vp_to_ve, x0_delta_to_eps


def test_sd_schedule_endpoints():
    s = DiscreteSchedule()
    assert s.sigmas[0].item() == pytest.approx(0.029168, rel=1e-4)
    assert s.sigmas[-1].item() == pytest.approx(14.6146, rel=1e-4)
    assert len(scaled_linear_alphas_cumprod()) == 1000


def test_t_to_sigma_hits_the_table_at_integers_and_interpolates_log_sigma():
    s = DiscreteSchedule()
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    torch.testing.assert_close(s.t_to_sigma(t), s.sigmas[[0, 1, 500, 999]].float())
    mid = s.t_to_sigma(torch.tensor([10.5], dtype=torch.float64))
    want = ((s.log_sigmas[10] + s.log_sigmas[11]) / 2).exp()
    torch.testing.assert_close(mid, want.view(1))


def test_sigma_to_t_inverts_t_to_sigma():
    s = DiscreteSchedule()
    t = torch.tensor([0.0, 0.25, 3.5, 21.0, 333.3, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-9)


def test_vp_and_ve_forms_describe_the_same_point():
    s = DiscreteSchedule()
    t = torch.tensor([1.0, 400.0, 999.0], dtype=torch.float64)
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    eps = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    a = s.alpha_cumprod_at(t).view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * eps
    x, sigma = vp_to_ve(x_t, t, s)
    torch.testing.assert_close(x, z + sigma.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(a.view(-1), s.alphas_cumprod[[1, 400, 999]])


def test_x0_delta_to_eps_matches_eps_of_moved_x0():
    x = torch.randn(2, 4, 1, 1, dtype=torch.float64)
    sigma = torch.tensor([0.5, 7.0], dtype=torch.float64)
    x0 = torch.randn_like(x)
    d = torch.randn_like(x)

    def eps(x0_):
        return (x - x0_) / sigma.view(-1, 1, 1, 1)

    torch.testing.assert_close(eps(x0 + d) - eps(x0), x0_delta_to_eps(d, sigma))
