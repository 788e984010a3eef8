"""Bespoke solvers: the general linear multistep solver on a grid, run with given coefficients.

Every multistep sampler here (DDIM, DPM-Solver++(2M/3M), Euler, UniPC) calls the network once
per grid point, and the point of each call is a *fixed* linear combination of the starting
point x_T and the data predictions made so far (its coefficients depend on the grid only):

    x_j = c_j x_T + sum_{k < j} d_{jk} D_k,    D_k = x0_hat(x_k, t_k),    j = 1 .. n,

with x_n the output. These n(n + 3) / 2 numbers are the whole solver (Bespoke Non-Stationary
solvers, Shaul et al. 2024, "Bespoke Non-Stationary Solvers for Fast Sampling of Diffusion and
Flow Models", Sec. 3: x_{i+1} = a_i X_i + B_i U_i over all previous points X and velocities U;
both span {x_T, D_0 .. D_i}, so this form has the same solvers with no redundant
coefficients). :func:`solver_coefficients` reads a classical solver's numbers off exactly, by
running it once on a symbolic denoiser; the sampler ``bespoke`` runs given ones (without them,
its ``base`` solver's). Fitting them to one model (the objective, the optimiser, the store)
is :mod:`difflab.fitting.bespoke`.

Cost at sampling time: the NFE of the base solver plus n(n + 1) / 2 axpy operations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, Prediction, TimePoint
from difflab.samplers.common import REGISTRY, Grid, predict, register
from difflab.samplers.plan import check_coeffs

__all__ = ["sample_bespoke", "solver_coefficients", "run_linear", "combine", "BASES"]

BASES = ("unipc", "dpmpp_3m", "dpmpp_2m", "ddim", "euler")  # one call per grid point


class _Symbolic(BaseDenoiser):
    """The denoiser whose k-th call returns x0_hat = e_{k+1}: a linear sampler run on the
    state x = e_0 then carries its own coefficient vector over (x_T, D_0, D_1, ...)."""

    def __init__(self, schedule: Any, n: int):
        super().__init__()
        self.schedule, self.n, self.calls = schedule, n, []

    def predict_at(self, x: Tensor, point: TimePoint, cond: Any = None) -> Prediction:
        k = len(self.calls)
        self.calls.append((point.t, x[0].clone()))
        if k >= self.n:
            raise ValueError("more network calls than grid points")
        x0 = torch.zeros_like(x)
        x0[:, k + 1] = 1.0
        a, s = point.alpha, point.sigma
        return Prediction(x, x0, (x - a * x0) / s, a, s)

    def predict(self, x: Tensor, t: Tensor | float, cond: Any = None) -> Prediction:
        raise ValueError("a bespoke base solver must evaluate the network at grid points only")


def solver_coefficients(sampler: str, schedule: Any, ts: Sequence[float] | Tensor,
                        **opts: Any) -> list[list[float]]:
    """The coefficients (c_j, d_j0 .. d_j,j-1), j = 1 .. n, of deterministic ``sampler`` on grid
    ``ts`` (module docstring), exact to float64 rounding: the sampler runs once on a symbolic
    denoiser. Row j < n is the point of network call j, row n the output. ``sampler`` must call
    the network once per grid point (one of :data:`BASES`)."""
    if sampler not in BASES:
        raise ValueError(f"base solver {sampler!r} does not call the network once per grid "
                         f"point; valid: {list(BASES)}")
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten()
    n = ts.numel() - 1
    sym = _Symbolic(schedule, n)
    e0 = torch.zeros(1, n + 1, dtype=torch.float64)
    e0[0, 0] = 1.0
    out = REGISTRY[sampler].fn(sym, e0, ts, **opts)
    if [t for t, _ in sym.calls] != ts[:-1].tolist():
        raise ValueError(f"{sampler} did not call the network once at each grid point")
    rows = [x for _, x in sym.calls[1:]] + [out[0]]
    return [row[: j + 2].tolist() for j, row in enumerate(rows)]


def combine(row: Sequence[Any], x_T: Tensor, D: Sequence[Tensor]) -> Tensor:
    """c x_T + sum_k d_k D_k (numbers or 0-d tensors: the fit differentiates through it)."""
    x = row[0] * x_T
    for d, D_k in zip(row[1:], D):
        x = x + d * D_k
    return x


def run_linear(x0_at: Callable[[Tensor, int], Tensor], x: Tensor,
               rows: Sequence[Sequence[Any]], callback: Callable | None = None,
               times: Sequence[float] = ()) -> Tensor:
    """The solver loop: D_j = x0_at(x_j, j), x_{j+1} = c_{j+1} x_T + sum_k d_{j+1,k} D_k, with
    ``rows`` the coefficients (numbers, or 0-d tensors: the fit differentiates through it)."""
    x_T, D = x, []
    for i, row in enumerate(rows):
        D.append(x0_at(x, i))
        x = combine(row, x_T, D)
        if callback is not None:
            callback({"i": i, "t": times[i], "x": x, "x0": D[-1]})
    return x


@register("bespoke", nfe=lambda steps: steps, nfe_rule="steps", spacing="log_snr", order=3)
@torch.no_grad()
def sample_bespoke(denoiser: BaseDenoiser, x: Tensor, ts: Tensor, *, cond: Any = None,
                   generator: Any = None, callback: Callable | None = None,
                   coeffs: Sequence[Sequence[float]] | None = None,
                   base: str = "unipc") -> Tensor:
    """Bespoke linear solver (Shaul et al. 2024): x_j = c_j x_T + sum_k d_jk D_k with fitted
    ``coeffs`` (:func:`difflab.fitting.tune_solver`; ``difflab.sample(..., fit=fit)`` passes
    a fit's); without them, ``base``'s own coefficients."""
    g = Grid(denoiser.schedule, ts, x)
    if coeffs is None:
        coeffs = solver_coefficients(base, denoiser.schedule, ts)
    check_coeffs(coeffs, g.n)
    rows = [[float(c) for c in row] for row in coeffs]
    return run_linear(lambda x_j, j: predict(denoiser, x_j, g, j, cond).x0, x, rows, callback,
                      g.times)
