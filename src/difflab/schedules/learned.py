"""The learned noise schedule of Variational Diffusion Models (Kingma et al. 2021, "Variational
Diffusion Models", Sec. 3.4 and Appendix A.1 / the ``NoiseSchedule_NNet`` of their code).

VDM parameterises the noise level by gamma(t) = -log_snr(t) = log(sigma^2 / alpha^2), a strictly
increasing function of t in [0, 1], with the variance-preserving

    alpha^2(t) = sigmoid(-gamma(t)),     sigma^2(t) = sigmoid(gamma(t)).

gamma is a monotone network g between two learnable endpoints gamma_0 < gamma_1, *normalised*
so that the endpoints are exact:

    gamma(t) = gamma_0 + (gamma_1 - gamma_0) * (g(t) - g(0)) / (g(1) - g(0)),
    g(t)     = t + (1 / H) sum_j |w3_j| phi(|w2_j| (2 t - 1) + b2_j),  phi(z) = 2 sigmoid(z) - 1,

(VDM's network: a positive-weight linear layer l1(t) plus a positive-weight sigmoid layer of
H = 1024 units read out by a positive-weight layer l3 / H; its weights are kept positive by
``abs``, as here). VDM uses gamma(t) = g(t) unnormalised, so its gamma(0), gamma(1) drift away
from gamma_min, gamma_max during training (google-research/vdm issue 11); normalising makes
gamma_0 and gamma_1 the exact endpoints, so they can be trained on the full bound and the
interior on the variance of its estimate, as VDM intends. The linear part of g has slope 1
(l1's scale and bias cancel in the normalisation), so g'(t) >= 1 and gamma is strictly
increasing for any weights. The endpoints are kept ordered by construction:
gamma_1 = gamma_0 + exp(``log_gamma_span``).

Unlike the fixed schedules, t = 0 is *not* clean data here: sigma(0)^2 = sigmoid(gamma_0)
(e.g. 1.7e-6 for VDM's gamma_0 = -13.3); a sampler's grid ends at t = 0 and returns
z_0 = alpha_0 x + sigma_0 eps, the variable VDM decodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from difflab.schedules.base import NoiseSchedule, ScaledTime, _as_tensor, register

__all__ = ["LearnedSchedule", "learned", "TIME_INPUTS"]

TIME_INPUTS = ("t", "gamma")  # the network's time input (LearnedSchedule, time_input)


@register
class LearnedSchedule(ScaledTime, NoiseSchedule):
    """VDM's learned schedule gamma(t) = -log_snr(t) (see the module docstring).

    Args:
        gamma_0, gamma_1: the initial endpoints gamma(0) < gamma(1) (VDM: -13.3 and 5.0).
        hidden: H, the width of the monotone network's sigmoid layer (VDM: 1024).
        init_std: standard deviation of the initial raw weights w2, w3 (VDM: 0.01, so the
            schedule starts almost linear in gamma); b2 starts at 0.
        seed: seed of the initial weights, so that ``from_config(config())`` rebuilds the
            same untrained schedule; a trained one is restored by ``load_state_dict``.
        time_scale: the network's time input is ``time_scale * t`` (or ``time_scale *`` the
            normalised gamma, below).
        time_input: what the network is told: ``"t"`` (the time itself), or ``"gamma"``:
            the noise level (gamma(t) - gamma_0') / (gamma_1' - gamma_0') with the *initial*
            endpoints gamma_0', gamma_1' as fixed constants, as VDM's score network receives
            it (their ``ScoreUNet``: ``t = (g_t - gamma_min) / (gamma_max - gamma_min)``).
            With "t", every update of the schedule changes the noise level the network sees
            at a given input, so a network trained while the schedule moved is fitted to
            earlier schedules at each t; with "gamma" a given input always means the same
            noise level. Measured on Fashion-MNIST (2400 steps, docs/results/likelihood.md,
            session 13): the same VLB (3.146 bits/dim) and ODE figures with either input, so
            "t" stays the default.

    Parameters (``state_dict``): ``gamma_0``, ``log_gamma_span`` (gamma_1 = gamma_0 +
    exp(log_gamma_span)), ``w2``, ``b2``, ``w3`` (float64). ``config()`` holds the constructor
    arguments, i.e. the *initial* endpoints; the trained values live in the state dict.
    Every quantity is differentiable in the parameters (``alpha_sigma``, ``gamma``,
    ``d_gamma_dt``), so the schedule trains with the same optimizer as the network.
    """

    type_name = "learned"

    def __init__(self, gamma_0: float = -13.3, gamma_1: float = 5.0, hidden: int = 1024,
                 init_std: float = 0.01, seed: int = 0, time_scale: float = 1000.0,
                 time_input: str = "t"):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {time_input!r}")
        gamma_0, gamma_1, init_std = float(gamma_0), float(gamma_1), float(init_std)
        if not (math.isfinite(gamma_0) and math.isfinite(gamma_1) and gamma_0 < gamma_1):
            raise ValueError(f"need finite gamma_0 < gamma_1, got gamma_0={gamma_0}, "
                             f"gamma_1={gamma_1}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        if not init_std >= 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        if not float(time_scale) > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self._init = {"gamma_0": gamma_0, "gamma_1": gamma_1, "hidden": hidden,
                      "init_std": init_std, "seed": int(seed)}
        self.time_scale = float(time_scale)
        self.time_input = time_input
        f64 = torch.float64
        g = torch.Generator().manual_seed(int(seed))
        self.gamma_0 = nn.Parameter(torch.tensor(gamma_0, dtype=f64))
        self.log_gamma_span = nn.Parameter(torch.tensor(math.log(gamma_1 - gamma_0), dtype=f64))
        self.w2 = nn.Parameter(init_std * torch.randn(hidden, generator=g, dtype=f64))
        self.b2 = nn.Parameter(torch.zeros(hidden, dtype=f64))
        self.w3 = nn.Parameter(init_std * torch.randn(hidden, generator=g, dtype=f64))

    # -- the network ------------------------------------------------------------------------
    def _params(self, device: torch.device) -> tuple[Tensor, ...]:
        """The parameters in float64 on ``device`` (differentiably)."""
        return tuple(p.to(device=device, dtype=torch.float64) for p in
                     (self.gamma_0, self.log_gamma_span, self.w2, self.b2, self.w3))

    @property
    def gamma_1(self) -> Tensor:
        """gamma(1) = gamma_0 + exp(log_gamma_span) (a 0-d tensor, differentiable)."""
        return self.gamma_0 + torch.exp(self.log_gamma_span)

    @staticmethod
    def _g(t: Tensor, w2: Tensor, b2: Tensor, w3: Tensor) -> tuple[Tensor, Tensor]:
        """g(t) and g'(t) for a flat float64 t: g = t + mean_j |w3_j| phi(z_j), z_j = |w2_j|
        (2 t - 1) + b2_j, phi = 2 sigmoid - 1; g' = 1 + mean_j |w3_j| 2 s_j (1 - s_j) 2 |w2_j|."""
        a2, a3 = w2.abs(), w3.abs()
        H = a2.shape[0]
        s = torch.sigmoid((2 * t - 1)[:, None] * a2 + b2)
        g = t + (2 * s - 1) @ a3 / H
        dg = 1 + (4 * s * (1 - s)) @ (a3 * a2) / H
        return g, dg

    def gamma_and_rate(self, t: Tensor | float, interior: Callable[[Tensor], Tensor] | None = None
                       ) -> tuple[Tensor, Tensor]:
        """(gamma(t), gamma'(t)) in float64, differentiable in the parameters.

        ``interior`` (optional) is applied to the two quantities that carry the interior
        weights w2, b2, w3 alone: u(t) = (g(t) - g(0)) / (g(1) - g(0)) and g'(t) / (g(1) -
        g(0)) (gamma = gamma_0 + span u, gamma' = span g' / (g(1) - g(0))). The VLB objective
        passes a gradient hook there, so that the interior is trained on another loss than the
        endpoints (VDM's variance minimisation, :mod:`difflab.objectives.vlb`).
        """
        t64, _ = _as_tensor(t)
        return self._gamma_and_rate(t64, interior)

    def _gamma_and_rate(self, t64: Tensor, interior: Callable[[Tensor], Tensor] | None = None
                        ) -> tuple[Tensor, Tensor]:
        """(gamma(t), d gamma / dt) for a float64 tensor t of any shape."""
        gamma_0, log_span, w2, b2, w3 = self._params(t64.device)
        flat = t64.reshape(-1)
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64, device=t64.device)
        g, dg = self._g(torch.cat([flat, ends]), w2, b2, w3)  # one pass: same arithmetic
        g_t, g0, g1 = g[:-2], g[-2], g[-1]
        u = (g_t - g0) / (g1 - g0)
        # u is exact at t = 0 and t = 1 already (x / x = 1); the detached correction guards it
        # against any reduction-order difference without changing a gradient
        target = torch.where(flat == 0, 0.0, torch.where(flat == 1, 1.0, u.detach()))
        u = u + (target - u.detach())
        du = dg[:-2] / (g1 - g0)
        if interior is not None:
            u, du = interior(u), interior(du)
        span = torch.exp(log_span)
        gamma = torch.lerp(gamma_0, gamma_0 + span, u)  # exact at u = 0 and u = 1
        rate = span * du
        return gamma.reshape(t64.shape), rate.reshape(t64.shape)

    def gamma(self, t: Tensor | float) -> Tensor:
        """gamma(t) = -log_snr(t) (module docstring); exactly gamma_0 at t = 0, gamma_1 at 1."""
        t64, dtype = _as_tensor(t)
        return self._gamma_and_rate(t64)[0].to(dtype)

    def d_gamma_dt(self, t: Tensor | float) -> Tensor:
        """gamma'(t) = (gamma_1 - gamma_0) g'(t) / (g(1) - g(0)) > 0, in closed form and
        differentiable in the parameters (VDM's continuous loss weights by it)."""
        t64, dtype = _as_tensor(t)
        return self._gamma_and_rate(t64)[1].to(dtype)

    # -- the schedule interface -------------------------------------------------------------
    def log_snr(self, t: Tensor | float) -> Tensor:
        """lambda(t) = -gamma(t)."""
        t64, dtype = _as_tensor(t)
        return (-self._gamma_and_rate(t64)[0]).to(dtype)

    def d_log_snr_dt(self, t: Tensor | float) -> Tensor:
        """d lambda / dt = -gamma'(t) (closed form; see :meth:`d_gamma_dt`)."""
        t64, dtype = _as_tensor(t)
        return (-self._gamma_and_rate(t64)[1]).to(dtype)

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """The inverse of :meth:`log_snr`: the root of gamma(t) = -lambda on [0, 1] by Newton's
        method safeguarded by bisection (a Newton step leaving the bracket is replaced by its
        midpoint), to the float64 resolution of t; 0 for lambda >= lambda(0), 1 for
        lambda <= lambda(1)."""
        lam, dtype = _as_tensor(log_snr)
        with torch.no_grad():
            target = -lam.detach()
            ends = self._gamma_and_rate(torch.tensor([0.0, 1.0], dtype=torch.float64,
                                                     device=target.device))[0]
            lo, hi = torch.zeros_like(target), torch.ones_like(target)
            # start from the linear interpolation of the endpoints
            t = ((target - ends[0]) / (ends[1] - ends[0])).clamp(0, 1).nan_to_num(0.5)
            for _ in range(100):
                gamma, rate = self._gamma_and_rate(t)
                above = gamma > target
                hi = torch.where(above, t, hi)
                lo = torch.where(above, lo, t)
                t_new = t - (gamma - target) / rate
                inside = (t_new >= lo) & (t_new <= hi)
                t_new = torch.where(inside, t_new, 0.5 * (lo + hi))
                step = (t_new - t).abs()
                t = t_new
                if not t.is_meta and bool((step <= 1e-15).all()):  # ~7 iterations
                    break
            t = torch.where(target <= ends[0], 0.0, torch.where(target >= ends[1], 1.0, t))
            t = torch.where(torch.isnan(target), target, t)
        return t.to(dtype)

    def prior_std(self, t: float = 1.0) -> float:
        """sqrt(alpha^2 + sigma^2) at ``t`` (1: variance preserving), as a plain number."""
        with torch.no_grad():
            return super().prior_std(t)

    def sigma_max_ratio(self) -> float:
        """sigma(1) / alpha(1) = exp(gamma_1 / 2), as a plain number."""
        with torch.no_grad():
            return math.exp(0.5 * float(self.gamma_1))

    @property
    def sigma_min(self) -> float:  # type: ignore[override]
        """Where default grids put their last point before t = 0: sigma~ = 2 sigma~(0) =
        2 exp(gamma_0 / 2), so the grid's last step (to t = 0, sigma~(0) > 0) halves sigma~
        (h = ln 2); if gamma_1 - gamma_0 < 4 ln 2, the middle of the log-SNR range instead."""
        gamma_0 = float(self.gamma_0.detach())
        span = math.exp(float(self.log_gamma_span.detach()))
        return math.exp(0.5 * (gamma_0 + min(2 * math.log(2), 0.5 * span)))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (the *initial* endpoints); weights: ``state_dict()``."""
        cfg = {"type": self.type_name, **self._init, "time_scale": self.time_scale}
        if self.time_input != "t":  # configs written before the option read as "t"
            cfg["time_input"] = self.time_input
        return cfg

    # -- the network's time input -------------------------------------------------------------
    def net_time(self, t: Tensor | float) -> Tensor:
        """``time_scale * t``, or with ``time_input="gamma"`` ``time_scale * (gamma(t) -
        gamma_0') / (gamma_1' - gamma_0')`` (the initial endpoints; class docstring). A
        conditioning signal: no gradient flows through it into the schedule, whose endpoints
        and interior train through alpha, sigma and gamma' alone (objectives.vlb)."""
        if self.time_input == "t":
            return super().net_time(t)
        t64, dtype = _as_tensor(t)
        g0, g1 = self._init["gamma_0"], self._init["gamma_1"]
        with torch.no_grad():
            gamma = self._gamma_and_rate(t64.detach())[0]
        return (self.time_scale * (gamma - g0) / (g1 - g0)).to(dtype)

    def t_from_net_time(self, net_t: Tensor | float) -> Tensor:
        if self.time_input == "t":
            return super().t_from_net_time(net_t)
        n64, dtype = _as_tensor(net_t)
        g0, g1 = self._init["gamma_0"], self._init["gamma_1"]
        gamma = g0 + (g1 - g0) * n64 / self.time_scale
        return self.t_from_log_snr(-gamma).to(dtype)

    def extra_repr(self) -> str:
        gamma_0, gamma_1 = float(self.gamma_0.detach()), float(self.gamma_1.detach())
        return (f"gamma_0={gamma_0:.4g}, gamma_1={gamma_1:.4g}, "
                f"hidden={self._init['hidden']}")


def learned(gamma_0: float = -13.3, gamma_1: float = 5.0, hidden: int = 1024,
            init_std: float = 0.01, seed: int = 0, time_scale: float = 1000.0,
            time_input: str = "t") -> LearnedSchedule:
    """VDM's learned schedule; see :class:`LearnedSchedule`."""
    return LearnedSchedule(gamma_0, gamma_1, hidden, init_std, seed, time_scale, time_input)
