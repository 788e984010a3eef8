"""Latent consistency distillation of the text-to-image model (issue #20 on #18's model): the
teacher (guided, dpmpp_2m) against its latent consistency student at 1, 2 and 4 calls, on the
prompt-adherence evaluator and the FID of the evaluator's object crops against real test
canvases, in one run on one machine.

    difflab distill runs/t2i_bench --out runs/t2i_lcm --max-cpu-minutes 30 --threads 1
    python bench/t2i_lcm.py --teacher runs/t2i_bench --student runs/t2i_lcm --threads 1

Prompts as ``bench/t2i.py``: each of the 180 canvas compositions once plus each of the 5
held-out compositions 9 more times (225 images per row), seed 0. Guidance in the w-convention
(w = 0: the conditional model; diffusers' guidance_scale = 1 + w): the teacher runs classifier-
free guidance (two halves: 2 network calls per step), the student takes w as an input (one call
per step). "calls" counts network evaluations per image. Writes docs/results/t2i_lcm.json, the
table page docs/results/t2i_lcm.md and a captioned grid of the student.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from difflab import samplers
from difflab.commands.t2i import evaluate_prompts, format_record, write_captioned_grid
from difflab.data.canvas import HELD_OUT, all_captions, canvas_dataset, caption
from difflab.pipelines.text_to_image import TextToImagePipeline
from difflab.train import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).parent))
from t2i import GRID_PROMPTS  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rows(run: str, label: str, prompts: list[str], settings: list[tuple[str, int, float]],
         reference: torch.Tensor, *, cfg_halves: bool) -> list[dict]:
    """One adherence record per (sampler, steps, w) of ``run``; ``cfg_halves``: guidance
    w > 0 costs two network calls per evaluation (classifier-free guidance)."""
    out = []
    for sampler, steps, w in settings:
        res = evaluate_prompts(run, prompts, cfgs=[w], steps=steps, sampler=sampler, seed=0,
                               batch_size=75, reference=reference)
        rec = res["results"][0]
        guided_halves = 2 if cfg_halves and w > 0 else 1
        nfe = int(samplers.get(sampler).nfe(steps)) * guided_halves
        rec.update(model=label, sampler=sampler, steps=steps, calls=nfe)
        log(f"{label} {sampler} {steps} steps ({nfe} calls): {format_record(rec)}")
        out.append(rec)
    return out


def table(records: list[dict]) -> str:
    lines = ["| model | sampler | steps | w | calls | class | position | size | all three | "
             "held-out class / pos / size | crop FID | images/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        a, h = r["all"], r["held_out"]
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['cfg']:g} | {r['calls']} | "
            f"{a['class']:.3f} | {a['position']:.3f} | {a['size']:.3f} | {a['all']:.3f} | "
            f"{h['class']:.2f} / {h['position']:.2f} / {h['size']:.2f} | "
            f"{r['fid']:.1f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher", default="runs/t2i_bench")
    ap.add_argument("--student", default="runs/t2i_lcm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--teacher-steps", default="20,4", help="dpmpp_2m steps of the teacher")
    ap.add_argument("--teacher-cfg", type=float, default=3.0)
    ap.add_argument("--student-steps", default="1,2,4")
    ap.add_argument("--student-cfgs", default="1,3")
    ap.add_argument("--held-repeats", type=int, default=9)
    ap.add_argument("--n-reference", type=int, default=2000)
    ap.add_argument("--json", default="docs/results/t2i_lcm.json")
    ap.add_argument("--grid", default="docs/results/t2i_lcm_grid.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = all_captions() + [caption(*h) for h in HELD_OUT] * args.held_repeats
    reference = canvas_dataset("test", n=args.n_reference, seed=1).images
    student_ck = ckpt.read(args.student)
    student_state, cons = student_ck.state(), student_ck.config["consistency"]
    report = {"command": " ".join(sys.argv), "threads": args.threads,
              "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__,
              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "distillation": {"steps": student_state["step"],
                               "cpu_minutes": student_state["train_cpu_seconds"] / 60,
                               "wall_minutes": student_state["train_seconds"] / 60,
                               "consistency": cons}}
    teacher = [("dpmpp_2m", int(s), args.teacher_cfg) for s in args.teacher_steps.split(",")]
    student = [("consistency", int(s), float(w)) for w in args.student_cfgs.split(",")
               for s in args.student_steps.split(",")]
    records = rows(args.teacher, "teacher", prompts, teacher, reference, cfg_halves=True)
    records += rows(args.student, "LCM student", prompts, student, reference, cfg_halves=False)
    report["results"] = records
    best = max((r for r in records if r["model"] != "teacher"),
               key=lambda r: (r["steps"] == 4, r["all"]["all"]))
    pipe = TextToImagePipeline.from_checkpoint(args.student)
    grid_prompts = [p for p in GRID_PROMPTS for _ in range(2)]
    images = pipe(grid_prompts, cfg=best["cfg"], steps=best["steps"], seed=1)
    write_captioned_grid(images, grid_prompts, args.grid, nrow=8)
    report["grid"] = {"path": args.grid, "cfg": best["cfg"], "steps": best["steps"]}
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {args.json} and {args.grid}")
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
