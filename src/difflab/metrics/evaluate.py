"""The metrics front door: ``evaluate`` (FID, KID, precision / recall against a reference) and
the class-conditional checks (classifier accuracy, entropy of the predicted-class histogram).

    m = difflab.metrics.evaluate(samples, reference="fashion_mnist", feature_net="fmnist")
    m["fid"], m["kid"], m["kid_std"], m["precision"], m["recall"]

Numbers under the shipped networks are "FID-FMNIST" / "FID-MNIST" (``m["label"]``): they are
comparable with each other, never with Inception FID. Read docs/results/metrics.md for their
scale (the train-versus-test floor and the effect of noise and blur).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.metrics.distances import (
    _check_finite,
    frechet_distance,
    gaussian_stats,
    kernel_inception_distance,
    precision_recall,
)
from difflab.metrics.features import FeatureExtractor, load_feature_net
from difflab.metrics.reference import Reference, load_reference, reference_stats

__all__ = ["evaluate", "evaluate_features", "resolve_reference", "classifier_accuracy",
           "class_metrics"]


def resolve_reference(reference: str | Path | Reference | Tensor,
                      extractor: FeatureExtractor, split: str = "train",
                      n: int | None = 10000, cache: bool = True) -> Reference:
    """A :class:`Reference` from a data set name / image folder (cached statistics), a
    statistics file (``*.safetensors``), a Reference, or a tensor of real images."""
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, Tensor):
        from difflab.metrics.reference import reference_from_images

        return reference_from_images(reference, extractor, meta={"dataset": "<tensor>"})
    s = str(reference)
    if s.endswith(".safetensors"):
        ref = load_reference(s)
        net = ref.meta.get("feature_net")
        if net is not None and net != extractor.name:
            raise ValueError(f"statistics file {s} was computed with feature network {net!r}, "
                             f"but feature_net={extractor.name!r}; pass feature_net={net!r}")
        if ref.mu.numel() != extractor.feature_dim:
            raise ValueError(f"statistics file {s} has {ref.mu.numel()}-d features; "
                             f"{extractor.name!r} gives {extractor.feature_dim}-d")
        return ref
    return reference_stats(s, extractor, split=split, n=n, cache=cache)


def evaluate_features(f_fake: Tensor, ref: Reference, *, kid_subsets: int = 100,
                      kid_subset_size: int = 1000, k: int = 3, seed: int = 0) -> dict[str, Any]:
    """FID, KID (+ std over subsets) and precision / recall of features against a reference.

    KID and precision / recall need the reference's features; without them they are None.
    Precision / recall compare equal-size sets: the larger set is subsampled (seed ``seed``),
    because the k-NN radii shrink as a set grows.
    """
    _check_finite("generated features", f_fake)
    s = gaussian_stats(f_fake)
    out: dict[str, Any] = {"fid": frechet_distance(s.mu, s.sigma, ref.mu, ref.sigma),
                           "kid": None, "kid_std": None, "precision": None, "recall": None,
                           "n": int(f_fake.shape[0]), "n_ref": int(ref.n)}
    if ref.features is not None:
        g = torch.Generator().manual_seed(seed)
        out["kid"], out["kid_std"] = kernel_inception_distance(
            ref.features, f_fake, kid_subsets, kid_subset_size, g)
        m = min(ref.features.shape[0], f_fake.shape[0])
        real = ref.features[torch.randperm(ref.features.shape[0], generator=g)[:m]]
        fake = f_fake[torch.randperm(f_fake.shape[0], generator=g)[:m]]
        out["precision"], out["recall"] = precision_recall(real, fake, k=k)
    return out


def evaluate(images: Tensor, reference: str | Path | Reference | Tensor = "fashion_mnist",
             feature_net: str | FeatureExtractor = "fmnist", n: int | None = 10000,
             split: str = "train", *, kid_subsets: int = 100, kid_subset_size: int = 1000,
             k: int = 3, cache: bool = True, seed: int = 0) -> dict[str, Any]:
    """Measure generated ``images`` (uint8 or float in [-1, 1], NCHW) against a reference.

    ``reference``: a ``difflab.data.load_dataset`` name or image folder (its ``split``, a
    fixed random subset of ``n`` images, statistics cached), a statistics ``.safetensors``
    file, or a tensor of real images. Returns a dict with ``fid``, ``kid``, ``kid_std``,
    ``precision``, ``recall``, ``n``, ``n_ref``, ``feature_net`` and ``label``.
    """
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images to fit a Gaussian, got {images.shape[0]}")
    extractor = load_feature_net(feature_net)
    ref = resolve_reference(reference, extractor, split=split, n=n, cache=cache)
    out = evaluate_features(extractor(images), ref, kid_subsets=kid_subsets,
                            kid_subset_size=kid_subset_size, k=k, seed=seed)
    out.update(feature_net=extractor.name, label=extractor.label,
               reference=str(reference) if not isinstance(reference, Tensor) else "<tensor>")
    return out


def classifier_accuracy(images: Tensor, labels: Tensor, feature_net: str = "fmnist") -> float:
    """Fraction of images the feature classifier assigns to the requested ``labels``."""
    return class_metrics(images, labels, feature_net)["accuracy"]


def class_metrics(images: Tensor, labels: Tensor | None = None,
                  feature_net: str = "fmnist") -> dict[str, Any]:
    """Class-conditional checks (mode coverage).

    ``entropy`` = -sum_c p_c log p_c of the predicted-class histogram p (nats); its maximum
    log(C) means every class is produced equally often, 0 means mode collapse onto one class.
    ``accuracy`` (if labels are given) is the fraction classified as the requested label.
    """
    extractor = load_feature_net(feature_net)
    logits = extractor.logits(images)
    pred = logits.argmax(1)
    counts = torch.bincount(pred, minlength=logits.shape[1]).to(torch.float64)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum()) + 0.0  # no "-0.0"
    out: dict[str, Any] = {"entropy": entropy, "entropy_max": math.log(logits.shape[1]),
                           "histogram": counts.long().tolist(), "feature_net": extractor.name}
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        if labels.shape != pred.shape:
            raise ValueError(f"labels must have shape {tuple(pred.shape)}, "
                             f"got {tuple(labels.shape)}")
        out["accuracy"] = float((pred == labels).float().mean())
    return out
