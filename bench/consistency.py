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
    ap.add_argument("--count", type=int, default=1000, help="samples per FID")
    ap.add_argument("--work", default="runs/cm_bench", help="cache of results")
    ap.add_argument("--out", default=str(ROOT / "docs/results/consistency.md"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--notes", default=None,
                    help="a markdown file appended to the page (the reading of the numbers)")
    ap.add_argument("--only-teacher", action="store_true", help="measure the teacher only")
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

    def measure(key: str, source: Path, samplers, steps) -> None:
        todo = [(s, k) for s in samplers for k in steps if f"{key}:{s}:{k}" not in results]
        for s, k in todo:
            res = evaluate(source / "checkpoint", reference="fashion_mnist", count=args.count,
                           samplers=[s], steps=[k], batch_size=250, seed=0,
                           kid_subsets=10, kid_subset_size=min(500, args.count))
            rec = res["results"][0]
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
            measure(name, Path(d), ["consistency"], CM_STEPS)
            infos[name] = run_info(Path(d))
            for k in CM_STEPS:
                grids[f"{name}_{k}"] = grid(name, Path(d), "consistency", k)

    # --- the page ------------------------------------------------------------------------
    t_fid20 = results[f"teacher:{best}:20"]["fid"]
    tinfo = run_info(teacher)
    cmd = "python bench/consistency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Consistency models on Fashion-MNIST (issue #20)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {platform.machine()} CPU, 2 cores shared with other engineers' jobs (load "
        "average 6-11 during the runs), python " + platform.python_version() +
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
