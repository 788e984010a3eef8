"""The fast bespoke fit (difflab.fitting.fast_fit_solvers) on a trained U-Net: time and accuracy.

    nice -n 19 python bench/fit_fast.py runs/fm_base --threads 2 1

writes docs/results/fit_fast.md (``--out``; ``--json`` also stores every number), rewritten
after each stage so that an interrupted run keeps what it measured.

Stages: (1) the fast fit for ``--steps`` (default 5 10 20) together on ``--count`` calibration
draws from ``--seed``, timed (wall seconds and process CPU seconds) with
``torch.set_num_threads(T)`` for the first ``--threads`` value; (2) the test: ``--test-count``
held-out draws from ``--test-seed`` (disjoint from the calibration seed), error = pixel RMSE
([-1, 1] scale) to a ``2 x --reference-steps`` dpmpp_3m uniform-t solve from the same noise
(the fit's own reference, ``--reference-steps``, is measured against it too), for the default
call ``difflab.sample(den, noise, steps=n)``, unipc on the fit's grid (its start), the fast fit
and, where the checkpoint stores bespoke fits (``fits.json``), those; (3) the fit timed again
for each other ``--threads`` value. The best diffusers figures of docs/results/samplers_real.md
are quoted with the model they were measured on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from difflab import samplers as S
from difflab.commands.model import fit_store, load_model
from difflab.fitting import fast_fit_solvers, load_fits
from difflab.fitting.fast import fine_reference


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def timed_fit(den, cal, args, threads: int):
    """The fast fit, timed: the reference solve (kept whole, for the ridge sweep) and the fit
    from it, which is what ``fast_fit_solvers(den, steps, cal)`` does in one call."""
    torch.set_num_threads(threads)
    w0, c0 = time.perf_counter(), time.process_time()
    ref = fine_reference(den, cal, args.reference_steps)
    fits = fast_fit_solvers(den, args.steps, cal, reference=ref, ridge=args.ridge,
                            polish=args.polish)
    return fits, ref, time.perf_counter() - w0, time.process_time() - c0


def diffusers_best(path: Path) -> tuple[str, dict[int, str]]:
    """(model line, {nfe: 'value (config)'}) of the 'Best of each' table of samplers_real.md."""
    if not path.is_file():
        return "", {}
    text = path.read_text()
    model = next((ln for ln in text.splitlines() if ln.startswith("Model:")), "")
    best: dict[int, str] = {}
    part = text.split("## Best of each", 1)
    if len(part) == 2:
        for ln in part[1].splitlines():
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if len(cells) >= 5 and cells[0].isdigit():
                best[int(cells[0])] = cells[4]
    return model, best


def write(out: Path, res: dict, argv: list[str]) -> None:
    L = ["# Fast bespoke fit (teacher forcing + ridge, one reference solve)", ""]
    L += [f"Command: `{' '.join(shlex.quote(a) for a in argv)}`  ",
          f"Date: {res['date']}  ",
          f"Machine: {res['machine']}; **shared** with other timed benchmarks while this ran "
          "(this process at nice 19): wall times are an upper bound; CPU seconds (the "
          "process's, all its threads) are the steadier figure.", ""]
    a = res["args"]
    L += [f"Model: `{a['run']}` (EMA weights). Calibration: {a['count']} draws from seed "
          f"{a['seed']}; fit: `fast_fit_solvers(den, {a['steps']}, noise, reference_steps="
          f"{a['reference_steps']}, ridge={a['ridge']}, polish={a['polish']})`: one dpmpp_3m "
          f"solve on the {a['reference_steps']}-step uniform-t grid, teacher-forced data "
          "predictions read off it, ridge least squares toward unipc per row, then a rollout "
          "of the fitted and of the base solver on the calibration draws (validation).", ""]
    if res.get("timings"):
        L += ["## Time of fitting all step counts together", "",
              "| torch threads | wall s | CPU s | network calls per draw |", "|---|---|---|---|"]
        for t in res["timings"]:
            L.append(f"| {t['threads']} | {t['wall']:.1f} | {t['cpu']:.1f} | {t['calls']} |")
        L.append("")
    if res.get("fits"):
        L += ["## The fits (calibration draws)", "",
              "| steps | teacher-forced RMSE fit / unipc | rollout RMSE fit / unipc | kept unipc |",
              "|---|---|---|---|"]
        for k, f in res["fits"].items():
            L.append(f"| {k} | {f['tf_rmse']:.4g} / {f['tf_rmse_base']:.4g} | "
                     f"{f['rmse']:.4g} / {f['rmse_base']:.4g} | {f['kept_base']} |")
        L.append("")
    if res.get("test"):
        te = res["test"]
        L += ["## Test error (held-out noise)", "",
              f"{a['test_count']} draws from seed {a['test_seed']}. Reference: dpmpp_3m, "
              f"{2 * a['reference_steps']} uniform-t steps; the fit's own "
              f"{a['reference_steps']}-step reference differs from it by RMSE "
              f"{te['ref_self']:.3g} (its accuracy).", "",
              "| row | " + " | ".join(f"NFE {k}" for k in a["steps"]) + " |",
              "|---|" + "---|" * len(a["steps"])]
        for name, vals in te["rows"].items():
            L.append(f"| {name} | " + " | ".join(
                f"{vals[str(k)]:.4g}" if str(k) in vals else "-" for k in a["steps"]) + " |")
        L.append("")
    model, best = res.get("diffusers", ("", {}))
    if best:
        L += ["## Best diffusers scheduler (from docs/results/samplers_real.md)", "",
              f"{model} Not the same model or noise as above unless the model names match: "
              "compare ratios, not cells.", "", "| NFE | diffusers best |", "|---|---|"]
        L += [f"| {k} | {v} |" for k, v in sorted(best.items())]
        L.append("")
    if res.get("notes"):
        L += ["## Notes", ""] + res["notes"] + [""]
    out.write_text("\n".join(L))
    if a.get("json"):
        Path(a["json"]).write_text(json.dumps(res, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--test-count", type=int, default=8)
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--reference-steps", type=int, default=240)
    p.add_argument("--ridge", type=float, default=1e-3)
    p.add_argument("--polish", type=int, default=0)
    p.add_argument("--sweep", type=float, nargs="*", default=[1e-1, 1e-2, 1e-4, 1e-6],
                   help="other ridge weights whose test error is measured too")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--out", default="docs/results/fit_fast.md")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    argv = ["nice", "-n", str(os.nice(0)), "python", *sys.argv]
    out = Path(args.out)
    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime(
                     "%Y-%m-%d %H:%M UTC"),
                 "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}, torch "
                            f"{torch.__version__}", "args": vars(args), "timings": [],
                 "notes": []}
    res["diffusers"] = diffusers_best(Path("docs/results/samplers_real.md"))
    model = load_model(args.run, ema=True)
    den = model.denoiser
    cal = torch.randn((args.count,) + model.shape, generator=torch.Generator().manual_seed(
        args.seed))
    calls = args.reference_steps + 2 * sum(args.steps)

    fits, ref, wall, cpu = timed_fit(den, cal, args, args.threads[0])
    res["timings"].append({"threads": args.threads[0], "wall": wall, "cpu": cpu, "calls": calls})
    res["fits"] = {str(k): {"tf_rmse": f.extra["tf_rmse"], "tf_rmse_base": f.extra["tf_rmse_base"],
                            "rmse": f.rmse, "rmse_base": f.rmse_base,
                            "kept_base": bool(f.extra.get("kept_base")),
                            "coeffs": [list(r) for r in f.coeffs]} for k, f in fits.items()}
    print(f"fit with {args.threads[0]} threads: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    write(out, res, argv)

    test = torch.randn((args.test_count,) + model.shape,
                       generator=torch.Generator().manual_seed(args.test_seed))
    M = args.reference_steps
    truth = S.sample(den, test, "dpmpp_3m", grid=S.timesteps(den.schedule, 2 * M, "uniform"))
    own = S.sample(den, test, "dpmpp_3m", grid=S.timesteps(den.schedule, M, "uniform"))
    rows: dict[str, dict[str, float]] = {}
    ckpt, weights = fit_store(model.checkpoint, True)
    stored = load_fits(ckpt, True, weights=weights)
    for k in args.steps:
        rows.setdefault("default call `difflab.sample(den, noise, steps=n)` (dpmpp_2m, "
                        "log-SNR)", {})[str(k)] = rmse(S.sample(den, test, steps=k), truth)
        rows.setdefault("unipc, log-SNR", {})[str(k)] = rmse(S.sample(den, test, "unipc", k),
                                                             truth)
        rows.setdefault("unipc, uniform-t (the fast fit's start)", {})[str(k)] = rmse(
            S.sample(den, test, "unipc", grid=fits[k].ts), truth)
        rows.setdefault("fast fit (bespoke, uniform-t)", {})[str(k)] = rmse(
            S.sample(den, test, fit=fits[k]), truth)
        if k in stored:
            rows.setdefault("stored full fit (fits.json)", {})[str(k)] = rmse(
                S.sample(den, test, fit=stored[k]), truth)
    if not stored:
        res["notes"].append(f"- `{args.run}` stores no bespoke fit (no fits.json): no full-fit "
                            "row.")
    res["test"] = {"ref_self": rmse(own, truth), "rows": rows}
    print(json.dumps(res["test"], indent=1), flush=True)
    write(out, res, argv)
    for r in args.sweep:  # other ridge weights, from the same reference (no validation)
        other = fast_fit_solvers(den, args.steps, cal, reference=ref, ridge=r, validate=False)
        rows[f"fast fit, ridge {r:g} (not validated)"] = {
            str(k): rmse(S.sample(den, test, fit=f), truth) for k, f in other.items()}
        write(out, res, argv)

    for T in args.threads[1:]:
        _, _, wall, cpu = timed_fit(den, cal, args, T)
        res["timings"].append({"threads": T, "wall": wall, "cpu": cpu, "calls": calls})
        print(f"fit with {T} threads: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
        write(out, res, argv)


if __name__ == "__main__":
    main()
