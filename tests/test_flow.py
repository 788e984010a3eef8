"""Flow matching (issue #17): the rectified-flow schedule with its log-SNR shift, the velocity
parameterisation u = eps - x0, and every difflab sampler on an exact flow-matching Gaussian
mixture (float64), including the first step from alpha = 0."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab import guidance, schedules
from difflab import samplers as S
from difflab.denoiser import Denoiser, parameterization
from difflab.schedules import NoiseSchedule
from difflab.toy import GaussianMixture

F64 = torch.float64
MIXTURE = GaussianMixture.random(4, 3, seed=0)
RING = GaussianMixture.ring(8, radius=2.0, std=0.2)
#: every deterministic sampler but the fitted one (its coefficients are fitted per model)
DETERMINISTIC = [n for n in S.names() if not S.get(n).stochastic and n != "bespoke"]


def noise(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


# --- the schedule ------------------------------------------------------------------------
T = torch.linspace(0, 1, 1001, dtype=F64)
INNER = T[1:-1]


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.4])
def test_rectified_flow_coefficients_and_the_shift(shift):
    s = schedules.rectified_flow(shift)
    alpha, sigma = s.alpha_sigma(T)
    assert float(alpha[-1]) == 0.0 and float(sigma[-1]) == 1.0  # x_1 = eps exactly
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0    # x_0 = data exactly
    torch.testing.assert_close(alpha + sigma, torch.ones_like(T), rtol=0, atol=1e-15)
    # SD3's shifted time t_s = s t / (1 + (s - 1) t) (Esser et al. 2024, Eq. 23), applied once
    torch.testing.assert_close(sigma, shift * T / (1 + (shift - 1) * T), rtol=1e-15, atol=0)
    # ... which is the log-SNR offset lambda(t) - 2 log s of the unshifted path
    lam = s.log_snr(INNER)
    lam_1 = 2 * torch.log((1 - INNER) / INNER)
    torch.testing.assert_close(lam, lam_1 - 2 * math.log(shift), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lam, 2 * torch.log(alpha[1:-1] / sigma[1:-1]), rtol=1e-12,
                               atol=1e-12)
    assert float(s.log_snr(1.0)) == -math.inf and float(s.log_snr(0.0)) == math.inf
    s.check_monotone()
    # inverses and the closed-form derivative
    torch.testing.assert_close(s.t_from_log_snr(lam), INNER, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.d_log_snr_dt(INNER), NoiseSchedule.d_log_snr_dt(s, INNER),
                               rtol=1e-12, atol=0)
    # the network time is diffusers' flow timestep sigma * num_train_timesteps
    torch.testing.assert_close(s.net_time(T), 1000 * sigma, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.t_from_net_time(s.net_time(T)), T, rtol=0, atol=1e-12)
    torch.testing.assert_close(s.t_from_sigma(sigma), T, rtol=0, atol=1e-12)
    assert s.num_steps is None and s.prior_std(1.0) == 1.0 and not s.variance_preserving


@pytest.mark.parametrize("schedule", [schedules.rectified_flow(),
                                      schedules.rectified_flow(3.0, 250.0, 0.01)])
def test_rectified_flow_config_round_trip(schedule):
    cfg = json.loads(json.dumps(schedule.config(), allow_nan=False))
    s2 = schedules.from_config(cfg)
    assert type(s2) is schedules.RectifiedFlowSchedule and s2.config() == schedule.config()
    for got, want in zip(s2.alpha_sigma(T), schedule.alpha_sigma(T)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert schedules.from_config({"type": "rectified_flow"}).shift == 1.0
    with pytest.raises(ValueError, match="shift"):
        schedules.rectified_flow(0.0)


def test_dynamic_shift_is_flux_calculate_shift():
    """Flux: mu linear in the image token count between (256, 0.5) and (4096, 1.15), s = e^mu;
    the shifted sigma equals diffusers' time_shift(mu, 1, t) = e^mu / (e^mu + 1 / t - 1)."""
    for n in (256, 1024, 4096, 6000):
        mu = 0.5 + (1.15 - 0.5) * (n - 256) / (4096 - 256)
        s = schedules.dynamic_shift(n)
        assert s == pytest.approx(math.exp(mu), rel=1e-14)
        sigma = schedules.rectified_flow(s).sigma(INNER)
        torch.testing.assert_close(sigma, math.exp(mu) / (math.exp(mu) + 1 / INNER - 1),
                                   rtol=1e-13, atol=0)
    assert schedules.dynamic_shift(1024, shift_type="linear") == pytest.approx(
        0.5 + 0.65 * 768 / 3840, rel=1e-14)
    with pytest.raises(ValueError, match="shift_type"):
        schedules.dynamic_shift(1024, shift_type="quadratic")
    assert schedules.rectified_flow(2.0).with_shift(3.0).config() == \
        schedules.rectified_flow(3.0).config()


# --- the velocity parameterisation -------------------------------------------------------
def test_flow_parameterisation_converts_exactly():
    """u = eps - x0; x0 = (x - sigma u) / (alpha + sigma), eps = (x + alpha u) / (alpha +
    sigma) for any schedule, the rectified-flow ends (alpha = 0, sigma = 0) included."""
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(5, 4, generator=g, dtype=F64) for _ in range(2))
    p = parameterization.get("flow")
    assert p.name == p.target == "flow"
    assert parameterization.from_config(p.config()).name == "flow"
    for schedule in (schedules.rectified_flow(), schedules.rectified_flow(3.0),
                     schedules.cosine()):
        for t in (0.0, 0.3, 0.999, 1.0):
            if t == 0.0 and schedule.num_steps is not None:
                continue
            alpha, sigma = (c.view(1, 1).expand(5, 1) for c in schedule.alpha_sigma(t))
            x = alpha * x0 + sigma * eps
            pred = p.prediction(eps - x0, x, alpha, sigma)
            torch.testing.assert_close(pred.x0, x0, rtol=0, atol=1e-14)
            if float(sigma[0]) > 0:
                torch.testing.assert_close(pred.eps, eps, rtol=0, atol=1e-14)
            if schedule.num_steps is None:  # rectified flow: x0 = x - t_s u
                u = eps - x0
                torch.testing.assert_close(pred.x0, x - sigma * u, rtol=0, atol=1e-14)


def test_eps_prediction_is_refused_on_the_flow_schedule():
    with pytest.raises(ValueError, match="zero terminal SNR"):
        Denoiser(torch.nn.Identity(), schedules.rectified_flow(), "eps")


def test_exact_network_outputs_the_velocity():
    s = schedules.rectified_flow(3.0)
    den = MIXTURE.denoiser(s, "flow")
    x = noise(16, 3, seed=1)
    for t in (1.0, 0.6, 0.05):
        alpha, sigma = s.alpha_sigma(t)
        u = den.net(x, s.net_time(t).expand(16))
        x0 = MIXTURE.posterior_mean(x, alpha, sigma)
        eps = -sigma * MIXTURE.score(x, alpha, sigma)
        torch.testing.assert_close(u, eps - x0, rtol=0, atol=1e-12)
        torch.testing.assert_close(den.predict(x, t).x0, x0, rtol=0, atol=1e-12)


# --- samplers on the exact flow-matching mixture ---------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_is_the_explicit_flow_step(shift):
    """Euler on a flow model is x_{t'} = x_t + (sigma(t') - sigma(t)) u(x_t, t) (diffusers'
    FlowMatchEulerDiscreteScheduler; with shift 1, sigma = t), from alpha = 0 at t = 1 to
    sigma = 0: DDIM's step in data form is this step exactly."""
    s = schedules.rectified_flow(shift)
    den = MIXTURE.denoiser(s, "flow")
    x1 = noise(32, 3, seed=2)
    ts = S.timesteps(s, 9, "uniform")
    x = x1.clone()
    sig = s.sigma(ts)
    for i in range(9):
        u = den.net(x, s.net_time(ts[i]).expand(32))
        x = x + (sig[i + 1] - sig[i]) * u
    for name in ("euler", "ddim", "dpm_solver_1"):
        got = S.sample(den, x1, name, grid=ts)
        assert rmse(got, x) < 1e-14, (name, rmse(got, x))


def ode_solution(mixture: GaussianMixture, x1: torch.Tensor, n: int) -> torch.Tensor:
    """x(0) of dx/dsigma = u = eps_hat - x0_hat from x(1) = x1, by classical RK4 in sigma on a
    uniform grid: independent of difflab's samplers. eps_hat = -sigma * score stays finite
    at sigma = 0."""

    def u(x: torch.Tensor, s: float) -> torch.Tensor:
        alpha, sigma = torch.tensor(1 - s, dtype=F64), torch.tensor(s, dtype=F64)
        return -sigma * mixture.score(x, alpha, sigma) - mixture.posterior_mean(x, alpha, sigma)

    x, h = x1.clone(), -1.0 / n
    for i in range(n):
        s = 1 + i * h
        k1 = u(x, s)
        k2 = u(x + h / 2 * k1, s + h / 2)
        k3 = u(x + h / 2 * k2, s + h / 2)
        k4 = u(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.fixture(scope="module")
def flow_reference():
    """x(0) from 64 noises; RK4 with 600 and 1200 steps agree to 2e-10 (measured), far below
    the smallest sampler error the order test reads (3e-7: dpm_solver_3 at 640 steps)."""
    x1 = noise(64, 3)
    ref = ode_solution(MIXTURE, x1, 1200)
    assert rmse(ref, ode_solution(MIXTURE, x1, 600)) < 1e-8, "reference not converged"
    return x1, ref


STEPS = [80, 160, 320, 640]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_solver_converges_at_its_order(name, flow_reference):
    """Each solver on its default grid (from t = 1, alpha = 0, to t = 0): the least-squares
    slope of log error vs log steps on 80..640 steps is the solver's order (within 0.35).

    The grids start at the prior (alpha = 0 exactly, the first step taken in data form); on the
    default log-SNR grid the first interior point sits at sigma~ ~ 4096 and the last at
    sigma~ = sigma_min = 0.002, so the asymptotic regime starts around 80 steps (the sigma~
    range spans 14.5 e-folds)."""
    x1, ref = flow_reference
    den = MIXTURE.denoiser(schedules.rectified_flow(), "flow")
    spec = S.get(name)
    errs = []
    for n in STEPS:
        ts = S.timesteps(den.schedule, n, spec.spacing)
        assert float(ts[0]) == 1.0 and float(den.schedule.alpha(ts[0])) == 0.0
        errs.append(rmse(spec.fn(den, x1, ts), ref))
    lx, ly = torch.log(torch.tensor(STEPS, dtype=F64)), torch.log(torch.tensor(errs, dtype=F64))
    slope = -float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())
    assert abs(slope - spec.order) < 0.35, f"{name}: slope {slope:.2f}, errors {errs}"
    assert errs[-1] < 5e-3, errs


def test_log_snr_grids_do_not_see_the_shift():
    """A shift is a constant log-SNR offset: at equal sigma~ = sigma / alpha the shifted and the
    unshifted path have the same x_t (alpha = 1 / (1 + sigma~)) and the network the same time
    input, so a grid placed in sigma~ (log_snr, karras) gives the same samples; only grids
    uniform in t (diffusers' linspace) change with it."""
    x1 = noise(32, 3, seed=4)
    out = {}
    for shift in (1.0, 3.0):
        den = MIXTURE.denoiser(schedules.rectified_flow(shift), "flow")
        out[shift] = [S.sample(den, x1, name, 12, spacing=sp)
                      for name in ("dpmpp_2m", "unipc") for sp in ("log_snr", "karras")]
        out[shift].append(S.sample(den, x1, "euler", 12, spacing="uniform"))
    for a, b in zip(out[1.0][:-1], out[3.0][:-1]):
        assert rmse(a, b) < 1e-10
    assert rmse(out[1.0][-1], out[3.0][-1]) > 1e-3


def near_ring_fraction(x: torch.Tensor) -> float:
    d = torch.cdist(x, RING.means).min(1).values
    return float((d < 4 * 0.2).to(F64).mean())


def test_every_sampler_and_cfg_on_a_flow_model():
    """Every registered sampler (stochastic and fitted-coefficient ones included) and
    classifier-free guidance draw the ring mixture from a flow model with shift 3."""
    den = RING.denoiser(schedules.rectified_flow(3.0), "flow")
    x1 = noise(100, 2, seed=11)
    for name in S.names():
        x = S.sample(den, x1, name, 15, generator=torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(x).all()), name
        assert near_ring_fraction(x) > 0.95, (name, near_ring_fraction(x))
    labels = torch.arange(100) % 8
    guided = guidance.classifier_free(den, 1.0)
    x = S.sample(guided, x1, "dpmpp_2m", 15, cond=labels)
    assert float((x - RING.means[labels]).norm(dim=1).mean()) < 0.4


def test_decoupled_evaluation_times_read_the_flow_target():
    from difflab.denoiser import TimePoint
    from difflab.samplers.common import EvalTimes

    den = RING.denoiser(schedules.rectified_flow(), "flow")
    x = noise(8, 2, seed=6)
    point = TimePoint.grid(den.schedule, S.timesteps(den.schedule, 5), x)[2]
    told = EvalTimes(den, {}).predict_told(x, point, point.t)  # told its own time
    assert rmse(told.x0, den.predict(x, point.t).x0) < 1e-12


def test_unipc_step_from_alpha_zero_is_the_limit_of_finite_steps():
    """The first step from t = 1 (alpha = 0, log-SNR -inf) is UniC-corrected in its h -> inf
    limit, x_t = (sigma_t / sigma_s) x_s + alpha_t (x0_s + x0_t) / 2: starting the same grid at
    t = 1 - delta (finite h) converges to it as delta -> 0, with no jump at delta = 0 (order 1:
    at orders 2-3 the start point's weight in later steps falls only as 1 / log(delta))."""
    order = 1
    den = MIXTURE.denoiser(schedules.rectified_flow(), "flow")
    x1 = noise(64, MIXTURE.dim, seed=3)
    grid = torch.linspace(1.0, 0.0, 6, dtype=torch.float64)

    def run(t0: float) -> torch.Tensor:
        ts = grid.clone()
        ts[0] = t0
        return S.get("unipc").fn(den, x1, ts, order=order)

    at_one = run(1.0)
    gaps = [rmse(run(1.0 - d), at_one) for d in (1e-3, 1e-4, 1e-5)]
    assert gaps[2] < 1e-4 and gaps[2] < gaps[1] < gaps[0], gaps
