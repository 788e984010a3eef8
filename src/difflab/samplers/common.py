"""What every sampler shares: the precomputed grid, noise, the final step, the registry.

Notation (Lu et al. 2022, DPM-Solver): lam = log(alpha / sigma) = log_snr / 2 (the *half*
log-SNR), h_i = lam_{i+1} - lam_i, sigma~ = sigma / alpha (the VE-equivalent noise level). The
first-order data-prediction step (DDIM, Song et al. 2021a, Eq. 12 with eta = 0; DPM-Solver++(1),
Lu et al. 2022b, Eq. 8) is

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_hat(x_s, s)

and uses (1 - e^{-h}) = -expm1(-h), never h itself, so lam_s = -inf (zero terminal SNR,
alpha_s = 0) and lam_t = +inf (sigma_t = 0) are exact: both give 1 - e^{-h} = 1.

**The last step to sigma = 0** (PITFALLS: it dominates the error at many steps). Along the
probability-flow ODE, in VE-scaled variables x~ = x / alpha, a smooth data density gives
D(x~(sigma~), sigma~) = x~(0) + c sigma~^2 + O(sigma~^4) and x~(sigma~) = x~(0) - c sigma~^2 +
O(sigma~^4). Final-step modes (option ``final`` of every deterministic sampler):

* ``"x0"``           x(0) = x0_hat(x_n, sigma_n): the first-order step to sigma = 0 (DDIM /
                     Euler); error O(sigma_n^2) per trajectory, the floor no solver order removes.
* ``"extrapolate"``  x(0) = D_n + (D_n - D_{n-1}) sigma~_n^2 / (sigma~_{n-1}^2 - sigma~_n^2): the
                     last two data predictions at grid points extrapolated linearly in sigma~^2 to
                     sigma~ = 0. No extra NFE, error O(sigma~_n^4); it uses denoised outputs only,
                     so it stays a data prediction for non-smooth (e.g. quantised image) data.

Measured (RMSE to the exact PF-ODE solution on the benchmark mixtures; the table is in
docs/results/samplers.md, section "Final step", made by ``python bench/samplers.py``): the
final step hardly matters at <= 20 steps (interior steps dominate), the x0 step leaves the
predicted O(sigma_min^2) floor, and extrapolation removes it for the 3rd-order solvers
(dpmpp_3m, unipc, dpm_solver_3: ``final="extrapolate"`` by default). For 2nd-order solvers the
interior error stays above the floor up to ~100 steps and extrapolation is neutral to 20%
worse there, so dpmpp_2m, heun and dpm_solver_2 keep ``final="x0"`` (as do the first-order
ddim, euler, dpm_solver_1); stochastic samplers always end with x0_hat (no noise at sigma = 0).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import (
    BaseDenoiser,
    Prediction,
    TimePoint,
)
from difflab.schedules import NoiseSchedule

__all__ = ["Grid", "EvalTimes", "shifted_times", "native_target", "SamplerSpec", "REGISTRY",
           "register", "randn_like", "FINAL_MODES", "first_order", "final_x0", "check_final",
           "MAX_SHRINK", "warn_large_steps", "SharedStart"]

FINAL_MODES = ("extrapolate", "x0")
MAX_SHRINK = 10.0  # sigma~_s / sigma~_t of one step (h = ln 10 ~ 2.3): heun's, dpm_solver_k's limit


class Grid:
    """Per-point coefficients of a time grid as Python floats, computed once before the loop.

    Attributes (lists over the ``n + 1`` grid points): ``points`` (:class:`TimePoint`: what
    the denoiser receives, with its schedule lookups done here, in the dtype and on the device
    of ``like``), ``alpha``, ``sigma``, ``lam`` (= log_snr / 2, -inf where alpha = 0, +inf
    where sigma = 0) and ``s2`` (sigma~^2, inf where alpha = 0).
    """

    def __init__(self, schedule: NoiseSchedule, ts: Tensor, like: Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
        if ts.numel() < 2 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("ts must be a strictly decreasing grid of at least 2 times, got "
                             f"{ts.tolist()[:8]}{'...' if ts.numel() > 8 else ''}")
        if float(ts[0]) > 1 or float(ts[-1]) < 0:
            raise ValueError(
                f"grid times must lie in [0, 1], got [{float(ts[-1])}, {float(ts[0])}]")
        alpha, sigma = schedule.alpha_sigma(ts)
        self.n = ts.numel() - 1
        self.times = ts.tolist()
        self.points = TimePoint.grid(schedule, ts, like, (alpha, sigma))
        self.alpha, self.sigma = alpha.tolist(), sigma.tolist()
        # lam = log(alpha / sigma), from the same numbers the steps use (-inf where alpha = 0,
        # +inf where sigma = 0); Python's math is ~8x cheaper than a tensor call for 50 points
        self.lam = [(math.log(a) if a > 0 else -math.inf) - (math.log(s) if s > 0 else -math.inf)
                    for a, s in zip(self.alpha, self.sigma)]
        self.s2 = [s * s / (a * a) if a > 0 else math.inf for a, s in zip(self.alpha, self.sigma)]
        self.ends_clean = self.sigma[-1] == 0.0

    def h(self, i: int) -> float:
        """h_i = lam_{i+1} - lam_i (inf across alpha = 0 or sigma = 0)."""
        return self.lam[i + 1] - self.lam[i]

    def is_final(self, i: int) -> bool:
        """Whether step i -> i + 1 is the step to sigma = 0."""
        return i == self.n - 1 and self.ends_clean


def first_order(g: Grid, i: int, j: int | None = None) -> tuple[float, float]:
    """(sigma_j / sigma_i, alpha_j (1 - e^{-h})) of the DDIM step x_j = r x_i + c x0_hat."""
    j = i + 1 if j is None else j
    return g.sigma[j] / g.sigma[i], -g.alpha[j] * math.expm1(-(g.lam[j] - g.lam[i]))


def multistep_2m(g: Grid, h: int, j: int, k: int, x: Tensor, D_j: Tensor, D_h: Tensor) -> Tensor:
    """One DPM-Solver++(2M) step j -> k from x = x_j with the data predictions D_j and D_h at
    an earlier point h < j (Lu et al. 2022b, Alg. 2):

        x_k = (sigma_k / sigma_j) x_j + alpha_k (1 - e^{-(lam_k - lam_j)})
              [(1 + 1/(2r)) D_j - D_h / (2r)],   r = (lam_j - lam_h) / (lam_k - lam_j);

    1/(2r) = 0 after a step from alpha = 0 (lam_h = -inf): the first-order step."""
    ratio, c = first_order(g, j, k)
    inv = (g.lam[k] - g.lam[j]) / (2 * (g.lam[j] - g.lam[h]))  # 1 / (2r)
    return D_j.mul(c * (1 + inv)).add_(x, alpha=ratio).add_(D_h, alpha=-c * inv)


def first_order_step(g: Grid, i: int, x: Tensor, pred: Prediction) -> Tensor:
    """x at grid point i + 1 by the first-order step from point i, in the form that needs no
    conversion of ``pred``: the data form x_t = (sigma_t / sigma_s) x + alpha_t (1 - e^{-h}) x0
    or, equal after substituting x0 = (x - sigma_s eps) / alpha_s, the noise form (Euler in
    (sigma~, x~), where dx~/dsigma~ = eps) x_t = (alpha_t / alpha_s) x + alpha_t
    (sigma~_t - sigma~_s) eps. From alpha_s = 0 only the data form is finite."""
    if pred.holds_x0 or math.isinf(g.s2[i]):
        ratio, c = first_order(g, i)
        return pred.x0.mul(c).add_(x, alpha=ratio)
    a_t = g.alpha[i + 1]
    return pred.eps.mul(a_t * (math.sqrt(g.s2[i + 1]) - math.sqrt(g.s2[i]))).add_(
        x, alpha=a_t / g.alpha[i])


def final_x0(g: Grid, x0: Tensor, x0_prev: Tensor | None, mode: str, i_prev: int) -> Tensor:
    """x(0) from the data predictions at grid points n - 1 and ``i_prev`` (see module)."""
    if mode == "x0" or x0_prev is None:
        return g.alpha[-1] * x0
    n1 = g.n - 1
    w = g.s2[n1] / (g.s2[i_prev] - g.s2[n1])  # 0 if sigma~_{prev} = inf
    return g.alpha[-1] * (x0 + w * (x0 - x0_prev))


def warn_large_steps(g: Grid, sampler: str, why: str, stacklevel: int = 5) -> None:
    """Warn when a step of grid ``g`` (other than the one to sigma = 0) shrinks sigma~ by more
    than :data:`MAX_SHRINK`, where ``sampler`` loses its accuracy because ``why``; the warning
    names the samplers that stay accurate there. ``stacklevel`` points at the caller of
    ``difflab.sample``."""
    shrink = max((math.sqrt(g.s2[i] / g.s2[i + 1]) for i in range(g.n)
                  if not g.is_final(i) and math.isfinite(g.s2[i])), default=1.0)
    if shrink > MAX_SHRINK:
        warnings.warn(
            f"{sampler} with {g.n} steps on this grid shrinks sigma~ by {shrink:.3g}x in one "
            f"step (more than {MAX_SHRINK:g}x), where {why}; use more steps or dpmpp_2m / "
            "unipc, which stay accurate there", stacklevel=stacklevel)


def check_final(final: str) -> None:
    if final not in FINAL_MODES:
        raise ValueError(f"unknown final={final!r}; valid: {list(FINAL_MODES)}")


def randn_like(x: Tensor, generator: torch.Generator | list[torch.Generator] | None,
               std: float = 1.0) -> Tensor:
    """Normal noise N(0, std^2) shaped like x, drawn on the generator's device (CPU by default)
    and moved to x's device; ``std`` is applied inside the draw (the same numbers as ``std *
    torch.randn``, one pass less). A list of generators draws image k from generator k, so that
    image k of a batch can be reproduced alone."""
    if generator is None:
        return torch.empty_like(x).normal_(0.0, std)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; "
                             "pass one generator or one per image")
        return torch.stack([torch.empty(x.shape[1:], dtype=x.dtype, device=g.device).normal_(
            0.0, std, generator=g).to(x.device) for g in generator])
    return torch.empty(x.shape, dtype=x.dtype, device=generator.device).normal_(
        0.0, std, generator=generator).to(x.device)


def native_target(denoiser: BaseDenoiser) -> str:
    """What the innermost network predicts, as a training target ('eps', 'x0' or 'v'): its
    parameterisation's native target (wrappers carry their inner denoiser's)."""
    return denoiser.parameterization.target


def shifted_times(schedule: NoiseSchedule, eval_ts: dict[float, float]) -> dict[float, float]:
    """The pairs (t, t') of ``eval_ts`` that change anything: t' != t, at a time t with
    alpha > 0 and sigma > 0."""
    pairs = {float(t): float(te) for t, te in eval_ts.items() if float(t) != float(te)}
    if not pairs:
        return {}
    alpha, sigma = schedule.alpha_sigma(torch.tensor(list(pairs), dtype=torch.float64))
    return {t: te for (t, te), a, s in zip(pairs.items(), alpha.tolist(), sigma.tolist())
            if a > 0 and s > 0}


class EvalTimes(BaseDenoiser):
    """Decoupled evaluation times (LD3, Tong et al. 2024, Sec. 3.2): at grid time t_i the
    network is evaluated at another time t'_i, and its own output (eps, x0 or v: the
    :func:`native_target`) is used as if made at t_i,

        f_i = f_theta(x, t'_i),   x0_hat(x, t_i) = convert(f_i; alpha(t_i), sigma(t_i)),

    so a tuned sampler also chooses what noise level the network is told. ``eval_ts`` maps grid
    times (the Python floats of the grid) to evaluation times; other times pass through, as do
    times with alpha = 0 or sigma = 0, where the conversion does not exist (decided here, once,
    so that a call reads no number back from the device). Wraps any denoiser, guidance
    transforms included (the native output is read through their ``predict``)."""

    def __init__(self, denoiser: BaseDenoiser, eval_ts: dict[float, float]):
        super().__init__()
        self.denoiser = denoiser
        self.schedule, self.parameterization = denoiser.schedule, denoiser.parameterization
        self.eval_ts = shifted_times(denoiser.schedule, eval_ts)
        self.target = native_target(denoiser)

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        return self.denoiser.predict(x, t, cond)

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        te = self.eval_ts.get(point.t)
        if te is None:
            return self.denoiser.predict_at(x, point, cond)
        return self.predict_told(x, point, te, cond)

    def predict_told(self, x: Tensor, point: TimePoint, te: Tensor | float,
                     cond: Any = None) -> Prediction:
        """The prediction at grid point ``point`` with the network told time ``te`` (a number,
        or a 0-d tensor that may require grad: the bespoke fit differentiates through it)."""
        f = self.denoiser.predict(x, te, cond).target(self.target)
        return Prediction.from_target(self.target, f, x, point.alpha, point.sigma)


class SharedStart(BaseDenoiser):
    """``inner`` with its call at ``t_start`` made once per start tensor: the rollouts of many
    solvers from one start (the probe's candidates; the fast fit's variants, folds and final
    fit) all begin with that same call. A call at ``t_start`` on a tensor equal to one answered
    before, with the same condition object, is answered from it; with no condition, so is one
    whose draws are all among the rows of ``x_T``, whose data predictions ``D_T`` are known
    (e.g. a reference solve's first: any subset of the calibration draws, a fold or a half).
    No network call is made for them."""

    def __init__(self, inner: BaseDenoiser, t_start: float, x_T: Tensor | None = None,
                 D_T: Tensor | None = None):
        super().__init__()
        self.inner, self.schedule = inner, inner.schedule
        self.parameterization = inner.parameterization
        self.t_start = float(t_start)
        self.made: list[tuple[Tensor, Any, Prediction]] = []  # (start, condition, prediction)
        self.D_T = D_T
        self.rows = {} if x_T is None or D_T is None else {
            _row_key(r): i for i, r in enumerate(x_T)}

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        return self.inner.predict(x, t, cond)

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        if point.t != self.t_start:
            return self.inner.predict_at(x, point, cond)
        for x_k, c_k, p_k in self.made:
            if c_k is cond and x_k.shape == x.shape and (x_k is x or torch.equal(x_k, x)):
                return p_k
        if cond is None and self.rows:  # rows only where D_T is known
            idx = [self.rows.get(_row_key(r)) for r in x]
            if None not in idx:
                return Prediction(x, self.D_T[idx], None, point.alpha, point.sigma)
        p = self.inner.predict_at(x, point, cond)
        self.made.append((x, cond, p))
        return p


def _row_key(row: Tensor) -> bytes:
    """A draw's exact value as bytes (float64 holds every lower float precision exactly)."""
    return row.detach().to("cpu", torch.float64).numpy().tobytes()


def predict(denoiser: BaseDenoiser, x: Tensor, g: Grid, i: int, cond: Any) -> Prediction:
    """One denoiser call (one NFE) at grid point i."""
    return denoiser.predict_at(x, g.points[i], cond)


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, exact NFE for a grid of ``steps`` steps, its default
    spacing, whether it draws noise, its convergence order (deterministic ones) and options."""

    name: str
    fn: Callable[..., Tensor]
    nfe: Callable[[int], int]
    spacing: str
    stochastic: bool
    order: int
    options: tuple[str, ...] = field(default=())
    nfe_rule: str = ""

    def __call__(self, *args: Any, **kw: Any) -> Tensor:
        return self.fn(*args, **kw)


REGISTRY: dict[str, SamplerSpec] = {}
_COMMON = {"denoiser", "x", "ts", "cond", "generator", "callback"}


def register(name: str, *, nfe: Callable[[int], int], nfe_rule: str, spacing: str,
             order: int, stochastic: bool = False) -> Callable:
    """Decorator adding ``sample_<name>`` to :data:`REGISTRY`."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        options = tuple(p for p in inspect.signature(fn).parameters if p not in _COMMON)
        REGISTRY[name] = SamplerSpec(name, fn, nfe, spacing, stochastic, order, options, nfe_rule)
        return fn

    return wrap
