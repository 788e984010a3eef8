"""Fits stored beside a checkpoint's weights: ``CKPT/fits.json``.

    {"format": "difflab-fits-1",
     "fits": {"unipc/10/ema": {"sampler": "unipc", "ts": [...], "eval_ts": [...],
                               "weights_sha256": "...", "rmse": ..., ...},
              "bespoke/10/ema": {"sampler": "bespoke", "coeffs": [[...], ...], ...}}}

One entry per sampler, step count and weights (``ema`` or ``model``), each a
:meth:`Fit.to_json <difflab.fitting.Fit.to_json>`. A fit for guided sampling has the guidance
as a fourth part (:func:`guidance_tag`): ``"bespoke/10/ema/cfg=2"`` is the fit of a
class-conditional model sampled with classifier-free guidance of weight w = 2 (``cfg=0``: its
conditional model unguided). Guidance changes the ODE, so a fit serves only the guidance it
was made for, and an unguided model's fit (three parts) never runs guided.

A fit belongs to the weights it was fitted to: its entry records the SHA-256 of the weights
file, and a lookup for weights that changed since (training resumed) ignores it with a
warning. The file is replaced atomically (written
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

__all__ = ["FITS", "FORMAT", "LEGACY_GRIDS", "fit_key", "guidance_tag", "weights_file",
           "weights_sha256",
           "save_fit", "remove_fit", "load_fit", "load_fits", "choose_fit"]

FITS = "fits.json"
FORMAT = "difflab-fits-1"
LEGACY_GRIDS = "grids.json"  # the same entries, written before fits.json
_LEGACY_FORMAT = "difflab-grids-1"
_WEIGHTS = {True: "net.ema.safetensors", False: "net.safetensors"}  # difflab-checkpoint-2
_LEGACY_WEIGHTS = {True: "ema.safetensors", False: "model.safetensors"}  # the earlier layout

PathLike = str | os.PathLike


def guidance_tag(cfg: float = 0.0, rescale: float = 0.0) -> str:
    """The guidance part of a fit's key for a class-conditional model sampled with
    classifier-free guidance of weight ``cfg`` (w-convention; 0: the conditional model
    unguided) and rescale ``rescale``: ``"cfg=2"``, ``"cfg=2,rescale=0.7"``."""
    tag = f"cfg={float(cfg):g}"
    return tag if not rescale else f"{tag},rescale={float(rescale):g}"


def fit_key(sampler: str, steps: int, ema: bool = True, guidance: str | None = None) -> str:
    """The entry name of a fit: ``"<sampler>/<steps>/<ema|model>"``, and ``"/<guidance>"``
    for guided sampling (:func:`guidance_tag`)."""
    key = f"{sampler}/{int(steps)}/{'ema' if ema else 'model'}"
    return key if guidance is None else f"{key}/{guidance}"


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
             weights: PathLike | None = None, guidance: str | None = None) -> Path:
    """Add (or replace) ``fit`` in ``ckpt_dir/fits.json`` for the EMA (or raw) weights and
    the ``guidance`` it was fitted for (:func:`guidance_tag`; None: an unguided model),
    recording the weights' SHA-256 in it; returns the file's path."""
    ckpt = Path(ckpt_dir)
    sha = weights_sha256(weights if weights is not None else weights_file(ckpt, ema))
    entries = _entries(ckpt)
    key = fit_key(fit.sampler, fit.steps, ema, guidance)
    entries[key] = fit.with_(weights_sha256=sha).to_json()
    data = {"format": FORMAT, "fits": entries}
    path = ckpt / FITS
    return files.write_json(path, data, indent=1, what="fits file")


def remove_fit(ckpt_dir: PathLike, sampler: str, steps: int, ema: bool = True,
               guidance: str | None = None) -> bool:
    """Remove the ``sampler`` fit for ``steps`` (EMA or raw weights, ``guidance``) from
    ``fits.json``; whether there was one."""
    ckpt = Path(ckpt_dir)
    entries = _entries(ckpt)
    if entries.pop(fit_key(sampler, steps, ema, guidance), None) is None:
        return False
    files.write_json(ckpt / FITS, {"format": FORMAT, "fits": entries}, indent=1,
                     what="fits file")
    return True


def load_fit(ckpt_dir: PathLike, sampler: str, steps: int, ema: bool = True, *,
             weights: PathLike | None = None, strict: bool = False,
             guidance: str | None = None) -> Fit | None:
    """The fit of ``sampler`` at ``steps`` stored in ``ckpt_dir`` for these weights (EMA or
    raw) and this ``guidance`` (:func:`guidance_tag`; None: unguided), or None: none stored,
    or one fitted to other weights (then with a warning; with ``strict``, where the caller
    asked for this very fit, a ValueError)."""
    ckpt = Path(ckpt_dir)
    entry = _entries(ckpt).get(fit_key(sampler, steps, ema, guidance))
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


def load_fits(ckpt_dir: PathLike, ema: bool = True, *, weights: PathLike | None = None,
              guidance: str | None = None) -> dict[int, Fit]:
    """The bespoke solvers stored in ``ckpt_dir`` for these weights and ``guidance``, by step
    count (stale ones are left out with a warning)."""
    found = []
    for key in _entries(Path(ckpt_dir)):
        parts = key.split("/")
        if parts[0] == "bespoke" and parts[1].isdigit() and \
                key == fit_key("bespoke", int(parts[1]), ema, guidance):
            found.append(int(parts[1]))
    fits = {}
    for steps in sorted(found):
        fit = load_fit(ckpt_dir, "bespoke", steps, ema, weights=weights, guidance=guidance)
        if fit is not None:
            fits[steps] = fit
    return fits


def choose_fit(ckpt_dir: PathLike, sampler: str | None, steps: int, *,
               spacing: str | None = None, ema: bool = True,
               weights: PathLike | None = None, guidance: str | None = None) -> Fit | None:
    """The stored fit that sampling a checkpoint runs (one decision for every caller: the
    CLI's ``sample`` and ``eval``, a UI): None when a fixed ``spacing`` is asked for; for
    ``sampler`` None or ``"auto"`` the bespoke solver fitted for ``steps``, else the tuned
    grid of :data:`~difflab.samplers.DEFAULT`; for a named sampler its tuned grid (for
    ``"bespoke"``, its fitted coefficients). None where nothing is stored for these weights
    and this ``guidance`` (:func:`guidance_tag`; None: an unguided model). Pass the result
    on: ``difflab.sample(den, noise, sampler, steps, fit=fit)``."""
    if spacing is not None:
        return None
    if sampler is None or sampler == AUTO:
        fit = load_fit(ckpt_dir, "bespoke", steps, ema, weights=weights, guidance=guidance)
        if fit is not None:
            return fit
        sampler = DEFAULT
    # "bespoke" runs only with its fit: asked for by name, a stale fit is an error
    return load_fit(ckpt_dir, sampler, steps, ema, weights=weights,
                    strict=sampler == "bespoke", guidance=guidance)
