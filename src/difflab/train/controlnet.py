"""Training a ControlNet on the one trainer, and loading it back as a controlled denoiser.

    config  = controlnet_config("runs/fm_base", control="canny")
    summary = train_controlnet(config, "runs/fm_canny")            # resumable: resume=True
    den, cfg = load_controlnet("runs/fm_canny")                     # kind "controlnet"
    x = difflab.sample(den, noise, cond=Condition(control=edges))

The run's modules are ``"controlnet"`` (trained, with an EMA) and ``"base"`` (the base model's
U-Net with its EMA weights, frozen: no gradients, optimizer state or EMA copy). The base
checkpoint is only read: the ControlNet checkpoint references it by path and by the SHA-256 of
the weights it was trained against (:func:`~difflab.train.checkpoint.module_sha256`).

The control images are computed once, before training, for the whole training set by the named
preprocessor (``config["control"]``: ``{"preprocessor": "canny", "options": {"low": 100,
"high": 200}}``; :mod:`difflab.conditioning.control`) and become the data field ``"control"``
(bool for a binary signal such as Canny edges, else float in [0, 1]). Canny on Fashion-MNIST's
60,000 28x28 images takes about two seconds.

Checkpoint (kind ``"controlnet"``)::

    checkpoint.json     kind "controlnet", references {"base": {"path", "sha256"}}
    controlnet.json / .safetensors / .ema.safetensors        the ControlNet
    settings.json       its default ControlSettings (scale, guess_mode, interval)
    control.json        the preprocessor that made its training control images
    schedule.json       the base's schedule

:func:`load_controlnet` (also ``checkpoint.load`` for this kind) rebuilds the base from the
referenced path (or ``base=``), refuses a base whose weights hash differently, and returns the
base's denoiser around a :class:`~difflab.nets.controlnet.ControlledUNet`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import difflab.train.checkpoint as ckpt
from difflab.objectives import ControlNetObjective, get_weighting
from difflab.train.config import LOOP_DEFAULTS, check_loop, parse_override
from difflab.train.trainer import Trainer, load_training_data, register_objective

__all__ = ["controlnet_config", "control_images", "controlnet_trainer", "train_controlnet",
           "load_controlnet", "load_controlled", "load_base", "BaseMismatchError",
           "apply_config_overrides", "DEFAULT_CONTROL_OPTIONS"]

#: preprocessor options used when none are given (Canny thresholds on 8-bit grey)
DEFAULT_CONTROL_OPTIONS: dict[str, dict[str, Any]] = {"canny": {"low": 100.0, "high": 200.0}}

# the base's objective options a ControlNet trains with (its loss, as the base was trained)
_OBJECTIVE_KEYS = ("target", "weighting", "min_snr_gamma", "t_sampler")


class BaseMismatchError(ValueError):
    """A ControlNet given a base other than the one it was trained for."""


def load_base(path: str | os.PathLike, *, ema: bool = True, device: str | torch.device = "cpu"
              ) -> tuple[Any, dict[str, Any], Path]:
    """(denoiser, config, checkpoint directory) of a base diffusion model (run or checkpoint
    directory); a ValueError unless it is a diffusion model with a U-Net."""
    ck_dir = ckpt.resolve(path)
    ck = ckpt.read(ck_dir)
    if ck.kind != "diffusion":
        raise ValueError(f"base {path} is a {ck.kind} checkpoint; a ControlNet needs a diffusion "
                         "model with a U-Net (a run of `difflab train`)")
    den, config = ckpt.load_denoiser(ck_dir, ema=ema, device=device)
    if getattr(den.net, "config", {}).get("type") != "unet":
        raise ValueError(f"base {path} has a {den.net.config.get('type')!r} network; a "
                         "ControlNet needs a U-Net")
    return den, config, ck_dir.resolve()


def controlnet_config(base: str | os.PathLike, *, control: str = "canny",
                      control_options: dict[str, Any] | None = None,
                      hint_channels: Sequence[int] = (16, 32), ema: bool = True,
                      overrides: Sequence[str] = (), **train: Any) -> dict[str, Any]:
    """The config of a ControlNet run for the base model at ``base``.

    Its ``train`` section: the loop defaults (``LOOP_DEFAULTS``) with the base's batch size,
    learning rate / 2, seed and EMA decay, the base's loss options (target, weighting, t
    sampler), then ``train`` keyword arguments (``max_minutes=30``, ``steps=...``), then
    ``overrides`` (``"train.lr=5e-4"``, ``"settings.scale=0.8"``).
    """
    from difflab.conditioning.control import get

    den, bcfg, ck_dir = load_base(base, ema=ema)
    pre = get(control)
    options = dict(DEFAULT_CONTROL_OPTIONS.get(control, {}))
    options.update(control_options or {})
    channels = int(bcfg["data"].get("channels") or 1)
    btrain = bcfg.get("train", {})
    tc = {**LOOP_DEFAULTS, "steps": 100000, "log_every": 20}
    for key in ("batch_size", "seed", "ema_decay", "betas", "grad_clip", "precision"):
        if key in btrain:
            tc[key] = btrain[key]
    tc["lr"] = float(btrain.get("lr", 2e-3)) / 2
    tc["warmup"] = 50
    tc.update({k: btrain[k] for k in _OBJECTIVE_KEYS if k in btrain})
    tc.update({k: v for k, v in train.items() if v is not None})
    if not ema:
        tc["ema_decay"] = 0.0
    from difflab.nets.controlnet import ControlNet, ControlSettings

    cn_cfg = ControlNet(den.net.config, pre.out_channels(channels, **options),
                        hint_channels).config
    cfg = {"kind": "controlnet",
           "base": {"path": str(ck_dir), "ema": bool(ema)},
           "controlnet": cn_cfg,
           "control": {"preprocessor": control, "options": options},
           "settings": ControlSettings().to_config(),
           "schedule": bcfg["schedule"], "prediction": bcfg.get("prediction", "eps"),
           "sigma_data": float(bcfg.get("sigma_data", 0.5)),
           "data": copy.deepcopy(bcfg["data"]), "train": tc}
    return apply_config_overrides(cfg, overrides)


def apply_config_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of a ControlNet config with ``section.key=JSON`` overrides, checked."""
    from difflab.nets.controlnet import ControlSettings

    cfg = copy.deepcopy(config)
    for text in overrides:
        parts, value = parse_override(text)
        node = cfg
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    check_loop(cfg["train"])
    ControlSettings.of(cfg["settings"])  # validates
    return cfg


def control_images(images: Tensor, preprocessor: str | Callable[..., Tensor],
                   options: dict[str, Any] | None = None, *, batch_size: int = 4096) -> Tensor:
    """The control image of every image (uint8 NCHW, or float in [-1, 1]) by a named
    preprocessor (or a callable ``fn(images, **options)``), ``batch_size`` at a time: bool
    when every value is 0 or 1 (edges, masks), else float32 in [0, 1]."""
    from difflab.conditioning.control import get
    from difflab.data.dataset import to_float

    fn = get(preprocessor) if isinstance(preprocessor, str) else preprocessor
    chunks = []
    for i in range(0, len(images), batch_size):
        chunks.append(fn(to_float(images[i:i + batch_size]), **(options or {})).float().cpu())
    out = torch.cat(chunks)
    if bool(((out == 0) | (out == 1)).all()):
        return out.bool()
    return out


def _objective(config: dict[str, Any]) -> ControlNetObjective:
    tc = config["train"]
    schedule, parameterization = ckpt.denoiser_parts(config)
    return ControlNetObjective(
        schedule, parameterization, target=tc.get("target"),
        weighting=get_weighting(tc.get("weighting", "none"),
                                gamma=float(tc.get("min_snr_gamma", 5.0)),
                                sigma_data=float(config.get("sigma_data", 0.5))),
        t_sampler=tc.get("t_sampler", "uniform"), ema=float(tc.get("ema_decay", 0.0)) > 0,
        components={"settings": dict(config.get("settings") or {}),
                    "control": dict(config.get("control") or {})})


register_objective("controlnet", _objective)


def controlnet_trainer(config: dict[str, Any], out: str | os.PathLike | None = None, *,
                       data: dict[str, Tensor] | None = None, resume: bool = False,
                       device: str | None = None, callback: Any = None) -> Trainer:
    """A :class:`~difflab.train.trainer.Trainer` for a ControlNet config
    (:func:`controlnet_config`): the base loaded from ``config["base"]["path"]`` (frozen), the
    ControlNet copied from it (seed ``train.seed``), the control images precomputed for the
    whole training set (``data``: ``{"image": ..., "control": ...}`` to give them)."""
    from difflab.nets.controlnet import ControlNet

    base, _, ck_dir = load_base(config["base"]["path"], ema=bool(config["base"].get("ema", True)))
    unet = base.net
    if data is None:
        images, _ = load_training_data(config["data"], config["train"]["seed"])
        c = config["control"]
        data = {"image": images,
                "control": control_images(images, c["preprocessor"], c.get("options"))}
    cn_cfg = config["controlnet"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["train"]["seed"]))
        cn = ControlNet.from_unet(unet, cn_cfg["control_channels"], cn_cfg["hint_channels"],
                                  cn_cfg.get("hint_downscale", 1))
    return Trainer(config, out, data=data, modules={"controlnet": cn, "base": unet},
                   references={"base": ck_dir}, resume=resume, device=device,
                   callback=callback)


def train_controlnet(config: dict[str, Any], out: str | os.PathLike | None = None, *,
                     steps: int | None = None, max_minutes: float | None = None,
                     **kw: Any) -> dict[str, Any]:
    """Build :func:`controlnet_trainer` (keyword arguments as its), run it, clean up; the
    summary (the base checkpoint is never written)."""
    trainer = controlnet_trainer(config, out, **kw)
    try:
        return trainer.run(steps=steps, max_minutes=max_minutes)
    finally:
        trainer.close()


# --- loading ------------------------------------------------------------------------------
def _read_controlnet(path: str | os.PathLike) -> ckpt.Checkpoint:
    ck = ckpt.read(path)
    if ck.kind != "controlnet":
        raise ValueError(f"{ck.path} is a {ck.kind} checkpoint, not a ControlNet (train one with "
                         "`difflab train-controlnet`)")
    if "base" not in ck.references:
        raise ValueError(f"{ck.path} records no base model (references.base); it is corrupt")
    return ck


def _check_base(ck: ckpt.Checkpoint, base_net: Any, base_path: Any) -> None:
    want = ck.references["base"].get("sha256")
    have = ckpt.module_sha256(base_net)
    if want != have:
        raise BaseMismatchError(
            f"the ControlNet {ck.path} was trained for another base model: it records base "
            f"sha256 {want} (from {ck.references['base'].get('path')}), but the base at "
            f"{base_path} has sha256 {have}. Use the base it was trained for, or train a "
            "ControlNet for this base")


def load_controlled(controlnets: str | os.PathLike | Sequence[str | os.PathLike], *,
                    base: str | os.PathLike | None = None, settings: Any = None,
                    ema: bool = True, device: str | torch.device = "cpu"
                    ) -> tuple[Any, dict[str, Any]]:
    """(denoiser, config) of a base model steered by one or several ControlNet checkpoints.

    ``base``: the base checkpoint (default: the path the first ControlNet references); every
    ControlNet must have been trained for exactly its weights (the recorded SHA-256), else
    :class:`BaseMismatchError`. ``settings``: a ControlSettings (or dict) for all, or one per
    ControlNet (default: each checkpoint's stored settings). The config is the base's, with
    ``"controlnets"``: each ControlNet checkpoint's config and ``"kind": "controlnet"``.
    """
    from difflab.denoiser import Denoiser
    from difflab.nets.controlnet import ControlledUNet, ControlSettings, time_schedule

    paths = [controlnets] if isinstance(controlnets, (str, os.PathLike)) else list(controlnets)
    if not paths:
        raise ValueError("controlnets must name at least one ControlNet checkpoint")
    cks = [_read_controlnet(p) for p in paths]
    base_path = base if base is not None else cks[0].references["base"].get("path")
    if base_path is None or not ckpt.is_checkpoint(base_path):
        raise FileNotFoundError(
            f"the base model of ControlNet {cks[0].path} is not at {base_path}; give its "
            "checkpoint with base=")
    base_ema = bool(cks[0].config.get("base", {}).get("ema", True))
    base_den, base_cfg, base_dir = load_base(base_path, ema=base_ema)
    nets, stored = [], []
    for ck in cks:
        _check_base(ck, base_den.net, base_dir)
        cn = ckpt._load_component(ck, "controlnet", ema, ckpt.build_net, strict_ema=False)
        nets.append(cn)
        stored.append(ControlSettings.of(ck.component_config("settings")
                                         if "settings" in ck.components else None))
    if settings is None:
        settings = stored
    elif isinstance(settings, (ControlSettings, dict)):
        settings = [settings] * len(nets)
    den = base_den
    controlled = ControlledUNet(den.net, nets, settings,
                                schedule=time_schedule(den.schedule, den.parameterization))
    out = Denoiser(controlled, den.schedule, den.parameterization).to(device)
    config = {**base_cfg, "kind": "controlnet", "base_checkpoint": str(base_dir),
              "controlnets": [{"path": str(ck.path), **ck.config} for ck in cks]}
    return out, config


def load_controlnet(path: str | os.PathLike, *, base: str | os.PathLike | None = None,
                    ema: bool = True, device: str | torch.device = "cpu"
                    ) -> tuple[Any, dict[str, Any]]:
    """(controlled denoiser, config) of one ControlNet checkpoint (:func:`load_controlled`)."""
    return load_controlled([path], base=base, ema=ema, device=device)


def _loader(ck: ckpt.Checkpoint, ema: bool, device: Any) -> tuple[Any, dict[str, Any]]:
    return load_controlled([ck.path], ema=ema, device=device)


ckpt.register_kind("controlnet", _loader)
