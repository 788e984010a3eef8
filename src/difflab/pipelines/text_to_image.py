"""Latent text-to-image: prompt -> text encoder -> latent sampler -> decoder (Rombach et al.
2022). Composition only; every piece lives in its own room.

    pipe = TextToImagePipeline.from_checkpoint("runs/t2i")
    images = pipe(["a small bag in the top left"], cfg=2.0, steps=20, seed=0)   # (1, 1, 64, 64)
    images = pipe(prompts, negative_prompt="a large coat in the center", cfg=3.0)
    images = pipe(prompts, cfg=3.0, interval=(0.3, 20.0))      # CFG only for sigma~ in [lo, hi]
    images = pipe(prompts, fit=fit)                             # a fitted solver (difflab.fitting)

Guidance (w-convention: w = 0 is the conditional model; diffusers' guidance_scale = 1 + w):
``cfg`` w with the empty prompt as the null condition, or ``negative_prompt``'s encoding in its
place (:meth:`TextEncoder.condition` puts it into the Condition's ``null_context``);
``cfg_rescale`` phi (Lin et al. 2024); ``interval`` (sigma_lo, sigma_hi): guidance only where
sigma~ = sigma_t / alpha_t lies in it (:class:`~difflab.guidance.GuidanceInterval`). All are
denoiser transforms, so every sampler and fitted solver runs them.

Seeding as ``difflab sample``: the latent noise of all images comes up front from one generator
seeded with ``seed``; a stochastic sampler draws image i's noise from its own generator
(``mix_seed(seed, i)``), so an image does not depend on the batch it is sampled in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["TextToImagePipeline", "check_prompts", "PromptError"]


class PromptError(ValueError):
    """A prompt the pipeline cannot take (empty, too long, not a string)."""


def check_prompts(prompts: Sequence[str] | str, *, what: str = "prompt") -> list[str]:
    """``prompts`` as a list of non-empty strings (a single string is one prompt); a
    :class:`PromptError` naming the first bad one otherwise."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError(f"no {what}s given; pass at least one")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"{what} {i + 1} is a {type(p).__name__}, not a string")
        if not p.strip():
            raise PromptError(f"{what} {i + 1} is empty; write what the image should show "
                              "(the empty prompt is the unconditional one: use cfg=0 and any "
                              "prompt, or a negative prompt, instead)")
    return prompts


class TextToImagePipeline:
    """A latent text-to-image model ready to sample (module docstring).

    Args:
        denoiser: the latent denoiser (its network takes ``context`` / ``context_mask``).
        autoencoder: the frozen autoencoder (``decode_latents``; its scale factor in its
            config).
        text_encoder: the text encoder it was trained with (``condition(prompts,
            negative_prompt)``).
        latent_shape: (C, h, w) of one latent.
        config: the checkpoint's config (defaults for sampler, steps and cfg in
            ``config["sample"]``).
    """

    def __init__(self, denoiser: Any, autoencoder: torch.nn.Module,
                 text_encoder: torch.nn.Module, latent_shape: Sequence[int], *,
                 config: dict[str, Any] | None = None):
        self.denoiser, self.autoencoder, self.text_encoder = denoiser, autoencoder, text_encoder
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.config = dict(config or {})
        self.defaults = {"sampler": "auto", "steps": 20, "cfg": 0.0,
                         **self.config.get("sample", {})}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, ema: bool = True,
                        device: str | torch.device = "cpu") -> TextToImagePipeline:
        """The pipeline of a text-to-image checkpoint (or run directory). A checkpoint of
        another kind (no text encoder) is a ValueError naming it; a missing autoencoder a
        FileNotFoundError naming where it was looked for."""
        from difflab.train import checkpoint as ckpt

        ck = ckpt.read(path)
        if ck.kind != "text_to_image":
            raise ValueError(f"checkpoint {ck.path} has no text encoder: it is a {ck.kind!r} "
                             "model, so it cannot take prompts; train a text-to-image model "
                             "(difflab train t2i_canvas)")
        model, config = ckpt.load(ck.path, ema=ema, device=device)
        return cls(model.denoiser, model.autoencoder, model.text_encoder, model.latent_shape,
                   config=config)

    @property
    def guidance_input(self) -> bool:
        """Whether the denoiser takes the guidance weight as an input (latent consistency)."""
        from difflab.guidance import takes_guidance

        return takes_guidance(self.denoiser)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.denoiser.parameters()), torch.device("cpu"))

    # -- the pieces -------------------------------------------------------------------------
    def condition(self, prompts: Sequence[str] | str,
                  negative_prompt: str | Sequence[str] | None = None) -> Any:
        """The Condition of ``prompts`` (null: the empty prompt, or ``negative_prompt``)."""
        prompts = check_prompts(prompts)
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negative_prompt = check_prompts(negative_prompt, what="negative prompt")
        return self.text_encoder.condition(prompts, negative_prompt).to(self.device)

    def guided(self, cfg: float = 0.0, *, cfg_rescale: float = 0.0,
               interval: tuple[float, float] | None = None) -> Any:
        """The denoiser to sample: classifier-free guidance with weight ``cfg`` (w = 0 and no
        rescale: the conditional model itself), only inside ``interval`` if given; for a
        guidance-distilled model (latent consistency) ``cfg`` is its guidance-weight input."""
        from difflab.guidance import classifier_free, guidance_input, guidance_interval

        if cfg < 0 or not 0 <= cfg_rescale <= 1:
            raise ValueError(f"cfg must be >= 0 and cfg_rescale in [0, 1], got {cfg}, "
                             f"{cfg_rescale}")
        if self.guidance_input:
            if cfg_rescale or interval is not None:
                raise ValueError("this model was distilled with the guidance weight as an "
                                 "input (latent consistency): give cfg only; cfg_rescale and "
                                 "a guidance interval need classifier-free guidance's two "
                                 "halves, which it does not compute")
            return guidance_input(self.denoiser, cfg)
        if interval is not None:
            lo, hi = interval
            return guidance_interval(self.denoiser, cfg, lo, hi, rescale=cfg_rescale)
        if cfg == 0 and cfg_rescale == 0:
            return self.denoiser
        return classifier_free(self.denoiser, cfg, rescale=cfg_rescale)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] of scaled latents."""
        return self.autoencoder.decode_latents(latents).clamp(-1, 1)

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str, *,
                 negative_prompt: str | Sequence[str] | None = None, cfg: float | None = None,
                 cfg_rescale: float = 0.0, interval: tuple[float, float] | None = None,
                 sampler: str | None = None, steps: int | None = None,
                 spacing: str | None = None, fit: Any = None, seed: int = 0,
                 batch_size: int = 64, return_latents: bool = False,
                 planner: Callable[..., Any] | None = None) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] (on the CPU), one per prompt, in prompt order.
        ``sampler`` / ``steps`` / ``cfg`` default to the checkpoint's ``sample`` section (else
        auto, 20 steps, cfg 0); ``fit`` (a fitted solver) replaces sampler and grid. ``"auto"``
        with no spacing: the plan a probe of the guided model picks (:func:`difflab.samplers.
        default_plan`, on the first batch's noise and prompts, then shared by every batch, so
        the probe runs once), or the parameterisation's own sampler (consistency).
        ``planner``: what finds that plan, ``planner(denoiser, steps, noise, cond)`` (default
        :func:`~difflab.samplers.default_plan`; the commands pass one that keeps plans between
        runs, :mod:`difflab.commands.plan_cache`)."""
        from difflab.data.dataset import mix_seed
        from difflab.samplers import AUTO, choose, default_plan, sample

        prompts = check_prompts(prompts)
        negatives = None
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            negatives = check_prompts(negative_prompt, what="negative prompt")
            if len(negatives) != len(prompts):
                raise PromptError(f"give one negative prompt, or one per prompt "
                                  f"({len(prompts)}), got {len(negatives)}")
        cfg = float(self.defaults["cfg"] if cfg is None else cfg)
        if negative_prompt is not None and self.guidance_input:
            raise PromptError("this model was distilled with the guidance weight as an input "
                              "(latent consistency): it has no unconditional half to replace "
                              "by a negative prompt; drop negative_prompt")
        if fit is None:
            sampler = sampler or self.defaults["sampler"]
            steps = int(steps or self.defaults["steps"])
        den = self.guided(cfg, cfg_rescale=cfg_rescale, interval=interval)
        N = len(prompts)
        noise = torch.randn((N,) + self.latent_shape,
                            generator=torch.Generator().manual_seed(int(seed)))
        def condition(i: int, j: int) -> Any:
            return self.condition(prompts[i:j], negative_prompt if negatives is None
                                  else negatives[i:j])

        first = condition(0, min(N, batch_size))
        if fit is None and sampler == AUTO and spacing is None:  # one plan for every batch
            fit = (planner or default_plan)(den, steps, noise[:batch_size].to(self.device),
                                            first)
            sampler = None if fit is not None else choose(None, None, den.parameterization)
        out = []
        t0 = time.perf_counter()
        for i in range(0, N, batch_size):
            j = min(N, i + batch_size)
            cond = first if i == 0 else condition(i, j)
            gens = [torch.Generator().manual_seed(mix_seed(int(seed), k)) for k in range(i, j)]
            z = sample(den, noise[i:j].to(self.device), sampler=sampler, steps=steps,
                       spacing=spacing, fit=fit, cond=cond, generator=gens)
            out.append(z.float() if return_latents else self.decode(z).float().cpu())
        self.last_seconds = time.perf_counter() - t0
        return torch.cat(out)
