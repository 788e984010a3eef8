"""Bespoke solvers: the general linear multistep solver on a grid, its coefficients fitted to
one model.

Every multistep sampler here (DDIM, DPM-Solver++(2M/3M), Euler, UniPC) calls the network once
per grid point, and the point of each call is a *fixed* linear combination of the starting
point x_T and the data predictions made so far (its coefficients depend on the grid only):

    x_j = c_j x_T + sum_{k < j} d_{jk} D_k,    D_k = x0_hat(x_k, t_k),    j = 1 .. n,

with x_n the output. These n(n + 3) / 2 numbers are the whole solver. A bespoke solver fits
them to one model: it minimises the mean squared error between x_n and an accurate solution
of the probability-flow ODE from the same calibration noise, the objective of Bespoke
Non-Stationary solvers (Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling
of Diffusion and Flow Models", Sec. 3: x_{i+1} = a_i X_i + B_i U_i over all previous points
X and velocities U; both span {x_T, D_0 .. D_i}, so this form has the same solvers with no
redundant coefficients). The fit starts from a classical solver's coefficients
(:func:`solver_coefficients`, read off exactly by running it on a symbolic denoiser), so it
only moves where the calibration error says so, and it keeps the grid and the decoupled
evaluation times of :func:`~difflab.samplers.tuning.tune_grid`.

Why it helps: a classical solver's coefficients come from a Taylor expansion that assumes
small steps; at 5-10 steps the steps are large and the best combination of the same network
outputs is a property of the model. Measured: ``bench/samplers.py`` (exact mixtures) and
``bench/samplers_real.py --grids unipc,bespoke`` (a trained U-Net), in docs/benchmarks.md.
Fit on enough calibration draws: with few, the fit also learns their particular errors (on
the 64-D benchmark mixture, 512 draws fix the draws that end in a wrong component on the
calibration set but not on new noise).

Cost: one gradient-based fit (L-BFGS, ``max_iter`` closures of forward + backward through
``steps`` network calls on the calibration batch); sampling costs the same NFE as the base
solver plus n(n + 1) / 2 axpy operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, Prediction, TimePoint
from difflab.samplers.common import (
    REGISTRY,
    EvalTimes,
    Grid,
    predict,
    register,
)

__all__ = ["sample_bespoke", "solver_coefficients", "tune_solver", "fit_solver",
           "fit_solvers", "describe_fit", "BASES", "START_GRIDS"]

BASES = ("unipc", "dpmpp_3m", "dpmpp_2m", "ddim", "euler")  # one call per grid point


class _Symbolic(BaseDenoiser):
    """The denoiser whose k-th call returns x0_hat = e_{k+1}: a linear sampler run on the
    state x = e_0 then carries its own coefficient vector over (x_T, D_0, D_1, ...)."""

    def __init__(self, schedule: Any, n: int):
        super().__init__()
        self.schedule, self.n, self.calls = schedule, n, []

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        k = len(self.calls)
        self.calls.append((point.t, x[0].clone()))
        if k >= self.n:
            raise ValueError("more network calls than grid points")
        x0 = torch.zeros_like(x)
        x0[:, k + 1] = 1.0
        a, s = point.alpha, point.sigma
        return Prediction(x, x0, (x - a * x0) / s, a, s)

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        raise ValueError("a bespoke base solver must evaluate the network at grid points only")


def solver_coefficients(sampler: str, schedule: Any, ts: Sequence[float] | Tensor,
                        **opts: Any) -> list[list[float]]:
    """The coefficients (c_j, d_j0 .. d_j,j-1), j = 1 .. n, of deterministic ``sampler`` on grid
    ``ts`` (module docstring), exact to float64 rounding: the sampler runs once on a symbolic
    denoiser. Row j < n is the point of network call j, row n the output. ``sampler`` must call
    the network once per grid point (one of :data:`BASES`)."""
    if sampler not in BASES:
        raise ValueError(f"base solver {sampler!r} does not call the network once per grid "
                         f"point; valid: {list(BASES)}")
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    n = ts.numel() - 1
    sym = _Symbolic(schedule, n)
    e0 = torch.zeros(1, n + 1, dtype=torch.float64)
    e0[0, 0] = 1.0
    out = REGISTRY[sampler].fn(sym, e0, ts, **opts)
    if [t for t, _ in sym.calls] != ts[:-1].tolist():
        raise ValueError(f"{sampler} did not call the network once at each grid point")
    rows = [x for _, x in sym.calls[1:]] + [out[0]]
    return [row[: j + 2].tolist() for j, row in enumerate(rows)]


def _check_coeffs(coeffs: Sequence[Sequence[float]], n: int) -> None:
    ok = len(coeffs) == n and all(len(row) == j + 2 for j, row in enumerate(coeffs))
    if not ok:
        raise ValueError(f"coeffs for a {n}-step grid need {n} rows of 2, 3, .., {n + 1} "
                         f"numbers, got row lengths {[len(r) for r in coeffs]}")


def _combine(row: Sequence[Any], x_T: Tensor, D: Sequence[Tensor]) -> Tensor:
    """c x_T + sum_k d_k D_k (numbers or 0-d tensors: the fit differentiates through it)."""
    x = row[0] * x_T
    for d, D_k in zip(row[1:], D):
        x = x + d * D_k
    return x


def _run(x0_at: Callable[[Tensor, int], Tensor], x: Tensor, rows: Sequence[Sequence[Any]],
         callback: Callable | None = None, times: Sequence[float] = ()) -> Tensor:
    """The solver loop: D_j = x0_at(x_j, j), x_{j+1} = c_{j+1} x_T + sum_k d_{j+1,k} D_k."""
    x_T, D = x, []
    for i, row in enumerate(rows):
        D.append(x0_at(x, i))
        x = _combine(row, x_T, D)
        if callback is not None:
            callback({"i": i, "t": times[i], "x": x, "x0": D[-1]})
    return x


@register("bespoke", nfe=lambda steps: steps, nfe_rule="steps", spacing="log_snr", order=3)
@torch.no_grad()
def sample_bespoke(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                   generator: Any = None, callback: Callable | None = None,
                   coeffs: Sequence[Sequence[float]] | None = None,
                   base: str = "unipc") -> Tensor:
    """Bespoke linear solver (Shaul et al. 2024): x_j = c_j x_T + sum_k d_jk D_k with fitted
    ``coeffs`` (:func:`tune_solver`); without them, ``base``'s own coefficients."""
    g = Grid(denoiser.schedule, ts, x)
    if coeffs is None:
        coeffs = solver_coefficients(base, denoiser.schedule, ts)
    _check_coeffs(coeffs, g.n)
    rows = [[float(c) for c in row] for row in coeffs]
    return _run(lambda x_j, j: predict(denoiser, x_j, g, j, cond).x0, x, rows, callback, g.times)


def tune_solver(denoiser: BaseDenoiser, steps: int, noise: Tensor, *, base: str = "unipc",
                grid: Sequence[float] | dict[str, Any] | str | None = None, cond: Any = None,
                reference: Tensor | None = None, reference_steps: int = 200,
                max_iter: int = 100, fit_times: bool = True, batch_size: int | None = None,
                t_start: float = 1.0) -> dict[str, Any]:
    """Fit the coefficients of a ``steps``-step bespoke solver to ``denoiser`` on the
    calibration ``noise`` (standard normal; every draw is a sample of the objective, so use
    hundreds where the model is cheap).

    ``grid``: the grid (a list, or :func:`~difflab.samplers.tuning.tune_grid`'s dict with its
    evaluation times, or a spacing name of :func:`~difflab.samplers.timesteps`); by default
    ``tune_grid(denoiser, base, steps, noise)`` first. A spacing is the far cheaper start (no
    Nelder-Mead runs through the model); the tuned grid's fit ends 2-3.4x lower on the 2-D
    benchmark mixture and is mixed on the 64-D one (docs/results/samplers_fit.md against the
    bespoke row of samplers.md). The fit
    starts from ``base``'s coefficients on that grid and runs L-BFGS (strong Wolfe line search)
    for ``max_iter`` iterations in all: when its line search stalls before that, L-BFGS starts
    again from where it stopped with a fresh curvature memory, as long as the last run lowered
    the calibration MSE by :data:`RESTART_GAIN` (where draws switch mixture components the
    loss is steep and curved, and the memory of the flat part misleads: on the 64-D benchmark
    mixture at 10 steps the first run stalls after ~50 iterations at calibration RMSE 0.064,
    restarts reach 0.010 by 276). With ``fit_times`` the times the network is told
    (the grid's evaluation times t'_j, :class:`~difflab.samplers.common.EvalTimes`) are fitted
    with the coefficients, by the gradient through the network's time input. ``batch_size``
    splits the calibration batch for memory (gradients are accumulated). Returns the dict
    ``difflab.sample(..., "bespoke", grid=result)`` takes: ``ts``, ``eval_ts``, ``coeffs``, and
    how they were made (``rmse`` on the calibration batch, ``rmse_base`` of the base solver on
    the same grid and evaluation times, ...).
    """
    from difflab.samplers import get, timesteps
    from difflab.samplers.tuning import calibration_reference, tune_grid

    if base not in BASES:
        raise ValueError(f"unknown base solver {base!r}; valid: {list(BASES)}")
    schedule = denoiser.schedule
    reference = calibration_reference(denoiser, steps, noise, reference, reference_steps, cond,
                                      t_start)
    tuned: dict[str, Any] = {}
    if isinstance(grid, str):
        grid = timesteps(schedule, steps, grid, t_start=t_start).tolist()
    elif grid is None:
        tuned = tune_grid(denoiser, base, steps, noise, cond=cond, reference=reference,
                          t_start=t_start)
        grid = tuned
    if isinstance(grid, dict):
        ts_list, eval_ts = list(grid["ts"]), list(grid.get("eval_ts") or grid["ts"])
    else:
        ts_list = [float(t) for t in grid]
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
    init = solver_coefficients(base, schedule, ts)
    sizes = [len(row) for row in init]
    theta0 = torch.tensor([c for row in init for c in row], dtype=torch.float64)
    theta = theta0.clone().requires_grad_(True)
    shift = torch.zeros(steps, dtype=torch.float64, requires_grad=fit_times)
    ref = reference.to(x_T.dtype)
    chunk = batch_size or x_T.shape[0]
    frozen = [p for p in denoiser.parameters() if p.requires_grad]

    # t' stays in [half the smallest told time, t_start]: sigma > 0 there, and eps -> x0 exists
    t_lo = 0.5 * float(tau0[movable].min()) if bool(movable.any()) else 0.0

    def times(dt: Tensor) -> Tensor:
        return torch.where(movable, (tau0 + dt).clamp(t_lo, t_start), tau0)

    def run(th: Tensor, tau: Tensor, x: Tensor, c: Any) -> Tensor:
        def x0_at(x_j: Tensor, j: int) -> Tensor:  # the network told tau_j (differentiable)
            if bool(movable[j]):
                return told.predict_told(x_j, g.points[j], tau[j], c).x0
            return predict(denoiser, x_j, g, j, c).x0

        return _run(x0_at, x, th.split(sizes))

    def loss_of(th: Tensor, dt: Tensor, backward: bool) -> float:
        total = 0.0
        for i in range(0, x_T.shape[0], chunk):
            c = None if cond is None else cond[i:i + chunk]
            x = run(th, times(dt), x_T[i:i + chunk], c)
            err = (x - ref[i:i + chunk]).to(torch.float64).pow(2).sum() / ref.numel()
            if backward:
                err.backward()
            total += float(err.detach())
        return total

    for p in frozen:  # the network's weights take no gradient
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            mse_base = loss_of(theta0, torch.zeros(steps, dtype=torch.float64), False)
        params = [theta, shift] if fit_times else [theta]
        n_iter, mse, best = 0, mse_base, (theta0, torch.zeros(steps, dtype=torch.float64))
        while n_iter < max_iter:  # L-BFGS, restarted while a fresh start still makes progress
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter - n_iter,
                                    history_size=50, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-15)

            def closure(opt: torch.optim.LBFGS = opt) -> Tensor:
                opt.zero_grad()
                return torch.tensor(loss_of(theta, shift, True))

            with torch.enable_grad():
                opt.step(closure)
            n_iter += max(1, int(opt.state[theta].get("n_iter", 0)))
            with torch.no_grad():
                now = loss_of(theta.detach(), shift.detach(), False)
            gained = now < mse * (1 - RESTART_GAIN)
            if now < mse:
                mse, best = now, (theta.detach().clone(), shift.detach().clone())
            if not gained:  # stalled (or not finite): a restart would not help
                break
    finally:
        for p in frozen:
            p.requires_grad_(True)
    fitted, tau = best[0], times(best[1])  # the base solver itself if nothing was better
    coeffs = [row.tolist() for row in fitted.split(sizes)]
    return dict(ts=ts_list, eval_ts=tau.tolist() + ts_list[steps:], coeffs=coeffs,
                sampler="bespoke", base=base, steps=steps, nfe=get("bespoke").nfe(steps),
                rmse=math.sqrt(mse), rmse_base=math.sqrt(mse_base),
                rmse_default=tuned.get("rmse_default"), fit_times=fit_times,
                iterations=n_iter,
                calibration=int(noise.shape[0]))


RESTART_GAIN = 1e-3  # L-BFGS restarts while the last run lowered the MSE by this fraction
# The grids spacing="auto" fits from. The log-SNR grid was one too and never won: not in the six
# mixture cells of bench/samplers_fit.py (NFE 5/10/20, calibration RMSE 1.4-7x adaptive's), nor
# on the 10-minute demo U-Net (10 steps: adaptive 0.025, uniform 0.036, log-SNR 0.068).
START_GRIDS = ("adaptive", "uniform")


def fit_solver(denoiser: BaseDenoiser, steps: int, noise: Tensor,
               reference: Tensor | None = None, *, spacing: str = "auto",
               profile: dict[str, Any] | None = None, reference_steps: int = 100,
               max_iter: int = 60, batch_size: int | None = None,
               cond: Any = None) -> dict[str, Any]:
    """:func:`tune_solver` from unipc on the ``spacing`` grid: ``"adaptive"``
    (:func:`~difflab.samplers.tuning.adaptive_grid` on the calibration trajectories'
    ``profile``), or a spacing name of :func:`~difflab.samplers.timesteps`; ``"auto"``: from
    each of :data:`START_GRIDS`, keeping the fit with the lowest calibration RMSE.
    ``reference`` and ``profile`` come from one
    :func:`~difflab.samplers.tuning.reference_profile` solve (``reference_steps``), made here
    where missing. The fit is local (L-BFGS from the base solver, with the grid's noise levels
    fixed), so its start matters: the adaptive start wins on the benchmark mixtures and the
    10-minute demo U-Net, but on a 1-minute demo U-Net at 10 steps the fit from uniform-t ended
    1.8x lower (calibration RMSE 0.021 against 0.037)."""
    from difflab.samplers.tuning import adaptive_grid, reference_profile

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
        fits.append(dict(fit, spacing=start))
    best = min(fits, key=lambda f: f["rmse"])
    best["starts"] = {f["spacing"]: f["rmse"] for f in fits}
    return best


def fit_solvers(denoiser: BaseDenoiser, steps: Sequence[int], noise: Tensor, *,
                spacing: str = "auto", reference_steps: int = 100, max_iter: int = 60,
                batch_size: int | None = None, cond: Any = None,
                log: Callable[[str], None] | None = None) -> dict[int, dict[str, Any]]:
    """Fit a bespoke solver for each step count in ``steps`` on one calibration batch (one
    reference solve serves them all, and gives the adaptive grids' profile) with
    :func:`fit_solver` (``spacing="auto"``: from each of :data:`START_GRIDS`, the best fit
    kept), and attach them to ``denoiser.solvers``: ``difflab.sample(denoiser, noise,
    steps=k)`` then uses the fitted k-step solver by default. Returns the fits. They belong to
    these weights: fit again after the network changes."""
    from difflab.samplers.tuning import reference_profile

    ref, profile = reference_profile(denoiser, noise, reference_steps, cond=cond,
                                     batch_size=batch_size)
    fits = {}
    for k in [int(k) for k in steps]:
        fits[k] = fit_solver(denoiser, k, noise, ref, spacing=spacing, profile=profile,
                             max_iter=max_iter, batch_size=batch_size, cond=cond)
        fits[k]["reference_steps"] = reference_steps
        if log is not None:
            log(describe_fit(fits[k]))
    if not isinstance(denoiser.solvers, dict):  # a transform's read-only default: its own now
        denoiser.solvers = {}
    denoiser.solvers.update(fits)
    return fits


def describe_fit(fit: dict[str, Any]) -> str:
    """One line on a :func:`fit_solver` result: its calibration RMSE, start, base and starts."""
    starts = ", ".join(f"{k} {v:.4g}" for k, v in fit.get("starts", {}).items())
    return (f"bespoke {fit['steps']} steps ({fit['nfe']} NFE): calibration RMSE "
            f"{fit['rmse']:.4g} from the {fit['spacing']} grid (unipc there "
            f"{fit['rmse_base']:.4g}; from each start: {starts}), {fit['iterations']} L-BFGS "
            "iterations")
