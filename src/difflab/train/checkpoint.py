"""Checkpoints: safetensors for every tensor, JSON for everything else, atomic on disk.

A checkpoint is a directory (format ``difflab-checkpoint-2``)::

    checkpoint.json               {"format": "difflab-checkpoint-2", "kind": "diffusion" |
                                   "classifier" | "feature" | ..., "components": [names],
                                   "config": the whole config it was trained with,
                                   "references": {name: {"path", "sha256"}}}
    <component>.json              the component's config (rebuilds it: a network config for
                                  difflab.nets.build, a schedule config, ...)
    <component>.safetensors       its trained weights (only trained components have weights)
    <component>.ema.safetensors   their exponential moving average (what sampling uses)
    optimizer.safetensors         optimizer state flattened to named tensors "state.<i>.<name>"
    state.json                    step, EMA updates, RNG and data-order state, optimizer
                                  hyper-parameters (what a bit-identical resume needs)

A diffusion checkpoint has the components ``net`` and ``schedule``; a classifier ``net`` and
``schedule`` (the schedule it was trained for); a feature network ``net``. A module that was
used but not trained (a frozen teacher, a base model) is not stored: ``references`` names it
with the SHA-256 of its weights (:func:`module_sha256`). Fitted solvers
live beside, in ``fits.json`` (:mod:`difflab.fitting`).

One loader, :func:`load`, dispatches on ``kind``; :func:`load_denoiser` is its diffusion case.
Checkpoints of the earlier layout (``config.json`` + ``model.safetensors`` +
``ema.safetensors`` + ``optimizer.safetensors`` + ``state.json``) load and resume as before.

Nothing is ever unpickled. A save writes a fresh temporary directory (each file flushed and
fsync'ed), then swaps it in with ``os.replace``; if the save fails midway, the temporary
directory is removed and the previous checkpoint is untouched. Between the two renames of the
swap the old checkpoint sits at ``.<name>.old``; :func:`resolve` moves it back if a crash
happened exactly there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import difflab.files as files

__all__ = ["save", "save_checkpoint", "read", "load", "load_denoiser", "build_net",
           "build_denoiser", "denoiser_parts", "load_weights", "resolve", "is_checkpoint",
           "read_config", "weights_file", "module_sha256", "register_kind", "Component",
           "Checkpoint",
           "flatten_optimizer_state", "unflatten_optimizer_state", "generator_state_to_json",
           "generator_state_from_json", "FORMAT", "CHECKPOINT", "OPTIMIZER", "STATE",
           "LEGACY_CONFIG", "LEGACY_MODEL", "LEGACY_EMA"]

FORMAT = "difflab-checkpoint-2"
CHECKPOINT, OPTIMIZER, STATE = "checkpoint.json", "optimizer.safetensors", "state.json"
# the layout before difflab-checkpoint-2 (read, never written)
LEGACY_CONFIG, LEGACY_MODEL, LEGACY_EMA = "config.json", "model.safetensors", "ema.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def weights_name(component: str, ema: bool = False) -> str:
    """``<component>.safetensors`` or ``<component>.ema.safetensors``."""
    return f"{component}.ema.safetensors" if ema else f"{component}.safetensors"


# --- low-level, atomic writing (difflab.files: the one writer) ----------------------------
def _tensors_bytes(tensors: dict[str, Tensor], kind: str) -> bytes:
    return files.safetensors_bytes(tensors, {"format": "pt", "difflab": kind})


def _json_bytes(obj: Any, indent: int = 2) -> bytes:
    return json.dumps(obj, indent=indent, sort_keys=True).encode()


def module_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state (weights and buffers): over the names in sorted order, each
    name, dtype, shape and the little-endian bytes of its values. What a checkpoint's
    ``references`` record for a module it used but did not store."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        v = value.detach().to("cpu").contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _old_path(path: Path) -> Path:
    return files.old_path(path)


def _layout(p: Path) -> int | None:
    """2 for this format, 1 for the earlier layout, None for neither."""
    if (p / CHECKPOINT).is_file():
        return 2
    if (p / LEGACY_CONFIG).is_file() and (p / LEGACY_MODEL).is_file():
        return 1
    return None


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path`` (a checkpoint or a run directory holding
    ``checkpoint/``), recovering a swap interrupted between its two renames."""
    p = Path(path)
    for cand in (p, p / "checkpoint"):
        old = _old_path(cand)
        if not cand.exists() and old.is_dir():
            os.replace(old, cand)
    if _layout(p) is None and _layout(p / "checkpoint") is not None:
        return p / "checkpoint"
    return p


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint (either layout) or a run directory holding one."""
    p = Path(path)
    return p.is_dir() and _layout(resolve(p)) is not None


@dataclass
class Component:
    """One named part of a checkpoint: its config, and for a trained one its weights and
    their EMA."""

    config: dict[str, Any]
    weights: dict[str, Tensor] | None = None
    ema: dict[str, Tensor] | None = None


def save(path: str | os.PathLike, *, kind: str, config: dict[str, Any],
         components: dict[str, Component], optimizer: dict[str, Tensor] | None = None,
         state: dict[str, Any] | None = None,
         references: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a checkpoint directory atomically (see the module docstring).

    Raises OSError naming the checkpoint when the disk refuses a write; the previous
    checkpoint at ``path`` is then left exactly as it was.
    """
    if not components:
        raise ValueError("a checkpoint needs at least one component")
    final = Path(path)
    head = {"format": FORMAT, "kind": kind, "components": list(components), "config": config,
            "references": references or {}}
    entries: list[tuple[str, bytes]] = [(CHECKPOINT, _json_bytes(head))]
    for name, comp in components.items():
        if not name or "/" in name or name.startswith(".") or name in ("checkpoint",
                                                                        "optimizer", "state"):
            raise ValueError(f"invalid component name {name!r}")
        entries.append((f"{name}.json", _json_bytes(comp.config)))
        if comp.weights is not None:
            entries.append((weights_name(name), _tensors_bytes(comp.weights, name)))
        if comp.ema is not None:
            entries.append((weights_name(name, ema=True), _tensors_bytes(comp.ema, f"{name}.ema")))
    if optimizer is not None:
        entries.append((OPTIMIZER, _tensors_bytes(optimizer, "optimizer")))
    if state is not None:
        entries.append((STATE, _json_bytes(state, indent=1)))
    return _write_dir(final, entries)


def _write_dir(final: Path, entries: list[tuple[str, bytes]]) -> Path:
    return files.write_dir(final, entries, what="checkpoint")


def save_checkpoint(path: str | os.PathLike, *, config: dict[str, Any],
                    model: dict[str, Tensor], ema: dict[str, Tensor] | None = None,
                    optimizer: dict[str, Tensor] | None = None,
                    state: dict[str, Any] | None = None) -> Path:
    """Save a one-network checkpoint: component ``net`` (``config["net"]``, ``model``
    weights, ``ema``) and, when the config has one, the ``schedule`` component; the kind is
    ``config["kind"]`` (default "diffusion")."""
    components = {"net": Component(dict(config["net"]), model, ema)}
    if config.get("schedule") is not None:
        components["schedule"] = Component(dict(config["schedule"]))
    return save(path, kind=str(config.get("kind", "diffusion")), config=config,
                components=components, optimizer=optimizer, state=state)


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
                "run arbitrary code). Give a difflab checkpoint directory (checkpoint.json + "
                "safetensors files), or convert the weights once in a trusted session with "
                "torch.load(..., weights_only=True) and safetensors.torch.save_file.")
        raise ValueError(f"{p} is a file; a difflab checkpoint is a directory holding "
                         f"{CHECKPOINT} (or, from earlier versions, {LEGACY_CONFIG} and "
                         f"{LEGACY_MODEL})")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated: "
                         f"{e}); re-save it or use an earlier checkpoint") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e


@dataclass
class Checkpoint:
    """A checkpoint as read from disk (:func:`read`): its kind, config, components and
    references; the tensors are read on demand."""

    path: Path
    kind: str
    config: dict[str, Any]
    components: list[str]
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: int = 2  # 1: the earlier config.json + model.safetensors layout

    def component_config(self, name: str) -> dict[str, Any]:
        if name not in self.components:
            raise KeyError(f"{self.path} has no component {name!r}; it has {self.components}")
        if self.layout == 1:
            return dict(self.config[name])
        cfg = _read_json(self.path / f"{name}.json")
        if not isinstance(cfg, dict):
            raise ValueError(f"{self.path / f'{name}.json'} is not a JSON object; the checkpoint "
                             "is corrupt")
        return cfg

    def weights_file(self, name: str = "net", ema: bool = False) -> Path:
        if self.layout == 1:
            if name != "net":
                raise KeyError(f"{self.path} (earlier layout) has weights only for 'net'")
            return self.path / (LEGACY_EMA if ema else LEGACY_MODEL)
        return self.path / weights_name(name, ema)

    def has_weights(self, name: str = "net", ema: bool = False) -> bool:
        try:
            return self.weights_file(name, ema).is_file()
        except KeyError:
            return False

    def weights(self, name: str = "net", ema: bool = False) -> dict[str, Tensor]:
        return _read_tensors(self.weights_file(name, ema))

    def optimizer(self) -> dict[str, Tensor]:
        return _read_tensors(self.path / OPTIMIZER)

    def state(self) -> dict[str, Any]:
        p = self.path / STATE
        return _read_json(p) if p.is_file() else {}


def read(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at ``path`` (a checkpoint directory of either layout, or a run directory
    holding ``checkpoint/``); raises FileNotFoundError / ValueError saying what is wrong."""
    p = Path(path)
    _check_not_pickle(p)
    p = resolve(p)
    if not p.exists():
        raise FileNotFoundError(
            f"no checkpoint at {p}; give the directory a training run wrote (its output "
            f"directory, or the checkpoint/ inside it, holding {CHECKPOINT})")
    if (p / CHECKPOINT).is_file():
        head = _read_json(p / CHECKPOINT)
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            fmt = head.get("format") if isinstance(head, dict) else None
            raise ValueError(f"{p / CHECKPOINT} has format {fmt!r}; this difflab reads "
                             f"{FORMAT!r} (and the earlier config.json layout)")
        for key, kind in (("kind", str), ("components", list), ("config", dict)):
            if key not in head:
                raise ValueError(f"{p / CHECKPOINT} lacks the {key!r} entry; the checkpoint "
                                 "is corrupt")
            if not isinstance(head[key], kind) or (key == "components" and not all(
                    isinstance(c, str) for c in head[key])):
                raise ValueError(f"{p / CHECKPOINT}: its {key!r} entry has the wrong type "
                                 f"({type(head[key]).__name__}); the checkpoint is corrupt")
        return Checkpoint(p, str(head["kind"]), head["config"], list(head["components"]),
                          dict(head.get("references") or {}), 2)
    cfg_path = p / LEGACY_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{p} has no {CHECKPOINT}; a difflab checkpoint directory "
                                f"holds {CHECKPOINT} (or, from earlier versions, "
                                f"{LEGACY_CONFIG} and {LEGACY_MODEL})")
    config = _read_json(cfg_path)
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} is not a JSON object; it is not a difflab checkpoint "
                         "config")
    kind = str(config.get("kind", "diffusion"))
    required = ("net", "schedule", "prediction") if kind == "diffusion" else ("net",)
    for key in required:
        if key not in config:
            raise ValueError(f"{cfg_path} lacks the {key!r} entry; it is not a difflab "
                             "checkpoint config")
    components = ["net"] + (["schedule"] if "schedule" in config else [])
    return Checkpoint(p, kind, config, components, {}, 1)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config a checkpoint was trained with (``"kind"`` included), either layout."""
    ck = read(path)
    return {"kind": ck.kind, **ck.config}


def weights_file(path: str | os.PathLike, ema: bool = True, component: str = "net") -> Path:
    """The file holding a component's (EMA) weights, either layout (what a fit records the
    hash of)."""
    return read(path).weights_file(component, ema)


def build_net(net_config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its config with :func:`difflab.nets.build`."""
    from difflab import nets

    return nets.build(dict(net_config))


def denoiser_parts(config: dict[str, Any]) -> tuple[Any, Any]:
    """(schedule, parameterisation) a diffusion config names: ``config["schedule"]``,
    ``config["prediction"]`` (with ``config["sigma_data"]`` for EDM). The one place these
    config entries become objects (:func:`build_denoiser`, the trainer's objective)."""
    from difflab.denoiser.parameterization import from_config as parameterization_from_config
    from difflab.denoiser.parameterization import get as get_parameterization
    from difflab.schedules import from_config

    prediction = config.get("prediction", "eps")
    if isinstance(prediction, dict):  # a parameterisation's config (a consistency model's)
        return from_config(config["schedule"]), parameterization_from_config(prediction)
    kw = {"sigma_data": float(config.get("sigma_data", 0.5))} if prediction == "edm" else {}
    return from_config(config["schedule"]), get_parameterization(prediction, **kw)


def build_denoiser(config: dict[str, Any], net: nn.Module | None = None) -> Any:
    """The Denoiser a diffusion config describes: ``net`` (default: built from
    ``config["net"]``) with the schedule and parameterisation of :func:`denoiser_parts`. The
    one place a denoiser is built from a config."""
    from difflab.denoiser import Denoiser

    schedule, parameterization = denoiser_parts(config)
    return Denoiser(build_net(config["net"]) if net is None else net, schedule,
                    parameterization, learned_variance=bool(config.get("learned_variance")))


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
            f"weights in {source} do not fit the network of its config (net type "
            f"{net_type!r}): " + "; ".join(parts) + ". The config and the weights come from "
            "different models; use the config saved with these weights.")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})


def _load_component(ck: Checkpoint, name: str, ema: bool, build: Callable[[dict], nn.Module],
                    *, strict_ema: bool) -> nn.Module:
    """Build component ``name`` and load its (EMA) weights; without an EMA file, the raw
    weights unless ``strict_ema``."""
    cfg = ck.component_config(name)
    if ema and not ck.has_weights(name, ema=True):
        if strict_ema:
            raise FileNotFoundError(f"{ck.path} has no {ck.weights_file(name, True).name}; "
                                    "load the raw weights with ema=False")
        ema = False
    module = build(cfg)
    load_weights(module, ck.weights(name, ema), source=str(ck.weights_file(name, ema)),
                 net_type=str(cfg.get("type")))
    return module.eval().requires_grad_(False)


def _load_diffusion(ck: Checkpoint, ema: bool, device: str | torch.device) -> tuple[Any, dict]:
    net = _load_component(ck, "net", ema, build_net, strict_ema=True)
    config = {**ck.config, "net": ck.component_config("net"),
              "schedule": ck.component_config("schedule")}
    denoiser = build_denoiser(config, net)
    if ck.has_weights("schedule"):  # a trained schedule (learned): its parameters
        load_weights(denoiser.schedule, ck.weights("schedule"),
                     source=str(ck.weights_file("schedule")),
                     net_type=str(config["schedule"].get("type")))
        denoiser.schedule.requires_grad_(False)
    return denoiser.to(device), {"kind": ck.kind, **ck.config}


def _load_net(build: Callable[[dict], nn.Module]) -> Callable:
    def loader(ck: Checkpoint, ema: bool, device: str | torch.device) -> tuple[Any, dict]:
        net = _load_component(ck, "net", ema, build, strict_ema=False)
        return net.to(device), {"kind": ck.kind, **ck.config}
    return loader


#: kind -> loader(Checkpoint, ema, device) -> (built object, config)
_KINDS: dict[str, Callable[[Checkpoint, bool, Any], tuple[Any, dict]]] = {
    "diffusion": _load_diffusion,
    "classifier": _load_net(build_net),
    "consistency": _load_diffusion,  # a consistency model (difflab.train.distill) is a denoiser
}
#: the kinds whose checkpoint is a denoiser (net + schedule + prediction): load_denoiser reads them
DENOISER_KINDS = ("diffusion", "consistency")


#: modules that register a kind not built in, imported when a checkpoint of it is loaded
KIND_MODULES: dict[str, str] = {"controlnet": "difflab.train.controlnet",
                                "autoencoder": "difflab.train.t2i",
                                "text_to_image": "difflab.train.t2i"}


def register_kind(kind: str, loader: Callable[[Checkpoint, bool, Any], tuple[Any, dict]] | None
                  = None, *, build: Callable[[dict], nn.Module] | None = None) -> None:
    """Teach :func:`load` a checkpoint kind: a ``loader(checkpoint, ema, device) -> (object,
    config)``, or ``build(net_config) -> nn.Module`` for a kind with one network component."""
    if (loader is None) == (build is None):
        raise ValueError("register_kind takes a loader or a build function, not both")
    _KINDS[kind] = loader if loader is not None else _load_net(build)


def load(path: str | os.PathLike, *, ema: bool = True,
         device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """(object, config) from a checkpoint, dispatching on its kind: a diffusion checkpoint
    gives its Denoiser, a classifier checkpoint its network (eval mode, no gradients), a
    feature checkpoint its feature network (kind registered by
    :mod:`difflab.metrics.train_features`). ``ema=True`` loads the averaged weights (for a
    network trained without an EMA: its weights). The config includes ``"kind"``."""
    ck = read(path)
    if ck.kind not in _KINDS and ck.kind in KIND_MODULES:
        import importlib

        importlib.import_module(KIND_MODULES[ck.kind])
    if ck.kind not in _KINDS:
        hint = " (import difflab.metrics.train_features to read feature networks)" \
            if ck.kind == "feature" else ""
        raise ValueError(f"{ck.path} is a checkpoint of kind {ck.kind!r}, which this difflab "
                         f"cannot build{hint}; known kinds: {sorted(_KINDS)}")
    return _build(_KINDS[ck.kind], ck, ema, device)


def _build(loader: Callable, ck: Checkpoint, ema: bool, device: Any) -> tuple[Any, dict]:
    """``loader(ck, ema, device)``, a config of the wrong shape reported as a ValueError that
    names the checkpoint (never a TypeError from deep inside a constructor)."""
    try:
        return loader(ck, ema, device)
    except (TypeError, KeyError, AttributeError, IndexError, AssertionError,
            ZeroDivisionError, OverflowError) as e:
        raise ValueError(f"{ck.path}: cannot build the model from its config files "
                         f"({type(e).__name__}: {e}); the checkpoint is corrupt or not a difflab "
                         "checkpoint") from e


def load_denoiser(path: str | os.PathLike, ema: bool = True,
                  device: str | torch.device = "cpu") -> tuple[Any, dict[str, Any]]:
    """(Denoiser, config) from a diffusion checkpoint (or a run directory holding one).

    ``ema=True`` loads the averaged weights (what one samples with), ``False`` the raw ones.
    Fitted solvers are not attached: load them with :mod:`difflab.fitting` and pass them to
    ``difflab.sample`` explicitly.
    """
    ck = read(path)
    if ck.kind not in DENOISER_KINDS:
        raise ValueError(f"{ck.path} is a {ck.kind} checkpoint, not a diffusion model; load it "
                         "with difflab.train.checkpoint.load")
    return _build(_load_diffusion, ck, ema, device)


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
