"""The default call's plan: a cheap, training-free probe of *this* model picks the grid and solver.

A grid chosen for one model family fails on another (issue #17: the log-SNR grid that suits a
cosine / v model is 3-5x worse than diffusers' best on an eps / linear-beta model, where the
uniform grid wins, and neither serves rectified flow or EDM). So :func:`probe_plan` measures
the model instead of guessing from its schedule's name:

1. **One fine probe solve.** ``draws`` fixed-seed noises (disjoint from any user's: their own
   generator) are solved with UniPC on a fine grid whose density is the *sum* of the uniform,
   log-SNR and Karras densities (``fine`` points of each, :func:`fine_grid`: dense wherever any
   of the three is, with no near-duplicate points that would destabilise a multistep solver).
   It keeps the states x_i and data predictions D_i = x0_hat(x_i, t_i) at every fine point.
   On a discrete-time model it stops at the first trained time 1 / T and ends with x0_hat
   there, where every candidate grid ends too (session 24: on to t = 0, with the network
   called where it was never trained and that segment under-resolved, its target was ~1e-3
   RMSE off on a scaled_linear latent model, more than the candidates differ by at 20 calls).
2. **Cheapest paths** over the fine points (Chen et al. 2024, "On the trajectory regularity of
   ODE-based diffusion sampling", GITS: dynamic programming over teacher-forced step errors).
   A step i -> k from the probe's own state, in the data-prediction form of
   :mod:`difflab.samplers.common` (h = lam_k - lam_j, lam the half log-SNR),

       first order:   x^_k = (sigma_k / sigma_i) x_i + alpha_k (1 - e^{-h}) D_i
       multistep 2M:  x^_k = (sigma_k / sigma_j) x_j + alpha_k (1 - e^{-h})
                             [(1 + 1 / (2 r)) D_j - D_i / (2 r)],   r = (lam_j - lam_i) / h

   (DPM-Solver++(2M), Lu et al. 2022b, Alg. 2, with history point i), costs
   c = g_k ||x^_k - x_k||_rms, where g_k = s / sqrt(alpha_k^2 s^2 + sigma_k^2) is the gain from
   x_k to x_0 of the probability-flow map for data of std s (exact for Gaussian data: it makes
   the errors of VP, VE and flow states comparable). Dynamic programming gives the n-step path
   of least summed cost, over single points (first order) and over pairs (2M). The costs
   come from the first half of the draws only.
3. **Selection by rollout.** Teacher-forced costs do not see error *propagation*: on an
   eps-prediction network at low SNR, x0_hat = (x - sigma eps_hat) / alpha amplifies a state
   error by up to 1 / alpha, so a grid that is cheap step by step can roll out badly (measured:
   the eps / linear model of docs/results/byom_defaults.md, where both paths lose to the
   uniform grid). So the candidates, the two paths, the uniform and log-SNR grids and two
   midpoints (uniform with the 2M path and with log-SNR), each run by unipc (both final
   steps) and dpmpp_2m, are *rolled out* from the probe noise and scored by their RMS distance
   to the fine solve, each on every draw it was not made from: a path on the second half, a
   fixed grid (uniform, log-SNR, their midpoint) on all draws. The best fixed candidate and
   the best path candidate then meet on the second half (the same draws for both), and the
   closer wins. Scoring on draws the paths were not placed on matters: scored on their own
   draws, the paths looked 1.6x better than they were on test noise (rectified flow, 20
   steps) and were wrongly chosen. Scoring the fixed grids on all draws halves the noise of
   their ranking (session 17: on a freshly trained eps / linear model at 10 calls the second
   half alone ranked uniform+log_snr first, 1.11x diffusers' best on the test draws, where
   all draws rank the uniform grid first, 1.00x).
4. **The uniform grid's twin.** A discrete-time model's uniform grid has two integer forms:
   ``uniform`` (= diffusers' "trailing", DDPM indices 999, 949 .. 49 at 20 steps) and
   diffusers' "linspace" (uniform between t = 1 and 1 / T: 999, 949 .. 549, 500, 450 .. 50).
   Where the uniform grid wins, the winning solver is also rolled out on its twin (all
   draws, as the uniform grid) and the closer of the two is kept: one rollout more, and only
   there. Which form is better depends on the model by ~1 % (session 26: the eps / linear
   model prefers linspace at 10 and 20 calls on the probe's draws and on three test sets,
   where it was 1.01-1.02x diffusers' best at 20 calls on the trailing form; on six other
   discrete settings linspace is better in 23 of 54 cells, docs/results/byom_defaults.md).

Cost: the fine solve (3 ``fine`` calls on ``draws`` images), plus for each step count the
candidates' rollouts, once per model, image shape, condition and step count: ~12 n calls, half
of them on all ``draws`` images, half on ``draws / 2`` (one rollout per solver and grid: the
final-step modes differ only in how the last two data predictions make x(0),
:func:`rollout_finals`; and each start's first call, the same for every candidate, is made
once). On a 28x28 U-Net, one thread: ~58 s CPU for 5, 10 and 20 steps together, the fine
solve included (session 18; ~87 s with a rollout per mode and per first call). The plan is cached
on the side (:func:`probe_plan`), keyed by the parameters' in-place version counters, so
training the model invalidates it.

Measured on nine model and guidance settings (cosine / v, EDM / VE, rectified flow, eps /
linear-beta DDPM from diffusers, zero-terminal-SNR v, a classifier-free-guided model at w = 2
and 4, a latent text-to-image model at w = 0 and 3) against diffusers' best scheduler at 5, 10
and 20 calls: docs/results/byom_defaults.md, one section per session, newest first. Where it
falls short it is measured there: on the latent model unguided the plan beats diffusers' best on
the median draw (0.64x / 0.89x at 10 / 20 calls on 544 draws) but loses on RMSE (1.05x / 1.15x):
a few draws in a hundred, near a split of the flow, go the other way under the large high-noise
steps of the log-SNR grid and its paths (the worst holds 40 % / 21 % of the squared error), a
tail that 24 probe draws rarely contain and the Karras grid does not have.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, Condition
from difflab.samplers.common import REGISTRY, Grid, SharedStart, final_x0, first_order
from difflab.samplers.plan import SolverPlan
from difflab.samplers.timesteps import timesteps, trained_end

__all__ = ["PROBE_DRAWS", "PROBE_FINE", "PROBE_SEED", "PROBE_SOLVERS", "MAX_PROBE_STEPS",
           "ProbeTrajectory", "fine_grid", "probe_trajectory", "first_order_costs",
           "multistep_costs", "cheapest_path", "cheapest_pair_path", "candidate_grids",
           "ProbeChoice", "probe_plan", "probe_solve", "clear_probe_cache", "FIXED_GRIDS",
           "rollout_finals", "probe_condition", "condition_fingerprint", "reference_final",
           "FINE_GRID_ENDS"]

PROBE_DRAWS = 24       # probe noises: the first half places the paths, the second selects
PROBE_FINE = 60        # points of each family in the fine grid (3 x 60 in all)
FINE_GRID_ENDS = ("trained", "zero")  # where fine_grid ends on a discrete-time model
PROBE_SEED = 61_723    # the probe noise's own generator seed
# (sampler, final-step mode): one call a step, stable at 5 calls
PROBE_SOLVERS = (("unipc", "extrapolate"), ("unipc", "x0"), ("dpmpp_2m", "x0"))
MAX_PROBE_STEPS = 40   # above this the fixed grids agree to well under the probe's own error
FAMILIES = ("uniform", "log_snr", "karras")
# candidates that depend on the model only through its schedule, not on any probe draw
FIXED_GRIDS = ("uniform", "log_snr", "uniform+log_snr", "linspace")
# a winning grid's twin on a discrete-time model, tried with the winning solver only (step 4)
TWINS = {"uniform": "linspace"}


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x; xp increasing (as numpy.interp)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    return f0 + w * (f1 - f0)


def fine_grid(schedule: Any, fine: int = PROBE_FINE, t_start: float = 1.0,
              end: str = "trained") -> Tensor:
    """The probe's fine grid: ``len(FAMILIES) * fine`` steps whose density in t is the sum of
    the ``fine``-step uniform, log-SNR and Karras grids' densities (each family's fractional
    grid index, summed, inverted at equal steps). Families a schedule cannot place (no finite
    sigma_min) are left out.

    ``end="trained"``: on a discrete-time model the points below its first trained time
    t_min = 1 / T (:func:`~difflab.samplers.timesteps.trained_end`) are replaced by t_min itself,
    so a solve on this grid never calls the network where it was never trained and ends with
    the step t_min -> 0 (run it with ``final="x0"``: x0_hat at t_min, exact given x(t_min)).
    ``end="zero"`` keeps them (the grid before session 24): the ODE on to t = 0 with the
    network extrapolated below t_min, a segment the grid under-resolves, 3 points at any
    ``fine`` (on a Gaussian under scaled_linear it lands 9 % of the two ends' gap short at
    960 steps, tests/test_bench_stats.py)."""
    if end not in FINE_GRID_ENDS:
        raise ValueError(f"end must be one of {FINE_GRID_ENDS}, got {end!r}")
    tt = torch.linspace(t_start, 0.0, 20_001, dtype=torch.float64)
    count = torch.zeros_like(tt)
    used = 0
    for family in FAMILIES:
        try:
            g = timesteps(schedule, fine, family, t_start=t_start)
        except ValueError:
            continue
        count += _interp(tt.flip(0), g.flip(0), torch.arange(fine, -1, -1,
                                                              dtype=torch.float64)).flip(0)
        used += 1
    total = used * fine
    q = torch.linspace(0.0, float(count[-1]), total + 1, dtype=torch.float64)
    ts = _interp(q, count, tt)
    ts[0], ts[-1] = t_start, 0.0
    t_min = trained_end(schedule) if end == "trained" else None
    if t_min is not None and t_min < t_start:
        ts = torch.cat([ts[ts > t_min], ts.new_tensor([t_min, 0.0])])
    return ts


def reference_final(schedule: Any, ts: Sequence[float] | Tensor, solver: str) -> dict[str, str]:
    """The final-step option of a reference solve by ``solver`` on ``ts``: ``{"final": "x0"}``
    where ``ts`` ends t_min -> 0 at a discrete model's first trained time (:func:`fine_grid`)
    and the solver has the option, else none (the solver's own)."""
    t_min = trained_end(schedule)
    ends_there = (t_min is not None and len(ts) > 1
                  and math.isclose(float(ts[-2]), t_min, rel_tol=1e-9))
    return {"final": "x0"} if ends_there and "final" in REGISTRY[solver].options else {}


@dataclass
class ProbeTrajectory:
    """The fine probe solve: grid ``ts`` (n + 1 times), ``grid`` (its coefficients), states
    ``x[i]`` (x[0] = the scaled probe noise, x[n] the output) and predictions ``x0[i]`` at
    ``ts[i]`` for i < n, the probe ``noise`` and ``cond``."""

    ts: Tensor
    grid: Grid
    x: list[Tensor]
    x0: list[Tensor]
    noise: Tensor
    cond: Any = None
    cache: dict[str, Any] = field(default_factory=dict)  # Gram matrix, step costs

    @property
    def half(self) -> int:
        """Draws [0, half) place the cheapest paths, draws [half, draws) score the rollouts:
        a path fitted to the draws that judge it would win by overfitting them."""
        return max(1, self.noise.shape[0] // 2)

    @property
    def n(self) -> int:
        return len(self.ts) - 1

    @property
    def data_std(self) -> float:
        """s: the std of the probe's outputs (the data std in the gain g_k)."""
        return float(self.x[-1].double().std()) or 1.0


@torch.no_grad()
def probe_trajectory(denoiser: BaseDenoiser, noise: Tensor, cond: Any = None,
                     fine: int = PROBE_FINE, solver: str = "unipc") -> ProbeTrajectory:
    """Solve the probability-flow ODE from ``noise`` with ``solver`` on :func:`fine_grid`,
    keeping every state and data prediction (module docstring, step 1)."""
    schedule = denoiser.schedule
    ts = fine_grid(schedule, fine)
    n = len(ts) - 1
    x0_T = noise * schedule.prior_std(1.0)
    xs: list[Tensor | None] = [x0_T] + [None] * n
    x0s: list[Tensor | None] = [None] * n

    def record(step: dict[str, Any]) -> None:
        i = step["i"]
        x0s[i] = step["x0"].clone()
        if i + 1 < n:
            xs[i + 1] = step["x"].clone()

    out = REGISTRY[solver].fn(denoiser, x0_T, ts, cond=cond, callback=record,
                              **reference_final(schedule, ts, solver))
    xs[n] = out
    return ProbeTrajectory(ts, Grid(schedule, ts, noise), xs, x0s, noise, cond)  # type: ignore[arg-type]


@dataclass
class _Terms:
    """What every step cost needs, computed once per trajectory: the Gram matrix ``G`` of
    [x_0 .. x_n, D_0 .. D_{n-1}] over the first half of the draws (mean over all numbers;
    D_i sits at row ``off + i``), the first-order step's (sigma_k / sigma_i, alpha_k
    (1 - e^{-h})) for every i < k (:func:`~difflab.samplers.common.first_order`), lam, and
    the gain g_k."""

    G: Tensor
    off: int
    ratio: Tensor
    c: Tensor
    lam: Tensor
    gain: Tensor


def _terms(traj: ProbeTrajectory) -> _Terms:
    if "terms" not in traj.cache:
        V = torch.stack([v[:traj.half].detach().double().flatten().cpu()
                         for v in traj.x + traj.x0])
        g, n = traj.grid, traj.n
        ratio = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        c = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        for i in range(n):
            for k in range(i + 1, n + 1):
                ratio[i, k], c[i, k] = first_order(g, i, k)
        alpha, sigma = (torch.tensor(v, dtype=torch.float64) for v in (g.alpha, g.sigma))
        s = traj.data_std
        traj.cache["terms"] = _Terms(V @ V.T / V.shape[1], n + 1, ratio, c,
                                     torch.tensor(g.lam, dtype=torch.float64),
                                     s / torch.sqrt(alpha ** 2 * s ** 2 + sigma ** 2))
    return traj.cache["terms"]


def _step_rms(t: _Terms, i: Tensor | int, j: int, k: Tensor, a: Tensor, b: Tensor,
              c: Tensor | float) -> Tensor:
    """g_k ||a x_j + b D_j + c D_i - x_k||_rms from the Gram matrix, broadcast over i and k
    (e^2 to ~1e-15 absolute, so e to ~1e-7)."""
    G, Dj, Di = t.G, t.off + j, t.off + i
    e2 = (a ** 2 * G[j, j] + b ** 2 * G[Dj, Dj] + c ** 2 * G[Di, Di] + G[k, k]
          + 2 * a * b * G[j, Dj] + 2 * a * c * G[j, Di] - 2 * a * G[j, k]
          + 2 * b * c * G[Dj, Di] - 2 * b * G[Dj, k] - 2 * c * G[Di, k])
    return e2.clamp_min(0).sqrt() * t.gain[k]


def first_order_costs(traj: ProbeTrajectory) -> Tensor:
    """C[i, k] (i < k, else inf): the gain-weighted RMS error of one first-order step from the
    probe state x_i to t_k against the probe state x_k (module docstring, step 2)."""
    if "first" not in traj.cache:
        t, n = _terms(traj), traj.n
        C = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
        for i in range(n):
            k = torch.arange(i + 1, n + 1)
            C[i, k] = _step_rms(t, i, i, k, t.ratio[i, k], t.c[i, k], 0.0)
        traj.cache["first"] = C
    return traj.cache["first"]


def multistep_costs(traj: ProbeTrajectory) -> Tensor:
    """C[i, j, k] (i < j < k, else inf): the gain-weighted RMS error of one DPM-Solver++(2M)
    step j -> k with history point i, from probe states and predictions (module docstring;
    the extrapolation D = (1 + 1/(2r)) D_j - D_i / (2r) of
    :func:`~difflab.samplers.dpmpp.data_prediction_multistep`). A history point at
    lam = -inf (alpha = 0) gives the first-order step; the step to sigma = 0 is x0_hat
    (DPM-Solver++'s last step)."""
    if "multistep" not in traj.cache:
        t, n = _terms(traj), traj.n
        C = torch.full((n + 1, n + 1, n + 1), math.inf, dtype=torch.float64)
        for j in range(1, n):
            i = torch.arange(0, j)[:, None]
            k = torch.arange(j + 1, n + 1)[None, :]
            inv = (t.lam[k] - t.lam[j]) / (2 * (t.lam[j] - t.lam[i]))  # 1 / (2r)
            inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
            a, e1 = t.ratio[j, k].expand(j, -1), t.c[j, k]
            b, c = e1 * (1 + inv), -e1 * inv
            last = (k == n).expand(j, -1)  # x(0) = x0_hat(x_j): a = 0, b = 1, c = 0
            b = torch.where(last, torch.ones_like(b), b)
            c = torch.where(last, torch.zeros_like(c), c)
            C[:j, j, j + 1:] = _step_rms(t, i, j, k, a, b, c)
        traj.cache["multistep"] = C
    return traj.cache["multistep"]


def cheapest_path(C: Tensor, steps: int) -> list[int]:
    """The path 0 = p_0 < p_1 < .. < p_steps = n of least sum_m C[p_{m-1}, p_m] (dynamic
    programming, O(steps n^2))."""
    n = C.shape[0] - 1
    if not 1 <= steps <= n:
        raise ValueError(f"a path of {steps} steps needs 1 <= steps <= {n}")
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    back = []
    for _ in range(steps):
        best, arg = (best[:, None] + C).min(0)
        back.append(arg)
    path = [n]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return path[::-1]


def cheapest_pair_path(C1: Tensor, C2: Tensor, steps: int) -> list[int]:
    """The path of least cost when the first step costs C1[0, p_1] and step m >= 2 costs
    C2[p_{m-2}, p_{m-1}, p_m] (a two-step method): dynamic programming over the last two
    points, O(steps n^3)."""
    n = C1.shape[0] - 1
    if not 1 <= steps <= n:
        raise ValueError(f"a path of {steps} steps needs 1 <= steps <= {n}")
    if steps == 1:
        return [0, n]
    best = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)  # [prev, cur]
    best[0] = C1[0]
    back = []
    for _ in range(steps - 1):
        best, arg = (best[:, :, None] + C2).min(0)  # [cur, next]
        back.append(arg)
    j, k = int(best[:, n].argmin()), n
    path = [k, j]
    for arg in reversed(back):
        i = int(arg[j, k])
        path.append(i)
        j, k = i, j
    return path[::-1]


def _finite(err: Tensor) -> float:
    value = float(err)
    return value if math.isfinite(value) else math.inf


def candidate_grids(denoiser: BaseDenoiser, traj: ProbeTrajectory,
                    steps: int) -> dict[str, Tensor]:
    """The grids the rollout chooses from (module docstring, step 3), by name."""
    out: dict[str, Tensor] = {}
    # Karras never won a rollout on the four families the probe was built on; added back
    # (session 20) it changed no plan on six models (docs/results/byom_defaults.md)
    for family in ("uniform", "log_snr"):
        try:
            out[family] = timesteps(denoiser.schedule, steps, family)
        except ValueError:
            continue
    if steps < traj.n:
        out["path"] = traj.ts[cheapest_path(first_order_costs(traj), steps)]
        out["path_2m"] = traj.ts[cheapest_pair_path(first_order_costs(traj),
                                                    multistep_costs(traj), steps)]
    if "uniform" in out:  # midpoints: both grids decrease from t_start to 0, so does their mean
        for name, other in (("uniform+path_2m", "path_2m"), ("uniform+log_snr", "log_snr")):
            if other in out:
                out[name] = (out["uniform"] + out[other]) / 2
    unique: dict[str, Tensor] = {}
    for name, ts in out.items():  # drop repeats (e.g. two equal paths)
        if not any(torch.equal(ts, u) for u in unique.values()):
            unique[name] = ts
    return unique


def _twin_grid(schedule: Any, steps: int, twin: str, ts: Tensor) -> Tensor | None:
    """``twin``'s grid for ``steps`` steps (module docstring, step 4), or None where the
    schedule has none (a continuous-time one) or it equals the winner's ``ts``."""
    try:
        other = timesteps(schedule, steps, twin)
    except ValueError:
        return None
    return None if torch.equal(other, ts) else other


def rollout_finals(denoiser: BaseDenoiser, solver: str, x: Tensor, ts: Tensor, cond: Any,
                   finals: Sequence[str]) -> dict[str, Tensor]:
    """``solver``'s output from ``x`` on ``ts`` for each final-step mode in ``finals``, from one
    rollout: the modes differ only in the step to sigma = 0, x(0) = alpha_n (D_{n-1} +
    w (D_{n-1} - D_{n-2})) (:func:`~difflab.samplers.common.final_x0`; w = 0 for "x0"), made
    from the last two data predictions, which the rollout with ``final="x0"`` reports. For the
    probe's solvers (unipc, dpmpp_2m) this equals a rollout per mode (tests/test_probe.py)."""
    preds: list[Tensor] = []  # the last two data predictions

    def keep(step: dict[str, Any]) -> None:
        preds[:] = preds[-1:] + [step["x0"]]

    out = REGISTRY[solver].fn(denoiser, x, ts, cond=cond, final="x0", callback=keep)
    g = Grid(denoiser.schedule, ts, x)
    ends_clean = g.n >= 2 and g.is_final(g.n - 1)
    return {mode: final_x0(g, preds[-1], preds[-2], mode, g.n - 2)
            if mode != "x0" and ends_clean else out for mode in finals}


@dataclass(frozen=True)
class ProbeChoice:
    """What :func:`probe_plan` chose: the ``plan`` and every candidate's probe RMSE
    (``scores[(sampler, final, grid name)]``: a fixed grid's over all probe draws, a path's over
    the held half)."""

    plan: SolverPlan
    grid_name: str
    scores: dict[tuple[str, str, str], float]
    #: the plan's squared error on each probe draw (against the fine solve's output), NaN on
    #: the draws it was not rolled out on (a path's first half): a fit calibrated on the
    #: probe's draws reads the plan's error off it instead of rolling the plan out again
    draw_mse: Tensor | None = None


def condition_fingerprint(obj: Any) -> Any:
    """A hashable digest of a condition (or tensor): its tensors' SHA-1s, shapes and dtypes."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        return (tuple(t.shape), str(t.dtype), hashlib.sha1(t.numpy().tobytes()).hexdigest())
    if isinstance(obj, Condition):
        return tuple((k, condition_fingerprint(v)) for k, v in sorted(obj.kwargs().items()))
    return repr(obj)


def _version(denoiser: BaseDenoiser) -> tuple[int, int]:
    """Changes whenever a parameter is updated in place (an optimizer step) or replaced."""
    params = list(denoiser.parameters())
    return sum(p._version for p in params), sum(id(p) for p in params)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_probe_cache() -> None:
    """Forget every cached probe and plan."""
    _CACHE.clear()


def probe_condition(cond: Any, draws: int) -> Any:
    """The condition rows the probe's ``draws`` noises take: ``cond``'s first rows, cycled."""
    if cond is None:
        return None
    cond = Condition.of(cond)
    idx = torch.arange(draws) % cond.batch_size
    return cond[idx]


def _store(denoiser: BaseDenoiser, shape: Sequence[int], pcond: Any, device: torch.device,
           dtype: torch.dtype, draws: int, fine: int) -> dict[Any, Any]:
    """The cache entry of one probe (its solve and plans), emptied when the weights change."""
    version = _version(denoiser)
    stores = _CACHE.setdefault(denoiser, {})
    for old in [k for k in stores if k[-1] != version]:  # trained since: forget
        del stores[old]
    key = (tuple(shape), condition_fingerprint(pcond), str(device), str(dtype), draws, fine,
           version)
    return stores.setdefault(key, {})


def _solved(store: dict[Any, Any], denoiser: BaseDenoiser, shape: Sequence[int], pcond: Any,
            device: torch.device, dtype: torch.dtype, draws: int,
            fine: int) -> ProbeTrajectory:
    """The fine probe solve of ``store``, solved on first use."""
    if "traj" not in store:
        gen = torch.Generator().manual_seed(PROBE_SEED)
        noise = torch.randn(draws, *shape, generator=gen, dtype=torch.float64).to(
            device=device, dtype=dtype)
        store["traj"] = probe_trajectory(denoiser, noise, pcond, fine)
    return store["traj"]


@torch.no_grad()
def probe_solve(denoiser: BaseDenoiser, shape: Sequence[int], *, cond: Any = None,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                draws: int = PROBE_DRAWS, fine: int = PROBE_FINE) -> ProbeTrajectory:
    """The fine probe solve (module docstring, step 1) from the probe's own noise (``draws``
    normal draws of ``shape`` from :data:`PROBE_SEED`), cached with :func:`probe_plan`'s plans:
    every step count's plan, and ``difflab tune-grid --fast``'s reference, share it."""
    pcond = probe_condition(cond, draws)
    device = torch.device("cpu" if device is None else device)
    store = _store(denoiser, shape, pcond, device, dtype, draws, fine)
    return _solved(store, denoiser, shape, pcond, device, dtype, draws, fine)


@torch.no_grad()
def probe_plan(denoiser: BaseDenoiser, steps: int, shape: Sequence[int], *, cond: Any = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               draws: int = PROBE_DRAWS, fine: int = PROBE_FINE,
               solvers: Sequence[tuple[str, str]] = PROBE_SOLVERS) -> ProbeChoice:
    """The plan the default call runs for ``steps`` steps on images of ``shape`` (C, H, W):
    the candidate (solver, grid) whose rollout from the probe noise lands closest to the fine
    probe solve (module docstring). ``cond``: the call's condition; the probe uses its first
    rows (cycled to ``draws``). Cached per denoiser, shape, condition rows, step count and
    parameter version; the probe solve itself is shared by every step count."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    pcond = probe_condition(cond, draws)
    device = torch.device("cpu" if device is None else device)
    store = _store(denoiser, shape, pcond, device, dtype, draws, fine)
    if steps in store:
        return store[steps]
    traj = _solved(store, denoiser, shape, pcond, device, dtype, draws, fine)
    half = traj.half if traj.noise.shape[0] > 1 else 0
    x_T = traj.noise * denoiser.schedule.prior_std(1.0)
    scores: dict[tuple[str, str, str], float] = {}
    held: dict[tuple[str, str, str], float] = {}
    draw_mse: dict[tuple[str, str, str], Tensor] = {}
    grids = candidate_grids(denoiser, traj, steps)
    # (start noise, condition, fine-solve output) of the draws from ``start`` on
    draws_from = {start: (x_T[start:], None if traj.cond is None else traj.cond[start:],
                          traj.x[-1][start:]) for start in {0, half}}
    finals: dict[str, list[str]] = {}
    for solver, final in solvers:
        finals.setdefault(solver, []).append(final)
    shared = SharedStart(denoiser, float(traj.ts[0]))  # every rollout's first call, once

    def roll(name: str, ts: Tensor, solver: str, modes: Sequence[str]) -> None:
        """Score ``solver`` on grid ``name`` in each final mode: a fixed grid saw no probe
        draw, so all of them score it; a path only the held half."""
        start = 0 if name in FIXED_GRIDS else half
        x_start, cond_start, target = draws_from[start]
        outs = rollout_finals(shared, solver, x_start, ts, cond_start, modes)
        for final, x in outs.items():
            mse = (x - target).double().pow(2).flatten(1).mean(1)
            key = (solver, final, name)
            scores[key] = _finite(mse.mean().sqrt())
            held[key] = _finite(mse[half - start:].mean().sqrt())
            draw_mse[key] = torch.cat([mse.new_full((start,), math.nan), mse])

    for name, ts in grids.items():
        for solver, modes in finals.items():
            roll(name, ts, solver, modes)
    fixed = [k for k in scores if k[2] in FIXED_GRIDS]
    paths = [k for k in scores if k[2] not in FIXED_GRIDS]
    finalists = [min(keys, key=scores.__getitem__) for keys in (fixed, paths) if keys]
    solver, final, name = min(finalists, key=held.__getitem__)  # paired: the same held draws
    twin = TWINS.get(name)
    ts = _twin_grid(denoiser.schedule, steps, twin, grids[name]) if twin else None
    if ts is not None:  # a fixed grid like the winner: both scored on all draws
        roll(twin, ts, solver, [final])
        if scores[solver, final, twin] < scores[solver, final, name]:
            name, grids[twin] = twin, ts
    choice = ProbeChoice(SolverPlan(solver, grids[name], final=final), name, scores,
                         draw_mse[solver, final, name])
    store[steps] = choice
    return choice
