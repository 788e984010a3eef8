"""Reference feature statistics, cached to disk.

A reference is the feature set of real images, reduced to what the metrics need:
``mu`` and ``sigma`` (FID) and, unless ``keep_features=False``, the features themselves (KID
and precision / recall need them). It is stored as ``<stem>.safetensors`` (float64 mu, sigma;
float32 features) plus ``<stem>.json`` (data set, split, feature network and its weights'
hash, sample count), and the cache key is exactly that tuple, so a retrained feature network
never reuses stale statistics.

Cache directory: ``$DIFFLAB_CACHE/metrics`` or ``~/.cache/difflab/metrics``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from difflab.metrics.distances import gaussian_stats
from difflab.metrics.features import FeatureExtractor, load_feature_net

__all__ = ["Reference", "cache_dir", "reference_stats", "save_reference", "load_reference",
           "reference_from_images"]


@dataclass
class Reference:
    mu: Tensor
    sigma: Tensor
    n: int
    features: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    root = os.environ.get("DIFFLAB_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "difflab") / "metrics"


def _net_fingerprint(extractor: FeatureExtractor) -> str:
    """A short hash of the feature network's config and weights (stale caches are never used)."""
    h = hashlib.sha256(json.dumps(getattr(extractor.net, "config", {}), sort_keys=True).encode())
    for k, v in sorted(extractor.net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes()[:4096])
        h.update(str(tuple(v.shape)).encode())
    return h.hexdigest()[:12]


def save_reference(ref: Reference, stem: str | Path) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` atomically; returns the .safetensors path."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mu": ref.mu.to(torch.float64).contiguous(),
               "sigma": ref.sigma.to(torch.float64).contiguous()}
    if ref.features is not None:
        tensors["features"] = ref.features.float().contiguous()
    path = stem.with_suffix(".safetensors")
    from difflab.files import safetensors_bytes, write_bytes, write_json

    write_bytes(path, safetensors_bytes(tensors), what="reference statistics")
    meta = {**ref.meta, "n": ref.n, "has_features": ref.features is not None}
    write_json(stem.with_suffix(".json"), meta, what="reference statistics")
    return path


def load_reference(path: str | Path) -> Reference:
    """Read a statistics file written by :func:`save_reference` (the .json is optional)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics file {path} not found")
    t = load_file(str(path))
    if "mu" not in t or "sigma" not in t:
        raise ValueError(f"{path}: a statistics file needs tensors 'mu' and 'sigma' "
                         f"(found {sorted(t)})")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    features = t.get("features")
    n = int(meta.get("n", features.shape[0] if features is not None else 0))
    return Reference(t["mu"], t["sigma"], n, features, meta)


def reference_from_images(images: Tensor, extractor: FeatureExtractor,
                          keep_features: bool = True, meta: dict | None = None) -> Reference:
    f = extractor(images)
    s = gaussian_stats(f)
    return Reference(s.mu, s.sigma, s.n, f if keep_features else None, dict(meta or {}))


def _subset(n_total: int, n: int | None, seed: int = 0) -> Tensor:
    """A fixed random subset of size n (all images, in a fixed random order, if n is None)."""
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm if n is None or n >= n_total else perm[:n]


def reference_stats(dataset: str, feature_net: str | FeatureExtractor = "fmnist",
                    split: str = "train", n: int | None = 10000, *, cache: bool = True,
                    keep_features: bool = True, seed: int = 0) -> Reference:
    """Statistics of ``n`` images of ``load_dataset(dataset, split)`` (a fixed random subset,
    seed 0; all of them if the split is smaller or ``n`` is None), computed once and cached
    under :func:`cache_dir`. The file's JSON records the actual count."""
    extractor = load_feature_net(feature_net)
    from difflab.data import load_dataset

    ds_key = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(dataset)).strip("_")[-60:]
    fp = _net_fingerprint(extractor)
    stem = cache_dir() / f"{ds_key}-{split}-{extractor.name}-{fp}-n{n or 'all'}-s{seed}"
    if cache and stem.with_suffix(".safetensors").is_file():
        ref = load_reference(stem)
        if ref.features is not None or not keep_features:
            return ref
    data = load_dataset(dataset, split=split)
    idx = _subset(len(data), n, seed)  # all images when the split has fewer than n
    if len(idx) < 2:
        raise ValueError(f"reference {dataset!r} split {split!r} has {len(data)} images; "
                         "statistics need at least 2")
    meta = {"dataset": str(dataset), "split": split, "feature_net": extractor.name,
            "feature_net_fingerprint": fp, "label": extractor.label, "seed": seed,
            "feature_dim": extractor.feature_dim}
    ref = reference_from_images(data.images[idx], extractor, keep_features, meta)
    if cache:
        save_reference(ref, stem)
    return ref
