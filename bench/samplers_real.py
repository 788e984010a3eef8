"""Samplers on trained image models: difflab vs diffusers schedulers, same network, same noise.

    python bench/samplers_real.py runs/bench_train3/difflab/checkpoint --out REPORT.md
    python bench/samplers_real.py runs/fm_base runs/byom_flow runs/byom_edm \\
        diffusers:runs/byom_eps/export --seed 1 --tune '' --json RESULTS.json

prints the summary; ``--out`` writes the whole report (a file it is told to write: session 26
found the old default, docs/results/samplers_real.md, replaced by every run made for another
purpose), ``--json`` also stores every number.

Mixtures give exact answers (bench/samplers.py); this checks that the defaults also serve real
networks. A model is a difflab checkpoint (or run directory), or ``diffusers:PATH``: a local
diffusers model / pipeline folder opened by ``difflab.from_diffusers`` (so the interop path is
exercised). The reference is a ``--ref-steps``-step dpmpp_3m solution of the
probability-flow ODE of that network from the same noise on the probe's fine grid (the density
sum of the uniform, log-SNR and Karras grids; checked against half as many steps); error = RMSE
in pixel units ([-1, 1]) to it. (Until 2026-12-06 it was dpm_solver_3 on a log-sigma grid,
whose noise-prediction form converges slowly on rectified flow: 500 steps were 0.0020 RMSE
from the converged solution there, docs/results/byom_defaults.md, session 16.) diffusers
schedulers get the network's own schedule (``trained_betas`` and the matching
``prediction_type`` for a discrete VP model; the flow-matching schedulers for a rectified-flow
model; the EDM schedulers for an EDM model) and call the network at the timesteps they choose
(fractional ones too), exactly as a diffusers pipeline would.

Rows: the default call ``difflab.sample(den, noise, steps=n)`` (what ``choose`` / the default
grid rule pick for this model), the previous default (dpmpp_2m on log-SNR spacing), every
deterministic difflab solver on its own spacing, the main solvers on every other spacing, and
every diffusers configuration that applies. The summary gives, per model and NFE, the ratio of
the default call's error to diffusers' best configuration's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from difflab import samplers as S
from difflab.denoiser import Condition
from difflab.fitting import load_fit, load_fits
from difflab.fitting.fast import _draw_mse
from difflab.fitting.store import guidance_tag
from difflab.samplers.probe import FAMILIES, FINE_GRID_ENDS, fine_grid, reference_final
from difflab.train.checkpoint import load_denoiser, read_config, resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from samplers import rmse, steps_for  # noqa: E402

NFES = (5, 10, 20)
NOTES = (
    'Notes: rows marked "failed" raised inside diffusers\' own `step()` (e.g. IndexError in '
    "DPMSolverMultistep, AssertionError in UniPC when `use_karras_sigmas` or `use_lu_lambdas` "
    "is combined with a cosine model's `trained_betas`, betas clipped at 0.999); they are "
    "reported, not hidden. Compare the rows, not single cells: the winner is decided by the "
    "time grid more than by the solver."
)
# deterministic difflab solvers on their own default spacing
DIFFLAB = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun", "dpm_solver_2",
           "dpm_solver_3")
# the main solvers on the other grids: "uniform" is uniform in t (diffusers' "trailing" on a
# discrete schedule, linspace sigmas on rectified flow, the Karras grid through 0 on EDM)
VARIANT_SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc")
VARIANT_SPACINGS = ("log_snr", "uniform", "karras", "trailing")  # a grid equal to one already
# run for that solver (trailing = uniform for T = 1000 and these step counts) is not rerun
PREVIOUS_DEFAULT = ("dpmpp_2m", "log_snr")  # the default call before issue #17 item 4


class NetModel:
    """The denoiser's network as diffusers calls it: model(x, timestep) -> raw output. With
    a condition ``cond`` (class labels, or a prompt's Condition whose null is the empty
    prompt) and a guidance weight ``w``, classifier-free guidance as diffusers' pipelines
    apply it to the raw output, out_null + (1 + w) (out_c - out_null) (guidance_scale 1 + w;
    for an output linear in x0 and eps at fixed x and t, as eps, v and x0 are, the same
    combination as difflab's ClassifierFreeGuidance), both halves in one call."""

    def __init__(self, den, cond=None, w: float = 0.0):
        self.net, self.calls, self.cond, self.w = den.net, 0, Condition.of(cond), w

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        t = torch.full((x.shape[0],), float(timestep), dtype=torch.float32)
        if self.cond is None:
            return self.net(x.float(), t).to(x.dtype)
        cond = self.cond[: x.shape[0]]
        both = Condition.cat([cond, cond.null()]).kwargs()
        out = self.net(torch.cat([x, x]).float(), torch.cat([t, t]), **both).to(x.dtype)
        c, u = out.chunk(2)
        return u + (1 + self.w) * (c - u)


def reference(den, noise: torch.Tensor, steps: int, cond=None,
              end: str = "trained") -> torch.Tensor:
    """dpmpp_3m (data prediction, 3rd order) on the probe's fine grid of ``steps`` steps: the
    density sum of the uniform, log-SNR and Karras grids (``difflab.samplers.probe.fine_grid``),
    dense at both ends, so it converges on VP, VE and rectified-flow models alike.

    ``end``: where the probability-flow solution ends on a discrete-time model (T trained
    steps, times (i + 1) / T). ``"zero"`` integrates the ODE on to t = 0, calling the network
    below its first trained time 1 / T (index 0) where it was never trained; ``"trained"``
    stops the ODE at t = 1 / T and returns the data prediction there (what diffusers'
    schedulers converge to: their last step goes from the first trained index to sigma = 0
    with x0_hat, the DDPM chain's last step without noise). The "zero" reading's last segment
    is under-resolved: the fine grid keeps 3 points below 1 / T at any step count (on a
    Gaussian test case it lands 9 % of the gap between the readings short at 960 steps, where
    "trained" converges at third order: tests/test_bench_stats.py). The readings differ by
    about 1e-3 RMSE on the latent model (session 24, docs/results/byom_defaults.md). A
    continuous-time schedule has one reading."""
    ts = fine_grid(den.schedule, max(1, round(steps / len(FAMILIES))), end=end)
    return S.sample(den, noise, "dpmpp_3m", grid=ts, cond=cond,
                    **reference_final(den.schedule, ts, "dpmpp_3m"))


def cached_reference(args, spec: str, den, noise: torch.Tensor, steps: int,
                     cond=None, draws: str | None = None) -> torch.Tensor:
    """:func:`reference`, read from / written to ``--ref-cache`` when one is given (a file per
    model, draws (default: seed and test size), step count and guidance)."""
    end = getattr(args, "ref_end", "trained")  # scripts that reuse this without the option
    if not args.ref_cache:
        return reference(den, noise, steps, cond, end)
    name = "".join(c if c.isalnum() else "_" for c in spec)
    cfg = getattr(args, "cfg", None)  # scripts that reuse this without guidance
    tag = f"_cfg{cfg:g}" if cfg is not None else ""
    tag += "" if end == "zero" or den.schedule.num_steps is None else f"_end{end}"
    draws = draws or f"seed{args.seed}_n{args.n}"
    path = Path(args.ref_cache) / f"{name}_{draws}_fine{steps}{tag}.pt"
    if path.exists():
        return torch.load(path)
    ref = reference(den, noise, steps, cond, end)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, path)
    return ref


def diffusers_sample(cls, config: dict, model: NetModel, noise: torch.Tensor,
                     nfe: int) -> tuple[torch.Tensor, int]:
    """Run a scheduler with the largest step count whose NFE is <= nfe (as a pipeline does:
    noise * init_noise_sigma, scale_model_input where the scheduler has one, step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best = None
        for steps in range(1, nfe + 1):
            sched = cls(**config)
            sched.set_timesteps(steps)
            if len(sched.timesteps) <= nfe:
                best = steps
        sched = cls(**config)
        sched.set_timesteps(best)
        x = noise * getattr(sched, "init_noise_sigma", 1.0)  # flow schedulers: none
        scale = getattr(sched, "scale_model_input", lambda x, t: x)
        model.calls = 0
        for t in sched.timesteps:
            out = model(scale(x, t), t)
            x = sched.step(out, t, x).prev_sample
    return x, model.calls


def family(den) -> str:
    """vp (discrete/continuous VP, eps/v/x0), flow (rectified flow) or edm (VE)."""
    kind = den.schedule.config().get("type")
    if kind == "rectified_flow":
        return "flow"
    if kind == "edm":
        return "edm"
    return "vp"


def diffusers_configs(den) -> list[tuple[str, object, dict]]:
    """Every diffusers scheduler configuration that applies to this model's schedule and
    prediction (deterministic ones)."""
    import diffusers as D

    fam, pred = family(den), den.parameterization.name
    cfgs: list[tuple[str, object, dict]] = []
    if fam == "flow":
        for shift in (1.0, 3.0):  # 1: the model's own schedule; 3: SD3's default shift
            base = dict(num_train_timesteps=1000, shift=shift)
            tag = f" shift={shift:g}"
            cfgs.append(("FlowMatchEuler" + tag, D.FlowMatchEulerDiscreteScheduler, base))
            flow = dict(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=shift,
                        prediction_type="flow_prediction", final_sigmas_type="zero")
            for order in ((2, 3) if shift == 1.0 else (2,)):
                cfgs.append((f"UniPC-{order} flow_sigmas" + tag, D.UniPCMultistepScheduler,
                             dict(flow, solver_order=order)))
                cfgs.append((f"DPM++{order}M flow_sigmas" + tag, D.DPMSolverMultistepScheduler,
                             dict(flow, solver_order=order)))
            if shift == 1.0:
                for kw in ("use_karras_sigmas", "use_exponential_sigmas"):
                    cfgs.append((f"FlowMatchEuler {kw.split('_')[1]}" + tag,
                                 D.FlowMatchEulerDiscreteScheduler, {**base, kw: True}))
                cfgs.append(("FlowMatchHeun" + tag, D.FlowMatchHeunDiscreteScheduler, base))
        return cfgs
    if fam == "edm":
        sd = getattr(den.parameterization, "sigma_data", 0.5)
        sch = den.schedule
        base = dict(sigma_min=sch.sigma_min, sigma_max=sch.sigma_max, sigma_data=sd,
                    rho=sch.rho, prediction_type="epsilon", final_sigmas_type="zero")
        for ss in ("karras", "exponential"):
            cfgs.append((f"EDMEuler {ss}", D.EDMEulerScheduler, dict(base, sigma_schedule=ss)))
            for order in (2, 3):
                cfgs.append((f"EDM DPM++{order}M {ss}", D.EDMDPMSolverMultistepScheduler,
                             dict(base, sigma_schedule=ss, solver_order=order)))
        return cfgs
    ptype = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[pred]
    base = dict(num_train_timesteps=len(den.schedule.betas),
                trained_betas=den.schedule.betas.tolist(), prediction_type=ptype)
    sc = den.schedule.config()
    if sc.get("zero_terminal_snr"):  # as a diffusers user sets it up (alpha_bar_T = 2^-24)
        base = dict(num_train_timesteps=sc["timesteps"], beta_start=sc["beta_start"],
                    beta_end=sc["beta_end"], beta_schedule=sc["type"],
                    rescale_betas_zero_snr=True, prediction_type=ptype)
    # (DDIM "leading", Euler karras and DPM++3M linspace were never best in earlier runs and
    # are left out to keep the run short on a shared 2-core CPU)
    cfgs = [("DDIM trailing clip_sample=False", D.DDIMScheduler,
             dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True))]
    for order in (2, 3):
        for tag, kw in (("linspace", {}), ("trailing", {"timestep_spacing": "trailing"}),
                        ("karras", {"use_karras_sigmas": True}),
                        ("lambdas", {"use_lu_lambdas": True})):
            if order == 3 and tag == "linspace":
                continue
            cfgs.append((f"DPM++{order}M {tag}", D.DPMSolverMultistepScheduler,
                         dict(solver_order=order, final_sigmas_type="zero", **kw)))
        for tag, kw in (("trailing", {"timestep_spacing": "trailing"}),
                        ("karras", {"use_karras_sigmas": True})):
            cfgs.append((f"UniPC-{order} {tag}", D.UniPCMultistepScheduler,
                         dict(solver_order=order, final_sigmas_type="zero", **kw)))
    cfgs.append(("Euler trailing", D.EulerDiscreteScheduler,
                 dict(timestep_spacing="trailing", final_sigmas_type="zero")))
    return [(n, cls, {**base, **kw}) for n, cls, kw in cfgs]


def load_model(spec: str):
    """(denoiser, description, (C, H, W), checkpoint dir or None, text encoder or None) of a
    model argument (a text-to-image checkpoint: its latent denoiser and text encoder)."""
    if spec.startswith("diffusers:"):
        import difflab
        from difflab.interop.diffusers import _read_json

        path = Path(spec.split(":", 1)[1])
        den = difflab.from_diffusers(path)
        mc = _read_json(path / "config.json") if (path / "config.json").exists() else {}
        size = mc.get("sample_size", 32)
        size = size if isinstance(size, int) else size[0]
        shape = (mc.get("in_channels", 1), size, size)
        desc = (f"diffusers folder `{path}` ({mc.get('_class_name')}) opened by "
                "`difflab.from_diffusers`")
        return den, desc, shape, None, None
    if read_config(spec).get("kind") == "text_to_image":  # the latent denoiser
        from difflab.train.t2i import load_text_to_image

        m, _ = load_text_to_image(spec)
        return (m.denoiser, f"difflab text-to-image checkpoint `{spec}` (latents "
                f"{'x'.join(map(str, m.latent_shape))}, its autoencoder's)", m.latent_shape,
                resolve(spec), m.text_encoder)
    den, cfg = load_denoiser(spec)
    c, r = cfg["data"]["channels"], cfg["data"]["resolution"]
    return den, f"difflab checkpoint `{spec}`", (c, r, r), resolve(spec), None


def test_guidance(den, encoder, n: int, cfg: float | None, spec: str) -> tuple:
    """(denoiser, condition) the test draws are sampled with: with guidance weight ``cfg``,
    classifier-free guidance, draw i prompted with :func:`prompt_condition`'s prompt i (a
    text-to-image model) or of class i mod K; without, the model as it is and no condition."""
    text = prompt_condition(encoder, n)
    if text is not None and cfg is None:
        raise SystemExit(f"{spec} is a text-to-image model: give --cfg W (0: unguided)")
    if cfg is None:
        return den, None
    from difflab.guidance import classifier_free

    classes = getattr(den.net, "num_classes", None)
    if not classes and text is None:
        raise SystemExit(f"--cfg needs a class-conditional or text-to-image model; {spec} "
                         "is neither")
    return classifier_free(den, cfg), text if text is not None else torch.arange(n) % classes


def setup_test_draws(args) -> tuple:
    """(denoiser in eval mode, image shape, checkpoint dir or None, test noise, condition) of
    ``args.model`` with ``args.threads`` torch threads and ``args.n`` draws of ``args.seed``,
    guided as :func:`test_guidance` says where the script has a ``--cfg`` and it is given:
    the set-up the fit benches (fit_bound.py, fit_test_error.py, fit_end_aware.py,
    fit_polish.py) and plan_variants.py share."""
    torch.set_num_threads(args.threads)
    den, _, shape, ckpt, encoder = load_model(args.model)
    den.eval()
    noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    den, cond = test_guidance(den, encoder, args.n, getattr(args, "cfg", None), args.model)
    return den, shape, ckpt, noise, cond


def prompt_condition(encoder, n: int):
    """The Condition of ``n`` draws for a text-to-image model's text ``encoder`` (prompt i
    of the canvas data's 180 captions taken 37 apart, so classes, sizes and places all occur;
    the empty prompt as the null), or None without an encoder."""
    if encoder is None:
        return None
    from difflab.data.canvas import all_captions

    captions = all_captions()
    prompts = [captions[(37 * i) % len(captions)] for i in range(n)]
    with torch.no_grad():
        return encoder.condition(prompts)


def draw_mse(x: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Each draw's mean squared error to the reference (inf where it is not finite): kept per
    draw so that ratios can be given with their sampling interval (:func:`ratio_interval`)
    and runs on other seeds pooled (``bench/byom_summary.py``)."""
    return [v if math.isfinite(v) else math.inf for v in _draw_mse(x, ref).tolist()]


def ratio_interval(a: list[float], b: list[float], reps: int = 2000, level: float = 0.9,
                   seed: int = 0) -> tuple[float, float]:
    """The paired bootstrap interval (``level``) of the RMSE ratio sqrt(mean a / mean b) of two
    samplers' per-draw squared errors on the same draws: draws resampled with replacement,
    both samplers' errors on each. At 20 calls a few draws can hold most of a gap (session 21:
    one draw in 128 held half of one), so a ratio near 1 from 32 draws may be either side."""
    ta, tb = (torch.tensor(v, dtype=torch.float64) for v in (a, b))
    if len(ta) != len(tb) or len(ta) < 2 or not (ta.isfinite().all() and tb.isfinite().all()):
        return math.nan, math.nan
    idx = torch.randint(0, len(ta), (reps, len(ta)), generator=torch.Generator().manual_seed(seed))
    r = (ta[idx].mean(1) / tb[idx].mean(1).clamp_min(1e-300)).sqrt()
    lo, hi = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                            dtype=torch.float64)).tolist()
    return lo, hi


PROBE_CPU: dict[int, float] = {}  # CPU seconds of the default call's probe, per step count


def default_label(den, noise: torch.Tensor, cond=None) -> str:
    """What the default call picks for this model at each step count: the probe's plan
    (difflab.samplers.probe), or the fixed default where the probe does not run."""
    parts = []
    for n in NFES:
        t0 = time.process_time()
        plan = S.default_plan(den, n, noise, cond)
        PROBE_CPU[n] = time.process_time() - t0
        if plan is None:
            parts.append(f"{n}: {S.choose(None, None, den.parameterization)}")
            continue
        choice = S.probe_plan(den, n, tuple(noise.shape[1:]), dtype=noise.dtype, cond=cond)
        parts.append(f"{n}: {plan.sampler} final={plan.final} on {choice.grid_name}")
    return "; ".join(parts)


def stored_fits(spec: str, ckpt, guidance: str | None = None) -> dict:
    """The fits stored for a model argument and ``guidance`` (``cfg=W``: what ``difflab
    tune-grid --cfg W`` stores): with the checkpoint, or beside a diffusers folder
    (``FOLDER.difflab/``, where ``difflab tune-grid`` puts them and ``difflab sample`` reads
    them)."""
    if spec.startswith("diffusers:"):
        from difflab.commands.model import fit_store

        store, weights = fit_store(spec.split(":", 1)[1])
        return load_fits(store, weights=weights, guidance=guidance) if store.is_dir() else {}
    return load_fits(ckpt, guidance=guidance) if ckpt is not None else {}


def run_model(args, spec: str) -> dict:
    den, desc, shape, ckpt, encoder = load_model(spec)
    den.eval()
    noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    if args.cfg is not None and (args.tune or args.grids or args.figure):
        raise SystemExit("--cfg runs with --tune '' and no --grids or --figure")
    unguided = den  # class i mod K (or prompt i) for draw i, guidance of weight w
    den, cond = test_guidance(den, encoder, args.n, args.cfg, spec)
    model = NetModel(unguided, cond, args.cfg or 0.0)
    if args.cfg is not None:
        desc += f", classifier-free guidance w = {args.cfg:g} (diffusers' scale {1 + args.cfg:g})"
    with torch.no_grad():
        ref = cached_reference(args, spec, den, noise, args.ref_steps, cond)
        ref_half = cached_reference(args, spec, den, noise, args.ref_steps // 2, cond)
    ref_err = rmse(ref, ref_half)
    print(spec, "reference self-error", ref_err, flush=True)
    fits = stored_fits(spec, ckpt, None if args.cfg is None else guidance_tag(args.cfg))
    fitted = sorted(fits)
    auto = ("default call `difflab.sample(den, noise, steps=n)`: "
            + default_label(den, noise, cond))
    rows_dl: dict[str, dict[int, tuple[float, int]]] = {auto: {}}

    done: dict[tuple, str] = {}  # (sampler, grid) -> the row that ran it

    def run(label, name, spacing=None):
        grids = tuple(tuple(S.timesteps(den.schedule, steps_for(name, n),
                                        spacing or S.get(name).spacing).tolist())
                      for n in NFES)
        if (name, grids) in done:  # the same solver on the same grids: the same numbers
            rows_dl[label] = rows_dl[done[name, grids]]
            print(label, "= row", done[name, grids], flush=True)
            return
        done[name, grids] = label
        rows_dl[label] = {}
        for nfe in NFES:
            steps = steps_for(name, nfe)
            with torch.no_grad():
                x = S.sample(den, noise, name, steps, spacing=spacing, cond=cond)
            err = rmse(x, ref) if torch.isfinite(x).all() else math.inf
            rows_dl[label][nfe] = (err, S.get(name).nfe(steps))
        print(label, rows_dl[label], flush=True)

    per_draw: dict[str, dict[str, dict[str, list[float]]]] = {"difflab": {auto: {}},
                                                              "diffusers": {}}
    for nfe in NFES:  # every sampler the default call picks makes one network call per step
        with torch.no_grad():
            x = S.sample(den, noise, steps=nfe, cond=cond)
        rows_dl[auto][nfe] = (rmse(x, ref) if torch.isfinite(x).all() else math.inf, nfe)
        per_draw["difflab"][auto][str(nfe)] = draw_mse(x, ref)
    print(auto, rows_dl[auto], flush=True)
    before = f"previous default: {PREVIOUS_DEFAULT[0]} spacing={PREVIOUS_DEFAULT[1]}"
    run(before, *PREVIOUS_DEFAULT)
    if fitted:
        label = f"auto with the fitted solvers stored at {fitted} steps"
        rows_dl[label], per_draw["difflab"][label] = {}, {}
        for nfe in NFES:
            with torch.no_grad():
                x = S.sample(den, noise, steps=nfe, fit=fits.get(nfe), cond=cond)
            rows_dl[label][nfe] = (rmse(x, ref), S.get(S.choose(None, fits.get(nfe))).nfe(nfe))
            per_draw["difflab"][label][str(nfe)] = draw_mse(x, ref)
    for name in (args.solvers.split(",") if args.solvers else DIFFLAB):
        run(f"{name} (own spacing {S.get(name).spacing})", name)
    discrete = den.schedule.num_steps is not None
    if args.variants:  # "name:spacing,..."
        variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    else:
        variants = [(n, sp) for n in VARIANT_SOLVERS for sp in VARIANT_SPACINGS]
    for name, spacing in variants:
        if spacing == S.get(name).spacing or (spacing == "trailing" and not discrete):
            continue
        run(f"{name} spacing={spacing}", name, spacing)
    tuned = set()
    if args.tune:
        from difflab.fitting import tune_grid

        cal = torch.randn(args.tune_n, *shape, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            ref_cal = reference(den, cal, args.ref_steps, end=args.ref_end)
        for name in args.tune.split(","):
            label = f"{name} tuned grid ({args.tune_n} calibration images)"
            tuned.add(label)
            rows_dl[label] = {}
            for nfe in NFES:
                steps = steps_for(name, nfe)
                tg = tune_grid(den, name, steps, cal, reference=ref_cal,
                               max_evals=args.tune_evals)
                x = S.sample(den, noise, name, grid=tg.ts)
                rows_dl[label][nfe] = (rmse(x, ref), S.get(name).nfe(steps))
                print(label, nfe, rows_dl[label][nfe], flush=True)
    if args.grids and ckpt is not None:
        for name in args.grids.split(","):
            for nfe in NFES:
                steps = steps_for(name, nfe)
                fit = load_fit(ckpt, name, steps)
                if fit is None:
                    continue
                label = f"{name}, fits.json ({fit.calibration} calibration images)"
                tuned.add(label)
                x = S.sample(den, noise, name, fit=fit)
                rows_dl.setdefault(label, {n: (math.nan, 0) for n in NFES})
                rows_dl[label][nfe] = (rmse(x, ref), S.get(name).nfe(steps))
    rows_df: dict[str, dict[int, tuple[float, int]]] = {}
    keep = [k for k in args.configs.split(",") if k]
    for label, cls, config in diffusers_configs(den):
        if keep and label not in keep:
            continue
        rows_df[label], per_draw["diffusers"][label] = {}, {}
        for nfe in NFES:
            try:
                x, calls = diffusers_sample(cls, config, model, noise, nfe)
            except (IndexError, ValueError, RuntimeError, AssertionError, TypeError) as e:
                print(f"{label} at NFE {nfe} failed in diffusers: {e!r}", flush=True)
                rows_df[label][nfe] = (math.inf, 0)
                continue
            rows_df[label][nfe] = (rmse(x, ref) if torch.isfinite(x).all() else math.inf, calls)
            per_draw["diffusers"][label][str(nfe)] = draw_mse(x, ref)
        print(label, rows_df[label], flush=True)
    if args.figure:
        from difflab.train.monitor import save_grid

        shown = [ref[:8]]
        for nfe in NFES:
            shown += [S.sample(den, noise[:8], *PREVIOUS_DEFAULT[:1], nfe,
                               spacing=PREVIOUS_DEFAULT[1]), S.sample(den, noise[:8], steps=nfe)]
        save_grid(torch.cat(shown), args.figure, nrow=8, scale=2)
    return {"spec": spec, "n": args.n, "seed": args.seed, "cfg": args.cfg,
            "desc": desc, "shape": list(shape), "family": family(den),
            "prediction": den.parameterization.name,
            "schedule": den.schedule.config().get("type"), "ref_err": ref_err,
            "ref_end": args.ref_end,
            "auto": auto, "before": before, "tuned": sorted(tuned),
            "probe_cpu_s": {str(n): round(v, 2) for n, v in PROBE_CPU.items()},
            "difflab": {k: {str(n): list(v) for n, v in r.items()} for k, r in rows_dl.items()},
            "diffusers": {k: {str(n): list(v) for n, v in r.items()} for k, r in rows_df.items()},
            "per_draw": per_draw}


def table(rows) -> list[str]:
    out = ["| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
           "|---|" + "---|" * len(NFES)]
    for name, row in rows.items():
        cells = []
        for n in NFES:
            e, k = row[str(n)]
            cells.append("-" if math.isnan(e) else "failed (diffusers raised)" if k == 0 else
                         "diverged (inf/nan)" if not math.isfinite(e) else
                         f"{e:.3e}" + (f" ({k})" if k != n else ""))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def best(rows: dict, nfe: int, skip=()) -> tuple[float, str]:
    keys = [k for k in rows if k not in skip]
    name = min(keys, key=lambda k: math.inf if math.isnan(rows[k][str(nfe)][0])
               else rows[k][str(nfe)][0])
    return rows[name][str(nfe)][0], name


def render(args, results: list[dict]) -> list[str]:
    lines = [
        f"# {args.title}", "",
        f"Command: `nice -n 19 env OMP_NUM_THREADS=1 python bench/samplers_real.py "
        f"{shlex.join(sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: 2-core CPU (shared), {platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} torch thread(s)", "",
        f"Per model: {args.n} test noises from seed {args.seed}. Reference: dpmpp_3m, "
        f"{args.ref_steps} steps of the probe's fine grid, on a discrete-time model "
        + ("stopped at its first trained time 1 / T with x0_hat there (`--ref-end trained`)"
           if args.ref_end == "trained" else "on to t = 0 below 1 / T (`--ref-end zero`)")
        + "; its own error is estimated by its "
        f"RMSE to the {args.ref_steps // 2}-step solution (below, per model). Error = pixel "
        "RMSE to the reference ([-1, 1] scale). A cell `e (n)` used n network calls. The "
        "interval of a ratio is a paired bootstrap over the test draws (`ratio_interval`; "
        "diffusers' best chosen on all of them).", "",
        "## Summary: the default call vs diffusers' best configuration", "",
        "| model | NFE | default now | previous default | diffusers best | ratio now "
        "[90 % interval] | ratio before |", "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for nfe in NFES:
            en = r["difflab"][r["auto"]][str(nfe)][0]
            eb = r["difflab"][r["before"]][str(nfe)][0]
            ed, nd = best(r["diffusers"], nfe)
            pd = r["per_draw"]
            lo, hi = ratio_interval(pd["difflab"][r["auto"]][str(nfe)],
                                    pd["diffusers"][nd].get(str(nfe), []))
            lines.append(f"| {r['spec']} | {nfe} | {en:.3e} | {eb:.3e} | {ed:.3e} ({nd}) "
                         f"| {en / ed:.2f} [{lo:.2f}, {hi:.2f}] | {eb / ed:.2f} |")
    for r in results:
        lines += [
            "", f"## {r['spec']}", "",
            f"{r['desc']}: {r['prediction']}-prediction, schedule {r['schedule']}, images "
            f"{'x'.join(map(str, r['shape']))}. Reference self-error "
            f"(RMSE to the half-step solution): {r['ref_err']:.2e}.", "",
            "### difflab", "", *table(r["difflab"]), "",
            "### diffusers (same network and noise)", "", *table(r["diffusers"]), "",
            "### Best of each", "",
            "| NFE | default call | difflab best fixed rule | diffusers best | ratio default "
            "| ratio best fixed |", "|---|---|---|---|---|---|"]
        for nfe in NFES:
            en = r["difflab"][r["auto"]][str(nfe)][0]
            ef, nf = best(r["difflab"], nfe, skip=r["tuned"])
            ed, nd = best(r["diffusers"], nfe)
            lines.append(f"| {nfe} | {en:.3e} | {ef:.3e} ({nf}) | {ed:.3e} ({nd}) "
                         f"| {en / ed:.2f} | {ef / ed:.2f} |")
    return lines + ["", NOTES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+",
                    help="difflab checkpoints / run dirs, or diffusers:FOLDER")
    ap.add_argument("--n", type=int, default=32, help="test images (batch)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="classifier-free guidance weight w of a class-conditional model "
                         "(draw i gets class i mod K; diffusers' guidance_scale = 1 + w); the "
                         "fits row runs what `difflab tune-grid --fast --cfg W` stored")
    ap.add_argument("--seed", type=int, default=0, help="seed of the test noise")
    ap.add_argument("--ref-steps", type=int, default=960)
    ap.add_argument("--ref-end", choices=FINE_GRID_ENDS, default="trained",
                    help="a discrete-time model's reference: stopped at its first trained "
                         "time with the data prediction there (trained, since session 24), or "
                         "the ODE on to t = 0 (zero, the figures before); see reference()")
    ap.add_argument("--ref-cache", default="",
                    help="a folder to keep the reference solves in (reused when present)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="",
                    help="write the whole markdown report here (e.g. docs/results/"
                         "samplers_real.md, what docs/benchmarks.md collects)")
    ap.add_argument("--json", default="", help="also write every number here")
    ap.add_argument("--solvers", default="",
                    help="difflab solvers on their own spacing (comma list; default: all "
                         "deterministic ones in DIFFLAB)")
    ap.add_argument("--variants", default="",
                    help="solver:spacing rows (comma list; default: VARIANT_SOLVERS x "
                         "VARIANT_SPACINGS)")
    ap.add_argument("--configs", default="",
                    help="diffusers configurations to run, by label (comma list; default: "
                         "every one that applies)")
    ap.add_argument("--tune", default="unipc",
                    help="samplers to fit tuned grids for (comma list; '' skips)")
    ap.add_argument("--tune-n", type=int, default=16, help="calibration images (seed 123)")
    ap.add_argument("--tune-evals", type=int, default=150, help="sampler runs per grid")
    ap.add_argument("--title", default="Samplers on trained image models")
    ap.add_argument("--grids", default="",
                    help="samplers (comma list) whose fits stored with the checkpoint "
                         "(`difflab tune-grid`, the fits `difflab sample` runs) get rows")
    ap.add_argument("--figure", default="",
                    help="PNG (first model): 8 images from the reference and, per NFE, the "
                         "previous default and the default call (rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for i, spec in enumerate(args.models):
        if i:
            args.figure = ""
        results.append(run_model(args, spec))
        if args.json:  # after each model, so a long run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
    lines = render(args, results)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + 3 * len(results)]))


if __name__ == "__main__":
    main()
