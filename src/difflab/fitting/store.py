"""Fits stored beside a checkpoint's weights: ``CKPT/fits.json``.

    {"format": "difflab-fits-1",
     "fits": {"unipc/10/ema": {"sampler": "unipc", "ts": [...], "eval_ts": [...],
                               "weights_sha256": "...", "rmse": ..., ...},
              "bespoke/10/ema": {"sampler": "bespoke", "coeffs": [[...], ...], ...}}}

One entry per sampler, step count and weights (``ema`` or ``model``), each a
:meth:`Fit.to_json <difflab.fitting.Fit.to_json>`. A fit belongs to the weights it was fitted
to: its entry records the SHA-256 of the weights file, and a lookup for weights that changed
since (training resumed) ignores it with a warning. The file is replaced atomically (written
beside, then renamed), so an interrupted save loses nothing.

Checkpoints written before this file hold the same entries in ``CKPT/grids.json``
(``{"format": "difflab-grids-1", "grids": {...}}``): they load as they are (an entry of
fits.json wins over one of grids.json), and the next save writes them all to fits.json.

The weights file is the network's (EMA) weights in the checkpoint (:func:`weights_file`:
``net.ema.safetensors`` / ``net.safetensors``, or ``ema.safetensors`` / ``model.safetensors``
in the earlier layout), or the path passed as ``weights=`` (another component, another
layout). ``ckpt_dir`` is the checkpoint directory itself (the train layer resolves a run
directory to it).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import difflab.files as files
from difflab.fitting.fit import Fit
from difflab.samplers import AUTO, DEFAULT

__all__ = ["FITS", "FORMAT", "LEGACY_GRIDS", "fit_key", "weights_file", "weights_sha256",
           "save_fit", "remove_fit", "load_fit", "load_fits", "choose_fit"]

FITS = "fits.json"
FORMAT = "difflab-fits-1"
LEGACY_GRIDS = "grids.json"  # the same entries, written before fits.json
_LEGACY_FORMAT = "difflab-grids-1"
_WEIGHTS = {True: "net.ema.safetensors", False: "net.safetensors"}  # difflab-checkpoint-2
_LEGACY_WEIGHTS = {True: "ema.safetensors", False: "model.safetensors"}  # the earlier layout

PathLike = str | os.PathLike


def fit_key(sampler: str, steps: int, ema: bool = True) -> str:
    """The entry name of a fit: ``"<sampler>/<steps>/<ema|model>"``."""
    return f"{sampler}/{int(steps)}/{'ema' if ema else 'model'}"


def weights_file(ckpt_dir: PathLike, ema: bool = True) -> Path:
    """The weights file a fit in ``ckpt_dir`` belongs to: the network's averaged weights (what
    one samples with; ``ema=False``: its raw weights), ``net.ema.safetensors`` /
    ``net.safetensors`` in a ``difflab-checkpoint-2`` directory, else ``ema.safetensors`` /
    ``model.safetensors`` (the earlier layout)."""
    ckpt = Path(ckpt_dir)
    current = ckpt / _WEIGHTS[bool(ema)]
    if current.is_file() or (ckpt / "checkpoint.json").is_file():
        return current
    return ckpt / _LEGACY_WEIGHTS[bool(ema)]


def weights_sha256(weights: PathLike) -> str:
    """SHA-256 of the weights file ``weights``, hashed once per file version (an eval sweep
    asks for it once per sampler and step count)."""
    path = Path(weights).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, mtime_ns: int, size: int) -> str:  # keyed by the file's version
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path, fmt: str, key: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); delete it and fit again") from e
    if not isinstance(data, dict) or data.get("format") != fmt or not isinstance(
            data.get(key), dict):
        got = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a difflab fits file (format {got!r}, expected "
                         f"{fmt!r}); delete it and fit again")
    return data[key]


def _entries(ckpt: Path) -> dict[str, dict[str, Any]]:
    """Every stored entry of ``ckpt`` by key: grids.json's, overridden by fits.json's."""
    entries: dict[str, dict[str, Any]] = {}
    if (ckpt / LEGACY_GRIDS).is_file():
        entries.update(_read_json(ckpt / LEGACY_GRIDS, _LEGACY_FORMAT, "grids"))
    if (ckpt / FITS).is_file():
        entries.update(_read_json(ckpt / FITS, FORMAT, "fits"))
    return entries


def save_fit(ckpt_dir: PathLike, fit: Fit, *, ema: bool = True,
             weights: PathLike | None = None) -> Path:
    """Add (or replace) ``fit`` in ``ckpt_dir/fits.json`` for the EMA (or raw) weights,
    recording the weights' SHA-256 in it; returns the file's path."""
    ckpt = Path(ckpt_dir)
    sha = weights_sha256(weights if weights is not None else weights_file(ckpt, ema))
    entries = _entries(ckpt)
    entries[fit_key(fit.sampler, fit.steps, ema)] = fit.with_(weights_sha256=sha).to_json()
    data = {"format": FORMAT, "fits": entries}
    path = ckpt / FITS
    return files.write_json(path, data, indent=1, what="fits file")


def remove_fit(ckpt_dir: PathLike, sampler: str, steps: int, ema: bool = True) -> bool:
    """Remove the ``sampler`` fit for ``steps`` (EMA or raw weights) from ``fits.json``;
    whether there was one."""
    ckpt = Path(ckpt_dir)
    entries = _entries(ckpt)
    if entries.pop(fit_key(sampler, steps, ema), None) is None:
        return False
    files.write_json(ckpt / FITS, {"format": FORMAT, "fits": entries}, indent=1,
                     what="fits file")
    return True


def load_fit(ckpt_dir: PathLike, sampler: str, steps: int, ema: bool = True, *,
             weights: PathLike | None = None, strict: bool = False) -> Fit | None:
    """The fit of ``sampler`` at ``steps`` stored in ``ckpt_dir`` for these weights (EMA or
    raw), or None: none stored, or one fitted to other weights (then with a warning; with
    ``strict``, where the caller asked for this very fit, a ValueError)."""
    ckpt = Path(ckpt_dir)
    entry = _entries(ckpt).get(fit_key(sampler, steps, ema))
    if entry is None:
        return None
    sha = weights_sha256(weights if weights is not None else weights_file(ckpt, ema))
    if entry.get("weights_sha256") != sha:
        if strict:
            raise ValueError(f"{ckpt}: the {sampler} {steps}-step fit was made for other "
                             "weights (sha256 differs: the checkpoint changed since); refusing "
                             "to run it. Fit it again (difflab tune-grid) or choose another "
                             "sampler")
        warnings.warn(f"{ckpt}: the {sampler} {steps}-step fit was tuned for other weights "
                      "(the checkpoint changed since); ignoring it. Fit it again.",
                      stacklevel=2)
        return None
    return Fit.from_json(entry)


def load_fits(ckpt_dir: PathLike, ema: bool = True, *,
              weights: PathLike | None = None) -> dict[int, Fit]:
    """The bespoke solvers stored in ``ckpt_dir`` for these weights, by step count (stale
    ones are left out with a warning)."""
    suffix = "/" + fit_key("", 0, ema).rsplit("/", 1)[-1]
    found = sorted(int(key.split("/")[1]) for key in _entries(Path(ckpt_dir))
                   if key.startswith("bespoke/") and key.endswith(suffix))
    fits = {}
    for steps in found:
        fit = load_fit(ckpt_dir, "bespoke", steps, ema, weights=weights)
        if fit is not None:
            fits[steps] = fit
    return fits


def choose_fit(ckpt_dir: PathLike, sampler: str | None, steps: int, *,
               spacing: str | None = None, ema: bool = True,
               weights: PathLike | None = None) -> Fit | None:
    """The stored fit that sampling a checkpoint runs (one decision for every caller: the
    CLI's ``sample`` and ``eval``, a UI): None when a fixed ``spacing`` is asked for; for
    ``sampler`` None or ``"auto"`` the bespoke solver fitted for ``steps``, else the tuned
    grid of :data:`~difflab.samplers.DEFAULT`; for a named sampler its tuned grid (for
    ``"bespoke"``, its fitted coefficients). None where nothing is stored for these weights.
    Pass the result on: ``difflab.sample(den, noise, sampler, steps, fit=fit)``."""
    if spacing is not None:
        return None
    if sampler is None or sampler == AUTO:
        fit = load_fit(ckpt_dir, "bespoke", steps, ema, weights=weights)
        if fit is not None:
            return fit
        sampler = DEFAULT
    # "bespoke" runs only with its fit: asked for by name, a stale fit is an error
    return load_fit(ckpt_dir, sampler, steps, ema, weights=weights,
                    strict=sampler == "bespoke")
