"""Bespoke solvers fitted to one model: the coefficients of the linear multistep form.

The sampler ``bespoke`` (:mod:`difflab.samplers.bespoke`) runs

    x_j = c_j x_T + sum_{k < j} d_{jk} D_k,    D_k = x0_hat(x_k, t'_k),    j = 1 .. n,

with given coefficients. :func:`tune_solver` fits them to one model: it minimises the mean
squared error between x_n and an accurate solution of the probability-flow ODE from the same
calibration noise (:mod:`difflab.fitting.reference`), the objective of Bespoke Non-Stationary
solvers (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and
Flow Models", Sec. 3). The fit starts from a classical solver's coefficients
(:func:`~difflab.samplers.bespoke.solver_coefficients`), so it only moves where the calibration
error says so, and it keeps the grid and the decoupled evaluation times t'_k of
:func:`~difflab.fitting.grids.tune_grid` (fitting t'_k too, by the gradient through the
network's time input).

Why it helps: a classical solver's coefficients come from a Taylor expansion that assumes
small steps; at 5-10 steps the steps are large and the best combination of the same network
outputs is a property of the model. Fit on enough calibration draws: with few, the fit also
learns their particular errors. Measurements: docs/fitting.md.

**No fit touches the caller's modules.** Gradients are taken with
``torch.autograd.grad(loss, [coefficients, times])``: with respect to the fitted numbers only,
so the network's parameters keep their ``requires_grad`` flags and their ``.grad``, and other
threads may sample (or fit) the same model meanwhile.

Cost: one gradient-based fit (L-BFGS, ``max_iter`` closures of forward + backward through
``steps`` network calls on the calibration batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.fitting.fit import Fit
from difflab.fitting.grids import adaptive_grid, tune_grid
from difflab.fitting.reference import calibration_reference, reference_profile
from difflab.samplers import SolverPlan, timesteps
from difflab.samplers.bespoke import BASES, run_linear, solver_coefficients
from difflab.samplers.common import EvalTimes, Grid, predict

__all__ = ["tune_solver", "fit_solver", "fit_solvers", "describe_fit", "BASES", "START_GRIDS",
           "RESTART_GAIN"]

RESTART_GAIN = 1e-3  # L-BFGS restarts while the last run lowered the MSE by this fraction
# The grids spacing="auto" fits from (why these two: docs/fitting.md).
START_GRIDS = ("adaptive", "uniform")


def tune_solver(denoiser: BaseDenoiser, steps: int, noise: Tensor, *, base: str = "unipc",
                grid: Sequence[float] | Tensor | SolverPlan | str | None = None,
                cond: Any = None, reference: Tensor | None = None, reference_steps: int = 200,
                max_iter: int = 100, fit_times: bool = True, batch_size: int | None = None,
                t_start: float = 1.0, init: Sequence[Sequence[float]] | None = None) -> Fit:
    """Fit the coefficients of a ``steps``-step bespoke solver to ``denoiser`` on the
    calibration ``noise`` (standard normal; every draw is a sample of the objective, so use
    hundreds where the model is cheap).

    ``grid``: the grid (times, or a tuned grid's :class:`~difflab.samplers.SolverPlan` /
    :class:`Fit` with its evaluation times, or a spacing name of
    :func:`~difflab.samplers.timesteps`); by default ``tune_grid(denoiser, base, steps,
    noise)`` first. A spacing is the far cheaper start (no Nelder-Mead runs through the model).
    The fit starts from ``base``'s coefficients on that grid and runs L-BFGS (strong Wolfe line
    search) for ``max_iter`` iterations in all: when its line search stalls before that, L-BFGS
    starts again from where it stopped with a fresh curvature memory, as long as the last run
    lowered the calibration MSE by :data:`RESTART_GAIN` (where draws switch mixture components
    the loss is steep and curved, and the memory of the flat part misleads). With
    ``fit_times`` the times the network is told (the grid's evaluation times t'_j,
    :class:`~difflab.samplers.common.EvalTimes`) are fitted with the coefficients.
    ``batch_size`` splits the calibration batch for memory (gradients are accumulated;
    ``cond`` is sliced with ``cond[i:j]``). ``init``: start from these coefficients instead
    of ``base``'s (a warm start, e.g. :func:`~difflab.fitting.fast.fast_fit_solvers`' ridge
    fit; ``rmse_base`` is then that of the start). Returns the :class:`Fit` that
    ``difflab.sample(..., fit=result)`` runs: ``ts``, ``eval_ts``, ``coeffs``, and how they
    were made (``rmse`` on the calibration batch, ``rmse_base`` of the base solver on the same
    grid and evaluation times, ...). The denoiser's modules are not changed (module
    docstring).
    """
    if base not in BASES:
        raise ValueError(f"unknown base solver {base!r}; valid: {list(BASES)}")
    schedule = denoiser.schedule
    reference = calibration_reference(denoiser, steps, noise, reference, reference_steps, cond,
                                      t_start)
    tuned: Fit | None = None
    if isinstance(grid, str):
        grid = timesteps(schedule, steps, grid, t_start=t_start).tolist()
    elif grid is None:
        tuned = tune_grid(denoiser, base, steps, noise, cond=cond, reference=reference,
                          t_start=t_start)
        grid = tuned
    if isinstance(grid, SolverPlan):
        ts_list = list(grid.ts)
        eval_ts = list(grid.eval_ts if grid.eval_ts is not None else grid.ts)
    else:
        ts_list = torch.as_tensor(grid, dtype=torch.float64).flatten().tolist()
        eval_ts = list(ts_list)
    if len(ts_list) != steps + 1 or len(eval_ts) != steps + 1:
        raise ValueError(f"grid has {len(ts_list)} times; {steps} steps need {steps + 1}")
    ts = torch.tensor(ts_list, dtype=torch.float64)
    x_T = noise * schedule.prior_std(ts_list[0])
    g = Grid(schedule, ts, x_T)
    # where t' may differ from t (alpha > 0, sigma > 0: as EvalTimes decides)
    told = EvalTimes(denoiser, {})
    movable = torch.tensor([0 < a and 0 < s for a, s in zip(g.alpha[:-1], g.sigma[:-1])])
    tau0 = torch.tensor(eval_ts[:steps], dtype=torch.float64)
    if init is None:
        init = solver_coefficients(base, schedule, ts)
    elif [len(row) for row in init] != list(range(2, steps + 2)):
        raise ValueError(f"init needs {steps} rows of 2, 3, .., {steps + 1} numbers")
    sizes = [len(row) for row in init]
    theta0 = torch.tensor([c for row in init for c in row], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    shift = torch.zeros(steps, dtype=torch.float64, requires_grad=fit_times)
    params = [theta, shift] if fit_times else [theta]
    ref = reference.to(x_T.dtype)
    chunk = batch_size or x_T.shape[0]

    # t' stays in [half the smallest told time, t_start]: sigma > 0 there, and eps -> x0 exists
    t_lo = 0.5 * float(tau0[movable].min()) if bool(movable.any()) else 0.0

    def times(dt: Tensor) -> Tensor:
        return torch.where(movable, (tau0 + dt).clamp(t_lo, t_start), tau0)

    def run(th: Tensor, tau: Tensor, x: Tensor, c: Any) -> Tensor:
        def x0_at(x_j: Tensor, j: int) -> Tensor:  # the network told tau_j (differentiable)
            if bool(movable[j]):
                return told.predict_told(x_j, g.points[j], tau[j], c).x0
            return predict(denoiser, x_j, g, j, c).x0

        return run_linear(x0_at, x, th.split(sizes))

    def loss_of(th: Tensor, dt: Tensor, grads: list[Tensor] | None = None) -> float:
        """The calibration MSE; with ``grads``, its gradient w.r.t. ``params`` added there."""
        total = 0.0
        for i in range(0, x_T.shape[0], chunk):
            c = None if cond is None else cond[i:i + chunk]
            x = run(th, times(dt), x_T[i:i + chunk], c)
            err = (x - ref[i:i + chunk]).to(torch.float64).pow(2).sum() / ref.numel()
            if grads is not None:  # only the fitted numbers: no module's .grad is written
                for acc, d in zip(grads, torch.autograd.grad(err, params, allow_unused=True)):
                    if d is not None:
                        acc += d
            total += float(err.detach())
        return total

    with torch.no_grad():
        mse_base = loss_of(theta0, torch.zeros(steps, dtype=torch.float64))
    n_iter, mse, best = 0, mse_base, (theta0, torch.zeros(steps, dtype=torch.float64))
    while n_iter < max_iter:  # L-BFGS, restarted while a fresh start still makes progress
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter - n_iter,
                                history_size=50, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure() -> Tensor:
            grads = [torch.zeros_like(p) for p in params]
            with torch.enable_grad():
                value = loss_of(theta, shift, grads)
            for p, d in zip(params, grads):  # our own leaves, not the caller's
                p.grad = d
            return torch.tensor(value)  # L-BFGS reads float(loss)

        opt.step(closure)
        n_iter += max(1, int(opt.state[theta].get("n_iter", 0)))
        with torch.no_grad():
            now = loss_of(theta.detach(), shift.detach())
        gained = now < mse * (1 - RESTART_GAIN)
        if now < mse:
            mse, best = now, (theta.detach().clone(), shift.detach().clone())
        if not gained:  # stalled (or not finite): a restart would not help
            break
    fitted, tau = best[0], times(best[1])  # the base solver itself if nothing was better
    coeffs = [row.tolist() for row in fitted.split(sizes)]
    return Fit("bespoke", ts_list, tau.tolist() + ts_list[steps:], coeffs, base=base,
               rmse=math.sqrt(mse), rmse_base=math.sqrt(mse_base),
               rmse_default=None if tuned is None else tuned.rmse_default,
               fit_times=fit_times, iterations=n_iter, calibration=int(noise.shape[0]))


def fit_solver(denoiser: BaseDenoiser, steps: int, noise: Tensor,
               reference: Tensor | None = None, *, spacing: str = "auto",
               profile: dict[str, Any] | None = None, reference_steps: int = 100,
               max_iter: int = 60, batch_size: int | None = None,
               cond: Any = None) -> Fit:
    """:func:`tune_solver` from unipc on the ``spacing`` grid: ``"adaptive"``
    (:func:`~difflab.fitting.grids.adaptive_grid` on the calibration trajectories'
    ``profile``), or a spacing name of :func:`~difflab.samplers.timesteps`; ``"auto"``: from
    each of :data:`START_GRIDS`, keeping the fit with the lowest calibration RMSE (its
    ``spacing`` says which; ``starts`` holds each start's RMSE). ``reference`` and ``profile``
    come from one :func:`~difflab.fitting.reference.reference_profile` solve
    (``reference_steps``), made here where missing. The fit is local (L-BFGS from the base
    solver, with the grid's noise levels fixed), so its start matters (docs/fitting.md)."""
    starts = START_GRIDS if spacing == "auto" else (spacing,)
    if reference is None or (profile is None and "adaptive" in starts):
        ref, profile = reference_profile(denoiser, noise, reference_steps, cond=cond,
                                         batch_size=batch_size)
        reference = ref if reference is None else reference
    fits = []
    for start in starts:
        grid: Any = start
        if start == "adaptive":
            grid = adaptive_grid(denoiser.schedule, steps, profile)
        fit = tune_solver(denoiser, steps, noise, grid=grid, cond=cond, reference=reference,
                          max_iter=max_iter, batch_size=batch_size)
        fits.append(fit.with_(spacing=start))
    best = min(fits, key=lambda f: f.rmse)
    return best.with_(starts={f.spacing: f.rmse for f in fits})


def fit_solvers(denoiser: BaseDenoiser, steps: Sequence[int], noise: Tensor, *,
                spacing: str = "auto", reference_steps: int = 100, max_iter: int = 60,
                batch_size: int | None = None, cond: Any = None,
                log: Callable[[str], None] | None = None) -> dict[int, Fit]:
    """Fit a bespoke solver for each step count in ``steps`` on one calibration batch (one
    reference solve serves them all, and gives the adaptive grids' profile) with
    :func:`fit_solver` (``spacing="auto"``: from each of :data:`START_GRIDS`, the best fit
    kept). Returns the fits by step count; pass one to sampling explicitly,
    ``difflab.sample(denoiser, noise, fit=fits[k])``, or store them with the checkpoint
    (:func:`~difflab.fitting.store.save_fit`). They belong to these weights: fit again after
    the network changes. ``log`` receives one line per fit (:func:`describe_fit`)."""
    ref, profile = reference_profile(denoiser, noise, reference_steps, cond=cond,
                                     batch_size=batch_size)
    fits = {}
    for k in [int(k) for k in steps]:
        fit = fit_solver(denoiser, k, noise, ref, spacing=spacing, profile=profile,
                         max_iter=max_iter, batch_size=batch_size, cond=cond)
        fits[k] = fit.with_(reference_steps=reference_steps)
        if log is not None:
            log(describe_fit(fits[k]))
    return fits


def describe_fit(fit: Fit) -> str:
    """One line on a :func:`fit_solver` result: its calibration RMSE, start, base and starts."""
    starts = ", ".join(f"{k} {v:.4g}" for k, v in (fit.starts or {}).items())
    return (f"bespoke {fit.steps} steps ({fit.nfe} NFE): calibration RMSE "
            f"{fit.rmse:.4g} from the {fit.spacing} grid ({fit.base} there "
            f"{fit.rmse_base:.4g}; from each start: {starts}), {fit.iterations} L-BFGS "
            "iterations")
