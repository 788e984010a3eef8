"""The ControlNet objective (Zhang, Rao & Agrawala 2023): the base model's own diffusion loss,
taken through the frozen base U-Net steered by a trainable ControlNet.

    t, eps as the base was trained (its t sampler),  x_t = alpha_t x_0 + sigma_t eps
    out   = base(x_t, t; residuals = controlnet(x_t, t, c))     c = the control image of x_0
    loss  = w(t) || out as the base's target - target(x_0, eps) ||^2     (its weighting)

Modules: ``"controlnet"`` (trainable, with an EMA) and ``"base"`` (frozen: no gradients, no
optimizer state, no EMA copy; the checkpoint references it by path and SHA-256). The gradient
reaches the ControlNet through the base's activations only (its weights take none).

The control image is a data field (``"control"``, float or bool (B, C, H, W) in [0, 1]) computed
from the training images before training by a named preprocessor
(:mod:`difflab.conditioning.control`, a layer above this one; :mod:`difflab.train.controlnet`
precomputes it for the whole training set), so this objective draws no randomness for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser import Condition, Denoiser
from difflab.denoiser import parameterization as param
from difflab.objectives.core import NoWeighting, Objective, Weighting, per_example_loss, sample_t
from difflab.schedules import NoiseSchedule

__all__ = ["ControlNetObjective", "ControlledNet"]


class ControlledNet(nn.Module):
    """``base(x, t, ...; residuals=controlnet(x, t, ..., control=c))``: the training-time
    wrapper (the ControlNet may be wrapped by DDP / torch.compile, which
    :class:`~difflab.nets.controlnet.ControlledUNet` does not accept); scale 1, no interval."""

    def __init__(self, base: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.base, self.controlnet = base, controlnet

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                control: Tensor | None = None, **unused: Any) -> Tensor:
        if control is None:
            raise ValueError("the ControlNet objective needs the control image (data field "
                             "'control')")
        residuals = self.controlnet(x, t, labels, context, context_mask, control=control)
        return self.base(x, t, labels, context, context_mask, residuals=residuals, **unused)


class ControlNetObjective(Objective):
    """The base's diffusion loss through the ControlNet (module docstring).

    Args:
        schedule, prediction, sigma_data: the base model's schedule and parameterisation.
        target: regression target (default the parameterisation's native one).
        weighting: a :class:`~difflab.objectives.core.Weighting` (default none).
        t_sampler, p_mean, p_std: time sampling (:func:`~difflab.objectives.core.sample_t`).
        ema: keep an EMA of the ControlNet.
        components: extra checkpoint components ``{name: config}`` (the control settings and
            the preprocessor), written by the trainer beside the ControlNet.
    """

    kind = "controlnet"
    trainable = ("controlnet",)
    frozen = ("base",)
    fields = ("image", "control")

    def __init__(self, schedule: NoiseSchedule, prediction: str | param.Parameterization = "eps",
                 *, sigma_data: float = 0.5, target: str | None = None,
                 weighting: Weighting | None = None, t_sampler: str = "uniform",
                 p_mean: float = -1.2, p_std: float = 1.2, ema: bool = True,
                 components: Mapping[str, dict[str, Any]] | None = None):
        self.schedule = schedule
        kw = {"sigma_data": sigma_data} if prediction == "edm" else {}
        self.parameterization = param.get(prediction, **kw)
        self.target = target or self.parameterization.target
        self.weighting = weighting if weighting is not None else NoWeighting()
        self.t_sampler, self.p_mean, self.p_std = t_sampler, float(p_mean), float(p_std)
        self.ema = ("controlnet",) if ema else ()
        self.components = {k: dict(v) for k, v in (components or {}).items()}
        self._last: tuple[nn.Module, nn.Module, Denoiser] | None = None

    def denoiser(self, base: nn.Module, controlnet: nn.Module) -> Denoiser:
        """The controlled network as a denoiser of the base's schedule and parameterisation."""
        last = self._last
        if last is not None and last[0] is base and last[1] is controlnet:
            return last[2]
        den = Denoiser(ControlledNet(base, controlnet), self.schedule, self.parameterization)
        self._last = (base, controlnet, den)
        return den

    def checkpoint_components(self) -> dict[str, dict[str, Any]]:
        """Config-only components the trainer writes beside the trained ones."""
        return dict(self.components)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """t and eps for the global batch (the base's draw order), and the control images."""
        x0 = batch["image"]
        t = sample_t(self.schedule, x0.shape[0], kind=self.t_sampler, generator=generator,
                     p_mean=self.p_mean, p_std=self.p_std)
        eps = torch.randn(x0.shape, generator=generator)
        return {"x0": x0, "t": t, "eps": eps, "control": batch["control"]}

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        x0 = batch["x0"]
        cond = Condition(control=batch["control"].to(x0.dtype))
        den = self.denoiser(modules["base"], modules["controlnet"])
        per = per_example_loss(den, x0, batch["t"], batch["eps"], cond=cond, target=self.target,
                               weighting=self.weighting)
        return per.mean(), {}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "weighting": self.weighting.config(),
                "t_sampler": self.t_sampler}
