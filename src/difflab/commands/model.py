"""A checkpoint ready to sample: the one place each of

* building its (guided) denoiser: :func:`load_model`;
* the shape of one sample: :func:`sample_shape`;
* the solver it is sampled with: :func:`choose_solver`;
* chunked, seeded sampling: :func:`sample_images`.

``difflab sample``, ``difflab eval`` and ``difflab tune-grid`` (and a web UI or a notebook)
compose these::

    model = load_model("runs/fm", guidance=Guidance(cfg=1.5))
    solver = choose_solver(model.checkpoint, "auto", 10, guidance=model.guided.fits)
    samples = sample_images(model, solver, 64, seed=0)       # samples.images: (64, C, H, W)

A local diffusers model or pipeline folder (issue #17, :mod:`difflab.interop`) loads through
the same functions: :func:`load_model` reads it with :func:`~difflab.interop.load_diffusers`
(its sample shape from the network's config, a latent pipeline's VAE decoding the samples,
prompts through its text encoder), and its fits live beside it, never in it
(:func:`fit_store`: ``<folder>.difflab/fits.json``).

Seeding: the initial noise of all ``count`` images is drawn up front from one generator
seeded with ``seed`` (image i's noise does not depend on the batch size), and a stochastic
sampler draws image i's noise during sampling from its own generator, seeded with
``mix_seed(seed, i)``. So one seed gives the same images whatever the batch size, in
``difflab sample`` as in ``difflab eval``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.commands.common import ParameterError, param
from difflab.commands.guidance import Guidance, Guided, guide

__all__ = ["Model", "load_model", "load_diffusers_model", "load_prompted_model",
           "PromptGuided", "prompt_fits", "fit_store",
           "sample_shape", "Solver", "choose_solver", "Samples", "sample_images",
           "image_generators"]


def sample_shape(config: dict[str, Any]) -> tuple[int, ...]:
    """The shape of one sample of a model trained with ``config``: (C, H, W) for images
    (``data.channels``, default 1, and ``data.resolution``, a size or [H, W]), else (D,) for
    points (``data.channels``, default 2)."""
    data = config.get("data", {}) or {}
    res = data.get("resolution")
    if not res:
        return (int(data.get("channels") or 2),)
    h, w = (res, res) if isinstance(res, int) else res
    return (int(data.get("channels") or 1), int(h), int(w))


@dataclass(frozen=True, eq=False)
class Model:
    """A loaded checkpoint: ``denoiser`` (its EMA or raw weights, unguided) and ``guided``
    (the denoiser to sample, guided as asked, and the labels to sample it with). ``decode``
    (a latent diffusers pipeline's VAE): the samples' latents -> images; None: the samples are
    the images."""

    checkpoint: Path
    config: dict[str, Any]
    denoiser: Any
    guided: Guided
    ema: bool = True
    decode: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one sample (:func:`sample_shape`)."""
        return sample_shape(self.config)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.denoiser.parameters()), torch.device("cpu"))


def load_model(checkpoint: str | os.PathLike, *, ema: bool = True,
               device: str | torch.device = "cpu",
               guidance: Guidance | None = None) -> Model:
    """The checkpoint (or run directory) ``checkpoint`` as a :class:`Model`: its EMA weights
    (``ema=False``: the raw ones) on ``device``, guided by ``guidance``
    (:func:`~difflab.commands.guidance.guide`). A diffusers model or pipeline folder loads
    through :func:`load_diffusers_model` (it has no EMA copy: ``ema`` only names its fits).
    Raises FileNotFoundError for a missing checkpoint and the errors of
    :func:`~difflab.commands.guidance.guide`."""
    from difflab.interop import is_diffusers_folder
    from difflab.train.checkpoint import load_denoiser, resolve

    if is_diffusers_folder(checkpoint):
        return load_diffusers_model(checkpoint, ema=ema, device=device, guidance=guidance)
    den, config = load_denoiser(checkpoint, ema=ema, device=device)
    return Model(resolve(checkpoint), config, den, guide(den, config, guidance), ema)


@dataclass(frozen=True, eq=False)
class PromptGuided:
    """A text-conditioned model's :class:`~difflab.commands.guidance.Guided` (a diffusers
    pipeline's, or a difflab text-to-image checkpoint's): ``labels(count)`` is the
    :class:`~difflab.denoiser.condition.Condition` of ``count`` samples (prompt i mod P,
    control image i mod N), encoded by the model's text encoder with the empty prompt (or
    ``negative_prompt``) as the null of classifier-free guidance. ``fits``: the guidance part
    of the keys of the fits it runs (:func:`prompt_fits`)."""

    denoiser: Any
    encoder: Any
    prompts: tuple[str, ...]
    negative_prompt: str | None = None
    control: Tensor | None = None
    num_classes: None = None
    label: None = None
    fits: str = "prompts"  # no fit is stored under this: the probe's plan

    def labels(self, count: int) -> Any:
        rows = torch.arange(count)
        prompts = [self.prompts[int(i) % len(self.prompts)] for i in rows]
        fields = {} if self.control is None else {"control": self.control[rows % len(
            self.control)]}
        with torch.no_grad():
            return self.encoder.condition(prompts, self.negative_prompt, **fields)


def prompt_fits(cfg: float, cfg_rescale: float = 0.0, *, negative_prompt: bool = False,
                control: bool = False, interval: bool = False) -> str:
    """The guidance part of the fit keys of prompted sampling: ``cfg=W`` (w = 0: the
    conditional model), what ``difflab tune-grid --prompts-file F --cfg W`` stores (the fit is
    calibrated over the file's prompts and serves any prompt: the ODE's form is set by the
    guidance, the prompt moves its drift). A negative prompt, control images or a guidance
    interval change the ODE in ways tune-grid does not fit: their tags hold no fit, and the
    probe's plan runs."""
    from difflab.fitting.store import guidance_tag

    extra = [name for name, on in (("negative", negative_prompt), ("control", control),
                                   ("interval", interval)) if on]
    return ",".join([guidance_tag(cfg, cfg_rescale), *extra])


def _prompt_guidance(guidance: Guidance | None, path: Any) -> tuple[float, float]:
    """(w, phi) of classifier-free guidance towards a prompt; ParameterError for class-label
    options or a weight out of range."""
    g = guidance or Guidance()
    if g.label is not None or g.classifier is not None:
        raise ParameterError(f"{param('label')} / {param('classifier')} guide class labels; "
                             f"{path} is conditioned on text")
    w, phi = float(g.cfg or 0.0), float(g.cfg_rescale or 0.0)
    if w < 0 or not 0.0 <= phi <= 1.0:
        raise ParameterError(f"{param('cfg')} must be >= 0 and {param('cfg_rescale')} in "
                             f"[0, 1], got {w}, {phi}")
    return w, phi


def load_prompted_model(checkpoint: str | os.PathLike, prompts: Sequence[str], *,
                        ema: bool = True, device: str | torch.device = "cpu",
                        guidance: Guidance | None = None) -> Model:
    """A difflab text-to-image checkpoint (or run directory) as a :class:`Model` on its
    latents: its latent denoiser, guided towards prompt i mod P (classifier-free guidance
    ``guidance.cfg`` away from the empty prompt), its autoencoder decoding the samples.
    Raises ParameterError for class-label guidance options or a bad weight."""
    from difflab.pipelines.text_to_image import TextToImagePipeline
    from difflab.train.checkpoint import resolve

    w, phi = _prompt_guidance(guidance, checkpoint)
    pipe = TextToImagePipeline.from_checkpoint(checkpoint, ema=ema, device=device)
    C, H, W = pipe.latent_shape
    config = {**pipe.config, "data": {"channels": C, "resolution": [H, W]}}
    guided = PromptGuided(pipe.guided(w, cfg_rescale=phi), pipe.text_encoder, tuple(prompts),
                          fits=prompt_fits(w, phi))
    return Model(resolve(checkpoint), config, pipe.denoiser, guided, ema, pipe.decode)


def _diffusers_config(m: Any) -> dict[str, Any]:
    """The difflab-style config of a loaded diffusers model: what :func:`sample_shape` and
    :func:`~difflab.commands.guidance.guide` read (shape, classes), and where it came from."""
    C, H, W = m.sample_shape
    data: dict[str, Any] = {"channels": C, "resolution": [H, W]}
    net: dict[str, Any] = {"type": "diffusers", "class": m.model_class}
    if m.num_classes:
        data["num_classes"] = net["num_classes"] = m.num_classes
    return {"data": data, "net": net, "diffusers": {
        "path": str(m.path), "scheduler": m.scheduler_config,
        "scaling_factor": m.scaling_factor, "shift_factor": m.shift_factor}}


def load_diffusers_model(path: str | os.PathLike, *, ema: bool = True,
                         device: str | torch.device = "cpu", guidance: Guidance | None = None,
                         prompts: Sequence[str] | None = None,
                         negative_prompt: str | None = None,
                         control: Tensor | Callable[[tuple[int, int, int]], Tensor] | None
                         = None) -> Model:
    """A local diffusers model or pipeline folder as a :class:`Model`
    (:func:`~difflab.interop.load_diffusers`; weights from safetensors only, every component
    checked before anything is opened). Its sample shape comes from the network's config
    (``sample_size``, ``in_channels``), a latent pipeline's VAE decodes the samples
    (``latents / scaling_factor + shift_factor``, from ``vae/config.json``). A class-conditional
    ``UNet2DModel`` is guided as a difflab one (``guidance``); a text-conditioned one
    (``UNet2DConditionModel``) needs ``prompts`` and the pipeline's text encoder, a ControlNet
    pipeline its ``control`` images ((N, C, H, W) in [0, 1], or a function of the (C, H, W)
    the ControlNet takes returning them); ``guidance.cfg`` is classifier-free
    guidance towards the prompt and away from the empty (or ``negative_prompt``).
    Raises ParameterError for a missing or unusable condition,
    :class:`~difflab.interop.PickleRefused` for pickle-only weights."""
    from difflab.interop import check_safetensors, load_diffusers

    g = guidance or Guidance()
    check_safetensors(path)  # before any weights are read, in every component
    m = load_diffusers(path, device=device, text_encoder=prompts is not None)
    config = _diffusers_config(m)
    den, decode = m.denoiser, (m.decode if m.vae is not None else None)
    if not m.needs_context:
        if prompts is not None or control is not None:
            given = param("prompt") if prompts is not None else param("control_image")
            raise ParameterError(f"{given}: {path} holds a {m.model_class}, which takes no "
                                 "text or control condition")
        if m.num_classes and (g.cfg or g.cfg_rescale) and m.net.null_label is None:
            raise ParameterError(f"{param('cfg')}: {path} is class-conditional with no null "
                                 "class to guide away from (from Python: load_diffusers(path, "
                                 "null_label=K) if class K means 'no class')")
        return Model(Path(path), config, den, guide(den, config, g), ema, decode)
    if prompts is None:
        raise ParameterError(f"{path} holds a text-conditioned {m.model_class}: give "
                             f"{param('prompt')} \"...\" (difflab sample) or "
                             f"{param('prompts_file')} F (difflab sample, difflab tune-grid); "
                             "eval runs unconditional and class-conditional models only")
    if m.text_encoder is None:
        raise ParameterError(f"{param('prompt')}: {path} has no text_encoder/ + tokenizer/ to "
                             "encode prompts with (a pipeline folder with a CLIPTextModel is "
                             "needed; from Python, pass cond=Condition(context=...))")
    if m.controlnet is not None and control is None:
        raise ParameterError(f"{path} runs with a ControlNet: give its control image with "
                             f"{param('control_image')}")
    if control is not None and m.controlnet is None:
        raise ParameterError(f"{param('control_image')}: {path} has no controlnet/")
    if callable(control):  # a reader, given the shape the ControlNet takes: its
        c = m.controlnet.config  # conditioning embedding's strided convs reach the latent size
        f = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
        _, h, w = m.sample_shape
        control = control((int(c.conditioning_channels), h * f, w * f))
    w, phi = _prompt_guidance(g, path)
    guided = den
    if w or phi:
        from difflab.guidance import classifier_free

        guided = classifier_free(den, w, rescale=phi)  # the null half: the empty prompt
    fits = prompt_fits(w, phi, negative_prompt=negative_prompt is not None,
                       control=control is not None)
    return Model(Path(path), config, den, PromptGuided(
        guided, m.text_encoder, tuple(prompts), negative_prompt, control, fits=fits), ema,
        decode)


def fit_store(checkpoint: str | os.PathLike, ema: bool = True) -> tuple[Path, Path]:
    """(the folder whose ``fits.json`` holds a checkpoint's fits, the weights file they
    belong to). A difflab checkpoint directory (or the run directory holding it): the
    checkpoint directory and its (EMA) network weights (:func:`difflab.fitting.
    weights_file`). A diffusers folder: ``<folder>.difflab`` beside it
    (:func:`difflab.interop.fits_folder`; the model's folder is never written) and its
    network's safetensors file."""
    from difflab.interop import fits_folder, is_diffusers_folder, network_weights
    from difflab.train.checkpoint import resolve, weights_file

    if is_diffusers_folder(checkpoint):
        return fits_folder(checkpoint), network_weights(checkpoint)
    ckpt = resolve(checkpoint)
    return ckpt, weights_file(ckpt, ema)


# --- the solver ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Solver:
    """What a checkpoint is sampled with: ``sampler`` for ``steps`` steps on the ``spacing``
    rule's grid (None: the sampler's default), or as the ``fit`` stored with the checkpoint
    (a tuned grid, or a fitted bespoke solver) says. ``sampler = "auto"`` with no fit: the
    plan a probe of the model picks (:func:`difflab.samplers.default_plan`), which
    :func:`sample_images` resolves once per run and returns as the Samples' solver with
    ``probed`` set."""

    sampler: str
    steps: int
    spacing: str | None = None
    fit: Any = None  # a difflab.fitting.Fit (a SolverPlan)
    probed: bool = False

    @property
    def source(self) -> str:
        """"fitted" (a bespoke solver fitted to the checkpoint), "tuned" (a grid tuned to it),
        "probe" (the default call's probe of the model), "spacing" (an explicit rule) or
        "default" (the sampler's default grid)."""
        if self.probed or (self.sampler == "auto" and self.fit is None):
            return "probe"
        if self.fit is not None:
            return "fitted" if self.fit.coeffs is not None else "tuned"
        return "spacing" if self.spacing is not None else "default"

    def resolve(self, denoiser: Any, noise: Tensor, cond: Any = None) -> Solver:
        """This solver with the probe's plan filled in when it is the default call's
        (``sampler = "auto"``, no fit): resolved once, from the first chunk's noise shape and
        condition, so every chunk of a run samples with the same plan; kept between runs in
        the user's cache (:mod:`difflab.commands.plan_cache`), so a model is probed once."""
        from difflab.commands.plan_cache import default_plan
        from difflab.samplers import AUTO, choose

        if self.sampler != AUTO or self.fit is not None:
            return self
        plan = default_plan(denoiser, self.steps, noise, cond)
        if plan is None:  # out of the probe's step range: what sample() runs there
            return replace(self, sampler=choose(None, None, denoiser.parameterization))
        return replace(self, sampler=plan.sampler, fit=plan, probed=True)

    def sample_kwargs(self) -> dict[str, Any]:
        """The arguments of :func:`difflab.sample` that select this solver."""
        return {"sampler": self.sampler, "steps": self.steps, "spacing": self.spacing,
                "fit": self.fit}


def choose_solver(checkpoint: str | os.PathLike | None, sampler: str = "auto", steps: int = 10,
                  *, spacing: str | None = None, ema: bool = True,
                  guidance: str | None = None) -> Solver:
    """The solver a checkpoint (directory, as :attr:`Model.checkpoint`) is sampled with.

    An explicit ``spacing`` wins (``sampler`` on that rule's grid; "auto": dpmpp_2m).
    Otherwise the fit stored with the checkpoint for ``sampler`` and ``steps`` runs (for
    "auto": the bespoke solver fitted for ``steps``, else dpmpp_2m's tuned grid; the rule is
    :func:`difflab.fitting.choose_fit`'s; a guided model's fits are those stored for its
    ``guidance``, :attr:`Guided.fits <difflab.commands.guidance.Guided.fits>`), else the
    sampler on its default grid; "auto"
    with no fit, spacing or consistency model: ``Solver("auto", steps)``, the default call's
    plan (the probe's for 2-40 steps), resolved by :meth:`Solver.resolve`.
    ``checkpoint=None``: no stored fits. Raises ParameterError for an unknown sampler or
    spacing, or steps < 1.
    """
    from difflab.fitting import choose_fit
    from difflab.interop import is_diffusers_folder
    from difflab.samplers import AUTO, SPACINGS, choose, names

    if sampler != AUTO and sampler not in names():
        raise ParameterError(f"unknown {param('sampler')} {sampler!r}; valid: {AUTO}, "
                             f"{', '.join(names())}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ParameterError(f"{param('steps')} must be an integer >= 1, got {steps!r}")
    if spacing is not None and spacing not in SPACINGS:
        raise ParameterError(f"unknown {param('spacing')} {spacing!r}; valid: "
                             f"{', '.join(SPACINGS)}")
    fit = None
    if checkpoint is not None:
        store, weights = fit_store(checkpoint, ema)  # the fit belongs to these weights
        fit = choose_fit(store, sampler, steps, spacing=spacing, ema=ema, weights=weights,
                         guidance=guidance)
    prediction = None if checkpoint is None or is_diffusers_folder(checkpoint) else \
        _consistency_steps(checkpoint, steps)
    if sampler == AUTO and fit is None and spacing is None and prediction is None:
        return Solver(AUTO, steps)  # the default call's plan, resolved by Solver.resolve
    return Solver(choose(sampler, fit, prediction), steps, spacing, fit)


def _consistency_steps(checkpoint: str | os.PathLike, steps: int) -> Any:
    """A consistency checkpoint's parameterisation (its default sampler is ``consistency``),
    after checking ``steps`` against its trained sigma grid; None for other checkpoints."""
    from difflab.train.checkpoint import denoiser_parts, read_config

    config = read_config(checkpoint)
    if config.get("kind") != "consistency":
        return None
    from difflab.train.distill import max_sampling_steps

    limit = max_sampling_steps(config)
    if limit is not None and steps > limit:
        raise ParameterError(f"{param('steps')} = {steps} is more than this consistency "
                             f"model's sigma grid allows ({limit}: it was trained on "
                             f"{limit + 1} noise levels); use 1-4 steps")
    return denoiser_parts(config)[1]


# --- sampling -------------------------------------------------------------------------------
def image_generators(seed: int, start: int, stop: int) -> list[torch.Generator]:
    """One CPU generator per image ``start .. stop - 1``: image i's is seeded with
    ``mix_seed(seed, i)``, so it draws the same numbers in any batch."""
    from difflab.data.dataset import mix_seed

    return [torch.Generator().manual_seed(mix_seed(seed, i)) for i in range(start, stop)]


@dataclass(frozen=True, eq=False)
class Samples:
    """``images``: (count, *shape) floats on the CPU as the sampler returned them (images in
    about [-1, 1], not clamped); ``labels``: their class labels (None: unconditional);
    ``solver``: what ran; ``network_rows``: the network's evaluations summed over images
    (a classifier-free guided step counts two per image); ``network_calls``: its forward
    calls; ``batches``; ``seconds`` of sampling."""

    images: Tensor
    labels: Tensor | None
    solver: Solver
    network_rows: int = 0
    network_calls: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def nfe(self) -> float:
        """Network evaluations per image."""
        return self.network_rows / max(1, self.images.shape[0])


class _NetCounter:
    """Counts network evaluations: the sum of the batch sizes the network sees, and calls."""

    def __init__(self, net: torch.nn.Module | None):
        self.rows = self.calls = 0
        self.handle = None if net is None else net.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: tuple, output: Any) -> None:
        self.rows += int(args[0].shape[0]) if args else 0
        self.calls += 1

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def sample_images(model: Model, solver: Solver, count: int, *, seed: int = 0,
                  batch_size: int = 256) -> Samples:
    """``count`` samples of ``model`` with ``solver``, ``batch_size`` at a time, from ``seed``
    (the module docstring says how a seed becomes noise). The one chunked sampling loop of the
    commands. The labels are ``model.guided.labels(count)`` (a Condition for a prompted
    diffusers model). A latent model's samples are decoded (``model.decode``)."""
    from difflab.samplers import sample

    if not isinstance(count, int) or count < 1:
        raise ParameterError(f"{param('count')} must be at least 1, got {count}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"{param('batch_size')} must be at least 1, got {batch_size}")
    device = model.device
    noise = torch.randn((count,) + model.shape, generator=torch.Generator().manual_seed(seed))
    labels = model.guided.labels(count)
    solver = solver.resolve(model.guided.denoiser, noise[:batch_size].to(device),
                            None if labels is None else labels[:batch_size].to(device))
    counter = _NetCounter(getattr(model.denoiser, "net", None))
    chunks = []
    t0 = time.perf_counter()
    try:
        # classifier guidance takes its gradient under torch.enable_grad (difflab.guidance)
        with torch.no_grad():
            for i in range(0, count, batch_size):
                j = min(count, i + batch_size)
                cond = None if labels is None else labels[i:j].to(device)
                x = sample(model.guided.denoiser, noise[i:j].to(device), cond=cond,
                           generator=image_generators(seed, i, j), **solver.sample_kwargs())
                if model.decode is not None:  # a latent diffusers pipeline's VAE
                    x = model.decode(x)
                chunks.append(x.detach().float().cpu())
    finally:
        counter.remove()
    return Samples(torch.cat(chunks), labels, solver, counter.rows, counter.calls,
                   len(chunks), time.perf_counter() - t0)
