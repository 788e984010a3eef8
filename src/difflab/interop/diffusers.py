"""diffusers-format models in and out.

**In** (:func:`load_diffusers`, :func:`from_diffusers`): a local folder holding a
``UNet2DModel`` or ``UNet2DConditionModel`` (``config.json`` + safetensors weights) with its
``scheduler_config.json``, or a pipeline folder (``model_index.json`` with ``unet/`` and
``scheduler/``). The network is diffusers' own model class (the optional extra ``pip install
difflab[diffusers]``) wrapped in :class:`DiffusersUNet`, which maps difflab's network call to
diffusers'::

    net(x, time_in, labels=, context=, context_mask=)
      = unet(x, time_in, class_labels=labels, encoder_hidden_states=context,
             encoder_attention_mask=context_mask).sample

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

__all__ = ["DiffusersUNet", "DiffusersModel", "DiffusersExport", "PickleRefused",
           "load_diffusers", "from_diffusers", "to_diffusers", "find_weights", "MODEL_CLASSES",
           "PICKLE_SUFFIXES"]

MODEL_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
"""The diffusers network classes :func:`load_diffusers` builds."""
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

    ``x`` is cast to the model's dtype and the output returned in it (the Denoiser casts it
    back); the time input reaches diffusers' sinusoidal embedding unrounded.
    """

    def __init__(self, unet: nn.Module, *, null_label: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        self.unet = unet
        self.null_label, self.out_channels = null_label, out_channels
        self.has_classes = getattr(unet, "class_embedding", None) is not None

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                **unused: Any) -> Tensor:
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
        out = self.unet(x.to(dtype), t, return_dict=False, **kw)[0]
        return out if self.out_channels is None else out[:, :self.out_channels]


# --- loading -------------------------------------------------------------------------------
def _is_pickle(name: str) -> bool:
    return name.endswith(PICKLE_SUFFIXES)


def find_weights(folder: str | os.PathLike) -> str | None:
    """The safetensors weights variant of a diffusers model folder: ``None`` for the plain
    ``diffusion_pytorch_model.safetensors`` (or its sharded index), else the variant name
    (``diffusion_pytorch_model.<variant>.safetensors``, when it is the only one). Raises
    :class:`PickleRefused` (without opening anything) when only pickle weights are there and
    FileNotFoundError when there are none."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if f"{WEIGHTS_NAME}.safetensors" in names or \
            f"{WEIGHTS_NAME}.safetensors.index.json" in names:
        return None
    variants = sorted({n[len(WEIGHTS_NAME) + 1:].split(".")[0] for n in names
                       if n.startswith(WEIGHTS_NAME + ".") and
                       (n.endswith(".safetensors") or n.endswith(".safetensors.index.json"))})
    if len(variants) == 1:
        return variants[0]
    if len(variants) > 1:
        raise ValueError(f"{folder} holds several weight variants {variants}; pass variant=")
    pickles = [n for n in names if _is_pickle(n)]
    if pickles:
        raise PickleRefused(
            f"{folder} holds its weights only as pickle ({', '.join(pickles)}), which can run "
            "code when opened; difflab loads safetensors only and has not opened it. Convert it "
            "once where you trust the file, with diffusers: model = <ModelClass>."
            "from_pretrained(folder, use_safetensors=False); model.save_pretrained(folder, "
            "safe_serialization=True) (or diffusers' convert scripts / from_single_file for a "
            ".ckpt); then load it here, which calls from_pretrained(..., use_safetensors=True)")
    raise FileNotFoundError(f"no {WEIGHTS_NAME}.safetensors in {folder}")


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _locate(path: Path, scheduler: dict | str | os.PathLike | None
            ) -> tuple[Path, dict[str, Any]]:
    """(model folder, scheduler config) of a model or pipeline folder."""
    if path.is_file():
        if _is_pickle(path.name):
            raise PickleRefused(f"{path} is a pickle file and was not opened; difflab loads "
                                "safetensors only (see find_weights for how to convert)")
        raise ValueError(f"{path} is a file; pass the folder of a diffusers model or pipeline "
                         "(single-file checkpoints: convert them with diffusers' "
                         "from_single_file(...).save_pretrained(folder, "
                         "safe_serialization=True))")
    if (path / "model_index.json").exists():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            found = {k: v[1] for k, v in index.items()
                     if isinstance(v, list) and len(v) == 2 and v[1]}
            raise NotImplementedError(f"pipeline {path} has no unet/ component ({found}); "
                                      f"supported networks: {list(MODEL_CLASSES)}")
        model_dir = path / "unet"
        default_sched = path / "scheduler" / "scheduler_config.json"
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
        return model_dir, _read_json(default_sched)
    if isinstance(scheduler, dict):
        return model_dir, dict(scheduler)
    return model_dir, _read_json(Path(scheduler))


@dataclass(frozen=True)
class DiffusersModel:
    """What :func:`load_diffusers` read: the difflab denoiser and the configs it came from.

    Attributes:
        denoiser: the network wrapped as a difflab :class:`~difflab.denoiser.Denoiser`.
        net: the :class:`DiffusersUNet` adapter (``net.unet`` is diffusers' model).
        mapping: the scheduler config read as a schedule and parameterisation
            (:class:`~difflab.interop.schedulers.SchedulerMapping`, with diffusers' sampling
            options that difflab leaves to its own samplers).
        model_class: diffusers' class name of the network.
        model_config: the network's ``config.json``.
        scheduler_config: the scheduler config as read.
        path: the model folder the weights came from.
        sample_shape: (C, H, W) of one sample from the network's config (``sample_size``).
    """

    denoiser: Denoiser
    net: DiffusersUNet
    mapping: SchedulerMapping
    model_class: str
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    path: Path
    sample_shape: tuple[int, int, int]

    @property
    def schedule(self) -> NoiseSchedule:
        return self.mapping.schedule

    @property
    def prediction(self) -> Parameterization:
        return self.mapping.prediction


def load_diffusers(path: str | os.PathLike, *, scheduler: dict | str | os.PathLike | None = None,
                   image_seq_len: int | None = None, shift: float | None = None,
                   null_label: int | None = None, variant: str | None = None,
                   torch_dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> DiffusersModel:
    """Load a local diffusers model or pipeline folder as a difflab denoiser (module docstring).

    Args:
        path: a model folder (``config.json``, ``diffusion_pytorch_model.safetensors``,
            ``scheduler_config.json``) or a pipeline folder (``model_index.json``, ``unet/``,
            ``scheduler/``). Nothing is downloaded.
        scheduler: the scheduler config (a dict or a path to its JSON) when the folder has
            none, or to override it.
        image_seq_len / shift: the shift of a dynamically shifted flow model (Flux) from the
            image token count, or given directly; ``shift`` also overrides a fixed shift.
        null_label: the class index meaning "no class" of a class-conditional model.
        variant: the weights variant (``diffusion_pytorch_model.<variant>.safetensors``);
            found automatically when there is only one.
        torch_dtype / device: passed to diffusers' ``from_pretrained`` / moved to.

    Raises:
        PickleRefused: the weights exist only as pickle; nothing was opened.
        NotImplementedError: the network is not one of :data:`MODEL_CLASSES`.
    """
    model_dir, sched_cfg = _locate(Path(path), scheduler)
    model_config = _read_json(model_dir / "config.json")
    cls_name = model_config.get("_class_name", "")
    if cls_name not in MODEL_CLASSES:
        raise NotImplementedError(f"{model_dir} holds a {cls_name or 'model without _class_name'}"
                                  f"; supported networks: {list(MODEL_CLASSES)}")
    mapping = from_scheduler_config(sched_cfg, image_seq_len=image_seq_len, shift=shift)
    found = find_weights(model_dir)  # before diffusers sees the folder: refuses pickle unopened
    variant = variant if variant is not None else found
    diffusers = _require_diffusers()
    kw: dict[str, Any] = {"use_safetensors": True, "local_files_only": True,
                         "low_cpu_mem_usage": False}
    if variant is not None:
        kw["variant"] = variant
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    unet = getattr(diffusers, cls_name).from_pretrained(str(model_dir), **kw)
    unet.eval()
    if device is not None:
        unet.to(device)
    cfg = dict(unet.config)
    c_in, c_out = int(cfg["in_channels"]), int(cfg["out_channels"])
    keep = c_in if mapping.learned_variance and c_out == 2 * c_in else None
    net = DiffusersUNet(unet, null_label=null_label, out_channels=keep)
    size = cfg.get("sample_size") or 64
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    denoiser = Denoiser(net, mapping.schedule, mapping.prediction)
    return DiffusersModel(denoiser, net, mapping, cls_name, model_config, sched_cfg, model_dir,
                          (c_in, int(h), int(w)))


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
    if weights and isinstance(denoiser.net, DiffusersUNet):  # a loaded diffusers model
        denoiser.net.unet.save_pretrained(out, safe_serialization=True)
        model_config = dict(denoiser.net.unet.config)
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
