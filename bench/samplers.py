"""Samplers benchmark: difflab vs HuggingFace diffusers schedulers on exact Gaussian mixtures.

    python bench/samplers.py                    # writes docs/results/samplers.md and
                                                # docs/results/samplers_overhead.md
    python bench/samplers.py --overhead-only    # only samplers_overhead.md (a few minutes)
    python bench/samplers.py --quick            # fewer samples, no file (smoke run)

Setup: DDPM's linear schedule (T = 1000, beta 1e-4 .. 0.02), the exact mixture model
(difflab.toy.GaussianMixture) as an eps-predictor. Error = RMSE (over all coordinates of all
samples) to the exact probability-flow ODE solution from the same noise, computed by
dpm_solver_3 (a true 3rd-order singlestep solver) on a 1000-step log-SNR grid down to
sigma~ = 1e-4 and checked against 2000 steps. Each diffusers scheduler gets the same model
evaluated at the timestep it passes: integer timesteps at alpha_bar[t] exactly, fractional
ones at the sigma diffusers itself assigns them (log-sigma interpolation, the inverse of its
``_sigma_to_t``), so each scheduler sees a model consistent with its own sigmas.

Overhead: the same sampling call with a zero-cost network (returns zeros), batch 1, float32,
including grid set-up, divided by the number of network calls.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import math
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from difflab import Denoiser, schedules
from difflab import samplers as S
from difflab.toy import GaussianMixture

NFES = (5, 10, 20, 50)
FINAL_STEPS = (5, 10, 20, 50, 100, 200)
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------
# the exact model and its reference solution
# ----------------------------------------------------------------------------------------
def reference(den: Denoiser, noise: torch.Tensor, steps: int) -> torch.Tensor:
    sch = den.schedule
    log_s = torch.linspace(math.log(sch.sigma_max_ratio()), math.log(1e-4), steps,
                           dtype=torch.float64)
    t = sch.t_from_sigma_ratio(log_s.exp())
    t[0] = 1.0
    ts = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return S.get("dpm_solver_3").fn(den, noise, ts)


def benchmark_mixtures() -> dict[str, tuple[GaussianMixture, int]]:
    """The two benchmark mixtures and their numbers of test draws."""
    return {"ring (2-D, 8 components)": (GaussianMixture.ring(), 1024),
            "random (64-D, 10 components)": (GaussianMixture.random(10, 64, seed=0), 2048)}


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def steps_for(name: str, nfe: int) -> int:
    """The largest step count whose NFE is <= nfe."""
    spec = S.get(name)
    steps = max(s for s in range(1, nfe + 1) if spec.nfe(s) <= nfe)
    return steps


def difflab_errors(den, noise, ref, names, **kw) -> dict[str, dict[int, tuple[float, int]]]:
    out = {}
    for name in names:
        row = {}
        for nfe in NFES:
            steps = steps_for(name, nfe)
            x = S.sample(den, noise, name, steps, **kw)
            row[nfe] = (rmse(x, ref), S.get(name).nfe(steps))
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------
# diffusers
# ----------------------------------------------------------------------------------------
class DiffusersModel:
    """eps(x_t, timestep) of the exact mixture at diffusers' own sigma for that timestep."""

    def __init__(self, mixture: GaussianMixture, alphas_cumprod: torch.Tensor):
        self.mixture = mixture
        ab = alphas_cumprod.to(torch.float64)
        self.log_sigmas = 0.5 * torch.log((1 - ab) / ab)
        self.calls = 0

    def __call__(self, x: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        t = float(timestep)
        lo = min(int(math.floor(t)), len(self.log_sigmas) - 2)
        w = t - lo
        log_s = (1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[lo + 1]
        s_tilde = torch.exp(log_s)
        alpha = 1 / torch.sqrt(1 + s_tilde**2)
        sigma = s_tilde * alpha
        xf = x.to(torch.float64)
        x0 = self.mixture.posterior_mean(xf, alpha, sigma)
        return ((xf - alpha * x0) / sigma).to(x.dtype)


def diffusers_configs() -> list[tuple[str, object, dict]]:
    import diffusers as D

    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon")
    cfgs: list[tuple[str, object, dict]] = []
    for sp in ("leading", "trailing", "linspace"):
        cfgs.append((f"DDIM {sp} (clip_sample default)", D.DDIMScheduler, dict(
            timestep_spacing=sp, set_alpha_to_one=True)))
        cfgs.append((f"DDIM {sp} clip_sample=False", D.DDIMScheduler, dict(
            timestep_spacing=sp, set_alpha_to_one=True, clip_sample=False)))
    for order in (2, 3):
        for karras in (False, True):
            for sp in ("linspace", "leading", "trailing"):
                if karras and sp != "linspace":
                    continue  # spacing is ignored with Karras sigmas
                name = f"DPM++{order}M {'karras' if karras else sp}"
                cfgs.append((name, D.DPMSolverMultistepScheduler, dict(
                    solver_order=order, use_karras_sigmas=karras, timestep_spacing=sp,
                    final_sigmas_type="zero", algorithm_type="dpmsolver++")))
        cfgs.append((f"DPM++{order}M lambdas", D.DPMSolverMultistepScheduler, dict(
            solver_order=order, use_lu_lambdas=True, final_sigmas_type="zero")))
    for order in (2, 3):
        for sp in ("linspace", "trailing"):
            cfgs.append((f"UniPC-{order} {sp}", D.UniPCMultistepScheduler, dict(
                solver_order=order, timestep_spacing=sp, final_sigmas_type="zero")))
        cfgs.append((f"UniPC-{order} karras", D.UniPCMultistepScheduler, dict(
            solver_order=order, use_karras_sigmas=True, final_sigmas_type="zero")))
    for order in (2, 3):
        for sp in ("linspace", "trailing"):
            cfgs.append((f"DEIS-{order} {sp}", D.DEISMultistepScheduler, dict(
                solver_order=order, timestep_spacing=sp)))
    for order in (2, 3):
        for karras in (False, True):
            cfgs.append((f"DPM-Solver-{order}S{' karras' if karras else ''}",
                         D.DPMSolverSinglestepScheduler, dict(
                             solver_order=order, use_karras_sigmas=karras,
                             final_sigmas_type="zero")))
    for karras in (False, True):
        for sp in ("linspace", "trailing"):
            if karras and sp != "linspace":
                continue
            tag = "karras" if karras else sp
            cfgs.append((f"Euler {tag}", D.EulerDiscreteScheduler, dict(
                timestep_spacing=sp, use_karras_sigmas=karras, final_sigmas_type="zero")))
            cfgs.append((f"Heun {tag}", D.HeunDiscreteScheduler, dict(
                timestep_spacing=sp, use_karras_sigmas=karras)))
    return [(n, cls, {**base, **kw}) for n, cls, kw in cfgs]


def diffusers_sample(cls, config: dict, model: DiffusersModel, noise: torch.Tensor,
                     nfe: int) -> tuple[torch.Tensor, int]:
    """Run a scheduler with the largest step count whose NFE is <= nfe."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = cls(**config)
        best = None
        for steps in range(1, nfe + 1):
            sched.set_timesteps(steps)
            n = len(sched.timesteps)
            if n <= nfe:
                best = steps
        sched = cls(**config)
        sched.set_timesteps(best)
        x = noise * sched.init_noise_sigma
        model.calls = 0
        for t in sched.timesteps:
            eps = model(sched.scale_model_input(x, t), t)
            x = sched.step(eps, t, x).prev_sample
    return x, model.calls


def cross_check() -> list[str]:
    import diffusers as D

    sch, mix = schedules.linear(), GaussianMixture.ring()
    den = mix.denoiser(sch, "eps")
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = DiffusersModel(mix, sch.alphas_cumprod)
    base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                beta_schedule="linear", timestep_spacing="trailing")
    pairs = [("unipc", D.UniPCMultistepScheduler, dict(solver_order=2, final_sigmas_type="zero")),
             ("dpmpp_2m", D.DPMSolverMultistepScheduler, dict(
                 solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")),
             ("ddim", D.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True))]
    rows = []
    for steps in (6, 12):
        ts = S.timesteps(sch, steps, "trailing")
        for name, cls, kw in pairs:
            x_d, _ = diffusers_sample(cls, {**base, **kw}, model, noise, steps)
            opts = {} if name == "ddim" else {"final": "x0"}
            x_o = S.get(name).fn(den, noise, ts, **opts)
            rows.append(f"| {steps} | {name} | {cls.__name__} | "
                        f"{float((x_d - x_o).abs().max()):.1e} |")
    return rows


# ----------------------------------------------------------------------------------------
# overhead
# ----------------------------------------------------------------------------------------
class _Zero(torch.nn.Module):
    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


OVERHEAD_PAIRS = (  # difflab name, diffusers class, config
    ("ddim", "DDIMScheduler", {}),
    ("ddpm", "DDPMScheduler", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("dpm_solver_2", "DPMSolverSinglestepScheduler", {
        "solver_order": 2, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("dpm_solver_3", "DPMSolverSinglestepScheduler", {
        "solver_order": 3, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("unipc", "UniPCMultistepScheduler", {}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
)


def overhead(shape: tuple[int, ...], steps: int = 50, reps: int = 5,
             rounds: int = 5) -> list[tuple]:
    """Best-of-``rounds`` us per network call, difflab and diffusers timed alternately (the
    machine is shared: alternation keeps both under the same load)."""
    import diffusers as D

    sch = schedules.linear()
    den = Denoiser(_Zero(), sch, "eps")
    noise = torch.randn(shape)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, cls_name, kw in OVERHEAD_PAIRS:
        nfe = S.get(name).nfe(steps)
        cls = getattr(D, cls_name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", **kw)

            extra = {"generator": gen} if "generator" in inspect.signature(
                sched.step).parameters else {}

            def run(sched=sched, extra=extra):
                sched.set_timesteps(steps)
                x = noise.clone()
                for t in sched.timesteps:
                    out = torch.zeros_like(sched.scale_model_input(x, t))
                    x = sched.step(out, t, x, **extra).prev_sample
                return len(sched.timesteps)

            n_calls = run()
            ours, theirs = math.inf, math.inf
            for _ in range(rounds):
                ours = min(ours, _time(lambda n=name: S.sample(den, noise, n, steps,
                                                               generator=gen), reps) / nfe)
                theirs = min(theirs, _time(run, reps) / n_calls)
        rows.append((name, cls_name + (f" {kw}" if kw else ""), ours * 1e6, theirs * 1e6))
    return rows


# ----------------------------------------------------------------------------------------
# tuned grids
# ----------------------------------------------------------------------------------------
TUNED = ("unipc", "dpmpp_2m", "dpmpp_3m")


def tuned_section(den, noise, ref, best_theirs: dict, quick: bool = False,
                  calibration: int = 512) -> list[str]:
    """difflab.fitting.tune_grid fitted on ``calibration`` draws (seed 123, not the
    test noise), measured on the test noise like every other row: the grid alone, then with
    its decoupled evaluation times; then a bespoke solver (difflab.fitting.bespoke) fitted on
    the same draws on unipc's tuned grid."""
    from difflab.fitting import tune_grid, tune_solver

    cal = torch.randn(32 if quick else calibration, noise.shape[1],
                      generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    ref_cal = reference(den, cal, 1000)
    nfes = [k for k in NFES if k <= 20]
    out = ["### difflab with tuned grids (`difflab.fitting.tune_grid`, not defaults)", "",
           f"Fitted per sampler and NFE on {cal.shape[0]} calibration draws (seed 123, "
           "disjoint from the test noise), then run on the test noise. Cell: test RMSE of the "
           "tuned grid alone -> with its decoupled evaluation times (the default of "
           "`tune_grid` / `difflab tune-grid`), (ratio of the latter to the best diffusers "
           "setting at that NFE; calibration cost in sampler runs). Row bespoke: the "
           "coefficients of the solver fitted on unipc's tuned grid and evaluation times, "
           "same calibration draws (`difflab.fitting.tune_solver`), test RMSE (ratio; "
           "L-BFGS iterations).", "",
           "| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
           "|---" * (len(nfes) + 1) + "|"]
    per_draw = []
    for name in TUNED:
        cells, cells_b = [], []
        for k in nfes:
            tg = tune_grid(den, name, k, cal, reference=ref_cal,
                           max_evals=60 if quick else None)
            e_grid = rmse(S.sample(den, noise, name, grid=tg.ts), ref)
            x = S.sample(den, noise, name, fit=tg)
            e = rmse(x, ref)
            cells.append(f"{e_grid:.2e} -> {e:.2e} ({e / best_theirs[k][0]:.2f}; "
                         f"{tg.evals} runs)")
            print(name, k, cells[-1], flush=True)
            if name != "unipc":
                continue
            tb = tune_solver(den, k, cal, grid=tg, reference=ref_cal,
                             max_iter=20 if quick else 100)
            xb = S.sample(den, noise, "bespoke", fit=tb)
            eb = rmse(xb, ref)
            cells_b.append(f"{eb:.2e} ({eb / best_theirs[k][0]:.2f}; {tb.iterations} it)")
            print("bespoke", k, cells_b[-1], flush=True)
            per_draw.append((k, draw_errors(x, ref), draw_errors(xb, ref)))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
        if cells_b:
            out.append("| bespoke (unipc's grid) | " + " | ".join(cells_b) + " |")
    out += ["", "Where the RMSE comes from (test draws): per-draw RMSE median, the share of draws "
            "whose per-draw RMSE exceeds 0.5 (they end in another mixture component than the "
            "exact solution) and the RMSE without them, tuned unipc -> bespoke.", "",
            "| NFE | median per-draw | draws > 0.5 | RMSE without them |", "|---|---|---|---|"]
    for k, a, b in per_draw:
        out.append(f"| {k} | {a[0]:.2e} -> {b[0]:.2e} | {a[1]} -> {b[1]} | "
                   f"{a[2]:.2e} -> {b[2]:.2e} |")
    return out + [""]


def draw_errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, int, float]:
    """(median per-draw RMSE, draws with per-draw RMSE > 0.5, RMSE over the others)."""
    e = (x - ref).pow(2).mean(1).sqrt()
    ok = e <= 0.5
    return float(e.median()), int((~ok).sum()), float(e[ok].pow(2).mean().sqrt())


OVERHEAD_OUT = ROOT / "docs" / "results" / "samplers_overhead.md"


def _header(title: str) -> list[str]:
    return [
        f"# {title}", "",
        f"Command: `{shlex.join(['python', 'bench/samplers.py', *sys.argv[1:]])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: 2-core CPU (CI-class), {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}", "",
    ]


def overhead_section(quick: bool) -> list[str]:
    """The per-step overhead tables (docs/results/samplers_overhead.md)."""
    lines = _header("Sampler overhead per step: difflab vs diffusers") + [
        "Zero-cost network, batch 1, float32, one thread. Microseconds per network call for "
        "the whole sampling call (grid set-up, denoiser conversions, solver arithmetic, noise "
        "draws), 50 steps; best of 5 rounds, each timing difflab and diffusers alternately "
        "(the 2-core machine is shared with other jobs, so absolute numbers are noisy; ratios "
        "are the measure; target <= 0.5).", ""]
    for shape in ((1, 64), (1, 4, 64, 64)):
        lines += [f"## x of shape {shape}", "",
                  "| difflab | us/call | diffusers | us/call | ratio |", "|---|---|---|---|---|"]
        for name, dname, ours_us, theirs_us in overhead(shape, reps=2 if quick else 5):
            lines.append(f"| {name} | {ours_us:.0f} | {dname} | {theirs_us:.0f} | "
                         f"{ours_us / theirs_us:.2f} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run, print only")
    ap.add_argument("--calibration", type=int, default=512,
                    help="calibration draws for the tuned grids (seed 123)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "samplers.md"))
    ap.add_argument("--overhead-only", action="store_true",
                    help="only the per-step overhead table (a few minutes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    overhead_text = "\n".join(overhead_section(args.quick))
    print(overhead_text)
    if not args.quick:
        OVERHEAD_OUT.write_text(overhead_text)
        print(f"wrote {OVERHEAD_OUT}")
    if args.overhead_only:
        return
    sch = schedules.linear(1e-4, 0.02, 1000)
    mixtures = benchmark_mixtures()
    # bespoke without fitted coefficients is unipc: it is measured in the tuned section
    deterministic = [n for n in S.names() if not S.get(n).stochastic and n != "bespoke"]
    lines = _header("Samplers: difflab vs diffusers on exact Gaussian mixtures") + [
        "Linear DDPM schedule (T = 1000), exact mixture model as eps-predictor. Error = RMSE "
        "to the exact PF-ODE solution from the same noise. difflab samplers use their DEFAULT "
        "settings (grid, final step); diffusers schedulers every listed option. A cell "
        "`e (n)` is error e at n network calls when n differs from the column's NFE.", "",
    ]
    summary = []
    for label, (mix, n) in mixtures.items():
        if args.quick:
            n = 64
        den = mix.denoiser(sch, "eps")
        noise = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
        ref = reference(den, noise, 1000)
        ref_check = rmse(ref, reference(den, noise, 2000))
        ours = difflab_errors(den, noise, ref, deterministic)
        model = DiffusersModel(mix, sch.alphas_cumprod)
        theirs = {}
        for name, cls, cfg in diffusers_configs():
            row = {}
            for nfe in NFES:
                try:
                    x, calls = diffusers_sample(cls, cfg, model, noise, nfe)
                    row[nfe] = (rmse(x, ref), calls)
                except Exception as e:  # noqa: BLE001 - report, do not hide
                    row[nfe] = (math.nan, 0)
                    print(f"{name} NFE {nfe}: {type(e).__name__}: {e}")
            theirs[name] = row
        lines += [f"## {label}, {n} samples", "",
                  f"Reference check: RMSE(1000-step vs 2000-step reference) = {ref_check:.1e}", ""]

        def table(title, rows):
            out = [f"### {title}", "", "| sampler | " + " | ".join(f"NFE {k}" for k in NFES)
                   + " |", "|---" * (len(NFES) + 1) + "|"]
            for name, row in rows.items():
                cells = []
                for k in NFES:
                    e, c = row[k]
                    cells.append(f"{e:.2e}" + (f" ({c})" if c != k else ""))
                out.append(f"| {name} | " + " | ".join(cells) + " |")
            return out + [""]

        lines += table("difflab (defaults)", ours)
        lines += table("diffusers", theirs)
        best_ours = {k: min((r[k][0], nm) for nm, r in ours.items() if r[k][1] <= k)
                     for k in NFES}
        best_theirs = {k: min((r[k][0], nm) for nm, r in theirs.items()
                              if r[k][1] <= k and not math.isnan(r[k][0])) for k in NFES}
        lines += ["### Best of each at equal NFE", "",
                  "| NFE | difflab best | diffusers best | ratio (difflab / diffusers) |",
                  "|---|---|---|---|"]
        for k in NFES:
            (eo, no), (et, nt) = best_ours[k], best_theirs[k]
            lines.append(f"| {k} | {eo:.2e} ({no}) | {et:.2e} ({nt}) | {eo / et:.3f} |")
            summary.append((label, k, eo / et))
        lines.append("")
        lines += tuned_section(den, noise, ref, best_theirs, quick=args.quick,
                               calibration=args.calibration)
        print("\n".join(lines[-16:]))
    lines += ["## Agreement with diffusers on identical grids", "",
              "Same noise, same (trailing) DDPM timesteps, x0 final step, 2-D ring: max "
              "|x_difflab - x_diffusers| (diffusers runs in float32, so ~1e-7 is agreement). "
              "DDIM differs because diffusers' DDIM steps to t - T // n instead of the next "
              "grid point (6 trailing steps: 999 -> 833 instead of 832, 666 -> 500 instead of "
              "499, ...; diffusers #12633) and its last step ends at index 0 (sigma~ = 0.01) "
              "instead of sigma = 0 (PITFALLS).", "",
              "| steps | difflab | diffusers | max abs difference |", "|---|---|---|---|"]
    lines += cross_check()
    lines.append("")
    lines += ["## Final step (the step from sigma_min to sigma = 0)", "",
              "RMSE by number of steps (default log-SNR grid, last nonzero sigma~ = 0.01) for "
              "the two final-step modes of difflab.samplers.common.", "",
              "| mixture | sampler | final | " + " | ".join(str(k) for k in FINAL_STEPS) + " |",
              "|---" * (3 + len(FINAL_STEPS)) + "|"]
    for label, (mix, n) in mixtures.items():
        den = mix.denoiser(sch, "eps")
        noise = torch.randn(min(n, 256), mix.dim, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
        ref = reference(den, noise, 1000)
        for name in ("dpmpp_2m", "unipc", "dpm_solver_3"):
            for final in S.FINAL_MODES:
                errs = [rmse(S.sample(den, noise, name, k, final=final), ref)
                        for k in FINAL_STEPS]
                lines.append(f"| {label.split(' ')[0]} | {name} | {final} | "
                             + " | ".join(f"{e:.1e}" for e in errs) + " |")
    lines.append("")
    text = "\n".join(lines)
    print(text[-3000:])
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
