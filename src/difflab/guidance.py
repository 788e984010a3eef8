"""Guidance as denoiser transforms: each takes a denoiser and returns one, so guidance stacks
and works with every sampler.

Classifier-free guidance (Ho & Salimans 2022), in the w-convention (w = 0 is unguided):

    eps~ = (1 + w) eps(x_t, c) - w eps(x_t, ∅)

diffusers / Stable Diffusion write the same thing as eps(∅) + s (eps(c) - eps(∅)) with
``guidance_scale`` s = 1 + w (s = 1 is unguided). Because the combination's weights sum to one,
the same combination holds for x0_hat and v_hat, so no division by alpha is needed.
Optional guidance rescale (Lin et al. 2024, Alg. 2) on the v prediction:

    v_rescaled = v~ * std(v(c)) / std(v~),   v_final = phi v_rescaled + (1 - phi) v~

A guidance-distilled network (latent consistency models, Luo et al. 2023) takes w as an input
instead: :func:`guidance_input` puts w into the condition (``Condition.guidance``), one network
call per step, no null half.

Classifier guidance (Dhariwal & Nichol 2021, Alg. 2; Song et al. 2021 Eq. 48):

    eps~ = eps - s * sigma_t * grad_x log p(y | x_t, t)

i.e. score~ = score + s grad log p(y | x_t): the sigma_t factor is part of the formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser import BaseDenoiser, Condition, Prediction, broadcast_time, v_to_x0_eps

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "classifier_free", "GuidanceInput",
           "guidance_input", "takes_guidance", "WeightFromCondition", "guidance_from_condition",
           "classifier_guidance", "classifier_log_prob", "GuidanceInterval",
           "guidance_interval"]


def _null_of(cond: Condition, uncond: Any) -> Condition:
    """The null half of the guided pair: ``cond.null()`` (labels and context nulled, control
    images and masks kept), or the given ``uncond`` (a Condition, e.g. a negative prompt's, or
    class labels)."""
    if uncond is None:
        return cond.null()
    if isinstance(uncond, Condition):
        return uncond if uncond.batch_size == cond.batch_size else Condition.cat(
            [uncond] * cond.batch_size)
    labels = torch.as_tensor(uncond, device=cond.labels.device if cond.labels is not None
                             else None).long()
    labels = labels.expand(cond.batch_size) if labels.ndim == 0 else labels
    return replace(cond.null(), labels=labels)


class ClassifierFreeGuidance(BaseDenoiser):
    """eps~ = (1 + w) eps(x, c) - w eps(x, null), both from one batched network call.

    Args:
        denoiser: a conditional denoiser.
        w: guidance weight (w = 0: the conditional model; diffusers' scale = 1 + w), or a (B,)
            tensor of one weight per row (distillation over a range of w).
        uncond: the null condition; default ``cond.null()`` (class labels -> the null label,
            a prompt -> the empty prompt; control images and masks stay in both halves). A
            Condition here replaces it, e.g. a negative prompt's.
        rescale: phi of guidance rescale (0 disables).
    """

    def __init__(self, denoiser: BaseDenoiser, w: float | Tensor, uncond: Any = None,
                 rescale: float = 0.0):
        super().__init__()
        self.w = w if isinstance(w, Tensor) else float(w)
        self.denoiser, self.uncond, self.rescale = denoiser, uncond, rescale
        self.schedule, self.parameterization = denoiser.schedule, denoiser.parameterization

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        if cond is None:
            raise ValueError("classifier-free guidance needs a condition: pass cond=...")
        if not isinstance(self.w, Tensor) and self.w == 0.0 and self.rescale == 0.0:
            return self.denoiser.predict(x, t, cond)
        cond = Condition.of(cond).to(x.device)
        tb = broadcast_time(t, x)
        both = self.denoiser.predict(torch.cat([x, x]), torch.cat([tb, tb]),
                                     Condition.cat([cond, _null_of(cond, self.uncond)]))
        B = x.shape[0]
        w = self.w
        if isinstance(w, Tensor):
            w = w.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
        x0 = (1 + w) * both.x0[:B] - w * both.x0[B:]
        eps = (1 + w) * both.eps[:B] - w * both.eps[B:]
        alpha, sigma = both.alpha[:B], both.sigma[:B]
        if self.rescale:
            v_cfg = (1 + w) * both.v[:B] - w * both.v[B:]
            dims = tuple(range(1, x.ndim))
            ratio = both.v[:B].std(dims, keepdim=True) / v_cfg.std(dims, keepdim=True)
            v = self.rescale * v_cfg * ratio + (1 - self.rescale) * v_cfg
            x0, eps = v_to_x0_eps(x, v, alpha, sigma)
        return Prediction(x, x0, eps, alpha, sigma)


class GuidanceInterval(BaseDenoiser):
    """Classifier-free guidance applied only in a noise-level interval (Kynkaenniemi et al.
    2024, "Applying Guidance in a Limited Interval Improves Sample and Distribution Quality"):

        x0~ = CFG_w(x, c)   if sigma_lo <= sigma~(t) <= sigma_hi,   else x0(x, c)
        sigma~(t) = sigma_t / alpha_t            (the noise level, EDM's sigma)

    The interval is stated in noise level, not in step index (diffusers' fraction of the
    steps), so it means the same at any step count, grid or sampler. Outside it one network
    call (the conditional model); per-sample times in a batch are mixed row by row.

    Args:
        denoiser: a conditional denoiser.
        w, uncond, rescale: as :class:`ClassifierFreeGuidance`.
        sigma_lo, sigma_hi: the interval of sigma~ (0 <= sigma_lo <= sigma_hi; inf allowed).
    """

    def __init__(self, denoiser: BaseDenoiser, w: float, sigma_lo: float = 0.0,
                 sigma_hi: float = float("inf"), uncond: Any = None, rescale: float = 0.0):
        super().__init__()
        if not (0.0 <= float(sigma_lo) <= float(sigma_hi)):
            raise ValueError(f"the guidance interval needs 0 <= sigma_lo <= sigma_hi, got "
                             f"[{sigma_lo}, {sigma_hi}]")
        self.denoiser = denoiser
        self.guided = ClassifierFreeGuidance(denoiser, w, uncond, rescale)
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)
        self.schedule, self.parameterization = denoiser.schedule, denoiser.parameterization

    def inside(self, x: Tensor, t: Tensor | float) -> Tensor:
        """(B,) bool: whether sigma~(t) of each row lies in the interval."""
        _, alpha, sigma = self.coefficients(x, t)
        s = (sigma.double() / alpha.double()).flatten()
        return (s >= self.sigma_lo) & (s <= self.sigma_hi)

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        inside = self.inside(x, t)
        if bool(inside.all()):
            return self.guided.predict(x, t, cond)
        if not bool(inside.any()):
            return self.denoiser.predict(x, t, cond)
        g, b = self.guided.predict(x, t, cond), self.denoiser.predict(x, t, cond)
        m = inside.view(-1, *([1] * (x.ndim - 1)))
        return Prediction(x, torch.where(m, g.x0, b.x0), torch.where(m, g.eps, b.eps),
                          b.alpha, b.sigma)


def guidance_interval(denoiser: BaseDenoiser, w: float, sigma_lo: float = 0.0,
                      sigma_hi: float = float("inf"), uncond: Any = None,
                      rescale: float = 0.0) -> GuidanceInterval:
    """See :class:`GuidanceInterval`."""
    return GuidanceInterval(denoiser, w, sigma_lo, sigma_hi, uncond, rescale)


class WeightFromCondition(BaseDenoiser):
    """Classifier-free guidance at the per-row weight w the condition carries
    (``Condition.guidance``), which is removed before the network sees it: the guided teacher
    of latent consistency distillation, whose student is given the same w as an input. Because
    w travels in the condition, it is sliced with the batch wherever the condition is."""

    def __init__(self, denoiser: BaseDenoiser, uncond: Any = None):
        super().__init__()
        self.denoiser, self.uncond = denoiser, uncond
        self.schedule, self.parameterization = denoiser.schedule, denoiser.parameterization

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        cond = Condition.of(cond)
        if cond is None or cond.guidance is None:
            raise ValueError("guidance by the condition's weight needs cond.guidance (a (B,) "
                             "tensor of w): cond.with_guidance(w)")
        return ClassifierFreeGuidance(self.denoiser, cond.guidance, self.uncond).predict(
            x, t, replace(cond, guidance=None))


def guidance_from_condition(denoiser: BaseDenoiser, uncond: Any = None) -> WeightFromCondition:
    """See :class:`WeightFromCondition`."""
    return WeightFromCondition(denoiser, uncond)


def takes_guidance(denoiser: BaseDenoiser) -> bool:
    """Whether ``denoiser``'s network takes the guidance scale as an input (a U-Net built with
    ``guidance_embed``): guide it with :func:`guidance_input`, not classifier-free guidance."""
    net = getattr(denoiser, "net", None)
    return bool(getattr(net, "config", {}).get("guidance_embed"))


class GuidanceInput(BaseDenoiser):
    """A guidance-distilled network at guidance weight w: the condition gets ``guidance`` = w
    (the network's w-embedding, Luo et al. 2023, "Latent Consistency Models", Sec. 4.2), in the
    w-convention of :class:`ClassifierFreeGuidance` (w = 0: the conditional model). One network
    call per evaluation: the guided teacher's two halves were distilled into it."""

    def __init__(self, denoiser: BaseDenoiser, w: float):
        super().__init__()
        self.denoiser, self.w = denoiser, float(w)
        self.schedule, self.parameterization = denoiser.schedule, denoiser.parameterization

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        if cond is None:
            raise ValueError("a guidance-distilled model needs a condition: pass cond=...")
        return self.denoiser.predict(x, t, Condition.of(cond).with_guidance(self.w))


def guidance_input(denoiser: BaseDenoiser, w: float) -> GuidanceInput:
    """See :class:`GuidanceInput`."""
    return GuidanceInput(denoiser, w)


class ClassifierGuidance(BaseDenoiser):
    """eps~ = eps - scale * sigma_t * grad_x log p(y | x_t, t).

    Args:
        denoiser: the (unconditional or conditional) model.
        log_prob: ``log_prob(x_t, t, y) -> (B,)`` log p(y | x_t, t), differentiable in x_t;
            t is continuous time in [0, 1]. See :func:`classifier_log_prob`.
        scale: s (s = 1 with the exact classifier gives the exact conditional score).
        pass_cond: also give the label to ``denoiser`` (guiding a conditional model).
    """

    def __init__(self, denoiser: BaseDenoiser, log_prob: Callable[[Tensor, Tensor, Tensor], Tensor],
                 scale: float = 1.0, pass_cond: bool = False):
        super().__init__()
        self.denoiser, self.log_prob, self.scale = denoiser, log_prob, float(scale)
        self.pass_cond = pass_cond
        self.schedule, self.parameterization = denoiser.schedule, denoiser.parameterization

    def grad_log_prob(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = self.log_prob(x_in, t, y)
            (grad,) = torch.autograd.grad(lp.sum(), x_in)
        return grad

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        if cond is None:
            raise ValueError("classifier guidance needs target labels: pass cond=labels")
        tb = broadcast_time(t, x)
        base = self.denoiser.predict(x, tb, cond if self.pass_cond else None)
        if self.scale == 0.0:
            return base
        labels = Condition.of(cond).labels
        if labels is None:
            raise ValueError("classifier guidance needs class labels in the condition")
        grad = self.grad_log_prob(x, tb, labels.to(x.device))
        eps = base.eps - self.scale * base.sigma * grad.to(x.dtype)
        return Prediction(x, None, eps, base.alpha, base.sigma)


def classifier_free(denoiser: BaseDenoiser, w: float | Tensor, uncond: Any = None,
                    rescale: float = 0.0) -> ClassifierFreeGuidance:
    """See :class:`ClassifierFreeGuidance`."""
    return ClassifierFreeGuidance(denoiser, w, uncond, rescale)


def classifier_guidance(denoiser: BaseDenoiser, log_prob: Callable, scale: float = 1.0,
                        pass_cond: bool = False) -> ClassifierGuidance:
    """See :class:`ClassifierGuidance`."""
    return ClassifierGuidance(denoiser, log_prob, scale, pass_cond)


def classifier_log_prob(classifier: nn.Module,
                        schedule) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Wrap a noise-aware classifier ``classifier(x_t, net_time) -> logits`` as
    log p(y | x_t, t)."""

    def log_prob(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        logits = classifier(x, schedule.net_time(t).to(x.dtype))
        return torch.log_softmax(logits.float(), -1).gather(1, y.long().view(-1, 1)).squeeze(1)

    return log_prob
