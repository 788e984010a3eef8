"""Schedules and the forward process: closed forms against the DDPM definitions and Monte Carlo."""

import math

import pytest
import torch

from difflab import process, schedules

ALL = {
    "linear": schedules.linear(),
    "scaled_linear": schedules.scaled_linear(),
    "cosine": schedules.cosine(),
    "sigmoid": schedules.sigmoid(),
    "edm": schedules.edm(),
    "cosine_continuous": schedules.cosine_continuous(),
    "linear_ztsnr": schedules.linear(zero_terminal_snr=True),
}


def test_ddpm_linear_matches_definition():
    s = schedules.linear(1e-4, 0.02, 1000)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    i = torch.arange(1000)
    t = s.index_to_t(i)
    a, sig = s.alpha_sigma(t)
    torch.testing.assert_close(a**2, abar, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sig**2, 1 - abar, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s.betas, betas, rtol=1e-9, atol=1e-14)
    # the network sees the integer DDPM index at the knots
    torch.testing.assert_close(s.net_time(t), i.to(torch.float64))
    assert float(s.sigma(0.0)) == 0.0 and math.isinf(float(s.log_snr(0.0)))


def test_scaled_linear_definition():
    s = schedules.scaled_linear()
    b = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - b, 0))


def test_cosine_clipping():
    s = schedules.cosine()
    assert float(s.betas.max()) == pytest.approx(0.999)
    assert float(s.alphas_cumprod[-1]) > 0


@pytest.mark.parametrize("name", sorted(ALL))
def test_log_snr_decreasing_and_inverse(name):
    s = ALL[name]
    s.check_monotone()
    t = torch.linspace(0.001, 0.999, 997, dtype=torch.float64)
    lam = s.log_snr(t)
    torch.testing.assert_close(s.t_from_log_snr(lam), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(s.t_from_net_time(s.net_time(t)), t, rtol=0, atol=1e-12)
    a, sig = s.alpha_sigma(t)
    torch.testing.assert_close(2 * torch.log(a / sig), lam, rtol=1e-10, atol=1e-10)
    if s.variance_preserving:
        torch.testing.assert_close(a**2 + sig**2, torch.ones_like(a))
    assert float(s.sigma(0.0)) == 0.0


@pytest.mark.parametrize("name", sorted(ALL))
def test_schedule_is_evaluated_where_t_lives(name):
    """t on another device than the schedule's tables (a GPU training batch, the module never
    moved with .to): the result follows t. The "meta" device stands in for a GPU here."""
    s = ALL[name]
    t = torch.rand(6, dtype=torch.float64, device="meta")
    alpha, sigma = s.alpha_sigma(t)
    lam = s.log_snr(t)
    assert alpha.device == sigma.device == lam.device == s.t_from_log_snr(lam).device == t.device


def test_zero_terminal_snr():
    s = ALL["linear_ztsnr"]
    a, sig = s.alpha_sigma(1.0)
    assert float(a) == 0.0 and float(sig) == 1.0
    base = schedules.linear()
    # first step unchanged (Lin et al.: sqrt(abar_1) kept)
    assert float(s.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-12)


def test_bad_schedules():
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.from_betas([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="strictly decreasing"):
        schedules.DiscreteSchedule(torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="valid"):
        schedules.from_config({"type": "nope"})


@pytest.mark.parametrize("name", ["linear", "cosine", "edm", "sigmoid"])
def test_config_round_trip(name):
    s = ALL[name]
    s2 = schedules.from_config(s.config())
    t = torch.rand(50, dtype=torch.float64)
    torch.testing.assert_close(s2.log_snr(t), s.log_snr(t))
    custom = schedules.from_betas(torch.linspace(1e-4, 0.03, 50))
    torch.testing.assert_close(schedules.from_config(custom.config()).alphas_cumprod,
                               custom.alphas_cumprod)


def test_markov_chain_matches_closed_form():
    """Simulate x_0 -> x_1 -> ... -> x_i with q(x_t | x_{t-1}) = N(sqrt(1-b) x, b I) and compare
    mean and variance with q(x_i | x_0) = N(sqrt(abar_i) x_0, (1 - abar_i) I)."""
    s = schedules.linear(1e-4, 0.02, 1000)
    g = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.full((n, 2), 1.5, dtype=torch.float64)
    x = x0.clone()
    checks = {0: None, 99: None, 499: None, 999: None}
    prev_t = 0.0
    for i in range(1000):
        t = float(s.index_to_t(i))
        x = process.q_step(s, x, prev_t, t, torch.randn(x.shape, generator=g, dtype=x.dtype))
        prev_t = t
        if i in checks:
            abar = float(s.alphas_cumprod[i])
            mean, var = x.mean(0), x.var(0)
            # standard errors of the sample mean / variance
            se_mean = math.sqrt((1 - abar) / n)
            se_var = (1 - abar) * math.sqrt(2 / (n - 1))
            assert torch.all((mean - math.sqrt(abar) * 1.5).abs() < 5 * se_mean), (i, mean)
            assert torch.all((var - (1 - abar)).abs() < 5 * se_var), (i, var)


def test_q_step_is_ddpm_step():
    s = schedules.linear()
    b = s.betas
    a_ts, var_ts = process.transition(s, s.index_to_t(9), s.index_to_t(10))
    assert float(a_ts) == pytest.approx(math.sqrt(1 - float(b[10])), rel=1e-12)
    assert float(var_ts) == pytest.approx(float(b[10]), rel=1e-9)


def test_posterior_matches_ddpm_eq7():
    s = schedules.linear()
    abar, b = s.alphas_cumprod, s.betas
    for i in [1, 10, 500, 999]:
        c_xt, c_x0, var = process.posterior_coefficients(s, s.index_to_t(i - 1), s.index_to_t(i))
        # DDPM Eq. 7
        mu_x0 = abar[i - 1].sqrt() * b[i] / (1 - abar[i])
        mu_xt = (1 - b[i]).sqrt() * (1 - abar[i - 1]) / (1 - abar[i])
        beta_tilde = (1 - abar[i - 1]) / (1 - abar[i]) * b[i]
        assert float(c_x0) == pytest.approx(float(mu_x0), rel=1e-9)
        assert float(c_xt) == pytest.approx(float(mu_xt), rel=1e-9)
        assert float(var) == pytest.approx(float(beta_tilde), rel=1e-9)


def test_posterior_by_monte_carlo():
    """Sample x_s ~ q(x_s|x_0), x_t ~ q(x_t|x_s); regress: E[x_s | x_t, x_0] is linear in x_t."""
    s = schedules.cosine()
    g = torch.Generator().manual_seed(1)
    n = 200000
    x0 = torch.zeros(n, 1, dtype=torch.float64) + 0.7
    ts, tt = 0.3, 0.5
    xs = process.q_sample(s, x0, ts, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    xt = process.q_step(s, xs, ts, tt, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    c_xt, c_x0, var = process.posterior_coefficients(s, ts, tt)
    # least squares of xs on [xt, 1]
    A = torch.cat([xt, torch.ones_like(xt)], 1)
    coef = torch.linalg.lstsq(A, xs).solution.flatten()
    resid = xs - A @ coef.view(2, 1)
    assert float(coef[0]) == pytest.approx(float(c_xt), abs=0.01)
    assert float(coef[1]) == pytest.approx(float(c_x0) * 0.7, abs=0.01)
    assert float(resid.var()) == pytest.approx(float(var), rel=0.02)
