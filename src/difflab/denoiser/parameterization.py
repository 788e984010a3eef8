"""Parameterisations: what a network's raw output means, chosen once per model.

EDM's way (Karras et al. 2022, Table 1): preconditioning is kept apart from the architecture. A
parameterisation turns the sample and its noise level into the network's inputs and the
network's output F into a :class:`~difflab.denoiser.prediction.Prediction`:

    network inputs    x_in = c_in x_t,   time_in = c_noise(t)
    prediction        from F (and x_t, alpha, sigma)

Built here, each one object with a ``name``, its native training ``target`` (the space its loss
is measured in) and a JSON ``config``:

    eps    F = eps_hat                   x0 = (x_t - sigma F) / alpha          (Ho et al. 2020)
    x0     F = x0_hat                                                          (Ramesh et al.)
    v      F = alpha eps - sigma x0      x0 = (alpha x_t - sigma F) / (alpha^2 + sigma^2)
                                                                       (Salimans & Ho 2022)
    score  F = grad log p_t = -eps/sigma eps = -sigma F                  (Song et al. 2021)
    edm    in x~ = x_t / alpha, sigma~ = sigma / alpha (Karras et al. 2022, Table 1):
           D(x~; sigma~) = c_skip x~ + c_out F(c_in x~, c_noise),
           c_skip = sd^2 / (sigma~^2 + sd^2), c_out = sigma~ sd / sqrt(sigma~^2 + sd^2),
           c_in = 1 / sqrt(sigma~^2 + sd^2),  c_noise = log(sigma~) / 4

The first four feed x_t and the schedule's network time unchanged (c_in = 1, c_noise =
``schedule.net_time(t)``). A new one (a consistency boundary, a flow-matching velocity) is one
more class registered in :data:`PARAMETERIZATIONS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from difflab.denoiser.prediction import Prediction, v_to_x0_eps
from difflab.schedules import edm_c_noise

__all__ = ["Parameterization", "EpsPrediction", "X0Prediction", "VPrediction", "ScorePrediction",
           "EDM", "PARAMETERIZATIONS", "get", "from_config"]


class Parameterization:
    """Base class; see the module docstring."""

    name: ClassVar[str]
    #: the native training target: the space F lives in ('eps', 'x0' or 'v')
    target: ClassVar[str]

    def net_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor,
                   net_t: Tensor | None) -> tuple[Tensor, Tensor]:
        """(x_in, time_in) for the network; ``net_t`` is ``schedule.net_time(t)``."""
        return x, net_t

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        raise NotImplementedError  # pragma: no cover

    def uses_net_time(self) -> bool:
        """Whether :meth:`net_inputs` reads ``schedule.net_time(t)`` (else it makes its own)."""
        return True

    def config(self) -> dict[str, Any]:
        return {"type": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


class EpsPrediction(Parameterization):
    name, target = "eps", "eps"

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        return Prediction(x, None, out, alpha, sigma)


class X0Prediction(Parameterization):
    name, target = "x0", "x0"

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        return Prediction(x, out, None, alpha, sigma)


class VPrediction(Parameterization):
    name, target = "v", "v"

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        x0, eps = v_to_x0_eps(x, out, alpha, sigma)
        return Prediction(x, x0, eps, alpha, sigma)


class ScorePrediction(Parameterization):
    """F = grad_x log p_t(x_t) = -eps / sigma; trained in eps-space (DSM with lambda = sigma^2)."""

    name, target = "score", "eps"

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        return Prediction(x, None, -sigma * out, alpha, sigma)


class EDM(Parameterization):
    """Karras et al. 2022 preconditioning (module docstring) with data std ``sigma_data``;
    trained in x0-space."""

    name, target = "edm", "x0"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")

    def coefficients(self, sigma_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) at the VE noise level sigma~."""
        sd = self.sigma_data
        denom = (sigma_tilde * sigma_tilde + sd * sd).sqrt()
        return sd * sd / denom**2, sigma_tilde * sd / denom, 1 / denom

    def uses_net_time(self) -> bool:
        return False

    def net_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor,
                   net_t: Tensor | None) -> tuple[Tensor, Tensor]:
        s_tilde = sigma / alpha
        _, _, c_in = self.coefficients(s_tilde)
        c_noise = edm_c_noise(s_tilde.flatten()).expand(x.shape[0])
        return c_in * (x / alpha), c_noise

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        c_skip, c_out, _ = self.coefficients(sigma / alpha)
        x0 = c_skip * (x / alpha) + c_out * out
        return Prediction(x, x0, None, alpha, sigma)

    def config(self) -> dict[str, Any]:
        return {"type": self.name, "sigma_data": self.sigma_data}


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction, ScorePrediction, EDM)}


def get(spec: str | Parameterization, **kw: Any) -> Parameterization:
    """A parameterisation from a name (with its arguments, e.g. ``sigma_data`` for edm) or the
    object itself."""
    if isinstance(spec, Parameterization):
        return spec
    if spec not in PARAMETERIZATIONS:
        raise ValueError(f"unknown prediction type {spec!r}; valid: {list(PARAMETERIZATIONS)}")
    cls = PARAMETERIZATIONS[spec]
    return cls(**kw) if cls is EDM else cls()


def from_config(config: dict[str, Any]) -> Parameterization:
    """Inverse of :meth:`Parameterization.config`."""
    cfg = dict(config)
    return get(cfg.pop("type"), **cfg)
