"""Networks: nn.Modules only (DESIGN.md). Each takes ``forward(x, t, cond=None)`` with t the
(B,) network time (``schedule.net_time(t)``) and cond (B,) long class labels (label
``num_classes`` is the learned null label) or None, and has a JSON-safe ``config`` dict with
a "type" from which :func:`build` rebuilds it.

    net = difflab.nets.build({"type": "unet", "in_channels": 1, "model_channels": 32})
    same = difflab.nets.build(json.loads(json.dumps(net.config)))

Types: "mlp", "unet", "dit", "classifier". Other modules add types with :func:`register`;
:func:`build` imports ``difflab.nets.<type>`` for a type it does not know yet.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

__all__ = ["build", "register", "count_parameters", "NET_TYPES", "describe"]

NET_TYPES: dict[str, type[nn.Module]] = {}
_BUILTIN = {"mlp": "difflab.nets.mlp", "unet": "difflab.nets.unet", "dit": "difflab.nets.dit",
            "classifier": "difflab.nets.classifier"}


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


def describe(net: nn.Module) -> str:
    """One line: type and parameter count, e.g. 'unet: 1.23M parameters'."""
    kind = getattr(net, "config", {}).get("type", type(net).__name__)
    return f"{kind}: {count_parameters(net) / 1e6:.2f}M parameters"


# the built-in types register themselves on import (cheap: torch only)
from difflab.nets.classifier import EncoderClassifier  # noqa: E402
from difflab.nets.dit import DiT  # noqa: E402
from difflab.nets.mlp import MLP  # noqa: E402
from difflab.nets.unet import UNet, UNetEncoder  # noqa: E402

__all__ += ["DiT", "EncoderClassifier", "MLP", "UNet", "UNetEncoder"]
