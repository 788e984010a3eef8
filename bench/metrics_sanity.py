"""Sanity table for the offline metrics: how large are FID-FMNIST / FID-MNIST numbers?

    python bench/metrics_sanity.py                  # writes docs/results/metrics.md
    python bench/metrics_sanity.py --quick          # 2k reference, fewer KID subsets

Rows (each against the default reference of ``difflab eval``: a fixed random subset of the
*train* split, 10,000 images for Fashion-MNIST, all 4,500 for MNIST 5k):

* test split at 2k / 5k / 10k images - the floor a perfect generator reaches (finite-sample
  bias of FID shrinks like 1/N),
* test images + Gaussian noise (std 0.1, 0.3 in the [-1, 1] scale, clamped),
* test images blurred (Gaussian, sigma 1 px),
* the other data set (MNIST digits under the Fashion-MNIST net and vice versa): "totally wrong".

The page also lists the shipped feature networks with their test accuracy and the command
that made them (read from ``src/difflab/assets/feature_*.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.data import load_dataset, to_float, to_uint8
from difflab.metrics import load_feature_net
from difflab.metrics.evaluate import evaluate_features
from difflab.metrics.features import ASSETS
from difflab.metrics.reference import reference_stats

ROOT = Path(__file__).resolve().parent.parent


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, reflect padding) of float NCHW images."""
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1).contiguous(), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1).contiguous(), groups=c)


def subset(images: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[perm[:n]]


def rows_for(dataset: str, net: str, other: str, n_ref: int | None, sizes: list[int],
             kid_subsets: int) -> list[dict]:
    ext = load_feature_net(net)
    t0 = time.time()
    ref = reference_stats(dataset, ext, split="train", n=n_ref)
    test = load_dataset(dataset, split="test").images
    g = torch.Generator().manual_seed(0)
    x = to_float(test)
    cases: list[tuple[str, torch.Tensor]] = []
    for n in sizes:
        if n <= test.shape[0]:
            cases.append((f"test split, {n} images", subset(test, n)))
    cases += [
        ("test + noise std 0.1", to_uint8((x + 0.1 * torch.randn(x.shape, generator=g))
                                          .clamp(-1, 1))),
        ("test + noise std 0.3", to_uint8((x + 0.3 * torch.randn(x.shape, generator=g))
                                          .clamp(-1, 1))),
        ("test blurred, sigma 1 px", to_uint8(gaussian_blur(x, 1.0))),
        (f"{other} test images (wrong data set)",
         subset(load_dataset(other, split="test").images, test.shape[0])),
    ]
    rows = []
    for name, imgs in cases:
        rec = evaluate_features(ext(imgs), ref, kid_subsets=kid_subsets, seed=0)
        rows.append({"data": dataset, "net": ext.label, "case": name, **rec})
        print(f"{dataset:14s} {name:36s} {ext.label} {rec['fid']:9.3f} KID {rec['kid']:.5f} "
              f"P {rec['precision']:.3f} R {rec['recall']:.3f} (n={rec['n']}, "
              f"ref {rec['n_ref']})", flush=True)
    print(f"{dataset}: {time.time() - t0:.0f}s")
    return rows


def feature_net_table() -> list[str]:
    lines = ["| name | label | trained on | test accuracy | params | file size | command |",
             "|---|---|---|---|---|---|---|"]
    for cfg_path in sorted(ASSETS.glob("feature_*.json")):
        cfg = json.loads(cfg_path.read_text())
        ext = load_feature_net(cfg_path.with_suffix(".safetensors"))
        params = sum(p.numel() for p in ext.net.parameters())
        size = cfg_path.with_suffix(".safetensors").stat().st_size / 1e6
        command = f"`{cfg['command']}`"
        if cfg.get("calibration_command"):  # feature_scale added after training
            command += f", then `{cfg['calibration_command']}`"
        lines.append(f"| `{cfg['name']}` | {ext.label} | {cfg['dataset']} train "
                     f"({cfg['train_size']}) | {100 * cfg['test_accuracy']:.2f}% on "
                     f"{cfg['test_size']} test images | {params:,} | {size:.2f} MB | "
                     f"{command} ({cfg['train_seconds'] / 60:.0f} min, "
                     f"{cfg['machine']}) |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "metrics.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    kid_subsets = 20 if args.quick else 100
    rows = rows_for("fashion_mnist", "fmnist", "mnist5k", 2000 if args.quick else 10000,
                    [2000] if args.quick else [2000, 5000, 10000], kid_subsets)
    rows += rows_for("mnist5k", "mnist", "fashion_mnist", None, [500], kid_subsets)
    seconds = time.time() - t0

    cmd = "python bench/metrics_sanity.py" + (" --quick" if args.quick else "")
    md = [
        "# Metrics: offline feature networks and the scale of their numbers",
        "",
        f"Command: `{cmd}` (torch threads = {args.threads}; {seconds / 60:.1f} min). "
        f"Machine: 2-core CPU (CI-class), {platform.python_implementation()} "
        f"{platform.python_version()}, torch {torch.__version__}. Date: "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "**FID-FMNIST / FID-MNIST are not Inception FID.** They are Frechet distances in the "
        "128-d penultimate layer of small classifiers that difflab trains on the data set "
        "itself (below); compare them only with each other, at the same sample count and "
        "reference. Inception FID needs pytorch-fid's weights file "
        "(`--feature-net inception:/path/to/pt_inception-2015-12-05-6726825d.pth`).",
        "",
        "## Shipped feature networks",
        "",
        *feature_net_table(),
        "",
        "Features = penultimate layer (128-d, after ReLU), times the fixed `feature_scale` "
        "that gives them unit mean square on the training split (so KID's cubic kernel "
        "(x.y/d + 1)^3 is well-scaled). Input: images resized to 28x28 grayscale, in [-1, 1]; "
        "float samples are quantised to 8 bits first, as when saved.",
        "",
        "## Sanity table",
        "",
        "Reference: a fixed random subset (seed 0) of the **train** split: "
        f"{rows[0]['n_ref']} Fashion-MNIST images; all {rows[-1]['n_ref']} MNIST-5k train "
        "images (mnist5k: 450 train / 50 test per class). The test images are disjoint from "
        "the reference and from the feature networks' training data (both the train split). "
        f"KID: {kid_subsets} subsets of min(1000, n) images, mean +- std over subsets (x 1e3). "
        "Precision / recall: k = 3 nearest-neighbour balls, on equal-size random subsets of "
        "the two sets. At n = 500 they are noisy: the MNIST wrong-data-set precision was 0.59 "
        "in a run with 20 KID subsets, which left the random generator elsewhere and so "
        "drew another 500 of the 4500 reference points.",
        "",
        "| data | metric | images | FID | KID (x 1e3) | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(f"| {r['data']} | {r['net']} | {r['case']} (n={r['n']}) | {r['fid']:.3f} | "
                  f"{1e3 * r['kid']:.3f} +- {1e3 * r['kid_std']:.3f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} |")
    md += [
        "",
        "How to read it: the *test split* rows are the floor of a perfect model at that "
        "sample count (FID's finite-sample bias, which falls as n grows; KID is unbiased and "
        "stays near 0). Compare a model's FID-FMNIST with the noise / blur rows to judge how "
        "visible its defects are; the wrong-data-set row is the ceiling of \"nothing alike\".",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    json_out = out.with_suffix(".json")
    json_out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out} and {json_out}")


if __name__ == "__main__":
    main()
