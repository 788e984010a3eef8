"""``difflab tune-grid``: fit a sampler's grid (or a bespoke solver) to a checkpoint.

``difflab tune-grid CKPT --sampler unipc --steps 10`` fits the grid of one deterministic sampler
and step count to the checkpoint's network (:func:`difflab.fitting.tune_grid`, on calibration
noise drawn from ``--seed``) and stores the :class:`~difflab.fitting.Fit` beside the weights
(:func:`difflab.fitting.save_fit`: ``CKPT/fits.json``, entry ``unipc/10/ema``).
``--sampler bespoke`` fits a bespoke solver's coefficients (:func:`difflab.fitting.tune_solver`)
on the grid of its base solver (``--base``, default unipc: the fit already stored, else tuned
first), stored as the ``bespoke/<steps>/<weights>`` entry. ``--fast`` fits bespoke solvers
for all ``--steps`` (default 5 10 20) from one reference solve (by default the default call's
own probe solve, on the probe's 24 draws: no second solve) by ridge least squares, each on
the grid and from the coefficients of the default call's probe plan, row by row on its own
rollout, with the time the network is told at each point chosen with its row where that
scores better on held-out calibration draws (:func:`difflab.fitting.fast_fit_solvers`,
``objective="rollout"``; a step count with no probe plan by teacher forcing on the uniform
grid: about a minute on a CPU, where the full fit takes many minutes;
docs/results/fit_fast.md), stored as the same entries where they beat the probe plan on
held-out calibration draws.

``difflab sample`` and ``difflab eval`` then run that fit for that sampler, step count and
weights (EMA or raw) by default (:func:`difflab.commands.model.choose_solver`), and say so;
``--spacing`` chooses a fixed rule instead. A fit belongs to the weights it was fitted to (the
store records their SHA-256 and ignores a fit for other weights with a warning).

A class-conditional checkpoint is fitted for the guidance it will be sampled with: ``--cfg W``
(and ``--cfg-rescale``) fits classifier-free-guided sampling of weight w, on calibration draw i
of class i mod K, stored as ``bespoke/<steps>/ema/cfg=W`` (:func:`difflab.fitting.store.
guidance_tag`; no ``--cfg``: ``cfg=0``, the conditional model unguided); ``difflab sample
--cfg W`` and ``difflab eval --cfg W`` run the fit stored for their w, and no other (a fit
serves one ODE: guidance changes it). A text-conditioned model (a difflab text-to-image run, a
diffusers pipeline folder) is fitted on ``--prompts-file F`` (draw i takes prompt i mod P), with
``--cfg W`` away from the empty prompt, stored as ``bespoke/<steps>/ema/cfg=W``, which
``difflab sample --prompt ... --cfg W`` runs for any prompt.

A local diffusers model or pipeline folder is tuned the same way, its fits stored beside the
folder and never in it (:func:`difflab.commands.model.fit_store`: ``FOLDER.difflab/fits.json``,
where ``difflab sample FOLDER`` finds them); a fit already stored there for the sampler and
step count is replaced only with ``--overwrite``.

From Python: ``tune_checkpoint("runs/fm", sampler="unipc", steps=[5, 10])``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.commands.common import HelpFormatter, ParameterError, param, set_threads
from difflab.commands.guidance import Guidance
from difflab.commands.model import fit_store, load_model
from difflab.fitting.fast import FAST_CALIBRATION

__all__ = ["tune_checkpoint", "register", "cmd_tune_grid"]


def tune_checkpoint(checkpoint: str | os.PathLike, *, sampler: str = "unipc",
                    steps: Sequence[int] = (10,), count: int = 64, seed: int | None = 1000,
                    reference_steps: int = 100, max_evals: int | None = None,
                    batch_size: int = 256, ema: bool = True, eval_times: bool = True,
                    eval_times_only: bool = False, base: str = "unipc", start: str = "tuned",
                    max_iter: int = 100, device: str | torch.device = "cpu",
                    log: Callable[[str], None] | None = None,
                    overwrite: bool = False, fast: bool = False, cfg: float | None = None,
                    cfg_rescale: float = 0.0,
                    prompts: Sequence[str] | None = None,
                    polish: int = 0, ridge: float | None = None) -> list[tuple[Any, Path]]:
    """Fit ``sampler``'s grid for each of ``steps`` to a checkpoint's EMA (``ema=False``: raw)
    weights on ``count`` calibration draws from ``seed``, against a ``reference_steps``
    dpm_solver_3 solution, and store each fit with the checkpoint. ``eval_times``: also fit
    the times the network is told; ``eval_times_only``: keep the stored grid and fit only
    those. ``sampler="bespoke"``: fit the coefficients, on the ``base`` solver's tuned grid
    (``start="tuned"``, tuned first if none is stored) or from unipc on another ``start``
    grid ("auto", "adaptive" or a spacing name), with ``max_iter`` L-BFGS iterations.
    ``log`` receives a line per fit. Returns [(fit, path of the fits file)]. A diffusers
    folder's fits go to ``FOLDER.difflab/fits.json`` (:func:`~difflab.commands.model.
    fit_store`), where a stored fit is replaced only with ``overwrite``. ``fast``: bespoke
    solvers by :func:`~difflab.fitting.fast_fit_solvers` (``sampler`` is then "bespoke"; the
    plans' reference is dpmpp_3m on the probe's fine grid of ``reference_steps`` points merged
    with the plans' grids; no grid is tuned). ``fast`` with ``seed=None``: the calibration
    draws are the probe's own (:func:`~difflab.samplers.probe.probe_solve`, ``count`` of
    them, :data:`~difflab.samplers.probe.PROBE_DRAWS`), and the probe's fine solve, which the
    default call's plans were made from, is the reference
    (:func:`~difflab.fitting.fast.probe_reference`): no second solve. A class-conditional
    checkpoint is fitted guided by classifier-free guidance of weight ``cfg`` (None or 0: its
    conditional model; ``cfg_rescale``: the rescale), calibration draw i of class i mod K, the
    fits stored under that guidance (:func:`~difflab.fitting.store.guidance_tag`). A
    text-conditioned model is fitted on ``prompts`` (draw i: prompt i mod P), guided by
    ``cfg`` away from the empty prompt. ``polish`` (with ``fast``): that many L-BFGS
    iterations of the full objective from each fast fit where that scores better on held-out
    halves of the draws (:mod:`difflab.fitting.fast`: a backward pass through every call per
    iteration; 4-6x the time). ``ridge`` (with ``fast``): the rows' ridge weight toward the
    plan's solver (None: :data:`~difflab.fitting.fast.FAST_RIDGE`).
    """
    from difflab.fitting import reference_profile, tune_grid
    from difflab.interop import check_safetensors, is_diffusers_folder
    from difflab.samplers import SPACINGS
    from difflab.samplers.probe import PROBE_DRAWS, probe_solve

    if count < 1:
        raise ParameterError(f"{param('count')} must be at least 1, got {count}")
    if seed is None and not (fast and count == PROBE_DRAWS):
        raise ParameterError(f"{param('seed')} None (the probe's own draws) needs "
                             f"{param('fast')} and {param('count')} {PROBE_DRAWS}")
    starts = ("tuned", "auto", "adaptive", *SPACINGS)
    if start not in starts:
        raise ParameterError(f"unknown {param('start')} {start!r}; valid: {', '.join(starts)}")
    if eval_times_only and not eval_times:
        raise ParameterError(f"{param('eval_times_only')} and {param('eval_times=False')} "
                             "exclude each other")
    if eval_times_only and sampler == "bespoke":
        raise ParameterError(f"{param('eval_times_only')} refits a stored grid's times; a "
                             "bespoke fit always fits its times with its coefficients")
    if sampler == "bespoke" and start != "tuned" and base != "unipc":
        raise ParameterError(f"{param('start')} {start} fits from unipc's coefficients; use "
                             f"{param('start')} tuned with {param('base')} {base}")
    if polish < 0 or (polish and not fast):
        raise ParameterError(f"{param('polish')} is a number of L-BFGS iterations after "
                             f"{param('fast')}'s fit (>= 0, with {param('fast')}), got "
                             f"{polish}{'' if fast else ' without it'}")
    if ridge is not None and (not fast or not ridge > 0):
        raise ParameterError(f"{param('ridge')} is the weight (> 0) of {param('fast')}'s "
                             f"rows toward the plan's solver, got {ridge}"
                             f"{'' if fast else ' without it'}")
    if fast and sampler not in ("unipc", "bespoke"):  # unipc: the default, and the base
        raise ParameterError(f"{param('fast')} fits bespoke solvers; got {param('sampler')} "
                             f"{sampler}")
    sampler = "bespoke" if fast else sampler
    from difflab.commands.validate import check_device

    check_device(device)
    guidance = Guidance(cfg=cfg or 0.0, cfg_rescale=cfg_rescale)
    if is_diffusers_folder(checkpoint):  # refused unopened; an output replaced only if asked
        check_safetensors(checkpoint)
    model = _load(checkpoint, ema=ema, device=device, guidance=guidance, prompts=prompts)
    # a class-conditional model: its guided denoiser, class i mod K for draw i
    den, tag = model.guided.denoiser, model.guided.fits
    if is_diffusers_folder(checkpoint):
        _check_store(checkpoint, sampler, steps, ema, overwrite, tag)
    ckpt, weights = fit_store(model.checkpoint, ema)  # a fit belongs to weights (SHA-256)
    say = log or (lambda line: None)
    if tag is not None:  # guided or prompted: say what is fitted and where it goes
        K = model.guided.num_classes
        what = (f"sampling on {len(prompts)} prompts (draw i: prompt i mod {len(prompts)})"
                if prompts is not None else f"{K}-class sampling (draw i: class i mod {K})")
        how = (f"classifier-free guidance w = {guidance.cfg:g}"
               + (f", rescale {cfg_rescale:g}" if cfg_rescale else "")) if guidance.cfg else \
            "no guidance (--cfg W guides)"
        say(f"fitting {what} with {how}; stored as <sampler>/<steps>/"
            f"{'ema' if ema else 'model'}/{tag}, what sampling with this guidance runs")
    if seed is None and getattr(den.parameterization, "default_sampler", None):
        seed = 1000  # a model with its own sampler (consistency) is never probed
    cond = model.guided.labels(count)  # class labels or prompts' Condition; None: neither
    cond = None if cond is None else cond.to(model.device)
    if seed is None:  # the probe's draws: its fine solve is the reference
        traj = probe_solve(den, model.shape, device=model.device, cond=cond)
        noise = traj.noise
    else:
        traj = None
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((count,) + model.shape, generator=g).to(model.device)
    store = _Store(ckpt, ema, weights, tag)
    if fast:
        return _tune_fast(den, store, noise, steps, cond=cond, seed=seed,
                          reference_steps=reference_steps, batch_size=batch_size,
                          say=say, traj=traj, polish=polish, ridge=ridge)
    ref, profile = reference_profile(den, noise, reference_steps, batch_size=batch_size,
                                     cond=cond)
    made = dict(seed=seed, reference_steps=reference_steps)
    done: list[tuple[Any, Path]] = []
    for k in steps:
        if sampler == "bespoke":
            done.append(_tune_bespoke(den, store, noise, cond, ref, profile, k, base=base,
                                      start=start, max_iter=max_iter, max_evals=max_evals,
                                      eval_times=eval_times, batch_size=batch_size, made=made,
                                      say=say))
            continue
        keep = stored = None
        if eval_times_only:
            stored = store.load(sampler, k)
            if stored is None:
                raise ParameterError(f"{param('eval_times_only')}: {checkpoint} has no "
                                     f"{sampler} {k}-step grid for these weights; tune one "
                                     "first")
            keep = stored.ts
        tuned = tune_grid(den, sampler, k, noise, cond=cond, reference=ref, grid=keep,
                          max_evals=max_evals, eval_times=eval_times).with_(**made)
        if stored is not None:  # the grid's own fit, kept beside this one's (eval times only)
            tuned = tuned.with_(grid_from=_provenance(stored, ("calibration", "evals", "seed",
                                                               "reference_steps", "rmse")))
        path = store.save(tuned)
        say(f"{sampler} {k} steps ({tuned.nfe} NFE): calibration RMSE {tuned.rmse:.4g} (grid "
            f"alone {tuned.rmse_grid:.4g}, default {tuned.default_spacing} grid "
            f"{tuned.rmse_default:.4g}), {tuned.evals} sampler runs -> {path}")
        done.append((tuned, path))
    return done


def _load(checkpoint: str | os.PathLike, *, ema: bool, device: str | torch.device,
          guidance: Guidance, prompts: Sequence[str] | None) -> Any:
    """The model to fit: a text-to-image run or a diffusers pipeline on ``prompts``, any
    other checkpoint as ``difflab sample`` loads it."""
    from difflab.commands.model import load_diffusers_model, load_prompted_model
    from difflab.commands.t2i import is_text_to_image
    from difflab.interop import is_diffusers_folder

    text = is_text_to_image(checkpoint)
    if text and prompts is None:
        raise ParameterError(f"{param('checkpoint')} {checkpoint} is a text-to-image model: "
                             f"give the calibration prompts with {param('prompts_file')} F "
                             "(one per line; the fit serves any prompt)")
    if text:
        return load_prompted_model(checkpoint, prompts, ema=ema, device=device,
                                   guidance=guidance)
    if is_diffusers_folder(checkpoint) and prompts is not None:
        return load_diffusers_model(checkpoint, ema=ema, device=device, guidance=guidance,
                                    prompts=prompts)
    model = load_model(checkpoint, ema=ema, device=device, guidance=guidance)
    if prompts is not None:
        raise ParameterError(f"{param('prompts_file')}: {checkpoint} takes no text")
    return model


@dataclass(frozen=True)
class _Store:
    """Where a checkpoint's fits go (``ckpt``: its fits folder) and what they belong to: its
    (EMA) ``weights`` and the ``guidance`` sampled with (a fit key's guidance part)."""

    ckpt: Path
    ema: bool
    weights: Path
    guidance: str | None

    def save(self, fit: Any) -> Path:
        from difflab.fitting import save_fit

        return save_fit(self.ckpt, fit, ema=self.ema, weights=self.weights,
                        guidance=self.guidance)

    def load(self, sampler: str, steps: int) -> Any:
        from difflab.fitting import load_fit

        return load_fit(self.ckpt, sampler, steps, self.ema, weights=self.weights,
                        guidance=self.guidance)

    def remove(self, sampler: str, steps: int) -> bool:
        from difflab.fitting.store import remove_fit

        return remove_fit(self.ckpt, sampler, steps, self.ema, self.guidance)


def _check_store(checkpoint: str | os.PathLike, sampler: str, steps: Sequence[int], ema: bool,
                 overwrite: bool, guidance: str | None = None) -> None:
    """Refuse, before any work, to replace a fit stored beside a diffusers folder (or to
    write where a non-folder stands) without ``overwrite``."""
    from difflab.fitting.store import FITS, _entries, fit_key

    store, _ = fit_store(checkpoint, ema)
    if store.exists() and not store.is_dir():
        raise ParameterError(f"{param('checkpoint')}: its fits go to {store}, which is a file")
    if overwrite or not (store / FITS).is_file():
        return
    taken = [fit_key(sampler, k, ema, guidance) for k in steps
             if fit_key(sampler, k, ema, guidance) in _entries(store)]
    if taken:
        raise ParameterError(f"{store / FITS} already holds {', '.join(taken)}; pass "
                             f"{param('overwrite')} to replace it")


def _provenance(fit: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """How ``fit`` (a :class:`~difflab.fitting.Fit`) was made, for a fit made on its grid."""
    return {k: getattr(fit, k) for k in keys}


def _tune_bespoke(den: Any, store: _Store, noise: Any, cond: Any, ref: Any,
                  profile: dict[str, Any], steps: int, *, base: str, start: str,
                  max_iter: int, max_evals: int | None, eval_times: bool, batch_size: int,
                  made: dict[str, Any], say: Callable[[str], None]) -> tuple[Any, Path]:
    """Bespoke coefficients on the base solver's tuned grid, or from unipc on ``start``."""
    from difflab.fitting import describe_fit, fit_solver, tune_grid, tune_solver

    if start != "tuned":  # from a fixed rule's grid (auto: each of START_GRIDS)
        tuned = fit_solver(den, steps, noise, ref, spacing=start, profile=profile,
                           max_iter=max_iter, batch_size=batch_size, cond=cond).with_(**made)
        path = store.save(tuned)
        say(f"{describe_fit(tuned)} -> {path}")
        return tuned, path
    grid = store.load(base, steps)
    if grid is None:
        grid = tune_grid(den, base, steps, noise, cond=cond, reference=ref,
                         max_evals=max_evals, eval_times=eval_times).with_(**made)
        store.save(grid)
        say(f"{base} {steps} steps: grid tuned first (calibration RMSE {grid.rmse:.4g})")
    tuned = tune_solver(den, steps, noise, base=base, grid=grid, reference=ref, cond=cond,
                        max_iter=max_iter, batch_size=batch_size)
    tuned = tuned.with_(**made, grid_from=_provenance(grid, (
        "sampler", "calibration", "evals", "seed", "reference_steps", "rmse")))
    path = store.save(tuned)
    say(f"bespoke {steps} steps ({tuned.nfe} NFE): calibration RMSE {tuned.rmse:.4g} ({base} "
        f"on the same grid {tuned.rmse_base:.4g}), {tuned.iterations} L-BFGS iterations -> "
        f"{path}")
    return tuned, path


def _tune_fast(den: Any, store: _Store, noise: Any, steps: Sequence[int], *, cond: Any,
               seed: int | None, reference_steps: int, batch_size: int,
               say: Callable[[str], None], traj: Any = None,
               polish: int = 0, ridge: float | None = None) -> list[tuple[Any, Path]]:
    """Bespoke solvers for all ``steps`` by the fast fit, each stored with the checkpoint
    where it beats the default call's probe plan on the calibration draws; where it does not,
    nothing is stored (and a stored bespoke fit for that step count is removed), so
    ``difflab sample`` runs the probe's plan: a fit never makes the default worse. ``traj``:
    the probe's fine solve when ``noise`` is the probe's noise (``seed`` None), the plans'
    reference then. ``polish``: L-BFGS iterations of the full objective after each fit;
    ``ridge``: the rows' ridge weight (None: the fit's default)."""
    from difflab.fitting import fast_fit_solvers
    from difflab.fitting.fast import (
        FAST_RIDGE,
        describe_fast_fit,
        probe_reference,
        rollout_fittable,
    )
    from difflab.samplers import default_plan
    from difflab.samplers.probe import PROBE_SEED, probe_plan

    plans = {n: plan for n in steps if (plan := default_plan(den, n, noise, cond)) is not None}
    roll = [n for n in steps if n in plans and rollout_fittable(plans[n])]
    rest = [n for n in steps if n not in roll]  # no probe plan there: the uniform grid
    fits = {}
    ridge = FAST_RIDGE if ridge is None else ridge
    try:
        if roll:  # on the probe plan's own grid, fitted on its own rollout
            ref = plan_mse = None
            if traj is not None:  # on the probe's draws: its solve, and its plans' errors
                ref = probe_reference(den, traj, [plans[n].ts for n in roll])
                plan_mse = {n: probe_plan(den, n, tuple(noise.shape[1:]), device=noise.device,
                                          dtype=noise.dtype, cond=cond).draw_mse for n in roll}
            fits.update(fast_fit_solvers(den, roll, noise, reference_steps=reference_steps,
                                         batch_size=batch_size, plans=plans, cond=cond,
                                         objective="rollout", reference=ref,
                                         plan_mse=plan_mse, polish=polish, ridge=ridge))
        if rest:
            fits.update(fast_fit_solvers(den, rest, noise, reference_steps=reference_steps,
                                         batch_size=batch_size, plans=plans, cond=cond,
                                         polish=polish, ridge=ridge))
    except ValueError as e:  # a grid not nested in the reference grid
        raise ParameterError(f"{param('fast')}: {e}") from None
    done = []
    for fit in (fits[n] for n in steps):
        e_probe = fit.extra.get("rmse_probe")
        if e_probe is not None and fit.rmse is not None and not fit.rmse < e_probe:
            removed = store.remove("bespoke", fit.steps)
            say(f"{describe_fast_fit(fit)}; not better than the default call's probe plan "
                f"({e_probe:.4g} on the same draws): not stored"
                + (", the stored one removed" if removed else "")
                + f"; `difflab sample --steps {fit.steps}` runs the probe's plan")
            continue
        fit = fit.with_(seed=PROBE_SEED if seed is None else seed)
        path = store.save(fit)
        say(f"{describe_fast_fit(fit)} -> {path}")
        done.append((fit, path))
    return done


# --- command line ---------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    """Add ``tune-grid`` to the ``difflab`` command line."""
    p = subparsers.add_parser(
        "tune-grid", formatter_class=HelpFormatter,
        help="fit a sampler's time grid to a checkpoint (used by sample/eval afterwards)",
        description="Fit the time grid of a deterministic sampler at a step count to a "
                    "checkpoint's network: minimise the RMSE to an accurate ODE solution from "
                    "the same calibration noise (LD3 objective, Nelder-Mead), then the times "
                    "the network is told at each grid point (LD3's decoupled evaluation "
                    "times). Writes CKPT/fits.json; `difflab sample` and `difflab eval` then "
                    "use the grid for that sampler and step count. --sampler bespoke also fits "
                    "the solver's coefficients on the --base solver's grid (Shaul et al. 2024; "
                    "`difflab sample --sampler bespoke` then uses them).")
    p.add_argument("checkpoint", help="checkpoint directory (or the run directory holding it), "
                                      "or a local diffusers model / pipeline folder (fits go "
                                      "to FOLDER.difflab/, beside it)")
    p.add_argument("--sampler", default=None,
                   help="deterministic sampler name (default unipc; bespoke with --fast)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="step counts (one grid each; default 10, with --fast 5 10 20)")
    p.add_argument("--count", type=int, default=None,
                   help=f"calibration samples (default 64; with --fast {FAST_CALIBRATION}: "
                        "fitted in two halves, each scored on the other, then on all)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the calibration noise (keep it apart from sampling seeds; "
                        "default 1000; with --fast and no --count or --reference-steps: the "
                        "default call's probe draws, whose fine solve is the reference)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="dpm_solver_3 steps of the reference solution (default 100; with "
                        "--fast dpmpp_3m steps on the probe's fine grid, plus the plans' "
                        "points, default 240)")
    p.add_argument("--max-evals", type=int, default=None,
                   help="sampler runs per grid (default: 40 x steps, at least 200)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per network batch")
    p.add_argument("--no-ema", action="store_true", help="tune for the raw weights")
    p.add_argument("--no-eval-times", action="store_true",
                   help="fit the grid only, not the decoupled times the network is told")
    p.add_argument("--eval-times-only", action="store_true",
                   help="keep the grid already stored and fit only its evaluation times "
                        "(e.g. a grid tuned on a GPU with more calibration images)")
    p.add_argument("--base", default="unipc",
                   help="--sampler bespoke: the solver whose grid and coefficients it starts "
                        "from")
    p.add_argument("--start", default="tuned",
                   help="--sampler bespoke: the grid the fit starts from: tuned (the --base "
                        "solver's tuned grid, tuned first if none is stored), auto "
                        "(fit from the adaptive and the uniform grid, keep the better: no "
                        "grid tuning, what `difflab train` with train.fit_steps does), "
                        "adaptive (the grid equidistributing the reference trajectories' "
                        "local error) or a spacing name (unipc as --base)")
    p.add_argument("--max-iter", type=int, default=100,
                   help="--sampler bespoke: L-BFGS iterations of the coefficient fit")
    p.add_argument("--fast", action="store_true",
                   help="fit bespoke solvers for all --steps from one reference solve by "
                        "ridge least squares on the default call's probe plans, row by row "
                        "on their own rollout (about a minute on a CPU; no grid tuning, no "
                        "L-BFGS): difflab.fitting.fast_fit_solvers")
    p.add_argument("--polish", type=int, default=0, metavar="N",
                   help="with --fast: N L-BFGS iterations of the full objective (the error "
                        "at x(0), through every network call) from each fast fit, made where "
                        "the polish scores better on held-out halves of the draws; 4-6x "
                        "slower (a backward pass per call and iteration), better fits on most "
                        "models measured, worse on some (docs/fitting.md)")
    p.add_argument("--ridge", type=float, default=None, metavar="LAMBDA",
                   help="with --fast: the rows' ridge weight toward the plan's solver, relative "
                        "to each row's Gram diagonal (default 1e-3; larger keeps the fit nearer "
                        "the plan: docs/results/byom_defaults.md, session 23)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a fit already stored beside a diffusers folder (default: "
                        "refuse)")
    p.add_argument("--cfg", "--guidance", dest="cfg", type=float, default=None, metavar="W",
                   help="a class-conditional checkpoint: fit its sampling with classifier-free "
                        "guidance of weight W (w-convention, diffusers' guidance_scale = 1 + W; "
                        "draw i of class i mod K; default 0: the conditional model unguided); "
                        "`difflab sample --cfg W` then runs the fit")
    p.add_argument("--cfg-rescale", dest="cfg_rescale", type=float, default=0.0, metavar="PHI",
                   help="with --cfg: guidance rescale phi in [0, 1] (Lin et al. 2024)")
    p.add_argument("--prompts-file", default=None, metavar="F",
                   help="a text-conditioned model (a text-to-image run, a diffusers pipeline): "
                        "the calibration prompts, one per line (draw i takes prompt i mod P); "
                        "the fit serves any prompt at its --cfg")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_tune_grid)


def cmd_tune_grid(args: argparse.Namespace) -> int:
    from difflab.commands.t2i import read_prompts

    set_threads(args.threads)
    sampler = args.sampler or ("bespoke" if args.fast else "unipc")
    steps = args.steps or ([5, 10, 20] if args.fast else [10])
    reference_steps = (args.reference_steps if args.reference_steps is not None
                       else 240 if args.fast else 100)
    count = args.count if args.count is not None else FAST_CALIBRATION if args.fast else 64
    probe_draws = (args.fast and args.seed is None and args.count is None
                   and args.reference_steps is None)
    seed = None if probe_draws else 1000 if args.seed is None else args.seed
    tune_checkpoint(args.checkpoint, sampler=sampler, steps=steps, count=count,
                    seed=seed, reference_steps=reference_steps,
                    max_evals=args.max_evals, batch_size=args.batch_size, ema=not args.no_ema,
                    eval_times=not args.no_eval_times, eval_times_only=args.eval_times_only,
                    base=args.base, start=args.start, max_iter=args.max_iter,
                    device=args.device, log=print, overwrite=args.overwrite, fast=args.fast,
                    cfg=args.cfg, cfg_rescale=args.cfg_rescale,
                    prompts=None if args.prompts_file is None else read_prompts(
                        args.prompts_file), polish=args.polish, ridge=args.ridge)
    return 0
