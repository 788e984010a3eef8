"""One validation layer for what a user types: option values, config keys and values, devices
and the memory a request needs, all checked before any work; each failure a
:class:`~difflab.commands.common.ParameterError` naming the option (``param``) or the config
key as the user wrote it (``train.lr``), with the closest valid name where one is near
("unknown config key 'train.lrr'; did you mean train.lr?").

    check_number("max_minutes", 0, minimum=0, strict=True)   # max_minutes must be > 0
    check_overrides(config, ["train.lrr=1"])                   # did you mean train.lr?
    check_config(config)                                       # types, ranges, the net builds
    check_device("cuda")                                       # CUDA not available here
    check_memory(count, shape)                                 # fits in memory?
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from difflab.commands.common import ParameterError, param

__all__ = ["check_number", "check_device", "check_overrides", "config_keys", "check_config",
           "check_memory", "available_memory", "closest"]


def closest(name: str, valid: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``valid`` (difflib), else ``""``."""
    near = difflib.get_close_matches(name, sorted(set(valid)), n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


def _named(name: str) -> str:
    """A library parameter (marked for a front end to rename) or a config key (as written)."""
    return param(name) if name.isidentifier() else name


def check_number(name: str, value: Any, *, minimum: float | None = None, strict: bool = False,
                 integer: bool = False, maximum: float | None = None,
                 allow_none: bool = True) -> Any:
    """``value`` if it is a finite number (an int when ``integer``) >= ``minimum`` (> with
    ``strict``) and <= ``maximum``; else ParameterError naming parameter ``name``."""
    if value is None and allow_none:
        return value
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ParameterError(f"{_named(name)} must be {kind}, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ParameterError(f"{_named(name)} must be {'>' if strict else '>='} {minimum:g}, "
                             f"got {value!r}")
    if maximum is not None and value > maximum:
        raise ParameterError(f"{_named(name)} must be <= {maximum:g}, got {value!r}")
    return value


def check_device(device: Any, name: str = "device") -> Any:
    """``device`` if torch knows it and it is available here (None: the default device);
    else ParameterError naming ``name``."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ParameterError(f"unknown {param(name)} {device!r}; valid: cpu, cuda, cuda:N, "
                             "mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError(f"{param(name)} {device!r}: CUDA is not available on this "
                                 "machine (no GPU or a CPU-only torch); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError(f"{param(name)} {device!r}: this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ParameterError(f"{param(name)} {device!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise ParameterError(f"unsupported {param(name)} {device!r}; valid: cpu, cuda, "
                             "cuda:N, mps")
    return device


# --- config keys -----------------------------------------------------------------------------
def _constructor_keys(registry: dict[str, Any], kind: Any) -> list[str]:
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None:
        return []
    return [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "kwargs")]


DATA_KEYS = ("name", "resolution", "channels", "num_classes", "split", "n", "path", "captions",
             "caption_field", "latent", "text_encoder")


def config_keys(config: dict[str, Any]) -> set[str]:
    """Every dotted key a config may set: its own keys, a diffusion config's train keys (also
    those added since a resumed run was made), the constructor arguments of its network and
    schedule types, the data keys."""
    from difflab.nets.registry import NET_TYPES, build
    from difflab.schedules.base import SCHEDULE_TYPES

    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                keys.add(prefix + k)
                if prefix == "" or isinstance(v, dict):
                    walk(v, prefix + k + ".")

    walk(config, "")
    if config.get("kind", "diffusion") == "diffusion" and isinstance(config.get("train"), dict):
        from difflab.train.config import TRAIN_DEFAULTS

        keys.update(f"train.{k}" for k in TRAIN_DEFAULTS)  # keys newer than a resumed run
    net = config.get("net")
    if isinstance(net, dict):
        if net.get("type") not in NET_TYPES:
            try:
                build(dict(net))  # imports (registers) the net's module
            except Exception:  # noqa: BLE001 - only here to register the type
                pass
        keys.update(f"net.{k}" for k in _constructor_keys(NET_TYPES, net.get("type")))
    sched = config.get("schedule")
    if isinstance(sched, dict):
        keys.update(f"schedule.{k}" for k in _constructor_keys(SCHEDULE_TYPES, sched.get("type")))
        keys.add("schedule.kind")  # another family with its defaults (train.config.complete)
    if isinstance(config.get("data"), dict):
        keys.update(f"data.{k}" for k in DATA_KEYS)
    return keys


def check_overrides(config: dict[str, Any], overrides: Sequence[str],
                    name: str = "overrides") -> None:
    """Refuse an override ``KEY=VALUE`` whose key the config cannot have, naming the closest
    valid key ("did you mean train.lr?")."""
    from difflab.train.config import parse_override

    valid = config_keys(config)
    for text in overrides:
        try:
            parts, _ = parse_override(text)
        except ValueError as e:
            raise ParameterError(f"{param(name)}: {e}") from None
        key = ".".join(parts)
        if key in valid:
            continue
        # a new key below an existing dict-valued key (e.g. a nested option) is fine
        if len(parts) > 2 and ".".join(parts[:2]) in valid:
            continue
        raise ParameterError(f"{param(name)}: unknown config key {key!r}{closest(key, valid)}")


# --- config values ---------------------------------------------------------------------------
# what building a network or schedule from a config of wrong values raises
BAD_CONFIG = (ValueError, TypeError, RuntimeError, AssertionError, KeyError, ZeroDivisionError,
              IndexError, OverflowError, AttributeError)
_COUNT_WORDS = ("channels", "dim", "hidden", "depth", "blocks", "heads", "size", "width",
                "layers", "patch")


def _check_train(train: dict[str, Any]) -> None:
    from difflab.samplers import AUTO, names
    from difflab.train.config import check_values

    check_values(train)
    sampler = train.get("sampler", AUTO)
    if sampler != AUTO and sampler not in names():
        raise ParameterError(f"unknown train.sampler {sampler!r}{closest(str(sampler), names())}"
                             f" (valid: {AUTO}, {', '.join(names())})")


def _check_net(net: dict[str, Any]) -> None:
    for key, value in net.items():
        if key == "type":
            continue
        if isinstance(value, bool):
            continue
        counts = any(w in key for w in _COUNT_WORDS) and "dropout" not in key
        if counts and isinstance(value, (int, float)):
            check_number(f"net.{key}", value, minimum=1, integer=True, allow_none=False)
        if counts and isinstance(value, list):
            for v in value:
                if isinstance(v, (int, float)):
                    check_number(f"net.{key}", v, minimum=0, integer=True, allow_none=False)
        if key == "num_classes" and value is not None:
            check_number("net.num_classes", value, minimum=1, integer=True)
        if key == "dropout":
            check_number("net.dropout", value, minimum=0, maximum=0.999, allow_none=False)


def check_config(config: dict[str, Any], *, build: bool = True) -> dict[str, Any]:
    """Types and ranges of a training config's values (``train.*``, the network's counts) and,
    with ``build``, that its network and schedule can be built; ParameterError naming the key
    (``train.lr``, ``net.model_channels``)."""
    if not isinstance(config, dict):
        raise ParameterError(f"a config is a JSON object, got {type(config).__name__}")
    for section in ("net", "train", "data"):
        if section in config and not isinstance(config[section], dict):
            raise ParameterError(f"config section {section} must be a JSON object, got "
                                 f"{config[section]!r}")
    _check_train(config.get("train") or {})
    net = config.get("net")
    if isinstance(net, dict):
        _check_net(net)
    if build:
        import torch

        from difflab.train import checkpoint as ckpt

        if isinstance(net, dict):
            try:
                with torch.device("meta"):  # shapes only, no memory
                    n_params = sum(p.numel() for p in ckpt.build_net(net).parameters())
                need, have = 16 * n_params, available_memory()  # weights, grads, AdamW m, v
                if have is not None and need > have:
                    raise ParameterError(
                        f"config section net has {n_params:,} parameters: training needs "
                        f"about {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
                        "available; make the network smaller")
            except ParameterError:
                raise
            except Exception:  # noqa: BLE001 - a net that needs real tensors to build
                try:
                    ckpt.build_net(net)
                except BAD_CONFIG as e:
                    raise ParameterError(f"config section net cannot build a network: {e}") \
                        from None
        if isinstance(config.get("schedule"), dict):
            from difflab.schedules import from_config

            try:
                from_config(config["schedule"])
            except BAD_CONFIG as e:
                raise ParameterError("config section schedule is not a valid schedule: "
                                     f"{e}") from None
    return config


# --- memory ----------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(count: int, shape: Sequence[int], *, name: str = "count",
                 bytes_per_value: int = 4, copies: int = 2) -> int:
    """The bytes ``count`` samples of ``shape`` need in memory (``copies`` float32 copies: the
    samples and their converted output); ParameterError naming ``name`` when that exceeds the
    memory available."""
    per = bytes_per_value * math.prod(int(s) for s in shape) * copies
    need = int(count) * per
    have = available_memory()
    if have is not None and need > have:
        fit = max(1, have // max(per, 1) // 2)
        raise ParameterError(
            f"{param(name)} {count} samples of shape {tuple(shape)} need about "
            f"{need / 2**30:.1f} GiB of memory, more than the {have / 2**30:.1f} GiB available; "
            f"ask for at most ~{fit} per call (several calls with different seeds)")
    return need
