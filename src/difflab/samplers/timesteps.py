"""Time grids: decreasing continuous times t_0 > t_1 > ... > t_steps = 0.

Every grid has ``steps + 1`` points, starts at ``t_start`` (default 1, the prior) and ends at
t = 0, where sigma = 0 (clean data). Times are fractional; they are never rounded to integer
timesteps (PITFALLS: rounding evaluates the network at a sigma other than the solver's), and a
sampler always steps to the *next grid point* (never ``t - T // n``). With sigma~ = sigma / alpha
the VE-equivalent noise level and lambda = log_snr(t):

* ``uniform``  t_i = t_start (1 - i / steps). On a DDPM schedule with steps = T these are the
  DDPM indices T-1 .. 0 (t = (i + 1) / T) followed by t = 0.
* ``log_snr``  lambda uniform between lambda(t_start) and lambda(sigma~ = schedule.sigma_min)
  for i = 0 .. steps - 1, then t = 0 (DPM-Solver's "logSNR" spacing, Lu et al. 2022, Sec. 3.3).
* ``karras``   sigma~_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho, rho = 7, sigma_max = sigma~(t_start), sigma_min = schedule.sigma_min
  (Karras et al. 2022, Eq. 5), then t = 0.
* ``trailing`` diffusers' "trailing" DDPM indices round(arange(T, 0, -T / steps)) - 1
  (Lin et al. 2024, Table 2), i.e. t = (index + 1) / T, then t = 0. Discrete schedules only.
* ``linspace`` diffusers' "linspace" indices of its multistep solvers (DPMSolverMultistep,
  UniPC, DEIS): round(linspace(0, T - 1, steps + 1)), reversed, the last (index 0) dropped,
  i.e. t = (index + 1) / T, then t = 0. The uniform grid between t = 1 and the first trained
  time 1 / T on integer indices; it differs from ``uniform`` / ``trailing`` by about one
  index in the lower half (T = 1000, 20 steps: 500, 450 .. 50 against 499, 449 .. 49), which
  can matter by ~1 % at 20 calls (docs/results/byom_defaults.md, session 26). Discrete
  schedules only.
* ``leading``  diffusers' "leading" indices arange(steps) * (T // steps), reversed: kept for
  compatibility with checkpoints tuned on it. It does **not** start at the prior (with
  T = 1000 and 5 steps its first index is 800, t = 0.801), so ``t_start`` is ignored.

On a zero-terminal-SNR schedule lambda(1) = -inf (sigma~ = inf). The grid still starts at
t_start = 1 (samplers handle lambda = -inf exactly), but the *interior* points of ``log_snr``
and ``karras`` are placed as if sigma~_max = 4096 (alpha_bar = 2^-24, diffusers' convention for
zero terminal SNR), since a uniform grid over an infinite range does not exist.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule

__all__ = ["SPACINGS", "timesteps", "SIGMA_MAX_CLIP", "trained_end"]

SPACINGS = ("uniform", "log_snr", "karras", "leading", "trailing", "linspace")
SIGMA_MAX_CLIP = 4096.0  # sigma~ used for grid placement when sigma~(t_start) = inf


def trained_end(schedule: NoiseSchedule) -> float | None:
    """t = 1 / T, a discrete-time model's first trained time (DDPM index 0, sigma~ =
    ``schedule.sigma_min``), or None for a continuous-time schedule (trained at every t).

    The network never saw a smaller time, so no grid here goes below it: ``log_snr`` and
    ``karras`` end there, ``uniform`` and ``trailing`` at or above it, and the last step to t = 0 is
    made from the predictions there. The probe's fine grid and every reference solve stop there
    too (:func:`difflab.samplers.probe.fine_grid`): the probability-flow solution of a discrete
    model is the ODE from t = 1 to 1 / T followed by x0_hat at 1 / T, the endpoint diffusers'
    schedulers converge to (docs/results/byom_defaults.md, session 24)."""
    return None if schedule.num_steps is None else float(schedule.t_from_net_time(0.0))


def _finite_sigma_max(schedule: NoiseSchedule, t_start: float) -> float:
    with torch.no_grad():  # a number, also for a schedule with parameters (learned)
        s = math.exp(-0.5 * float(schedule.log_snr(t_start)))
    return s if math.isfinite(s) else SIGMA_MAX_CLIP


def _check_sigma_min(schedule: NoiseSchedule, sigma_max: float) -> float:
    sigma_min = float(schedule.sigma_min)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"schedule.sigma_min = {sigma_min} must lie in (0, sigma~(t_start) = "
                         f"{sigma_max}); use spacing='uniform' or a smaller t_start")
    return sigma_min


def _from_sigmas(schedule: NoiseSchedule, sigmas: Tensor, t_start: float) -> Tensor:
    t = schedule.t_from_sigma_ratio(sigmas)
    t[0] = t_start  # exact prior time (sigma~ may have been clipped for placement)
    return torch.cat([t, t.new_zeros(1)])


def timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "log_snr", *,
              t_start: float = 1.0, rho: float = 7.0) -> Tensor:
    """The decreasing float64 grid of ``steps + 1`` times from ``t_start`` to 0 (see module)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {list(SPACINGS)}")
    if not 0 < t_start <= 1:
        raise ValueError(f"t_start must lie in (0, 1], got {t_start}")
    f64 = torch.float64
    if spacing == "uniform":
        ts = torch.linspace(t_start, 0.0, steps + 1, dtype=f64)
    elif spacing == "log_snr":
        sigma_max = _finite_sigma_max(schedule, t_start)
        sigma_min = _check_sigma_min(schedule, sigma_max)
        log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=f64)
        ts = _from_sigmas(schedule, log_sigmas.exp(), t_start)
    elif spacing == "karras":
        sigma_max = _finite_sigma_max(schedule, t_start)
        sigma_min = _check_sigma_min(schedule, sigma_max)
        ramp = torch.linspace(0, 1, steps, dtype=f64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        ts = _from_sigmas(schedule, (hi + ramp * (lo - hi)) ** rho, t_start)
    else:
        T = schedule.num_steps
        if T is None:
            raise ValueError(f"spacing {spacing!r} uses DDPM integer indices and needs a discrete "
                             f"schedule; valid for {type(schedule).__name__}: "
                             "['uniform', 'log_snr', 'karras']")
        if steps > T:
            raise ValueError(f"spacing {spacing!r} has at most T = {T} steps, got {steps}")
        if spacing == "leading":
            idx = (torch.arange(steps, dtype=f64) * (T // steps)).flip(0)
        elif spacing == "linspace":  # numpy's linspace (i * step, exact end), half to even
            if steps > T - 1:  # a step under one index would round two points together
                raise ValueError(f"spacing 'linspace' has at most T - 1 = {T - 1} steps, "
                                 f"got {steps}")
            idx = torch.arange(steps + 1, dtype=f64) * ((T - 1) / steps)
            idx[-1] = T - 1
            idx = idx.round().flip(0)[:steps]
        else:
            idx = (torch.arange(T, 0, -T / steps, dtype=f64).round() - 1)[:steps]
        ts = torch.cat([(idx + 1) / T, torch.zeros(1, dtype=f64)])
    if not bool((ts[1:] < ts[:-1]).all()):  # pragma: no cover - guarded by construction
        raise ValueError(f"time grid is not strictly decreasing (duplicate points): {ts.tolist()}")
    return ts
