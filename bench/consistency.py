"""Consistency models on Fashion-MNIST (issue #20): the teacher's FID at 10 and 20 steps with
difflab's solvers vs the consistency models' FID at 1, 2 and 4 steps, with their CPU minutes.

    difflab train fashion_mnist --max-minutes 10 --out runs/cm_teacher
    difflab distill runs/cm_teacher --out runs/cm_cd --method cd --solver heun --max-minutes 35
    difflab distill runs/cm_teacher --out runs/cm_ect --method ect --max-minutes 35 --steps 1600
    python bench/consistency.py --teacher runs/cm_teacher --run cd=runs/cm_cd --run ect=runs/cm_ect

writes docs/results/consistency.md (the command at the top) and sample grids
docs/consistency_<name>_<steps>.png. FID-FMNIST (the ``fmnist`` classifier's features)
of ``--count`` samples (seed 0, the images ``difflab sample`` draws) against 10,000 train
images. CPU minutes of a run: user + sys of the ``time`` line in ``<run>.log`` when the run
was started as ``time difflab distill ... > <run>.log``, else its wall-clock training time
(state.json) times its threads. Results are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER_SOLVERS = ("dpmpp_2m", "unipc")  # --teacher-solvers picks among them
TEACHER_STEPS = (10, 20)
CM_STEPS = (1, 2, 4)


def cpu_minutes(run: Path) -> tuple[float | None, str]:
    """(CPU minutes, how they were measured) of a run directory."""
    log = run.parent / f"{run.name}.log"
    if log.is_file():
        text = log.read_text(errors="replace")
        found = {k: re.findall(rf"^{k}\s+(\d+)m([\d.]+)s", text, re.M) for k in ("user", "sys")}
        if found["user"] and found["sys"]:
            total = sum(int(m) * 60 + float(s) for k in ("user", "sys")  # every segment
                        for m, s in found[k])  # of a resumed run (appended to one log)
            return total / 60, "user + sys"
    state = run / "checkpoint" / "state.json"
    if state.is_file():
        st = json.loads(state.read_text())
        return st.get("train_seconds", 0.0) / 60, "wall clock"
    return None, "unknown"


MID_CANDIDATES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # t of the 2-step grid [1, t_mid, 0]


def tune_mid(run: Path, count: int, candidates=MID_CANDIDATES, seed: int = 1) -> dict:
    """The intermediate time of 2-step consistency sampling, chosen as Song et al. (2023,
    Sec. 6) choose it: by FID, here FID-FMNIST of ``count`` samples drawn from ``seed`` (1:
    disjoint from the seed-0 samples the table reports) for each grid [1, t_mid, 0]. The best
    is stored as the checkpoint's tuned grid for ``consistency`` at 2 steps
    (``difflab.fitting.store.save_fit``), which ``difflab sample RUN --steps 2`` and the
    table's seed-0 measurement then use. Returns {t_mid: FID} and the choice."""
    from difflab.commands.eval import default_feature_net
    from difflab.fitting import Fit
    from difflab.fitting.store import save_fit
    from difflab.metrics.evaluate import evaluate_features, resolve_reference
    from difflab.metrics.features import load_feature_net
    from difflab.samplers import sample
    from difflab.train import checkpoint as ckpt

    den, cfg = ckpt.load_denoiser(run / "checkpoint")
    shape = (int(cfg["data"]["channels"]), int(cfg["data"]["resolution"]),
             int(cfg["data"]["resolution"]))
    extractor = load_feature_net(default_feature_net("fashion_mnist"))
    ref = resolve_reference("fashion_mnist", extractor, split="train", n=10000)
    noise = torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))
    fids = {}
    with torch.no_grad():
        for t_mid in candidates:
            x = torch.cat([sample(den, z, sampler="consistency", grid=[1.0, t_mid, 0.0])
                           for z in noise.split(250)]).clamp(-1, 1)
            fids[t_mid] = evaluate_features(extractor(x), ref, kid_subsets=2,
                                            kid_subset_size=min(500, count))["fid"]
            print(f"{run.name} 2 steps, t_mid {t_mid}: FID {fids[t_mid]:.2f} (seed {seed})",
                  file=sys.stderr)
    best = min(fids, key=fids.get)
    save_fit(run / "checkpoint", Fit(sampler="consistency", ts=(1.0, best, 0.0),
                                     calibration=count, seed=seed,
                                     extra={"chosen_by": f"FID-FMNIST of {count} samples, "
                                            f"seed {seed}", "fids": {str(k): v for k, v in
                                                                     fids.items()}}))
    return {"fids": fids, "t_mid": best}


def run_info(run: Path) -> dict:
    from difflab.train import checkpoint as ckpt

    ck = ckpt.read(run / "checkpoint")
    st = ck.state()
    cpu, how = cpu_minutes(run)
    return {"steps": st.get("step"), "wall_minutes": st.get("train_seconds", 0.0) / 60,
            "cpu_minutes": cpu, "cpu_how": how, "config": ck.config}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="the diffusion model's run directory")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                    help="a consistency run (repeatable), e.g. cd=runs/cm_cd")
    ap.add_argument("--diffusion", action="append", default=[], metavar="NAME=DIR",
                    help="a diffusion run trained with a CPU budget, measured at 10 steps "
                         "beside the consistency runs (repeatable)")
    ap.add_argument("--machine", default="2 cores",
                    help="how the machine was loaded during the runs (for the page)")
    ap.add_argument("--count", type=int, default=1000, help="samples per FID")
    ap.add_argument("--confirm", default=None, metavar="NAME",
                    help="measure run NAME at 1 and 2 steps and the teacher's best solver at "
                         "20 steps again with --confirm-count samples (a target at the margin "
                         "of the 1000-sample FID's noise)")
    ap.add_argument("--confirm-count", type=int, default=5000)
    ap.add_argument("--work", default="runs/cm_bench", help="cache of results")
    ap.add_argument("--out", default=str(ROOT / "docs/results/consistency.md"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--notes", default=None,
                    help="a markdown file appended to the page (the reading of the numbers)")
    ap.add_argument("--only-teacher", action="store_true", help="measure the teacher only")
    ap.add_argument("--tune-mid", action="store_true",
                    help="choose each run's 2-step intermediate time by FID of seed-1 samples "
                         "(stored with its checkpoint) before measuring")
    ap.add_argument("--teacher-solvers", default=",".join(TEACHER_SOLVERS),
                    help="the teacher's solvers (comma-separated; the best at 20 steps is "
                         "the reference)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from difflab.commands.eval import evaluate
    from difflab.commands.images import write_samples
    from difflab.commands.sample import generate

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / f"results_n{args.count}.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}

    def fid_record(source: Path, sampler: str, steps: int, count: int) -> dict:
        """The eval record (FID-FMNIST against 10,000 train images) of ``count`` seed-0
        samples of run ``source`` with ``sampler`` at ``steps``."""
        return evaluate(source / "checkpoint", reference="fashion_mnist", count=count,
                        samplers=[sampler], steps=[steps], batch_size=250, seed=0,
                        kid_subsets=10, kid_subset_size=min(500, count))["results"][0]

    def measure(key: str, source: Path, samplers, steps) -> None:
        todo = [(s, k) for s in samplers for k in steps if f"{key}:{s}:{k}" not in results]
        for s, k in todo:
            rec = fid_record(source, s, k, args.count)
            results[f"{key}:{s}:{k}"] = {"fid": rec["fid"], "sampler": rec["sampler"],
                                         "steps": k, "seconds": rec.get("seconds")}
            cache.write_text(json.dumps(results, indent=1))
            print(f"{key} {s} {k}: FID {rec['fid']:.2f}", file=sys.stderr)

    def grid(key: str, source: Path, sampler: str, steps: int) -> str:
        name = f"consistency_{key}_{steps}.png"
        path = ROOT / "docs" / name
        if not path.is_file():
            s = generate(source / "checkpoint", count=64, steps=steps, sampler=sampler, seed=0)
            write_samples(s.images, path)
        return name

    teacher = Path(args.teacher)
    solvers = [s for s in args.teacher_solvers.split(",") if s]
    measure("teacher", teacher, solvers, TEACHER_STEPS)
    best = min(solvers, key=lambda s: results[f"teacher:{s}:20"]["fid"])
    grids = {"teacher": grid("teacher", teacher, best, 20)}
    runs = dict(r.split("=", 1) for r in args.run)
    infos = {}
    if not args.only_teacher:
        for name, d in runs.items():
            if args.tune_mid and f"{name}:mid" not in results:
                results.pop(f"{name}:consistency:2", None)  # measured on the old grid
                results[f"{name}:mid"] = tune_mid(Path(d), args.count)
                cache.write_text(json.dumps(results, indent=1))
                (ROOT / "docs" / f"consistency_{name}_2.png").unlink(missing_ok=True)
            measure(name, Path(d), ["consistency"], CM_STEPS)
            infos[name] = run_info(Path(d))
            for k in CM_STEPS:
                grids[f"{name}_{k}"] = grid(name, Path(d), "consistency", k)

    confirm_file = work / f"results_n{args.confirm_count}_check.json"
    if args.confirm:
        check = json.loads(confirm_file.read_text()) if confirm_file.is_file() else {}
        for key, src, s, k in [(f"{args.confirm}:consistency:2", runs[args.confirm],
                                "consistency", 2),
                               (f"{args.confirm}:consistency:1", runs[args.confirm],
                                "consistency", 1),
                               (f"teacher:{best}:20", str(teacher), best, 20)]:
            if key not in check:
                rec = fid_record(Path(src), s, k, args.confirm_count)
                check[key] = {"fid": rec["fid"], "grid": rec.get("grid"),
                              "count": args.confirm_count}
                confirm_file.write_text(json.dumps(check, indent=1))

    diffusion = dict(r.split("=", 1) for r in args.diffusion)
    dinfos = {}
    for name, d in diffusion.items():
        measure(name, Path(d), ["dpmpp_2m"], (10,))
        dinfos[name] = run_info(Path(d))

    # --- the page ------------------------------------------------------------------------
    t_fid20 = results[f"teacher:{best}:20"]["fid"]
    tinfo = run_info(teacher)
    cmd = "python bench/consistency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Consistency models on Fashion-MNIST (issue #20)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {platform.machine()} CPU, {args.machine}, python " +
        platform.python_version() +
        f" / torch {torch.__version__}, {datetime.date.today()}.", "",
        f"FID-FMNIST of {args.count} samples (seed 0) against 10,000 train images (biased "
        "upwards at this sample size: compare rows, not papers).", "",
        f"Teacher: `{teacher}` ({tinfo['config'].get('net', {}).get('type')} "
        f"{tinfo['config'].get('net', {}).get('model_channels')} channels, "
        f"{tinfo['config'].get('prediction')}-prediction, "
        f"{tinfo['config'].get('schedule', {}).get('type')} schedule), {tinfo['steps']} steps "
        f"in {tinfo['wall_minutes']:.1f} wall minutes (the 10-minute preset).", "",
        "## Teacher", "", "| solver | 10 steps | 20 steps |", "|---|---|---|"]
    shown = solvers + [s for s in TEACHER_SOLVERS if s not in solvers
                       and any(f"teacher:{s}:{k}" in results for k in TEACHER_STEPS)]
    for s in shown:  # solvers measured in an earlier run of the bench too (cache)
        cells = [f"{results[f'teacher:{s}:{k}']['fid']:.2f}" if f"teacher:{s}:{k}" in results
                 else "not measured" for k in TEACHER_STEPS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"Best at 20 steps: {best}, FID {t_fid20:.2f}. Targets: 1 step <= "
              f"{2 * t_fid20:.2f} (2x), 2 steps <= {1.3 * t_fid20:.2f} (1.3x).", "",
              "## Consistency models", "",
              "| method | steps trained | CPU min | wall min | 1 step | 2 steps | 4 steps | "
              "1-step / teacher-20 | 2-step / teacher-20 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, info in infos.items():
        f = [results[f"{name}:consistency:{k}"]["fid"] for k in CM_STEPS]
        cpu = "n/a" if info["cpu_minutes"] is None else f"{info['cpu_minutes']:.1f}"
        lines.append(f"| {name} | {info['steps']} | {cpu} ({info['cpu_how']}) | "
                     f"{info['wall_minutes']:.1f} | {f[0]:.2f} | {f[1]:.2f} | {f[2]:.2f} | "
                     f"{f[0] / t_fid20:.2f}x | {f[1] / t_fid20:.2f}x |")
    if confirm_file.is_file():
        check = json.loads(confirm_file.read_text())
        t = next((v["fid"] for k, v in check.items() if k.startswith("teacher:")), None)
        lines += ["", f"Again with {args.confirm_count} samples (seed 0; `--confirm`):", "",
                  "| model | steps | FID | / teacher-20 |", "|---|---|---|---|"]
        for key, v in check.items():
            name, solver, k = key.split(":")
            ratio = f"{v['fid'] / t:.3f}x" if t and not key.startswith("teacher:") else ""
            lines.append(f"| {name} ({solver}) | {k} | {v['fid']:.2f} | {ratio} |")
    if dinfos:
        lines += ["", "## Diffusion training with the same CPU budgets", "",
                  "| run | steps trained | CPU min | wall min | dpmpp_2m 10 steps |",
                  "|---|---|---|---|---|"]
        for name, info in dinfos.items():
            cpu = "n/a" if info["cpu_minutes"] is None else f"{info['cpu_minutes']:.1f}"
            lines.append(f"| {name} | {info['steps']} | {cpu} ({info['cpu_how']}) | "
                         f"{info['wall_minutes']:.1f} | "
                         f"{results[f'{name}:dpmpp_2m:10']['fid']:.2f} |")
    mids = {name: results[f"{name}:mid"] for name in infos if f"{name}:mid" in results}
    if mids:
        lines += ["", "2-step grids [1, t_mid, 0]: t_mid chosen by FID-FMNIST of 1000 samples "
                  "from seed 1 (the table's samples are seed 0), stored with each checkpoint "
                  "(`fits.json`, used by `difflab sample RUN --steps 2`):", ""]
        for name, m in mids.items():
            cells = ", ".join(f"{float(t):g}: {f:.2f}" for t, f in m["fids"].items())
            lines.append(f"- {name}: t_mid = {m['t_mid']} ({cells})")
    lines += ["", "Settings per run (the `consistency` and `train` sections of its config):", ""]
    for name, info in infos.items():
        c = info["config"]
        tr = {k: c["train"].get(k) for k in ("lr", "batch_size", "steps", "ema_decay")}
        lines.append(f"- {name}: {json.dumps(c.get('consistency'))}; train {json.dumps(tr)}")
    lines += ["", "## Grids (64 samples, seed 0)", "",
              f"Teacher, {best}, 20 steps:", "", f"![teacher](../{grids['teacher']})", ""]
    for name in infos:
        for k in CM_STEPS:
            lines += [f"{name}, {k} step(s):", "", f"![{name} {k}](../{grids[f'{name}_{k}']})",
                      ""]
    if args.notes:
        lines += [Path(args.notes).read_text().rstrip(), ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
