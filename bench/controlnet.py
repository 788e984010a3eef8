"""ControlNet benchmark: edge agreement, FID and training cost of a Canny ControlNet trained on a
pixel Fashion-MNIST model (issue #19).

The ControlNet is trained beforehand on the command line (the budget is the run's
``--max-minutes``):

    difflab train fashion_mnist --max-minutes 10 --out runs/fm_base --set train.fit_steps=[]
    difflab train-controlnet runs/fm_base --control canny --max-minutes 30 --threads 2 \\
        --out runs/fm_base_canny
    python bench/controlnet.py --base runs/fm_base --controlnet runs/fm_base_canny

Measured here, on the same control images (Canny edges, thresholds low=100 / high=200 on 8-bit
grey, of the first ``--n`` Fashion-MNIST *test* images):

* edge F1 with 1-pixel tolerance between the control edges E and the Canny edges S of a sample
  (same thresholds): precision = |S within 1 px (3x3) of E| / |S|, recall = |E within 1 px of
  S| / |E|, F1 = 2PR / (P + R), pooled over all pixels of all images; for the controlled model,
  the uncontrolled base (floor; same noise), the real images the edges came from (ceiling; 1 by
  construction: a check of the metric) and the controlled model given a shuffled control image
  (image i gets image i+1's edges; scored against image i's);
* FID (the ``fmnist`` feature network, ``difflab.metrics.evaluate``, 10,000 training images as
  the reference) of the controlled and the base model's samples (same count, same sampler);
* the training cost per optimizer step of the ControlNet (through the frozen base) and of the
  base model itself, measured side by side in this one process (alternating blocks of steps,
  the same batch size, threads and data; median step time).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def edge_f1(pred: torch.Tensor, ref: torch.Tensor, tol: int = 1) -> dict[str, float]:
    """Pooled precision, recall and F1 of binary edge maps ``pred`` vs ``ref`` (N, 1, H, W)
    with a tolerance of ``tol`` pixels (Chebyshev: a (2 tol + 1)^2 window)."""
    pred, ref = pred.bool(), ref.bool()

    def dilate(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x.float(), 2 * tol + 1, stride=1, padding=tol) > 0

    p = float((pred & dilate(ref)).sum()) / max(1, int(pred.sum()))
    r = float((ref & dilate(pred)).sum()) / max(1, int(ref.sum()))
    return {"precision": p, "recall": r, "f1": 0.0 if p + r == 0 else 2 * p * r / (p + r),
            "edge_px_per_image": float(pred.sum()) / len(pred)}


def sample_with(den, noise: torch.Tensor, cond, steps: int, batch: int = 250) -> torch.Tensor:
    from difflab.commands.model import image_generators
    from difflab.denoiser import Condition
    from difflab.samplers import sample

    out = []
    with torch.no_grad():
        for i in range(0, len(noise), batch):
            j = min(len(noise), i + batch)
            c = None if cond is None else Condition(control=cond[i:j])
            out.append(sample(den, noise[i:j], cond=c, sampler="dpmpp_2m", steps=steps,
                              generator=image_generators(0, i, j)).float())
    return torch.cat(out).clamp(-1, 1)


def step_costs(base_run: Path, cn_run: Path, steps: int, rounds: int, n_data: int = 4096
               ) -> dict[str, float]:
    """Median seconds per optimizer step of the base model's own training and of the
    ControlNet's, alternating ``rounds`` blocks of ``steps`` steps each (after 3 warm-up
    steps each), same batch size and data."""
    from difflab.data import load_dataset
    from difflab.train import checkpoint as ckpt
    from difflab.train import controlnet as TC
    from difflab.train.trainer import Trainer

    images = torch.as_tensor(load_dataset("fashion_mnist", split="train").images[:n_data])
    bcfg = json.loads((base_run / "config.json").read_text())
    ccfg = ckpt.read(cn_run).config
    ccfg = copy.deepcopy(ccfg)
    ccfg["train"]["batch_size"] = bcfg["train"]["batch_size"]
    den, _ = ckpt.load_denoiser(base_run)
    net = copy.deepcopy(den.net).requires_grad_(True)
    base_tr = Trainer(bcfg, None, data=(images, None), net=net)
    c = ccfg["control"]
    cn_tr = TC.controlnet_trainer(ccfg, None, data={
        "image": images, "control": TC.control_images(images, c["preprocessor"],
                                                       c["options"])})
    for tr in (base_tr, cn_tr):
        for _ in range(3):
            tr.train_step()
    times: dict[str, list[float]] = {"base": [], "controlnet": []}
    for _ in range(rounds):
        for name, tr in (("base", base_tr), ("controlnet", cn_tr)):
            t0 = time.perf_counter()
            for _ in range(steps):
                tr.train_step()
            times[name].append((time.perf_counter() - t0) / steps)
    out = {f"{k}_s_per_step": statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["controlnet_s_per_step"] / out["base_s_per_step"]
    out["batch_size"] = int(bcfg["train"]["batch_size"])
    out["rounds"], out["steps_per_round"] = rounds, steps
    out["trainable_params"] = {
        "base": sum(p.numel() for p in base_tr.params),
        "controlnet": sum(p.numel() for p in cn_tr.params)}
    return out


def write_page(r: dict, path: Path, grid: Path) -> None:
    """docs/results/controlnet.md from the result dict (command first)."""
    f1, fid, ct = r["edge_f1"], r["fid"], r.get("step_cost")
    tr = r["controlnet_training"]
    rel = Path("..") / grid.relative_to(ROOT / "docs") if grid.is_relative_to(ROOT / "docs") \
        else grid
    cmp_rel = rel.with_name(rel.stem + "_compare.png")
    lines = [
        "# ControlNet: a Canny ControlNet on a pixel Fashion-MNIST model (issue #19)", "",
        "```", r["train_command"], r["command"], "```", "",
        f"{r['date']}; {r['machine']}; a 2-core CPU shared with other jobs (load below).", "",
        f"Base: `{r['base']}` ({r['base_training']['steps']} steps, "
        f"{r['base_training']['minutes']:.1f} min). ControlNet: `{r['controlnet']}`, "
        f"{tr['steps']} steps of batch {tr['batch_size']} (lr {tr['lr']:g}) in "
        f"{tr['minutes']:.1f} min of training. Control: Canny (`cv2.Canny`, low "
        f"{r['canny']['low']:g}, high {r['canny']['high']:g} on 8-bit grey) of the first "
        f"{r['n']} Fashion-MNIST test images; samples: {r['sampler']}, EMA weights, the same "
        "noise for every model.", "",
        "## Edge agreement (F1, 1-pixel tolerance, pooled over all pixels)", "",
        "| samples | precision | recall | F1 | edge px / image | F1, exact pixels (0 px) |",
        "|---|---|---|---|---|---|"]
    names = {"controlled": "controlled (its control image)",
             "base": "uncontrolled base (floor)",
             "shuffled": "controlled, shuffled control image (scored vs the true one)",
             "real": "real images the edges came from (ceiling)"}
    for k in ("controlled", "base", "shuffled", "real"):
        v = f1[k]
        lines.append(f"| {names[k]} | {v['precision']:.3f} | {v['recall']:.3f} | "
                     f"**{v['f1']:.3f}** | {v['edge_px_per_image']:.1f} | "
                     f"{r['edge_f1_exact'][k]['f1']:.3f} |")
    lines += ["", f"Controlled / floor: **{r['f1_over_floor']:.2f}x**.", "",
              "## FID (`fmnist` feature network; reference: 10,000 training images)", "",
              "| samples | FID | precision | recall |", "|---|---|---|---|"]
    for k in ("controlled", "base", "shuffled", "real"):
        v = fid[k]
        lines.append(f"| {names[k]} | {v['fid']:.2f} | {v['precision']:.3f} | "
                     f"{v['recall']:.3f} |")
    lines += ["", f"Controlled / base FID: **{r['fid_ratio']:.2f}x** ({r['n']} samples each; "
              "FID of this few samples is biased upwards, equally for both)."]
    if ct:
        lines += ["", "## Training cost per optimizer step (side by side, one process)", "",
                  f"Batch {ct['batch_size']}, {ct['rounds']} alternating rounds of "
                  f"{ct['steps_per_round']} steps each, median:", "",
                  "| training | s / step | trainable parameters |", "|---|---|---|",
                  f"| base model (its own diffusion training) | {ct['base_s_per_step']:.3f} | "
                  f"{ct['trainable_params']['base']:,} |",
                  f"| ControlNet (through the frozen base) | "
                  f"{ct['controlnet_s_per_step']:.3f} | "
                  f"{ct['trainable_params']['controlnet']:,} |", "",
                  f"Ratio: **{ct['ratio']:.2f}x**."]
    lines += ["", "## Grids", "",
              f"Control | sample pairs (32): ![pairs]({rel})", "",
              "Columns: control edges | controlled | base (same noise) | controlled with the "
              f"next image's edges | the real image: ![compare]({cmp_rel})", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/fm_base")
    p.add_argument("--controlnet", default="runs/fm_base_canny")
    p.add_argument("--n", type=int, default=1000, help="control images / samples per model")
    p.add_argument("--steps", type=int, default=20, help="dpmpp_2m steps")
    p.add_argument("--cost-steps", type=int, default=10)
    p.add_argument("--cost-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "controlnet.json"))
    p.add_argument("--grid", default=str(ROOT / "docs" / "controlnet_grid.png"))
    p.add_argument("--page", default=str(ROOT / "docs" / "results" / "controlnet.md"))
    p.add_argument("--train-command", default=(
        "difflab train-controlnet runs/fm_base --control canny --max-minutes 30 --threads 1 "
        "--batch-size 32 --out runs/fm_base_canny --set train.ema_decay=0.995"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from difflab.commands.controlnet import ControlledSamples, write_pairs
    from difflab.data import load_dataset
    from difflab.data.dataset import to_float
    from difflab.metrics import evaluate
    from difflab.train import checkpoint as ckpt
    from difflab.train import controlnet as TC
    from difflab.train.monitor import save_grid

    t_start = time.perf_counter()
    base_run, cn_run = Path(args.base), Path(args.controlnet)
    ck = ckpt.read(cn_run)
    opts = ck.config["control"]["options"]
    state = ck.state()
    base_state = ckpt.read(base_run).state()
    result: dict = {
        "command": "python " + " ".join(sys.argv), "train_command": args.train_command,
        "base": str(base_run), "controlnet": str(cn_run),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "canny": opts, "tolerance_px": 1, "n": args.n, "sampler": f"dpmpp_2m {args.steps} steps",
        "controlnet_training": {"steps": state.get("step"),
                                "minutes": state.get("train_seconds", 0) / 60,
                                "batch_size": ck.config["train"]["batch_size"],
                                "lr": ck.config["train"]["lr"]},
        "base_training": {"steps": base_state.get("step"),
                          "minutes": base_state.get("train_seconds", 0) / 60}}
    print(json.dumps(result, indent=1), flush=True)

    test = torch.as_tensor(load_dataset("fashion_mnist", split="test").images[:args.n])
    real = to_float(test)
    edges = TC.control_images(test, "canny", opts).float()
    shuffled = edges.roll(1, 0)
    cden, _ = TC.load_controlled([cn_run])
    bden, _ = ckpt.load_denoiser(base_run)
    noise = torch.randn((args.n, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    xs = {"controlled": sample_with(cden, noise, edges, args.steps)}
    t_ctrl = time.perf_counter() - t0
    t0 = time.perf_counter()
    xs["base"] = sample_with(bden, noise, None, args.steps)
    t_base = time.perf_counter() - t0
    xs["shuffled"] = sample_with(cden, noise, shuffled, args.steps)
    xs["real"] = real
    result["sampling_s"] = {"controlled": t_ctrl, "base": t_base}

    f1 = {}
    f1_exact = {}
    for name, x in xs.items():
        s_edges = TC.control_images(x, "canny", opts)
        f1[name] = edge_f1(s_edges, edges)
        f1_exact[name] = edge_f1(s_edges, edges, tol=0)
    result["edge_f1_exact"] = f1_exact
    result["edge_f1"] = f1
    result["f1_over_floor"] = f1["controlled"]["f1"] / max(1e-9, f1["base"]["f1"])
    print(json.dumps({"edge_f1": f1}, indent=1), flush=True)

    fid = {}
    for name, x in xs.items():
        r = evaluate(x, "fashion_mnist", feature_net="fmnist", n=10000, split="train")
        fid[name] = {"fid": r["fid"], "precision": r["precision"], "recall": r["recall"]}
    result["fid"] = fid
    result["fid_ratio"] = fid["controlled"]["fid"] / fid["base"]["fid"]
    print(json.dumps({"fid": fid}, indent=1), flush=True)

    grid = Path(args.grid)
    k = 32
    write_pairs(ControlledSamples(xs["controlled"][:k], [edges[:k]], None), grid,
                pairs_per_row=8, overwrite=True)
    # comparison: control | controlled | base (same noise) | shuffled-control sample | real
    m = 10
    cols = [edges[:m] * 2 - 1, xs["controlled"][:m], xs["base"][:m], xs["shuffled"][:m],
            real[:m]]
    save_grid(torch.stack(cols, 1).reshape(-1, 1, 28, 28),
              grid.with_name(grid.stem + "_compare.png"), nrow=len(cols), scale=2)

    if not args.skip_cost:
        result["step_cost"] = step_costs(base_run, cn_run, args.cost_steps, args.cost_rounds)
        print(json.dumps({"step_cost": result["step_cost"]}, indent=1), flush=True)
    result["bench_seconds"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    write_page(result, Path(args.page), grid.resolve())
    print(f"wrote {args.out}, {args.page}, {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
