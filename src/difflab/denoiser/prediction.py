"""What a denoiser says about x_t: the conversions between x0, eps, v and the score, each
written once, and the :class:`Prediction` that carries them lazily.

With x_t = alpha x_0 + sigma eps:

    eps    -> x0 = (x_t - sigma eps) / alpha
    x0     -> eps = (x_t - alpha x0) / sigma
    v      -> v = alpha eps - sigma x0 (Salimans & Ho 2022), so
              x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),
              eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    score  -> grad_x log p_t(x_t) = -eps / sigma   (Song et al. 2021; Vincent 2011)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule

__all__ = ["Prediction", "TimePoint", "broadcast_time", "eps_to_x0", "x0_to_eps", "v_to_x0_eps",
           "flow_to_x0_eps", "interpolated_log_variance",
           "x0_eps_to_v", "TARGETS"]

#: the spaces a network output / training target can live in ("flow": u = eps - x0)
TARGETS = ("eps", "x0", "v", "flow")


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


def flow_to_x0_eps(x: Tensor, u: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Invert the flow-matching velocity u = eps - x0 together with x_t = alpha x0 + sigma eps:
    x0 = (x_t - sigma u) / (alpha + sigma), eps = (x_t + alpha u) / (alpha + sigma) (finite at
    alpha = 0 and at sigma = 0; rectified flow: x0 = x_t - t u, eps = x_t + (1 - t) u)."""
    norm = alpha + sigma
    return (torch.addcmul(x, sigma, u, value=-1).div_(norm), torch.addcmul(x, alpha, u).div_(norm))


def x0_eps_to_v(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x0."""
    return alpha * eps - sigma * x0


def interpolated_log_variance(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """log Sigma = v log beta + (1 - v) log beta~ (Nichol & Dhariwal 2021, Eq. 15)."""
    return v * log_beta + (1 - v) * log_beta_tilde


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

    __slots__ = ("x", "_x0", "_eps", "alpha", "sigma", "variance_v")

    def __init__(self, x: Tensor, x0: Tensor | None, eps: Tensor | None, alpha: Tensor,
                 sigma: Tensor):
        if x0 is None and eps is None:
            raise ValueError("a Prediction needs x0 or eps")
        self.x, self._x0, self._eps, self.alpha, self.sigma = x, x0, eps, alpha, sigma
        #: a learned variance (Nichol & Dhariwal 2021, Eq. 15), else None: the interpolation
        #: v of the reverse step's log-variance, v log beta + (1 - v) log beta~, per element
        #: (v = 1: beta = sigma_{t|s}^2, v = 0: beta~ = the posterior variance), set by a
        #: ``Denoiser(..., learned_variance=True)``; see :func:`interpolated_log_variance`
        self.variance_v: Tensor | None = None

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

    @property
    def flow(self) -> Tensor:
        """The flow-matching velocity u = eps - x0."""
        return self.eps - self.x0

    @staticmethod
    def from_target(name: str, value: Tensor, x: Tensor, alpha: Tensor,
                    sigma: Tensor) -> Prediction:
        """The Prediction whose :meth:`target` ``name`` is ``value`` (the one map from a
        target space back to x0 / eps)."""
        if name == "eps":
            return Prediction(x, None, value, alpha, sigma)
        if name == "x0":
            return Prediction(x, value, None, alpha, sigma)
        if name == "v":
            return Prediction(x, *v_to_x0_eps(x, value, alpha, sigma), alpha, sigma)
        if name == "flow":
            return Prediction(x, *flow_to_x0_eps(x, value, alpha, sigma), alpha, sigma)
        raise ValueError(f"unknown target {name!r}; valid: {list(TARGETS)}")

    def target(self, name: str) -> Tensor:
        """The prediction in a training-target space (:data:`TARGETS`)."""
        if name == "eps":
            return self.eps
        if name == "x0":
            return self.x0
        if name == "v":
            return self.v
        if name == "flow":
            return self.flow
        raise ValueError(f"unknown target {name!r}; valid: {list(TARGETS)}")


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
