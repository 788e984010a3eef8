"""The schedule interface (:class:`NoiseSchedule`) and the registry that rebuilds a schedule
from its config (:func:`from_config`).

A schedule maps continuous time t in [0, 1] to (alpha(t), sigma(t)) through its log-SNR
lambda(t) = 2 log(alpha(t) / sigma(t)), strictly decreasing in t. Variance preserving (VP)
schedules have alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda); variance exploding
(VE / EDM) ones alpha = 1, sigma = exp(-lambda / 2).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

__all__ = ["NoiseSchedule", "SCHEDULE_TYPES", "register", "from_config"]


def _as_tensor(t: Tensor | float) -> tuple[Tensor, torch.dtype]:
    """t as a float64 tensor and the dtype results go back to (float64 for Python numbers)."""
    if isinstance(t, Tensor):
        dtype = t.dtype if t.is_floating_point() else torch.float64
        return t.to(torch.float64), dtype
    return torch.tensor(float(t), dtype=torch.float64), torch.float64


class NoiseSchedule(nn.Module):
    """Base class: a monotone map t -> (alpha(t), sigma(t)).

    A family implements :meth:`log_snr` and :meth:`config`; :meth:`t_from_log_snr` (bisection)
    and :meth:`d_log_snr_dt` (autograd through ``log_snr``) have generic defaults, so a learned
    schedule need only define ``log_snr``. Families with closed forms override them.

    Config round trip: ``config()`` is a JSON-safe dict whose ``"type"`` names the family
    (the class attribute ``type_name``); a family is registered with :func:`register`, and
    :func:`from_config` dispatches on ``"type"`` to the class's :meth:`from_config`, which by
    default calls the constructor with the remaining keys. A family whose constructor
    arguments differ from its config keys overrides the classmethod.

    Parameters: a schedule is an ``nn.Module`` so that a learned schedule can own parameters.
    Such a schedule saves them through ``state_dict()`` (and ``load_state_dict``) like any
    module, while its ``config()`` holds only what rebuilds the module's structure: a
    checkpoint stores both, rebuilds with ``from_config(cfg)`` and then loads the weights.
    Fixed schedules keep their tables as non-persistent buffers, so their ``state_dict()``
    is empty and the config alone rebuilds them.

    ``num_steps`` is T for a discrete DDPM chain (times (i + 1) / T are its steps) and None
    for a continuous-time schedule; code that needs DDPM indices asks it instead of checking
    the class.
    """

    type_name: ClassVar[str] = ""
    variance_preserving: bool = True
    sigma_min: float = 0.002

    # -- the interface ----------------------------------------------------------------
    def log_snr(self, t: Tensor | float) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr` by bisection (60 halvings: exact in float64)."""
        lam, dtype = _as_tensor(log_snr)
        lo = torch.zeros_like(lam)
        hi = torch.ones_like(lam)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid).to(torch.float64) > lam  # log_snr decreasing
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(dtype)

    def d_log_snr_dt(self, t: Tensor | float) -> Tensor:
        """d lambda / dt, elementwise, by autograd through :meth:`log_snr` (float64).

        Exact for any ``log_snr`` written in differentiable torch operations that acts
        elementwise on t (also under ``torch.no_grad`` / ``inference_mode``); families with a
        closed form override it.
        """
        t64, dtype = _as_tensor(t)
        with torch.inference_mode(False), torch.enable_grad():
            tt = t64.clone().requires_grad_(True)
            lam = self.log_snr(tt).to(torch.float64)
            (grad,) = torch.autograd.grad(lam.sum(), tt)
        return grad.to(dtype)

    def net_time(self, t: Tensor | float) -> Tensor:
        """The time input the network receives (default: t itself)."""
        t64, dtype = _as_tensor(t)
        return t64.to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return n64.to(dtype)

    @property
    def num_steps(self) -> int | None:
        """T for a discrete DDPM chain, None for a continuous-time schedule."""
        return None

    def config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Rebuild from :meth:`config`: the constructor called with every key but ``"type"``."""
        kwargs = {k: v for k, v in config.items() if k != "type"}
        params = inspect.signature(cls.__init__).parameters
        valid = [p for p in params if p != "self"]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"schedule type {cls.type_name!r}: unknown config key(s) {unknown}; "
                             f"valid: {valid}")
        return cls(**kwargs)

    # -- derived quantities (one formula each) ------------------------------------------
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) from log_snr: VP alpha^2 = sigmoid(lambda); VE alpha = 1."""
        t64, dtype = _as_tensor(t)
        lam = self.log_snr(t64).to(torch.float64)
        if self.variance_preserving:
            alpha = torch.sigmoid(lam).sqrt()
            sigma = torch.sigmoid(-lam).sqrt()
        else:
            alpha = torch.ones_like(lam)
            sigma = torch.exp(-0.5 * lam)
        return alpha.to(dtype), sigma.to(dtype)

    def alpha(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor | float) -> Tensor:
        return self.alpha_sigma(t)[1]

    def log_snr_from_sigma_ratio(self, sigma_ratio: Tensor | float) -> Tensor:
        """lambda = -2 log(sigma / alpha): the VE-equivalent noise level sigma~ = sigma/alpha."""
        s, dtype = _as_tensor(sigma_ratio)
        return (-2.0 * torch.log(s)).to(dtype)

    def t_from_sigma_ratio(self, sigma_ratio: Tensor | float) -> Tensor:
        return self.t_from_log_snr(self.log_snr_from_sigma_ratio(sigma_ratio))

    def prior_std(self, t: float = 1.0) -> float:
        """Standard deviation of x_t for unit-variance data: sqrt(alpha(t)^2 + sigma(t)^2).

        At t = 1: 1 for VP schedules, ~sigma_max for VE/EDM. ``difflab.sample`` multiplies
        standard normal noise by it at the grid's first time.
        """
        a, s = self.alpha_sigma(float(t))
        return float(torch.sqrt(a * a + s * s))

    def sigma_max_ratio(self) -> float:
        """sigma(1) / alpha(1) (inf for a zero-terminal-SNR schedule)."""
        return math.exp(-0.5 * float(self.log_snr(1.0)))

    def check_monotone(self, n: int = 4097) -> None:
        """Raise ValueError unless log_snr is strictly decreasing on a fine grid."""
        t = torch.linspace(0, 1, n, dtype=torch.float64)
        lam = self.log_snr(t)
        if not bool((lam[1:] < lam[:-1]).all()):
            bad = int((lam[1:] >= lam[:-1]).nonzero()[0])
            raise ValueError(
                f"{type(self).__name__}: log_snr must be strictly decreasing in t, but "
                f"log_snr({float(t[bad]):.6f}) = {float(lam[bad]):.6g} <= "
                f"log_snr({float(t[bad + 1]):.6f}) = {float(lam[bad + 1]):.6g}. "
                "For a beta array: every beta must lie in (0, 1)."
            )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items()
                         if k not in ("type", "betas"))


# ------------------------------------------------------------------------------------------
# Registry: "type" -> family
# ------------------------------------------------------------------------------------------

SCHEDULE_TYPES: dict[str, type[NoiseSchedule]] = {}
"""Every registered family by its config ``"type"``."""

S = TypeVar("S", bound=type[NoiseSchedule])


class ScaledTime:
    """Mixin for continuous-time schedules whose network receives ``time_scale * t`` (the
    convention of continuous-time checkpoints trained on 1000-step indices)."""

    time_scale: float

    def net_time(self, t: Tensor | float) -> Tensor:
        t64, dtype = _as_tensor(t)
        return (t64 * self.time_scale).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        n64, dtype = _as_tensor(net_t)
        return (n64 / self.time_scale).to(dtype)


def register(cls: S) -> S:
    """Class decorator: make ``from_config`` rebuild ``cls`` from ``{"type": cls.type_name}``."""
    name = cls.type_name
    if not name:
        raise ValueError(f"{cls.__name__} needs a type_name to be registered")
    if SCHEDULE_TYPES.get(name, cls) is not cls:
        raise ValueError(f"schedule type {name!r} is already registered by "
                         f"{SCHEDULE_TYPES[name].__name__}")
    SCHEDULE_TYPES[name] = cls
    return cls


def from_config(config: dict[str, Any]) -> NoiseSchedule:
    """Rebuild a schedule from :meth:`NoiseSchedule.config` (a JSON-safe dict with "type")."""
    kind = config.get("type")
    if kind not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {kind!r}; valid: {sorted(SCHEDULE_TYPES)}")
    return SCHEDULE_TYPES[kind].from_config(config)
