"""Latent text-to-image on the canvas data set: train the ``t2i_canvas`` preset (both stages) on
the CPU within a budget, then measure it.

    python bench/t2i.py --out runs/t2i_bench --max-minutes 48 --ae-minutes 18 --threads 1
    python bench/t2i.py --out runs/t2i_bench --eval-only        # measure a trained run again

Reports (docs/results/t2i.json, and a table on stdout):

* the autoencoder on --n-test test canvases (Fashion-MNIST test items): reconstruction PSNR (dB,
  images in [-1, 1], mean over images of 10 log10(4 / MSE)) and an rFID-like figure: the
  FID-FMNIST of the object crops of the reconstructions against those of the originals (the
  prompt-adherence evaluator's crops and feature network), plus the evaluator's class / position
  / size accuracy on the reconstructions;
* prompt adherence (:func:`difflab.metrics.adherence.adherence`) of samples for the test
  prompts: every one of the 180 compositions once, and each held-out composition
  (:data:`difflab.data.canvas.HELD_OUT`, never seen in training) --held-repeats more times,
  at each CFG weight of --cfgs (w-convention: 0 = the conditional model), split into seen and
  held-out compositions; the same table for real test canvases (the evaluator's ceiling);
* samples per second (the whole pipeline: text encoder, sampler with guidance, decoder);
* a captioned grid (--grid) of prompts including held-out ones.

Trains through :func:`difflab.train.t2i.train_t2i` (resumable: rerun with --resume after an
interruption; --stages autoencoder trains stage 1 only).

On a GPU (``--device cuda``) the page also gets, per stage, the card, training images/s and the
model FLOP utilisation: MFU = images/s x training FLOPs per image / the card's data-sheet dense
bf16 peak, training FLOPs = 3 x the forward's (``torch.utils.flop_counter.FlopCounterMode``:
the autoencoder's encode + decode; the latent U-Net with its cross-attention on one latent and
one prompt). A machine without the text encoder's weights takes precomputed encodings of the
canvas captions (``--precomputed FILE``: ``--precompute FILE`` writes them where the encoder is).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from difflab.commands.t2i import evaluate_prompts, format_record, write_captioned_grid
from difflab.data.canvas import HELD_OUT, all_captions, canvas_dataset, caption
from difflab.data.dataset import to_float
from difflab.metrics.adherence import adherence
from difflab.objectives.autoencoder import psnr
from difflab.pipelines.text_to_image import TextToImagePipeline
from difflab.train.t2i import load_autoencoder, stage_state, t2i_config, train_t2i

sys.path.insert(0, str(Path(__file__).parent))
from train_gpu import spec_peak  # noqa: E402  (the cards' data-sheet bf16 peaks)

GRID_PROMPTS = [caption(*h) for h in HELD_OUT] + [
    "a small t-shirt in the top left", "a large trouser in the center",
    "a small pullover in the bottom right", "a large dress in the top right",
    "a small sandal in the middle left", "a large shirt in the bottom center",
    "a small ankle boot in the top center", "a large bag in the middle right",
    "a large sneaker in the bottom left", "a small coat in the top right",
    "a large pullover in the top left"]


def log(msg: str) -> None:
    print(msg, flush=True)


def forward_flops(module: torch.nn.Module, *args, **kwargs) -> float:
    """FLOPs of one forward call (FlopCounterMode: matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args, **kwargs)
    return float(counter.get_total_flops())


def training_flops(run: Path) -> dict:
    """Training FLOPs per image of each stage: 3 x the forward (forward + backward)."""
    from difflab.train.t2i import load_text_to_image

    model, _ = load_text_to_image(run / "checkpoint", device="cpu")
    ae = model.autoencoder
    x = torch.zeros(1, ae.config["in_channels"], 64, 64)

    class _AE(torch.nn.Module):
        def forward(self, x):
            return ae.decode(ae.encode(x).mode())

    f_ae = forward_flops(_AE(), x)
    z = ae.encode(x).mode()
    cond = model.text_encoder.condition(["a small bag in the top left"])
    f_net = forward_flops(model.denoiser.net, z, torch.full((1,), 0.5), **cond.kwargs())
    return {"autoencoder": 3 * f_ae, "diffusion": 3 * f_net}


def train(args: argparse.Namespace) -> dict:
    overrides = [f"train.max_minutes={args.max_minutes}",
                 f"autoencoder.train.max_minutes={args.ae_minutes}", *args.set]
    if args.precomputed:
        overrides.append("text_encoder=" + json.dumps({"type": "precomputed",
                                                       "path": args.precomputed}))
    config = t2i_config("t2i_canvas", overrides=overrides)
    t0 = time.perf_counter()

    def callback(rec: dict) -> None:
        if rec.get("event") == "log" and rec["step"] % (args.log_every) == 0:
            extra = f" psnr {rec['psnr']:.2f}" if "psnr" in rec else ""
            log(f"  step {rec['step']} loss {rec['loss']:.4f}{extra} "
                f"{rec['images_per_s']:.1f} img/s {rec['seconds'] / 60:.1f} min")

    result = train_t2i(config, args.out, resume=args.resume, callback=callback,
                       stages=tuple(args.stages.split(",")), device=args.device)
    result["wall_minutes"] = (time.perf_counter() - t0) / 60
    return result


@torch.no_grad()
def eval_autoencoder(run: Path, test, n: int, device: str = "cpu") -> dict:
    ae, _ = load_autoencoder(run / "autoencoder", device=device)
    x = to_float(test.images[:n])
    rec = torch.cat([ae.decode(ae.encode(x[i:i + 100].to(device)).mode()).clamp(-1, 1).cpu()
                     for i in range(0, n, 100)])
    p = psnr(x, rec)
    mse = (rec - x).pow(2).mean()
    res = adherence(rec, test.captions[:n], reference=test.images[:n])
    return {"n": n, "psnr_mean": float(p.mean()), "psnr_of_mean_mse": float(10 * torch.log10(
        4 / mse)), "rfid": res["fid"], "rfid_label": res["label"],
        "recon_class": res["class_accuracy"], "recon_position": res["position_accuracy"],
        "recon_size": res["size_accuracy"], "scale_factor": ae.scale_factor}


def throughput(run: Path, training: dict, card: str | None) -> dict:
    """Per stage: optimizer steps, images, seconds, images/s and (on a known card) MFU."""
    from difflab.train import checkpoint as ckpt

    flops = training_flops(run)
    peak = spec_peak(card) if card else None
    out = {}
    for stage, sub in (("autoencoder", run / "autoencoder"), ("diffusion", run)):
        summary = training.get(stage)
        if not summary:
            continue
        batch = int(ckpt.read(sub / "checkpoint").config["train"]["batch_size"])
        ips = summary["steps"] * batch / max(summary["seconds"], 1e-9)
        rec = {"steps": summary["steps"], "batch_size": batch, "seconds": summary["seconds"],
               "images_per_s": ips, "train_gflop_per_image": flops[stage] / 1e9,
               "model_tflops": ips * flops[stage] / 1e12}
        if peak:
            rec["peak_tflops"] = peak
            rec["mfu"] = rec["model_tflops"] / peak
        out[stage] = rec
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/t2i_bench")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="both stages together")
    ap.add_argument("--ae-minutes", type=float, default=18.0, help="stage 1's share")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stages", default="autoencoder,diffusion")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="config override")
    ap.add_argument("--cfgs", default="0,1,3")
    ap.add_argument("--steps", type=int, default=15, help="dpmpp_2m steps")
    ap.add_argument("--held-repeats", type=int, default=9)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--grid", default="docs/results/t2i_grid.png")
    ap.add_argument("--grid-cfg", type=float, default=None, help="default: the best cfg")
    ap.add_argument("--json", default="docs/results/t2i.json")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training and sampling)")
    ap.add_argument("--precomputed", default=None, metavar="FILE",
                    help="train with these precomputed caption encodings (precompute_text)")
    ap.add_argument("--precompute", default=None, metavar="FILE",
                    help="write the preset encoder's encodings of every canvas caption, exit")
    args = ap.parse_args()
    if args.precompute:
        from difflab.conditioning.text import build_text_encoder, precompute_text

        enc = build_text_encoder(t2i_config("t2i_canvas")["text_encoder"])
        log(f"wrote {precompute_text(enc, all_captions(), args.precompute)}")
        return 0
    torch.set_num_threads(args.threads)
    run = Path(args.out)
    report: dict = {"command": " ".join(sys.argv), "threads": args.threads,
                    "machine": platform.processor() or platform.machine(),
                    "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "device": args.device, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        report["card"] = torch.cuda.get_device_name(0)
    if not args.eval_only:
        log(f"training into {run} (budget {args.max_minutes} min, autoencoder "
            f"{args.ae_minutes} min)")
        result = train(args)
        report["training"] = {k: v for k, v in result.items()}
        if "diffusion" not in args.stages:
            log(json.dumps(report["training"], default=str))
            return 0
    report["stages"] = stage_state(run)
    if not args.eval_only:
        report["throughput"] = throughput(run, report["training"], report.get("card"))
        log(f"throughput: {json.dumps(report['throughput'])}")
    test = canvas_dataset("test", n=max(args.n_test, 1000), seed=1)
    t0 = time.perf_counter()
    report["autoencoder"] = eval_autoencoder(run, test, args.n_test, args.device)
    log(f"autoencoder: {json.dumps(report['autoencoder'])} "
        f"({time.perf_counter() - t0:.0f} s)")
    # the evaluator on real canvases: its ceiling on these prompts
    real = adherence(test.images[:args.n_test], test.captions[:args.n_test])
    held = test.extras["held_out"][:args.n_test]
    per = real["per_image"]
    report["real"] = {part: {k: float(per[f"correct_{k}"][sel].float().mean())
                             for k in ("class", "position", "size")} | {"n": int(sel.sum())}
                      for part, sel in (("all", torch.ones_like(held)), ("seen", ~held),
                                        ("held_out", held))}
    log(f"real test canvases: {json.dumps(report['real'])}")
    held_prompts = [caption(*h) for h in HELD_OUT]
    prompts = all_captions() + held_prompts * args.held_repeats
    cfgs = [float(w) for w in args.cfgs.split(",")]
    res = evaluate_prompts(run, prompts, cfgs=cfgs, steps=args.steps, sampler="dpmpp_2m",
                           seed=0, batch_size=100, device=args.device,
                           on_record=lambda r: log(format_record(r)))
    report["adherence"] = res["results"]
    report["prompts"] = {"n": len(prompts), "compositions": 180,
                         "held_out_images": len(held_prompts) * (args.held_repeats + 1),
                         "sampler": "dpmpp_2m", "steps": args.steps}
    best = max(res["results"], key=lambda r: r["all"]["class"] + r["all"]["position"]
               + r["all"]["size"])
    w = args.grid_cfg if args.grid_cfg is not None else best["cfg"]
    pipe = TextToImagePipeline.from_checkpoint(run, device=args.device)
    grid_prompts = [p for p in GRID_PROMPTS for _ in range(2)]
    images = pipe(grid_prompts, cfg=w, sampler="dpmpp_2m", steps=args.steps, seed=1)
    write_captioned_grid(images, grid_prompts, args.grid, nrow=8)
    report["grid"] = {"path": args.grid, "cfg": w, "held_out_rows": "first 5 prompts (x2)"}
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    log(f"wrote {args.json} and {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
