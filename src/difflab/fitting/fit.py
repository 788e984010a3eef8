"""The fit object: a solver fitted to one model, with how it was made.

A :class:`Fit` is a :class:`~difflab.samplers.SolverPlan` (sampler, grid ``ts``, evaluation
times ``eval_ts``, bespoke ``coeffs``: what ``difflab.sample(..., fit=fit)`` runs) plus its
provenance and calibration metrics. It is frozen (share it between threads; derive a changed
copy with :meth:`Fit.with_`) and round-trips through JSON (:meth:`Fit.to_json`,
:meth:`Fit.from_json`), in the entry format of the checkpoint's fits file, which is also the
format of the entries of the older ``grids.json`` files, so those load unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from difflab.samplers import SolverPlan, get

__all__ = ["Fit"]

_PLAN = ("sampler", "ts", "eval_ts", "coeffs")
_DERIVED = ("steps", "nfe")  # written for readers of the file, recomputed on load
_INTS = ("calibration", "reference_steps", "seed", "evals", "iterations")
_FLOATS = ("rmse", "rmse_base", "rmse_grid", "rmse_default")
_MAPPINGS = ("starts", "grid_from", "extra")


def _frozen(value: Any) -> Any:
    """Read-only view of nested JSON-like data (dicts -> mappingproxy, lists -> tuples)."""
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """The JSON form of :func:`_frozen` data."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Fit(SolverPlan):
    """A solver fitted to one model (weights) for ``steps = len(ts) - 1`` steps.

    What runs (:class:`~difflab.samplers.SolverPlan`): ``sampler`` ("bespoke" for fitted
    coefficients, else the sampler whose grid was tuned), ``ts``, ``eval_ts``, ``coeffs``.
    How it was made (None where it does not apply or is unknown):

    - ``base``: the solver whose coefficients a bespoke fit starts from;
    - ``spacing``: the grid a bespoke fit started from (``adaptive``, a spacing name, or None
      for a given / tuned grid); ``starts``: calibration RMSE of the fit from each start;
    - ``rmse``: RMSE to the reference ODE solution on the calibration draws; ``rmse_base``:
      the base solver on the same grid and evaluation times; ``rmse_grid``: the tuned grid
      without evaluation times; ``rmse_default``: the sampler on its ``default_spacing`` grid;
    - ``calibration`` (draws), ``seed`` (of the calibration noise), ``reference_steps``
      (of the reference solve), ``evals`` (sampler runs of a grid search), ``iterations``
      (L-BFGS), ``fit_times`` (evaluation times fitted with the coefficients),
      ``grid_from`` (the fit of the grid this one was made on);
    - ``weights_sha256``: the weights it was fitted to (set by :func:`~difflab.fitting.store.
      save_fit`); ``extra``: any other entry of a stored fit, kept for the round trip.
    """

    base: str | None = None
    spacing: str | None = None
    default_spacing: str | None = None
    rmse: float | None = None
    rmse_base: float | None = None
    rmse_grid: float | None = None
    rmse_default: float | None = None
    starts: Mapping[str, float] | None = None
    calibration: int | None = None
    seed: int | None = None
    reference_steps: int | None = None
    evals: int | None = None
    iterations: int | None = None
    fit_times: bool | None = None
    grid_from: Mapping[str, Any] | None = None
    weights_sha256: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _MAPPINGS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _frozen(dict(value)))
        for name in _INTS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))
        for name in _FLOATS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    @property
    def nfe(self) -> int:
        """Network calls of one sampling run (the sampler's exact count for ``steps``)."""
        return get(self.sampler).nfe(self.steps)

    def __reduce__(self) -> tuple[Any, ...]:  # pickle / deepcopy through the JSON form
        return (Fit.from_json, (self.to_json(),))

    def with_(self, **changes: Any) -> Fit:
        """A copy with ``changes`` (field names), e.g. ``fit.with_(seed=1000)``."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The JSON entry: the plan (``ts``, ``eval_ts``, ``coeffs`` as lists), ``steps`` and
        ``nfe`` for readers, every field that is set, and ``extra``'s entries."""
        out: dict[str, Any] = {"sampler": self.sampler, "steps": self.steps, "nfe": self.nfe,
                               "ts": list(self.ts)}
        if self.eval_ts is not None:
            out["eval_ts"] = list(self.eval_ts)
        if self.coeffs is not None:
            out["coeffs"] = [list(row) for row in self.coeffs]
        for f in dataclasses.fields(self):
            if f.name in _PLAN or f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _plain(value)
        for k, v in self.extra.items():
            out.setdefault(k, _plain(v))
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Fit:
        """The fit of a JSON entry (:meth:`to_json`'s, or a ``grids.json`` entry of older
        checkpoints: one without ``eval_ts`` tells the network the grid times). Unknown keys
        go to ``extra``; ``steps`` and ``nfe`` are checked against / recomputed from the
        grid."""
        if "sampler" not in d or "ts" not in d:
            raise ValueError(f"a fit entry needs 'sampler' and 'ts', got keys {sorted(d)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items()
                 if k not in names and k not in _DERIVED and k != "extra"}
        extra.update(d.get("extra") or {})
        fit = cls(**known, extra=extra)
        if d.get("steps") is not None and int(d["steps"]) != fit.steps:
            raise ValueError(f"a fit entry for {d['steps']} steps has a grid of {len(fit.ts)} "
                             "times")
        return fit
