"""Samplers on a trained image model: difflab vs diffusers schedulers, same network, same noise.

    python bench/samplers_real.py runs/bench_train3/difflab/checkpoint

writes docs/results/samplers_real.md.

Mixtures give exact answers (bench/samplers.py); this checks that the defaults also serve a real
network. The model is the Fashion-MNIST U-Net that ``bench/train.py`` trains (v-prediction,
cosine schedule, T = 1000). The reference is a 500-step dpm_solver_3 solution of the
probability-flow ODE of that network from the same noise (checked against 250 steps); error =
RMSE in pixel units ([-1, 1]) to it. diffusers schedulers get the network's betas
(``trained_betas``) and ``prediction_type="v_prediction"`` and call the network at the timesteps
they choose (fractional ones too), exactly as a diffusers pipeline would.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import sys
import warnings
from pathlib import Path

import torch

from difflab import samplers as S
from difflab.fitting import load_fit, load_fits
from difflab.train.checkpoint import load_denoiser, resolve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from samplers import diffusers_sample, reference, rmse, steps_for  # noqa: E402

NFES = (5, 10, 20)
NOTES = (
    'Notes: rows marked "failed" raised inside diffusers\' own `step()` (IndexError in '
    "DPMSolverMultistep, AssertionError in UniPC) when `use_karras_sigmas` or `use_lu_lambdas` "
    "is combined with the model's `trained_betas` (cosine, betas clipped at 0.999); they are "
    "reported, not hidden. Compare the rows, not single cells: the winner is decided by the "
    "time grid more than by the solver."
)
DIFFLAB = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun")
# the same solvers on other grids than their default (log-SNR uniform): "uniform" is uniform in
# t, i.e. diffusers' "trailing" for a discrete schedule
VARIANTS = (("dpmpp_2m", "uniform"), ("dpmpp_3m", "uniform"), ("unipc", "uniform"),
            ("unipc", "karras"))


class NetModel:
    """The checkpoint's network as diffusers calls it: model(x, timestep) -> v."""

    def __init__(self, den):
        self.net, self.calls = den.net, 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timestep) -> torch.Tensor:
        self.calls += 1
        t = torch.full((x.shape[0],), float(timestep), dtype=torch.float32)
        return self.net(x.float(), t).to(x.dtype)


def diffusers_configs(betas: list[float]) -> list[tuple[str, object, dict]]:
    import diffusers as D

    base = dict(num_train_timesteps=len(betas), trained_betas=betas,
                prediction_type="v_prediction")
    cfgs = [("DDIM trailing clip_sample=False", D.DDIMScheduler,
             dict(timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True))]
    for order in (2, 3):
        for tag, kw in (("linspace", {}), ("trailing", {"timestep_spacing": "trailing"}),
                        ("karras", {"use_karras_sigmas": True}),
                        ("lambdas", {"use_lu_lambdas": True})):
            cfgs.append((f"DPM++{order}M {tag}", D.DPMSolverMultistepScheduler,
                         dict(solver_order=order, final_sigmas_type="zero", **kw)))
        for tag, kw in (("trailing", {"timestep_spacing": "trailing"}),
                        ("karras", {"use_karras_sigmas": True})):
            cfgs.append((f"UniPC-{order} {tag}", D.UniPCMultistepScheduler,
                         dict(solver_order=order, final_sigmas_type="zero", **kw)))
    cfgs.append(("Euler trailing", D.EulerDiscreteScheduler,
                 dict(timestep_spacing="trailing", final_sigmas_type="zero")))
    cfgs.append(("Euler karras", D.EulerDiscreteScheduler,
                 dict(use_karras_sigmas=True, final_sigmas_type="zero")))
    return [(n, cls, {**base, **kw}) for n, cls, kw in cfgs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--n", type=int, default=32, help="images (batch)")
    ap.add_argument("--ref-steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "samplers_real.md"))
    ap.add_argument("--tune", default="unipc",
                    help="samplers to fit tuned grids for (comma list; '' skips)")
    ap.add_argument("--tune-n", type=int, default=16, help="calibration images (seed 123)")
    ap.add_argument("--tune-evals", type=int, default=150, help="sampler runs per grid")
    ap.add_argument("--title", default="Samplers on a trained image model (Fashion-MNIST U-Net)")
    ap.add_argument("--grids", default="",
                    help="samplers (comma list) whose fits stored with the checkpoint "
                         "(`difflab tune-grid`, the fits `difflab sample` runs) get rows")
    ap.add_argument("--figure", default="",
                    help="PNG: 8 images from the reference and, per NFE, dpmpp_2m and the "
                         "default call (rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    den, cfg = load_denoiser(args.checkpoint)
    den.eval()
    c, r = cfg["data"]["channels"], cfg["data"]["resolution"]
    noise = torch.randn(args.n, c, r, r, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(den, noise, args.ref_steps)
        ref_half = reference(den, noise, args.ref_steps // 2)
    fits = load_fits(resolve(args.checkpoint))
    fitted = sorted(fits)
    auto = (f"auto: `difflab.sample(den, noise, steps=n, fit=fits.get(n))`, the default of "
            f"`difflab sample` (bespoke solver fitted by `difflab train` at {fitted} steps, "
            "else dpmpp_2m)" if fitted else
            "auto: `difflab.sample(den, noise, steps=n)`, the default (no fitted solver: "
            "dpmpp_2m)")
    rows_dl = {auto: {}}
    shown = [ref[:8]]  # --figure: the reference, then per NFE dpmpp_2m and the default
    for nfe in NFES:  # every sampler auto chooses makes one network call per step
        x = S.sample(den, noise, steps=nfe, fit=fits.get(nfe))
        rows_dl[auto][nfe] = (rmse(x, ref), S.get(S.choose(None, fits.get(nfe))).nfe(nfe))
        shown += [S.sample(den, noise[:8], "dpmpp_2m", nfe), x[:8]]
    print(auto, rows_dl[auto], flush=True)
    if args.figure:
        from difflab.train.monitor import save_grid

        save_grid(torch.cat(shown), args.figure, nrow=8, scale=2)
        print(f"wrote {args.figure}: rows = {args.ref_steps}-step reference, then for NFE "
              f"{NFES}: dpmpp_2m, the default call", flush=True)
    defaults = (auto, *DIFFLAB)
    for name in DIFFLAB:
        rows_dl[name] = {}
        for nfe in NFES:
            steps = steps_for(name, nfe)
            x = S.sample(den, noise, name, steps)
            rows_dl[name][nfe] = (rmse(x, ref), S.get(name).nfe(steps))
        print(name, rows_dl[name], flush=True)
    for name, spacing in VARIANTS:
        label = f"{name} spacing={spacing}"
        rows_dl[label] = {}
        for nfe in NFES:
            steps = steps_for(name, nfe)
            x = S.sample(den, noise, name, steps, spacing=spacing)
            rows_dl[label][nfe] = (rmse(x, ref), S.get(name).nfe(steps))
        print(label, rows_dl[label], flush=True)
    tuned_rows = {}
    if args.tune:
        from difflab.fitting import tune_grid

        cal = torch.randn(args.tune_n, c, r, r, generator=torch.Generator().manual_seed(123))
        with torch.no_grad():
            ref_cal = reference(den, cal, args.ref_steps)
        for name in args.tune.split(","):
            label = f"{name} tuned grid ({args.tune_n} calibration images)"
            tuned_rows[label] = {}
            for nfe in NFES:
                steps = steps_for(name, nfe)
                tg = tune_grid(den, name, steps, cal, reference=ref_cal,
                               max_evals=args.tune_evals)
                x = S.sample(den, noise, name, grid=tg.ts)
                tuned_rows[label][nfe] = (rmse(x, ref), S.get(name).nfe(steps))
                print(label, nfe, tuned_rows[label][nfe], f"calibration {tg.rmse:.3e} "
                      f"(default grid {tg.rmse_default:.3e})", flush=True)
    if args.grids:
        for name in args.grids.split(","):
            for nfe in NFES:
                steps = steps_for(name, nfe)
                fit = load_fit(resolve(args.checkpoint), name, steps)
                if fit is None:
                    continue
                cal = fit.calibration
                if fit.coeffs is not None:  # a bespoke solver on its base's grid
                    label = (f"{name}, fits.json (coefficients and times fitted on {cal} "
                             f"images, on {fit.base}'s grid)")
                elif fit.grid_from is not None:  # grid and evaluation times fitted separately
                    label = (f"{name}, fits.json (grid {fit.grid_from['calibration']}, "
                             f"eval times {cal} calibration images)")
                else:
                    label = f"{name}, fits.json ({cal} calibration images)"
                x = S.sample(den, noise, name, fit=fit)  # with its eval_ts, if any
                tuned_rows.setdefault(label, {n: (math.nan, 0) for n in NFES})
                tuned_rows[label][nfe] = (rmse(x, ref), S.get(name).nfe(steps))
                print(label, nfe, tuned_rows[label][nfe], flush=True)
    rows_dl.update(tuned_rows)
    model = NetModel(den)
    rows_df = {}
    betas = den.schedule.betas.tolist()
    for label, cls, config in diffusers_configs(betas):
        rows_df[label] = {}
        for nfe in NFES:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    x, calls = diffusers_sample(cls, config, model, noise, nfe)
            except (IndexError, ValueError, RuntimeError, AssertionError) as e:
                print(f"{label} at NFE {nfe} failed in diffusers: {e!r}", flush=True)
                rows_df[label][nfe] = (math.inf, 0)
                continue
            rows_df[label][nfe] = (rmse(x, ref) if torch.isfinite(x).all() else math.inf, calls)
        print(label, rows_df[label], flush=True)

    def table(rows):
        out = ["| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
               "|---|" + "---|" * len(NFES)]
        for name, row in rows.items():
            cells = ["-" if math.isnan(e) else "failed (diffusers raised)" if k == 0 else
                     f"{e:.3e}" + (f" ({k})" if k != n else "") for n, (e, k) in row.items()]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        return out

    def best(rows, nfe, defaults_only=False, fixed_only=False):
        keys = [k for k in rows if (not defaults_only or k in defaults)
                and (not fixed_only or (k not in tuned_rows and not (k == auto and fitted)))]
        name = min(keys, key=lambda k: math.inf if math.isnan(rows[k][nfe][0])
                   else rows[k][nfe][0])
        return rows[name][nfe][0], name

    lines = [
        f"# {args.title}", "",
        f"Command: `python bench/samplers_real.py {shlex.join(sys.argv[1:])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: 2-core CPU (CI-class), {platform.machine()}, torch {torch.__version__}", "",
        f"Model: `{args.checkpoint}` ({cfg['prediction']}-prediction, schedule "
        f"{cfg['schedule']['type']}), {args.n} images from seed 0. Reference: dpm_solver_3, "
        f"{args.ref_steps} log-SNR steps; RMSE(reference, {args.ref_steps // 2} steps) = "
        f"{rmse(ref, ref_half):.2e}. Error = pixel RMSE to the reference ([-1, 1] scale). "
        "A cell `e (n)` used n network calls.", "",
        "## difflab (defaults, then the same solvers on other grids)", "", *table(rows_dl), "",
        "## diffusers (same network, `trained_betas`, v_prediction)", "", *table(rows_df), "",
        "## Best of each", "",
        "| NFE | difflab best (defaults) | difflab best (fixed grid rules) | difflab best "
        "(incl. tuned grids) | diffusers best | ratio (defaults) | ratio (fixed rules) "
        "| ratio (incl. tuned) |", "|---|---|---|---|---|---|---|---|",
    ]
    for nfe in NFES:
        (e1, n1), (ef, nf), (ea, na), (e2, n2) = (
            best(rows_dl, nfe, True), best(rows_dl, nfe, fixed_only=True), best(rows_dl, nfe),
            best(rows_df, nfe))
        lines.append(f"| {nfe} | {e1:.3e} ({n1}) | {ef:.3e} ({nf}) | {ea:.3e} ({na}) "
                     f"| {e2:.3e} ({n2}) | {e1 / e2:.2f} | {ef / e2:.2f} | {ea / e2:.2f} |")
    lines += ["", NOTES]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-6:]))


if __name__ == "__main__":
    main()
