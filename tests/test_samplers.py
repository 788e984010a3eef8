"""Samplers against the exact Gaussian-mixture model (float64): grids, convergence orders, NFE,
stochastic samplers' distributions, reproducibility, thread safety, every schedule kind."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import difflab
from difflab import samplers as S
from difflab import schedules
from difflab.samplers.timesteps import timesteps
from difflab.toy import GaussianMixture

F64 = torch.float64
RING = GaussianMixture.ring(8, radius=2.0, std=0.2)
LINEAR = schedules.linear(1e-4, 0.02, 1000)
DETERMINISTIC = [n for n in S.names() if not S.get(n).stochastic]
STOCHASTIC = [n for n in S.names() if S.get(n).stochastic]
ORDER = {"ddim": 1, "euler": 1, "dpm_solver_1": 1, "dpmpp_2m": 2, "heun": 2, "dpm_solver_2": 2,
         "dpmpp_3m": 3, "dpm_solver_3": 3, "unipc": 3}



def noise(n: int, dim: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def log_snr_grid(schedule, n: int, sigma_min: float) -> torch.Tensor:
    """n points uniform in log sigma~ from the prior to sigma_min, then t = 0."""
    log_s = torch.linspace(math.log(schedule.sigma_max_ratio()), math.log(sigma_min), n,
                           dtype=F64)
    t = schedule.t_from_sigma_ratio(log_s.exp())
    t[0] = 1.0
    return torch.cat([t, torch.zeros(1, dtype=F64)])


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


# --- grids -------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 1000])
def test_grids_decrease_without_duplicates_and_end_clean(spacing, steps):
    if spacing == "linspace" and steps == 1000:  # T - 1 steps at most (one index a step)
        with pytest.raises(ValueError, match="at most T - 1"):
            timesteps(LINEAR, steps, spacing)
        steps = 999
    ts = timesteps(LINEAR, steps, spacing)
    assert ts.shape == (steps + 1,) and ts.dtype == F64
    assert bool((ts[1:] < ts[:-1]).all()), "duplicate or increasing grid points"
    assert float(ts[-1]) == 0.0 and float(LINEAR.sigma(ts[-1])) == 0.0
    if spacing != "leading":
        assert float(ts[0]) == 1.0  # starts at the prior


def test_grid_definitions():
    T = 1000
    # uniform with steps = T visits the DDPM indices T-1 .. 0 exactly
    ts = timesteps(LINEAR, T, "uniform")
    torch.testing.assert_close(LINEAR.net_time(ts[:-1]), torch.arange(T - 1, -1, -1, dtype=F64))
    # trailing / leading: diffusers' definitions (index -> t = (index + 1) / T)
    for steps in (3, 7, 50):
        trailing = torch.round(torch.arange(T, 0, -T / steps, dtype=F64)) - 1
        torch.testing.assert_close(timesteps(LINEAR, steps, "trailing")[:-1], (trailing + 1) / T)
        leading = (torch.arange(steps, dtype=F64) * (T // steps)).flip(0)
        torch.testing.assert_close(timesteps(LINEAR, steps, "leading")[:-1], (leading + 1) / T)
    # linspace: numpy's round(linspace(0, T - 1, n + 1)), reversed, index 0 dropped (rounding
    # half to even as numpy does, e.g. 499.5 -> 500 at n = 26)
    for steps in (5, 20, 26, 999):
        idx = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
        torch.testing.assert_close(timesteps(LINEAR, steps, "linspace")[:-1],
                                   (torch.from_numpy(idx) + 1) / T)
    assert abs(float(timesteps(LINEAR, 5, "leading")[0]) - 0.801) < 1e-12  # not the prior
    # log_snr: uniform log-SNR from lambda(1) to sigma_min; karras: Eq. 5 with rho = 7
    lam = LINEAR.log_snr(timesteps(LINEAR, 9, "log_snr")[:-1])
    torch.testing.assert_close(lam.diff(), torch.full((8,), float(lam[1] - lam[0]), dtype=F64))
    torch.testing.assert_close(float(lam[-1]), -2 * math.log(LINEAR.sigma_min))
    sig = LINEAR.sigma(timesteps(LINEAR, 6, "karras")[:-1])
    sig = sig / LINEAR.alpha(timesteps(LINEAR, 6, "karras")[:-1])
    lo, hi = LINEAR.sigma_min ** (1 / 7), LINEAR.sigma_max_ratio() ** (1 / 7)
    torch.testing.assert_close(sig, (hi + torch.linspace(0, 1, 6, dtype=F64) * (lo - hi)) ** 7)


def test_t_start_and_the_front_door_noise_scale():
    for spacing in ("uniform", "log_snr", "karras"):
        ts = timesteps(LINEAR, 6, spacing, t_start=0.5)
        assert float(ts[0]) == 0.5 and float(ts[-1]) == 0.0 and bool((ts[1:] < ts[:-1]).all())
    edm = schedules.edm()
    seen = []
    S.sample(RING.denoiser(edm), noise(4), "euler", 3, callback=seen.append)
    # the first step is x_1 = sigma_max-scaled noise: x0_hat of the exact model at sigma 80
    x1 = noise(4) * edm.prior_std()
    torch.testing.assert_close(seen[0]["x0"], RING.posterior_mean(x1, 1.0, 80.0))


def test_zero_terminal_snr_grids_start_at_the_prior():
    ztsnr = schedules.linear(zero_terminal_snr=True)
    for spacing in ("log_snr", "karras", "uniform", "trailing"):
        ts = timesteps(ztsnr, 10, spacing)
        assert float(ts[0]) == 1.0 and float(ztsnr.alpha(ts[0])) == 0.0
        assert bool((ts[1:] < ts[:-1]).all())
        assert math.isfinite(float(ztsnr.log_snr(ts[1])))


def test_bad_input_names_the_valid_choices():
    den = RING.denoiser(LINEAR, "x0")
    x = noise(4)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        S.sample(den, x, "dpmpp_4m")
    with pytest.raises(ValueError, match="log_snr"):
        S.sample(den, x, "ddim", 10, spacing="cubic")
    with pytest.raises(ValueError, match="steps"):
        S.sample(den, x, "ddim", 0)
    with pytest.raises(ValueError, match="eta"):
        S.sample(den, x, "ddim", 10, etta=1.0)
    with pytest.raises(ValueError, match="variance"):
        S.sample(den, x, "ddpm", 10, variance="large")
    with pytest.raises(ValueError, match="discrete"):
        timesteps(schedules.edm(), 10, "trailing")
    with pytest.raises(ValueError, match="at most"):
        timesteps(LINEAR, 1001, "leading")
    assert set(S.names()) >= {"ddpm", "ddim", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3",
                              "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler", "heun",
                              "euler_ancestral", "unipc"}


@pytest.mark.parametrize("name", ["heun", "dpm_solver_2", "dpm_solver_3"])
def test_large_steps_warn_where_the_sampler_loses_accuracy(name):
    """Heun's limit (euler.py) and the singlestep noise-prediction solvers' (dpm_solver.py): a
    step that shrinks sigma~ by > 10x warns and names the way out; the warning marks exactly
    the step counts where the error is far off the solver's order (bench/samplers.py, ring:
    heun 29 / 1.6 / 0.12, dpm_solver_2 1.4 / 0.6 / 0.06 at 3 / 5 / 10 steps)."""
    import warnings

    den = RING.denoiser(LINEAR, "eps")
    x = noise(64)
    ref = S.sample(den, x, "dpm_solver_3", 200)
    errors = {}
    for steps in (3, 5, 10, 20):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            errors[steps] = rmse(S.sample(den, x, name, steps), ref)
        warned = [w for w in caught if name in str(w.message)]
        # the default log-SNR grid on DDPM's linear schedule shrinks sigma~ 125x / 11x / 2.9x /
        # 1.7x per step at 3 / 5 / 10 / 20 steps
        assert bool(warned) == (steps <= 5), (steps, errors[steps])
        if warned:
            assert "dpmpp_2m / unipc" in str(warned[0].message)
            assert warned[0].filename == __file__  # points at the caller of difflab.sample
    assert errors[5] > 3 * errors[10] and errors[10] < 0.5, errors


# --- the probability-flow ODE ------------------------------------------------------------
@pytest.fixture(scope="module")
def ode_reference():
    """x(0) from 64 noises: dpm_solver_3 (a singlestep 3rd-order solver, checked by the order
    test) with 400 steps; 200 steps differ by ~8x its own error, so it must agree to 2e-6."""
    den = RING.denoiser(LINEAR, "x0")
    x1 = noise(64)
    ref = S.get("dpm_solver_3").fn(den, x1, log_snr_grid(LINEAR, 400, 1e-3))
    ref2 = S.get("dpm_solver_3").fn(den, x1, log_snr_grid(LINEAR, 200, 1e-3))
    assert rmse(ref, ref2) < 2e-6, "reference not converged"
    return den, x1, ref


@pytest.mark.parametrize("name", sorted(ORDER))
def test_convergence_order(name, ode_reference):
    """Least-squares slope of log error vs log steps on 40..160 steps ~ the method's order."""
    den, x1, ref = ode_reference
    ns = [40, 80, 160]
    errs = [rmse(S.get(name).fn(den, x1, log_snr_grid(LINEAR, n, 1e-3)), ref) for n in ns]
    lx = torch.log(torch.tensor(ns, dtype=F64))
    ly = torch.log(torch.tensor(errs, dtype=F64))
    slope = -float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())
    assert abs(slope - ORDER[name]) < 0.35, f"{name}: slope {slope:.2f}, errors {errs}"
    assert errs[-1] < 2e-2


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "euler_ancestral"])
def test_data_and_noise_forms_agree(name):
    """These samplers step in the form the prediction holds without a conversion (data form
    for an x0 network, noise form for an eps network; ``common.first_order_step``). The exact
    mixture as either network gives the same samples, for both the default extrapolated and
    the x0 final step where it applies: each noise form is its data form rewritten (a wrong
    coefficient would differ by ~1e-2; measured float64 round-off: ~1e-15)."""
    x1 = noise(64, seed=5)
    finals = ("x0", "extrapolate") if "final" in S.get(name).options else (None,)
    for final in finals:
        kw = {} if final is None else {"final": final}
        out = [S.sample(RING.denoiser(LINEAR, p), x1, name, 12,
                        generator=torch.Generator().manual_seed(0), **kw) for p in ("x0", "eps")]
        assert rmse(out[0], out[1]) < 1e-12, (name, final, rmse(out[0], out[1]))
        assert near_ring_fraction(out[0]) > 0.9  # and they are samples of the mixture


def test_final_step_extrapolation_removes_the_error_floor(ode_reference):
    """With the default grid (last nonzero sigma~ = sigma_min ~ 0.01), the first-order final
    step leaves an O(sigma_min^2) floor; extrapolating in sigma~^2 removes most of it."""
    den, x1, ref = ode_reference
    for name in ("dpmpp_3m", "unipc"):
        e_x0 = rmse(S.sample(den, x1, name, 300, final="x0"), ref)
        e_ex = rmse(S.sample(den, x1, name, 300, final="extrapolate"), ref)
        assert e_ex < e_x0 / 10, (name, e_x0, e_ex)


def test_defaults_are_accurate(ode_reference):
    den, x1, ref = ode_reference
    assert rmse(S.sample(den, x1), ref) < 0.15  # dpmpp_2m, 10 steps
    assert rmse(difflab.sample(den, x1, "unipc", 20), ref) < 2e-2


# --- NFE and the times the network sees --------------------------------------------------
class Recorder(torch.nn.Module):
    """Wraps an exact mixture net and records every net_time it receives."""

    def __init__(self, net):
        super().__init__()
        self.net, self.times = net, []

    def forward(self, x, net_t, cond=None):
        self.times.append(net_t.detach().clone())
        return self.net(x, net_t, cond)


def recording_denoiser(schedule, prediction="x0"):
    den = RING.denoiser(schedule, prediction)
    rec = Recorder(den.net)
    return difflab.Denoiser(rec, schedule, prediction), rec


@pytest.mark.filterwarnings("ignore:heun with")  # few steps on purpose: NFE only
@pytest.mark.filterwarnings("ignore:dpm_solver_")
@pytest.mark.parametrize("name", S.names())
def test_nfe_is_exact(name):
    den, rec = recording_denoiser(LINEAR)
    for steps in (1, 2, 5, 12):
        rec.times.clear()
        S.sample(den, noise(3), name, steps, generator=torch.Generator().manual_seed(0))
        assert len(rec.times) == S.get(name).nfe(steps), (name, steps)


def test_ddpm_1000_steps_visits_the_ddpm_indices():
    den, rec = recording_denoiser(LINEAR, "eps")
    S.sample(den, noise(2), "ddpm", 1000, generator=torch.Generator().manual_seed(0))
    seen = torch.stack([t[0] for t in rec.times]).to(F64)
    torch.testing.assert_close(seen, torch.arange(999, -1, -1, dtype=F64), rtol=0, atol=1e-9)


def test_fractional_times_are_passed_unrounded():
    den, rec = recording_denoiser(LINEAR)
    S.sample(den, noise(2), "euler", 7, spacing="karras")
    want = LINEAR.net_time(timesteps(LINEAR, 7, "karras")[:-1])
    torch.testing.assert_close(torch.stack([t[0] for t in rec.times]).to(F64), want)
    assert float((want - want.round()).abs().max()) > 0.01  # really fractional


def test_callback_sees_every_step():
    seen = []
    S.sample(RING.denoiser(LINEAR), noise(2), "dpmpp_2m", 6, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(6))
    assert all({"t", "x", "x0"} <= set(d) for d in seen)


# --- stochastic samplers reproduce the mixture --------------------------------------------
def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64) -> float:
    g = torch.Generator().manual_seed(123)
    d = torch.randn(a.shape[1], n_proj, generator=g, dtype=F64)
    d = d / d.norm(dim=0)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


@pytest.mark.parametrize("name,opts", [(n, {}) for n in STOCHASTIC]
                         + [("ddim", {"eta": 1.0}), ("ddpm", {"variance": "beta"})])
def test_stochastic_samplers_reproduce_the_mixture(name, opts):
    n = 4000
    g = torch.Generator().manual_seed(7)
    data_a = RING.sample(n, g)[0]
    data_b = RING.sample(n, g)[0]
    floor = sliced_w2(data_a, data_b)
    x = S.sample(RING.denoiser(LINEAR, "eps"), noise(n, seed=3), name, 100,
                 generator=torch.Generator().manual_seed(5), **opts)
    assert sliced_w2(x, data_a) < 2.0 * floor, (sliced_w2(x, data_a), floor)
    assert sliced_w2(1.1 * data_b, data_a) > 2.0 * floor  # a 10% wrong scale fails


# --- purity: threads and per-image generators ---------------------------------------------
def test_one_denoiser_serves_eight_threads():
    den = RING.denoiser(LINEAR, "eps")
    jobs = [(name, seed) for seed in range(4) for name in ("dpmpp_3m", "ddpm")]

    def run(job):
        name, seed = job
        return S.sample(den, noise(16, seed=seed), name, 15,
                        generator=torch.Generator().manual_seed(seed))

    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(run, jobs))
    for a, b in zip(sequential, threaded):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_per_image_generators_reproduce_image_k_alone(name):
    den = RING.denoiser(LINEAR, "eps")
    x1 = noise(4, seed=9)
    gens = [torch.Generator().manual_seed(100 + k) for k in range(4)]
    batch = S.sample(den, x1, name, 12, generator=gens)
    alone = S.sample(den, x1[2:3], name, 12, generator=[torch.Generator().manual_seed(102)])
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-12, atol=1e-12)
    again = S.sample(den, x1, name, 12, generator=[torch.Generator().manual_seed(100 + k)
                                                    for k in range(4)])
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per image"):
        S.sample(den, x1, name, 3, generator=gens[:2])


# --- every sampler x every schedule kind x prediction type ---------------------------------
KINDS = {
    "linear": (schedules.linear(), ("eps", "x0", "v", "score")),
    "cosine": (schedules.cosine(), ("eps", "x0", "v", "score")),
    "edm": (schedules.edm(), ("eps", "x0", "v")),
    "ztsnr": (schedules.linear(zero_terminal_snr=True), ("v", "x0")),
}


def near_ring_fraction(x: torch.Tensor) -> float:
    d = torch.cdist(x, RING.means).min(1).values
    return float((d < 4 * 0.2).to(F64).mean())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_sampler_every_schedule_every_prediction(kind):
    schedule, predictions = KINDS[kind]
    x1 = noise(100, seed=11)
    for prediction in predictions:
        den = RING.denoiser(schedule, prediction)
        for name in S.names():
            x = S.sample(den, x1, name, 15, generator=torch.Generator().manual_seed(0))
            assert bool(torch.isfinite(x).all()), (kind, prediction, name)
            frac = near_ring_fraction(x)
            assert frac > 0.95, (kind, prediction, name, frac)
