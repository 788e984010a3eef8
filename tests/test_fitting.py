"""The fitting room's contracts: the one-step function against its closed forms on the exact
mixture, and fits that leave the caller's modules alone while other threads sample them."""

from __future__ import annotations

import math
import threading

import pytest
import torch

import difflab
from difflab import fitting, schedules
from difflab import samplers as S
from difflab.toy import GaussianMixture


def _alpha_sigma(sch, t: float) -> tuple[float, float]:
    a, s = sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))
    return float(a), float(s)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_step_is_the_first_order_formula(prediction):
    """x_t = (sigma_t / sigma_s) x + alpha_t (1 - e^{-h}) x0_hat(x, s), h = lam_t - lam_s, with
    x0_hat the exact posterior mean of the mixture; the Euler and DPM-Solver-1 steps are the
    same step; a step to t = 0 is alpha_0 x0_hat."""
    sch = schedules.linear()
    mix = GaussianMixture.random(4, 3, seed=2)
    den = mix.denoiser(sch, prediction)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s, t = 0.7, 0.4
    (a_s, s_s), (a_t, s_t) = _alpha_sigma(sch, s), _alpha_sigma(sch, t)
    h = math.log(a_t / s_t) - math.log(a_s / s_s)
    x0_hat = mix.posterior_mean(x, a_s, s_s)
    expect = (s_t / s_s) * x + a_t * -math.expm1(-h) * x0_hat
    torch.testing.assert_close(fitting.step(den, x, s, t), expect, rtol=1e-10, atol=1e-10)
    for sampler in ("euler", "dpm_solver_1"):
        torch.testing.assert_close(fitting.step(den, x, s, t, sampler=sampler), expect,
                                   rtol=1e-10, atol=1e-10)
    a_0 = _alpha_sigma(sch, 0.0)[0]
    torch.testing.assert_close(S.step(den, x, s, 0.0), a_0 * x0_hat, rtol=1e-10, atol=1e-10)
    assert fitting.step(den, x, s, s) is x


def test_heun_step_is_the_trapezoid():
    """Heun (Karras et al. 2022, Alg. 1) in x~ = x / alpha, sigma~ = sigma / alpha:
    d = (x~ - D) / sigma~, x~' = x~ + (sigma~_t - sigma~_s) d_s, x~_t = x~ + (sigma~_t -
    sigma~_s) (d_s + d(x~', sigma~_t)) / 2 (two calls)."""
    sch = schedules.cosine()
    mix = GaussianMixture.ring()
    den = mix.denoiser(sch, "eps")
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s, t = 0.6, 0.45
    (a_s, s_s), (a_t, s_t) = _alpha_sigma(sch, s), _alpha_sigma(sch, t)
    ss, st = s_s / a_s, s_t / a_t
    xs = x / a_s
    d_s = (xs - mix.posterior_mean(x, a_s, s_s)) / ss
    x_e = xs + (st - ss) * d_s  # Euler in VE variables, then the network at sigma~_t
    d_t = (x_e - mix.posterior_mean(a_t * x_e, a_t, s_t)) / st
    expect = a_t * (xs + (st - ss) * 0.5 * (d_s + d_t))
    net = den.net
    calls = net.calls
    got = fitting.step(den, x, s, t, sampler="heun")
    assert net.calls - calls == 2
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)


def test_step_with_one_time_per_row_and_a_condition():
    """Per-row times (as distillation draws them): rows sharing a pair of times are stepped
    together, the condition sliced with them; each row equals its own one-step call."""
    from difflab.denoiser.condition import Condition

    sch = schedules.linear()
    mix = GaussianMixture.ring()
    den = mix.denoiser(sch, "x0")
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(12) % mix.num_components
    t_from = torch.tensor([0.9, 0.5, 0.9, 0.3] * 3, dtype=torch.float64)
    t_to = torch.tensor([0.6, 0.2, 0.6, 0.0] * 3, dtype=torch.float64)
    got = S.step(den, x, t_from, t_to, sampler="dpm_solver_2", cond=Condition.of(y))
    for i in range(12):
        one = S.step(den, x[i:i + 1], float(t_from[i]), float(t_to[i]), sampler="dpm_solver_2",
                     cond=y[i:i + 1])
        torch.testing.assert_close(got[i:i + 1], one, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no one-step form; valid"):
        S.step(den, x, 0.5, 0.2, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="earlier t_to"):
        S.step(den, x, 0.2, 0.5)


def _mlp_denoiser() -> difflab.Denoiser:
    from difflab.nets import build

    torch.manual_seed(0)
    net = build({"type": "mlp", "dim": 2, "hidden": 32, "depth": 2}).eval()
    return difflab.Denoiser(net, schedules.linear(), prediction="eps")


def test_threads_sample_while_another_fits_one_model():
    """Eight threads sample one network-backed denoiser while a ninth fits a bespoke solver to
    it: every result equals the sequential run's, and the fit leaves the network's parameters
    as it found them (requires_grad flags and .grad, a fresh network's included)."""
    den = _mlp_denoiser()
    params = list(den.net.parameters())
    sentinel = torch.full_like(params[0], 7.0)
    params[0].grad = sentinel.clone()  # a caller's gradient in flight
    params[-1].requires_grad_(False)  # a caller's mixed flags
    flags = [p.requires_grad for p in params]
    noises = [torch.randn(16, 2, generator=torch.Generator().manual_seed(10 + i))
              for i in range(8)]
    cal = torch.randn(32, 2, generator=torch.Generator().manual_seed(99))

    def draw(i: int) -> torch.Tensor:
        sampler = ("dpmpp_2m", "unipc", "heun", "euler_ancestral")[i % 4]
        return S.sample(den, noises[i], sampler, 6,
                        generator=torch.Generator().manual_seed(i))

    def fit() -> fitting.Fit:
        return fitting.tune_solver(den, 3, cal, grid="uniform", reference_steps=20, max_iter=5,
                                   batch_size=16)

    expect = [draw(i) for i in range(8)]
    expect_fit = fit()
    assert [p.requires_grad for p in params] == flags
    assert torch.equal(params[0].grad, sentinel) and all(p.grad is None for p in params[1:])

    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(8)}
    seen: list[list[bool]] = []  # the flags as the sampling threads see them, mid-fit
    fits: list[fitting.Fit] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def sampler_thread(i: int) -> None:
        try:
            while True:  # keep sampling for as long as the fit runs (at least twice)
                results[i].append(draw(i))
                seen.append([p.requires_grad for p in params])
                if done.is_set() and len(results[i]) >= 2:
                    break
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def fit_thread() -> None:
        try:
            fits.append(fit())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    threads = [threading.Thread(target=sampler_thread, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=fit_thread))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    assert fits[0] == expect_fit  # same coefficients, times and calibration RMSE, bit for bit
    for i in range(8):
        assert all(torch.equal(x, expect[i]) for x in results[i]), i
    assert all(f == flags for f in seen)
    assert [p.requires_grad for p in params] == flags
    assert torch.equal(params[0].grad, sentinel) and all(p.grad is None for p in params[1:])
    assert not getattr(den, "solvers", None)


def test_fit_solvers_leaves_the_network_alone_and_runs_through_sample():
    """fit_solvers and tune_grid on a network-backed denoiser: no parameter gains a .grad or
    changes its requires_grad flag, and the fits run through ``difflab.sample(fit=...)``."""
    den = _mlp_denoiser()
    params = list(den.net.parameters())
    before = [p.detach().clone() for p in params]
    cal = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    fits = fitting.fit_solvers(den, [2], cal, reference_steps=20, max_iter=3)
    grid = fitting.tune_grid(den, "unipc", 2, cal, reference_steps=20, max_evals=20)
    assert all(p.requires_grad and p.grad is None for p in params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    x = difflab.sample(den, cal, fit=fits[2])
    assert x.shape == cal.shape and bool(torch.isfinite(x).all())
    assert difflab.sample(den, cal, fit=grid).shape == cal.shape


def test_a_fit_takes_a_condition_as_it_takes_labels():
    """cond reaches the fit unchanged and is sliced into the calibration chunks with
    cond[i:j]: a Condition and the bare label tensor it wraps give the same fit."""
    from difflab import guidance
    from difflab.denoiser.condition import Condition

    sch = schedules.linear()
    mix = GaussianMixture.ring()
    den = guidance.classifier_free(mix.denoiser(sch, "eps"), 1.0, uncond=mix.num_components)
    y = torch.arange(48) % mix.num_components
    cal = torch.randn(48, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(grid="log_snr", max_iter=5, batch_size=20, reference_steps=30)
    with_labels = fitting.tune_solver(den, 3, cal, cond=y, **kw)
    assert fitting.tune_solver(den, 3, cal, cond=Condition.of(y), **kw) == with_labels
    x = difflab.sample(den, cal, fit=with_labels, cond=Condition.of(y))
    assert torch.equal(x, difflab.sample(den, cal, fit=with_labels, cond=y))
