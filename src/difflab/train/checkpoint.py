"""Checkpoints: safetensors for every tensor, JSON for everything else, atomic on disk.

A checkpoint is a directory::

    config.json            net, schedule, prediction, sigma_data, data, train (rebuilds the model)
    model.safetensors      the trained weights
    ema.safetensors        their exponential moving average (what sampling uses by default)
    optimizer.safetensors  optimizer state flattened to named tensors "state.<param>.<name>"
    state.json             step, EMA updates, RNG and data-order state, optimizer hyper-parameters

Nothing is ever unpickled. A save writes a fresh temporary directory (each file flushed and
fsync'ed), then swaps it in with ``os.replace``; if the save fails midway, the temporary
directory is removed and the previous checkpoint is untouched. Between the two renames of the
swap the old checkpoint sits at ``.<name>.old``; :func:`resolve` moves it back if a crash
happened exactly there.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["save_checkpoint", "load_checkpoint", "load_denoiser", "build_net", "resolve",
           "flatten_optimizer_state", "unflatten_optimizer_state", "generator_state_to_json",
           "generator_state_from_json", "CONFIG", "MODEL", "EMA", "OPTIMIZER", "STATE"]

CONFIG, MODEL, EMA, OPTIMIZER, STATE = (
    "config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


# --- low-level, atomic writing ------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Write bytes and fsync them (the one place that touches the disk; tests patch it)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tensors_bytes(tensors: dict[str, Tensor], kind: str) -> bytes:
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save(flat, metadata={"format": "pt", "difflab": kind})


def _old_path(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path`` (a checkpoint or a run directory holding
    ``checkpoint/``), recovering a swap interrupted between its two renames."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        old = _old_path(cand)
        if not cand.exists() and old.is_dir():
            os.replace(old, cand)
    if (p / "checkpoint" / MODEL).is_file() and not (p / MODEL).is_file():
        return p / "checkpoint"
    return p


def save_checkpoint(path: str | os.PathLike, *, config: dict[str, Any],
                    model: dict[str, Tensor], ema: dict[str, Tensor] | None = None,
                    optimizer: dict[str, Tensor] | None = None,
                    state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring).

    Raises OSError naming the checkpoint when the disk refuses a write; the previous
    checkpoint at ``path`` is then left exactly as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    files: list[tuple[str, bytes]] = [
        (CONFIG, json.dumps(config, indent=2, sort_keys=True).encode()),
        (MODEL, _tensors_bytes(model, "model")),
    ]
    if ema is not None:
        files.append((EMA, _tensors_bytes(ema, "ema")))
    if optimizer is not None:
        files.append((OPTIMIZER, _tensors_bytes(optimizer, "optimizer")))
    if state is not None:
        files.append((STATE, json.dumps(state, indent=1, sort_keys=True).encode()))
    try:
        tmp.mkdir()
        for name, data in files:
            _write_file(tmp / name, data)
        _fsync_dir(tmp)
        old = _old_path(final)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = "the previous checkpoint there is intact" if final.exists() else \
            "no previous checkpoint existed"
        raise OSError(e.errno, f"could not save checkpoint {final}: {e.strerror or e}; "
                               f"{prev}. Free disk space or choose another --out") from e
    return final


# --- reading --------------------------------------------------------------------------------
def _check_not_pickle(p: Path) -> None:
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(2)
        is_pickle = p.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or \
            head == b"PK"  # torch.save zip archives hold a pickle
        if is_pickle:
            raise ValueError(
                f"{p} looks like a pickle/torch.save file; difflab never loads pickle (it can "
                "run arbitrary code). Give a difflab checkpoint directory (config.json + "
                "model.safetensors), or convert the weights once in a trusted session with "
                "torch.load(..., weights_only=True) and safetensors.torch.save_file.")
        raise ValueError(f"{p} is a file; a difflab checkpoint is a directory holding "
                         f"{CONFIG} and {MODEL}")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated: "
                         f"{e}); re-save it or use an earlier checkpoint") from e


def load_checkpoint(path: str | os.PathLike, *, optimizer: bool = False
                    ) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]], dict[str, Any]]:
    """(config, tensors, state): tensors has "model", "ema" (if saved) and "optimizer" (if
    asked for); state is state.json ({} if absent)."""
    p = Path(path)
    _check_not_pickle(p)
    p = resolve(p)
    if not p.exists():
        raise FileNotFoundError(
            f"no checkpoint at {p}; give the directory written by `difflab train --out DIR` "
            f"(DIR or DIR/checkpoint, holding {CONFIG} and {MODEL})")
    cfg_path = p / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{p} has no {CONFIG}; a difflab checkpoint directory holds "
                                f"{CONFIG} and {MODEL}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    for key in ("net", "schedule", "prediction"):
        if key not in config:
            raise ValueError(f"{cfg_path} lacks the {key!r} entry; it is not a difflab "
                             "checkpoint config")
    tensors = {"model": _read_tensors(p / MODEL)}
    if (p / EMA).is_file():
        tensors["ema"] = _read_tensors(p / EMA)
    if optimizer:
        tensors["optimizer"] = _read_tensors(p / OPTIMIZER)
    state = json.loads((p / STATE).read_text()) if (p / STATE).is_file() else {}
    return config, tensors, state


def build_net(net_config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its config with :func:`difflab.nets.build`."""
    from difflab import nets

    return nets.build(dict(net_config))


def load_weights(net: nn.Module, weights: dict[str, Tensor], *, source: str,
                 net_type: str) -> None:
    """``net.load_state_dict`` with an error that says what does not match."""
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: checkpoint {tuple(weights[k].shape)} vs net {tuple(own[k].shape)}"
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise ValueError(
            f"weights in {source} do not fit the network of config.json (net type "
            f"{net_type!r}): " + "; ".join(parts) + ". The config.json and the weights come "
            "from different models; use the config.json saved with these weights.")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def load_denoiser(path: str | os.PathLike, ema: bool = True,
                  device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """(Denoiser, config) from a checkpoint directory (or a run directory).

    ``ema=True`` loads the averaged weights (what one samples with), ``False`` the raw ones.
    The bespoke solvers fitted to those weights (``grids.json``: at the end of ``difflab
    train`` with ``train.fit_steps``, or by ``difflab tune-grid --sampler bespoke``) come as
    ``denoiser.solvers``, which ``difflab.sample`` uses by default.
    """
    from difflab.denoiser import Denoiser
    from difflab.schedules import from_config

    config, tensors, _ = load_checkpoint(path)
    key = "ema" if ema else "model"
    if key not in tensors:
        raise FileNotFoundError(f"{resolve(path)} has no {EMA}; load the raw weights with "
                                "ema=False (CLI: --no-ema)")
    net = build_net(config["net"])
    load_weights(net, tensors[key], source=str(resolve(path) / (EMA if ema else MODEL)),
                 net_type=str(config["net"].get("type")))
    net.eval().requires_grad_(False)
    schedule = from_config(config["schedule"])
    den = Denoiser(net, schedule, prediction=config["prediction"],
                   sigma_data=float(config.get("sigma_data", 0.5)))
    from difflab.train.grids import fitted_solvers

    den.solvers.update(fitted_solvers(path, ema))
    return den.to(device), config


# --- optimizer and RNG state as named tensors / JSON --------------------------------------
def flatten_optimizer_state(opt_state: dict[str, Any]) -> tuple[dict[str, Tensor], dict]:
    """torch optimizer ``state_dict()`` -> (named tensors, JSON-safe rest).

    Tensors become "state.<param index>.<name>"; non-tensor per-parameter values and the
    param_groups go to the JSON part.
    """
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in opt_state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], rest: dict) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def generator_state_to_json(g: torch.Generator) -> str:
    return base64.b64encode(g.get_state().numpy().tobytes()).decode("ascii")


def generator_state_from_json(g: torch.Generator, text: str) -> torch.Generator:
    data = bytearray(base64.b64decode(text))
    g.set_state(torch.frombuffer(data, dtype=torch.uint8).clone())
    return g
