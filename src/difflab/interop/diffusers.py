"""diffusers-format models in and out.

**In** (:func:`load_diffusers`, :func:`from_diffusers`): a local folder holding a
``UNet2DModel``, ``UNet2DConditionModel`` or ``SD3Transformer2DModel`` (``config.json`` +
safetensors weights) with its ``scheduler_config.json``, or a pipeline folder
(``model_index.json`` with ``unet/`` or ``transformer/`` and ``scheduler/``, and where present
``vae/``, ``controlnet/``, ``text_encoder/`` + ``tokenizer/``). The networks are diffusers' own
model classes (the optional extra ``pip install difflab[diffusers]``) wrapped in
:class:`DiffusersUNet` / :class:`DiffusersSD3`, which map difflab's network call to
diffusers'::

    net(x, time_in, labels=, context=, context_mask=, control=)
      = unet(x, time_in, class_labels=labels, encoder_hidden_states=context,
             encoder_attention_mask=context_mask,
             down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        with (down, mid) = controlnet(x, time_in, encoder_hidden_states=context,
                                      controlnet_cond=control, conditioning_scale=scale)
    net(x, time_in, context=) = transformer(hidden_states=x, timestep=time_in,
                                            encoder_hidden_states=context[:, :-1],
                                            pooled_projections=context[:, -1, :P]).sample

(:func:`sd3_context` packs SD3's ``pooled_projections`` as the context's last token, so the
pooled vector travels, is nulled and concatenated with the context in a difflab
:class:`~difflab.denoiser.condition.Condition`.) A latent pipeline's ``AutoencoderKL`` decodes
as diffusers' pipelines do (:meth:`DiffusersModel.decode`): ``vae.decode(latents /
scaling_factor + shift_factor)``, both read from ``vae/config.json``. A ``text_encoder/``
(``CLIPTextModel``) loads through transformers as difflab's
:class:`~difflab.conditioning.text.CLIPTextEncoder` (local files, safetensors only), whose
``condition(prompts)`` gives the Condition: context, mask and the empty prompt's null context
for classifier-free guidance.

The scheduler config becomes a difflab schedule and parameterisation
(:mod:`difflab.interop.schedulers`); the schedule's ``net_time`` is exactly diffusers'
``timestep`` (the DDPM index for discrete chains, sigma * T for flow models), fractional between
indices. **Weights load from safetensors only**: the file list is checked before diffusers is
called, a folder with only pickle files (``.bin``, ``.ckpt``, ``.pt``, ``.pth``, ``.pkl``) is
refused unopened (:class:`PickleRefused`), and diffusers is called with
``use_safetensors=True``.

**Out** (:func:`to_diffusers`): the scheduler config of every difflab schedule and prediction
diffusers can express and, for difflab's ADM U-Net where it maps one to one, a
``UNet2DModel`` folder (:mod:`difflab.interop.unet`), written with safetensors; diffusers
itself is not needed to export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser import Denoiser
from difflab.denoiser.parameterization import Parameterization
from difflab.interop.schedulers import SchedulerMapping, from_scheduler_config, scheduler_config
from difflab.interop.unet import unet_to_diffusers
from difflab.nets.blocks import unused_condition
from difflab.schedules import NoiseSchedule

__all__ = ["DiffusersUNet", "DiffusersSD3", "DiffusersModel", "DiffusersExport",
           "PickleRefused", "load_diffusers", "from_diffusers", "to_diffusers", "find_weights",
           "is_diffusers_folder", "fits_folder", "check_safetensors", "network_weights",
           "sd3_context", "MODEL_CLASSES", "PICKLE_SUFFIXES"]

MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel")
"""The diffusers network classes :func:`load_diffusers` builds."""
NETWORK_FOLDERS = ("unet", "transformer")
"""A pipeline's network component, by the name diffusers' ``model_index.json`` gives it."""
FITS_SUFFIX = ".difflab"
"""Fits of a diffusers folder live beside it, never in it: ``<folder>.difflab/fits.json``."""
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHTS_NAME = "diffusion_pytorch_model"


class PickleRefused(ValueError):
    """A model's weights exist only as pickle files, which can run code when opened."""


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading diffusers-format models needs the diffusers package: pip "
                          "install 'difflab[diffusers]' (or pip install diffusers)") from e
    return diffusers


# --- the network adapter -------------------------------------------------------------------
class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` called as a difflab network.

    Args:
        unet: the diffusers model.
        null_label: the class index that means "no class" for this model, used for difflab's
            null label -1 (classifier-free guidance) and for ``labels=None`` on a
            class-conditional model; None: the model has no null class and -1 is refused.
        out_channels: keep the first ``out_channels`` output channels (models with learned
            variance output eps and the variance interpolation); None keeps all.
        controlnet: a diffusers ``ControlNetModel`` for this ``UNet2DConditionModel``; the
            Condition's ``control`` (B, C, H, W) in [0, 1] is its ``controlnet_cond`` and its
            residuals reach the U-Net as ``down_block_additional_residuals`` /
            ``mid_block_additional_residual`` (diffusers' ``StableDiffusionControlNetPipeline``).
        control_scale: the ControlNet's ``conditioning_scale``.

    ``x`` is cast to the model's dtype and the output returned in it (the Denoiser casts it
    back); the time input reaches diffusers' sinusoidal embedding unrounded.
    """

    def __init__(self, unet: nn.Module, *, null_label: int | None = None,
                 out_channels: int | None = None, controlnet: nn.Module | None = None,
                 control_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.null_label, self.out_channels = null_label, out_channels
        self.control_scale = float(control_scale)
        self.has_classes = getattr(unet, "class_embedding", None) is not None

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                control: Tensor | None = None, **unused: Any) -> Tensor:
        name = type(self.unet).__name__
        unused_condition(name, unused)
        dtype = next(self.unet.parameters()).dtype
        kw: dict[str, Any] = {}
        if self.has_classes:
            if labels is None:
                if self.null_label is None:
                    raise ValueError(f"this {name} is class-conditional and has no null label; "
                                     "pass labels (or load it with null_label=K)")
                labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long,
                                    device=x.device)
            elif bool((labels < 0).any()):
                if self.null_label is None:
                    raise ValueError(f"this {name} has no null label for label -1 "
                                     "(classifier-free guidance); load it with null_label=K "
                                     "if class K means 'no class'")
                labels = torch.where(labels < 0, self.null_label, labels)
            embedded = getattr(self.unet.config, "class_embed_type", None) is None
            kw["class_labels"] = labels.long() if embedded else labels  # else a time / vector
        elif labels is not None:
            raise ValueError(f"this {name} has no class embedding but got class labels")
        if name == "UNet2DConditionModel":
            if context is None:
                raise ValueError(f"this {name} needs context (encoder_hidden_states): pass "
                                 "cond=Condition(context=...)")
            kw["encoder_hidden_states"] = context.to(dtype)
            if context_mask is not None:
                kw["encoder_attention_mask"] = context_mask.to(torch.bool)
        elif context is not None or context_mask is not None:
            unused_condition(name, {"context": context, "context_mask": context_mask})
        if self.controlnet is not None:
            if control is None:
                raise ValueError(f"this {name} runs with a ControlNet and needs its control "
                                 "image: pass cond=Condition(context=..., control=...)")
            down, mid = self.controlnet(
                x.to(dtype), t, encoder_hidden_states=kw["encoder_hidden_states"],
                controlnet_cond=control.to(dtype), conditioning_scale=self.control_scale,
                class_labels=kw.get("class_labels"), return_dict=False)
            kw["down_block_additional_residuals"] = down
            kw["mid_block_additional_residual"] = mid
        elif control is not None:
            unused_condition(f"{name} (no ControlNet loaded)", {"control": control})
        out = self.unet(x.to(dtype), t, return_dict=False, **kw)[0]
        return out if self.out_channels is None else out[:, :self.out_channels]


def sd3_context(prompt_embeds: Tensor, pooled_prompt_embeds: Tensor) -> Tensor:
    """SD3's two text inputs as one difflab context (B, L + 1, D): diffusers'
    ``encoder_hidden_states`` (``prompt_embeds``, (B, L, D), D = ``joint_attention_dim``)
    followed by one token holding ``pooled_projections`` (``pooled_prompt_embeds``, (B, P),
    P <= D) zero-padded to D. :class:`DiffusersSD3` splits it again; as one tensor it is
    nulled, concatenated and sliced with the Condition (pass the empty prompt's packed
    context as ``null_context`` for classifier-free guidance)."""
    B, _, D = prompt_embeds.shape
    P = pooled_prompt_embeds.shape[-1]
    if P > D:
        raise ValueError(f"pooled_prompt_embeds has {P} features, more than the {D} of "
                         "prompt_embeds: they cannot share one context tensor")
    last = prompt_embeds.new_zeros(B, 1, D)
    last[:, 0, :P] = pooled_prompt_embeds
    return torch.cat([prompt_embeds, last], dim=1)


class DiffusersSD3(nn.Module):
    """A diffusers ``SD3Transformer2DModel`` (Esser et al. 2024, MM-DiT) as a difflab network.

    A flow model: its scheduler is ``FlowMatchEulerDiscreteScheduler`` and its ``timestep`` is
    sigma * ``num_train_timesteps`` (``t * 1000``), which is the rectified-flow schedule's
    ``net_time``; it predicts the velocity noise - x0 (difflab's ``flow`` target). The
    context is :func:`sd3_context`'s packing: ``encoder_hidden_states = context[:, :-1]``,
    ``pooled_projections = context[:, -1, :pooled_projection_dim]``. SD3 attends to every
    text token (its pipeline passes no mask), so ``context_mask`` is not used.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.pooled_dim = int(transformer.config.pooled_projection_dim)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, **unused: Any) -> Tensor:
        name = type(self.transformer).__name__
        unused_condition(name, unused)
        if context is None:
            raise ValueError(f"this {name} needs context: pass cond=Condition(context="
                             "sd3_context(prompt_embeds, pooled_prompt_embeds))")
        dtype = next(self.transformer.parameters()).dtype
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.transformer(
            hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=context[:, :-1].to(dtype),
            pooled_projections=context[:, -1, :self.pooled_dim].to(dtype), return_dict=False)[0]


# --- loading -------------------------------------------------------------------------------
def _is_pickle(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES)


_CONVERT = {
    WEIGHTS_NAME: "with diffusers: model = <ModelClass>.from_pretrained(folder, "
                  "use_safetensors=False); model.save_pretrained(folder, "
                  "safe_serialization=True) (or diffusers' convert scripts / from_single_file "
                  "for a .ckpt); then load it here, which calls from_pretrained(..., "
                  "use_safetensors=True)",
    "model": "with transformers: model = <ModelClass>.from_pretrained(folder, "
             "use_safetensors=False); model.save_pretrained(folder, safe_serialization=True); "
             "then load it here (safetensors only)"}


def find_weights(folder: str | os.PathLike, name: str = WEIGHTS_NAME) -> str | None:
    """The safetensors weights variant of a diffusers model folder: ``None`` for the plain
    ``diffusion_pytorch_model.safetensors`` (or its sharded index), else the variant name
    (``diffusion_pytorch_model.<variant>.safetensors``, when it is the only one). Raises
    :class:`PickleRefused` (without opening anything) when only pickle weights are there and
    FileNotFoundError when there are none. ``name="model"``: a transformers folder
    (``model.safetensors``)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if f"{name}.safetensors" in names or f"{name}.safetensors.index.json" in names:
        return None
    variants = sorted({n[len(name) + 1:].split(".")[0] for n in names
                       if n.startswith(name + ".") and
                       (n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))})
    if len(variants) == 1:
        return variants[0]
    if len(variants) > 1:
        raise ValueError(f"{folder} holds several weight variants {variants}; pass variant=")
    pickles = [n for n in names if _is_pickle(n)]
    if pickles:
        how = _CONVERT.get(name, _CONVERT[WEIGHTS_NAME])
        raise PickleRefused(
            f"{folder} holds its weights only as pickle ({', '.join(pickles)}), which can run "
            "code when opened; difflab loads safetensors only and has not opened it. Convert it "
            f"once where you trust the file, {how}")
    raise FileNotFoundError(f"no {name}.safetensors in {folder}")


def _weights_file(folder: Path, variant: str | None, name: str = WEIGHTS_NAME) -> Path:
    """The weights file (or sharded index) of ``folder``: what a fit belongs to."""
    stem = name if variant is None else f"{name}.{variant}"
    single = folder / f"{stem}.safetensors"
    return single if single.is_file() else folder / f"{stem}.safetensors.index.json"


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _index_has(index: dict[str, Any], name: str) -> bool:
    v = index.get(name)
    return isinstance(v, list) and len(v) == 2 and bool(v[1])


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local diffusers pipeline folder (``model_index.json``) or model
    folder (``config.json`` with a diffusers ``_class_name`` and ``_diffusers_version``, and a
    ``scheduler_config.json``). Reads only those JSON files."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / "model_index.json").is_file():
        return True
    if not ((p / "config.json").is_file() and (p / "scheduler_config.json").is_file()):
        return False
    try:
        cfg = _read_json(p / "config.json")
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "_class_name" in cfg and "_diffusers_version" in cfg


def fits_folder(path: str | os.PathLike) -> Path:
    """Where fits of the diffusers folder ``path`` are stored: ``<folder>.difflab`` beside it
    (its ``fits.json`` is difflab's fits store, :mod:`difflab.fitting.store`); the model's own
    folder is never written."""
    p = Path(path).resolve()
    return p.with_name(p.name + FITS_SUFFIX)


@dataclass(frozen=True)
class _Layout:
    root: Path                        # the folder given
    model_dir: Path                   # the network's folder
    scheduler: dict[str, Any]         # its scheduler config
    vae: Path | None = None           # AutoencoderKL folder
    controlnet: Path | None = None    # ControlNetModel folder
    text_encoder: Path | None = None  # the pipeline folder holding text_encoder/ + tokenizer/
    text_class: str = ""              # the text encoder's class (model_index.json)


def _locate(path: Path, scheduler: dict | str | os.PathLike | None) -> _Layout:
    """The folders of a model or pipeline folder and its scheduler config."""
    if path.is_file():
        if _is_pickle(path.name):
            raise PickleRefused(f"{path} is a pickle file and was not opened; difflab loads "
                                "safetensors only (see find_weights for how to convert)")
        raise ValueError(f"{path} is a file; pass the folder of a diffusers model or pipeline "
                         "(single-file checkpoints: convert them with diffusers' "
                         "from_single_file(...).save_pretrained(folder, "
                         "safe_serialization=True))")
    extra: dict[str, Any] = {}
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        net = next((n for n in NETWORK_FOLDERS if _index_has(index, n)), None)
        if net is None:
            found = {k: v[1] for k, v in index.items()
                     if isinstance(v, list) and len(v) == 2 and v[1]}
            raise NotImplementedError(f"pipeline {path} has no unet/ or transformer/ component "
                                      f"({found}); supported networks: {list(MODEL_CLASSES)}")
        model_dir = path / net
        default_sched = path / "scheduler" / "scheduler_config.json"
        for name in ("vae", "controlnet"):
            if _index_has(index, name) and (path / name).is_dir():
                extra[name] = path / name
        if _index_has(index, "text_encoder") and (path / "text_encoder").is_dir():
            extra["text_encoder"] = path
            extra["text_class"] = str(index["text_encoder"][1])
    else:
        model_dir = path
        default_sched = path / "scheduler_config.json"
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {model_dir}: not a diffusers model folder")
    if scheduler is None:
        if not default_sched.exists():
            raise FileNotFoundError(
                f"no scheduler config at {default_sched}: the noise schedule and what the "
                "network predicts are read from it; pass scheduler= (a dict or a path)")
        sched = _read_json(default_sched)
    elif isinstance(scheduler, dict):
        sched = dict(scheduler)
    else:
        sched = _read_json(Path(scheduler))
    return _Layout(path, model_dir, sched, **extra)


def check_safetensors(path: str | os.PathLike) -> None:
    """Refuse, opening nothing but JSON, a model or pipeline folder whose network, VAE,
    ControlNet or text encoder has only pickle weights (:class:`PickleRefused`, naming the
    files and how to convert them to safetensors)."""
    lay = _locate(Path(path), {})
    find_weights(lay.model_dir)
    for folder in (lay.vae, lay.controlnet):
        if folder is not None:
            find_weights(folder)
    if lay.text_encoder is not None:
        find_weights(lay.text_encoder / "text_encoder", "model")


def network_weights(path: str | os.PathLike, variant: str | None = None) -> Path:
    """The network's safetensors weights file of a model or pipeline folder, found without
    loading anything (what a fit of it belongs to; raises :class:`PickleRefused` as
    :func:`find_weights`)."""
    lay = _locate(Path(path), {})
    found = find_weights(lay.model_dir)
    return _weights_file(lay.model_dir, variant if variant is not None else found)


@dataclass(frozen=True)
class DiffusersModel:
    """What :func:`load_diffusers` read: the difflab denoiser and the configs it came from.

    Attributes:
        denoiser: the network wrapped as a difflab :class:`~difflab.denoiser.Denoiser`.
        net: the adapter (:class:`DiffusersUNet`: ``net.unet`` is diffusers' model;
            :class:`DiffusersSD3`: ``net.transformer``).
        mapping: the scheduler config read as a schedule and parameterisation
            (:class:`~difflab.interop.schedulers.SchedulerMapping`, with diffusers' sampling
            options that difflab leaves to its own samplers).
        model_class: diffusers' class name of the network.
        model_config: the network's ``config.json``.
        scheduler_config: the scheduler config as read.
        path: the model folder the weights came from.
        sample_shape: (C, H, W) of one sample from the network's config (``sample_size``):
            latents for a latent pipeline.
        weights: the network's safetensors file (what a fit belongs to: its SHA-256).
        vae: the pipeline's ``AutoencoderKL`` (None: the network samples pixels).
        vae_config: its ``config.json`` (``scaling_factor``, ``shift_factor``, ...).
        controlnet: the ``ControlNetModel`` feeding the U-Net (also ``net.controlnet``).
        text_encoder: the pipeline's text encoder as a difflab
            :class:`~difflab.conditioning.text.CLIPTextEncoder` (``.condition(prompts)``).
    """

    denoiser: Denoiser
    net: nn.Module
    mapping: SchedulerMapping
    model_class: str
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    path: Path
    sample_shape: tuple[int, int, int]
    weights: Path | None = None
    vae: nn.Module | None = None
    vae_config: dict[str, Any] | None = None
    controlnet: nn.Module | None = None
    text_encoder: Any = None

    @property
    def schedule(self) -> NoiseSchedule:
        return self.mapping.schedule

    @property
    def prediction(self) -> Parameterization:
        return self.mapping.prediction

    @property
    def needs_context(self) -> bool:
        """Whether the network needs a text context (cross-attention / joint attention)."""
        return self.model_class in ("UNet2DConditionModel", "SD3Transformer2DModel")

    @property
    def num_classes(self) -> int | None:
        """The class count of a class-conditional ``UNet2DModel`` (``num_class_embeds``)."""
        k = self.model_config.get("num_class_embeds")
        return int(k) if k and getattr(self.net, "has_classes", False) else None

    @property
    def scaling_factor(self) -> float | None:
        """The VAE config's ``scaling_factor`` (None without a VAE)."""
        return None if self.vae_config is None else float(self.vae_config["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        """The VAE config's ``shift_factor`` (0 where it has none)."""
        return float((self.vae_config or {}).get("shift_factor") or 0.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of a decoded image (the sample shape without a VAE)."""
        if self.vae_config is None:
            return self.sample_shape
        f = 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)
        _, h, w = self.sample_shape
        return (int(self.vae_config.get("out_channels", 3)), h * f, w * f)

    def decode(self, latents: Tensor) -> Tensor:
        """Images (about [-1, 1]) of latents as diffusers' pipelines decode them:
        ``vae.decode(latents / scaling_factor + shift_factor)`` (with ``latents_mean`` /
        ``latents_std`` in the config: ``latents * latents_std / scaling_factor +
        latents_mean``). Without a VAE the samples are the images: returned unchanged."""
        if self.vae is None:
            return latents
        cfg = self.vae_config or {}
        z = latents.float()
        if cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            shape = (1, -1) + (1,) * (z.ndim - 2)
            mean = torch.tensor(cfg["latents_mean"], device=z.device).view(shape)
            std = torch.tensor(cfg["latents_std"], device=z.device).view(shape)
            z = z * std / self.scaling_factor + mean
        else:
            z = z / self.scaling_factor + self.shift_factor
        dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            return self.vae.decode(z.to(dtype), return_dict=False)[0].float()


def _from_pretrained(diffusers: Any, cls_name: str, folder: Path, variant: str | None,
                     torch_dtype: torch.dtype | None, device: Any) -> nn.Module:
    kw: dict[str, Any] = {"use_safetensors": True, "local_files_only": True,
                         "low_cpu_mem_usage": False}
    if variant is not None:
        kw["variant"] = variant
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    model = getattr(diffusers, cls_name).from_pretrained(str(folder), **kw)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def load_diffusers(path: str | os.PathLike, *, scheduler: dict | str | os.PathLike | None = None,
                   image_seq_len: int | None = None, shift: float | None = None,
                   null_label: int | None = None, variant: str | None = None,
                   torch_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, vae: bool = True,
                   controlnet: bool | str | os.PathLike = True, control_scale: float = 1.0,
                   text_encoder: bool = True) -> DiffusersModel:
    """Load a local diffusers model or pipeline folder as a difflab denoiser (module docstring).

    Args:
        path: a model folder (``config.json``, ``diffusion_pytorch_model.safetensors``,
            ``scheduler_config.json``) or a pipeline folder (``model_index.json``, ``unet/`` or
            ``transformer/``, ``scheduler/``; ``vae/``, ``controlnet/``, ``text_encoder/``
            where present). Nothing is downloaded.
        scheduler: the scheduler config (a dict or a path to its JSON) when the folder has
            none, or to override it.
        image_seq_len / shift: the shift of a dynamically shifted flow model (Flux) from the
            image token count, or given directly; ``shift`` also overrides a fixed shift.
        null_label: the class index meaning "no class" of a class-conditional model.
        variant: the weights variant (``diffusion_pytorch_model.<variant>.safetensors``);
            found automatically when there is only one.
        torch_dtype / device: passed to diffusers' ``from_pretrained`` / moved to.
        vae: load the pipeline's ``vae/`` (``AutoencoderKL``) for :meth:`DiffusersModel.decode`.
        controlnet: True: the pipeline's ``controlnet/`` where it has one; a path: that
            ``ControlNetModel`` folder; False: none. ``control_scale``: its
            ``conditioning_scale``.
        text_encoder: load the pipeline's ``text_encoder/`` + ``tokenizer/`` (a
            ``CLIPTextModel``) as a :class:`~difflab.conditioning.text.CLIPTextEncoder`.

    Raises:
        PickleRefused: a component's weights exist only as pickle; nothing was opened.
        NotImplementedError: the network is not one of :data:`MODEL_CLASSES`, or the text
            encoder not a ``CLIPTextModel``.
    """
    lay = _locate(Path(path), scheduler)
    model_dir = lay.model_dir
    model_config = _read_json(model_dir / "config.json")
    cls_name = model_config.get("_class_name", "")
    if cls_name not in MODEL_CLASSES:
        raise NotImplementedError(f"{model_dir} holds a {cls_name or 'model without _class_name'}"
                                  f"; supported networks: {list(MODEL_CLASSES)}")
    mapping = from_scheduler_config(lay.scheduler, image_seq_len=image_seq_len, shift=shift)
    control_dir = lay.controlnet if controlnet is True else (
        Path(controlnet) if controlnet else None)
    vae_dir = lay.vae if vae else None
    text_dir = lay.text_encoder if text_encoder else None
    if text_dir is not None and lay.text_class != "CLIPTextModel":
        raise NotImplementedError(
            f"{lay.root}: its text encoder is a {lay.text_class}; difflab loads a pipeline's "
            "CLIPTextModel (Stable Diffusion 1.x / 2.x). Load with text_encoder=False and pass "
            "the context yourself (SD3: sd3_context(prompt_embeds, pooled_prompt_embeds))")
    # every component is checked before diffusers sees a folder: pickle is refused unopened
    found = find_weights(model_dir)
    extra = {d: find_weights(d) for d in (vae_dir, control_dir) if d is not None}
    if text_dir is not None:
        find_weights(text_dir / "text_encoder", "model")
    variant = variant if variant is not None else found
    diffusers = _require_diffusers()
    net_model = _from_pretrained(diffusers, cls_name, model_dir, variant, torch_dtype, device)
    cfg = dict(net_model.config)
    c_in, c_out = int(cfg["in_channels"]), int(cfg["out_channels"])
    control = None
    if control_dir is not None:
        if cls_name != "UNet2DConditionModel":
            raise NotImplementedError(f"a ControlNet ({control_dir}) feeds a "
                                      f"UNet2DConditionModel, not a {cls_name}")
        control = _from_pretrained(diffusers, "ControlNetModel", control_dir,
                                   extra[control_dir], torch_dtype, device)
    net: nn.Module
    if cls_name == "SD3Transformer2DModel":
        net = DiffusersSD3(net_model)
    else:
        keep = c_in if mapping.learned_variance and c_out == 2 * c_in else None
        net = DiffusersUNet(net_model, null_label=null_label, out_channels=keep,
                            controlnet=control, control_scale=control_scale)
    size = cfg.get("sample_size") or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    vae_model = vae_config = None
    if vae_dir is not None:
        vae_config = _read_json(vae_dir / "config.json")
        vae_model = _from_pretrained(diffusers, vae_config.get("_class_name", "AutoencoderKL"),
                                     vae_dir, extra[vae_dir], torch_dtype, device)
    encoder = None
    if text_dir is not None:
        from difflab.conditioning.text import CLIPTextEncoder

        # Stable Diffusion's U-Nets attend to all 77 positions, padding included
        encoder = CLIPTextEncoder(text_dir, attend_padding=True)
        if device is not None:
            encoder.to(device)
    # loaded to sample from, as its diffusers model is (no dropout draws, no batch statistics)
    denoiser = Denoiser(net, mapping.schedule, mapping.prediction).eval()
    return DiffusersModel(denoiser, net, mapping, cls_name, model_config, lay.scheduler,
                          model_dir, (c_in, int(h), int(w)), _weights_file(model_dir, variant),
                          vae_model, vae_config, control, encoder)


def from_diffusers(path: str | os.PathLike, **kwargs: Any) -> Denoiser:
    """The difflab :class:`~difflab.denoiser.Denoiser` of a local diffusers model or pipeline
    folder; ``kwargs`` as :func:`load_diffusers` (which also returns the configs)."""
    return load_diffusers(path, **kwargs).denoiser


# --- export --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusersExport:
    """What :func:`to_diffusers` wrote: the folder, the scheduler config and, when the network
    maps one to one onto a diffusers class, its config (else ``reason`` says why not)."""

    path: Path
    scheduler_config: dict[str, Any]
    model_config: dict[str, Any] | None = None
    reason: str | None = None
    files: tuple[str, ...] = field(default=())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    from difflab.files import write_json

    write_json(path, obj, what="exported config")


def to_diffusers(denoiser: Denoiser, path: str | os.PathLike, *,
                 scheduler_class: str | None = None, weights: bool = True) -> DiffusersExport:
    """Write ``denoiser`` as a diffusers model folder: ``scheduler_config.json`` always
    (:func:`~difflab.interop.schedulers.scheduler_config`; raises ValueError where diffusers
    cannot express the schedule or prediction) and, for a difflab ADM U-Net that maps one to
    one onto ``UNet2DModel`` (:func:`~difflab.interop.unet.unet_to_diffusers`), ``config.json``
    + ``diffusion_pytorch_model.safetensors``, which ``UNet2DModel.from_pretrained(path)`` and
    :func:`from_diffusers` open (a model loaded by :func:`from_diffusers` is saved by diffusers'
    own ``save_pretrained(safe_serialization=True)``). Otherwise only the scheduler config is
    written and ``reason`` says why the network does not map."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    sched = scheduler_config(denoiser.schedule, denoiser.parameterization, scheduler_class)
    _write_json(out / "scheduler_config.json", sched)
    files = ["scheduler_config.json"]
    model_config, reason = None, None
    if weights and isinstance(denoiser.net, (DiffusersUNet, DiffusersSD3)):  # loaded ones
        net = getattr(denoiser.net, "unet", None) or denoiser.net.transformer
        net.save_pretrained(out, safe_serialization=True)
        model_config = dict(net.config)
        files += ["config.json", f"{WEIGHTS_NAME}.safetensors"]
    elif weights:
        try:
            model_config, state = unet_to_diffusers(denoiser.net, denoiser.schedule)
        except NotImplementedError as e:
            reason = str(e)
        else:
            from difflab.files import safetensors_bytes, write_bytes

            write_bytes(out / f"{WEIGHTS_NAME}.safetensors",
                        safetensors_bytes(state, {"format": "pt"}), what="exported weights")
            _write_json(out / "config.json", model_config)
            files += ["config.json", f"{WEIGHTS_NAME}.safetensors"]
    else:
        reason = "weights=False"
    return DiffusersExport(out, sched, model_config, reason, tuple(files))
