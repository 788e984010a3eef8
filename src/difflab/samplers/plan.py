"""A solver plan: what :func:`difflab.sample` runs besides a sampler name and a step count.

A plan fixes one solver for one step count: the sampler that runs it, its time grid, the times
the network is told at each grid point (decoupled evaluation times, LD3, Tong et al. 2024,
Sec. 3.2; :class:`~difflab.samplers.common.EvalTimes`) and, for the bespoke sampler, its
coefficients (Shaul et al. 2024; :mod:`difflab.samplers.bespoke`)

    x_j = c_j x_T + sum_{k < j} d_{jk} D_k,    coeffs[j - 1] = (c_j, d_j0, .., d_j,j-1).

It is passed explicitly, ``difflab.sample(denoiser, noise, fit=plan)``: no state on a denoiser
decides what a call runs. A fitted solver (:class:`difflab.fitting.Fit`) is a plan with how it
was made; the samplers layer knows only this part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difflab.samplers.common import FINAL_MODES

__all__ = ["SolverPlan", "check_coeffs"]


def _floats(values: Any) -> tuple[float, ...]:
    if isinstance(values, Tensor):
        values = values.detach().cpu().flatten().tolist()
    return tuple(float(v) for v in values)


def check_coeffs(coeffs: Sequence[Sequence[Any]], n: int) -> None:
    """Raise unless ``coeffs`` has the shape of an ``n``-step bespoke solver: rows j = 1 .. n
    of j + 1 numbers (c_j, d_j0 .. d_j,j-1)."""
    ok = len(coeffs) == n and all(len(row) == j + 2 for j, row in enumerate(coeffs))
    if not ok:
        raise ValueError(f"coeffs for a {n}-step grid need {n} rows of 2, 3, .., {n + 1} "
                         f"numbers, got row lengths {[len(r) for r in coeffs]}")


@dataclass(frozen=True)
class SolverPlan:
    """One solver for ``steps = len(ts) - 1`` steps.

    ``sampler``: the registered sampler that runs it. ``ts``: its grid, ``steps + 1``
    decreasing times ending at t = 0. ``eval_ts``: the time the network is told at each grid
    time (None: the grid time itself). ``coeffs``: a bespoke solver's coefficients (None: the
    sampler's own). ``final``: the mode of the last step, to sigma = 0 (``FINAL_MODES``;
    None: the sampler's own). Sequences are stored as tuples of floats, so a plan is
    immutable and can be shared between threads."""

    sampler: str
    ts: tuple[float, ...]
    eval_ts: tuple[float, ...] | None = None
    coeffs: tuple[tuple[float, ...], ...] | None = None
    final: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, str) or not self.sampler:
            raise ValueError(f"sampler must be a sampler name, got {self.sampler!r}")
        ts = _floats(self.ts)
        if len(ts) < 2 or ts[-1] != 0.0 or any(b >= a for a, b in zip(ts, ts[1:])):
            raise ValueError("ts must hold at least 2 strictly decreasing times ending at t = 0, "
                             f"got {list(ts[:4])}...{list(ts[-2:])}")
        object.__setattr__(self, "ts", ts)
        if self.eval_ts is not None:
            eval_ts = _floats(self.eval_ts)
            if len(eval_ts) != len(ts) or not all(0.0 <= t <= 1.0 for t in eval_ts):
                raise ValueError(f"eval_ts must hold one time in [0, 1] per grid time "
                                 f"({len(ts)}), got {list(eval_ts[:6])}"
                                 f"{'...' if len(eval_ts) > 6 else ''}")
            object.__setattr__(self, "eval_ts", eval_ts)
        if self.final is not None and self.final not in FINAL_MODES:
            raise ValueError(f"final must be one of {list(FINAL_MODES)} or None, got "
                             f"{self.final!r}")
        if self.coeffs is not None:
            coeffs = tuple(_floats(row) for row in self.coeffs)
            check_coeffs(coeffs, len(ts) - 1)
            object.__setattr__(self, "coeffs", coeffs)

    @property
    def steps(self) -> int:
        """The number of steps (grid intervals)."""
        return len(self.ts) - 1
