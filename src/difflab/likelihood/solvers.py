"""The ODE integrators of :mod:`difflab.likelihood` (its module docstring has the mathematics):
embedded Runge-Kutta pairs with FSAL and error control (Dormand-Prince 5(4), Bogacki-Shampine
3(2)) for any state that is a tuple of batch-first tensors, and the fixed-step exponential
multistep predictor-corrector for the probability-flow ODE in the half log-SNR."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from difflab.schedules import NoiseSchedule

__all__ = ["TABLEAUS", "State", "Stats", "embedded_rk", "lagrange_integrals", "multistep_grid",
           "exponential_multistep", "MULTISTEP_ORDER", "GRID_POWER", "QUADRATURE_POINTS"]

F64 = torch.float64
MULTISTEP_ORDER = 3  # the number of data predictions its polynomial goes through
GRID_POWER = 1.5  # its nodes: l_start + (l_end - l_start) (i / steps)^GRID_POWER
QUADRATURE_POINTS = 4  # the divergence's composite Lagrange quadrature: nodes per interval


# ------------------------------------------------------------------------------------------
# Embedded Runge-Kutta pairs with FSAL: Dormand-Prince 5(4), Bogacki-Shampine 3(2)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tableau:
    """An explicit embedded pair whose last stage is evaluated at the new point (FSAL): ``A``'s
    last row is the solution's weights, ``E`` = solution minus embedded weights over every
    stage, ``low`` the embedded order (the step factor is err^(-1 / (low + 1)))."""

    C: tuple[float, ...]
    A: tuple[tuple[float, ...], ...]
    E: tuple[float, ...]
    low: int


def _pair(A: tuple[tuple[float, ...], ...], B_low: tuple[float, ...]) -> tuple[float, ...]:
    """E: the solution's weights (A's last row, 0 for the FSAL stage) minus the embedded."""
    return tuple(b - b_low for b, b_low in zip((*A[-1], 0.0), B_low))


# Dormand & Prince (1980), RK5(4)7FM; Hairer, Norsett & Wanner, Solving ODEs I, Table II.5.2
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights
)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
# Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas" (MATLAB's ode23)
_BS_A = ((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9))
_BS_C = (0.0, 1 / 2, 3 / 4, 1.0)
_BS_B2 = (7 / 24, 1 / 4, 1 / 3, 1 / 8)
TABLEAUS = {"dopri5": _Tableau(_DP_C, _DP_A, _pair(_DP_A, _DP_B4), 4),
            "bosh3": _Tableau(_BS_C, _BS_A, _pair(_BS_A, _BS_B2), 2)}

State = tuple[Tensor, ...]


def _axpy(y: State, h: float, coefs: Sequence[float], ks: Sequence[State]) -> State:
    """y + h sum_j coefs[j] ks[j], componentwise over the state's tensors."""
    out = []
    for i, yi in enumerate(y):
        acc = yi.clone()
        for c, k in zip(coefs, ks):
            if c != 0.0:
                acc.add_(k[i], alpha=h * c)
        out.append(acc)
    return tuple(out)


def _rms(parts: State, scales: State) -> float:
    """max over tensors and batch rows of the RMS of parts / scales over each row."""
    worst = 0.0
    for p, s in zip(parts, scales):
        q = (p / s).reshape(p.shape[0], -1)
        worst = max(worst, float(q.pow(2).mean(1).sqrt().max()))
    return worst


@dataclass(frozen=True)
class Stats:
    nfe: int
    steps: int
    rejected: int


def embedded_rk(fun: Callable[[float, State], State], t0: float, t1: float, y0: State,
                 rtol: float, atol: float, max_steps: int, solver: str = "dopri5"
                 ) -> tuple[State, Stats]:
    """Integrate dy/dt = fun(t, y) from t0 to t1 (either direction) with an embedded pair of
    :data:`TABLEAUS` (Dormand-Prince 5(4) by default); y is a tuple of tensors with the batch
    first (:mod:`difflab.likelihood`'s docstring)."""
    tab = TABLEAUS[solver]
    q = 1.0 / (tab.low + 1)
    nfe = 0

    def f(t: float, y: State) -> State:
        nonlocal nfe
        nfe += 1
        return fun(t, y)

    if t0 == t1:
        return y0, Stats(0, 0, 0)
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    k1 = f(t0, y0)
    # initial step (Hairer, Norsett & Wanner, Sec. II.4)
    sc = tuple(atol + rtol * y.abs() for y in y0)
    d0, d1 = _rms(y0, sc), _rms(k1, sc)
    h0 = 1e-6 * span if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    k2 = f(t0 + direction * h0, _axpy(y0, direction * h0, (1.0,), (k1,)))
    d2 = _rms(tuple(b - a for a, b in zip(k1, k2)), sc) / h0
    h1 = max(1e-6 * span, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** q
    h = min(100 * h0, h1, span)
    t, y, steps, rejected = t0, y0, 0, 0
    while direction * (t1 - t) > 0:
        if steps + rejected >= max_steps:
            raise RuntimeError(f"the ODE solver took more than max_steps={max_steps} steps "
                               f"(reached t = {t:.6g} of {t1}); loosen rtol/atol or raise "
                               "max_steps")
        remaining = abs(t1 - t)
        last = h >= remaining * (1 - 1e-12)
        h = min(h, remaining)
        hs = direction * h
        ks = [k1]
        for i in range(1, len(tab.C)):
            ks.append(f(t + tab.C[i] * hs, _axpy(y, hs, tab.A[i], ks)))
        y5 = _axpy(y, hs, tab.A[-1], ks[:-1])
        err = _axpy(tuple(torch.zeros_like(a) for a in y), hs, tab.E, ks)
        scale = tuple(atol + rtol * torch.maximum(a.abs(), b.abs()) for a, b in zip(y, y5))
        ratio = _rms(err, scale)
        if not math.isfinite(ratio):
            ratio = math.inf
        if ratio <= 1.0:
            t = t1 if last else t + hs
            y, k1 = y5, ks[-1]
            steps += 1
            factor = 10.0 if ratio == 0 else min(10.0, max(0.2, 0.9 * ratio ** -q))
        else:
            rejected += 1
            factor = 0.2 if ratio == math.inf else min(1.0, max(0.2, 0.9 * ratio ** -q))
            if h * factor < 1e-14 * max(1.0, abs(t)):
                raise RuntimeError(f"the ODE solver's step size underflowed at t = {t:.6g} "
                                   "(the drift is not finite or not smooth there)")
        h *= factor
    return y, Stats(nfe, steps, rejected)


# ------------------------------------------------------------------------------------------
# the fixed-step exponential multistep solver (difflab.likelihood's docstring)
# ------------------------------------------------------------------------------------------
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(8)


def lagrange_integrals(nodes: Sequence[float], a: float, b: float,
                        shift: float | None = None) -> list[float]:
    """int_a^b w(l) L_j(l) dl for the Lagrange basis L_j on ``nodes``, w(l) = e^{l - shift}
    (w = 1 when ``shift`` is None), by 8-point Gauss-Legendre quadrature: exact for the
    polynomial and, for |b - a| <= 3, within ~1e-12 relative for the exponential."""
    mid, half = (a + b) / 2, (b - a) / 2
    ls = mid + half * _GL_NODES
    w = _GL_WEIGHTS * half * (np.ones_like(ls) if shift is None else np.exp(ls - shift))
    out = []
    for j, l_j in enumerate(nodes):
        basis = np.ones_like(ls)
        for k, l_k in enumerate(nodes):
            if k != j:
                basis *= (ls - l_k) / (l_j - l_k)
        out.append(float((w * basis).sum()))
    return out


def multistep_grid(l_start: float, l_end: float, steps: int) -> list[float]:
    """The multistep solver's nodes in the half log-SNR: l_start + (l_end - l_start)
    (i / steps)^GRID_POWER, i = 0..steps."""
    return [l_start + (l_end - l_start) * (i / steps) ** GRID_POWER for i in range(steps + 1)]


def exponential_multistep(schedule: NoiseSchedule, network: Callable[[Tensor, float],
                           tuple[Tensor, Tensor]], x: Tensor, ls: Sequence[float]
                           ) -> tuple[Tensor, Tensor, int]:
    """x at the last node and int div_x (dx/dl) dl over the nodes ``ls`` (half log-SNR) by the
    predictor-corrector of :mod:`difflab.likelihood`'s docstring. ``network(x, t)`` returns
    x0_hat(x, t) and v^T (dx0_hat/dx) v per probe column, (B, k). Returns (x_end, integral
    (B, k), NFE)."""
    with torch.no_grad():
        ts = [float(schedule.t_from_log_snr(torch.tensor(2 * lam, dtype=F64))) for lam in ls]
        alpha, sigma = (c.tolist() for c in schedule.alpha_sigma(torch.tensor(ts, dtype=F64)))

    def step(x_i: Tensor, i: int, nodes: list[tuple[float, Tensor]]) -> Tensor:
        """x_{i+1} = (sigma_{i+1}/sigma_i) x_i + alpha_{i+1} sum_j w_j D_j."""
        w = lagrange_integrals([n[0] for n in nodes], ls[i], ls[i + 1], shift=ls[i + 1])
        out = x_i * (sigma[i + 1] / sigma[i])
        for w_j, (_, x0_j) in zip(w, nodes):
            out.add_(x0_j, alpha=alpha[i + 1] * w_j)
        return out

    n = len(ls) - 1
    hist: list[tuple[float, Tensor]] = []  # (l_j, x0_hat_j), newest last
    rates = []
    x_prev = x
    for i in range(n + 1):
        x0, quad = network(x, ts[i])
        rates.append(alpha[i] * quad)
        if i > 0:  # the corrector: the step again, the new point's prediction among the nodes
            x = step(x_prev, i - 1, [(ls[i], x0), *hist[::-1][:MULTISTEP_ORDER - 1]])
        hist.append((ls[i], x0))
        if i < n:
            x_prev = x
            x = step(x, i, hist[-MULTISTEP_ORDER:])
    integral = torch.zeros_like(rates[0])
    q = min(QUADRATURE_POINTS, n + 1)
    for i in range(n):  # composite quadrature: the q nodes around interval i
        lo = max(0, min(i - (q - 1) // 2, n + 1 - q))
        w = lagrange_integrals(ls[lo:lo + q], ls[i], ls[i + 1])
        for w_j, r_j in zip(w, rates[lo:lo + q]):
            integral.add_(r_j, alpha=w_j)
    integral += x[0].numel() * math.log(sigma[-1] / sigma[0])
    return x, integral, n + 1
