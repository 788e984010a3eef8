"""Guided sampling of a checkpoint: class labels, classifier-free guidance and classifier
guidance as one typed option set (:class:`Guidance`), turned into a guided denoiser by
:func:`guide` (the transforms themselves live in :mod:`difflab.guidance`).

Conventions (PITFALLS, "Guidance"):

* ``cfg = w`` is classifier-free guidance in the **w-convention** of Ho & Salimans (2022):
  eps~ = (1 + w) eps(x_t, c) - w eps(x_t, null); w = 0 is the plain conditional model.
  diffusers / Stable Diffusion's ``guidance_scale`` is s = 1 + w (so their 7.5 is our 6.5).
* ``classifier=CKPT, classifier_scale=S`` is classifier guidance (Dhariwal & Nichol 2021,
  Alg. 2): eps~ = eps - S sigma_t grad_x log p(y | x_t, t), with the noise-aware classifier
  trained by ``difflab train-classifier``. It guides an unconditional model, or a conditional
  one (then stacked on top of classifier-free guidance).

    guided = guide(denoiser, config, Guidance(cfg=2.0))
    x = difflab.sample(guided.denoiser, noise, cond=guided.labels(len(noise)), ...)

The command line's options (``--label``, ``--cfg``/``--guidance``, ``--cfg-rescale``,
``--classifier``, ``--classifier-scale``, ``--classifier-t-max``) are added by
:func:`add_guidance_args` and read by :func:`guidance_from_args`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.commands.common import ParameterError, param

__all__ = ["Guidance", "Guided", "guide", "is_conditional", "add_guidance_args",
           "guidance_from_args", "check_classifier_matches", "limit_log_prob",
           "DEFAULT_CLASSIFIER_T_MAX"]

# classifier guidance is applied only at t <= this (see limit_log_prob)
DEFAULT_CLASSIFIER_T_MAX = 0.98  # measured on Fashion-MNIST, docs/results/guidance.md


@dataclass(frozen=True)
class Guidance:
    """How to guide a checkpoint's samples.

    label: class of every sample (None: cycle through the classes 0, 1, ...); needs a
        class-conditional checkpoint or a classifier.
    cfg: classifier-free guidance weight w >= 0 (w-convention; 0 = unguided).
    cfg_rescale: guidance rescale phi in [0, 1] (Lin et al. 2024); 0 = off.
    classifier: a noise-aware classifier checkpoint (``difflab train-classifier``).
    classifier_scale: classifier guidance scale s >= 0 (None: 1 with a classifier).
    classifier_t_max: classifier guidance only at t <= this (:func:`limit_log_prob`).
    """

    label: int | None = None
    cfg: float = 0.0
    cfg_rescale: float = 0.0
    classifier: str | Path | None = None
    classifier_scale: float | None = None
    classifier_t_max: float = DEFAULT_CLASSIFIER_T_MAX


@dataclass(frozen=True)
class Guided:
    """A guided denoiser and the labels it is sampled with.

    ``num_classes`` is None for unconditional sampling (no labels at all); else the labels
    are ``label`` for every sample, or the classes in turn (``i % num_classes``). ``fits``:
    the guidance part of the keys of the fits this sampling runs
    (:func:`difflab.fitting.store.guidance_tag`, ``"cfg=W"`` for a class-conditional model,
    what ``difflab tune-grid --cfg W`` stores); None: an unguided model's own fits;
    ``"classifier"`` (classifier guidance), under which no fit is stored: the probe's plan."""

    denoiser: Any
    num_classes: int | None = None
    label: int | None = None
    fits: str | None = None

    def labels(self, count: int) -> Tensor | None:
        """The class labels of ``count`` samples (None: unconditional)."""
        if self.num_classes is None:
            return None
        if self.label is not None:
            return torch.full((count,), int(self.label), dtype=torch.long)
        return torch.arange(count, dtype=torch.long) % int(self.num_classes)


def is_conditional(config: dict[str, Any]) -> bool:
    """Whether a checkpoint's network takes class labels (trained with ``train.conditional``,
    or a net built with ``num_classes``)."""
    return bool(config.get("train", {}).get("conditional")) or bool(
        config.get("net", {}).get("num_classes"))


def _schedule_key(cfg: dict[str, Any]) -> str:
    return json.dumps(cfg, sort_keys=True)


def check_classifier_matches(clf_config: dict[str, Any], model_config: dict[str, Any],
                             path: str = "the classifier") -> None:
    """Raise ValueError if a classifier was trained for other data than the diffusion model:
    another data set, resolution, channel count, number of classes or noise schedule."""
    cd, md = clf_config.get("data", {}), model_config.get("data", {})
    fix = ("train a matching one with `difflab train-classifier --like <diffusion "
           "checkpoint>`")
    for key, what in (("name", "data set"), ("resolution", "resolution"),
                      ("channels", "channel count")):
        if cd.get(key) != md.get(key):
            raise ValueError(f"{path} was trained on {what} {cd.get(key)!r}, but the diffusion "
                             f"model on {md.get(key)!r}; {fix}")
    if md.get("num_classes") and cd.get("num_classes") != md.get("num_classes"):
        raise ValueError(f"{path} has {cd.get('num_classes')} classes, the diffusion model's "
                         f"data {md.get('num_classes')}; {fix}")
    if _schedule_key(clf_config.get("schedule", {})) != _schedule_key(
            model_config.get("schedule", {})):
        raise ValueError(f"{path} was trained for noise schedule {clf_config.get('schedule')}, "
                         f"but the diffusion model uses {model_config.get('schedule')}: its "
                         f"p(y | x_t, t) would be read at the wrong noise levels; {fix}")


def limit_log_prob(log_prob: Callable[[Tensor, Tensor, Tensor], Tensor],
                   t_max: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """log p(y | x_t, t) for t <= t_max and 0 (no guidance) above: a guidance interval
    (Kynkaenniemi et al. 2024) for classifier guidance.

    Why: with eps~ = eps - s sigma_t g, g = grad_x log p(y | x_t, t), the denoised estimate
    moves by x0~ - x0 = s sigma_t^2 g / alpha_t. The exact g vanishes with alpha_t,
    g = alpha_t / sigma_t^2 (E[x0 | x_t, y] - E[x0 | x_t]), so the shift stays bounded; a learned
    classifier's gradient at pure noise does not (it only has to output the class prior
    there), and with alpha(1) = 5e-5 (the cosine schedule) its noise is multiplied by 2e4 on
    the first step. Measured on a two-class toy: without the limit, guidance towards class 1
    sent 82% of the samples to class 0; on Fashion-MNIST (10 dpmpp_2m steps, s = 2) accuracy
    was 13% without the limit, 66% / 65% / 41% with t_max = 0.996 / 0.98 / 0.95. The default
    0.98 skips the grid points with alpha_t < 0.01 of the 10-step log-SNR grid and keeps
    t = 0.9755 (alpha 0.04), where the class of a Fashion-MNIST sample is being decided.
    """
    t_max = float(t_max)

    def limited(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return log_prob(x, t, y) * (torch.as_tensor(t) <= t_max).to(x.dtype)

    return limited


def _finite(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise ParameterError(f"{param(name)} must be a finite number, got {value}")
    return v


def guide(denoiser: Any, config: dict[str, Any], guidance: Guidance | None = None) -> Guided:
    """The denoiser of a checkpoint with ``config`` guided as ``guidance`` asks, and the
    labels to sample it with. The one place that builds guidance for ``difflab sample`` and
    ``difflab eval``.

    Raises :class:`~difflab.commands.common.ParameterError` (a ValueError naming the
    parameter) for: a label outside the classes; ``label`` / ``cfg`` on an unconditional model
    without a classifier; negative or non-finite scales; ``cfg_rescale`` outside [0, 1] or
    without ``cfg``; ``classifier_scale`` without ``classifier``; ``classifier_t_max`` outside
    (0, 1]. ValueError for a classifier trained for another data set, resolution, channel
    count, number of classes or schedule, or a path that is not a classifier;
    FileNotFoundError for a missing one.
    """
    from difflab.guidance import classifier_free, classifier_guidance, classifier_log_prob

    g = guidance or Guidance()
    w = _finite("cfg", g.cfg or 0.0)
    phi = _finite("cfg_rescale", g.cfg_rescale or 0.0)
    scale = _finite("classifier_scale", 1.0 if g.classifier_scale is None
                    else g.classifier_scale)
    t_max = _finite("classifier_t_max", g.classifier_t_max)
    data = config.get("data", {}) or {}
    conditional = is_conditional(config)
    num_classes = data.get("num_classes")
    if w < 0:
        raise ParameterError(f"{param('cfg')} must be >= 0 (w-convention: 0 = unguided, "
                             f"diffusers' guidance_scale = 1 + w), got {w}")
    if not 0.0 <= phi <= 1.0:
        raise ParameterError(f"{param('cfg_rescale')} must lie in [0, 1], got {phi}")
    if (w or phi) and not conditional:
        raise ParameterError(
            f"{param('cfg')} (classifier-free guidance) needs a class-conditional checkpoint "
            "trained with `difflab train --conditional`; this one is unconditional. Retrain "
            f"with --conditional, or guide it with a classifier: {param('classifier')} CKPT "
            f"{param('classifier_scale')} S")
    if phi and not w:
        raise ParameterError(f"{param('cfg_rescale')} only changes guided predictions; give "
                             f"{param('cfg')} W > 0")
    if scale < 0:
        raise ParameterError(f"{param('classifier_scale')} must be >= 0, got {scale}")
    if g.classifier is None and g.classifier_scale is not None:
        raise ParameterError(f"{param('classifier_scale')} needs {param('classifier')} CKPT (a "
                             "noise-aware classifier from `difflab train-classifier`)")
    if g.classifier is not None and not 0.0 < t_max <= 1.0:
        raise ParameterError(f"{param('classifier_t_max')} must lie in (0, 1], got {t_max}")

    clf = clf_config = None
    if g.classifier is not None:
        from difflab.train.classifier import load_classifier

        device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
        clf, clf_config = load_classifier(g.classifier, device=device)
        check_classifier_matches(clf_config, config, f"classifier {g.classifier}")
        num_classes = clf_config["data"]["num_classes"]
    if g.label is not None:
        if not conditional and clf is None:
            raise ParameterError(
                f"{param('label')} needs a class-conditional checkpoint (trained with "
                "`difflab train --conditional`) or a classifier to guide an unconditional one "
                f"({param('classifier')} CKPT)")
        if not 0 <= int(g.label) < int(num_classes):
            raise ParameterError(f"{param('label')} {g.label} is outside the trained classes: "
                                 f"valid labels are 0..{int(num_classes) - 1}")

    den = denoiser
    if conditional and (w or phi):
        den = classifier_free(den, w, rescale=phi)  # the null half: Condition.null()
    if clf is not None:
        from difflab.schedules import from_config

        log_prob = classifier_log_prob(clf, from_config(clf_config["schedule"]))
        if t_max < 1.0:
            log_prob = limit_log_prob(log_prob, t_max)
        den = classifier_guidance(den, log_prob, scale, pass_cond=conditional)
    if not conditional and clf is None:
        return Guided(den)
    from difflab.fitting.store import guidance_tag

    fits = "classifier" if clf is not None else guidance_tag(w, phi)
    return Guided(den, int(num_classes), None if g.label is None else int(g.label), fits)


# --- command line ------------------------------------------------------------------------
def add_guidance_args(parser: argparse.ArgumentParser) -> None:
    """Add the guidance options to a ``sample``-like parser (options the parser already has,
    e.g. an older ``--label``, are left as they are)."""
    have = set(getattr(parser, "_option_string_actions", {}))
    grp = parser.add_argument_group(
        "guidance", "class labels, classifier-free guidance (w-convention: w = 0 is unguided; "
                    "diffusers' guidance_scale = 1 + w) and classifier guidance")

    def add(*names: str, **kw: Any) -> None:
        names = tuple(n for n in names if n not in have)
        if names:
            grp.add_argument(*names, **kw)

    add("--label", type=int, default=None,
        help="class label of every sample (default: cycle through the classes 0, 1, ...); "
             "needs a class-conditional checkpoint or --classifier")
    add("--cfg", "--guidance", dest="cfg", type=float, default=0.0, metavar="W",
        help="classifier-free guidance weight w: eps = (1 + w) eps(c) - w eps(null); 0 = "
             "unguided (diffusers' guidance_scale = 1 + w); needs a checkpoint trained with "
             "--conditional")
    add("--cfg-rescale", dest="cfg_rescale", type=float, default=0.0, metavar="PHI",
        help="guidance rescale phi in [0, 1] (Lin et al. 2024): match the std of the guided "
             "v-prediction to the conditional one; 0 = off")
    add("--classifier", default=None, metavar="CKPT",
        help="noise-aware classifier checkpoint (difflab train-classifier) for classifier "
             "guidance")
    add("--classifier-scale", dest="classifier_scale", type=float, default=None, metavar="S",
        help="classifier guidance scale s: eps = eps - s sigma_t grad log p(y | x_t, t); "
             "0 = unguided; needs --classifier (default with it: 1)")
    add("--classifier-t-max", dest="classifier_t_max", type=float,
        default=DEFAULT_CLASSIFIER_T_MAX, metavar="T",
        help="apply classifier guidance only at times t <= T (t = 1 is pure noise): near "
             "t = 1 alpha_t -> 0 and a learned classifier's gradient, amplified by "
             "1 / alpha_t in x0, throws samples off (see "
             "difflab.commands.guidance.limit_log_prob)")


def guidance_from_args(args: argparse.Namespace) -> Guidance:
    """The :class:`Guidance` of options added by :func:`add_guidance_args`."""
    return Guidance(label=getattr(args, "label", None), cfg=getattr(args, "cfg", 0.0) or 0.0,
                    cfg_rescale=getattr(args, "cfg_rescale", 0.0) or 0.0,
                    classifier=getattr(args, "classifier", None),
                    classifier_scale=getattr(args, "classifier_scale", None),
                    classifier_t_max=getattr(args, "classifier_t_max",
                                             DEFAULT_CLASSIFIER_T_MAX))
