"""Singlestep DPM-Solver-1/2/3 in noise-prediction form (Lu et al. 2022, Algs. 1-2, Eqs. 3.7-3.9).

With h = lam_t - lam_s and x0_hat, eps_hat from one prediction at (x_s, s), the first-order
part alpha_t / alpha_s x_s - sigma_t (e^h - 1) eps_hat is evaluated as the identical
alpha_t x0_hat + sigma_t eps_hat, which stays finite at alpha_s = 0 (zero terminal SNR).
Intermediate points sit at lam_s + r_k h (r = 1/2 for order 2, r = 1/3, 2/3 for order 3); their
times are computed before the loop. Steps that span an infinite log-SNR gap (the first step
from alpha = 0 and the last step to sigma = 0) have no intermediate point: the first is taken
as DDIM (one NFE), the last as the ``final`` step of :mod:`difflab.samplers.common`. NFE =
order * (steps - 1) + 1 (minus order - 1 on a zero-terminal-SNR grid).

**Limit**: the noise-prediction form multiplies eps differences by sigma_t (e^h - 1), so a
step with a large log-SNR increment h amplifies model error like e^h. On DDPM's linear
schedule with the default log-SNR grid, 2 steps (h = 9.7) of dpm_solver_3 diverge (RMSE 65 on
the 2-D ring) and 3 steps of dpm_solver_2 reach 1.4; 4 steps of dpm_solver_3 (NFE 10, h = 3.2)
still give 0.48, 7 steps (NFE 19, h = 1.6) 0.058. Use the data-prediction multistep solvers
(dpmpp_2m, unipc) for <= 10 NFE; dpm_solver_2/3 warn where a step shrinks sigma~ by more
than 10x (h > ln 10), as heun does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, TimePoint
from difflab.samplers.common import (
    Grid,
    check_final,
    final_x0,
    predict,
    register,
    warn_large_steps,
)

__all__ = ["sample_dpm_solver_1", "sample_dpm_solver_2", "sample_dpm_solver_3"]

_R = {1: (), 2: (0.5,), 3: (1 / 3, 2 / 3)}


def _dpm_solver(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, order: int, cond: Any,
                callback: Callable | None, final: str) -> Tensor:
    check_final(final)
    g, r = Grid(denoiser.schedule, ts, x), _R[order]
    if order > 1:
        warn_large_steps(g, f"dpm_solver_{order}", "its noise-prediction form multiplies eps "
                         "differences by sigma_t (e^h - 1) (RMSE 1.4 at 3 steps of dpm_solver_2 "
                         "on the 2-D ring)",
                         stacklevel=6)
    hs = [g.h(i) for i in range(g.n)]
    lam_mid = torch.tensor([[g.lam[i] + rk * h if math.isfinite(h) else 0.0 for rk in r]
                            for i, h in enumerate(hs)], dtype=torch.float64).reshape(g.n, len(r))
    t_mid = denoiser.schedule.t_from_log_snr(2 * lam_mid)
    ab_mid = denoiser.schedule.alpha_sigma(t_mid)
    a_mid, s_mid = (c.tolist() for c in ab_mid)
    p_mid = TimePoint.grid(denoiser.schedule, t_mid, x, ab_mid)  # row-major: step i, point k
    k = len(r)
    x0_prev = None
    for i in range(g.n):
        pred = predict(denoiser, x, g, i, cond)
        x0, eps, h = pred.x0, pred.eps, hs[i]
        if g.is_final(i):
            x = final_x0(g, x0, x0_prev, final, i - 1)
        else:
            s_t = g.sigma[i + 1]
            x = g.alpha[i + 1] * x0 + s_t * eps
            if order > 1 and math.isfinite(h):
                (a1, *a2), (s1, *s2) = a_mid[i], s_mid[i]
                u1 = a1 * x0 + s1 * eps
                d1 = denoiser.predict_at(u1, p_mid[i * k], cond).eps - eps
                if order == 2:
                    x = x - s_t * math.expm1(h) / (2 * r[0]) * d1
                else:
                    r1, r2 = r
                    phi = math.expm1(r2 * h) / (r2 * h) - 1
                    u2 = a2[0] * x0 + s2[0] * eps - s2[0] * r2 / r1 * phi * d1
                    d2 = denoiser.predict_at(u2, p_mid[i * k + 1], cond).eps - eps
                    x = x - s_t / r2 * (math.expm1(h) / h - 1) * d2
        x0_prev = x0
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": x0})
    return x


@register("dpm_solver_1", nfe=lambda steps: steps, nfe_rule="steps", spacing="log_snr",
          order=1)
@torch.no_grad()
def sample_dpm_solver_1(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                        generator: Any = None, callback: Callable | None = None,
                        final: str = "x0") -> Tensor:
    """DPM-Solver-1, Lu et al. 2022, Eq. 3.7 (= DDIM): x_t = alpha_t x0_hat + sigma_t eps_hat."""
    return _dpm_solver(denoiser, x, ts, 1, cond, callback, final)


@register("dpm_solver_2", nfe=lambda steps: 2 * steps - 1, nfe_rule="2 * steps - 1",
          spacing="log_snr", order=2)
@torch.no_grad()
def sample_dpm_solver_2(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                        generator: Any = None, callback: Callable | None = None,
                        final: str = "x0") -> Tensor:
    """DPM-Solver-2, Lu et al. 2022, Alg. 1 (r1 = 1/2), singlestep, noise prediction."""
    return _dpm_solver(denoiser, x, ts, 2, cond, callback, final)


@register("dpm_solver_3", nfe=lambda steps: 3 * steps - 2, nfe_rule="3 * steps - 2",
          spacing="log_snr", order=3)
@torch.no_grad()
def sample_dpm_solver_3(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                        generator: Any = None, callback: Callable | None = None,
                        final: str = "extrapolate") -> Tensor:
    """DPM-Solver-3, Lu et al. 2022, Alg. 2 (r1 = 1/3, r2 = 2/3), singlestep, noise prediction."""
    return _dpm_solver(denoiser, x, ts, 3, cond, callback, final)
