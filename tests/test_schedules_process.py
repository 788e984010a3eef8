"""Schedules and the forward process: closed forms against the DDPM definitions and Monte Carlo."""

import json
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
    "scaled_linear_ztsnr": schedules.scaled_linear(zero_terminal_snr=True),
    "betas": schedules.from_betas(torch.linspace(1e-4, 0.03, 200)),
    "cosine_continuous_ts250": schedules.cosine_continuous(-12.0, 0.01, time_scale=250.0),
    "edm_custom": schedules.edm(0.01, 40.0, 5.0),
    "sigmoid_custom": schedules.sigmoid(-2.0, 4.0, 0.7, timesteps=300),
    "rectified_flow": schedules.rectified_flow(),
    "rectified_flow_shift3": schedules.rectified_flow(shift=3.0),
    "learned": schedules.learned(hidden=16),
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
    if name != "learned":  # VDM's learned schedule keeps sigma(0) > 0 (gamma_0 is learned)
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


# -- config round trip, d log_snr / dt, num_steps (issue #16, item 3) ----------------------------


def test_every_registered_type_is_covered():
    assert {s.config()["type"] for s in ALL.values()} == set(schedules.SCHEDULE_TYPES)


@pytest.mark.parametrize("name", sorted(ALL))
def test_config_json_round_trip_every_type(name):
    s = ALL[name]
    cfg = json.loads(json.dumps(s.config(), allow_nan=False))
    s2 = schedules.from_config(cfg)
    assert type(s2) is type(s) and s2.config() == s.config() and s2.num_steps == s.num_steps
    t = torch.cat([torch.linspace(0, 1, 1001, dtype=torch.float64),
                   torch.rand(200, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64)])
    for got, want in zip(s2.alpha_sigma(t), s.alpha_sigma(t)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    inner = t[(t > 0) & (t < 1)]
    torch.testing.assert_close(s2.net_time(inner), s.net_time(inner), rtol=0, atol=1e-15)


def test_discrete_schedule_from_alphas_cumprod_round_trips_as_betas():
    s = schedules.DiscreteSchedule(schedules.cosine(timesteps=100).alphas_cumprod)
    s2 = schedules.from_config(json.loads(json.dumps(s.config())))
    assert isinstance(s2, schedules.BetasSchedule) and s2.num_steps == 100
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for got, want in zip(s2.alpha_sigma(t), s.alpha_sigma(t)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


OLD_CONFIGS = [  # as written into checkpoints before schedules became a package
    ({"type": "linear", "beta_start": 1e-4, "beta_end": 0.02, "timesteps": 1000,
      "zero_terminal_snr": False}, schedules.linear()),
    ({"type": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timesteps": 1000,
      "zero_terminal_snr": True}, schedules.scaled_linear(zero_terminal_snr=True)),
    ({"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999}, schedules.cosine()),
    ({"type": "sigmoid", "start": -3.0, "end": 3.0, "tau": 1.0, "timesteps": 1000,
      "max_beta": 0.999}, schedules.sigmoid()),
    ({"type": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0}, schedules.edm()),
    ({"type": "cosine_continuous", "log_snr_min": -15.0, "sigma_min": 0.002,
      "time_scale": 1000.0}, schedules.cosine_continuous()),
    ({"type": "betas", "betas": [0.1, 0.2, 0.3]}, schedules.from_betas([0.1, 0.2, 0.3])),
]


@pytest.mark.parametrize("cfg,want", OLD_CONFIGS, ids=[c["type"] for c, _ in OLD_CONFIGS])
def test_old_checkpoint_configs_load(cfg, want):
    s = schedules.from_config(cfg)
    assert s.config() == cfg == want.config()
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    torch.testing.assert_close(s.log_snr(t), want.log_snr(t), rtol=0, atol=0)


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown config key.*'beta_mid'.*valid"):
        schedules.from_config({"type": "linear", "beta_mid": 0.01})
    with pytest.raises(ValueError, match="valid"):
        schedules.from_config({"beta_start": 0.01})  # no type


def _t_inside_segments(s):
    """Times away from the knots of a discrete chain (its log_snr is smooth only inside)."""
    if s.num_steps is None:
        return torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    T = s.num_steps
    k = torch.unique(torch.linspace(0, T - 1, 97).round()).to(torch.float64)
    return (k + 0.5) / T


@pytest.mark.parametrize("name", sorted(ALL))
def test_d_log_snr_dt_matches_central_differences(name):
    s = ALL[name]
    t = _t_inside_segments(s)
    h = 1e-6 if s.num_steps is None else 1e-4 / s.num_steps
    fd = (s.log_snr(t + h) - s.log_snr(t - h)) / (2 * h)
    d = s.d_log_snr_dt(t)
    assert d.dtype == torch.float64 and bool((d < 0).all())
    torch.testing.assert_close(d, fd, rtol=1e-6, atol=0)
    # the generic autograd default agrees with each closed form
    torch.testing.assert_close(schedules.NoiseSchedule.d_log_snr_dt(s, t), d, rtol=1e-10, atol=0)
    assert s.d_log_snr_dt(t.float()).dtype == torch.float32


def test_d_log_snr_dt_generic_for_a_schedule_that_defines_only_log_snr():
    class Shifted(schedules.NoiseSchedule):  # lambda(t) = cosine_continuous's lambda + 1.5
        def log_snr(self, t):
            return ALL["cosine_continuous"].log_snr(t) + 1.5

    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    torch.testing.assert_close(Shifted().d_log_snr_dt(t), ALL["cosine_continuous"].d_log_snr_dt(t),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(Shifted().t_from_log_snr(Shifted().log_snr(t)), t)
    with torch.inference_mode():  # samplers may run without autograd
        t_inf = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
        torch.testing.assert_close(Shifted().d_log_snr_dt(t_inf),
                                   ALL["cosine_continuous"].d_log_snr_dt(t), rtol=1e-12, atol=0)


def test_num_steps():
    assert schedules.linear().num_steps == 1000
    assert schedules.cosine(timesteps=50).num_steps == 50
    assert schedules.sigmoid(timesteps=30).num_steps == 30
    assert schedules.scaled_linear(timesteps=20, zero_terminal_snr=True).num_steps == 20
    assert schedules.from_betas([0.1, 0.2, 0.3]).num_steps == 3
    assert isinstance(schedules.linear().num_steps, int)
    assert schedules.edm().num_steps is None
    assert schedules.cosine_continuous().num_steps is None


def test_edm_c_noise_is_the_net_time_of_edm():
    s = schedules.edm()
    t = torch.linspace(0.01, 1, 100, dtype=torch.float64)
    torch.testing.assert_close(s.net_time(t), torch.log(s.sigma(t)) / 4, rtol=0, atol=1e-14)
    torch.testing.assert_close(s.net_time(t), schedules.edm_c_noise(s.sigma(t)), rtol=0, atol=0)
    assert float(schedules.edm_c_noise(torch.tensor(math.exp(2.0)))) == pytest.approx(0.5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_fixed_schedules_have_no_state(name):
    """The config alone rebuilds a fixed schedule: its state_dict is empty (only a learned one,
    with parameters, saves weights)."""
    s = ALL[name]
    if name == "learned":  # its parameters are state; test_learned_schedule.py round-trips them
        return
    assert s.state_dict() == {} and list(s.parameters()) == []
    s.load_state_dict(schedules.from_config(s.config()).state_dict())
