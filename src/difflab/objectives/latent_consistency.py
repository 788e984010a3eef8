"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", Alg. 1):
consistency distillation of a text-to-image latent model's *guided* probability-flow ODE, with
the guidance weight w an input of the student, so one student serves every w in its range:

    z_0 = s E(x),   c = tau(prompt),   w ~ U[w_min, w_max]   (one per row)
    z_{t_{n+1}} = alpha_{t_{n+1}} z_0 + sigma_{t_{n+1}} eps
    z^_{t_n}    = Psi(z_{t_{n+1}}, t_{n+1} -> t_n;  CFG_w(teacher), c)     (one ODE-solver step)
    L = d( f_theta(z_{t_{n+1}}, t_{n+1}, c, w),  sg[ f_theta-(z^_{t_n}, t_n, c, w) ] )

CFG_w is classifier-free guidance with the empty prompt as the null condition (w carried in the
condition, ``Condition.guidance``, so it is sliced with the batch; the guide, e.g.
:func:`difflab.guidance.guidance_from_condition`, removes it before the teacher's network), in the
w-convention of :mod:`difflab.guidance` (eps~ = (1 + w) eps_c - w eps_u; LCM's omega is this w,
diffusers' guidance_scale is 1 + w). theta- is the EMA target (``"target"``), as in
:class:`~difflab.objectives.consistency.ConsistencyDistillation`, whose pairs (N Karras points,
the teacher's one-step solver Psi; LCM's "skipping step" is the spacing of these points) and
boundary-condition parameterisation (c_skip, c_out in sigma~, with LCM's small sigma_data, the
"timestep scaling") this objective shares. The student is the teacher's network with a
w-embedding added to its time embedding (zero-initialised: at step 0 it is the unguided
teacher at every w; :mod:`difflab.nets.unet`), reached through ``Condition.guidance``.

Modules: ``"net"`` (trained, + EMA), ``"target"`` (EMA of ``"net"``), and frozen ``"teacher"``,
``"text_encoder"`` and (when the data carry images, not latents) ``"autoencoder"``. Data fields
as :class:`~difflab.objectives.text.TextToImageObjective`: ``"caption"`` and ``"latent"`` (or
``"image"``). The guided teacher (a denoiser transform taking a (B,) tensor of w) is passed in,
as the solver step is: the objectives layer sits below guidance and the samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser import BaseDenoiser
from difflab.denoiser.parameterization import Consistency, Parameterization
from difflab.objectives.consistency import ConsistencyDistillation, TeacherStepFn
from difflab.objectives.text import PromptTable, check_caption_data, latent_fields, latents
from difflab.schedules import NoiseSchedule

__all__ = ["LatentConsistencyDistillation"]

#: guide(teacher denoiser) -> the denoiser guided at the weight its condition carries
GuideFn = Callable[[BaseDenoiser], BaseDenoiser]


class LatentConsistencyDistillation(ConsistencyDistillation):
    """Latent consistency distillation (module docstring).

    Args:
        schedule, parameterization, teacher_step, teacher_parameterization, N, rho, sigma_max,
            distance, huber_c, index_groups: as :class:`ConsistencyDistillation`.
        guide: ``guide(teacher)``, classifier-free guidance at the per-row weight w of the
            condition (:func:`difflab.guidance.guidance_from_condition`).
        latent_shape: (C, h, w) of one latent (when the data carry images).
        w_range: (w_min, w_max) of the guidance weight drawn per row.
    """

    kind = "latent_consistency"
    trainable = ("net",)
    frozen = ("teacher", "text_encoder", "autoencoder")
    ema = ("net",)
    ema_targets = {"target": "net"}

    def __init__(self, schedule: NoiseSchedule, parameterization: Consistency,
                 teacher_step: TeacherStepFn, teacher_parameterization: Parameterization, *,
                 guide: GuideFn, latent_shape: Sequence[int],
                 w_range: tuple[float, float] = (0.0, 4.0), N: int = 18, rho: float = 7.0,
                 sigma_max: float = 80.0, distance: str = "l2", huber_c: float | None = None,
                 index_groups: int | None = None):
        super().__init__(schedule, parameterization, teacher_step, teacher_parameterization,
                         teacher_guide=guide, N=N, rho=rho, sigma_max=sigma_max,
                         distance=distance, huber_c=huber_c, index_groups=index_groups)
        w_min, w_max = (float(w) for w in w_range)
        if not 0.0 <= w_min <= w_max:
            raise ValueError(f"w_range must be (w_min, w_max) with 0 <= w_min <= w_max, got "
                             f"{tuple(w_range)}")
        self.w_min, self.w_max = w_min, w_max
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.fields = ("caption",)
        self.prompts = PromptTable()

    def check_data(self, batch_fields: Mapping[str, Any], name: str | None = None) -> None:
        check_caption_data(self.kind, batch_fields, name)

    def prepare(self, batch: dict[str, Any], generator: torch.Generator, *,
                step: int = 0) -> dict[str, Any]:
        """caption ids, the pairs' indices and z, then w, in this order."""
        ids = self.prompts.ids(batch["caption"])
        fields, shape = latent_fields(batch, self.latent_shape)
        out = {"caption_id": ids, **fields, **self.draw_pairs((len(ids),) + shape, generator)}
        u = torch.rand(len(ids), generator=generator, dtype=torch.float64)
        out["w"] = (self.w_min + (self.w_max - self.w_min) * u).float()
        return out

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        z0 = latents(modules, batch)
        cond = self.prompts.condition(modules["text_encoder"], batch["caption_id"])
        cond = cond.with_guidance(batch["w"])  # the student's input and the teacher's weight
        return self.distill(modules, self.teacher(modules["teacher"]), z0,
                            {**batch, "cond": cond}, cond)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": "lcd", "w_range": [self.w_min, self.w_max]}
