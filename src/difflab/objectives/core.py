"""Training objectives, one signature for all: ``objective(modules, batch, generator) -> (loss,
logs)``.

``modules`` maps names to nn.Modules (``"net"``, and any the objective declares: a frozen
``"teacher"``, an EMA ``"target"``); ``batch`` is a dict of named data fields (``"image"``
float in [-1, 1], ``"label"``, ...); every random number comes from ``generator`` (a CPU
``torch.Generator``, so the same seed gives the same loss on every device). An objective
declares which modules the trainer steps (``trainable``), which it only reads (``frozen``: no
gradients, optimizer state, EMA or checkpoint copy) and which get an EMA (``ema``).

The trainer (:mod:`difflab.train.trainer`) calls the two halves separately:
:meth:`Objective.prepare` draws the randomness of the *global* batch once, and
:meth:`Objective.loss` evaluates a micro-batch shard of it, so that an update does not depend
on the number of processes or micro-batches. ``objective(modules, batch, generator)`` is
``loss(modules, prepare(batch, generator))``.

The diffusion loss (:class:`DiffusionObjective`) is
E_{t, x_0, eps} [ w(t) || f_theta(x_t, t) - f(x_0, eps) ||^2 ]  with x_t = alpha_t x_0 +
sigma_t eps and a target f in {eps, x0, v}. All targets are the same loss in x0-space up to a
factor (snr = alpha^2 / sigma^2):

    ||eps_hat - eps||^2 = snr ||x0_hat - x0||^2
    ||v_hat - v||^2     = ((alpha^2 + sigma^2) / sigma)^2 ||x0_hat - x0||^2   (VP: (snr + 1) ...)

Weightings are objects stated in x0-space and divided by that factor, so each keeps its meaning
whatever the target (the min-SNR v form is min(snr, gamma) / (snr + 1), not min(snr, gamma)/snr;
cf. diffusers #5654):

* :class:`NoWeighting` ("none")   the target's own plain MSE (eps target: DDPM's L_simple, Ho
  et al. 2020 Eq. 14)
* :class:`MinSNR` ("min_snr")     x0-space weight min(snr, gamma)            (Hang et al. 2023)
* :class:`EDMWeighting` ("edm")   x0-space weight (sigma~^2 + sd^2) / (sigma~ sd)^2
  (Karras et al. 2022, Eq. 8)

Time sampling: ``uniform`` (for a discrete chain, a uniform integer DDPM index) or
``lognormal`` (EDM: ln sigma~ ~ N(P_mean, P_std^2)).

Also here: :class:`ClassifierObjective` (the noise-aware classifier of classifier guidance,
cross-entropy on x_t ~ q(x_t | x_0)) and :class:`FeatureObjective` (the FID feature networks:
cross-entropy on randomly shifted / flipped images).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.denoiser import TARGETS, BaseDenoiser, Condition, Denoiser, Prediction
from difflab.denoiser import parameterization as param
from difflab.process import q_sample
from difflab.schedules import NoiseSchedule

__all__ = ["sample_t", "loss_weight", "diffusion_loss", "per_example_loss", "target_factor",
           "Weighting", "NoWeighting", "MinSNR", "EDMWeighting", "get_weighting",
           "Objective", "DiffusionObjective", "ClassifierObjective", "FeatureObjective",
           "noised", "random_shift", "random_flip", "TARGETS", "WEIGHTINGS", "T_SAMPLERS"]

WEIGHTINGS = ("none", "min_snr", "edm")
T_SAMPLERS = ("uniform", "lognormal", "logit_normal")


def sample_t(schedule: NoiseSchedule, n: int, *, kind: str = "uniform",
             generator: torch.Generator | None = None, p_mean: float = -1.2,
             p_std: float = 1.2, device: torch.device | str | None = None,
             logit_mean: float = 0.0, logit_std: float = 1.0) -> Tensor:
    """n training times in (0, 1] (float64).

    ``uniform``: t ~ U(0, 1]; with num_steps = T (a DDPM chain) t = (i + 1) / T, i ~ U{0..T-1}.
    ``lognormal``: ln sigma~ ~ N(p_mean, p_std^2) mapped through the schedule (EDM).
    ``logit_normal``: t = sigmoid(logit_mean + logit_std n), n ~ N(0, 1) (Esser et al. 2024,
    SD3 Eq. 19, with m = 0, s = 1), in the schedule's own time (for a shifted rectified flow the
    unshifted t: the shift is applied once, inside the schedule).
    """
    if kind == "uniform":
        T = schedule.num_steps
        if T is not None:
            i = torch.randint(0, T, (n,), generator=generator)
            t = (i.to(torch.float64) + 1) / T
        else:
            t = 1 - torch.rand(n, generator=generator, dtype=torch.float64)
    elif kind == "lognormal":
        ln_sigma = p_mean + p_std * torch.randn(n, generator=generator, dtype=torch.float64)
        t = schedule.t_from_log_snr(-2 * ln_sigma).clamp(1e-6, 1.0)
    elif kind == "logit_normal":
        u = logit_mean + logit_std * torch.randn(n, generator=generator, dtype=torch.float64)
        t = torch.sigmoid(u).clamp(1e-6, 1.0)
    else:
        raise ValueError(f"unknown t sampler {kind!r}; valid: {list(T_SAMPLERS)}")
    return t.to(device) if device is not None else t


# --- weightings ------------------------------------------------------------------------------
def target_factor(alpha: Tensor, sigma: Tensor, target: str) -> Tensor:
    """The factor with ||target_hat - target||^2 = factor ||x0_hat - x0||^2 (module docstring)."""
    if target == "eps":
        return (alpha / sigma) ** 2
    if target == "x0":
        return torch.ones_like(alpha)
    if target == "v":
        return ((alpha**2 + sigma**2) / sigma) ** 2
    if target == "flow":  # u = eps - x0: ((alpha + sigma) / sigma)^2 (conditional flow matching)
        return ((alpha + sigma) / sigma) ** 2
    raise ValueError(f"unknown target {target!r}; valid: {list(TARGETS)}")


class Weighting:
    """w(t) multiplying ||target_hat - target||^2: an x0-space weight divided by the target's
    factor (:func:`target_factor`), so that it means the same whatever the target."""

    name: ClassVar[str]

    def x0_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def __call__(self, alpha: Tensor, sigma: Tensor, target: str = "eps") -> Tensor:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid: {list(TARGETS)}")
        return self.x0_weight(alpha, sigma) / target_factor(alpha, sigma, target)

    def config(self) -> dict[str, Any]:
        return {"type": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class NoWeighting(Weighting):
    """w = 1: the target's own plain MSE (whatever its x0-space weight)."""

    name = "none"

    def __call__(self, alpha: Tensor, sigma: Tensor, target: str = "eps") -> Tensor:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; valid: {list(TARGETS)}")
        return torch.ones_like(alpha)


class MinSNR(Weighting):
    """x0-space weight min(snr, gamma) (Hang et al. 2023)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0):
        self.gamma = float(gamma)

    def x0_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        return ((alpha / sigma) ** 2).clamp(max=self.gamma)

    def config(self) -> dict[str, Any]:
        return {"type": self.name, "gamma": self.gamma}


class EDMWeighting(Weighting):
    """x0-space weight lambda(sigma~) = (sigma~^2 + sd^2) / (sigma~ sd)^2, sigma~ = sigma / alpha
    (Karras et al. 2022, Eq. 8: unit-variance effective training target)."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)

    def x0_weight(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        s_tilde2 = (sigma / alpha) ** 2
        sd2 = self.sigma_data**2
        return (s_tilde2 + sd2) / (s_tilde2 * sd2)

    def config(self) -> dict[str, Any]:
        return {"type": self.name, "sigma_data": self.sigma_data}


_WEIGHTINGS: dict[str, type[Weighting]] = {c.name: c for c in (NoWeighting, MinSNR, EDMWeighting)}


def get_weighting(spec: str | Weighting | dict[str, Any] = "none", *, gamma: float = 5.0,
                  sigma_data: float = 0.5) -> Weighting:
    """A weighting from its name ("none", "min_snr" with ``gamma``, "edm" with ``sigma_data``),
    its ``config()`` dict, or the object itself."""
    if isinstance(spec, Weighting):
        return spec
    if isinstance(spec, dict):
        cfg = dict(spec)
        name = cfg.pop("type", None)
        if name not in _WEIGHTINGS:
            raise ValueError(f"unknown weighting {name!r}; valid: {list(WEIGHTINGS)}")
        return _WEIGHTINGS[name](**cfg)
    if spec == "none":
        return NoWeighting()
    if spec == "min_snr":
        return MinSNR(gamma)
    if spec == "edm":
        return EDMWeighting(sigma_data)
    raise ValueError(f"unknown weighting {spec!r}; valid: {list(WEIGHTINGS)}")


def loss_weight(alpha: Tensor, sigma: Tensor, *, target: str = "eps", weighting: str = "none",
                gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """w(t) multiplying ||target_hat - target||^2 (see the module docstring); the weighting
    given by name (:func:`get_weighting` builds the object)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; valid: {list(TARGETS)}")
    return get_weighting(weighting, gamma=gamma, sigma_data=sigma_data)(alpha, sigma, target)


# --- the diffusion loss ----------------------------------------------------------------------
def per_example_loss(denoiser: BaseDenoiser, x0: Tensor, t: Tensor, eps: Tensor, *,
                     cond: Any = None, target: str = "eps",
                     weighting: Weighting | None = None) -> Tensor:
    """w(t) * mean ||target_hat - target||^2 per example, shape (B,), at given t and eps."""
    B = x0.shape[0]
    t = t.to(x0.device)
    _, alpha, sigma = denoiser.coefficients(x0, t)
    x_t = alpha * x0 + sigma * eps
    pred = denoiser.predict(x_t, t, cond)
    truth = Prediction(x_t, x0, eps, alpha, sigma).target(target)  # the exact x0 and eps
    err = (pred.target(target).float() - truth.float()) ** 2
    w = (weighting or NoWeighting())(alpha.flatten().float(), sigma.flatten().float(), target)
    return w * err.reshape(B, -1).mean(1)


def diffusion_loss(denoiser: BaseDenoiser, x0: Tensor, *, cond: Any = None,
                   target: str = "eps", weighting: str | Weighting = "none",
                   t_sampler: str = "uniform", gamma: float = 5.0,
                   generator: torch.Generator | None = None,
                   t: Tensor | None = None, eps: Tensor | None = None) -> Tensor:
    """Per-example loss w(t) * mean ||target_hat - target||^2, shape (B,).

    ``t`` and ``eps`` may be given (for tests); otherwise they are drawn with ``generator``
    (on the CPU, so the same seed gives the same loss on every device).
    """
    B = x0.shape[0]
    if t is None:
        t = sample_t(denoiser.schedule, B, kind=t_sampler, generator=generator)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    w = get_weighting(weighting, gamma=gamma, sigma_data=getattr(denoiser, "sigma_data", 0.5))
    return per_example_loss(denoiser, x0, t, eps, cond=cond, target=target, weighting=w)


# --- objectives ------------------------------------------------------------------------------
class Objective:
    """Base class of the training objectives (see the module docstring).

    Subclasses set ``kind`` and implement :meth:`prepare` (the randomness of a global batch,
    drawn on the CPU from ``generator``; every value a tensor or a Condition whose first
    dimension is the batch) and :meth:`loss` (the mean loss of a micro-batch and its logs:
    floats or 0-d tensors, read by the trainer only when it logs).
    """

    kind: ClassVar[str]
    #: modules the optimizer steps / only reads (never trained) / keeps an EMA of
    trainable: tuple[str, ...] = ("net",)
    frozen: tuple[str, ...] = ()
    ema: tuple[str, ...] = ("net",)
    #: modules the objective reads the EMA weights of, as {module name: trained module name}
    ema_targets: Mapping[str, str] = {}
    #: data fields the objective needs
    fields: tuple[str, ...] = ("image",)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError  # pragma: no cover

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError  # pragma: no cover

    def __call__(self, modules: Mapping[str, nn.Module], batch: dict[str, Tensor],
                 generator: torch.Generator) -> tuple[Tensor, dict[str, Any]]:
        return self.loss(modules, self.prepare(batch, generator))

    def check_data(self, batch_fields: Mapping[str, Tensor], name: str | None = None) -> None:
        """Raise a ValueError naming what is missing when the data lack a needed field."""
        for f in self.fields:
            if f not in batch_fields or batch_fields[f] is None:
                raise ValueError(f"the {self.kind} objective needs the data field {f!r}, but "
                                 f"data {name!r} has none")

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class DiffusionObjective(Objective):
    """The denoising loss of a diffusion model (module docstring).

    Args:
        schedule: the model's noise schedule.
        prediction: its parameterisation (a name or a
            :class:`~difflab.denoiser.parameterization.Parameterization`).
        sigma_data: EDM's sigma_data when ``prediction="edm"`` is given by name.
        target: the regression target (eps, x0, v); default the parameterisation's native one.
        weighting: a :class:`Weighting` (default :class:`NoWeighting`).
        t_sampler: "uniform" or "lognormal" (with ``p_mean``, ``p_std``).
        conditional: condition on the data's "label" field, with condition dropout: each
            label is replaced by the null label with probability ``p_uncond``
            (:meth:`Condition.drop`; classifier-free guidance, Ho & Salimans 2022).
    """

    learned_variance = False  # the network also predicts the variance (HybridObjective)

    kind = "diffusion"

    def __init__(self, schedule: NoiseSchedule, prediction: str | param.Parameterization = "eps",
                 *, sigma_data: float = 0.5, target: str | None = None,
                 weighting: Weighting | None = None, t_sampler: str = "uniform",
                 p_mean: float = -1.2, p_std: float = 1.2, conditional: bool = False,
                 p_uncond: float = 0.0):
        self.schedule = schedule
        kw = {"sigma_data": sigma_data} if prediction == "edm" else {}
        self.parameterization = param.get(prediction, **kw)
        self.target = target or self.parameterization.target
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; valid: {list(TARGETS)}")
        if t_sampler not in T_SAMPLERS:
            raise ValueError(f"unknown t sampler {t_sampler!r}; valid: {list(T_SAMPLERS)}")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")
        self.weighting = weighting if weighting is not None else NoWeighting()
        self.t_sampler, self.p_mean, self.p_std = t_sampler, float(p_mean), float(p_std)
        self.conditional, self.p_uncond = bool(conditional), float(p_uncond)
        self.fields = ("image", "label") if self.conditional else ("image",)
        self._last: tuple[nn.Module, Denoiser] | None = None

    def denoiser(self, net: nn.Module) -> Denoiser:
        """``net`` as a denoiser of this objective's schedule and parameterisation (the last
        one is kept: building a Denoiser checks the schedule, ~0.5 ms, every step)."""
        last = self._last
        if last is not None and last[0] is net:
            return last[1]
        den = Denoiser(net, self.schedule, self.parameterization,
                       learned_variance=self.learned_variance)
        self._last = (net, den)
        return den

    def check_data(self, batch_fields: Mapping[str, Tensor], name: str | None = None) -> None:
        if self.conditional and batch_fields.get("label") is None:
            raise ValueError(f"conditional=True (train.conditional) needs labels, but data "
                             f"{name!r} has none; train unconditionally")
        super().check_data(batch_fields, name)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        """t, eps (and the condition with dropout) for the global batch, in this order."""
        x0 = batch["image"]
        B = x0.shape[0]
        t = sample_t(self.schedule, B, kind=self.t_sampler, generator=generator,
                     p_mean=self.p_mean, p_std=self.p_std)
        eps = torch.randn(x0.shape, generator=generator)
        out: dict[str, Any] = {"x0": x0, "t": t, "eps": eps}
        if self.conditional:
            drop = torch.rand(B, generator=generator) < self.p_uncond
            out["cond"] = Condition.of(batch["label"]).drop(drop)
        return out

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        per = per_example_loss(self.denoiser(modules["net"]), batch["x0"], batch["t"],
                               batch["eps"], cond=batch.get("cond"), target=self.target,
                               weighting=self.weighting)
        return per.mean(), {}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "weighting": self.weighting.config(),
                "t_sampler": self.t_sampler, "conditional": self.conditional,
                "p_uncond": self.p_uncond}


def noised(schedule: NoiseSchedule, x0: Tensor, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, net_time(t)) in x0's dtype: x_t = alpha_t x0 + sigma_t eps ~ q(x_t | x_0)."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x0.device).expand(x0.shape[0])
    x_t = q_sample(schedule, x0, t, eps).to(x0.dtype)
    return x_t, schedule.net_time(t).to(x0.dtype)


class ClassifierObjective(Objective):
    """The noise-aware classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol 2021,
    Sec. 4.1; Song et al. 2021, Eq. 48):

        t ~ U(0, 1],  eps ~ N(0, I),  x_t = alpha_t x_0 + sigma_t eps
        loss = -log softmax(f(x_t, net_time(t)))_y                       (cross-entropy)

    Logs ``acc_noised``, the accuracy on the noised micro-batch.
    """

    kind = "classifier"
    fields = ("image", "label")

    def __init__(self, schedule: NoiseSchedule, *, t_sampler: str = "uniform", ema: bool = True):
        self.schedule = schedule
        self.t_sampler = t_sampler
        self.ema = ("net",) if ema else ()

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        x0 = batch["image"]
        t = sample_t(self.schedule, x0.shape[0], kind=self.t_sampler, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        return {"x0": x0, "t": t, "eps": eps, "label": batch["label"]}

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        x_t, net_t = noised(self.schedule, batch["x0"], batch["t"], batch["eps"])
        logits = modules["net"](x_t, net_t)
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return loss, {"acc_noised": acc}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "t_sampler": self.t_sampler}


def random_shift(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by integers (dy, dx) in [-shift, shift], filling with -1 (black)."""
    if shift <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]


def random_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image of a NCHW batch left-right with probability p (one draw per image)."""
    flip = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class FeatureObjective(Objective):
    """The FID feature networks (:class:`difflab.metrics.classifier.FeatureCNN`): cross-entropy
    on images randomly translated by up to ``shift`` pixels (filled with the background -1)
    and, with ``flip``, flipped left-right with probability 1/2. No EMA."""

    kind = "feature"
    fields = ("image", "label")
    ema = ()

    def __init__(self, shift: int = 2, flip: bool = False):
        self.shift, self.flip = int(shift), bool(flip)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        x = random_shift(batch["image"], self.shift, generator)
        if self.flip:
            x = random_flip(x, generator)
        return {"x": x, "label": batch["label"]}

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        return F.cross_entropy(modules["net"](batch["x"]), batch["label"]), {}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "shift": self.shift, "flip": self.flip}
