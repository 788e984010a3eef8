"""``difflab eval``: FID / KID / precision / recall of a checkpoint or of saved images.

    difflab eval runs/fmnist/checkpoint --reference fashion_mnist --sampler dpmpp_2m,ddim \\
        --steps 5,10,20 --num 2000 --out eval.json --plot eval.png
    difflab eval samples.npy --reference fashion_mnist
    difflab eval my_images/ --reference stats.safetensors --feature-net fmnist

SOURCE is a checkpoint directory (sampled with every ``--sampler`` x ``--steps`` pair from the
same noise; the sampling cost is reported as network evaluations per image and seconds), a
``.npy`` array (uint8 NHWC / NCHW / NHW in 0..255, or float in [-1, 1]) or an image folder.
The JSON written by ``--out`` holds one record per (sampler, steps); ``--plot`` draws FID
against NFE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.cli import HelpFormatter

__all__ = ["register", "cmd_eval", "load_images", "default_feature_net", "sample_checkpoint"]

_F = HelpFormatter
_DEFAULT_NETS = {"fashion_mnist": "fmnist", "mnist5k": "mnist", "mnist10k": "mnist",
                 "mnist": "mnist"}


def default_feature_net(reference: str, requested: str | None) -> str:
    """``--feature-net`` or the shipped network that matches the reference data set."""
    if requested:
        return requested
    name = Path(reference).name if reference.endswith(".safetensors") else reference
    if reference.endswith(".safetensors"):
        meta = Path(reference).with_suffix(".json")
        if meta.is_file():
            net = json.loads(meta.read_text()).get("feature_net")
            if net:
                return net
    for key, net in _DEFAULT_NETS.items():
        if name.startswith(key):
            return net
    raise ValueError(f"no default feature network for reference {reference!r}; pass "
                     "--feature-net fmnist | mnist | inception:/path/to/pt_inception.pth")


def load_images(path: str | Path) -> tuple[Tensor, Tensor | None]:
    """Images (uint8 NCHW or float [-1, 1] NCHW) and labels (or None) from a .npy / folder."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist (expected a checkpoint directory, a .npy "
                                "file or an image folder)")
    if p.suffix == ".npy":
        a = torch.from_numpy(np.load(p, allow_pickle=False))
        if a.ndim == 3:
            a = a.unsqueeze(1)
        if a.ndim != 4:
            raise ValueError(f"{p}: expected an image array NHW, NHWC or NCHW, "
                             f"got {tuple(a.shape)}")
        if a.shape[1] not in (1, 3) and a.shape[-1] in (1, 3):
            a = a.permute(0, 3, 1, 2)
        if a.dtype != torch.uint8 and not a.is_floating_point():
            raise ValueError(f"{p}: dtype {a.dtype}; use uint8 0..255 or float in [-1, 1]")
        return a.contiguous(), None
    if p.is_dir():
        from difflab.data import load_image_folder

        ds = load_image_folder(p)
        return ds.images, ds.labels
    raise ValueError(f"{p}: not a checkpoint directory, .npy file or image folder")


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and ((p / "config.json").is_file() or (p / "checkpoint").is_dir())


class _NetCounter:
    """Counts network evaluations per image: sum of the batch sizes the network sees."""

    def __init__(self, net: torch.nn.Module):
        self.rows = 0
        self.calls = 0
        self.handle = net.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.rows += int(args[0].shape[0])
        self.calls += 1


def sample_checkpoint(den, config: dict, num: int, sampler: str, steps: int, *,
                      batch_size: int = 250, seed: int = 0, guidance: float = 0.0,
                      grid: list[float] | dict[str, list[float]] | None = None
                      ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """``num`` samples with labels ``i % num_classes`` (class-conditional) from seed ``seed``
    (on ``grid`` if given, e.g. a tuned one, else the sampler's default spacing).

    The noise is drawn once from ``seed``, so every sampler / step count starts from the same
    points. Samples are clamped to [-1, 1] (as saving them would); images with NaN / inf
    are counted in ``cost["nonfinite_images"]`` and measured as zeros. ``cost["nfe"]``
    counts network evaluations per image (a classifier-free guided step costs two).
    Returns (images in [-1, 1], labels or None, cost).
    """
    import difflab

    data = config.get("data", {})
    num_classes = data.get("num_classes")
    conditional = bool(num_classes) and getattr(den.net, "config", {}).get("num_classes")
    res, ch = int(data.get("resolution", 28)), int(data.get("channels", 1))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, ch, res, res, generator=g)  # on CPU: the same points on any device
    device = next(den.net.parameters()).device
    labels = torch.arange(num) % int(num_classes) if conditional else None
    model = den
    if guidance:
        if not conditional:
            raise ValueError("--guidance needs a class-conditional checkpoint")
        model = difflab.guidance.classifier_free(den, guidance, uncond=int(num_classes))
    counter = _NetCounter(den.net)
    chunks = []
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for i in range(0, num, batch_size):
                gi = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
                cond = None if labels is None else labels[i:i + batch_size].to(device)
                x = difflab.sample(model, noise[i:i + batch_size].to(device), sampler=sampler,
                                   steps=steps, grid=grid, cond=cond, generator=gi)
                chunks.append(x.float().cpu())
    finally:
        counter.handle.remove()
    seconds = time.perf_counter() - t0
    x = torch.cat(chunks)
    # measured as they would be saved: clamped to [-1, 1]; non-finite images are counted
    nonfinite = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    batches = -(-num // batch_size)
    cost = {"nfe": counter.rows / num, "network_calls_per_batch": counter.calls / batches,
            "nfe_expected": difflab.samplers.get(sampler).nfe(steps),
            "seconds": round(seconds, 3), "seconds_per_image": seconds / num,
            "nonfinite_images": nonfinite}
    return x, labels, cost


def _csv(text: str, kind=str) -> list:
    return [kind(s.strip()) for s in str(text).split(",") if s.strip()]


def register(subparsers: Any) -> None:
    """Add ``eval`` to the ``difflab`` command line."""
    p = subparsers.add_parser(
        "eval", formatter_class=_F, help="FID / KID / precision / recall of a model or images",
        description="FID, KID, precision / recall of a checkpoint (sampled with each --sampler x "
        "--steps pair, with its sampling cost) or of saved images (.npy array or image "
        "folder), against a reference data set or statistics file. The shipped feature "
        "networks give FID-FMNIST / FID-MNIST, which are not Inception FID.")
    p.add_argument("source", help="checkpoint directory, .npy file or image folder")
    p.add_argument("--reference", default="fashion_mnist",
                   help="data set name (load_dataset), image folder, or a statistics "
                        ".safetensors file")
    p.add_argument("--split", default="train", help="reference split")
    p.add_argument("--n-ref", type=int, default=10000,
                   help="reference images (a fixed random subset; 0 = all)")
    p.add_argument("--feature-net", default=None,
                   help="fmnist | mnist | inception:/path/to/pt_inception.pth | a .safetensors "
                        "path (default: the one matching --reference)")
    p.add_argument("--num", type=int, default=2000, help="images to generate per setting")
    p.add_argument("--sampler", default="auto",
                   help="sampler name(s), comma-separated; auto: the bespoke solver fitted to "
                        "the checkpoint for each --steps (grids.json) where there is one, "
                        "else dpmpp_2m")
    p.add_argument("--steps", default="10", help="step count(s), comma-separated")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w (eps = (1 + w) eps_c - w eps_null)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where the model samples (features are computed on CPU)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--plot", default=None, help="PNG: FID versus NFE per sampler")
    p.add_argument("--save-samples", default=None,
                   help="directory: one .npy (uint8 NCHW) per sampler/steps setting")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from difflab.metrics.evaluate import class_metrics, evaluate_features, resolve_reference
    from difflab.metrics.features import load_feature_net

    if args.threads:
        torch.set_num_threads(args.threads)
    samplers, steps = _csv(args.sampler), _csv(args.steps, int)
    if not samplers or not steps or min(steps) < 1:
        raise ValueError("--sampler and --steps need at least one value; steps >= 1")
    source = Path(args.source)
    if _is_checkpoint(source):
        import difflab

        for name in samplers:  # fail before any work on a typo
            if name != difflab.samplers.AUTO:
                difflab.samplers.get(name)
    extractor = load_feature_net(default_feature_net(args.reference, args.feature_net))
    ref = resolve_reference(args.reference, extractor, split=args.split,
                            n=args.n_ref or None, cache=not args.no_cache)
    kid_kw = {"kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size,
              "seed": args.seed}
    records: list[dict[str, Any]] = []

    def measure(images: Tensor, labels: Tensor | None) -> dict[str, Any]:
        rec = evaluate_features(extractor(images), ref, **kid_kw)
        if extractor.is_classifier and images.shape[0] > 0:
            rec["classes"] = class_metrics(images, labels, extractor)
        return rec

    if _is_checkpoint(source):
        from difflab.samplers import choose
        from difflab.train.checkpoint import load_denoiser
        from difflab.train.grids import load_tuned_grid

        den, config = load_denoiser(source, ema=not args.no_ema, device=args.device)
        for asked in samplers:
            for n_steps in steps:
                # auto: the bespoke solver fitted for n_steps, else dpmpp_2m
                name, grid = choose(den, asked, n_steps)
                if grid is None:
                    grid = load_tuned_grid(source, name, n_steps, ema=not args.no_ema)
                x, labels, cost = sample_checkpoint(den, config, args.num, name, n_steps,
                                                    batch_size=args.batch_size, seed=args.seed,
                                                    guidance=args.guidance, grid=grid)
                rec = {"sampler": name, "steps": n_steps, "grid": "fitted" if name ==
                       "bespoke" else "tuned" if grid else "default", **cost,
                       **measure(x, labels)}
                records.append(rec)
                _print_record(rec, extractor.label)
                if args.save_samples:
                    import numpy as np

                    from difflab.data import to_uint8

                    d = Path(args.save_samples)
                    d.mkdir(parents=True, exist_ok=True)
                    np.save(d / f"{name}_{n_steps}.npy", to_uint8(x).numpy())
    else:
        images, labels = load_images(source)
        rec = {"sampler": None, "steps": None, **measure(images, labels)}
        records.append(rec)
        _print_record(rec, extractor.label)

    result = {"source": str(source), "reference": str(args.reference), "split": args.split,
              "feature_net": extractor.name, "label": extractor.label, "n_ref": ref.n,
              "guidance": args.guidance, "seed": args.seed, "results": records}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if args.plot:
        plot_quality_vs_nfe(records, args.plot, extractor.label, title=str(source))
        print(f"wrote {args.plot}")
    return 0


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _print_record(rec: dict[str, Any], label: str) -> None:
    head = f"{rec['sampler']} {rec['steps']} steps (NFE {rec['nfe']:g}, {rec['seconds']:.1f}s): " \
        if rec.get("sampler") else ""
    line = (f"{head}{label} {_fmt(rec['fid'], '.3f')}  KID {_fmt(rec['kid'], '.5f')} "
            f"+- {_fmt(rec['kid_std'], '.5f')}  precision {_fmt(rec['precision'], '.3f')}  "
            f"recall {_fmt(rec['recall'], '.3f')}  (n={rec['n']})")
    if "classes" in rec:
        c = rec["classes"]
        line += f"  class entropy {c['entropy']:.3f}/{c['entropy_max']:.3f}"
        if "accuracy" in c:
            line += f"  class accuracy {c['accuracy']:.3f}"
    print(line, flush=True)


def plot_quality_vs_nfe(records: list[dict[str, Any]], path: str | Path, label: str,
                        title: str = "") -> None:
    """FID (log scale) against network evaluations per image, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(5.5, 4))
    names = sorted({r["sampler"] for r in records if r.get("sampler")})
    if not names:
        raise ValueError("--plot needs a checkpoint source (a sweep over samplers / steps)")
    for name in names:
        pts = sorted((r["nfe"], r["fid"]) for r in records if r["sampler"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    nfes = sorted({r["nfe"] for r in records if r.get("sampler")})
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(nfes, [f"{v:g}" for v in nfes])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(label)
    ax.set_title(title[-60:], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
