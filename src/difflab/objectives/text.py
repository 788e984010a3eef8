"""Text-conditioned latent diffusion (Rombach et al. 2022, Sec. 3.3, Eq. 3):

    z_0 = s * E(x)                    (frozen autoencoder, scaled latents: s = its scale_factor)
    c   = tau(y)                       (text encoder: per-token states + padding mask)
    c   <- null(c)  with probability p_uncond   (prompt dropout to the empty prompt "",
                                                  Ho & Salimans 2022; Condition.drop)
    L   = E_{t, z_0, eps} [ w(t) || f_theta(z_t, t, c) - f(z_0, eps) ||^2 ]   (the diffusion loss)

Modules: ``"net"`` (the denoising network, trained), ``"autoencoder"`` (frozen: no gradients,
optimizer state or EMA; the checkpoint references it by path and SHA-256) and
``"text_encoder"``: frozen (a pretrained encoder; its outputs are cached per prompt by the
encoder itself) or trained with the network (a closed-vocabulary encoder, ``text_trainable``).
The objective reads these modules only through their interfaces (``encode_latents``;
``encode`` / ``null`` returning an encoding with ``condition(null)``), so it imports neither
``conditioning`` nor ``data``.

Data fields: ``"caption"`` (list of strings) and ``"image"`` (float in [-1, 1]); or, instead of
the image, ``"latent"``: scaled latents encoded once beforehand by the same frozen autoencoder
(what a caller does when the data are seen for more than one epoch: encoding each image once
costs less than encoding it in every step).

:meth:`prepare` turns captions into indices of a prompt table (tensors cut into micro-batches
and rank shards like any field) and draws t, eps and the dropout mask from the CPU generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from difflab.objectives.core import (
    DiffusionObjective,
    Objective,
    Weighting,
    per_example_loss,
    sample_t,
)
from difflab.schedules import NoiseSchedule

__all__ = ["TextToImageObjective", "PromptTable", "latents", "latent_fields",
           "check_caption_data"]


def _plain(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (whose ``encode`` is the module's own)."""
    return getattr(module, "module", module)


class PromptTable:
    """The prompts an objective has seen, as indices: :meth:`ids` turns a batch's captions
    into a tensor (cut into micro-batches and rank shards like any field), :meth:`condition`
    turns indices back into the text encoder's Condition, its null the empty prompt."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self.prompts: list[str] = []

    def ids(self, captions: Sequence[str]) -> Tensor:
        """Indices of ``captions`` (new ones are added)."""
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise ValueError("batch['caption'] must be a list of strings, one per image")
        out = []
        for c in captions:
            if c not in self._index:
                self._index[c] = len(self.prompts)
                self.prompts.append(c)
            out.append(self._index[c])
        return torch.tensor(out, dtype=torch.long)

    def condition(self, text_encoder: nn.Module, ids: Tensor, drop: Tensor | None = None
                  ) -> Any:
        """The Condition of the prompts ``ids``, rows ``drop`` replaced by the empty prompt
        (the encoder's ``null()``)."""
        enc = _plain(text_encoder)
        cond = enc.encode([self.prompts[i] for i in ids.tolist()]).condition(enc.null())
        return cond if drop is None else cond.drop(drop)


def latents(modules: Mapping[str, nn.Module], batch: Mapping[str, Any]) -> Tensor:
    """z_0 = s E(x): the batch's precomputed ``"latent"``, else its ``"image"`` through the
    frozen ``"autoencoder"``."""
    if batch.get("latent") is not None:
        return batch["latent"]
    with torch.no_grad():
        return _plain(modules["autoencoder"]).encode_latents(batch["image"])


def check_caption_data(kind: str, batch_fields: Mapping[str, Any], name: str | None) -> None:
    """Captions and images (or latents) present, else a ValueError naming what is missing."""
    if batch_fields.get("caption") is None:
        raise ValueError(f"the {kind} objective needs captions (the data field 'caption'), "
                         f"but data {name!r} has none")
    if batch_fields.get("latent") is None and batch_fields.get("image") is None:
        raise ValueError(f"the {kind} objective needs the data field 'image' (or 'latent'), "
                         f"but data {name!r} has neither")


def latent_fields(batch: Mapping[str, Any], latent_shape: Sequence[int]
                  ) -> tuple[dict[str, Tensor], tuple[int, ...]]:
    """The batch's ``"latent"`` (float) or ``"image"`` field for :meth:`prepare`, and the
    shape of one latent."""
    if batch.get("latent") is not None:
        z = batch["latent"].float()
        return {"latent": z}, tuple(z.shape[1:])
    return {"image": batch["image"]}, tuple(int(s) for s in latent_shape)


class TextToImageObjective(Objective):
    """The latent text-to-image diffusion loss (module docstring).

    Args:
        schedule, prediction, target, weighting, t_sampler: as
            :class:`~difflab.objectives.DiffusionObjective`.
        latent_shape: (C, h, w) of the scaled latents (the autoencoder's
            ``latent_shape(image_shape)``).
        p_uncond: probability of replacing a prompt by the empty prompt.
        text_trainable: train the text encoder with the network (listed in ``trainable`` and
            ``ema``) instead of reading it frozen.
    """

    kind = "text_to_image"

    def __init__(self, schedule: NoiseSchedule, prediction: Any = "v", *,
                 latent_shape: Sequence[int], p_uncond: float = 0.1,
                 text_trainable: bool = False, target: str | None = None,
                 weighting: Weighting | None = None, t_sampler: str = "uniform",
                 ema: bool = True):
        self.diffusion = DiffusionObjective(schedule, prediction, target=target,
                                            weighting=weighting, t_sampler=t_sampler)
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.p_uncond = float(p_uncond)
        self.text_trainable = bool(text_trainable)
        self.trainable = ("net", "text_encoder") if text_trainable else ("net",)
        self.frozen = ("autoencoder",) if text_trainable else ("autoencoder", "text_encoder")
        self.ema = self.trainable if ema else ()
        self.fields = ("caption",)
        self.prompts = PromptTable()

    # what the trainer and samplers read of a diffusion objective
    @property
    def schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    @property
    def parameterization(self) -> Any:
        return self.diffusion.parameterization

    @property
    def target(self) -> str:
        return self.diffusion.target

    def denoiser(self, net: nn.Module) -> Any:
        return self.diffusion.denoiser(net)

    def check_data(self, batch_fields: Mapping[str, Any], name: str | None = None) -> None:
        check_caption_data(self.kind, batch_fields, name)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """caption ids, t, eps and the dropout mask of the global batch, in this order."""
        ids = self.prompts.ids(batch["caption"])
        B = len(ids)
        fields, shape = latent_fields(batch, self.latent_shape)
        out: dict[str, Any] = {"caption_id": ids, **fields}
        out["t"] = sample_t(self.schedule, B, kind=self.diffusion.t_sampler,
                            generator=generator, p_mean=self.diffusion.p_mean,
                            p_std=self.diffusion.p_std)
        out["eps"] = torch.randn((B,) + shape, generator=generator)
        out["drop"] = torch.rand(B, generator=generator) < self.p_uncond
        return out

    def condition(self, text_encoder: nn.Module, caption_id: Tensor, drop: Tensor) -> Any:
        """The Condition of the prompts ``caption_id`` with rows ``drop`` replaced by the empty
        prompt (the encoder's ``null()``)."""
        return self.prompts.condition(text_encoder, caption_id, drop)

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        z0 = latents(modules, batch)
        cond = self.condition(modules["text_encoder"], batch["caption_id"], batch["drop"])
        per = per_example_loss(self.denoiser(modules["net"]), z0, batch["t"], batch["eps"],
                               cond=cond, target=self.target,
                               weighting=self.diffusion.weighting)
        return per.mean(), {}

    def config(self) -> dict[str, Any]:
        return {**self.diffusion.config(), "kind": self.kind, "p_uncond": self.p_uncond,
                "text_trainable": self.text_trainable, "latent_shape": list(self.latent_shape)}
