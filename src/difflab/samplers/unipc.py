"""UniPC, Zhao et al. 2023: the unified predictor (UniP) and corrector (UniC), data prediction,
B(h) = e^{-h} - 1 ("bh2"), Alg. 2 and App. C; coefficients as in the authors' code.

Step s = t_i -> t = t_{i+1}, h = lam_t - lam_s, r_k = (lam_{i-k} - lam_i) / h, D_k = (x0_{i-k}
- x0_i) / r_k. Predictor of order p:

    x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) x0_i - alpha_t B(h) sum_k rho^p_k D_k

with rho^p = 1/2 for p = 2 and rho^p = R_{p-1}^{-1} b_{p-1} otherwise (R_{jk} = r_k^{j-1},
b_j = h phi_{j+1}(h) j! / B(h)). After the network call at x_t (reused by the next step, so no
extra NFE), the corrector UniC of the same order recomputes x_t with the new data prediction
x0_t included (rho^c = R_p^{-1} b_p, rho^c = 1/2 for p = 1). The order is lowered while the
history is short, and history points at lam = -inf (alpha = 0) are not used. A step from
alpha = 0 (rectified flow's t = 1, a zero-terminal-SNR chain) is corrected in the limit
h -> inf, where e^{-h} -> 0 and B(h) -> -1: x_t = (sigma_t / sigma_s) x_s + alpha_t (x0_s +
x0_t) / 2 (UniC-1; diffusers' UniPCMultistepScheduler takes the same limit). Measured on a
rectified-flow U-Net (docs/results/byom_defaults.md), leaving that step uncorrected (a plain
DDIM step) cost 1.3x / 1.4x the RMSE at 5 / 10 steps. The state after the last corrector is
not used by the step to sigma = 0, so that corrector is skipped. NFE = steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser
from difflab.samplers.common import (
    Grid,
    check_final,
    final_x0,
    first_order,
    predict,
    register,
)

__all__ = ["sample_unipc"]


def _solve(A: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small (<= 3x3) system A y = b by Gaussian elimination with pivoting."""
    n = len(b)
    M = [list(row) + [bi] for row, bi in zip(A, b)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(M[r][c]))
        M[c], M[piv] = M[piv], M[c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            M[r] = [a - f * m for a, m in zip(M[r], M[c])]
    y = [0.0] * n
    for r in reversed(range(n)):
        y[r] = (M[r][n] - sum(M[r][k] * y[k] for k in range(r + 1, n))) / M[r][r]
    return y


def _unipc_coefficients(g: Grid, i: int, order: int) -> dict[str, Any]:
    """Scalars of step i -> i + 1: weights of D_k in the predictor and in the corrector."""
    h = g.h(i)
    finite = [j for j in range(i + 1) if math.isfinite(g.lam[j])]
    p = max(1, min(order, len(finite)))
    ratio, c = first_order(g, i)
    out = {"p": p, "ratio": ratio, "c": c, "pred": [], "corr": [], "new": 0.0, "aB": 0.0,
           "correct": True}
    if not math.isfinite(h):  # from alpha = 0: the h -> inf limit, B(h) = -1, UniC-1's rho 1/2
        out.update(aB=-g.alpha[i + 1], new=0.5)
        return out
    hh = -h
    b_h = math.expm1(hh)
    rks = [(g.lam[i - k] - g.lam[i]) / h for k in range(1, p)] + [1.0]
    R, b = [], []
    h_phi_k, factorial = math.expm1(hh) / hh - 1, 1
    for j in range(1, p + 1):
        R.append([rk ** (j - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if p == 2:
        rho_p = [0.5]
    elif p > 2:
        rho_p = _solve([row[:-1] for row in R[:-1]], b[:-1])
    else:
        rho_p = []
    rho_c = [0.5] if p == 1 else _solve(R, b)
    out.update(aB=g.alpha[i + 1] * b_h, pred=[r / rk for r, rk in zip(rho_p, rks)],
               corr=[r / rk for r, rk in zip(rho_c[:-1], rks)], new=rho_c[-1])
    return out


@register("unipc", nfe=lambda steps: steps, nfe_rule="steps", spacing="log_snr", order=3)
@torch.no_grad()
def sample_unipc(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                 generator: Any = None, callback: Callable | None = None, order: int = 2,
                 corrector: bool = True, final: str = "extrapolate") -> Tensor:
    """UniPC-bh2, Zhao et al. 2023, Alg. 2: UniP-p predictor + UniC corrector (order p + 1)."""
    check_final(final)
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order!r}")
    g = Grid(denoiser.schedule, ts, x)
    co = [_unipc_coefficients(g, i, order) for i in range(g.n)]
    hist: list[Tensor] = []  # x0_{i-1}, x0_{i-2}, ... before the call at step i
    x_prev = x
    for i in range(g.n):
        x0 = predict(denoiser, x, g, i, cond).x0
        if corrector and i > 0 and co[i - 1]["correct"] and not g.is_final(i):
            k = co[i - 1]  # UniC for step i-1 -> i, with the new prediction x0
            d0, aB = hist[0], k["aB"]
            # ratio x_prev + c d0 - aB (new (x0 - d0) + sum_k w_k (d_k - d0))
            c0 = k["c"] + aB * (k["new"] + sum(k["corr"]))
            x = torch.add(k["ratio"] * x_prev, d0, alpha=c0).add_(x0, alpha=-aB * k["new"])
            for w, dk in zip(k["corr"], hist[1:]):
                x = x.add_(dk, alpha=-aB * w)
        hist = [x0] + hist[: order - 1]
        if g.is_final(i):
            x = final_x0(g, x0, hist[1] if len(hist) > 1 else None, final, i - 1)
        else:
            k, aB = co[i], co[i]["aB"]
            # ratio x + c x0 - aB sum_k w_k (d_k - x0)
            x_prev, x = x, torch.add(k["ratio"] * x, x0, alpha=k["c"] + aB * sum(k["pred"]))
            for w, dk in zip(k["pred"], hist[1:]):
                x = x.add_(dk, alpha=-aB * w)
        if callback is not None:
            callback({"i": i, "t": g.times[i], "x": x, "x0": x0})
    return x
