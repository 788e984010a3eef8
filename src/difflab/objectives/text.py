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

__all__ = ["TextToImageObjective"]


def _plain(module: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (whose ``encode`` is the module's own)."""
    return getattr(module, "module", module)


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
        self._prompts: dict[str, int] = {}
        self._prompt_list: list[str] = []

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
        if batch_fields.get("caption") is None:
            raise ValueError(f"the {self.kind} objective needs captions (the data field "
                             f"'caption'), but data {name!r} has none")
        if batch_fields.get("latent") is None and batch_fields.get("image") is None:
            raise ValueError(f"the {self.kind} objective needs the data field 'image' (or "
                             f"'latent'), but data {name!r} has neither")

    def prompt_ids(self, captions: Sequence[str]) -> Tensor:
        """Indices of ``captions`` in this objective's prompt table (new ones are added)."""
        ids = []
        for c in captions:
            if c not in self._prompts:
                self._prompts[c] = len(self._prompt_list)
                self._prompt_list.append(c)
            ids.append(self._prompts[c])
        return torch.tensor(ids, dtype=torch.long)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """caption ids, t, eps and the dropout mask of the global batch, in this order."""
        captions = batch["caption"]
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise ValueError("batch['caption'] must be a list of strings, one per image")
        B = len(captions)
        out: dict[str, Any] = {"caption_id": self.prompt_ids(captions)}
        if batch.get("latent") is not None:
            out["latent"] = batch["latent"].float()
            shape = tuple(out["latent"].shape[1:])
        else:
            out["image"] = batch["image"]
            shape = self.latent_shape
        out["t"] = sample_t(self.schedule, B, kind=self.diffusion.t_sampler,
                            generator=generator, p_mean=self.diffusion.p_mean,
                            p_std=self.diffusion.p_std)
        out["eps"] = torch.randn((B,) + shape, generator=generator)
        out["drop"] = torch.rand(B, generator=generator) < self.p_uncond
        return out

    def condition(self, text_encoder: nn.Module, caption_id: Tensor, drop: Tensor) -> Any:
        """The Condition of the prompts ``caption_id`` with rows ``drop`` replaced by the empty
        prompt (the encoder's ``null()``)."""
        enc = _plain(text_encoder)
        prompts = [self._prompt_list[i] for i in caption_id.tolist()]
        return enc.encode(prompts).condition(enc.null()).drop(drop)

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        if batch.get("latent") is not None:
            z0 = batch["latent"]
        else:
            with torch.no_grad():
                z0 = _plain(modules["autoencoder"]).encode_latents(batch["image"])
        cond = self.condition(modules["text_encoder"], batch["caption_id"], batch["drop"])
        per = per_example_loss(self.denoiser(modules["net"]), z0, batch["t"], batch["eps"],
                               cond=cond, target=self.target,
                               weighting=self.diffusion.weighting)
        return per.mean(), {}

    def config(self) -> dict[str, Any]:
        return {**self.diffusion.config(), "kind": self.kind, "p_uncond": self.p_uncond,
                "text_trainable": self.text_trainable, "latent_shape": list(self.latent_shape)}
