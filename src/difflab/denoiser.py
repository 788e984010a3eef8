"""Denoisers: network + parameterisation + schedule -> an estimate of x_0.

With x_t = alpha x_0 + sigma eps, every parameterisation is a linear change of variables;
the conversions live here and nowhere else:

    eps    -> x0 = (x_t - sigma eps) / alpha
    x0     -> eps = (x_t - alpha x0) / sigma
    v      -> v = alpha eps - sigma x0 (Salimans & Ho 2022), so
              x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),
              eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    score  -> grad_x log p_t(x_t) = -eps / sigma   (Song et al. 2021; Vincent 2011)
    edm    -> Karras et al. 2022, Table 1, in the scaled variable x~ = x_t / alpha,
              sigma~ = sigma / alpha:
              D(x~; sigma~) = c_skip x~ + c_out F(c_in x~, c_noise),
              c_skip = sd^2 / (sigma~^2 + sd^2), c_out = sigma~ sd / sqrt(sigma~^2 + sd^2),
              c_in = 1 / sqrt(sigma~^2 + sd^2),  c_noise = log(sigma~) / 4.

A denoiser answers one question from one network call: given x_t at time t (and a condition),
what are x0_hat, eps_hat and the score? Samplers and guidance only ever talk to this
interface (``predict`` / ``__call__``) and to ``denoiser.schedule``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from difflab.schedules import NoiseSchedule

__all__ = [
    "PREDICTIONS",
    "Prediction",
    "TimePoint",
    "BaseDenoiser",
    "Denoiser",
    "broadcast_time",
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0_eps",
    "x0_eps_to_v",
]

PREDICTIONS = ("eps", "x0", "v", "score", "edm")


# --- conversions: each formula exactly once ---------------------------------------------
# The conversions below run once per network call while sampling; each is written as one
# fused multiply-add (addcmul) and an in-place division: two kernels instead of three.
def eps_to_x0(x: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """x0 = (x_t - sigma eps) / alpha."""
    return torch.addcmul(x, sigma, eps, value=-1).div_(alpha)


def x0_to_eps(x: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """eps = (x_t - alpha x0) / sigma."""
    return torch.addcmul(x, alpha, x0, value=-1).div_(sigma)


def v_to_x0_eps(x: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Invert v = alpha eps - sigma x0 together with x_t = alpha x0 + sigma eps."""
    norm = alpha * alpha + sigma * sigma
    return (torch.addcmul(alpha * x, sigma, v, value=-1).div_(norm),
            torch.addcmul(sigma * x, alpha, v).div_(norm))


def x0_eps_to_v(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x0."""
    return alpha * eps - sigma * x0


def broadcast_time(t: Tensor | float, x: Tensor) -> Tensor:
    """t as a (B,) tensor for a batch x of shape (B, ...)."""
    if not isinstance(t, Tensor):  # Python numbers: keep float64 (as_tensor gives float32)
        t = torch.as_tensor(t, dtype=torch.float64)
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


class Prediction:
    """Everything a denoiser says about x_t at time t.

    ``x0`` and ``eps`` are both taken from the network's own output with one conversion, so
    neither is recomputed from the other at low precision. A denoiser may give only the one its
    network predicts (the other ``None``): the other is converted on first use and kept, so a
    sampler that needs only eps (or only x0) pays no conversion; the conversion reads ``x``,
    so x must not be changed in place before it. ``alpha``/``sigma`` are shaped to broadcast
    against x.
    """

    __slots__ = ("x", "_x0", "_eps", "alpha", "sigma")

    def __init__(self, x: Tensor, x0: Tensor | None, eps: Tensor | None, alpha: Tensor,
                 sigma: Tensor):
        if x0 is None and eps is None:
            raise ValueError("a Prediction needs x0 or eps")
        self.x, self._x0, self._eps, self.alpha, self.sigma = x, x0, eps, alpha, sigma

    @property
    def holds_x0(self) -> bool:
        """Whether x0 is at hand without a conversion (else eps is): a sampler step with an
        equivalent data and noise form takes the one that costs nothing more."""
        return self._x0 is not None

    @property
    def x0(self) -> Tensor:
        if self._x0 is None:
            self._x0 = eps_to_x0(self.x, self._eps, self.alpha, self.sigma)
        return self._x0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            self._eps = x0_to_eps(self.x, self._x0, self.alpha, self.sigma)
        return self._eps

    @property
    def score(self) -> Tensor:
        """grad_x log p_t(x) = -eps / sigma."""
        return -self.eps / self.sigma

    @property
    def v(self) -> Tensor:
        return x0_eps_to_v(self.x0, self.eps, self.alpha, self.sigma)

    def target(self, name: str) -> Tensor:
        """The prediction in a training-target space: 'eps', 'x0' or 'v'."""
        if name == "eps":
            return self.eps
        if name == "x0":
            return self.x0
        if name == "v":
            return self.v
        raise ValueError(f"unknown target {name!r}; valid: 'eps', 'x0', 'v'")


class TimePoint(NamedTuple):
    """A time with its schedule coefficients, looked up once: t (a Python float), alpha, sigma
    (0-d, in the sample's dtype: a 0-d tensor times a tensor is about twice as fast as a Python
    float times it on small CPU tensors) and the network's time input net_t =
    schedule.net_time(t), already shaped (B,) for the batch of ``like``. A NamedTuple: a
    sampler builds one per grid point before its loop (3x cheaper than a frozen dataclass)."""

    t: float
    alpha: Tensor
    sigma: Tensor
    net_t: Tensor

    @staticmethod
    def grid(schedule: NoiseSchedule, ts: Tensor, like: Tensor,
             alpha_sigma: tuple[Tensor, Tensor] | None = None) -> list[TimePoint]:
        """One TimePoint per time in ``ts`` for samples like ``like`` (dtype, device);
        ``alpha_sigma`` passes ``schedule.alpha_sigma(ts)`` when already computed."""
        ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
        alpha, sigma = (c.flatten() for c in (schedule.alpha_sigma(ts) if alpha_sigma is None
                                              else alpha_sigma))
        dtype = like.dtype if like.is_floating_point() else torch.float32
        coef = torch.stack([alpha, sigma, schedule.net_time(ts)]).to(like.device, dtype)
        batch = like.shape[0] if like.ndim else 1
        net_t = coef[2, :, None].expand(-1, batch)  # one (B,) view per point
        return [TimePoint(*c) for c in zip(ts.tolist(), coef[0].unbind(), coef[1].unbind(),
                                           net_t.unbind())]


class BaseDenoiser(nn.Module):
    """The denoiser interface: ``predict(x, t, cond) -> Prediction``; calling it returns x0_hat.

    Guidance transforms (:mod:`difflab.guidance`) are BaseDenoisers wrapping another one.
    """

    schedule: NoiseSchedule
    #: Solvers fitted to this denoiser's network, by step count (the dicts of
    #: :func:`difflab.samplers.bespoke.tune_solver`; a checkpoint loads those its training
    #: fitted). ``difflab.sample`` uses the one for its ``steps`` when no sampler is named.
    #: Empty for guidance transforms: a fit to the unguided model is not one to the guided.
    solvers: Mapping[int, dict[str, Any]] = MappingProxyType({})

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        raise NotImplementedError  # pragma: no cover

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        """:meth:`predict` at a :class:`TimePoint` (samplers build them before their loop);
        a denoiser that can skip its schedule lookups overrides this."""
        return self.predict(x, point.t, cond)

    def forward(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Tensor:
        return self.predict(x, t, cond).x0

    def coefficients(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """(t as (B,), alpha, sigma shaped (B, 1, ..., 1) in x's dtype)."""
        tb = broadcast_time(t, x)
        alpha, sigma = self.schedule.alpha_sigma(tb.to(torch.float64))
        shape = (-1,) + (1,) * (x.ndim - 1)
        return tb, alpha.to(x.dtype).view(shape), sigma.to(x.dtype).view(shape)


class Denoiser(BaseDenoiser):
    """A network made into a denoiser.

    Args:
        net: ``net(x, net_time)`` or ``net(x, net_time, cond)``; returns the quantity named
            by ``prediction``. ``net_time`` is ``schedule.net_time(t)`` (for discrete
            schedules the fractional DDPM index) or, with ``prediction="edm"``, c_noise.
        schedule: the model's :class:`~difflab.schedules.NoiseSchedule`.
        prediction: one of ``eps``, ``x0``, ``v``, ``score``, ``edm``.
        sigma_data: sd in EDM preconditioning (used only by ``edm``).
    """

    def __init__(self, net: nn.Module | Callable, schedule: NoiseSchedule,
                 prediction: str = "eps", sigma_data: float = 0.5):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")
        if prediction in ("eps", "score") and float(schedule.alpha(1.0)) == 0.0:
            raise ValueError(
                f"prediction={prediction!r} cannot recover x0 where alpha = 0 (this schedule has "
                "zero terminal SNR: x0 = (x - sigma eps) / alpha divides by zero at t = 1). "
                "Use prediction='v' or 'x0' with a zero-terminal-SNR schedule."
            )
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.sigma_data = float(sigma_data)
        self.solvers: dict[int, dict[str, Any]] = {}

    def _call_net(self, x: Tensor, net_t: Tensor, cond: Any) -> Tensor:
        return self.net(x, net_t) if cond is None else self.net(x, net_t, cond)

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        tb, alpha, sigma = self.coefficients(x, t)
        net_t = None
        if self.prediction != "edm":
            net_t = self.schedule.net_time(tb).to(
                x.dtype if x.is_floating_point() else torch.float32)
        return self._predict(x, alpha, sigma, net_t, cond)

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        """:meth:`predict` with the schedule lookups of ``point`` done beforehand."""
        net_t = None
        if self.prediction != "edm":
            net_t = point.net_t
            if net_t.shape[0] != x.shape[0]:  # a point built for another batch size
                net_t = net_t[:1].expand(x.shape[0])
        return self._predict(x, point.alpha, point.sigma, net_t, cond)

    def _predict(self, x: Tensor, alpha: Tensor, sigma: Tensor, net_t: Tensor | None,
                 cond: Any) -> Prediction:
        if self.prediction == "edm":
            sd = self.sigma_data
            s_tilde = sigma / alpha  # VE-equivalent noise level
            x_tilde = x / alpha
            denom = (s_tilde * s_tilde + sd * sd).sqrt()
            c_skip = sd * sd / denom**2
            c_out = s_tilde * sd / denom
            c_in = 1 / denom
            c_noise = 0.25 * torch.log(s_tilde.flatten()).expand(x.shape[0])
            out = self._call_net(c_in * x_tilde, c_noise, cond)
            x0 = c_skip * x_tilde + c_out * out.to(x.dtype)
            return Prediction(x, x0, None, alpha, sigma)
        out = self._call_net(x, net_t, cond)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.prediction == "eps":
            return Prediction(x, None, out, alpha, sigma)
        if self.prediction == "score":
            return Prediction(x, None, -sigma * out, alpha, sigma)
        if self.prediction == "x0":
            return Prediction(x, out, None, alpha, sigma)
        x0, eps = v_to_x0_eps(x, out, alpha, sigma)
        return Prediction(x, x0, eps, alpha, sigma)
