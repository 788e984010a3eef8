"""The KL-regularised autoencoder's objective (Rombach et al. 2022, Sec. 3.1 and App. G):

    (mu, log sigma^2) = E(x),   z = mu + sigma * eps,   x_hat = D(z)
    loss = rec(x, x_hat) + kl_weight * KL(q(z|x) || N(0, I)) / (C H W)

with rec the per-pixel mean of |x - x_hat| ("l1", LDM's choice) or (x - x_hat)^2 ("l2"), and
the KL summed over the latent (:meth:`DiagonalGaussian.kl`) divided by the number of pixels, so
that ``kl_weight`` weighs the two sums per image as LDM's ``kl_weight`` does (1e-6 there). A
perceptual or adversarial term is not part of it: on the canvas data set L1 + KL reaches the
reconstruction target alone (docs/results/t2i.md).

eps is drawn in :meth:`prepare` (CPU ``generator``), so the loss does not depend on the
number of processes or micro-batches. Logs: ``rec``, ``kl`` (per image), ``psnr`` (dB, images
in [-1, 1]: 10 log10(4 / MSE)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from difflab.objectives.core import Objective

__all__ = ["AutoencoderObjective", "psnr"]

RECONSTRUCTION_LOSSES = ("l1", "l2")


def psnr(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = (x.float() - x_hat.float().clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


class AutoencoderObjective(Objective):
    """Reconstruction + small-weight KL of an :class:`~difflab.nets.autoencoder.AutoencoderKL`
    ``"net"`` (module docstring).

    Args:
        downsampling_factor: f of the autoencoder (the latent is (z_channels, H / f, W / f)).
        z_channels: its latent channels.
        loss: "l1" or "l2".
        kl_weight: weight of the KL per pixel.
        sample_posterior: decode a posterior sample (True, as LDM) or its mean.
        ema: keep an EMA of the weights.
    """

    kind = "autoencoder"
    fields = ("image",)

    def __init__(self, *, downsampling_factor: int, z_channels: int, loss: str = "l1",
                 kl_weight: float = 1e-6, sample_posterior: bool = True, ema: bool = True):
        if loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {loss!r}; valid: "
                             f"{list(RECONSTRUCTION_LOSSES)}")
        if not (math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight}")
        self.f, self.z_channels = int(downsampling_factor), int(z_channels)
        self.rec_loss, self.kl_weight = loss, float(kl_weight)
        self.sample_posterior = bool(sample_posterior)
        self.ema = ("net",) if ema else ()

    @classmethod
    def for_net(cls, net_config: dict[str, Any], **kw: Any) -> AutoencoderObjective:
        """The objective of the autoencoder a net config describes."""
        f = 2 ** (len(net_config.get("channel_mult", (1, 2, 4))) - 1)
        return cls(downsampling_factor=f, z_channels=int(net_config.get("z_channels", 4)), **kw)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        x = batch["image"]
        B, _, H, W = x.shape
        out: dict[str, Any] = {"x": x}
        if self.sample_posterior:
            out["eps"] = torch.randn(B, self.z_channels, H // self.f, W // self.f,
                                     generator=generator)
        return out

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        net, x = modules["net"], batch["x"]
        posterior = net.encode(x)
        z = posterior.mean
        if self.sample_posterior:
            z = z + posterior.std * batch["eps"].to(z.dtype)
        x_hat = net.decode(z)
        diff = x_hat.float() - x.float()
        rec = diff.abs().mean() if self.rec_loss == "l1" else diff.pow(2).mean()
        kl = posterior.kl().float().mean()
        loss = rec + self.kl_weight * kl / x[0].numel()
        with torch.no_grad():
            quality = psnr(x, x_hat.detach()).mean()
        return loss, {"rec": rec.detach(), "kl": kl.detach(), "psnr": quality}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "loss": self.rec_loss, "kl_weight": self.kl_weight,
                "sample_posterior": self.sample_posterior}
