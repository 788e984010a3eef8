"""A fast bespoke fit: one reference solve for every step count, teacher forcing, ridge.

:func:`~difflab.fitting.bespoke.fit_solvers` fits the coefficients of the bespoke sampler
(:mod:`difflab.samplers.bespoke`),

    x_j = c_j x_T + sum_{k < j} d_{jk} D_k,    D_k = x0_hat(x_k, t_k),    j = 1 .. n,

by L-BFGS through the whole sampler (a backward pass through every network call, from two
start grids, per step count). :func:`fast_fit_solvers` fits the same form far more cheaply:

1. **One reference solve for all step counts.** The n-step grids come from one *nested*
   family (default ``uniform`` in t: the 5-, 10- and 20-step grids are subsets of the 240-step
   grid). The probability-flow ODE is solved once on the fine grid (``reference_steps``) by a
   3rd-order solver (default dpmpp_3m) from the calibration noise, keeping the state x_ref(t)
   at every fine point an n-step grid uses, and the output x_ref(0).
2. **Teacher forcing.** For each step count and grid t_0 > .. > t_n, the data predictions
   D_k = x0_hat(x_ref(t_k), t_k) along the *reference* trajectory. dpmpp_3m (and dpmpp_2m)
   evaluate the network at exactly their own states, so these are read off the reference
   solve and cost no call; with another reference solver they are evaluated, once per grid
   point per draw (no gradients).
3. **Ridge least squares, row by row.** Row j is fitted in closed form,

       min ||x_ref(t_j) - c_j x_T - sum_k d_jk D_k||^2 / N + lam s_j ||coef - coef_base||^2,

   over all draws and dimensions (N numbers), toward the base solver's coefficients
   (:func:`~difflab.samplers.bespoke.solver_coefficients`, unipc), with ``s_j`` the mean
   diagonal of row j's Gram matrix (so ``ridge`` is scale-free). A (j+1)-unknown solve per
   row: milliseconds. Each draw gives N / draws equations per row, so few draws suffice for
   the few unknowns (their errors are not what is fitted: each row sees its own target).

What it costs in accuracy: teacher forcing minimises each row's error *given the exact
history*, not the error of the solver's own rollout (where the D_k are made at its own, wrong
states), and the evaluation times are not fitted. The full fit's objective is the rollout's.
``validate`` rolls out the fitted and the base solver on the calibration draws (2 n calls per
draw): ``rmse`` and ``rmse_base`` of the result are those rollout errors, as for the full fit,
and where the fit's rollout is not better than the base's, the base coefficients are returned
(as the full fit does). ``polish`` > 0 then runs that many L-BFGS iterations of the full
objective (:func:`~difflab.fitting.bespoke.tune_solver`) from the ridge fit.

**The rollout objective** (``objective="rollout"``, what ``difflab tune-grid --fast`` runs)
removes that mismatch at no extra cost. It fits on the grids of given plans (the default
call's probe plans), from their own solvers' coefficients, and the rows one after another on
the solver's *own* rollout: D_0 = x0_hat(x_T); row 1 is fitted, x_1 = c_1 x_T + d_10 D_0 made
with it; D_1 = x0_hat(x_1); row 2 is fitted on (x_T, D_0, D_1); and so on. Each row then sees
at calibration exactly the features it will see at sampling time, so what is fitted is what
runs (a fit of all rows on one base rollout, then rolled out, diverged on the eps / DDPM
model: its later D_k are made at states the fit moved). One pass: n network calls per draw,
and the calibration RMSE of the fit is its output's distance to the reference, with no
further rollout. The reference is solved on the probe's fine grid (:func:`~difflab.samplers.
probe.fine_grid`, at least ``reference_steps`` steps) merged with the plans' grids, so every
plan's grid is nested in it whatever its spacing.

**The probe's solve as the reference** (session 18; ``difflab tune-grid --fast`` by
default). The default call's probe has already solved the ODE finely from its own 24 draws
(:func:`~difflab.samplers.probe.probe_solve`) to make the plans; calibrating on those draws,
:func:`probe_reference` reads the reference off that solve (a plan's time between two fine
points by one 2M step from the fine state before it), so the fit makes no second solve: on a
28x28 U-Net the fit's network calls per draw go from ~272 + 8 sum(n) to ~8 sum(n), and the
whole `tune-grid --fast` (probe included) from ~29,500 to ~18,200 image evaluations. It costs
no accuracy: the probe's 180-step UniPC solve and the 240-step dpmpp_3m reference are equally
far from a 960-step solve on the five models of docs/results/byom_defaults.md (1e-5 to
3.7e-3 RMSE; both under-resolve the ~2 pi / 1000 period in t of a network told 1000 t through
sinusoidal embeddings, which 480 steps resolve).

**Evaluation times, chosen with the rows, and a held-out choice** (session 15). With
``eval_shifts``, row j is fitted for each candidate time the network is told at t_{j-1},
t' = t_{j-1} + f (t_j - t_{j-1}) (f in :data:`EVAL_SHIFTS`; the decoupled times of LD3, Tong
et al. 2024), and the time whose row leaves the least residual is kept with it. That is more
freedom than 16-24 draws pin down, so each variant (grid times only; chosen times) is scored
on draws it was not fitted on (fitted on one half, rolled out on the other, both ways), the
better kept and fitted again on all draws, and the plan kept where neither beats it there.

**A polish** (``polish`` > 0; ``difflab tune-grid --fast --polish N``, session 22): N L-BFGS
iterations of the full objective (:func:`~difflab.fitting.bespoke.tune_solver`: the error at
x(0) of the rollout, through every network call, coefficients and told times together) from
the rollout fit. The rows fitted one by one each match the reference at their own time; the
full objective lets the intermediate states leave the reference trajectory where that serves
x(0). It is scored on the variants' two folds first (the better variant fitted and polished on
one half, rolled out on the other) and, where it beats the unpolished fit and the plan there,
the fit on all draws is polished. Cost: a backward pass through the n calls per iteration, twice
over (the halves, then all draws): ~1.4 / 3 / 6.5 s per iteration at 5 / 10 / 20 steps for a
28x28 U-Net on one CPU thread and 24 draws; ``tune-grid --fast --polish 12`` took 6-9 minutes
on one thread where the fit alone takes ~1.5. Out of sample (32 test draws; ratios to
diffusers' best, docs/results/byom_defaults.md, session 22) it takes the EDM model's fits from
0.50 / 0.54 / 0.60x to 0.46 / 0.48 / 0.49x and the zero-SNR model's 10-step fit from 0.47 to
0.38x, but the rectified-flow model's 10-step fit from 0.50 to 0.74x: better on 19 of the 32
test draws, far worse on two, which 12 held-out draws per fold did not contain. Not the
default for that reason.

Network calls per draw: the reference solve (``reference_steps`` with dpmpp_3m), plus sum(n)
where the reference solver is not one that evaluates at its states, plus 2 sum(n) with
``validate``, plus the polish; with the rollout objective the reference solve (none with
:func:`probe_reference`), the plan's rollout, and for each variant its fitting passes and
held-out rollouts (about 6 sum(n)), and the chosen variant's fit on all draws. Two calls
are not made again (session 19): every rollout's first call, at x_T, is the reference solve's
first (when it kept its predictions: the probe's solve, dpmpp_3m / 2m), and on the probe's
draws the plan's error on each draw is the probe's (``plan_mse``), so the plan is rolled out
only on the draws the probe did not score it on. On fm_base: 18,204 -> 17,304 image
evaluations for ``tune-grid --fast``, the fits unchanged to the bit (on the eps / linear model
to 1e-5 relative: a call on all draws and on a half round differently).
Measurements: docs/results/fit_fast.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.fitting.fit import Fit
from difflab.fitting.reference import check_steps
from difflab.samplers import SolverPlan, get, sample, timesteps
from difflab.samplers.bespoke import BASES, combine, solver_coefficients
from difflab.samplers.common import EvalTimes, Grid, SharedStart, predict
from difflab.samplers.probe import PROBE_DRAWS, reference_final

__all__ = ["fast_fit_solvers", "FineReference", "fine_reference", "nested_indices",
           "rollout_coefficients", "rollout_fittable", "plan_rows", "plans_reference",
           "probe_reference",
           "teacher_forced_predictions", "ridge_coefficients", "describe_fast_fit",
           "REUSING_SOLVERS", "FAST_RIDGE", "EVAL_SHIFTS", "FAST_CALIBRATION"]

# Reference solvers whose callback's x0 is the network's prediction at the very state the
# callback reported one step before (no corrector): the teacher-forced D_k are read off them.
REUSING_SOLVERS = ("dpmpp_3m", "dpmpp_2m")
FAST_RIDGE = 1e-3  # the default ridge weight (relative to each row's Gram diagonal)
# The rollout objective's evaluation-time candidates, as fractions of the step toward the next
# grid time (docs/results/fit_fast.md, session 15: wider sets overfit 16 calibration draws).
EVAL_SHIFTS = (-0.15, 0.0, 0.15)
# calibration draws of `difflab tune-grid --fast` (two folds of 12): by default the probe's own
FAST_CALIBRATION = PROBE_DRAWS


@dataclass
class FineReference:
    """One solve of the probability-flow ODE on a fine grid from the calibration noise.

    ``ts``: the fine grid (``reference_steps + 1`` times); ``x``: the state at each kept fine
    index (index 0 is x_T = noise * prior_std, the last index the output x_ref(0)); ``x0``:
    the network's prediction at those states where the solve made it (else empty);
    ``solver``; ``calls``: network calls (batches) the solve made."""

    ts: list[float]
    x: dict[int, Tensor]
    x0: dict[int, Tensor]
    solver: str
    calls: int = 0

    @property
    def steps(self) -> int:
        return len(self.ts) - 1


def nested_indices(fine_ts: Sequence[float], grid: Sequence[float],
                   tol: float = 1e-9) -> list[int]:
    """The index in ``fine_ts`` of each time of ``grid``; a ValueError where one is missing
    (the grid is not a subset of the fine grid)."""
    fine = torch.as_tensor(list(fine_ts), dtype=torch.float64)
    out = []
    for t in grid:
        d = (fine - float(t)).abs()
        i = int(d.argmin())
        if float(d[i]) > tol:
            raise ValueError(f"grid time {float(t):.6g} is not a point of the "
                             f"{len(fine) - 1}-step reference grid; choose reference_steps so "
                             "that every step count's grid is nested in it (uniform: a common "
                             "multiple of the step counts)")
        out.append(i)
    return out


@torch.no_grad()
def fine_reference(denoiser: BaseDenoiser, noise: Tensor, reference_steps: int = 240, *,
                   family: str = "uniform", keep: Sequence[int] | None = None,
                   solver: str = "dpmpp_3m", cond: Any = None, batch_size: int | None = None,
                   t_start: float = 1.0, grid: Sequence[float] | None = None) -> FineReference:
    """Solve the ODE from ``noise`` with ``solver`` on the ``reference_steps``-step ``family``
    grid (or the explicit fine ``grid``), keeping the states (and, for
    :data:`REUSING_SOLVERS`, the predictions at them) at the fine indices ``keep`` (default
    all); the output is always kept."""
    ts = (timesteps(denoiser.schedule, reference_steps, family, t_start=t_start)
          if grid is None else torch.as_tensor(list(grid), dtype=torch.float64))
    n = len(ts) - 1
    want = set(range(n + 1) if keep is None else keep) | {0, n}
    xs: dict[int, list[Tensor]] = {i: [] for i in want}
    x0s: dict[int, list[Tensor]] = {i: [] for i in want if i < n}
    reuse = solver in REUSING_SOLVERS
    chunk = batch_size or noise.shape[0]
    final = reference_final(denoiser.schedule, ts, solver)  # x0_hat at 1 / T (discrete)
    for i in range(0, noise.shape[0], chunk):
        x_T = noise[i:i + chunk] * denoiser.schedule.prior_std(float(ts[0]))
        xs[0].append(x_T)

        def record(step: dict[str, Any]) -> None:
            k = step["i"]
            if k + 1 in xs and k + 1 < n:
                xs[k + 1].append(step["x"].clone())
            if reuse and k in x0s:
                x0s[k].append(step["x0"].clone())

        out = sample(denoiser, noise[i:i + chunk], solver, grid=ts,
                     cond=None if cond is None else cond[i:i + chunk], callback=record,
                     **final)
        xs[n].append(out)
    return FineReference(ts.tolist(), {k: torch.cat(v) for k, v in xs.items()},
                         {k: torch.cat(v) for k, v in x0s.items() if v}, solver,
                         get(solver).nfe(n) * math.ceil(noise.shape[0] / chunk))


@torch.no_grad()
def teacher_forced_predictions(denoiser: BaseDenoiser, ref: FineReference, idx: Sequence[int],
                               cond: Any = None, batch_size: int | None = None) -> list[Tensor]:
    """D_k = x0_hat(x_ref(t_k), t_k) at the grid points ``idx[:-1]`` (fine indices): read off
    the reference solve where it made them, else one network call per point and draw."""
    grid_ts = torch.tensor([ref.ts[i] for i in idx], dtype=torch.float64)
    D = []
    for j, i in enumerate(idx[:-1]):
        if i in ref.x0:
            D.append(ref.x0[i])
            continue
        x = ref.x[i]
        chunk = batch_size or x.shape[0]
        parts = []
        for a in range(0, x.shape[0], chunk):
            g = Grid(denoiser.schedule, grid_ts, x[a:a + chunk])
            parts.append(predict(denoiser, x[a:a + chunk], g, j,
                                 None if cond is None else cond[a:a + chunk]).x0)
        D.append(torch.cat(parts))
    return D


def _ridge_row(g: Tensor, r: Tensor, base_row: Sequence[float], ridge: float) -> Tensor:
    """argmin_c c^T g c - 2 c^T r + ridge s ||c - base_row||^2 with s = mean(diag g) (float64):
    one row's ridge least squares from its Gram matrix g = F F^T / N and r = F y / N."""
    b = torch.tensor(list(base_row), dtype=torch.float64)
    if b.numel() != g.shape[0]:
        raise ValueError(f"base row {g.shape[0] - 1} has {b.numel()} numbers, needs "
                         f"{g.shape[0]}")
    lam = ridge * (float(g.diagonal().mean()) or 1.0)
    return torch.linalg.solve(g + lam * torch.eye(len(b), dtype=torch.float64), r + lam * b)


def _fit_row(F: Tensor, y: Tensor, base_row: Sequence[float], ridge: float) -> Tensor:
    """One row's ridge least squares (:func:`_ridge_row`) from its features ``F`` (one per
    row of F: x_T, D_0, ..) and its target ``y``, both flat float64 over all draws."""
    return _ridge_row(F @ F.T / y.numel(), F @ y / y.numel(), base_row, ridge)


def ridge_coefficients(x_T: Tensor, D: Sequence[Tensor], targets: Sequence[Tensor],
                       base: Sequence[Sequence[float]], ridge: float = FAST_RIDGE
                       ) -> tuple[list[list[float]], list[float], list[float]]:
    """The rows (c_j, d_j0 .. d_j,j-1), j = 1 .. n, minimising ||targets[j-1] - c_j x_T -
    sum_k d_jk D_k||^2 / N + ridge s_j ||row - base[j-1]||^2 (module docstring), in float64.
    Returns ``(rows, mse, mse_base)``: the fitted rows and, per row, the teacher-forced mean
    squared error of the fitted and of the base row."""
    n = len(targets)
    if len(D) != n or len(base) != n:
        raise ValueError(f"{n} targets need {n} predictions and {n} base rows")
    F = torch.stack([x_T.reshape(-1)] + [d.reshape(-1) for d in D]).to(torch.float64)
    Y = torch.stack([y.reshape(-1) for y in targets]).to(torch.float64)
    N = F.shape[1]
    G, R, yy = F @ F.T / N, F @ Y.T / N, (Y * Y).sum(1) / N
    rows, mse, mse_base = [], [], []
    for j in range(1, n + 1):
        g, r = G[:j + 1, :j + 1], R[:j + 1, j - 1]
        b = torch.tensor(base[j - 1], dtype=torch.float64)
        c = _ridge_row(g, r, base[j - 1], ridge)
        rows.append(c.tolist())
        for v, acc in ((c, mse), (b, mse_base)):  # ||y - A v||^2 / N from the Gram matrix
            acc.append(max(float(yy[j - 1] - 2 * v @ r + v @ g @ v), 0.0))
    return rows, mse, mse_base


@torch.no_grad()
def rollout_coefficients(denoiser: BaseDenoiser, ts: Sequence[float], noise: Tensor,
                         targets: Sequence[Tensor], base: Sequence[Sequence[float]],
                         ridge: float = FAST_RIDGE, cond: Any = None,
                         batch_size: int | None = None, shifts: Sequence[float] = (0.0,),
                         judge: Callable[..., float] | None = None,
                         ) -> tuple[list[list[float]], list[float], Tensor]:
    """The rows fitted one after another on the solver's own rollout from ``noise`` (module
    docstring): row j minimises ||targets[j-1] - c_j x_T - sum_k d_jk D_k||^2 / N + ridge s_j
    ||row - base[j-1]||^2 with the D_k made at the states the fitted rows 1 .. j-1 reached.

    ``shifts``: the evaluation time of D_{j-1} is chosen with row j (module docstring): for
    each f, the network is told t' = t_{j-1} + f (t_j - t_{j-1}) (where alpha, sigma > 0 and
    t' <= t_0), row j is fitted on that D_{j-1}, and the f whose row leaves the least residual
    is kept. One network call per grid point, shift and draw. ``judge(j, row, D, x0_at)``, if
    given, scores a candidate instead of its residual (lower is better; ``D`` = D_0 .. D_{j-1}
    with the candidate's, ``x0_at(x, i, tau)`` the network's x0 at grid point i told tau:
    e.g. ``bench/fit_end_aware.py``'s error at x(0) of a greedy completion). Returns ``(rows,
    eval_ts, x_n)``: the rows, the evaluation time of each grid time, and the fitted solver's
    output on the calibration draws."""
    n = len(ts) - 1
    if len(targets) != n or len(base) != n:
        raise ValueError(f"a {n}-step grid needs {n} targets and {n} base rows")
    x_T = noise * denoiser.schedule.prior_std(float(ts[0]))
    chunk = batch_size or x_T.shape[0]
    grids = [Grid(denoiser.schedule, torch.as_tensor(list(ts), dtype=torch.float64),
                  x_T[a:a + chunk]) for a in range(0, x_T.shape[0], chunk)]
    told = EvalTimes(denoiser, {})

    def x0_at(x: Tensor, i: int, tau: float) -> Tensor:
        parts = []
        for a, g in zip(range(0, x.shape[0], chunk), grids):
            c = None if cond is None else cond[a:a + chunk]
            parts.append(predict(denoiser, x[a:a + chunk], g, i, c) if tau == ts[i] else
                         told.predict_told(x[a:a + chunk], g.points[i], tau, c))
        return torch.cat([p.x0 for p in parts])

    g0 = grids[0]
    x, D, rows, eval_ts = x_T, [], [], []
    for j in range(1, n + 1):
        movable = bool(g0.alpha[j - 1] > 0) and bool(g0.sigma[j - 1] > 0)
        taus = {float(ts[j - 1]) + f * (float(ts[j]) - float(ts[j - 1]))
                for f in (shifts if movable else ())} | {float(ts[j - 1])}
        y = targets[j - 1].reshape(-1).to(torch.float64)
        F_prev = torch.stack([x_T.reshape(-1)] + [d.reshape(-1) for d in D]).to(torch.float64)
        best: tuple[float, float, Tensor, Tensor] | None = None
        for tau in sorted(t for t in taus if t <= float(ts[0])):
            D_j = x0_at(x, j - 1, tau)
            F = torch.cat([F_prev, D_j.reshape(1, -1).to(torch.float64)])
            row = _fit_row(F, y, base[j - 1], ridge)
            residual = (float((y - row @ F).pow(2).mean()) if judge is None
                        else judge(j, row.tolist(), D + [D_j], x0_at))
            if best is None or residual < best[0]:
                best = (residual, tau, D_j, row)
        assert best is not None
        _, tau, D_j, row = best
        D.append(D_j)
        eval_ts.append(tau)
        rows.append(row.tolist())
        x = combine(rows[-1], x_T, D)
    return rows, eval_ts + [float(ts[n])], x


def _draw_mse(x: Tensor, ref: Tensor) -> Tensor:
    """The mean squared error of each draw (the first dimension)."""
    return (x - ref).to(torch.float64).pow(2).flatten(1).mean(1)


def _sampled_mse(denoiser: BaseDenoiser, noise: Tensor, ref: Tensor, cond: Any,
                 batch_size: int | None, **kw: Any) -> Tensor:
    """:func:`_draw_mse` of ``sample(denoiser, noise, **kw)`` against ``ref``, in batches."""
    chunk = batch_size or noise.shape[0]
    return torch.cat([_draw_mse(sample(denoiser, noise[i:i + chunk],
                                       cond=None if cond is None else cond[i:i + chunk], **kw),
                                ref[i:i + chunk]) for i in range(0, noise.shape[0], chunk)])


def _rmse(denoiser: BaseDenoiser, noise: Tensor, ref: Tensor, cond: Any,
          batch_size: int | None, **kw: Any) -> float:
    return math.sqrt(float(_sampled_mse(denoiser, noise, ref, cond, batch_size, **kw).mean()))


def fast_fit_solvers(denoiser: BaseDenoiser, steps: Sequence[int], noise: Tensor, *,
                     family: str = "uniform", reference_steps: int = 240,
                     reference_solver: str = "dpmpp_3m", base: str = "unipc",
                     ridge: float = FAST_RIDGE, validate: bool = True, polish: int = 0,
                     reference: FineReference | None = None, cond: Any = None,
                     batch_size: int | None = None, t_start: float = 1.0,
                     plans: Mapping[int, SolverPlan] | None = None,
                     objective: str = "teacher_forcing",
                     eval_shifts: Sequence[float] = EVAL_SHIFTS,
                     plan_mse: Mapping[int, Tensor] | None = None,
                     log: Callable[[str], None] | None = None) -> dict[int, Fit]:
    """Fit a bespoke solver for each step count in ``steps`` on the calibration ``noise`` by
    teacher forcing and ridge least squares from one reference solve (module docstring).

    The n-step grid is ``timesteps(schedule, n, family)``, which must be a subset of the
    ``reference_steps``-step grid of the same family (uniform: ``reference_steps`` a multiple
    of n). ``reference``: a :class:`FineReference` solved already (e.g. exact, in tests).
    ``validate``: roll the fitted and the base solver out on the calibration draws
    (``rmse``, ``rmse_base``; the base coefficients are kept where the fit is not better).
    ``polish``: L-BFGS iterations of the full objective from the ridge fit (0: none).
    ``plans``: competing plans by step count (e.g. the default call's probe plans); with
    ``validate``, each is rolled out on the calibration draws too and its RMSE kept as
    ``extra["rmse_probe"]``, so a caller can prefer it where the fit is not better.
    ``objective``: ``"teacher_forcing"`` (above) or ``"rollout"`` (module docstring): each
    step count's grid and base coefficients are then its plan's (``plans`` must hold every
    step count, each run by a solver of :data:`~difflab.samplers.bespoke.BASES`), the
    reference is solved on the probe's fine grid of ``reference_steps`` points merged with the
    plans' grids, and the rows are fitted on the fitted solver's own rollout; ``family`` and
    ``base`` do not apply, and the polish fits the told times with the coefficients (made
    only where it scores better on held-out halves: module docstring). ``plan_mse``: by step
    count, the plan's squared error on each calibration draw where already measured (NaN
    elsewhere:
    :attr:`~difflab.samplers.probe.ProbeChoice.draw_mse` when calibrating on the probe's draws),
    so the plan is rolled out only where it is missing.
    Returns ``{n: Fit}``: sampler "bespoke", the grid, its own times as evaluation times, the
    coefficients, and how they were made (``calibration``, ``reference_steps``, ``spacing`` =
    ``family``, ``iterations`` of the polish, ``extra["method"] = "fast"``, the teacher-forced
    RMSEs of the output row, the ridge weight, the reference solver, the seconds taken).
    Use them as any fit: ``difflab.sample(den, noise, fit=fits[n])``, ``save_fit``."""
    if base not in BASES:
        raise ValueError(f"unknown base solver {base!r}; valid: {list(BASES)}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (it keeps the rows near {base}'s), got {ridge}")
    ks = [check_steps(int(k)) for k in steps]
    if objective == "rollout":
        return _rollout_fits(denoiser, ks, noise, plans, reference_steps=reference_steps,
                             reference_solver=reference_solver, ridge=ridge, cond=cond,
                             batch_size=batch_size, t_start=t_start,
                             eval_shifts=eval_shifts, log=log, reference=reference,
                             plan_mse=plan_mse, polish=polish)
    if objective != "teacher_forcing":
        raise ValueError(f"objective must be 'teacher_forcing' or 'rollout', got {objective!r}")
    schedule = denoiser.schedule
    t0 = time.perf_counter()
    fine_ts = (timesteps(schedule, reference_steps, family, t_start=t_start).tolist()
               if reference is None else list(reference.ts))
    grids = {k: timesteps(schedule, k, family, t_start=t_start).tolist() for k in ks}
    index = {k: nested_indices(fine_ts, grids[k]) for k in ks}
    if reference is None:
        keep = sorted({i for idx in index.values() for i in idx})
        reference = fine_reference(denoiser, noise, reference_steps, family=family, keep=keep,
                                   solver=reference_solver, cond=cond, batch_size=batch_size,
                                   t_start=t_start)
    t_ref = time.perf_counter() - t0
    x_T, out = reference.x[0], reference.x[reference.steps]
    fits = {}
    for k in ks:
        t1 = time.perf_counter()
        idx = index[k]
        D = teacher_forced_predictions(denoiser, reference, idx, cond, batch_size)
        targets = [reference.x[i] for i in idx[1:]]
        base_rows = solver_coefficients(base, schedule, grids[k])
        rows, mse, mse_base = ridge_coefficients(x_T, D, targets, base_rows, ridge)
        fit = Fit("bespoke", grids[k], list(grids[k]), rows, base=base, spacing=family,
                  calibration=int(noise.shape[0]), reference_steps=reference.steps,
                  fit_times=False, iterations=0,
                  extra={"method": "fast", "objective": "teacher_forcing", "ridge": ridge,
                         "reference_solver": reference.solver,
                         "tf_rmse": math.sqrt(mse[-1]), "tf_rmse_base": math.sqrt(mse_base[-1])})
        if validate:
            e_fit = _rmse(denoiser, noise, out, cond, batch_size, fit=fit)
            e_base = _rmse(denoiser, noise, out, cond, batch_size, sampler="bespoke",
                           grid=grids[k], base=base)
            if not e_fit < e_base:  # the base solver itself if the fit is not better
                fit = fit.with_(coeffs=base_rows, extra={**fit.extra, "kept_base": True})
            fit = fit.with_(rmse=min(e_fit, e_base), rmse_base=e_base)
            if plans is not None and k in plans:
                e_plan = _rmse(denoiser, noise, out, cond, batch_size, fit=plans[k])
                fit = fit.with_(extra={**fit.extra, "rmse_probe": e_plan})
        if polish > 0:
            from difflab.fitting.bespoke import tune_solver

            polished = tune_solver(denoiser, k, noise, base=base, grid=grids[k], cond=cond,
                                   reference=out, max_iter=polish, fit_times=False,
                                   batch_size=batch_size, t_start=t_start, init=fit.coeffs)
            fit = fit.with_(coeffs=polished.coeffs, rmse=polished.rmse,
                            iterations=polished.iterations,
                            extra={**fit.extra, "objective": "teacher_forcing+lbfgs",
                                   "rmse_ridge": polished.rmse_base})
        fits[k] = _timed(fit, t1, t_ref / len(ks), t_ref, log)
    return fits


def plan_rows(plan: SolverPlan, schedule: Any) -> list[list[float]]:
    """The bespoke rows of ``plan``'s linear solver on its own grid, with its final step: the
    start (and the ridge target) of the rollout fit."""
    opts = {} if plan.final is None else {"final": plan.final}
    return solver_coefficients(plan.sampler, schedule, plan.ts, **opts)


@torch.no_grad()
def plans_reference(denoiser: BaseDenoiser, noise: Tensor, plans: Sequence[SolverPlan],
                    reference_steps: int = 240, *, solver: str = "dpmpp_3m", cond: Any = None,
                    batch_size: int | None = None, t_start: float = 1.0
                    ) -> tuple[FineReference, list[list[int]]]:
    """The rollout objective's reference (module docstring): ``solver`` on the probe's fine
    grid of at least ``reference_steps`` steps merged with the ``plans``' grids, keeping the
    states at the plans' points. Returns it and, per plan, the fine index of each grid time."""
    from difflab.samplers.probe import FAMILIES, fine_grid

    fine = set(fine_grid(denoiser.schedule, max(1, -(-reference_steps // len(FAMILIES))),
                         t_start=t_start).tolist())
    for plan in plans:
        fine |= set(plan.ts)
    fine_ts = sorted(fine, reverse=True)
    index = [nested_indices(fine_ts, plan.ts) for plan in plans]
    keep = sorted({i for idx in index for i in idx})
    return fine_reference(denoiser, noise, grid=fine_ts, keep=keep, solver=solver, cond=cond,
                          batch_size=batch_size), index


def probe_reference(denoiser: BaseDenoiser, traj: Any, grids: Sequence[Sequence[float]],
                    tol: float = 1e-9) -> FineReference:
    """The rollout objective's reference read off the default call's fine probe solve
    (:func:`~difflab.samplers.probe.probe_solve`, ``traj``) on its own noise: no network call.

    The reference grid is the probe's fine grid merged with ``grids``. A time the probe solve
    has is its state; a time t between fine points t_i > t > t_{i+1} is reached from x_i by one
    DPM-Solver++(2M) step with the probe's predictions D_i, D_{i-1} (the step of
    :func:`~difflab.samplers.probe.multistep_costs`; first order from the first point), a step
    shorter than the fine solve's own, so it adds less than the fine solve's error."""
    from difflab.samplers.common import first_order, multistep_2m

    fine = [float(t) for t in traj.ts]
    merged = sorted(set(fine) | {float(t) for g in grids for t in g}, reverse=True)
    ts: list[float] = []
    for t in merged:  # one time per cluster closer than tol, a fine point where there is one
        if ts and ts[-1] - t <= tol:
            if t in fine:
                ts[-1] = t
            continue
        ts.append(t)
    index = nested_indices(ts, [t for g in grids for t in g], tol)
    G = Grid(denoiser.schedule, torch.tensor(ts, dtype=torch.float64), traj.noise)
    at = {t: q for q, t in enumerate(ts)}  # a fine time's index in the merged grid
    x: dict[int, Tensor] = {}
    i = 0  # the fine point at or before ts[q]
    for q in sorted(set(index) | {0, len(ts) - 1}):
        while i + 1 < len(fine) and fine[i + 1] >= ts[q]:
            i += 1
        p = at[fine[i]]
        if p == q:
            x[q] = traj.x[i]
        elif i == 0:  # no history point: the first-order step
            ratio, c = first_order(G, p, q)
            x[q] = traj.x0[0].mul(c).add_(traj.x[0], alpha=ratio)
        else:
            x[q] = multistep_2m(G, at[fine[i - 1]], p, q, traj.x[i], traj.x0[i], traj.x0[i - 1])
    return FineReference(ts, x, {0: traj.x0[0]}, "probe", 0)


def rollout_fittable(plan: SolverPlan) -> bool:
    """Whether the rollout objective can fit from ``plan``: a linear solver of
    :data:`~difflab.samplers.bespoke.BASES` (one call per grid point) with its own
    coefficients."""
    return plan.sampler in BASES and plan.coeffs is None


def _rollout_fits(denoiser: BaseDenoiser, ks: Sequence[int], noise: Tensor,
                  plans: Mapping[int, SolverPlan] | None, *, reference_steps: int,
                  reference_solver: str, ridge: float, cond: Any, batch_size: int | None,
                  t_start: float, eval_shifts: Sequence[float],
                  log: Callable[[str], None] | None,
                  reference: FineReference | None = None,
                  plan_mse: Mapping[int, Tensor] | None = None,
                  polish: int = 0) -> dict[int, Fit]:
    """:func:`fast_fit_solvers` with ``objective="rollout"``."""
    missing = [k for k in ks if plans is None or k not in plans]
    if missing:
        raise ValueError(f"the rollout objective fits on given plans' grids; none for "
                         f"{missing} steps")
    assert plans is not None
    for k in ks:
        if not rollout_fittable(plans[k]):
            raise ValueError(f"the {k}-step plan runs {plans[k].sampler!r}, not a linear "
                             f"solver of {list(BASES)}: nothing to fit from")
    schedule = denoiser.schedule
    t0 = time.perf_counter()
    if reference is None:
        reference, indices = plans_reference(denoiser, noise, [plans[k] for k in ks],
                                             reference_steps, solver=reference_solver,
                                             cond=cond, batch_size=batch_size, t_start=t_start)
    else:
        indices = [nested_indices(reference.ts, plans[k].ts) for k in ks]
    index = dict(zip(ks, indices))
    t_ref = time.perf_counter() - t0
    out = reference.x[reference.steps]
    network = denoiser  # the polish differentiates through every call, the first included
    if 0 in reference.x0:  # every rollout's first call, made already (on any of the draws)
        denoiser = SharedStart(denoiser, reference.ts[0], reference.x[0], reference.x0[0])
    fits = {}
    for k in ks:
        t1 = time.perf_counter()
        plan = plans[k]
        base_rows = plan_rows(plan, schedule)
        targets = [reference.x[i] for i in index[k][1:]]
        e_plan = _plan_rmse(denoiser, plan, noise, out, cond, batch_size,
                            None if plan_mse is None else plan_mse.get(k))
        # each variant (the grid's own times; evaluation times chosen with the rows) scored on
        # draws it was not fitted on: two folds, each fitted on one half, rolled out on the other
        held = {shifts: _two_fold_mse(denoiser, plan, noise, targets, out, base_rows, ridge,
                                      cond, batch_size, shifts)
                for shifts in dict.fromkeys([(0.0,), tuple(eval_shifts)])}
        held_out = {v: math.sqrt(float(m.mean())) for v, m in held.items()}
        shifts = min(held_out, key=held_out.__getitem__)
        extra = {"method": "fast", "objective": "rollout", "ridge": ridge,
                 "reference_solver": reference.solver, "rmse_probe": e_plan,
                 "eval_shifts": list(shifts),
                 "rmse_held_out": {_variant(v): e for v, e in held_out.items()},
                 **({"plan_final": plan.final} if plan.final else {})}
        e_polished = math.inf
        if polish > 0:  # the better variant polished, scored on the same folds

            def refine(fit: Fit, z: Tensor, c: Any, o: Tensor) -> Fit:
                return _polish(network, fit, z, c, o, polish, batch_size, t_start)

            e_polished = math.sqrt(float(_two_fold_mse(
                denoiser, plan, noise, targets, out, base_rows, ridge, cond, batch_size,
                shifts, refine=refine).mean()))
            extra["rmse_held_out_polished"] = e_polished
        if min(held_out[shifts], e_polished) < e_plan:  # fitted again on all draws
            rows, taus, x_n = rollout_coefficients(denoiser, plan.ts, noise, targets,
                                                   base_rows, ridge, cond, batch_size, shifts)
            e_fit = math.sqrt(float(_draw_mse(x_n, out).mean()))
        else:  # the plan itself where no fit beats it held out
            rows, taus, e_fit = base_rows, list(plan.ts), e_plan
            extra["kept_base"] = True
        fit = Fit("bespoke", list(plan.ts), taus, rows, base=plan.sampler, spacing="probe",
                  calibration=int(noise.shape[0]), reference_steps=reference.steps,
                  fit_times=taus != list(plan.ts), iterations=0, rmse=e_fit,
                  rmse_base=e_plan, extra=extra)
        if e_polished < min(held_out[shifts], e_plan):  # and polished on all draws
            polished = _polish(network, fit, noise, cond, out, polish, batch_size, t_start)
            fit = fit.with_(coeffs=polished.coeffs, eval_ts=polished.eval_ts, fit_times=True,
                            iterations=polished.iterations, rmse=polished.rmse,
                            extra={**extra, "objective": "rollout+lbfgs",
                                   "rmse_rollout": e_fit})
        fits[k] = _timed(fit, t1, t_ref / len(ks), t_ref, log)
    return fits


def _variant(shifts: Sequence[float]) -> str:
    """A variant's key in a fit's ``extra["rmse_held_out"]``: its evaluation-time shifts."""
    return ",".join(map(str, shifts))


def _polish(denoiser: BaseDenoiser, fit: Fit, noise: Tensor, cond: Any, out: Tensor,
            iters: int, batch_size: int | None, t_start: float) -> Fit:
    """``fit`` after ``iters`` L-BFGS iterations of the full objective from it
    (:func:`~difflab.fitting.bespoke.tune_solver`: the rollout's error at x(0) against ``out``
    on ``noise``, through every network call, coefficients and told times): the best iterate,
    ``fit`` itself where none is better."""
    from difflab.fitting.bespoke import tune_solver

    return tune_solver(denoiser, fit.steps, noise, base=fit.base or "unipc", grid=fit,
                       cond=cond, reference=out, max_iter=iters, fit_times=True,
                       batch_size=batch_size, t_start=t_start, init=fit.coeffs)


def _plan_rmse(denoiser: BaseDenoiser, plan: SolverPlan, noise: Tensor, out: Tensor,
               cond: Any, batch_size: int | None, known: Tensor | None) -> float:
    """The RMSE of ``plan``'s rollout on the calibration draws against ``out``. ``known``: its
    squared error on each draw where already measured (the probe's, on these draws), NaN
    elsewhere; the plan is rolled out only on the draws that miss one (a contiguous run)."""
    if known is None or known.shape != (noise.shape[0],):
        return _rmse(denoiser, noise, out, cond, batch_size, fit=plan)
    mse = known.detach().to(device="cpu", dtype=torch.float64).clone()
    miss = mse.isnan().nonzero().flatten().tolist()
    if miss:
        if miss != list(range(miss[0], miss[-1] + 1)):
            return _rmse(denoiser, noise, out, cond, batch_size, fit=plan)
        s = slice(miss[0], miss[-1] + 1)
        mse[s] = _sampled_mse(denoiser, noise[s], out[s], None if cond is None else cond[s],
                              batch_size, fit=plan).cpu()
    return math.sqrt(float(mse.mean()))


def _two_fold_mse(denoiser: BaseDenoiser, plan: SolverPlan, noise: Tensor,
                  targets: Sequence[Tensor], out: Tensor, base_rows: Sequence[Sequence[float]],
                  ridge: float, cond: Any, batch_size: int | None,
                  shifts: Sequence[float],
                  refine: Callable[[Fit, Tensor, Any, Tensor], Fit] | None = None) -> Tensor:
    """Each draw's squared error under :func:`rollout_coefficients`' fit made without it:
    fitted on the even draws and rolled out on the odd ones, and the other way round. With
    fewer than 4 draws, the in-sample errors. ``refine(fit, noise, cond, out)``: a further
    step on the fitting half (the polish) before the fit is scored."""
    n = noise.shape[0]
    if n < 4 and refine is None:
        x_n = rollout_coefficients(denoiser, plan.ts, noise, targets, base_rows, ridge, cond,
                                   batch_size, shifts)[2]
        return _draw_mse(x_n, out)
    folds = ([(slice(0, n), slice(0, n))] if n < 4 else
             [(slice(0, n, 2), slice(1, n, 2)), (slice(1, n, 2), slice(0, n, 2))])
    mse = torch.empty(n, dtype=torch.float64)
    for fit_on, score_on in folds:
        c_fit, c_score = (None if cond is None else cond[s] for s in (fit_on, score_on))
        rows, taus, _ = rollout_coefficients(denoiser, plan.ts, noise[fit_on],
                                             [t[fit_on] for t in targets], base_rows, ridge,
                                             c_fit, batch_size, shifts)
        fit = Fit("bespoke", list(plan.ts), taus, rows, base=plan.sampler)
        if refine is not None:
            fit = refine(fit, noise[fit_on], c_fit, out[fit_on])
        mse[score_on] = _sampled_mse(denoiser, noise[score_on], out[score_on], c_score,
                                     batch_size, fit=fit)
    return mse


def _timed(fit: Fit, t1: float, ref_share: float, t_ref: float,
           log: Callable[[str], None] | None) -> Fit:
    """``fit`` with its seconds (since ``t1``, plus its share of the reference solve) and the
    reference's, logged."""
    fit = fit.with_(extra={**fit.extra,
                           "seconds": round(time.perf_counter() - t1 + ref_share, 3),
                           "reference_seconds": round(t_ref, 3)})
    if log is not None:
        log(describe_fast_fit(fit))
    return fit


def describe_fast_fit(fit: Fit) -> str:
    """One line on a :func:`fast_fit_solvers` result."""
    ex = fit.extra
    line = (f"bespoke {fit.steps} steps ({fit.nfe} NFE), fast fit on the {fit.spacing} grid "
            f"({fit.calibration} draws, {fit.reference_steps}-step {ex.get('reference_solver')}"
            " reference)")
    if "tf_rmse" in ex:
        line += (f": teacher-forced RMSE {ex['tf_rmse']:.4g} ({fit.base} "
                 f"{ex.get('tf_rmse_base', math.nan):.4g})")
    else:
        line += f", rows fitted on its own rollout from {fit.base}'s"
        if fit.fit_times:
            line += ", with the times the network is told"
    if fit.rmse is not None:
        line += f", calibration RMSE {fit.rmse:.4g}"
        if fit.rmse_base is not None:
            line += f" ({fit.base} there {fit.rmse_base:.4g})"
    if fit.iterations:
        line += f", {fit.iterations} L-BFGS iterations"
        if "rmse_rollout" in ex:
            line += f" (from {ex['rmse_rollout']:.4g})"
    elif "rmse_held_out_polished" in ex:
        held = ex["rmse_held_out"][_variant(ex["eval_shifts"])]
        line += (f"; polished, it scored worse on held-out draws "
                 f"({ex['rmse_held_out_polished']:.4g} against {held:.4g}): not polished")
    if ex.get("kept_base"):
        line += f"; the fit was not better: {fit.base}'s coefficients kept"
    return line
