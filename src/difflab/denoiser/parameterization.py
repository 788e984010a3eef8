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
    flow   F = u = eps - x0              x0 = (x_t - sigma F) / (alpha + sigma)
                                                    (Lipman et al. 2023; Liu et al. 2023)
    edm    in x~ = x_t / alpha, sigma~ = sigma / alpha (Karras et al. 2022, Table 1):
           D(x~; sigma~) = c_skip x~ + c_out F(c_in x~, c_noise),
           c_skip = sd^2 / (sigma~^2 + sd^2), c_out = sigma~ sd / sqrt(sigma~^2 + sd^2),
           c_in = 1 / sqrt(sigma~^2 + sd^2),  c_noise = log(sigma~) / 4
    consistency  as edm with c_skip = sd^2 / ((sigma~ - sigma_min)^2 + sd^2), c_out = sd (sigma~
           - sigma_min) / sqrt(sigma~^2 + sd^2): f(x~, sigma_min) = x~    (Song et al. 2023)

The first four feed x_t and the schedule's network time unchanged (c_in = 1, c_noise =
``schedule.net_time(t)``). A new one (a consistency boundary, a flow-matching velocity) is one
more class registered in :data:`PARAMETERIZATIONS`.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor

from difflab.denoiser.prediction import Prediction
from difflab.schedules import edm_c_noise

__all__ = ["Parameterization", "EpsPrediction", "X0Prediction", "VPrediction", "ScorePrediction",
           "EDM", "PARAMETERIZATIONS", "get", "from_config", "FlowPrediction",
           "Consistency"]


class Parameterization:
    """Base class; see the module docstring."""

    name: ClassVar[str]
    #: the native training target: the space F lives in ('eps', 'x0', 'v' or 'flow')
    target: ClassVar[str]
    #: the sampler ``difflab.sample`` runs when none is named and no fit is given (None: the
    #: library default)
    default_sampler: ClassVar[str | None] = None

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
        return Prediction.from_target("v", out, x, alpha, sigma)


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

    def noise_level(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """The VE noise level sigma~ = sigma / alpha the network is conditioned on."""
        return sigma / alpha

    def net_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor,
                   net_t: Tensor | None) -> tuple[Tensor, Tensor]:
        s_tilde = self.noise_level(alpha, sigma)
        _, _, c_in = self.coefficients(s_tilde)
        c_noise = edm_c_noise(s_tilde.flatten()).expand(x.shape[0])
        return c_in * (x / alpha), c_noise

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        c_skip, c_out, _ = self.coefficients(sigma / alpha)
        x0 = c_skip * (x / alpha) + c_out * out
        return Prediction(x, x0, None, alpha, sigma)

    def config(self) -> dict[str, Any]:
        return {"type": self.name, "sigma_data": self.sigma_data}


class FlowPrediction(Parameterization):
    """Flow-matching velocity (Lipman et al. 2023, "Flow Matching for Generative Modeling";
    Liu et al. 2023, rectified flow; Esser et al. 2024, SD3): the network predicts

        F = u = eps - x0,

    which on the rectified-flow schedule (alpha = 1 - t, sigma = t) is the velocity dx_t/dt of
    the straight path, and on a shifted one (:class:`~difflab.schedules.RectifiedFlowSchedule`)
    dx/dsigma. Not Salimans' v = alpha eps - sigma x0. With x_t = alpha x0 + sigma eps, for any
    schedule with alpha + sigma > 0:

        x0  = (x_t - sigma u) / (alpha + sigma),      eps = (x_t + alpha u) / (alpha + sigma)

    (rectified flow: x0 = x_t - t u, eps = x_t + (1 - t) u), finite at alpha = 0 (t = 1) and
    at sigma = 0. Native training target ``"flow"``: ||u_hat - (eps - x0)||^2 =
    ((alpha + sigma) / sigma)^2 ||x0_hat - x0||^2, the conditional flow-matching loss.
    """

    name, target = "flow", "flow"

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        return Prediction.from_target("flow", out, x, alpha, sigma)


class Consistency(EDM):
    """Consistency models (Song et al. 2023, "Consistency Models", Appendix C; EDM's form with
    other coefficients, so a subclass of :class:`EDM`): the
    network output F becomes the consistency function, in x~ = x_t / alpha and sigma~ = sigma /
    alpha (as :class:`EDM`, so VP and VE schedules alike),

        f(x~, sigma~) = c_skip(sigma~) x~ + c_out(sigma~) F(c_in x~, c_noise),
        c_skip = sd^2 / ((sigma~ - sigma_min)^2 + sd^2),
        c_out  = sd (sigma~ - sigma_min) / sqrt(sigma~^2 + sd^2),
        c_in   = 1 / sqrt(sigma~^2 + sd^2),      c_noise = log(sigma~) / 4,

    so that the boundary condition f(x~, sigma_min) = x~ holds by construction. It holds
    *exactly* in floating point: sigma~ <= sigma_min (1 + rtol) counts as sigma_min, so c_skip
    = 1 and c_out = 0, with rtol = max(:attr:`BOUNDARY_RTOL`, 8 eps of the dtype): sigma~ =
    sigma / alpha made from t = ``schedule.t_from_sigma_ratio(sigma_min)`` is sigma_min only up
    to the schedule's round trip (~1e-9 relative on a discrete DDPM chain, where sigma =
    sqrt(1 - alpha^2) cancels) and the cast to the sample's dtype. Below
    sigma_min, sigma~ is clamped to sigma_min (f is the identity there, and t = 0 stays
    finite). A consistency model is a Denoiser with this parameterisation: its
    ``predict(x, t).x0`` is f. Native target x0 (trained as a denoiser, it fits E[x0 | x_t]).

    ``inner`` (a parameterisation name or config, e.g. a teacher's "v"): F is read through that
    parameterisation instead (its network inputs, its x0 estimate x0_F), and

        f = c_skip x~ + (1 - c_skip) x0_F

    with c_skip as above (LCM's form, Luo et al. 2023, c_out = 1 - c_skip): a network trained
    as a diffusion model keeps its input conventions, so a student initialised from the
    teacher's weights starts as the teacher's denoiser away from sigma_min (distillation and
    easy consistency tuning use it with a small ``sigma_data``, LCM's timestep scaling).
    """

    name, target = "consistency", "x0"
    default_sampler = "consistency"
    #: sigma~ <= sigma_min (1 + rtol) is the boundary, rtol = max(this, 8 eps of the dtype)
    BOUNDARY_RTOL = 1e-6

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 inner: str | dict[str, Any] | None = None):
        super().__init__(sigma_data)
        self.sigma_min = float(sigma_min)
        if not self.sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        self.inner = None if inner is None else (
            from_config(inner) if isinstance(inner, dict) else get(inner))
        if isinstance(self.inner, Consistency):
            raise ValueError("inner must be a diffusion parameterisation, not consistency")

    def uses_net_time(self) -> bool:
        return False if self.inner is None else self.inner.uses_net_time()

    def net_inputs(self, x: Tensor, alpha: Tensor, sigma: Tensor,
                   net_t: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.inner is None:
            return super().net_inputs(x, alpha, sigma, net_t)
        return self.inner.net_inputs(x, alpha, sigma, net_t)

    def prediction(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> Prediction:
        if self.inner is None:
            return super().prediction(out, x, alpha, sigma)
        c_skip, _, _ = self.coefficients(sigma / alpha)
        x0_inner = self.inner.prediction(out, x, alpha, sigma).x0
        return Prediction(x, c_skip * (x / alpha) + (1 - c_skip) * x0_inner, None, alpha, sigma)

    def coefficients(self, sigma_tilde: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) at the VE noise level sigma~ (clamped to >= sigma_min)."""
        sd, s_min = self.sigma_data, self.sigma_min
        s = sigma_tilde.clamp(min=s_min)
        delta = s - s_min
        tol = max(self.BOUNDARY_RTOL, 8 * torch.finfo(s.dtype).eps) * s_min
        delta = torch.where(delta <= tol, torch.zeros_like(delta), delta)
        denom = (s * s + sd * sd).sqrt()
        return sd * sd / (delta * delta + sd * sd), sd * delta / denom, 1 / denom

    def noise_level(self, alpha: Tensor, sigma: Tensor) -> Tensor:
        """sigma~ = sigma / alpha, clamped to >= sigma_min (below it f is the identity)."""
        return (sigma / alpha).clamp(min=self.sigma_min)

    def config(self) -> dict[str, Any]:
        cfg = {"type": self.name, "sigma_data": self.sigma_data, "sigma_min": self.sigma_min}
        if self.inner is not None:
            cfg["inner"] = self.inner.config()
        return cfg


PARAMETERIZATIONS: dict[str, type[Parameterization]] = {
    cls.name: cls for cls in (EpsPrediction, X0Prediction, VPrediction, ScorePrediction, EDM,
                              FlowPrediction, Consistency)}


def _arguments(cls: type[Parameterization]) -> list[str]:
    return [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args",
                                                                               "kwargs")]


def get(spec: str | Parameterization, **kw: Any) -> Parameterization:
    """A parameterisation from a name or the object itself. ``kw`` are arguments some
    parameterisations take (``sigma_data`` for edm and consistency); those a parameterisation
    does not take are ignored, so a caller can always pass its ``sigma_data``."""
    if isinstance(spec, Parameterization):
        return spec
    if spec not in PARAMETERIZATIONS:
        raise ValueError(f"unknown prediction type {spec!r}; valid: {list(PARAMETERIZATIONS)}")
    cls = PARAMETERIZATIONS[spec]
    args = _arguments(cls)
    return cls(**{k: v for k, v in kw.items() if k in args})


def from_config(config: dict[str, Any]) -> Parameterization:
    """Inverse of :meth:`Parameterization.config` (unknown keys are an error)."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown prediction type {kind!r}; valid: {list(PARAMETERIZATIONS)}")
    unknown = sorted(set(cfg) - set(_arguments(PARAMETERIZATIONS[kind])))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for prediction type {kind!r}; valid: "
                         f"{_arguments(PARAMETERIZATIONS[kind])}")
    return PARAMETERIZATIONS[kind](**cfg)
