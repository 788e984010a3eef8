"""Denoisers: network + parameterisation + schedule -> an estimate of x_0.

* :mod:`.core`             BaseDenoiser (the interface samplers and guidance use), Denoiser
* :mod:`.parameterization` eps, x0, v, score, EDM: what a network's output means
* :mod:`.prediction`       the conversions between x0, eps, v and the score; Prediction
* :mod:`.condition`        the structured condition and its null value
* :mod:`.split`            inference network calls split over CPU threads (``split_batch``)
"""

from difflab.denoiser.condition import Condition
from difflab.denoiser.core import PREDICTIONS, BaseDenoiser, Denoiser
from difflab.denoiser.parameterization import Parameterization
from difflab.denoiser.prediction import (
    TARGETS,
    Prediction,
    TimePoint,
    broadcast_time,
    eps_to_x0,
    interpolated_log_variance,
    v_to_x0_eps,
    x0_eps_to_v,
    x0_to_eps,
)
from difflab.denoiser.split import split_batch

__all__ = ["PREDICTIONS", "TARGETS", "BaseDenoiser", "Condition", "Denoiser", "Parameterization",
           "Prediction", "TimePoint", "broadcast_time", "eps_to_x0",
           "interpolated_log_variance", "v_to_x0_eps", "x0_eps_to_v",
           "split_batch", "x0_to_eps"]
