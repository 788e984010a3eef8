"""The network registry: ``build(config)`` rebuilds a network from its JSON config (see
:mod:`difflab.nets`)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

__all__ = ["build", "register", "count_parameters", "NET_TYPES"]

NET_TYPES: dict[str, type[nn.Module]] = {}
_BUILTIN = {"mlp": "difflab.nets.mlp", "unet": "difflab.nets.unet", "dit": "difflab.nets.dit",
            "classifier": "difflab.nets.classifier", "controlnet": "difflab.nets.controlnet",
            "controlled_unet": "difflab.nets.controlnet"}


def register(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``build({"type": name, ...})`` construct ``cls(**rest)``."""
    NET_TYPES[name] = cls
    return cls


def build(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its ``config`` (e.g. read back from JSON)."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a network config is a dict with a 'type' key, got {config!r}")
    cfg = dict(config)
    kind = cfg.pop("type")
    if kind not in NET_TYPES:
        module = _BUILTIN.get(kind, f"difflab.nets.{kind}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    if kind not in NET_TYPES:
        valid = sorted(set(NET_TYPES) | set(_BUILTIN))
        raise ValueError(f"unknown network type {kind!r}; valid: {valid}")
    cls = NET_TYPES[kind]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid_keys = [k for k in params if k != "self"]
        unknown = sorted(set(cfg) - set(valid_keys))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for network type {kind!r}; "
                             f"valid: {valid_keys}")
    return cls(**cfg)


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (scalars) of ``net``."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)
