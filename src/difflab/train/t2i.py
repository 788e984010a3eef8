"""Latent text-to-image training on the one trainer: two stages in one run directory, and the
checkpoint kinds ``"autoencoder"`` and ``"text_to_image"``.

    config  = t2i_config("t2i_canvas", overrides=["train.max_minutes=30"])
    summary = train_t2i(config, "runs/t2i")                 # both stages; resume=True continues
    model, cfg = checkpoint.load("runs/t2i")                 # a LatentTextModel

Design (one command, the stage recorded in the run's state). A run directory ``RUN`` holds

    RUN/autoencoder/checkpoint   stage 1: the KL autoencoder (kind "autoencoder"), trained with
                                 :class:`~difflab.objectives.AutoencoderObjective`; at the end of
                                 the stage its latent scale factor (1 / std of the latents of
                                 ``autoencoder.calibrate_count`` training images) is measured
                                 and written into its net config (``net.json``)
    RUN/checkpoint               stage 2: the text-conditioned latent diffusion model (kind
                                 "text_to_image"), trained with
                                 :class:`~difflab.objectives.TextToImageObjective`
    RUN/stages.json              {"stage": "autoencoder" | "diffusion" | "done", minutes spent}

``resume=True`` continues the stage that was running (each stage resumes bit-identically
through the trainer). ``config["autoencoder"]`` may instead name an existing autoencoder run
(``--set autoencoder=RUN``): stage 1 is skipped. ``train.max_minutes`` is the budget of both
stages together; stage 1 gets ``autoencoder.train.max_minutes`` (default a fraction
``autoencoder.budget_fraction`` of it), stage 2 what is left.

In stage 2 the autoencoder (its EMA weights) and a pretrained text encoder are frozen modules:
no gradients, optimizer state or EMA, and the checkpoint does not copy them. The checkpoint has
the components ``net`` (+ EMA), ``schedule``, ``text_encoder`` (its config; with weights when
it was trained: the closed-vocabulary encoder) and ``autoencoder`` (its config and its path
relative to the checkpoint), and ``references`` give the autoencoder's path and SHA-256.
Training images are encoded to scaled latents once before the stage (the data field
``"latent"``); a frozen text encoder caches its states per prompt.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import difflab.train.checkpoint as ckpt
from difflab import files
from difflab.objectives import AutoencoderObjective, TextToImageObjective, get_weighting
from difflab.train.config import LOOP_DEFAULTS, check_loop, parse_override
from difflab.train.trainer import Trainer, register_objective

__all__ = ["T2I_PRESETS", "t2i_config", "is_t2i_config", "train_t2i", "train_autoencoder",
           "load_autoencoder", "load_text_to_image", "LatentTextModel", "latents_of",
           "latent_components", "training_data", "training_fields",
           "calibrate_autoencoder", "stage_state", "MissingAutoencoderError"]

STAGES = "stages.json"

_AUTOENCODER = {
    "net": {"type": "autoencoder", "in_channels": 1, "base_channels": 16,
            "channel_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4,
            "mid_attention": False, "num_heads": 1, "dropout": 0.0, "scale_factor": 1.0},
    "loss": "l1",
    "kl_weight": 1e-6,
    "budget_fraction": 0.3,
    "calibrate_count": 2000,
    "train": {"steps": 100000, "batch_size": 16, "lr": 1e-3, "warmup": 100,
              "ema_decay": 0.999, "grad_clip": 1.0, "log_every": 50, "ckpt_every": 1000,
              "max_minutes": None},
}

_T2I_CANVAS = {
    "kind": "text_to_image",
    "autoencoder": _AUTOENCODER,
    "text_encoder": {"type": "minilm", "max_length": 16},
    # the U-Net's cross-attention path (a DiT with context_dim works the same: --set net=...)
    "net": {"type": "unet", "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [8, 4],
            "image_size": 16, "num_heads": 4, "num_classes": None, "dropout": 0.0,
            "context_dim": None},
    "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
    "prediction": "v",
    "sigma_data": 0.5,
    "data": {"name": "canvas", "n": 30000, "seed": 0, "resolution": 64, "channels": 1},
    "train": {"steps": 200000, "max_minutes": 60, "batch_size": 32, "lr": 1e-3,
              "warmup": 100, "ema_decay": 0.999, "grad_clip": 1.0, "target": "v",
              "weighting": "min_snr", "min_snr_gamma": 5.0, "t_sampler": "uniform",
              "p_uncond": 0.1, "log_every": 50, "ckpt_every": 1000},
    "sample": {"sampler": "auto", "steps": 20, "cfg": 2.0},
}

#: presets of ``difflab train`` that are text-to-image runs
T2I_PRESETS: dict[str, dict[str, Any]] = {"t2i_canvas": _T2I_CANVAS}


class MissingAutoencoderError(FileNotFoundError):
    """A latent model whose autoencoder is not where its checkpoint says."""


# --- configs --------------------------------------------------------------------------------
def is_t2i_config(config: str | dict[str, Any]) -> bool:
    """Whether ``config`` (a preset name, a JSON file or a dict) is a text-to-image run."""
    if isinstance(config, dict):
        return config.get("kind") == "text_to_image"
    if config in T2I_PRESETS:
        return True
    p = Path(config)
    if p.is_dir():
        p = p / "checkpoint" / ckpt.CHECKPOINT if (p / "checkpoint").is_dir() else \
            p / ckpt.CHECKPOINT
    if p.is_file() and p.suffix == ".json":
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(cfg, dict) and (cfg.get("kind") == "text_to_image" or (
            isinstance(cfg.get("config"), dict) and cfg.get("kind") == "text_to_image"))
    return False


def _complete(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg["kind"] = "text_to_image"
    base = copy.deepcopy(_T2I_CANVAS)
    for key in ("text_encoder", "net", "schedule", "data", "sample"):
        cfg.setdefault(key, base[key])
    cfg.setdefault("prediction", "v")
    cfg.setdefault("sigma_data", 0.5)
    train = {**LOOP_DEFAULTS, "target": None, "weighting": "none", "min_snr_gamma": 5.0,
             "t_sampler": "uniform", "p_uncond": 0.1, **cfg.get("train", {})}
    train.update(grid_size=0, fit_steps=[], sample_every=0)  # sampling belongs to the pipeline
    check_loop(train)
    if not 0 <= float(train["p_uncond"]) < 1:
        raise ValueError(f"train.p_uncond must lie in [0, 1), got {train['p_uncond']}")
    cfg["train"] = train
    ae = cfg.setdefault("autoencoder", copy.deepcopy(_AUTOENCODER))
    if isinstance(ae, dict) and "path" not in ae:
        for key, value in _AUTOENCODER.items():
            ae.setdefault(key, copy.deepcopy(value))
        ae["train"] = {**LOOP_DEFAULTS, **_AUTOENCODER["train"], **ae.get("train", {})}
        check_loop(ae["train"])
        if not 0 < float(ae["budget_fraction"]) < 1:
            raise ValueError(f"autoencoder.budget_fraction must lie in (0, 1), got "
                             f"{ae['budget_fraction']}")
    elif isinstance(ae, str):
        cfg["autoencoder"] = {"path": ae}
    elif not (isinstance(ae, dict) and isinstance(ae.get("path"), str)):
        raise ValueError(f"config['autoencoder'] must be an autoencoder config or the path of "
                         f"an autoencoder run, got {ae!r}")
    return cfg


def t2i_config(config: str | dict[str, Any], *, overrides: Sequence[str] = (),
               train_updates: dict[str, Any] | None = None) -> dict[str, Any]:
    """A complete text-to-image config: a preset name (:data:`T2I_PRESETS`), a JSON file, a
    run or checkpoint directory (its config), or a dict; then ``overrides``
    ("section.key=JSON"; ``autoencoder=RUN`` uses a trained autoencoder); then
    ``train_updates`` (they win)."""
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
    elif config in T2I_PRESETS:
        cfg = copy.deepcopy(T2I_PRESETS[config])
    else:
        p = Path(config)
        if p.is_dir():
            cfg = ckpt.read_config(p)
        elif p.is_file():
            cfg = json.loads(p.read_text())
            if str(cfg.get("format", "")).startswith("difflab-checkpoint"):
                cfg = cfg["config"]
        else:
            raise FileNotFoundError(f"no text-to-image preset or config {config!r}; presets: "
                                    f"{sorted(T2I_PRESETS)}")
    for text in overrides:
        parts, value = parse_override(text)
        node = cfg
        for key in parts[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[parts[-1]] = value
    cfg = _complete(cfg)
    if train_updates:
        cfg["train"].update(train_updates)
        cfg = _complete(cfg)
    return cfg


# --- stage state ------------------------------------------------------------------------------
def stage_state(out: str | os.PathLike) -> dict[str, Any]:
    """The run's ``stages.json`` ({} for a fresh run)."""
    p = Path(out) / STAGES
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_stage(out: Path, **updates: Any) -> dict[str, Any]:
    state = {**stage_state(out), **updates}
    files.write_json(out / STAGES, state)
    return state


# --- data -------------------------------------------------------------------------------------
def training_data(data_cfg: dict[str, Any]) -> Any:
    """The captioned training set a config's data section names ("canvas" or a folder)."""
    from difflab.data import load_captioned

    name = data_cfg.get("name", "canvas")
    if name == "canvas":
        return load_captioned("canvas", "train", n=data_cfg.get("n"),
                              seed=int(data_cfg.get("seed", 0)))
    return load_captioned(name, "train", resolution=data_cfg.get("resolution"),
                          channels=data_cfg.get("channels"))


@torch.no_grad()
def latents_of(autoencoder: nn.Module, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """Scaled latents (the posterior mode times the scale factor) of uint8 or float images."""
    from difflab.data import to_float

    device = next(autoencoder.parameters()).device
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = to_float(images[i:i + batch_size]).to(device)
        out.append(autoencoder.encode_latents(x).float().cpu())
    return torch.cat(out)


def training_fields(autoencoder: nn.Module, data: Any) -> dict[str, Any]:
    """The trainer's data fields of a captioned set: images, captions, and their scaled latents
    encoded once by the frozen ``autoencoder`` (cheaper than encoding in every step)."""
    return {"image": data.images, "caption": list(data.captions),
            "latent": latents_of(autoencoder, data.images)}


# --- stage 1: the autoencoder -----------------------------------------------------------------
def _ae_trainer_config(cfg: dict[str, Any]) -> dict[str, Any]:
    ae = cfg["autoencoder"]
    return {"kind": "autoencoder", "net": dict(ae["net"]), "data": dict(cfg["data"]),
            "loss": ae["loss"], "kl_weight": ae["kl_weight"], "train": dict(ae["train"])}


def _ae_objective(config: dict[str, Any]) -> AutoencoderObjective:
    return AutoencoderObjective.for_net(
        config["net"], loss=config.get("loss", "l1"),
        kl_weight=float(config.get("kl_weight", 1e-6)),
        ema=float(config.get("train", {}).get("ema_decay", 0.0)) > 0)


register_objective("autoencoder", _ae_objective)


def calibrate_autoencoder(path: str | os.PathLike, images: Tensor, *, ema: bool = True
                          ) -> float:
    """Measure the scale factor of the autoencoder checkpoint at ``path`` on ``images``
    (:meth:`AutoencoderKL.calibrate_scale`) and write it into the checkpoint's net config
    (``net.json`` and the config in ``checkpoint.json``), atomically. Returns it."""
    from difflab.data import to_float

    path = ckpt.resolve(path)
    ae, _ = load_autoencoder(path, ema=ema)
    scale = ae.calibrate_scale(to_float(images))
    ck = ckpt.read(path)
    config = copy.deepcopy(ck.config)
    config["net"]["scale_factor"] = scale
    components = {}
    for name in ck.components:
        comp_cfg = ck.component_config(name)
        if name == "net":
            comp_cfg["scale_factor"] = scale
        components[name] = ckpt.Component(
            comp_cfg, ck.weights(name) if ck.has_weights(name) else None,
            ck.weights(name, ema=True) if ck.has_weights(name, ema=True) else None)
    has_opt = (path / ckpt.OPTIMIZER).is_file()
    ckpt.save(path, kind=ck.kind, config=config, components=components,
              optimizer=ck.optimizer() if has_opt else None, state=ck.state() or None,
              references=ck.references)
    return scale


def train_autoencoder(config: dict[str, Any], out: str | os.PathLike, *, data: Any = None,
                      resume: bool = False, device: str | None = None,
                      max_minutes: float | None = None,
                      callback: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Stage 1 (module docstring) into ``out`` (the autoencoder's run directory): train, then
    calibrate the scale factor. ``config`` is a text-to-image config (its "autoencoder" and
    "data" sections). Returns the trainer's summary plus ``scale_factor``."""
    data = data if data is not None else training_data(config["data"])
    ae_cfg = _ae_trainer_config(config)
    trainer = Trainer(ae_cfg, out, data={"image": data.images}, resume=resume, device=device,
                      callback=callback)
    try:
        summary = trainer.run(max_minutes=max_minutes)
    finally:
        trainer.close()
    n = int(config["autoencoder"].get("calibrate_count", 2000))
    g = torch.Generator().manual_seed(int(ae_cfg["train"]["seed"]))
    idx = torch.randperm(len(data.images), generator=g)[:n]
    summary["scale_factor"] = calibrate_autoencoder(Path(out) / "checkpoint",
                                                    data.images[idx])
    return summary


def load_autoencoder(path: str | os.PathLike, *, ema: bool = True,
                     device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(AutoencoderKL in eval mode without gradients, config) of an autoencoder run or
    checkpoint; its EMA weights when it has them and ``ema``."""
    p = Path(path)
    if not ckpt.is_checkpoint(p):
        raise MissingAutoencoderError(f"autoencoder {p} not found (expected the run directory "
                                      "of an autoencoder, or its checkpoint/)")
    ck = ckpt.read(p)
    if ck.kind != "autoencoder":
        raise ValueError(f"{ck.path} is a {ck.kind} checkpoint, not an autoencoder")
    cfg = ck.component_config("net")
    net = ckpt.build_net(cfg)
    use_ema = ema and ck.has_weights("net", ema=True)
    ckpt.load_weights(net, ck.weights("net", use_ema), source=str(ck.weights_file("net", use_ema)),
                      net_type="autoencoder")
    return net.to(device).eval().requires_grad_(False), {"kind": ck.kind, **ck.config}


ckpt.register_kind("autoencoder", lambda ck, ema, device: load_autoencoder(ck.path, ema=ema,
                                                                          device=device))


# --- stage 2: text-conditioned latent diffusion ---------------------------------------------
def _text_encoder(config: dict[str, Any], captions: Sequence[str] | None = None) -> nn.Module:
    """The text encoder a config names; a closed-vocabulary encoder without a vocabulary gets
    the words of ``captions`` (written back into the config)."""
    from difflab.conditioning.text import VocabTextEncoder, build_text_encoder

    tc = config["text_encoder"]
    if tc.get("type") == "vocab_text" and not tc.get("vocab"):
        if not captions:
            raise ValueError("text_encoder vocab_text needs a vocabulary (text_encoder.vocab) "
                             "or training captions to take it from")
        kw = {k: v for k, v in tc.items() if k not in ("type", "vocab")}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config["train"]["seed"]))
            enc = VocabTextEncoder.from_captions(captions, **kw)
        config["text_encoder"] = dict(enc.config)
        return enc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config["train"]["seed"]))
        return build_text_encoder(dict(tc))


def _t2i_objective(config: dict[str, Any], latent_shape: Sequence[int],
                   components: dict[str, Any] | None = None) -> TextToImageObjective:
    from difflab.train.checkpoint import denoiser_parts

    tc = config["train"]
    schedule, parameterization = denoiser_parts(config)
    obj = TextToImageObjective(
        schedule, parameterization, latent_shape=latent_shape,
        p_uncond=float(tc.get("p_uncond", 0.1)),
        text_trainable=config["text_encoder"].get("type") == "vocab_text",
        target=tc.get("target"),
        weighting=get_weighting(tc.get("weighting", "none"),
                                gamma=float(tc.get("min_snr_gamma", 5.0)),
                                sigma_data=float(config.get("sigma_data", 0.5))),
        t_sampler=tc.get("t_sampler", "uniform"), ema=float(tc["ema_decay"]) > 0)
    if components:
        obj.checkpoint_components = lambda: dict(components)  # config-only parts
    return obj


def _autoencoder_path(config: dict[str, Any], out: Path) -> Path:
    ae = config["autoencoder"]
    return Path(ae["path"]) if "path" in ae else out / "autoencoder"


def latent_components(config: dict[str, Any], autoencoder: nn.Module, ae_path: Path,
                      out: Path, image_shape: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The config-only checkpoint components of a latent text model in ``out/checkpoint``: the
    autoencoder (its config and path relative to the checkpoint) and a frozen text encoder's
    config (a trained one is saved with its weights as a trained module)."""
    rel = os.path.relpath(ae_path, (out / "checkpoint").resolve())
    components = {"autoencoder": {"config": dict(autoencoder.config), "relative_path": rel,
                                  "ema": True, "image_shape": list(image_shape)}}
    if config["text_encoder"].get("type") != "vocab_text":
        components["text_encoder"] = dict(config["text_encoder"])
    return components


def _diffusion_trainer(config: dict[str, Any], out: Path, *, data: Any, resume: bool,
                       device: str | None, callback: Callable | None) -> Trainer:
    ae_path = ckpt.resolve(_autoencoder_path(config, out)).resolve()
    autoencoder, ae_config = load_autoencoder(ae_path, ema=True)
    config = copy.deepcopy(config)
    text_encoder = _text_encoder(config, data.captions)
    if config["net"].get("context_dim") is None:
        config["net"]["context_dim"] = int(text_encoder.dim)
    image_shape = tuple(data.images.shape[1:])
    latent_shape = autoencoder.latent_shape(image_shape)
    components = latent_components(config, autoencoder, ae_path, out, image_shape)
    config["autoencoder"] = {**{k: v for k, v in config["autoencoder"].items()
                                if k != "path"}, "path": str(ae_path)}
    config["latent_shape"] = list(latent_shape)
    obj = _t2i_objective(config, latent_shape, components)
    fields = training_fields(autoencoder, data)
    modules = {"autoencoder": autoencoder, "text_encoder": text_encoder}
    te_path = config["text_encoder"].get("path")
    return Trainer(config, out, data=fields, modules=modules, objective=obj,
                   references={"autoencoder": ae_path, "text_encoder": te_path},
                   resume=resume, device=device, callback=callback)


def train_t2i(config: dict[str, Any], out: str | os.PathLike, *, resume: bool = False,
              device: str | None = None, callback: Callable[[dict], None] | None = None,
              stages: Sequence[str] = ("autoencoder", "diffusion")) -> dict[str, Any]:
    """Both stages into run directory ``out`` (module docstring); ``resume`` continues the
    stage that was running. ``stages`` limits what runs now (e.g. only "autoencoder").
    Returns {"autoencoder": stage-1 summary or None, "diffusion": stage-2 summary or None,
    "stage": the state now, "minutes": spent per stage}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = stage_state(out) if resume else {}
    if not resume and (out / STAGES).exists():
        files.write_json(out / STAGES, {})
    total = config["train"].get("max_minutes")
    data = training_data(config["data"])
    result: dict[str, Any] = {"autoencoder": None, "diffusion": None}
    own_ae = "path" not in config["autoencoder"]
    ae_minutes = float(state.get("autoencoder_minutes", 0.0))
    if own_ae and state.get("stage", "autoencoder") == "autoencoder" and \
            "autoencoder" in stages:
        _write_stage(out, stage="autoencoder")
        ae = config["autoencoder"]
        budget = ae["train"].get("max_minutes")
        if budget is None and total:
            budget = float(total) * float(ae["budget_fraction"])
        summary = train_autoencoder(config, out / "autoencoder", data=data,
                                    resume=resume and ckpt.is_checkpoint(
                                        out / "autoencoder" / "checkpoint"),
                                    device=device, max_minutes=budget, callback=callback)
        ae_minutes = summary["seconds"] / 60
        result["autoencoder"] = summary
        state = _write_stage(out, stage="diffusion", autoencoder_minutes=ae_minutes)
    elif not own_ae:
        state = _write_stage(out, stage=state.get("stage", "diffusion")
                             if state.get("stage") != "autoencoder" else "diffusion",
                             autoencoder_minutes=0.0)
    if (state.get("stage") == "diffusion" or (resume and state.get("stage") == "done")) and \
            "diffusion" in stages:  # a finished run resumed: train on to the new steps / budget
        budget = None if not total else max(float(total) - ae_minutes, 0.0)
        trainer = _diffusion_trainer(config, out, data=data, device=device, callback=callback,
                                     resume=resume and ckpt.is_checkpoint(out / "checkpoint"))
        try:
            summary = trainer.run(max_minutes=budget if budget is None or budget > 0 else 1e-9)
        finally:
            trainer.close()
        result["diffusion"] = summary
        state = _write_stage(out, stage="done", diffusion_minutes=summary["seconds"] / 60)
    result["stage"] = state.get("stage")
    result["minutes"] = {"autoencoder": state.get("autoencoder_minutes"),
                         "diffusion": state.get("diffusion_minutes")}
    return result


register_objective("text_to_image", lambda config: _t2i_objective(
    config, config["latent_shape"]))


# --- loading ------------------------------------------------------------------------------------
@dataclass(eq=False)
class LatentTextModel:
    """A loaded text-to-image checkpoint: the latent ``denoiser``, the frozen ``autoencoder``
    (decoder of its samples) and ``text_encoder``, the ``config``, and where it came from."""

    denoiser: Any
    autoencoder: nn.Module
    text_encoder: nn.Module
    config: dict[str, Any]
    path: Path | None = None

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.config["latent_shape"])

    def to(self, device: str | torch.device) -> LatentTextModel:
        self.denoiser.to(device)
        self.autoencoder.to(device)
        self.text_encoder.to(device)
        return self


def _find_autoencoder(ck: ckpt.Checkpoint) -> Path:
    info = ck.component_config("autoencoder") if "autoencoder" in ck.components else {}
    ref = ck.references.get("autoencoder", {})
    candidates = []
    if info.get("relative_path"):
        candidates.append((ck.path / info["relative_path"]).resolve())
    if ref.get("path"):
        candidates.append(Path(ref["path"]))
    for c in candidates:
        if ckpt.is_checkpoint(c):
            return c
    where = " or ".join(str(c) for c in candidates) or "(no path recorded)"
    raise MissingAutoencoderError(
        f"the autoencoder of latent model {ck.path} is missing: looked for it at {where}. "
        "Put the autoencoder run back there (a text-to-image checkpoint references its "
        "autoencoder, it does not copy it)")


def load_text_to_image(path: str | os.PathLike, *, ema: bool = True,
                       device: str | torch.device = "cpu", check_hash: bool = True
                       ) -> tuple[LatentTextModel, dict[str, Any]]:
    """(LatentTextModel, config) of a text-to-image run or checkpoint: the denoiser (EMA
    weights unless ``ema=False``), its text encoder (config, and weights when it was trained)
    and the autoencoder it references (refused, with ``check_hash``, when its weights are not
    the ones the model was trained on)."""
    ck = ckpt.read(path)
    if ck.kind != "text_to_image":
        raise ValueError(f"{ck.path} is a {ck.kind} checkpoint, not a text-to-image model")
    config = {"kind": ck.kind, **ck.config}
    net_cfg = ck.component_config("net")
    use_ema = ema and ck.has_weights("net", ema=True)
    net = ckpt.build_net(net_cfg)
    ckpt.load_weights(net, ck.weights("net", use_ema), source=str(ck.weights_file("net", use_ema)),
                      net_type=str(net_cfg.get("type")))
    denoiser = ckpt.build_denoiser({**config, "net": net_cfg,
                                    "schedule": ck.component_config("schedule")}, net)
    denoiser = denoiser.eval().requires_grad_(False)
    from difflab.conditioning.text import build_text_encoder

    te_cfg = (ck.component_config("text_encoder") if "text_encoder" in ck.components
              else config.get("text_encoder"))
    if not te_cfg:
        raise ValueError(f"{ck.path} has no text encoder (component 'text_encoder')")
    text_encoder = build_text_encoder(dict(te_cfg))
    if ck.has_weights("text_encoder"):
        te_ema = ema and ck.has_weights("text_encoder", ema=True)
        ckpt.load_weights(text_encoder, ck.weights("text_encoder", te_ema),
                          source=str(ck.weights_file("text_encoder", te_ema)),
                          net_type=str(te_cfg.get("type")))
    text_encoder.freeze()
    ae_path = _find_autoencoder(ck)
    autoencoder, _ = load_autoencoder(ae_path, ema=True)
    want = ck.references.get("autoencoder", {}).get("sha256")
    if check_hash and want and ckpt.module_sha256(autoencoder) != want:
        raise ValueError(f"autoencoder {ae_path} is not the one latent model {ck.path} was "
                         "trained on (its weights hash differently)")
    model = LatentTextModel(denoiser, autoencoder, text_encoder, config, ck.path)
    return model.to(device), config


ckpt.register_kind("text_to_image", lambda ck, ema, device: load_text_to_image(
    ck.path, ema=ema, device=device))
