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

:func:`sample` without a sampler name runs the solver fitted to the denoiser for that step
count (``denoiser.solvers``: :func:`difflab.samplers.bespoke.fit_solvers`, or a checkpoint
trained with ``train.fit_steps``) and otherwise dpmpp_2m (:func:`choose`).

``difflab.samplers.get(name).nfe(steps)`` is the exact number of denoiser calls
(``nfe_rule`` says it in words); on a zero-terminal-SNR grid heun and dpm_solver_k take their
first step (from alpha = 0) as a one-call Euler/DDIM step, so they use order - 1 fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.samplers import (  # noqa: F401  (register)
    bespoke,
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
from difflab.samplers.timesteps import SPACINGS, timesteps

__all__ = ["sample", "names", "get", "choose", "timesteps", "SPACINGS", "FINAL_MODES",
           "SamplerSpec", "randn_like", "EvalTimes", "with_eval_times", "DEFAULT", "AUTO"]

DEFAULT = "dpmpp_2m"  # the sampler of a denoiser with no solver fitted for the step count
AUTO = "auto"  # sampler=None or "auto": a fitted solver if there is one, else DEFAULT


def names() -> list[str]:
    """The registered sampler names, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` of ``name`` (function, nfe(steps), default spacing, ...)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; valid: {names()}")
    return REGISTRY[name]


def choose(denoiser: BaseDenoiser, sampler: str | None, steps: int | None = None,
           spacing: str | None = None, grid: Any = None) -> tuple[str, Any]:
    """(sampler, grid) that :func:`sample` runs. A named sampler runs as asked. ``None`` or
    ``"auto"``: the solver fitted to this denoiser for ``steps`` (``denoiser.solvers``, a
    bespoke solver, e.g. fitted at the end of ``difflab train``) when neither ``grid`` nor
    ``spacing`` is given, else :data:`DEFAULT` on its default grid."""
    if sampler is not None and sampler != AUTO:
        return sampler, grid
    if grid is None and spacing is None:
        fitted = getattr(denoiser, "solvers", {}).get(10 if steps is None else steps)
        if fitted is not None:
            return fitted.get("sampler", "bespoke"), fitted
    return DEFAULT, grid


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


def sample(denoiser: BaseDenoiser, noise: Tensor, sampler: str | None = None,
           steps: int | None = None, *, spacing: str | None = None,
           grid: Tensor | list[float] | dict[str, Any] | None = None, cond: Any = None,
           generator: torch.Generator | list[torch.Generator] | None = None,
           callback: Callable[[dict], None] | None = None, t_start: float = 1.0,
           **opts: Any) -> Tensor:
    """Draw x_0 from standard-normal ``noise`` with ``steps`` (default 10) steps of ``sampler``
    (default: the solver fitted to ``denoiser`` for ``steps`` if it has one, else dpmpp_2m;
    :func:`choose`).

    The grid is ``timesteps(schedule, steps, spacing or the sampler's default, t_start)``, or
    ``grid``: an explicit decreasing list of ``steps + 1`` times ending at 0, or a tuned grid
    (the dict of :func:`difflab.samplers.tuning.tune_grid` or ``difflab tune-grid``: its
    ``ts``, and ``eval_ts``, the times the network is told at each grid point, applied with
    :class:`~difflab.samplers.common.EvalTimes`), or a bespoke solver's (the dict of
    :func:`difflab.samplers.bespoke.tune_solver`, with its ``coeffs``, for ``sampler="bespoke"``);
    ``steps`` may then be left out. The noise is multiplied by the std of x at the grid's
    first time for unit-variance data, ``schedule.prior_std(t)`` = sqrt(alpha^2 + sigma^2) (at
    t = 1: 1 for VP, ~sigma_max for VE). ``generator`` (one, or a list with one per image)
    drives the noise stochastic samplers draw during sampling; ``opts`` are the sampler's
    options (see its docstring).
    """
    sampler, grid = choose(denoiser, sampler, steps, spacing, grid)
    spec = get(sampler)
    unknown = sorted(set(opts) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {sampler!r}; valid: "
                         f"{list(spec.options)}")
    schedule = denoiser.schedule
    if grid is not None:
        if spacing is not None:
            raise ValueError("pass either spacing= or grid=, not both")
        if isinstance(grid, dict):
            if grid.get("coeffs") is not None:
                if sampler != "bespoke":
                    raise ValueError(f"this grid carries a bespoke solver's coefficients; "
                                     f"sample it with sampler='bespoke', not {sampler!r}")
                opts = {**opts, "coeffs": grid["coeffs"]}
            grid, denoiser = grid["ts"], with_eval_times(denoiser, grid["ts"],
                                                         grid.get("eval_ts"))
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
