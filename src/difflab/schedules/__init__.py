"""Noise schedules over continuous time t in [0, 1].

Every model in difflab is described by one schedule (DESIGN.md):

    x_t = alpha(t) * x_0 + sigma(t) * eps,        eps ~ N(0, I)
    log_snr(t) = lambda(t) = 2 * log(alpha(t) / sigma(t))      strictly decreasing in t

Conventions kept by every schedule here:

* ``t = 0`` is clean data: ``sigma(0) = 0``, ``log_snr(0) = +inf``. A sampler's time grid
  always ends at ``t = 0``, so "the last step to sigma = 0" is an ordinary grid point.
* ``t = 1`` is the prior end. ``sigma_min`` is the smallest *nonzero* noise level the model
  was trained for: grids such as Karras' place their last nonzero point there.
* ``net_time(t)`` is what the network receives as its time input, and ``t_from_net_time``
  inverts it. For discrete DDPM schedules it is the fractional timestep index in
  [0, T - 1] (the convention of published DDPM checkpoints).

Variance preserving (VP) schedules have alpha^2 + sigma^2 = 1, so
alpha^2 = sigmoid(lambda) and sigma^2 = sigmoid(-lambda). Variance exploding (VE / EDM)
schedules have alpha = 1 and sigma = exp(-lambda / 2).

All arithmetic is done in float64 and returned in the dtype of ``t`` (float64 for Python
floats), so that solvers can precompute their coefficients exactly once.

The interface (``base``): ``log_snr(t)``, ``t_from_log_snr``, ``alpha_sigma(t)``,
``d_log_snr_dt(t)``, ``net_time(t)`` / ``t_from_net_time``, ``num_steps`` (T for a discrete
DDPM chain, None in continuous time) and ``config()``. Each family is a class registered by its
config ``"type"``, so ``from_config(schedule.config())`` rebuilds every one of them:

* ``discrete``    DDPM chains: ``linear``, ``scaled_linear``, ``cosine``, ``sigmoid``, ``betas``
* ``continuous``  ``cosine_continuous``
* ``edm``         ``edm`` (variance exploding), and ``edm_c_noise`` = log(sigma~) / 4
* ``flow``        ``rectified_flow`` (alpha = 1 - t, sigma = t; a shift is a log-SNR offset),
                  ``dynamic_shift`` (Flux's resolution-dependent shift)
"""

from difflab.schedules.base import (
    SCHEDULE_TYPES,
    NoiseSchedule,
    _as_tensor,  # noqa: F401  (used by modules that evaluate schedules in float64)
    from_config,
    register,
)
from difflab.schedules.continuous import ContinuousVPSchedule, cosine_continuous
from difflab.schedules.discrete import (
    BetasSchedule,
    CosineSchedule,
    DiscreteSchedule,
    LinearSchedule,
    ScaledLinearSchedule,
    SigmoidSchedule,
    cosine,
    from_betas,
    linear,
    rescale_zero_terminal_snr,
    scaled_linear,
    sigmoid,
)
from difflab.schedules.edm import EDMSchedule, edm, edm_c_noise
from difflab.schedules.flow import RectifiedFlowSchedule, dynamic_shift, rectified_flow
from difflab.schedules.learned import LearnedSchedule, learned

__all__ = [
    "NoiseSchedule",
    "DiscreteSchedule",
    "ContinuousVPSchedule",
    "EDMSchedule",
    "BetasSchedule",
    "LinearSchedule",
    "ScaledLinearSchedule",
    "CosineSchedule",
    "SigmoidSchedule",
    "linear",
    "scaled_linear",
    "cosine",
    "sigmoid",
    "edm",
    "edm_c_noise",
    "from_betas",
    "rescale_zero_terminal_snr",
    "from_config",
    "register",
    "SCHEDULE_TYPES",
    "cosine_continuous",
    "NAMES",
    "LearnedSchedule",
    "learned",
    "RectifiedFlowSchedule",
    "rectified_flow",
    "dynamic_shift",
]

NAMES = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "cosine": cosine,
    "sigmoid": sigmoid,
    "edm": edm,
    "cosine_continuous": cosine_continuous,
    "rectified_flow": rectified_flow,
}
"""The named schedule factories (each callable with its defaults); ``from_config`` dispatches
on ``SCHEDULE_TYPES`` instead, which also holds ``"betas"``."""
