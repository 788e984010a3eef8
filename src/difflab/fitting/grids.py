"""Time grids fitted to one model: with few steps, put the network calls where they matter.

At 5-20 network calls the placement of the grid decides a deterministic sampler's error, and
the best fixed rule changes with the model (docs/fitting.md). :func:`tune_grid` fits the grid
of one sampler, step count and denoiser instead: it minimises the RMSE between the sampler's
output and an accurate solution of the probability-flow ODE from the same *calibration* noise
(:mod:`difflab.fitting.reference`), the objective of LD3 (Tong et al. 2024, "Learning to
Discretize Denoising Diffusion ODEs", Eq. 6, without its slack term), optimised
derivative-free (Nelder & Mead 1965) because the solvers compute their coefficients as Python
floats.

Parametrisation (``steps + 1`` points, as every grid): the prior t_start, then ``steps - 1``
interior points and the last point before t = 0 at

    log sigma~_i = log sigma~_max - (w_1 + ... + w_i) (log sigma~_max - log sigma~_end),
    w = softmax(theta_1 .. theta_{steps-1}),   log sigma~_end = log sigma_min + 3 tanh(theta_0),

so every theta is a valid, strictly decreasing grid; theta = 0 is the uniform log-SNR grid
(the default ``log_snr`` spacing) and the search starts there.

**Decoupled evaluation times** (LD3, Sec. 3.2; ``eval_times=True``, a second search once the
grid is fixed): at each of the ``steps`` grid points where the network is called it is told
the time t'_i of

    log sigma~'_i = log sigma~_i + EVAL_SHIFT tanh(phi_i),      phi = 0: t'_i = t_i,

and its own output (eps / x0 / v) is used at t_i (:class:`~difflab.samplers.common.EvalTimes`).
This gives the fit a second handle on the discretisation error and on a network's systematic
error at each noise level (measured: docs/fitting.md).

:func:`adaptive_grid` needs no search: it equidistributes the local error of a first-order step
along the calibration trajectories (:func:`~difflab.fitting.reference.reference_profile`).

Cost of :func:`tune_grid`: one reference solve of the calibration batch (``reference_steps``
steps of dpm_solver_3, 3 NFE each) plus ``max_evals`` sampler runs of ``steps`` steps (and
those of the evaluation times); the tuned grid is then free at sampling time. Validate on noise
other than the calibration noise. The next step fits the solver's coefficients on the tuned
grid as well: :mod:`difflab.fitting.bespoke`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.fitting.fit import Fit
from difflab.fitting.reference import calibration_reference
from difflab.samplers import SolverPlan, get, sample, timesteps
from difflab.samplers.timesteps import _finite_sigma_max, _from_sigmas

__all__ = ["tune_grid", "grid_from_theta", "eval_times_from_phi", "nelder_mead",
           "adaptive_grid", "END_RANGE", "EVAL_SHIFT"]

END_RANGE = 3.0  # log sigma~_end within log sigma_min +- END_RANGE (a factor of ~20)
EVAL_SHIFT = 1.0  # |log sigma~'_i - log sigma~_i| <= EVAL_SHIFT (a factor of e)


def grid_from_theta(schedule: Any, steps: int, theta: Sequence[float],
                    t_start: float = 1.0) -> Tensor:
    """The float64 grid of the parametrisation in the module docstring."""
    if len(theta) != steps:
        raise ValueError(f"theta has {len(theta)} entries; a {steps}-step grid needs {steps}")
    f64 = torch.float64
    log_max = math.log(_finite_sigma_max(schedule, t_start))
    log_end = math.log(float(schedule.sigma_min)) + END_RANGE * math.tanh(theta[0])
    log_end = min(log_end, log_max - 1e-3)
    if steps == 1:
        log_s = torch.tensor([log_max], dtype=f64)
    else:
        w = torch.softmax(torch.tensor(list(theta[1:]), dtype=f64), 0)
        frac = torch.cat([torch.zeros(1, dtype=f64), torch.cumsum(w, 0)])
        frac[-1] = 1.0
        log_s = log_max - frac * (log_max - log_end)
    ts = _from_sigmas(schedule, log_s.exp(), t_start).to(f64)
    # softmax weights are > 0, but two points can still round to one time: nudge them apart
    for i in range(1, ts.numel() - 1):
        if ts[i] >= ts[i - 1]:
            ts[i] = ts[i - 1] * (1 - 1e-9)
    return ts


def eval_times_from_phi(schedule: Any, ts: Sequence[float], phi: Sequence[float],
                        t_start: float = 1.0) -> list[float]:
    """Evaluation times t'_i (module docstring) for the first ``len(phi)`` points of grid
    ``ts``; the rest, and points with alpha = 0 or sigma = 0, keep their own time."""
    f64 = torch.float64
    ts_t = torch.as_tensor(list(ts), dtype=f64)
    k = len(phi)
    alpha, sigma = schedule.alpha_sigma(ts_t[:k])
    shift = EVAL_SHIFT * torch.tanh(torch.tensor(list(phi), dtype=f64))
    ok = (alpha > 0) & (sigma > 0)
    log_s = torch.where(ok, torch.log(sigma / alpha.clamp(min=1e-300)) + shift, 0.0)
    te = schedule.t_from_sigma_ratio(log_s.exp()).clamp(0.0, t_start)
    te = torch.where(ok, te, ts_t[:k])
    return te.tolist() + ts_t[k:].tolist()


def nelder_mead(f: Callable[[list[float]], float], x0: Sequence[float], *, step: float = 0.3,
                max_evals: int = 400, rtol: float = 1e-4) -> tuple[list[float], float, int]:
    """Minimise f from x0 by the Nelder-Mead simplex method (reflection 1, expansion 2,
    contraction 1/2, shrink 1/2; Gao & Han 2012 give the same for small n). Returns
    (x_best, f_best, evaluations)."""
    n = len(x0)
    pts = [list(map(float, x0))] + [[x0[j] + (step if j == i else 0.0) for j in range(n)]
                                    for i in range(n)]
    vals = [f(p) for p in pts]
    evals = n + 1
    while evals < max_evals:
        order = sorted(range(n + 1), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if vals[-1] - vals[0] <= rtol * abs(vals[0]):
            break
        c = [sum(p[j] for p in pts[:-1]) / n for j in range(n)]
        worst = pts[-1]

        def along(a: float, c: list[float] = c, worst: list[float] = worst) -> list[float]:
            """c + a (worst - c): a = -1 reflects, -2 expands, +-1/2 contracts."""
            return [c[j] + a * (worst[j] - c[j]) for j in range(n)]

        xr = along(-1.0)
        fr = f(xr)
        evals += 1
        if fr < vals[0]:
            xe = along(-2.0)
            fe = f(xe)
            evals += 1
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = along(0.5 if fr >= vals[-1] else -0.5)  # inside / outside contraction
            fc = f(xc)
            evals += 1
            if fc < min(fr, vals[-1]):
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                for i in range(1, n + 1):
                    pts[i] = [pts[0][j] + 0.5 * (pts[i][j] - pts[0][j]) for j in range(n)]
                    vals[i] = f(pts[i])
                    evals += 1
    best = min(range(n + 1), key=vals.__getitem__)
    return pts[best], vals[best], evals


def adaptive_grid(schedule: Any, steps: int, profile: dict[str, Sequence[float]],
                  t_start: float = 1.0) -> list[float]:
    """The ``steps``-step grid that gives every step the same local error along the calibration
    trajectories (:func:`~difflab.fitting.reference.reference_profile`'s rate r(lambda) of
    the data prediction D).

    A first-order step of the data-prediction ODE (DDIM = DPM-Solver++(1), Lu et al. 2022b,
    Eq. 9) from lambda_s over h = lambda_t - lambda_s replaces D by D(lambda_s) inside
    alpha_t int_{lambda_s}^{lambda_t} e^{lambda - lambda_t} D(lambda) dlambda, and so errs by
    ~ alpha_t h^2 / 2 dD/dlambda. Equal local error h(lambda)^2 r(lambda) = const is the step
    density sqrt(r(lambda)) (the equidistribution principle of adaptive meshes, de Boor 1973):
    point k of the grid sits where int sqrt(r) dlambda from lambda(t_start) reaches k / steps of
    its total, k = 0 .. steps - 1, and the last step goes to t = 0 (the data prediction at
    the last point, the share of the integral beyond it). Where D moves fastest, e.g. where
    draws decide between mixture components, the grid is densest. Measured against fixed
    spacings: docs/fitting.md.
    """
    lam = torch.tensor(list(profile["log_snr"]), dtype=torch.float64)
    density = torch.tensor(list(profile["rate"]), dtype=torch.float64).clamp(min=0).sqrt()
    if lam.numel() < 2 or lam.numel() != density.numel():
        raise ValueError("profile needs >= 2 log-SNR points with one rate each "
                         "(reference_profile makes it)")
    mass = torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.cumsum(0.5 * (density[1:] + density[:-1]) * lam.diff(), 0)])
    if not (math.isfinite(float(mass[-1])) and float(mass[-1]) > 0):
        raise ValueError("the profile's rate is zero or not finite: the data prediction does "
                         "not move along the calibration trajectories; use a fixed spacing")
    q = torch.arange(1, steps, dtype=torch.float64) / steps * mass[-1]
    j = torch.searchsorted(mass, q).clamp(1, lam.numel() - 1)
    w = (q - mass[j - 1]) / (mass[j] - mass[j - 1]).clamp(min=1e-300)
    ts = schedule.t_from_log_snr(lam[j - 1] + w * (lam[j] - lam[j - 1])).to(torch.float64)
    grid = [float(t_start)] + ts.clamp(max=t_start).tolist() + [0.0]
    for i in range(1, steps):  # two points in one flat stretch of the profile: keep them apart
        grid[i] = min(grid[i], grid[i - 1] * (1 - 1e-9))
    return grid


@torch.no_grad()
def tune_grid(denoiser: BaseDenoiser, sampler: str, steps: int, noise: Tensor, *,
              cond: Any = None, reference: Tensor | None = None, reference_steps: int = 200,
              max_evals: int | None = None, t_start: float = 1.0, eval_times: bool = True,
              grid: Sequence[float] | Tensor | None = None, **opts: Any) -> Fit:
    """Fit the ``steps``-step grid of deterministic ``sampler`` to ``denoiser`` on the
    calibration ``noise`` (standard normal, e.g. 64-256 draws of the sample shape).

    ``reference``: the accurate ODE solution from ``noise`` if already known; otherwise it is
    computed with dpm_solver_3 on a ``reference_steps``-step log-SNR grid. ``max_evals``
    (default 40 * steps, at least 200) bounds the sampler runs of the grid search;
    ``eval_times`` adds the search for decoupled evaluation times (module docstring;
    max(100, 20 * steps) more runs, or max_evals // 2 when ``max_evals`` is given), kept only
    where it lowers the calibration error.
    ``grid``: keep this grid (e.g. one tuned before, on more data) and fit only the evaluation
    times. ``cond`` (None, labels or a Condition, one row per draw) is passed on unchanged.
    Returns a :class:`~difflab.fitting.Fit`: ``ts`` (the grid), ``eval_ts`` (the times the
    network is told, equal to ``ts`` without ``eval_times``), and how they were made (``rmse``
    on the calibration batch, ``rmse_grid`` (grid alone), ``rmse_default`` (default grid),
    ``evals``, ...). Run it with ``difflab.sample(..., fit=result)``.
    """
    spec = get(sampler)
    if spec.stochastic:
        raise ValueError(f"sampler {sampler!r} is stochastic: a tuned grid needs a "
                         "deterministic sampler (its output is compared with the ODE solution)")
    schedule = denoiser.schedule
    ref = calibration_reference(denoiser, steps, noise, reference, reference_steps, cond,
                                t_start).to(torch.float64)

    def rmse(ts: Tensor | list[float], eval_ts: list[float] | None = None) -> float:
        if eval_ts is None:
            x = sample(denoiser, noise, sampler, steps, grid=ts, cond=cond, **opts)
        else:
            x = sample(denoiser, noise, fit=SolverPlan(sampler, ts, eval_ts), cond=cond, **opts)
        err = float((x.to(torch.float64) - ref).pow(2).mean().sqrt())
        return err if math.isfinite(err) else math.inf

    def objective(theta: list[float]) -> float:
        return rmse(grid_from_theta(schedule, steps, theta, t_start))

    theta0 = [0.0] * steps
    default = rmse(timesteps(schedule, steps, spec.spacing, t_start=t_start))
    if grid is not None:
        ts = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if ts.numel() != steps + 1:
            raise ValueError(f"grid has {ts.numel()} times; {steps} steps need {steps + 1}")
        best, evals = rmse(ts), 1
    else:
        budget = max_evals if max_evals is not None else max(200, 40 * steps)
        theta, best, evals = nelder_mead(objective, theta0, max_evals=budget)
        ts = grid_from_theta(schedule, steps, theta, t_start)
        if default < best:  # the default spacing is outside the family and was better
            ts, best = timesteps(schedule, steps, spec.spacing, t_start=t_start), default
    ts_list = ts.tolist()
    eval_ts, best_grid = list(ts_list), best
    if eval_times:
        def objective_eval(phi: list[float]) -> float:
            return rmse(ts_list, eval_times_from_phi(schedule, ts_list, phi, t_start))

        budget_eval = max(100, 20 * steps) if max_evals is None else max(1, max_evals // 2)
        phi, best_eval, evals_eval = nelder_mead(objective_eval, [0.0] * steps, step=0.2,
                                                 max_evals=budget_eval)
        evals += evals_eval
        if best_eval < best:
            eval_ts, best = eval_times_from_phi(schedule, ts_list, phi, t_start), best_eval
    return Fit(sampler, ts_list, eval_ts, rmse=best, rmse_grid=best_grid, rmse_default=default,
               default_spacing=spec.spacing, evals=evals, calibration=int(noise.shape[0]))
