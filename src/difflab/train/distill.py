"""Consistency models from a trained diffusion model (issue #20): the run's config, its modules,
and the ``"consistency"`` objective kind (registered here, above the samplers, because
distillation's teacher step is a sampler's: ``functools.partial(samplers.step, sampler=...)``).

    config = distill_config(teacher_config, method="cd", teacher_path="runs/fm/checkpoint")
    modules = distill_modules(config, teacher_net)       # "net" (and "teacher" for cd)
    Trainer(config, out, modules=modules, references={"teacher": path}).run(max_minutes=30)

A consistency checkpoint is a denoiser (kind ``"consistency"``; the teacher's network, schedule
and data, the prediction a :class:`~difflab.denoiser.parameterization.Consistency` whose
``inner`` is the teacher's parameterisation), so ``difflab sample OUT --steps 1`` runs the
``consistency`` sampler on it.

Methods (``config["consistency"]["method"]``):

* ``cd``  consistency distillation (Song et al. 2023, Alg. 2): student and its EMA target
  (``train.ema_decay`` = mu = 0.95) from the teacher's weights; the frozen teacher's ODE step by
  ``solver`` (heun by default; any of :data:`difflab.samplers.STEPS`); N = 18 Karras points;
  squared L2. A class-conditional teacher is distilled *guided* (``cfg`` = w of
  classifier-free guidance, default 0: the conditional ODE): the student then needs no
  guidance at sampling time (pass none).
* ``ct``  improved consistency training from scratch (Song & Dhariwal 2023): a fresh network of
  the teacher's architecture (the teacher only supplies the architecture, schedule and data).
* ``ect`` easy consistency tuning (Geng et al. 2024): the teacher's weights, no teacher calls.

* ``lcd`` latent consistency distillation (Luo et al. 2023) of a text-to-image model: the
  teacher's step by DDIM (LCM's; see ``DEFAULTS``); the student takes the guidance weight w as
  an input (:mod:`difflab.objectives.latent_consistency`);
  w ~ U[``w_range``] per row, the teacher guided at that w; the checkpoint is a text-to-image
  checkpoint (its pipeline samples it with the ``consistency`` sampler, ``cfg`` = w by default
  ``sample_cfg``). :func:`latent_distill_trainer` builds its run.

``train.steps`` (K) sets the N(k) doubling (ct) and ECT's stages: a run stopped early by a
time budget has gone through the stages K says up to where it stopped. Learning rates: 1e-4
for cd / ect (the papers' 1e-5 .. 2e-5 serve runs of 10^5 steps at batch 256-512 on GPUs; a
CPU run of a few hundred steps at batch 32 needs more), 1e-3 for ct (a network from scratch).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import difflab.train.checkpoint as ckpt
from difflab.denoiser.parameterization import Consistency, get
from difflab.objectives.consistency import (
    ConsistencyDistillation,
    ConsistencyObjective,
    ConsistencyTraining,
    EasyConsistencyTuning,
)
from difflab.objectives.latent_consistency import LatentConsistencyDistillation
from difflab.train.config import LOOP_DEFAULTS, check_loop
from difflab.train.trainer import Trainer, register_objective

__all__ = ["METHODS", "DEFAULTS", "distill_config", "distill_modules", "consistency_objective",
           "max_sampling_steps", "latent_distill_config", "latent_consistency_objective",
           "latent_distill_trainer"]

METHODS = ("cd", "ct", "ect")
#: the method of a text-to-image teacher
LATENT_METHOD = "lcd"

#: per method: the "consistency" section and the loop options it changes
DEFAULTS: dict[str, dict[str, Any]] = {
    "cd": {"consistency": {"solver": "heun", "N": 18, "distance": "l2", "sigma_data": 0.05,
                           "cfg": 0.0, "index_groups": 4},
           "train": {"ema_decay": 0.95, "lr": 1e-4, "warmup": 0, "steps": 4000,
                     "batch_size": 32}},
    "ct": {"consistency": {"s0": 10, "s1": 1280, "distance": "pseudo_huber", "sigma_data": 0.5},
           "train": {"ema_decay": 0.999, "lr": 1e-3, "warmup": 100, "steps": 4000,
                     "batch_size": 32}},
    "ect": {"consistency": {"distance": "pseudo_huber", "sigma_data": 0.05, "q": 2.0},
            "train": {"ema_decay": 0.999, "lr": 1e-4, "warmup": 0, "steps": 4000,
                      "batch_size": 32}},
    # DDIM (LCM's solver): its data-prediction form x_t = (sigma_t / sigma_s) x_s + alpha_t (1 -
    # e^-h) x0_hat stays bounded on the pair from t = 1 (sigma~ = 2e4 on the cosine chain) to
    # sigma~ = 80, where Heun's step in sigma~ multiplies the guided teacher's error by 2e4:
    # measured on runs/t2i_bench at w = 4, |x^| up to 28 and a pair loss of 2700 (DDIM: 4.4, 26).
    # Unguided, Heun is the better teacher step (cd on Fashion-MNIST: 1-step FID 44.6 vs 47.8)
    "lcd": {"consistency": {"solver": "ddim", "N": 18, "distance": "l2", "sigma_data": 0.05,
                            "w_range": [0.0, 4.0], "sample_cfg": 3.0, "sample_steps": 4,
                            "index_groups": 4},
            "train": {"ema_decay": 0.95, "lr": 1e-4, "warmup": 0, "steps": 4000,
                      "batch_size": 32}},
}


def _loop(teacher: dict[str, Any], method: str, train: dict[str, Any] | None) -> dict[str, Any]:
    """The training-loop section of a run distilled from ``teacher``'s config."""
    tt = teacher.get("train", {})
    loop = {**LOOP_DEFAULTS, **{k: tt[k] for k in LOOP_DEFAULTS if k in tt}}
    loop.update({"max_minutes": None, "ckpt_every": 200, "log_every": 20})
    loop.update(DEFAULTS[method]["train"])
    loop.update(train or {})
    check_loop(loop)
    return loop


def distill_config(teacher: dict[str, Any], *, method: str = "cd", solver: str | None = None,
                   teacher_path: str | None = None, train: dict[str, Any] | None = None,
                   consistency: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config of a consistency run from a diffusion model's config ``teacher`` (as
    ``checkpoint.read_config`` gives it). Raises ValueError for a teacher that is not a
    diffusion model, an unknown method or a solver without a one-step form."""
    from difflab.samplers import STEPS

    kind = teacher.get("kind", "diffusion")
    if kind != "diffusion":
        raise ValueError(f"the teacher must be a diffusion model, got a checkpoint of kind "
                         f"{kind!r}" + (f" ({teacher_path})" if teacher_path else ""))
    for key in ("net", "schedule", "data"):
        if not isinstance(teacher.get(key), dict):
            raise ValueError(f"the teacher's config has no {key!r} section; is it a diffusion "
                             "checkpoint?")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")
    defaults = DEFAULTS[method]
    cons = {**defaults["consistency"], **(consistency or {}), "method": method}
    if solver is not None:
        cons["solver"] = solver
    if method == "cd" and cons["solver"] not in STEPS:
        raise ValueError(f"unknown teacher solver {cons['solver']!r}; valid (one-step "
                         f"solvers): {list(STEPS)}")
    inner = teacher.get("prediction", "eps")
    inner_cfg = inner if isinstance(inner, dict) else get(
        inner, sigma_data=float(teacher.get("sigma_data", 0.5))).config()
    prediction = Consistency(float(cons["sigma_data"]),
                             inner=None if method == "ct" else inner_cfg).config()
    tt = teacher.get("train", {})
    loop = _loop(teacher, method, train)
    return {"kind": "consistency", "net": copy.deepcopy(teacher["net"]),
            "schedule": copy.deepcopy(teacher["schedule"]), "prediction": prediction,
            "data": copy.deepcopy(teacher["data"]), "consistency": cons,
            "teacher": {"path": teacher_path, "prediction": inner_cfg,
                        "conditional": bool(tt.get("conditional"))},
            "train": loop}


def max_sampling_steps(config: dict[str, Any]) -> int | None:
    """The most sampling steps a consistency model resolves: N - 1 of a distilled model's
    discretisation, s1 for consistency training, None (no limit but the sampler's) else."""
    cons = config.get("consistency") or {}
    if cons.get("method") in ("cd", LATENT_METHOD):
        return int(cons.get("N", 18)) - 1
    if cons.get("method") == "ct":
        return int(cons.get("s1", 1280))
    return None


def distill_modules(config: dict[str, Any], teacher_net: nn.Module) -> dict[str, nn.Module]:
    """The modules a run of ``config`` starts from: ``"net"`` a copy of the teacher's network
    (cd, ect; ct builds a fresh one), and the frozen ``"teacher"`` itself (cd)."""
    method = config["consistency"]["method"]
    modules: dict[str, nn.Module] = {}
    if method in ("cd", "ect"):
        modules["net"] = copy.deepcopy(teacher_net).train().requires_grad_(True)
    if method == "cd":
        modules["teacher"] = teacher_net.eval().requires_grad_(False)
    return modules


def consistency_objective(config: dict[str, Any]) -> ConsistencyObjective:
    """The objective of a ``"consistency"`` config (registered as that kind)."""
    from difflab import samplers

    cons, tc = config["consistency"], config["train"]
    schedule, parameterization = ckpt.denoiser_parts(config)
    method = cons.get("method", "cd")
    conditional = bool(config.get("teacher", {}).get("conditional"))
    common = {"distance": cons.get("distance", "pseudo_huber"), "huber_c": cons.get("huber_c"),
              "conditional": conditional}
    if method == "cd":
        guide = None
        w = float(cons.get("cfg", 0.0))
        if conditional and w:
            from difflab.guidance import classifier_free

            def guide(den: Any) -> Any:
                return classifier_free(den, w)
        teacher_param = ckpt.denoiser_parts({**config, "prediction":
                                             config["teacher"]["prediction"]})[1]
        return ConsistencyDistillation(
            schedule, parameterization, functools.partial(samplers.step, sampler=cons["solver"]),
            teacher_param, teacher_guide=guide, N=int(cons.get("N", 18)),
            index_groups=cons.get("index_groups"), **common)
    if method == "ct":
        return ConsistencyTraining(schedule, parameterization, total_steps=int(tc["steps"]),
                                   s0=int(cons.get("s0", 10)), s1=int(cons.get("s1", 1280)),
                                   **common)
    if method == "ect":
        return EasyConsistencyTuning(schedule, parameterization, total_steps=int(tc["steps"]),
                                     q=float(cons.get("q", 2.0)), **common)
    raise ValueError(f"unknown method {method!r}; valid: {list(METHODS)}")


register_objective("consistency", consistency_objective)


# --- latent consistency distillation of a text-to-image model ---------------------------------
def latent_distill_config(teacher: dict[str, Any], *, teacher_path: str | None = None,
                          solver: str | None = None, train: dict[str, Any] | None = None,
                          consistency: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config of a latent consistency model distilled from the text-to-image config
    ``teacher``: a text-to-image config (so its pipeline loads it) whose net takes the guidance
    weight (``guidance_embed``), whose prediction is Consistency with the teacher's as
    ``inner``, and whose ``sample`` section runs the consistency sampler."""
    from difflab.samplers import STEPS

    if teacher.get("kind") != "text_to_image":
        raise ValueError(f"latent consistency distillation needs a text-to-image teacher, got "
                         f"a {teacher.get('kind')!r} checkpoint")
    if isinstance(teacher.get("prediction"), dict) and \
            teacher["prediction"].get("type") == "consistency":
        raise ValueError("the teacher is already a consistency model; distil its diffusion "
                         "teacher instead")
    cons = {**DEFAULTS[LATENT_METHOD]["consistency"], **(consistency or {}),
            "method": LATENT_METHOD}
    if solver is not None:
        cons["solver"] = solver
    if cons["solver"] not in STEPS:
        raise ValueError(f"unknown teacher solver {cons['solver']!r}; valid (one-step "
                         f"solvers): {list(STEPS)}")
    inner = teacher.get("prediction", "eps")
    inner_cfg = inner if isinstance(inner, dict) else get(
        inner, sigma_data=float(teacher.get("sigma_data", 0.5))).config()
    net = {**copy.deepcopy(teacher["net"]), "guidance_embed": True}
    if net.get("type") != "unet":
        raise ValueError(f"latent consistency distillation adds a guidance-weight input to a "
                         f"U-Net; this teacher's network is a {net.get('type')!r}")
    config = copy.deepcopy(teacher)
    config.update(
        net=net, prediction=Consistency(float(cons["sigma_data"]), inner=inner_cfg).config(),
        consistency=cons, teacher={"path": teacher_path, "prediction": inner_cfg},
        train=_loop(teacher, LATENT_METHOD, train),
        sample={"sampler": "consistency", "steps": int(cons["sample_steps"]),
                "cfg": float(cons["sample_cfg"])})
    return config


def latent_consistency_objective(config: dict[str, Any]) -> LatentConsistencyDistillation:
    """The objective of a latent consistency config (:func:`latent_distill_config`)."""
    from difflab import samplers
    from difflab.guidance import guidance_from_condition

    cons = config["consistency"]
    schedule, parameterization = ckpt.denoiser_parts(config)
    teacher_param = ckpt.denoiser_parts({**config, "prediction":
                                         config["teacher"]["prediction"]})[1]
    return LatentConsistencyDistillation(
        schedule, parameterization, functools.partial(samplers.step, sampler=cons["solver"]),
        teacher_param, guide=guidance_from_condition, latent_shape=config["latent_shape"],
        w_range=tuple(cons["w_range"]), N=int(cons["N"]), distance=cons["distance"],
        huber_c=cons.get("huber_c"), index_groups=cons.get("index_groups"))


def latent_distill_trainer(config: dict[str, Any], out: str | os.PathLike, *, teacher: Any,
                           teacher_path: str | os.PathLike, resume: bool = False,
                           device: str | None = None, callback: Any = None) -> Trainer:
    """The trainer of a latent consistency run into ``out``: ``teacher`` the loaded
    text-to-image model (:class:`~difflab.train.t2i.LatentTextModel`), its training data
    encoded to latents once, the student a copy of its network with a zero-initialised
    w-embedding."""
    from difflab.train.t2i import latent_components, training_data, training_fields

    out = Path(out)
    teacher_net = teacher.denoiser.net
    with torch.random.fork_rng(devices=[]):  # the w-embedding's first layer: seeded
        torch.manual_seed(int(config["train"]["seed"]))
        student = ckpt.build_net(config["net"])
    missing, unexpected = student.load_state_dict(teacher_net.state_dict(), strict=False)
    if unexpected or any(".guidance_embed." not in k for k in missing):
        raise ValueError(f"the teacher's network does not match the student's config: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}")
    data = training_data(config["data"])
    ae_path = ckpt.resolve(config["autoencoder"]["path"]).resolve()
    image_shape = tuple(data.images.shape[1:])
    components: dict[str, Any] = latent_components(config, teacher.autoencoder, ae_path, out,
                                                    image_shape)
    if "text_encoder" not in components:  # trained with the teacher: copied, frozen
        components["text_encoder"] = ckpt.Component(
            dict(config["text_encoder"]), teacher.text_encoder.state_dict())
    objective = latent_consistency_objective(config)
    objective.checkpoint_components = lambda: dict(components)
    modules = {"net": student.train().requires_grad_(True),
               "teacher": teacher_net.eval().requires_grad_(False),
               "text_encoder": teacher.text_encoder, "autoencoder": teacher.autoencoder}
    fields = training_fields(teacher.autoencoder, data)
    return Trainer(config, out, data=fields, modules=modules, objective=objective,
                   references={"teacher": str(teacher_path), "autoencoder": str(ae_path),
                               "text_encoder": config["text_encoder"].get("path")},
                   resume=resume, device=device, callback=callback)
