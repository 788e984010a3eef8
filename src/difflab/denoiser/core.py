"""Denoisers: network + parameterisation + schedule -> an estimate of x_0.

A denoiser answers one question from one network call: given x_t at time t (and a condition),
what are x0_hat, eps_hat and the score? Samplers and guidance only ever talk to this
interface (``predict`` / ``__call__``) and to ``denoiser.schedule``. What the network's output
means is the :mod:`~difflab.denoiser.parameterization` (chosen once); the condition reaches the
network as keyword arguments (:class:`~difflab.denoiser.condition.Condition`); the
conversions between x0, eps, v and the score are in :mod:`~difflab.denoiser.prediction`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser.condition import Condition
from difflab.denoiser.parameterization import (
    PARAMETERIZATIONS,
    EpsPrediction,
    Parameterization,
    get,
)
from difflab.denoiser.prediction import Prediction, TimePoint, broadcast_time
from difflab.denoiser.split import call_net
from difflab.schedules import NoiseSchedule

__all__ = ["PREDICTIONS", "BaseDenoiser", "Denoiser"]

PREDICTIONS = tuple(PARAMETERIZATIONS)


class BaseDenoiser(nn.Module):
    """The denoiser interface: ``predict(x, t, cond) -> Prediction``; calling it returns x0_hat.

    Guidance transforms (:mod:`difflab.guidance`) are BaseDenoisers wrapping another one.
    """

    schedule: NoiseSchedule
    #: what the innermost network's output means; wrappers (guidance transforms, decoupled
    #: evaluation times) take their inner denoiser's, so its native target is read in one step
    parameterization: Parameterization = EpsPrediction()

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
        net: ``net(x, time_in, **cond.kwargs())``; returns the quantity the parameterisation
            names. ``time_in`` is ``schedule.net_time(t)`` (for discrete schedules the
            fractional DDPM index) or, with EDM preconditioning, c_noise = log(sigma~) / 4.
        schedule: the model's :class:`~difflab.schedules.NoiseSchedule`.
        prediction: a :class:`~difflab.denoiser.parameterization.Parameterization` or its name
            (``eps``, ``x0``, ``v``, ``score``, ``edm``).
        sigma_data: sd of EDM preconditioning when ``prediction="edm"`` is given by name.
        learned_variance: the network outputs 2C channels: the parameterisation's C and C
            more, r, whose (r + 1) / 2 is the learned-variance interpolation v of Nichol &
            Dhariwal 2021 (Eq. 15; improved-diffusion's ``frac``), returned as
            ``Prediction.variance_v`` (the ``ddpm`` sampler's ``variance="learned"``).
    """

    def __init__(self, net: nn.Module | Callable, schedule: NoiseSchedule,
                 prediction: str | Parameterization = "eps", sigma_data: float = 0.5,
                 learned_variance: bool = False):
        super().__init__()
        self.learned_variance = bool(learned_variance)
        self.parameterization = get(prediction, sigma_data=sigma_data)
        with torch.no_grad():  # a number, also for a schedule with parameters (learned)
            terminal_alpha = float(schedule.alpha(1.0))
        if self.parameterization.target == "eps" and terminal_alpha == 0.0:
            raise ValueError(
                f"prediction={self.prediction!r} cannot recover x0 where alpha = 0 (this schedule "
                "has zero terminal SNR: x0 = (x - sigma eps) / alpha divides by zero at t = 1). "
                "Use prediction='v' or 'x0' with a zero-terminal-SNR schedule."
            )
        self.net = net
        self.schedule = schedule
        self._net_time = self.parameterization.uses_net_time()

    @property
    def prediction(self) -> str:
        """The parameterisation's name (eps, x0, v, score, edm)."""
        return self.parameterization.name

    @property
    def sigma_data(self) -> float:
        """EDM's sigma_data (0.5 for the other parameterisations, where it is unused)."""
        return getattr(self.parameterization, "sigma_data", 0.5)

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        tb, alpha, sigma = self.coefficients(x, t)
        net_t = None
        if self._net_time:
            net_t = self.schedule.net_time(tb).to(
                x.dtype if x.is_floating_point() else torch.float32)
        return self._predict(x, alpha, sigma, net_t, cond)

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        """:meth:`predict` with the schedule lookups of ``point`` done beforehand."""
        net_t = None
        if self._net_time:
            net_t = point.net_t
            if net_t.shape[0] != x.shape[0]:  # a point built for another batch size
                net_t = net_t[:1].expand(x.shape[0])
        return self._predict(x, point.alpha, point.sigma, net_t, cond)

    def _predict(self, x: Tensor, alpha: Tensor, sigma: Tensor, net_t: Tensor | None,
                 cond: Any) -> Prediction:
        p = self.parameterization
        x_in, time_in = p.net_inputs(x, alpha, sigma, net_t)
        kwargs = {} if cond is None else Condition.of(cond).kwargs()
        out = call_net(self.net, x_in, time_in, **kwargs)  # split over threads where asked
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if not self.learned_variance:
            return p.prediction(out, x, alpha, sigma)
        if out.shape[1] != 2 * x.shape[1]:
            raise ValueError(f"learned_variance=True needs a network with 2 * {x.shape[1]} "
                             f"output channels (the prediction and v), got {out.shape[1]}")
        out, r = out.chunk(2, dim=1)
        pred = p.prediction(out, x, alpha, sigma)
        pred.variance_v = (r + 1) / 2
        return pred
