"""``difflab eval``: FID / KID / precision / recall of a checkpoint or of saved images.

    difflab eval runs/fmnist/checkpoint --reference fashion_mnist --sampler dpmpp_2m,ddim \\
        --steps 5,10,20 --num 2000 --out eval.json --plot eval.png
    difflab eval samples.npy --reference fashion_mnist
    difflab eval my_images/ --reference stats.safetensors --feature-net fmnist

SOURCE is a checkpoint directory (sampled with every ``--sampler`` x ``--steps`` pair from the
same seed, guided as ``difflab sample`` guides it; the sampling cost is reported as network
evaluations per image and seconds), a ``.npy`` array (uint8 NHWC / NCHW / NHW in 0..255, or
float in [-1, 1]) or an image folder. The JSON written by ``--out`` holds one record per
(sampler, steps); ``--plot`` draws FID against NFE. From Python: :func:`evaluate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import difflab.files as files
from difflab.commands.common import HelpFormatter, ParameterError, param, set_threads
from difflab.commands.guidance import Guidance, add_guidance_args, guidance_from_args
from difflab.commands.images import check_output, load_images, write_samples
from difflab.commands.model import Samples, choose_solver, load_model, sample_images
from difflab.commands.t2i import add_prompt_args

__all__ = ["evaluate", "measure_samples", "default_feature_net", "plot_quality_vs_nfe",
           "register", "cmd_eval"]

_DEFAULT_NETS = {"fashion_mnist": "fmnist", "mnist5k": "mnist", "mnist10k": "mnist",
                 "mnist": "mnist"}


def default_feature_net(reference: str, requested: str | None = None) -> str:
    """``requested`` or the shipped feature network that matches the reference data set."""
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
    raise ParameterError(f"no default feature network for {param('reference')} {reference!r}; "
                         f"pass {param('feature_net')} fmnist | mnist | "
                         "inception:/path/to/pt_inception.pth")


def measure_samples(samples: Samples) -> tuple[Tensor, dict[str, Any]]:
    """(images as they are measured, cost) of :func:`~difflab.commands.model.sample_images`'
    result: clamped to [-1, 1] as saving them would; images with NaN / inf are counted in
    ``cost["nonfinite_images"]`` and measured as zeros. ``cost["nfe"]`` counts network
    evaluations per image (a classifier-free guided step costs two)."""
    from difflab.samplers import get

    x = samples.images
    count = x.shape[0]
    nonfinite = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    s = samples.solver
    cost = {"nfe": samples.nfe, "network_calls_per_batch": samples.network_calls / samples.batches,
            "nfe_expected": get(s.sampler).nfe(s.steps), "seconds": round(samples.seconds, 3),
            "seconds_per_image": samples.seconds / count, "nonfinite_images": nonfinite}
    return x, cost


def evaluate(source: str | os.PathLike, *, reference: str = "fashion_mnist",
             split: str = "train", n_ref: int | None = 10000, feature_net: str | None = None,
             count: int = 2000, samplers: Sequence[str] = ("auto",),
             steps: Sequence[int] = (10,), guidance: Guidance | None = None,
             batch_size: int = 250, seed: int = 0, ema: bool = True,
             device: str | torch.device = "cpu", kid_subsets: int = 100,
             kid_subset_size: int = 1000, cache: bool = True,
             save_samples: str | os.PathLike | None = None, overwrite: bool = False,
             on_record: Callable[[dict[str, Any], str], None] | None = None) -> dict[str, Any]:
    """FID / KID / precision / recall (and class metrics with a classifier feature network) of
    ``source`` against ``reference`` (a data set name, image folder or statistics file; its
    ``split``, ``n_ref`` images, None = all).

    ``source`` a checkpoint: ``count`` samples per (sampler, steps) pair, each from ``seed``
    (:func:`~difflab.commands.model.sample_images`: the images ``difflab sample`` draws with
    that seed), with the solver :func:`~difflab.commands.model.choose_solver` picks, guided by
    ``guidance``; ``save_samples``: a directory receiving ``<sampler>_<steps>.npy`` (uint8
    NHWC, as ``difflab sample --out x.npy``). Else a .npy array or an image folder.
    ``on_record(record, label)`` is called with each record as it is measured. Returns the
    result (what ``--out`` writes): ``{"source", "reference", ..., "results": [records]}``.
    """
    from difflab.metrics.evaluate import class_metrics, evaluate_features, resolve_reference
    from difflab.metrics.features import load_feature_net

    samplers, steps = list(samplers), [int(k) for k in steps]
    if not samplers or not steps or min(steps) < 1:
        raise ParameterError(f"{param('samplers')} and {param('steps')} need at least one "
                             "value; steps >= 1")
    from difflab.interop import is_diffusers_folder
    from difflab.train.checkpoint import is_checkpoint

    src = Path(source)
    checkpoint = is_checkpoint(src) or is_diffusers_folder(src)  # a diffusers folder: #17
    g = guidance or Guidance()
    model = None
    if checkpoint:  # fail on a typo or a bad guidance option before any work
        for name in samplers:
            choose_solver(None, name, steps[0])
        from difflab.commands.validate import check_device, check_memory

        check_device(device)
        model = load_model(src, ema=ema, device=device, guidance=g)
        check_memory(count, model.shape)  # the samples of one setting must fit in memory
    else:  # images read (and refused if they are not images) before any work
        source_images = load_images(src)
    extractor = load_feature_net(default_feature_net(reference, feature_net))
    ref = resolve_reference(reference, extractor, split=split, n=n_ref or None, cache=cache)
    kid_kw = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size, "seed": seed}
    records: list[dict[str, Any]] = []

    def measure(images: Tensor, labels: Tensor | None) -> dict[str, Any]:
        rec = evaluate_features(extractor(images), ref, **kid_kw)
        if extractor.is_classifier and images.shape[0] > 0:
            rec["classes"] = class_metrics(images, labels, extractor)
        return rec

    def emit(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_record is not None:
            on_record(rec, extractor.label)

    if model is not None:
        for asked in samplers:
            for n_steps in steps:
                solver = choose_solver(model.checkpoint, asked, n_steps, ema=ema,
                                       guidance=model.guided.fits)
                target = None if not save_samples else check_output(
                    Path(save_samples) / f"{solver.sampler}_{n_steps}.npy",
                    overwrite=overwrite, name="save_samples")  # before sampling
                samples = sample_images(model, solver, count, seed=seed,
                                        batch_size=batch_size)
                x, cost = measure_samples(samples)
                emit({"sampler": solver.sampler, "steps": n_steps,
                      "grid": {"fitted": "fitted", "tuned": "tuned"}.get(solver.source,
                                                                         "default"),
                      **cost, **measure(x, samples.labels)})
                if save_samples:
                    write_samples(x, target, overwrite=overwrite)
    else:
        images, labels = source_images
        emit({"sampler": None, "steps": None, **measure(images, labels)})
    options = {k: (str(v) if isinstance(v, Path) else v)
               for k, v in dataclasses.asdict(g).items()}
    return {"source": str(src), "reference": str(reference), "split": split,
            "feature_net": extractor.name, "label": extractor.label, "n_ref": ref.n,
            "guidance": g.cfg, "guidance_options": options, "seed": seed, "results": records}


# --- command line ---------------------------------------------------------------------------
def _csv(text: str, kind: Callable = str) -> list:
    return [kind(s.strip()) for s in str(text).split(",") if s.strip()]


def register(subparsers: Any) -> None:
    """Add ``eval`` to the ``difflab`` command line."""
    p = subparsers.add_parser(
        "eval", formatter_class=HelpFormatter,
        help="FID / KID / precision / recall of a model or images",
        description="FID, KID, precision / recall of a checkpoint (sampled with each --sampler x "
        "--steps pair, with its sampling cost) or of saved images (.npy array or image "
        "folder), against a reference data set or statistics file. The shipped feature "
        "networks give FID-FMNIST / FID-MNIST, which are not Inception FID.")
    p.add_argument("source", help="checkpoint directory, local diffusers model / pipeline "
                                  "folder, .npy file or image folder")
    p.add_argument("--reference", default="fashion_mnist",
                   help="data set name (load_dataset), image folder, or a statistics "
                        ".safetensors file")
    p.add_argument("--split", default=None,
                   help="reference split (default train); with --nll the split whose "
                        "likelihood is measured (default test)")
    p.add_argument("--n-ref", type=int, default=10000,
                   help="reference images (a fixed random subset; 0 = all)")
    p.add_argument("--feature-net", default=None,
                   help="fmnist | mnist | inception:/path/to/pt_inception.pth | a .safetensors "
                        "path (default: the one matching --reference)")
    p.add_argument("--num", type=int, default=2000, help="images to generate per setting")
    p.add_argument("--sampler", default="auto",
                   help="sampler name(s), comma-separated; auto: the bespoke solver fitted to "
                        "the checkpoint for each --steps where there is one, else the plan a "
                        "probe of the model picks (2-40 steps; kept in ~/.cache/difflab/plans, "
                        "DIFFLAB_CACHE=DIR|off), else dpmpp_2m")
    p.add_argument("--steps", default="10", help="step count(s), comma-separated")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the samples (the images `difflab sample --seed` draws) and "
                        "of the KID subsets")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda: where the model samples (features are computed on CPU)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--plot", default=None, help="PNG: FID versus NFE per sampler")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing --out / --plot / --save-samples outputs (default: "
                        "refuse before any work)")
    p.add_argument("--save-samples", default=None,
                   help="directory: one .npy (uint8 NHWC, as `difflab sample --out x.npy`) per "
                        "sampler/steps setting")
    nll = p.add_argument_group("likelihood (--nll; difflab.commands.nll)")
    nll.add_argument("--nll", action="store_true",
                     help="report bits/dim of --split by the probability-flow ODE (with its "
                          "standard error) and by the variational bound where the model has one")
    nll.add_argument("--count", type=int, default=1000, help="--nll: images of the split")
    nll.add_argument("--probes", type=int, default=1, help="--nll: Hutchinson probes per image")
    nll.add_argument("--rtol", type=float, default=1e-3,
                     help="--nll: the adaptive ODE solver's relative (and absolute) tolerance")
    nll.add_argument("--nll-solver", default="dopri5",
                     help="--nll: dopri5 (adaptive, --rtol; default), bosh3, or multistep "
                          "(--nll-steps fixed steps: steps + 1 calls, ~3x cheaper at 0.005 "
                          "bits/dim on Fashion-MNIST; no error control)")
    nll.add_argument("--nll-steps", type=int, default=None,
                     help="--nll-solver multistep: its steps (default "
                          "difflab.likelihood.MULTISTEP_STEPS)")
    nll.add_argument("--workers", type=int, default=1,
                     help="--nll on CPU: solve the ODE in this many processes of one thread "
                          "each (default 1)")
    nll.add_argument("--dequantize", default="uniform",
                     help="--nll on 8-bit data: uniform (default) or decoder (the forward "
                          "process and the VLB's 256-bin decoder; tighter for models peaked "
                          "at the 8-bit levels)")
    add_guidance_args(p)  # --label, --cfg/--guidance, --cfg-rescale, --classifier, ...
    add_prompt_args(p, eval_command=True)  # --prompts FILE: prompt adherence (text-to-image)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.nll:
        from difflab.commands.nll import nll, print_nll

        set_threads(args.threads)
        result = nll(args.source, split=args.split or "test", count=args.count,
                     probes=args.probes, rtol=args.rtol, batch_size=args.batch_size,
                     seed=args.seed, ema=not args.no_ema, device=args.device,
                     solver=args.nll_solver, steps=args.nll_steps, dequantize=args.dequantize,
                     workers=args.workers)
        print_nll(result)
        if args.out:
            print(f"wrote {files.write_json(args.out, result, what='likelihood results')}")
        return 0
    if args.prompts:
        from difflab.commands.t2i import cmd_eval_t2i

        return cmd_eval_t2i(args)
    from difflab.commands.images import check_file_output
    from difflab.commands.runs import check_writable_dir
    from difflab.commands.validate import check_device

    set_threads(args.threads)
    check_device(args.device)
    for name in ("out", "plot"):  # outputs are checked before an hour of sampling
        if getattr(args, name):
            check_file_output(getattr(args, name), overwrite=args.overwrite, name=name,
                              suffixes=(".json",) if name == "out" else (".png",))
    if args.save_samples:
        check_writable_dir(args.save_samples, "save_samples")
    result = evaluate(args.source, reference=args.reference, split=args.split or "train",
                      n_ref=args.n_ref or None, feature_net=args.feature_net, count=args.num,
                      samplers=_csv(args.sampler), steps=_csv(args.steps, int),
                      guidance=guidance_from_args(args), batch_size=args.batch_size,
                      seed=args.seed, ema=not args.no_ema, device=args.device,
                      kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                      cache=not args.no_cache, save_samples=args.save_samples,
                      overwrite=args.overwrite,
                      on_record=_print_record)
    if args.out:
        out = files.write_json(args.out, result, what="evaluation results")
        print(f"wrote {out}")
    if args.plot:
        plot_quality_vs_nfe(result["results"], args.plot, result["label"],
                            title=str(args.source))
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

    names = sorted({r["sampler"] for r in records if r.get("sampler")})
    if not names:
        raise ParameterError(f"{param('plot')} needs a checkpoint source (a sweep over samplers "
                             "/ steps)")
    fig, ax = plt.subplots(figsize=(5.5, 4))
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
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    files.write_bytes(path, buf.getvalue(), what="plot")
    plt.close(fig)
