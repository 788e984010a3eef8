"""GPU training benchmark: the Fashion-MNIST preset trained for a few minutes on one GPU.

    python bench/train_gpu.py --out DIR --minutes 3          # on a machine with CUDA
    python bench/train_gpu.py --report DIR/results.json      # here: the page from its results

One script, one run, phases in order; DIR/results.json is rewritten after each, so a run cut
short still reports what it measured:

1. peak   dense bf16 matrix-product throughput of this card (8192^3, mean of 10 after 3
          warm-ups) beside the data-sheet figure for its name.
2. sweep  images/s of the preset's training step (``difflab.train.Trainer``, the code a user
          runs; batch ``--batch``) in set-ups fp32 / bf16 autocast / + channels_last /
          + torch.compile (default mode, and "reduce-overhead": CUDA graphs): ``--warmup``
          steps (compilation included), then ``--timed`` steps between two device
          synchronisations. Model FLOP utilisation (MFU) = images/s x training FLOPs per
          image (FlopCounterMode: forward x 3) / peak.
3. train  the fastest set-up goes on training (the sweep's steps included) for ``--minutes``
          more; EMA weights -> DIR/ckpt (checkpoint.json, net[.ema].safetensors, state.json).
4. eval   FID-FMNIST (the shipped Fashion-MNIST classifier features, reference: 10,000
          training images) of 10,000 samples and of the first 1,000 (the CPU benchmark's
          ``bench/train.py`` protocol), dpmpp_2m at 10 and 20 NFE; a sample grid.
5. tune   ``difflab tune-grid`` on the GPU: unipc at 5 and 10 steps, ``--tune-count``
          calibration images -> DIR/ckpt/grids.json (bench/samplers_real.py reads it here).

``--report`` writes docs/results/train_gpu.md from a results.json, marked with the card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NFES = (10, 20)
# data-sheet dense bf16 tensor-core peaks (no sparsity), TFLOP/s
SPEC_BF16 = {"H100 80GB HBM3": 989.4, "H100": 989.4, "H200": 989.4, "A100": 312.0,
             "L40S": 362.0, "RTX 4090": 165.2}
SETUPS = {  # name -> train overrides
    "fp32 (TF32 matmul)": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16 + channels_last": {"precision": "bf16", "channels_last": True},
    "bf16 + compile": {"precision": "bf16", "compile": True},
    "bf16 + channels_last + compile": {"precision": "bf16", "channels_last": True,
                                       "compile": True},
    "bf16 + channels_last + compile (CUDA graphs)": {
        "precision": "bf16", "channels_last": True, "compile": "reduce-overhead"},
}


def spec_peak(name: str) -> float | None:
    for key, v in SPEC_BF16.items():
        if key in name:
            return v
    return None


def measure_peak(device: torch.device, n: int = 8192) -> float:
    """Dense bf16 matmul TFLOP/s (mean of 10 products after 3 warm-ups)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_image(net: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn((8,) + shape, device=device), torch.rand(8, device=device) * 999
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x, t)
    return 3 * fc.get_total_flops() / 8  # forward + backward ~ 3 x forward


def config_for(setup: dict, args: argparse.Namespace) -> dict:
    from difflab.train import apply_overrides, preset

    over = [f"train.batch_size={args.batch}", f"train.lr={args.lr}", "train.warmup=200",
            "train.sample_every=0", "train.ckpt_every=0", "train.steps=10000000",
            "train.log_every=50", "train.grid_size=0", "train.max_minutes=null"]
    over += [f"train.{k}={json.dumps(v)}" for k, v in setup.items()]
    return apply_overrides(preset("fashion_mnist"), over)


def timed_steps(trainer, n: int, device: torch.device) -> float:
    """Seconds for n optimizer steps, between two device synchronisations."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        loss = trainer._step()
    float(loss)  # waits for the last step
    return time.perf_counter() - t0


def save(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def run(args: argparse.Namespace) -> None:
    from difflab.train.trainer import Trainer, load_training_data

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    results: dict = {"device": name, "torch": torch.__version__,
                     "python": platform.python_version(),
                     "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
                     "batch": args.batch, "lr": args.lr}
    # 1. peak
    results["peak_tflops_measured"] = measure_peak(device)
    results["peak_tflops_spec"] = spec_peak(name)
    print(f"[peak] {name}: {results['peak_tflops_measured']:.0f} TFLOP/s bf16 measured, "
          f"spec {results['peak_tflops_spec']}", flush=True)
    save(results, out)
    # 2. sweep
    base = config_for({}, args)
    data = load_training_data(base["data"], base["train"]["seed"])
    sweep, trainers = {}, {}
    for label, setup in SETUPS.items():
        if args.setups and label not in args.setups:
            continue
        try:
            tag = "".join(c for c in label if c.isalnum())
            tr = Trainer(config_for(setup, args), Path(args.work) / tag,
                         data=data, device=str(device))
            t0 = time.perf_counter()
            timed_steps(tr, args.warmup, device)
            warm_s = time.perf_counter() - t0
            sec = timed_steps(tr, args.timed, device)
            ips = args.timed * args.batch / sec
            if "flops_per_image" not in results:
                results["flops_per_image"] = flops_per_image(tr.net, tuple(data[0].shape[1:]),
                                                             device)
            mfu = ips * results["flops_per_image"] / 1e12
            sweep[label] = {"images_per_s": ips, "steps_per_s": args.timed / sec,
                            "warmup_s": warm_s, "achieved_tflops": mfu,
                            "loss": float(tr._step())}
            trainers[label] = tr
            print(f"[sweep] {label:48s} {ips:10.0f} img/s  {mfu:6.2f} TFLOP/s  "
                  f"(warm-up {warm_s:.1f} s)", flush=True)
        except Exception as e:  # a set-up this card / torch build cannot run is reported
            sweep[label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"[sweep] {label}: FAILED {e}", flush=True)
            traceback.print_exc()
        results["sweep"] = sweep
        save(results, out)
    # 3. train the fastest set-up further
    ok = {k: v for k, v in sweep.items() if "images_per_s" in v}
    best = max(ok, key=lambda k: ok[k]["images_per_s"])
    tr = trainers[best]
    for k in list(trainers):
        if k != best:
            del trainers[k]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    left_min = (args.deadline - (time.perf_counter() - t_start) - args.reserve) / 60
    minutes = max(0.1, min(args.minutes, left_min))
    steps_before = tr.step
    t0 = time.perf_counter()
    summary = tr.run(max_minutes=minutes)
    wall = time.perf_counter() - t0
    ckpt = out / "ckpt"
    ckpt.mkdir(exist_ok=True)
    src = Path(summary["checkpoint"])
    for f in ("checkpoint.json", "net.json", "schedule.json", "net.ema.safetensors",
              "net.safetensors", "state.json"):  # no optimizer
        (ckpt / f).write_bytes((src / f).read_bytes())
    results["train"] = {"setup": best, "minutes": minutes, "steps": tr.step,
                        "steps_in_run": tr.step - steps_before, "seconds_in_run": wall,
                        "images_per_s": (tr.step - steps_before) * args.batch / wall,
                        "images_seen": tr.step * args.batch, "final_loss": summary["loss"],
                        "epochs": tr.step * args.batch / len(data[0])}
    results["train"]["achieved_tflops"] = (results["train"]["images_per_s"]
                                           * results["flops_per_image"] / 1e12)
    print(f"[train] {best}: {tr.step} steps, {results['train']['images_per_s']:.0f} img/s "
          f"over the run, loss {summary['loss']:.4f}", flush=True)
    save(results, out)
    del tr, trainers
    # 4. FID
    results["fid"] = evaluate(ckpt, device, args.samples, out)
    save(results, out)
    # 5. tuned grids on the GPU
    if args.tune_count:
        cmd = [sys.executable, "-m", "difflab.cli", "tune-grid", str(ckpt), "--sampler", "unipc",
               "--steps", "5", "10", "--count", str(args.tune_count), "--device", str(device),
               "--batch-size", "1024", "--max-evals", str(args.tune_evals)]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        print(p.stdout + p.stderr, flush=True)
        results["tune"] = {"command": " ".join(cmd[1:]), "returncode": p.returncode,
                           "stdout": p.stdout[-2000:], "seconds": time.perf_counter() - t0}
        save(results, out)
    results["seconds_total"] = time.perf_counter() - t_start
    save(results, out)


def profile(args: argparse.Namespace) -> None:
    """Where one training step's time goes: torch.profiler over ``--timed`` steps of each
    ``--setups`` set-up (default: bf16), tables sorted by device and by host time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from difflab.train.trainer import Trainer, load_training_data

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    base = config_for({}, args)
    data = load_training_data(base["data"], base["train"]["seed"])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for label in args.setups or ["bf16"]:
        tr = Trainer(config_for(SETUPS[label], args), Path(args.work) / "profile", data=data,
                     device=str(device))
        timed_steps(tr, args.warmup, device)
        with torch_profile(activities=acts) as prof:
            sec = timed_steps(tr, args.timed, device)
        print(f"[profile] {label}: {1e3 * sec / args.timed:.2f} ms per step", flush=True)
        for key in (["cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60),
                  flush=True)


def evaluate(ckpt: Path, device: torch.device, n: int, out: Path) -> dict:
    from difflab.commands.eval import measure_samples
    from difflab.commands.model import Solver, load_model, sample_images
    from difflab.metrics import load_feature_net
    from difflab.metrics.evaluate import evaluate_features, resolve_reference
    from difflab.train.monitor import save_grid

    model = load_model(ckpt, device=str(device))
    extractor = load_feature_net("fmnist")
    ref = resolve_reference("fashion_mnist", extractor, split="train", n=10000)
    res = {}
    for nfe in NFES:  # dpmpp_2m on its default grid (no stored fit)
        samples = sample_images(model, Solver("dpmpp_2m", nfe), n, seed=123, batch_size=2000)
        x, cost = measure_samples(samples)
        f = extractor(x)
        full = evaluate_features(f, ref, kid_subsets=20)
        small = evaluate_features(f[:1000], ref, kid_subsets=20)
        res[f"dpmpp_2m_{nfe}"] = {"fid": full["fid"], "kid": full["kid"], "n": n,
                                  "fid_1000": small["fid"], "seconds": cost["seconds"],
                                  "precision": full.get("precision"),
                                  "recall": full.get("recall")}
        print(f"[fid] dpmpp_2m {nfe} NFE: FID-FMNIST {full['fid']:.2f} ({n} samples), "
              f"{small['fid']:.2f} (first 1000); sampling {cost['seconds']:.1f} s", flush=True)
        if nfe == NFES[-1]:
            save_grid(x[:100], out / "train_gpu_samples.png", nrow=10, scale=2)
    return res


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def profile_summary(text: str, steps: int, batch: int) -> str:
    """A table from a ``--profile`` log: per set-up the step time and the host (CPU) and device
    (CUDA) time the profiler counted per step."""
    import re

    rows = ["| set-up (profiled) | ms per step | host ms per step | device ms per step |",
            "|---|---:|---:|---:|"]
    last = ""
    for block in text.split("[profile] ")[1:]:
        label, ms = re.match(r"(.+?): ([\d.]+) ms per step", block).groups()
        cpu = re.search(r"Self CPU time total: ([\d.]+)ms", block)
        dev = re.search(r"Self CUDA time total: ([\d.]+)ms", block)
        dev_ms = float(dev.group(1)) / steps if dev else None
        rows.append(f"| {label} | {float(ms):.1f} | {float(cpu.group(1)) / steps:.1f} | "
                    + (f"{dev_ms:.1f} |" if dev_ms else "- |"))
        if dev_ms:
            last = (f"\n\nWith {label}, the device computes {dev_ms:.1f} ms of each "
                    f"{float(ms):.1f} ms step ({100 * dev_ms / float(ms):.0f}%): the step is "
                    f"bound by host work (Python, the CPU draw of the batch and its noise, "
                    f"launches), and the device time alone would allow {1e3 * batch / dev_ms:.0f} "
                    f"images/s at batch {batch}.")
    return "\n".join(rows) + last


def report(path: Path, doc: Path, profile_log: Path | None = None,
           profile_steps: int = 20) -> None:
    r = json.loads(path.read_text())
    peak, spec = r["peak_tflops_measured"], r.get("peak_tflops_spec")
    fpi = r["flops_per_image"]
    lines = [
        f"# Training on a GPU: {r['device']}",
        "",
        f"Measured {r['date']} on **{r['device']}** (torch {r['torch']}), one process: "
        f"`{r['command']}`; this page: `python bench/train_gpu.py --report <results.json>`.",
        "",
        f"The `fashion_mnist` preset (the same U-Net and objective as on the CPU pages) at "
        f"batch {r['batch']}, lr {r['lr']}: {fpi / 1e9:.3f} GFLOP per training image "
        f"(FlopCounterMode, forward x 3). Peak: dense bf16 matrix product {peak:.0f} TFLOP/s "
        f"measured" + (f", {spec:.0f} TFLOP/s on the data sheet" if spec else "") + ". MFU is "
        "achieved model TFLOP/s over the measured peak.",
        "",
        "| set-up | images/s | steps/s | model TFLOP/s | MFU | warm-up (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, s in r.get("sweep", {}).items():
        if "error" in s:
            lines.append(f"| {label} | failed: {s['error'][:120]} | | | | |")
            continue
        lines.append(f"| {label} | {s['images_per_s']:.0f} | {s['steps_per_s']:.1f} | "
                     f"{s['achieved_tflops']:.2f} | {100 * s['achieved_tflops'] / peak:.2f}% | "
                     f"{s['warmup_s']:.1f} |")
    t = r.get("train")
    if t:
        lines += ["", f"**Training run**: {t['setup']}, {t['steps']} optimizer steps "
                  f"({t['epochs']:.1f} epochs, {t['images_seen']:,} images) in "
                  f"{t['seconds_in_run'] / 60:.1f} min after the sweep; {t['images_per_s']:.0f} "
                  f"images/s over the run (logging and EMA included), "
                  f"{100 * t['achieved_tflops'] / peak:.2f}% MFU; final loss "
                  f"{t['final_loss']:.4f}."]
    fid = r.get("fid")
    if fid:
        lines += ["", "| sampler | NFE | FID-FMNIST (10,000 samples) | FID-FMNIST (first 1,000) "
                  "| KID | sampling (s) |", "|---|---:|---:|---:|---:|---:|"]
        for key, v in fid.items():
            s, nfe = key.rsplit("_", 1)
            lines.append(f"| {s} | {nfe} | {v['fid']:.2f} | {v['fid_1000']:.2f} | "
                         f"{v['kid']:.4f} | {v['seconds']:.1f} |")
        lines += ["", "The 1,000-sample column is the protocol of the CPU benchmark "
                  "(`bench/train.py`, docs/results/train.md); FID from 1,000 samples is biased "
                  "upwards against 10,000.", "",
                  "![GPU samples](train_gpu_samples.png)"]
    if profile_log and profile_log.is_file():
        lines += ["", profile_summary(profile_log.read_text(), profile_steps, r["batch"])]
    tune = r.get("tune")
    if tune:
        lines += ["", f"Tuned grids on the GPU: `{tune['command']}` ({tune['seconds']:.0f} s):",
                  "", "```", tune["stdout"].strip(), "```"]
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/train_gpu"))
    ap.add_argument("--work", default="/tmp/train_gpu_work", help="the set-ups' run folders")
    ap.add_argument("--minutes", type=float, default=3.0, help="training after the sweep")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps per set-up")
    ap.add_argument("--timed", type=int, default=300, help="timed steps per set-up")
    ap.add_argument("--setups", nargs="*", default=None, help="subset of the set-up names")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--tune-count", type=int, default=512)
    ap.add_argument("--tune-evals", type=int, default=300)
    ap.add_argument("--deadline", type=float, default=480.0,
                    help="seconds for the whole script; training is shortened to fit")
    ap.add_argument("--reserve", type=float, default=120.0,
                    help="seconds kept for evaluation and tuning after training")
    ap.add_argument("--profile", action="store_true",
                    help="only profile --timed steps of each --setups set-up")
    ap.add_argument("--report", default=None, help="results.json -> docs page")
    ap.add_argument("--profile-log", default=None,
                    help="with --report: the output of a --profile run to summarise")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results" / "train_gpu.md"))
    args = ap.parse_args()
    if args.report:
        report(Path(args.report), Path(args.doc),
               Path(args.profile_log) if args.profile_log else None, args.timed)
    elif args.profile:
        profile(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
