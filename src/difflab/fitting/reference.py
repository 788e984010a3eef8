"""What every fit to a model starts with: the accurate ODE solution from the calibration noise.

A fit (a tuned grid, a bespoke solver) minimises the error of a few-step solver against an
accurate solution of the probability-flow ODE from the same calibration noise (LD3, Tong et al.
2024, Eq. 6; Shaul et al. 2024, Sec. 3). The reference is dpm_solver_3 on a fine log-SNR grid;
the same solve also measures how fast the data prediction moves along the trajectories, which
places the adaptive grid (:func:`difflab.fitting.grids.adaptive_grid`). On a discrete-time
model the grid ends at the first trained time 1 / T and the solve ends with x0_hat there
(:func:`difflab.samplers.probe.reference_final`), the endpoint every difflab reference shares.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.samplers import sample, timesteps
from difflab.samplers.probe import reference_final

__all__ = ["calibration_reference", "reference_profile", "check_steps"]


def check_steps(steps: Any) -> int:
    """``steps`` as a step count (an integer >= 1), or a ValueError naming it."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def calibration_reference(denoiser: BaseDenoiser, steps: int, noise: Tensor,
                          reference: Tensor | None, reference_steps: int, cond: Any,
                          t_start: float) -> Tensor:
    """What every fit to a model starts with: ``steps`` checked, and the accurate ODE
    solution from the calibration ``noise`` (``reference`` if given, else dpm_solver_3 on a
    ``reference_steps``-step log-SNR grid)."""
    check_steps(steps)
    if reference is not None:
        return reference
    return reference_profile(denoiser, noise, reference_steps, cond=cond, t_start=t_start)[0]


@torch.no_grad()
def reference_profile(denoiser: BaseDenoiser, noise: Tensor, reference_steps: int = 100, *,
                      cond: Any = None, t_start: float = 1.0, batch_size: int | None = None
                      ) -> tuple[Tensor, dict[str, list[float]]]:
    """The accurate ODE solution from the calibration ``noise`` (dpm_solver_3 on a
    ``reference_steps``-step log-SNR grid, as :func:`calibration_reference`) and, from the same
    solve, how fast the data prediction D = x0_hat(x_t, t) moves along those trajectories:

        r(lambda) = RMS over draws and dimensions of dD/dlambda,

    by finite differences between consecutive grid points (at their log-SNR midpoints).
    :func:`~difflab.fitting.grids.adaptive_grid` places a grid by it. ``batch_size`` splits
    the solve for memory (``cond`` is sliced with it: ``cond[i:j]``). Returns
    ``(reference, {"log_snr": [...], "rate": [...]})``."""
    ts_ref = timesteps(denoiser.schedule, reference_steps, "log_snr", t_start=t_start)
    lam = denoiser.schedule.log_snr(ts_ref[:-1].to(torch.float64)).to(torch.float64)
    sumsq = torch.zeros(lam.numel() - 1, dtype=torch.float64)
    chunk = batch_size or noise.shape[0]
    refs = []
    for i in range(0, noise.shape[0], chunk):
        prev: list[Tensor] = []

        def record(step: dict[str, Any], prev: list[Tensor] = prev) -> None:
            j, D = step["i"], step["x0"].to(torch.float64)
            if prev and j < lam.numel():
                sumsq[j - 1] += (D - prev[0]).pow(2).sum().cpu() / (lam[j] - lam[j - 1]) ** 2
            prev[:] = [D]

        refs.append(sample(denoiser, noise[i:i + chunk], "dpm_solver_3", reference_steps,
                           grid=ts_ref, cond=None if cond is None else cond[i:i + chunk],
                           callback=record,
                           **reference_final(denoiser.schedule, ts_ref, "dpm_solver_3")))
    rate = (sumsq / noise.numel()).sqrt()
    return torch.cat(refs), {"log_snr": (0.5 * (lam[1:] + lam[:-1])).tolist(),
                             "rate": rate.tolist()}
