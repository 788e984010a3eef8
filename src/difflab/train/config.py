"""Training configurations: nested JSON-safe dicts, presets and command-line overrides.

A diffusion config has a ``kind`` ("diffusion") and five sections; all of it is stored in
the checkpoint (``checkpoint.json``) so the checkpoint alone rebuilds the model:

* ``net``        the network config understood by :func:`difflab.nets.build` ("type": ...)
* ``schedule``   :meth:`NoiseSchedule.config` (rebuilt by :func:`difflab.schedules.from_config`)
* ``prediction`` the parameterisation (eps, x0, v, score, edm), ``sigma_data`` for EDM
* ``data``       name (or path), resolution, channels, num_classes, split
* ``train``      the loop's options (``LOOP_DEFAULTS``: lr, warm-up, batch size, EMA, precision,
                 seeds, budgets, logging) and the diffusion objective's (target, weighting,
                 t sampler, condition dropout), sample grids and the solver fit after training

Other kinds (the noise-aware classifier, :mod:`difflab.train.classifier`) have their own
``train`` defaults built on ``LOOP_DEFAULTS`` and checked by :func:`check_loop`.

Overrides use dotted keys with JSON values: ``train.lr=3e-4``, ``net.model_channels=64``,
``train.conditional=true``; a value that is not JSON is taken as a string.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "LOOP_DEFAULTS", "TRAIN_DEFAULTS", "preset", "load_config",
           "apply_overrides", "parse_override", "complete", "check_loop", "model_identity"]

# the options of the one training loop (difflab.train.trainer), for every kind of model
LOOP_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "steps": 1000,              # optimizer steps (stop earlier at max_minutes)
    "max_minutes": None,        # wall-clock budget; None = no limit
    "max_cpu_minutes": None,    # CPU-time budget of the process (all threads); None = no limit
    "batch_size": 128,          # global batch per optimizer step (all ranks, all micro-batches)
    "grad_accum": 1,            # micro-batches per optimizer step
    "lr": 1e-3,
    "warmup": 100,              # linear warm-up steps of the learning rate
    "lr_decay": "none",         # "none" or "cosine" (to lr_min at train.steps)
    "lr_min": 0.0,
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "grad_clip": 1.0,           # max global grad norm; 0 disables
    "ema_decay": 0.999,         # maximum EMA decay, warmed up as min(decay, (1 + n) / (10 + n));
                                # 0 disables the EMA
    "precision": "auto",        # auto (bf16 on CUDA if supported, fp32 on CPU) | fp32 | bf16
    "log_every": 10,
    "ckpt_every": 0,            # save a checkpoint every N steps (0: only at the end)
    "threads": None,            # torch threads, applied by the caller (the CLI), never here
    "compile": False,           # torch.compile the network: true or a mode (COMPILE_MODES)
    "channels_last": False,     # NHWC weights and activations (faster convolutions on GPUs)
}

# every key of a diffusion config's "train" section with its default; presets override some
TRAIN_DEFAULTS: dict[str, Any] = {
    **LOOP_DEFAULTS,
    "target": None,             # eps | x0 | v; None: the parameterisation's native target
    "objective": "simple",      # simple (the denoising loss) | vlb (the variational bound;
                                # trains a learned schedule) | hybrid (learned variances)
    "vlb_steps": None,          # vlb: None (continuous time), N steps, or "chain"
    "second_order": 0.0,        # vlb: weight of Lu et al.'s second-order score matching term
    "lambda_vlb": 0.001,        # hybrid: L_simple + lambda_vlb L_vlb
    "weighting": "none",        # none | min_snr | edm
    "min_snr_gamma": 5.0,
    "t_sampler": "uniform",     # uniform | lognormal
    "conditional": False,       # class-conditional training (needs labels)
    "p_uncond": 0.1,            # probability of replacing the label by the null label
    "sample_every": 0,          # save a sample grid every N steps (0: only at the end)
    "sample_steps": 10,         # sampler steps for grids
    "sampler": "auto",          # a sampler name, or auto (the fitted solver, else dpmpp_2m)
    "fit_steps": [],            # step counts to fit a bespoke solver for after training
    "fit_count": 32,            # calibration images of that fit
    "fit_iters": 40,            # its L-BFGS iterations
    "grid_size": 64,            # images in a sample grid (0: no grids)
}

#: train.objective: the diffusion kind's losses (difflab.objectives: DiffusionObjective,
#: VLBObjective, HybridObjective)
OBJECTIVES = ("simple", "vlb", "hybrid")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_FASHION = {
    "net": {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 32,
            "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [],
            "image_size": 28, "num_classes": None, "dropout": 0.0},
    "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
    "prediction": "v",
    "sigma_data": 0.5,
    "data": {"name": "fashion_mnist", "resolution": 28, "channels": 1, "num_classes": 10,
             "split": "train"},
    "train": {"steps": 100000, "max_minutes": 10, "batch_size": 16, "lr": 2e-3, "warmup": 50,
              "ema_decay": 0.999, "target": "v", "weighting": "min_snr", "min_snr_gamma": 5.0,
              "grad_clip": 1.0, "sample_every": 500, "ckpt_every": 500, "log_every": 20,
              "fit_steps": [10]},
}

_DIGITS = {
    "net": {"type": "unet", "in_channels": 1, "out_channels": 1, "model_channels": 32,
            "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
            "image_size": 8, "num_classes": None, "dropout": 0.0},
    "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
    "prediction": "v",
    "sigma_data": 0.5,
    "data": {"name": "digits", "resolution": 8, "channels": 1, "num_classes": 10,
             "split": "train"},
    "train": {"steps": 3000, "max_minutes": 10, "batch_size": 128, "lr": 2e-3, "warmup": 100,
              "ema_decay": 0.999, "target": "v", "weighting": "min_snr",
              "sample_every": 500, "ckpt_every": 500},
}

_TOY2D = {
    "net": {"type": "mlp", "dim": 2, "hidden": 128, "depth": 3, "num_classes": None},
    "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
    "prediction": "eps",
    "sigma_data": 0.5,
    "data": {"name": "ring", "resolution": None, "channels": 2, "num_classes": None,
             "split": "train", "n": 8192},
    "train": {"steps": 2000, "batch_size": 256, "lr": 2e-3, "warmup": 50, "ema_decay": 0.995,
              "target": "eps", "weighting": "none", "grid_size": 1024},
}

PRESETS: dict[str, dict[str, Any]] = {
    "fashion_mnist": _FASHION,
    "digits": _DIGITS,
    "toy2d": _TOY2D,
}


# value checks of "train" keys, by key: (type, minimum, minimum excluded, maximum excluded)
_NUMBERS: dict[str, tuple[type, float | None, bool, float | None]] = {
    "seed": (int, 0, False, None), "steps": (int, 1, False, None),
    "max_minutes": (float, 0, True, None), "max_cpu_minutes": (float, 0, True, None),
    "batch_size": (int, 1, False, None),
    "grad_accum": (int, 1, False, None), "lr": (float, 0, True, None),
    "warmup": (int, 0, False, None), "lr_min": (float, 0, False, None),
    "weight_decay": (float, 0, False, None), "grad_clip": (float, 0, False, None),
    "ema_decay": (float, 0, False, 1), "log_every": (int, 1, False, None),
    "ckpt_every": (int, 0, False, None), "threads": (int, 0, False, None),
    "min_snr_gamma": (float, 0, True, None), "p_uncond": (float, 0, False, 1),
    "sample_every": (int, 0, False, None), "sample_steps": (int, 1, False, None),
    "fit_count": (int, 1, False, None), "fit_iters": (int, 1, False, None),
    "grid_size": (int, 0, False, None), "second_order": (float, 0, False, None),
}
_OPTIONAL = ("max_minutes", "max_cpu_minutes", "threads")  # None: no limit / torch's choice


def check_values(train: dict[str, Any]) -> None:
    """Types and ranges of the numbers in a "train" section, each error naming the key as a
    config file or ``--set`` writes it (``train.lr must be a number > 0, got 'x'``)."""
    import math

    if not isinstance(train, dict):
        raise ValueError(f"the config's train section must be a JSON object, got {train!r}")
    for key, (kind, lo, strict, hi) in _NUMBERS.items():
        if key not in train or (train[key] is None and key in _OPTIONAL):
            continue
        v = train[key]
        ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not math.isfinite(v) or (
                lo is not None and (v <= lo if strict else v < lo)) or (
                hi is not None and v >= hi):
            what = "an integer" if kind is int else "a number"
            rng = (f" {'>' if strict else '>='} {lo:g}" if lo is not None else "") + \
                (f" and < {hi:g}" if hi is not None else "")
            if kind is int and lo == 1 and hi is None:
                what, rng = "a positive integer", ""
            raise ValueError(f"train.{key} must be {what}{rng}, got {v!r}")
    betas = train.get("betas", [0.9, 0.999])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
            for b in betas)):
        raise ValueError(f"train.betas must be two numbers in [0, 1), got {betas!r}")


def check_loop(train: dict[str, Any]) -> None:
    """Check the loop options of a "train" section (``LOOP_DEFAULTS``), naming the key."""
    check_values(train)
    for key, valid in (("precision", ("auto", "fp32", "bf16")), ("lr_decay", ("none", "cosine"))):
        if train[key] not in valid:
            raise ValueError(f"unknown train.{key} {train[key]!r}; valid: {list(valid)}")
    for key in ("batch_size", "grad_accum", "steps"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if train["batch_size"] % train["grad_accum"]:
        raise ValueError(f"train.batch_size ({train['batch_size']}) must be divisible by "
                         f"train.grad_accum ({train['grad_accum']})")
    if not 0.0 <= float(train["ema_decay"]) < 1.0:
        raise ValueError(f"train.ema_decay must lie in [0, 1), got {train['ema_decay']}")
    if not isinstance(train["channels_last"], bool):
        raise ValueError(f"train.channels_last must be true or false, got "
                         f"{train['channels_last']!r}")
    if not isinstance(train["compile"], bool) and train["compile"] not in COMPILE_MODES:
        raise ValueError(f"train.compile must be true, false or a torch.compile mode "
                         f"{list(COMPILE_MODES)}, got {train['compile']!r}")


def complete(config: dict[str, Any]) -> dict[str, Any]:
    """Fill missing keys of a diffusion config with defaults and check the known choices."""
    cfg = copy.deepcopy(config)
    kind = cfg.setdefault("kind", "diffusion")
    if kind != "diffusion":
        raise ValueError(f"complete() completes diffusion configs; this one has kind {kind!r} "
                         "(a classifier config comes from train.classifier.classifier_config)")
    for key in ("net", "schedule", "data"):
        if key not in cfg or not isinstance(cfg[key], dict):
            raise ValueError(f"config needs a {key!r} section (a dict); see the presets "
                             f"{sorted(PRESETS)} for examples")
    cfg.setdefault("prediction", "eps")
    cfg.setdefault("sigma_data", 0.5)
    if "kind" in cfg["schedule"]:  # --set schedule.kind=NAME: NAME's schedule, its defaults
        cfg["schedule"] = {"type": cfg["schedule"]["kind"]}
    train = dict(TRAIN_DEFAULTS)
    if not isinstance(cfg.get("train", {}), dict):
        raise ValueError(f"the config's train section must be a JSON object, got "
                         f"{cfg['train']!r}")
    unknown = sorted(set(cfg.get("train", {})) - set(TRAIN_DEFAULTS))
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], list(TRAIN_DEFAULTS), n=1)
        hint = f"; did you mean train.{near[0]}?" if near else ""
        raise ValueError(f"unknown train option(s) {unknown}{hint} (valid: "
                         f"{sorted(TRAIN_DEFAULTS)})")
    train.update(cfg.get("train", {}))
    cfg["train"] = train
    from difflab.denoiser.parameterization import get as get_parameterization
    from difflab.objectives import T_SAMPLERS, TARGETS, WEIGHTINGS

    if train["target"] is None:  # the parameterisation's native target, written out
        train["target"] = get_parameterization(
            cfg["prediction"], **({"sigma_data": cfg["sigma_data"]}
                                  if cfg["prediction"] == "edm" else {})).target
    for key, valid in (("target", TARGETS), ("weighting", WEIGHTINGS),
                       ("t_sampler", T_SAMPLERS)):
        if train[key] not in valid:
            raise ValueError(f"unknown train.{key} {train[key]!r}; valid: {list(valid)}")
    check_loop(train)
    steps = train["fit_steps"]
    if not isinstance(steps, list) or not all(isinstance(k, int) and k >= 1 for k in steps):
        raise ValueError(f"train.fit_steps must be a list of step counts >= 1 (e.g. [5, 10]), "
                         f"got {steps!r}")
    for key in ("fit_count", "fit_iters"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ValueError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if train["objective"] not in OBJECTIVES:
        raise ValueError(f"unknown train.objective {train['objective']!r}; valid: "
                         f"{list(OBJECTIVES)}")
    if train["objective"] == "hybrid":  # learned variances: the net's second C channels
        cfg["learned_variance"] = True
        net = cfg["net"]
        if "out_channels" in net and net["out_channels"] == net.get("in_channels"):
            net["out_channels"] = 2 * net["in_channels"]
    if not isinstance(train["conditional"], bool):
        raise ValueError(f"train.conditional must be true or false, got "
                         f"{train['conditional']!r}")
    if not 0 <= train["p_uncond"] < 1:
        raise ValueError(f"train.p_uncond must lie in [0, 1), got {train['p_uncond']}")
    if train["conditional"]:
        nc = cfg["data"].get("num_classes")
        if not nc:
            raise ValueError("train.conditional=true needs labelled data: set data.num_classes")
        cfg["net"]["num_classes"] = nc
    return cfg


def model_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The entries of a config that define the model a checkpoint's weights belong to: its
    kind, network and schedule, and for a diffusion model the parameterisation (prediction,
    sigma_data). Resuming compares these."""
    kind = config.get("kind", "diffusion")
    out = {"kind": kind, "net": config.get("net"), "schedule": config.get("schedule")}
    if kind == "diffusion":
        out["prediction"] = config.get("prediction", "eps")
        out["sigma_data"] = float(config.get("sigma_data", 0.5))
        if config.get("learned_variance"):
            out["learned_variance"] = True
    return out


def preset(name: str) -> dict[str, Any]:
    """A deep copy of a named preset (completed with the defaults)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)} or a JSON file")
    return complete(PRESETS[name])


def load_config(name_or_path: str) -> dict[str, Any]:
    """A preset name, the path of a JSON config file, or a checkpoint (its directory or its
    ``checkpoint.json``; a checkpoint of the earlier layout: its ``config.json``)."""
    if name_or_path in PRESETS:
        return preset(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        for name in ("checkpoint.json", "config.json"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise FileNotFoundError(f"no preset or config file {name_or_path!r}; presets: "
                                f"{sorted(PRESETS)}, or give the path of a JSON config")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from e
    if isinstance(cfg, dict) and str(cfg.get("format", "")).startswith("difflab-checkpoint"):
        cfg = cfg["config"]  # a checkpoint.json: the config it was trained with
    return complete(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4); values are JSON, else strings."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, "
                         "e.g. train.lr=3e-4")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override key {key!r} is not a dotted path like train.lr")
    return parts, parsed


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides and re-complete the config."""
    cfg = copy.deepcopy(config)
    for text in overrides:
        parts, value = parse_override(text)
        node = cfg
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return complete(cfg)
