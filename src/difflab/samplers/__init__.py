"""Samplers: stateless functions ``sample_<name>(denoiser, x, ts, *, cond, generator, callback,
**opts) -> x0`` and the front door :func:`sample`.

Every sampler works in log-SNR / data-prediction form on any schedule (VP, VE/EDM, zero
terminal SNR) and any prediction type, keeps no state between calls (one denoiser may serve
many threads) and precomputes its per-step coefficients before the loop. Grids: see
:mod:`difflab.samplers.timesteps`; the last step to sigma = 0: see
:mod:`difflab.samplers.common`.

=================  ========================  ==========  ==========  ===========================
name               method                    NFE         spacing     notes
=================  ========================  ==========  ==========  ===========================
ddpm               Ho et al. 2020, Alg. 2    steps       uniform     ancestral; variance option
ddim               Song et al. 2021a         steps       uniform     eta option (0: ODE)
dpm_solver_1/2/3   Lu et al. 2022 (eps)      k(n-1)+1    log_snr     singlestep
dpmpp_2m, _3m      Lu et al. 2022b           steps       log_snr     multistep, data prediction
dpmpp_2m_sde       Lu et al. 2022b, Alg. 3   steps       log_snr     stochastic
euler, heun        Karras et al. 2022        n, 2n - 1   log_snr     heun: last step Euler
euler_ancestral    k-diffusion               steps       log_snr     stochastic
unipc              Zhao et al. 2023 (bh2)    steps       log_snr     UniP-2 + UniC
bespoke            Shaul et al. 2024         steps       log_snr     fitted coefficients
=================  ========================  ==========  ==========  ===========================

:func:`sample` runs what its arguments say, never state left on a denoiser: a named sampler,
or a solver plan passed as ``fit=`` (:class:`SolverPlan`; a tuned grid or a fitted bespoke solver
of :mod:`difflab.fitting` is one), and otherwise the plan a probe of the model picks
(:func:`default_plan`, :mod:`difflab.samplers.probe`; dpmpp_2m above 40 steps). :func:`step` is one
solver step from t_from to t_to (distillation).

``difflab.samplers.get(name).nfe(steps)`` is the exact number of denoiser calls
(``nfe_rule`` says it in words); on a zero-terminal-SNR grid heun and dpm_solver_k take their
first step (from alpha = 0) as a one-call Euler/DDIM step, so they use order - 1 fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, Parameterization
from difflab.samplers import (  # noqa: F401  (register)
    bespoke,
    consistency,
    ddpm,
    dpm_solver,
    dpmpp,
    euler,
    unipc,
)
from difflab.samplers.common import (
    FINAL_MODES,
    REGISTRY,
    EvalTimes,
    SamplerSpec,
    randn_like,
)
from difflab.samplers.onestep import STEPS, step
from difflab.samplers.plan import SolverPlan
from difflab.samplers.probe import MAX_PROBE_STEPS, ProbeChoice, probe_plan
from difflab.samplers.timesteps import SPACINGS, timesteps, trained_end

__all__ = ["sample", "names", "get", "choose", "timesteps", "trained_end", "SPACINGS",
           "FINAL_MODES", "SamplerSpec", "SolverPlan", "randn_like", "EvalTimes",
           "with_eval_times", "step", "STEPS", "DEFAULT", "AUTO", "probe_plan", "ProbeChoice",
           "default_plan", "probes"]

DEFAULT = "dpmpp_2m"  # a call naming no sampler, fit, grid or spacing above MAX_PROBE_STEPS
AUTO = "auto"  # sampler=None or "auto": the fit's sampler if a fit is passed, else DEFAULT


def names() -> list[str]:
    """The registered sampler names, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` of ``name`` (function, nfe(steps), default spacing, ...)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid: {names()}")
    return REGISTRY[name]


def choose(sampler: str | None = None, fit: SolverPlan | None = None,
           parameterization: Parameterization | None = None) -> str:
    """The sampler :func:`sample` runs: a named sampler as asked; ``None`` or ``"auto"``: the
    sampler of ``fit`` (a fitted solver or tuned grid) when one is passed, else the
    parameterisation's own (``default_sampler``: ``consistency`` for a consistency model), else
    :data:`DEFAULT`. Decided by the arguments alone."""
    if sampler is not None and sampler != AUTO:
        return sampler
    if fit is not None:
        return fit.sampler
    return getattr(parameterization, "default_sampler", None) or DEFAULT


def with_eval_times(denoiser: BaseDenoiser, ts: Sequence[float],
                    eval_ts: Sequence[float] | None) -> BaseDenoiser:
    """``denoiser`` told ``eval_ts[i]`` at grid time ``ts[i]`` (:class:`EvalTimes`), or itself
    when no evaluation time differs from its grid time."""
    if eval_ts is None:
        return denoiser
    ts, eval_ts = [float(t) for t in ts], [float(t) for t in eval_ts]
    if len(eval_ts) != len(ts) or not all(0.0 <= t <= 1.0 for t in eval_ts):
        raise ValueError(f"eval_ts must hold one time in [0, 1] per grid time ({len(ts)}), "
                         f"got {eval_ts[:6]}{'...' if len(eval_ts) > 6 else ''}")
    shifted = EvalTimes(denoiser, dict(zip(ts, eval_ts)))
    return shifted if shifted.eval_ts else denoiser


def probes(denoiser: BaseDenoiser, steps: int) -> bool:
    """Whether a call with no sampler, fit, grid or spacing runs the probe's plan: for 1 <
    ``steps`` <= :data:`MAX_PROBE_STEPS`, unless the parameterisation has its own sampler
    (consistency)."""
    return (not getattr(denoiser.parameterization, "default_sampler", None)
            and 1 < steps <= MAX_PROBE_STEPS)


def default_plan(denoiser: BaseDenoiser, steps: int, noise: Tensor,
                 cond: Any = None) -> SolverPlan | None:
    """The plan of a call that names no sampler, fit, grid or spacing: where :func:`probes`,
    the probe's choice for this model (:func:`probe_plan`: a cheap training-free probe, cached
    per model, image shape and condition), else None (the parameterisation's own sampler,
    e.g. consistency, or :data:`DEFAULT` on its grid)."""
    if not probes(denoiser, steps):
        return None
    return probe_plan(denoiser, steps, tuple(noise.shape[1:]), cond=cond, device=noise.device,
                      dtype=noise.dtype).plan


def sample(denoiser: BaseDenoiser, noise: Tensor, sampler: str | None = None,
           steps: int | None = None, *, spacing: str | None = None,
           grid: Tensor | Sequence[float] | None = None, fit: SolverPlan | None = None,
           cond: Any = None, generator: torch.Generator | list[torch.Generator] | None = None,
           callback: Callable[[dict], None] | None = None, t_start: float = 1.0,
           **opts: Any) -> Tensor:
    """Draw x_0 from standard-normal ``noise`` with ``steps`` (default 10) steps of ``sampler``
    (default: ``fit``'s sampler when a fit is passed; with no sampler, fit, grid or spacing,
    the solver and grid a probe of this model picks, :func:`default_plan`, whose first call
    per model, image shape, condition and step count costs extra network calls; else
    dpmpp_2m; :func:`choose`).

    The grid is ``timesteps(schedule, steps, spacing or the sampler's default, t_start)``, or
    ``grid``: an explicit decreasing list (or tensor) of ``steps + 1`` times ending at 0, or
    that of ``fit``: a :class:`SolverPlan` (e.g. :class:`difflab.fitting.Fit`, a tuned grid or
    a fitted bespoke solver) runs its sampler on its ``ts``, telling the network ``eval_ts``
    at each grid point (:class:`~difflab.samplers.common.EvalTimes`) and passing its
    ``coeffs`` to the bespoke sampler; ``steps`` may then be left out. The noise is multiplied
    by the std of x at the grid's first time for unit-variance data, ``schedule.prior_std(t)``
    = sqrt(alpha^2 + sigma^2) (at t = 1: 1 for VP, ~sigma_max for VE). ``cond`` (None, class
    labels or a Condition) reaches the denoiser unchanged. ``generator`` (one, or a list with
    one per image) drives the noise stochastic samplers draw during sampling; ``opts`` are the
    sampler's options (see its docstring).
    """
    if (sampler in (None, AUTO) and fit is None and grid is None and spacing is None
            and t_start == 1.0):
        fit = default_plan(denoiser, 10 if steps is None else steps, noise, cond)
        if fit is not None:
            steps = None
    sampler = choose(sampler, fit, denoiser.parameterization)
    spec = get(sampler)
    unknown = sorted(set(opts) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {sampler!r}; valid: "
                         f"{list(spec.options)}")
    schedule = denoiser.schedule
    if isinstance(grid, (dict, SolverPlan)):
        raise TypeError("grid= takes times (a list or tensor); pass a tuned grid or a fitted "
                        "solver as fit=")
    if fit is not None:
        if not isinstance(fit, SolverPlan):
            raise TypeError(f"fit= takes a SolverPlan (e.g. difflab.fitting.Fit), got "
                            f"{type(fit).__name__}")
        if grid is not None or spacing is not None:
            raise ValueError("fit= brings its own grid; pass grid= or spacing= without it")
        if sampler != fit.sampler:
            raise ValueError(f"this fit is for sampler={fit.sampler!r}, not {sampler!r}; leave "
                             "sampler out to run it (grid=fit.ts runs another sampler on its "
                             "grid)")
        if fit.final is not None:
            if "final" in opts:
                raise ValueError("pass final in the fit or as an option, not both")
            opts = {**opts, "final": fit.final}
        if fit.coeffs is not None:
            if "coeffs" in opts:
                raise ValueError("pass coeffs in the fit or as an option, not both")
            opts = {**opts, "coeffs": fit.coeffs}
        grid, denoiser = fit.ts, with_eval_times(denoiser, fit.ts, fit.eval_ts)
    if grid is not None:
        if spacing is not None:
            raise ValueError("pass either spacing= or grid=, not both")
        ts = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if steps is not None and ts.numel() != steps + 1:
            raise ValueError(f"grid has {ts.numel()} times, a {steps}-step grid needs "
                             f"{steps + 1}; leave steps out to take it from the grid")
        if ts.numel() < 2 or float(ts[-1]) != 0.0:
            raise ValueError("grid must hold at least 2 decreasing times and end at t = 0, got "
                             f"{ts.tolist()[:4]}...{ts.tolist()[-2:]}")
    else:
        ts = timesteps(schedule, 10 if steps is None else steps, spacing or spec.spacing,
                       t_start=t_start)
    return spec.fn(denoiser, noise * schedule.prior_std(float(ts[0])), ts, cond=cond,
                   generator=generator, callback=callback, **opts)
