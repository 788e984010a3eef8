"""Classifier-free and classifier guidance on Fashion-MNIST or MNIST: class accuracy, FID and
class-histogram entropy versus the guidance weight.

For each setting, N samples (labels 0..9 cycling, the same seeded noise for every setting, so
settings are paired) are drawn with --sampler (dpmpp_2m) and measured with the held-out metrics
classifier of the data set, "fmnist" or "mnist" (difflab.metrics; never the guidance
classifier):

* accuracy   fraction of samples the metrics classifier assigns to the requested label
* entropy    of the predicted-class histogram (max ln 10 = 2.303: every class equally often)
* FID        (FID-FMNIST / FID-MNIST, with that classifier's features) overall against the
             train-set reference statistics, and per class against the
             train images of that class (N / 10 samples each: strongly biased upwards at this
             size, comparable only between settings of this run)

Settings: classifier-free guidance eps~ = (1 + w) eps(c) - w eps(null) (w-convention; diffusers'
scale = 1 + w) on the conditional model, w in --cfg; classifier guidance
eps~ = eps - s sigma_t grad log p(y | x_t, t) (t <= --t-max) on the unconditional model, s in
--scales. The unconditional model is --uncond, or, without it, the conditional model with the
null label (trained with condition dropout p_uncond).

Commands behind docs/results/guidance.md (2-core CPU; guidance_mnist.md: the same with
``--set data.name=mnist5k`` / ``--data mnist5k``, 30 minutes, scales up to 16)::

    python -m difflab.cli train fashion_mnist --conditional --out runs/g2/cond \\
        --max-minutes 45 --threads 1 --batch-size 32 --set train.p_uncond=0.2
    difflab train-classifier --like runs/g2/cond --out runs/g2/clf32 --max-minutes 45 \\
        --batch-size 64 --lr 2e-3 --threads 1
    python bench/guidance.py --cond runs/g2/cond --classifier runs/g2/clf32 \\
        --cfg 0 0.5 1 2 4 6 --scales 0 1 2 4 8 --steps 20 --work runs/g2/bench

Per-setting results are cached in --work (rerunning skips finished settings).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

import difflab
from difflab.denoiser import BaseDenoiser, Prediction

ROOT = Path(__file__).resolve().parents[1]
# data set of the conditional model -> (metrics feature net, title, FID label, file suffix)
DATASETS = {"fashion_mnist": ("fmnist", "Fashion-MNIST", "FID-FMNIST", ""),
            "mnist5k": ("mnist", "MNIST (mnist5k)", "FID-MNIST", "_mnist"),
            "mnist10k": ("mnist", "MNIST (mnist10k)", "FID-MNIST", "_mnist")}
NOTES_MARKER = "## Reading the numbers"  # a regenerated page keeps everything from here on


class NullLabel(BaseDenoiser):
    """The unconditional model inside a classifier-free-trained one: cond := null label."""

    def __init__(self, denoiser: BaseDenoiser, null: int):
        super().__init__()
        self.denoiser, self.null, self.schedule = denoiser, int(null), denoiser.schedule

    def predict(self, x: Tensor, t, cond=None) -> Prediction:
        return self.denoiser.predict(x, t, torch.full((x.shape[0],), self.null,
                                                      dtype=torch.long, device=x.device))


def draw(den: BaseDenoiser, n: int, shape: tuple[int, ...], labels: Tensor, steps: int,
         batch: int, seed: int, sampler: str = "dpmpp_2m") -> Tensor:
    out = []
    noise = torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))
    for i in range(0, n, batch):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            out.append(difflab.sample(den, noise[i:i + batch], sampler, steps=steps,
                                      cond=labels[i:i + batch], generator=g))
    return torch.cat(out).clamp(-1, 1)


def class_references(extractor, num_classes: int, work: Path, data: str) -> list:
    """Per-class feature statistics of the train split of ``data`` (cached in ``work``)."""
    from safetensors.torch import load_file, save_file

    from difflab.data import load_dataset
    from difflab.metrics.distances import gaussian_stats

    path = work / f"class_refs_{data}_{extractor.name}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        return [SimpleNamespace(mu=t[f"mu{c}"], sigma=t[f"sigma{c}"])
                for c in range(num_classes)]
    ds = load_dataset(data, split="train")
    refs = [gaussian_stats(extractor(ds.images[ds.labels == c])) for c in range(num_classes)]
    tensors = {}
    for c, r in enumerate(refs):
        tensors[f"mu{c}"], tensors[f"sigma{c}"] = r.mu.contiguous(), r.sigma.contiguous()
    save_file(tensors, str(path))
    return refs


def measure(x: Tensor, labels: Tensor, extractor, ref, class_refs) -> dict:
    from difflab.metrics import class_metrics
    from difflab.metrics.distances import frechet_distance, gaussian_stats

    m = class_metrics(x, labels, extractor)
    f = extractor(x)
    s = gaussian_stats(f)
    per_class = []
    for c, rc in enumerate(class_refs):
        sc = gaussian_stats(f[labels == c])
        per_class.append(frechet_distance(sc.mu, sc.sigma, rc.mu, rc.sigma))
    return {"accuracy": m["accuracy"], "entropy": m["entropy"], "histogram": m["histogram"],
            "fid": frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma),
            "fid_per_class": per_class, "fid_class_mean": sum(per_class) / len(per_class)}


def plot(results: dict, path: Path, unguided_fid: float, real: dict | None = None, *,
         title: str = "Fashion-MNIST", fid_label: str = "FID-FMNIST",
         feature_net: str = "fmnist") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for method, marker, key in (("cfg", "o-", "w"), ("classifier", "s-", "s")):
        rows = [r for r in results.values() if r["method"] == method]
        rows.sort(key=lambda r: r["weight"])
        if not rows:
            continue
        fid = [r["fid"] for r in rows]
        acc = [100 * r["accuracy"] for r in rows]
        label = ("classifier-free (conditional model)" if method == "cfg"
                 else "classifier guidance (unconditional model)")
        ax.plot(fid, acc, marker, label=label)
        for r, fx, ay in zip(rows, fid, acc):
            ax.annotate(f"{key}={r['weight']:g}", (fx, ay), textcoords="offset points",
                        xytext=(4, -10), fontsize=8)
    if real:
        ax.plot([real["fid"]], [100 * real["accuracy"]], "k*", ms=10,
                label="real test images (same count)")
    ax.axvline(1.5 * unguided_fid, color="grey", ls=":", lw=1,
               label="1.5 x FID of the unguided conditional model")
    ax.axhline(97, color="grey", ls="--", lw=1, label="97% accuracy")
    ax.set_xlabel(f"{fid_label} (lower is better)")
    ax.set_ylabel(f"class accuracy under the {feature_net} classifier (%)")
    ax.set_title(f"Guidance on {title}: accuracy versus FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_class_grid(samples: dict[str, Tensor], labels: Tensor, per_class: int,
                    path: Path) -> None:
    """Rows: settings in order; columns: classes 0..9, ``per_class`` samples each."""
    from difflab.train.monitor import save_grid

    nc = int(labels.max()) + 1
    rows = []
    for x in samples.values():
        for c in range(nc):
            rows.append(x[labels == c][:per_class])
    save_grid(torch.cat(rows), path, nrow=nc * per_class, scale=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cond", default="runs/guidance/cond", help="conditional checkpoint")
    ap.add_argument("--uncond", default=None,
                    help="unconditional checkpoint (default: the conditional one's null label)")
    ap.add_argument("--classifier", default="runs/guidance/clf16", help="classifier checkpoint")
    ap.add_argument("--cfg", type=float, nargs="*", default=[0, 0.5, 1, 2, 4])
    ap.add_argument("--scales", type=float, nargs="*", default=[0, 1, 2, 4, 8])
    ap.add_argument("--t-max", type=float, default=None,
                    help="classifier guidance only at t <= T (default: the CLI default)")
    ap.add_argument("--n", type=int, default=500, help="samples per setting")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps")
    ap.add_argument("--sampler", default="dpmpp_2m", help="sampler name")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--feature-net", default=None,
                    help="metrics feature network (default: fmnist for Fashion-MNIST models, "
                         "mnist for MNIST ones)")
    ap.add_argument("--work", default="runs/guidance/bench", help="per-setting cache")
    ap.add_argument("--sample-only", action="store_true",
                    help="only draw (and cache) the samples; measure in a later run")
    ap.add_argument("--out", default=None,
                    help="report (default: docs/results/guidance.md, guidance_mnist.md for MNIST)")
    ap.add_argument("--figures", default=str(ROOT / "docs"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from difflab.commands.guidance import (
        DEFAULT_CLASSIFIER_T_MAX,
        check_classifier_matches,
        limit_log_prob,
    )
    from difflab.guidance import classifier_free, classifier_guidance, classifier_log_prob
    from difflab.metrics import load_feature_net
    from difflab.metrics.evaluate import resolve_reference
    from difflab.schedules import from_config
    from difflab.train.checkpoint import load_denoiser
    from difflab.train.classifier import load_classifier

    t_max = DEFAULT_CLASSIFIER_T_MAX if args.t_max is None else args.t_max
    cond_den, cond_cfg = load_denoiser(args.cond)
    data = cond_cfg["data"]["name"]
    if data not in DATASETS:
        raise SystemExit(f"bench/guidance.py measures {sorted(DATASETS)} models; "
                         f"{args.cond} was trained on {data!r}")
    feature_net, args.title, args.fid_label, suffix = DATASETS[data]
    args.feature_net = args.feature_net or feature_net
    args.out = args.out or str(ROOT / f"docs/results/guidance{suffix}.md")
    args.suffix = suffix
    nc = int(cond_cfg["data"]["num_classes"])
    shape = (int(cond_cfg["data"]["channels"]),) + (int(cond_cfg["data"]["resolution"]),) * 2
    if args.uncond:
        uncond_den, uncond_cfg = load_denoiser(args.uncond)
        uncond_name = args.uncond
    else:
        uncond_den, uncond_cfg = NullLabel(cond_den, nc), cond_cfg
        uncond_name = f"{args.cond} with the null label"
    clf, clf_cfg = load_classifier(args.classifier)
    check_classifier_matches(clf_cfg, uncond_cfg, f"classifier {args.classifier}")
    log_prob = classifier_log_prob(clf, from_config(clf_cfg["schedule"]))
    if t_max < 1:
        log_prob = limit_log_prob(log_prob, t_max)

    labels = torch.arange(args.n) % nc
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    settings = [("cfg", w) for w in args.cfg] + [("classifier", s) for s in args.scales]

    # 1. sampling (no feature network needed; samples and timings are kept in --work)
    from safetensors.torch import load_file, save_file

    samples: dict[str, Tensor] = {}
    for method, weight in settings:
        key = f"{method}:{weight:g}"
        x_path = work / _sample_name(method, weight, args, t_max)
        if x_path.is_file():
            samples[key] = load_file(str(x_path))["x"]
            continue
        if method == "cfg":
            den = classifier_free(cond_den, weight, uncond=nc)
        else:
            den = classifier_guidance(uncond_den, log_prob, weight)
        t0 = time.perf_counter()
        x = draw(den, args.n, shape, labels, args.steps, args.batch, args.seed, args.sampler)
        seconds = time.perf_counter() - t0
        save_file({"x": x.contiguous()}, str(x_path), metadata={"seconds": f"{seconds:.3f}"})
        samples[key] = x
        print(f"sampled {key} in {seconds:.0f} s", file=sys.stderr)
    if args.sample_only:
        return 0

    # 2. measuring
    from safetensors import safe_open

    extractor = load_feature_net(args.feature_net)
    ref = resolve_reference(data, extractor, split="train", n=10000)
    class_refs = class_references(extractor, nc, work, data)
    cache_path = work / (f"results_n{args.n}_s{args.steps}_seed{args.seed}_{extractor.name}"
                         f"_tmax{t_max:g}"
                         + ("" if args.sampler == "dpmpp_2m" else f"_{args.sampler}") + ".json")
    results = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if "real" not in results:  # the floor of real images at this sample size (test split)
        from difflab.data import load_dataset

        test = load_dataset(data, split="test")
        idx = torch.cat([torch.nonzero(test.labels == c)[: args.n // nc, 0] for c in range(nc)])
        results["real"] = {"method": "real", "weight": 0.0, "seconds": 0.0,
                           **measure(test.images[idx], test.labels[idx], extractor, ref,
                                     class_refs)}
    for method, weight in settings:
        key = f"{method}:{weight:g}"
        if key in results:
            continue
        x_path = work / _sample_name(method, weight, args, t_max)
        with safe_open(str(x_path), "pt") as f:
            seconds = float((f.metadata() or {}).get("seconds", "nan"))
        results[key] = {"method": method, "weight": weight, "seconds": seconds,
                        **measure(samples[key], labels, extractor, ref, class_refs)}
        r = results[key]
        print(f"{key:16s} acc {r['accuracy']:.3f} FID {r['fid']:.2f} entropy "
              f"{r['entropy']:.3f} ({seconds:.0f} s)", file=sys.stderr)
    cache_path.write_text(json.dumps(results, indent=1))
    results = {k: v for k, v in results.items()
               if k == "real" or k in {f"{m}:{w:g}" for m, w in settings}}

    fig = Path(args.figures)
    guided = {k: v for k, v in results.items() if k != "real"}
    unguided_fid = results.get("cfg:0", {}).get("fid", math.nan)
    plot(guided, fig / f"guidance_accuracy_fid{suffix}.png", unguided_fid, results.get("real"),
         title=args.title, fid_label=args.fid_label, feature_net=args.feature_net)
    for method in ("cfg", "classifier"):
        sel = {k: samples[k] for k, _ in [(f"{m}:{w:g}", 0) for m, w in settings if m == method]
               if k in samples}
        if sel:
            save_class_grid(sel, labels, 2, fig / f"guidance_grid_{method}{suffix}.png")
    write_page(args, results, cond_cfg, uncond_name, clf_cfg, t_max, Path(args.out))
    return 0


def _sample_name(method: str, weight: float, args, t_max: float) -> str:
    extra = f"_tmax{t_max:g}" if method == "classifier" else ""
    extra += "" if args.sampler == "dpmpp_2m" else f"_{args.sampler}"
    return f"{method}_{weight:g}{extra}_n{args.n}_s{args.steps}_seed{args.seed}.safetensors"


def _fmt_row(key: str, r: dict) -> str:
    per = " / ".join(f"{v:.0f}" for v in r["fid_per_class"])
    return (f"| {key} | {100 * r['accuracy']:.1f} | {r['fid']:.2f} | {r['fid_class_mean']:.1f} | "
            f"{r['entropy']:.3f} | {per} | {r['seconds']:.0f} |")


def write_page(args, results: dict, cond_cfg: dict, uncond_name: str, clf_cfg: dict,
               t_max: float, out: Path) -> None:
    head = (f"| setting | accuracy % | {args.fid_label} | per-class FID (mean) | class entropy "
            "(max 2.303) | per-class FID, classes 0-9 | sampling s |\n"
            "|---|---|---|---|---|---|---|")
    cfg_rows = [_fmt_row(f"w = {r['weight']:g}", r) for k, r in results.items()
                if r["method"] == "cfg"]
    clf_rows = [_fmt_row(f"s = {r['weight']:g}", r) for k, r in results.items()
                if r["method"] == "classifier"]
    real = results.get("real")
    tc = cond_cfg.get("train", {})
    cmd = "python bench/guidance.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Guidance on {args.title}",
        "",
        f"Machine: 2-core CPU (CI-class), {platform.python_version()} / torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        f"Command: `{cmd}`",
        "",
        f"{args.n} samples per setting (labels 0-9 cycling, the same noise for every setting), "
        f"{args.sampler} with {args.steps} steps. Accuracy and entropy under the held-out metrics "
        f"classifier `{args.feature_net}` (not the guidance classifier); FID against (up to) "
        "10,000 train images; per-class FID against the train images of that class from "
        f"{args.n // 10} samples each (biased upwards at that size: compare settings, not "
        "papers).",
        "",
        f"Models: conditional `{args.cond}` (data {cond_cfg['data']['name']}, "
        f"p_uncond {tc.get('p_uncond')}), unconditional = {uncond_name}; classifier "
        f"`{args.classifier}` (noise-aware encoder classifier, guidance at t <= {t_max:g}).",
        "",
    ]
    if real:
        lines += [f"Floor: {args.n} real test images score accuracy "
                  f"{100 * real['accuracy']:.1f}%, {args.fid_label} {real['fid']:.2f}, per-class "
                  f"FID mean {real['fid_class_mean']:.1f}, entropy {real['entropy']:.3f}.", ""]
    lines += ["## Classifier-free guidance (conditional model)", "",
              "eps~ = (1 + w) eps(x, c) - w eps(x, null); w = 0 is the conditional model "
              "(diffusers' guidance_scale = 1 + w).", "", head, *cfg_rows, "",
              "## Classifier guidance (unconditional model)", "",
              "eps~ = eps - s sigma_t grad log p(y | x_t, t), s = 0 is the unconditional "
              "model.", "", head, *clf_rows, "",
              f"![accuracy versus FID](../guidance_accuracy_fid{args.suffix}.png)", "",
              "Grids (rows: settings in table order; columns: classes 0-9, two samples "
              "each, same noise in every row):", "",
              f"![CFG grid](../guidance_grid_cfg{args.suffix}.png)", "",
              f"![classifier guidance grid](../guidance_grid_classifier{args.suffix}.png)", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = ""
    if out.is_file() and NOTES_MARKER in out.read_text():  # keep the hand-written part
        old = out.read_text()
        notes = "\n" + old[old.index(NOTES_MARKER):]
    out.write_text("\n".join(lines) + "\n" + notes)
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
