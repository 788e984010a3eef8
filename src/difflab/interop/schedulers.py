"""diffusers scheduler configs <-> difflab schedules and parameterisations (no diffusers import).

A diffusers ``scheduler_config.json`` mixes two things: what the model *is* (its noise schedule,
what the network predicts, its time input) and how diffusers *samples* it (grid spacing,
clipping, the last step). :func:`from_scheduler_config` maps the first exactly to a difflab
schedule and parameterisation and returns the second untouched in ``sampling_options``
(difflab's samplers choose their own grids, never clip, and always end at sigma = 0).

diffusers (``DDPMScheduler``, ``DDIMScheduler``, ``EulerDiscreteScheduler``, ... share these keys)
-> difflab, with T = ``num_train_timesteps``:

==============================  =================================================================
``beta_schedule="linear"``      ``schedules.linear(beta_start, beta_end, T)``
``"scaled_linear"``             ``schedules.scaled_linear(beta_start, beta_end, T)``
``"squaredcos_cap_v2"``         ``schedules.cosine(T, s=0.008, max_beta=0.999)`` (diffusers'
                                ``betas_for_alpha_bar``: the same alpha_bar ratio and clipping)
``"sigmoid"`` (DDPM)            betas = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) +
                                beta_start, as ``schedules.from_betas``
``trained_betas``               ``schedules.from_betas(trained_betas)``
``rescale_betas_zero_snr``      Lin et al. 2024, Alg. 1: ``zero_terminal_snr=True`` (linear
                                families) or ``rescale_zero_terminal_snr`` of alpha_bar
``prediction_type``             epsilon -> ``"eps"``, sample -> ``"x0"``, v_prediction -> ``"v"``,
                                flow_prediction -> ``"flow"``
``variance_type`` learned(_range)  the network outputs 2C channels; the first C are eps
network time                    the DDPM index: difflab's discrete ``net_time(t) = t T - 1`` is
                                diffusers' ``timestep`` at t = (index + 1) / T, fractional between
==============================  =================================================================

Flow matching (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``; or
``use_flow_sigmas`` with ``flow_shift`` on ``DPMSolverMultistepScheduler`` / ``UniPC...``):
``schedules.rectified_flow(shift, time_scale=T)``, prediction ``"flow"``, network time
sigma * T. ``use_dynamic_shifting`` (Flux) takes the shift from the image token count
(``schedules.dynamic_shift`` with the config's base/max sequence lengths and shifts) or from an
explicit ``shift``. EDM (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler`` with
``prediction_type="epsilon"``, which is EDM's preconditioning): ``schedules.edm(sigma_min,
sigma_max, rho)`` with ``parameterization.EDM(sigma_data)``.

:func:`scheduler_config` goes the other way (export) for every difflab schedule and prediction
that diffusers can express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

import difflab.schedules as schedules
from difflab.denoiser import parameterization
from difflab.denoiser.parameterization import Parameterization
from difflab.schedules import NoiseSchedule

__all__ = ["SchedulerMapping", "from_scheduler_config", "scheduler_config", "PREDICTION_TYPES",
           "BETA_SCHEDULES", "FLOW_SCHEDULERS", "EDM_SCHEDULERS"]

PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v",
                    "flow_prediction": "flow"}
"""diffusers ``prediction_type`` -> difflab prediction name."""
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

# keys that describe the model; every other key is a sampling option of diffusers'
_MODEL_KEYS = {
    "_class_name", "_diffusers_version", "num_train_timesteps", "beta_start", "beta_end",
    "beta_schedule", "trained_betas", "prediction_type", "rescale_betas_zero_snr",
    "variance_type", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
    "base_image_seq_len", "max_image_seq_len", "time_shift_type", "invert_sigmas",
    "use_flow_sigmas", "flow_shift", "sigma_min", "sigma_max", "sigma_data", "rho",
    "timestep_type"}


@dataclass(frozen=True)
class SchedulerMapping:
    """A diffusers scheduler config read as a difflab model description.

    Attributes:
        schedule: the noise schedule (its ``net_time`` is the network's time input).
        prediction: what the network predicts, as a difflab parameterisation.
        learned_variance: the network outputs 2C channels (eps, then the variance
            interpolation); only the first C are used.
        scheduler_class: diffusers' ``_class_name`` (``""`` if the config has none).
        sampling_options: the config's keys about diffusers' own sampling (spacing,
            clipping, thresholding, ...), which difflab's samplers do not copy.
    """

    schedule: NoiseSchedule
    prediction: Parameterization
    learned_variance: bool = False
    scheduler_class: str = ""
    sampling_options: dict[str, Any] = field(default_factory=dict)


def _prediction(cfg: dict[str, Any], default: str = "epsilon") -> Parameterization:
    kind = cfg.get("prediction_type") or default
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {kind!r} has no difflab parameterisation; valid: "
                         f"{list(PREDICTION_TYPES)}")
    return parameterization.get(PREDICTION_TYPES[kind])


def _betas(cfg: dict[str, Any], T: int) -> tuple[str, Any]:
    """(kind, betas or arguments) of a discrete config (module table)."""
    if cfg.get("trained_betas") is not None:
        return "betas", torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind in ("linear", "scaled_linear"):
        return kind, (b0, b1)
    if kind == "squaredcos_cap_v2":
        return "cosine", None
    if kind == "sigmoid":  # DDPMScheduler's
        x = torch.linspace(-6, 6, T, dtype=torch.float64)
        return "betas", torch.sigmoid(x) * (b1 - b0) + b0
    raise ValueError(f"beta_schedule {kind!r} is not supported; valid: {list(BETA_SCHEDULES)} "
                     "or trained_betas")


def _discrete(cfg: dict[str, Any]) -> NoiseSchedule:
    T = int(cfg.get("num_train_timesteps", 1000))
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    kind, arg = _betas(cfg, T)
    if kind == "linear":
        return schedules.linear(*arg, T, zero_terminal_snr=zero_snr)
    if kind == "scaled_linear":
        return schedules.scaled_linear(*arg, T, zero_terminal_snr=zero_snr)
    s = schedules.cosine(T) if kind == "cosine" else schedules.from_betas(arg)
    if zero_snr:  # Lin et al. 2024, Alg. 1 on alpha_bar; its config is the rescaled betas
        s = schedules.DiscreteSchedule(schedules.rescale_zero_terminal_snr(s.alphas_cumprod))
        s = schedules.from_betas(s.betas)
    return s


def _flow_shift(cfg: dict[str, Any], key: str, image_seq_len: int | None,
                shift: float | None) -> float:
    if shift is not None:
        return float(shift)
    if not cfg.get("use_dynamic_shifting", False):
        return float(cfg.get(key, 1.0))
    if image_seq_len is None or "base_image_seq_len" not in cfg:
        raise ValueError(
            "this flow model shifts its schedule by the image resolution "
            "(use_dynamic_shifting); pass image_seq_len (the number of image tokens, Flux: "
            "(H / 16) * (W / 16)) or shift (e.g. schedules.dynamic_shift(...))")
    return schedules.dynamic_shift(
        image_seq_len, base_seq_len=int(cfg["base_image_seq_len"]),
        max_seq_len=int(cfg["max_image_seq_len"]), base_shift=float(cfg["base_shift"]),
        max_shift=float(cfg["max_shift"]),
        shift_type=cfg.get("time_shift_type") or "exponential")


def from_scheduler_config(config: dict[str, Any], *, image_seq_len: int | None = None,
                          shift: float | None = None) -> SchedulerMapping:
    """The difflab schedule and parameterisation of a diffusers scheduler config (module
    docstring). ``image_seq_len`` or ``shift`` give a dynamically shifted flow model's shift;
    ``shift`` also overrides a fixed one."""
    cfg = dict(config)
    cls = str(cfg.get("_class_name", ""))
    options = {k: v for k, v in cfg.items() if k not in _MODEL_KEYS}
    T = int(cfg.get("num_train_timesteps", 1000))
    # a config without "_class_name" (diffusers' in-memory ``scheduler.config``) is told by
    # its keys: EDM schedulers have sigma_data, flow-matching ones shift and no betas
    edm = cls in EDM_SCHEDULERS or (not cls and "sigma_data" in cfg)
    flow = cls in FLOW_SCHEDULERS or (not cls and "shift" in cfg and "beta_schedule" not in cfg)
    if edm:
        if (cfg.get("prediction_type") or "epsilon") != "epsilon":
            raise ValueError(f"{cls or 'an EDM scheduler'} with prediction_type="
                             f"{cfg['prediction_type']!r} flips the "
                             "sign of EDM's c_out; only 'epsilon' (EDM's own preconditioning) "
                             "maps to difflab's EDM parameterisation")
        schedule = schedules.edm(float(cfg.get("sigma_min", 0.002)),
                                 float(cfg.get("sigma_max", 80.0)), float(cfg.get("rho", 7.0)))
        pred = parameterization.EDM(float(cfg.get("sigma_data", 0.5)))
        return SchedulerMapping(schedule, pred, False, cls, options)
    if flow or cfg.get("use_flow_sigmas", False):
        if cfg.get("invert_sigmas", False):
            raise ValueError("invert_sigmas=True (Mochi) feeds the network 1 - sigma; it is not "
                             "supported")
        if not flow and (cfg.get("prediction_type") or "epsilon") != "flow_prediction":
            raise ValueError("use_flow_sigmas needs prediction_type='flow_prediction', got "
                             f"{cfg.get('prediction_type')!r}")
        s = _flow_shift(cfg, "shift" if flow else "flow_shift", image_seq_len, shift)
        return SchedulerMapping(schedules.rectified_flow(s, time_scale=float(T)),
                                parameterization.get("flow"), False, cls, options)
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type={cfg['timestep_type']!r} (EDM-style c_noise on a "
                         "discrete schedule with v prediction) is not supported")
    pred = _prediction(cfg)
    if pred.name == "flow":
        raise ValueError("prediction_type='flow_prediction' needs use_flow_sigmas=True or a "
                         "flow-matching scheduler")
    learned = str(cfg.get("variance_type") or "") in ("learned", "learned_range")
    return SchedulerMapping(_discrete(cfg), pred, learned, cls, options)


# --- export --------------------------------------------------------------------------------
_EXPORT_PREDICTION = {v: k for k, v in PREDICTION_TYPES.items()}


def scheduler_config(schedule: NoiseSchedule, prediction: str | Parameterization,
                     scheduler_class: str | None = None) -> dict[str, Any]:
    """A diffusers scheduler config describing ``schedule`` and ``prediction`` (export).

    Discrete DDPM chains become a ``DDIMScheduler`` config (or ``scheduler_class``, any
    scheduler with the shared beta keys) with ``clip_sample=False``, ``set_alpha_to_one=True``
    and ``timestep_spacing="trailing"`` (difflab's conventions: no clipping, the last step to
    alpha = 1, grids from the prior); the named beta families keep their names (the cosine one
    only with diffusers' s = 0.008 and max_beta = 0.999), other chains give ``trained_betas``.
    Rectified flow with prediction ``flow`` becomes ``FlowMatchEulerDiscreteScheduler`` (its
    ``time_scale`` must be an integer T); EDM with EDM preconditioning ``EDMEulerScheduler``.

    Raises ValueError for what diffusers cannot express (a continuous VP schedule, score
    prediction, a VE schedule without EDM preconditioning, ...), naming why.
    """
    pred = parameterization.get(prediction)
    T = schedule.num_steps
    if isinstance(schedule, schedules.RectifiedFlowSchedule):
        if pred.name != "flow":
            raise ValueError("diffusers' flow-matching schedulers assume velocity prediction "
                             f"(prediction='flow'), got {pred.name!r}")
        if schedule.time_scale != round(schedule.time_scale):
            raise ValueError(f"time_scale={schedule.time_scale} is not an integer "
                             "num_train_timesteps")
        return {"_class_name": scheduler_class or "FlowMatchEulerDiscreteScheduler",
                "num_train_timesteps": int(schedule.time_scale), "shift": schedule.shift,
                "use_dynamic_shifting": False}
    if isinstance(schedule, schedules.EDMSchedule):
        if not isinstance(pred, parameterization.EDM):
            raise ValueError("diffusers' EDM schedulers assume EDM preconditioning "
                             f"(prediction='edm'), got {pred.name!r}")
        return {"_class_name": scheduler_class or "EDMEulerScheduler",
                "sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max,
                "sigma_data": pred.sigma_data, "rho": schedule.rho, "sigma_schedule": "karras",
                "prediction_type": "epsilon", "num_train_timesteps": 1000}
    if T is None:
        raise ValueError(f"{type(schedule).__name__} is a continuous-time schedule; diffusers' "
                         "schedulers describe discrete DDPM chains, rectified flow or EDM")
    if pred.name not in _EXPORT_PREDICTION or pred.name == "flow":
        raise ValueError(f"prediction {pred.name!r} has no diffusers prediction_type on a "
                         "DDPM chain; valid: 'eps', 'x0', 'v'")
    cfg: dict[str, Any] = {
        "_class_name": scheduler_class or "DDIMScheduler", "num_train_timesteps": T,
        "prediction_type": _EXPORT_PREDICTION[pred.name], "clip_sample": False,
        "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": False, "trained_betas": None,
        "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
    if isinstance(schedule, (schedules.LinearSchedule, schedules.ScaledLinearSchedule)):
        cfg.update(beta_schedule=schedule.type_name, beta_start=schedule.beta_start,
                   beta_end=schedule.beta_end, rescale_betas_zero_snr=schedule.zero_terminal_snr)
    elif (isinstance(schedule, schedules.CosineSchedule) and schedule.s == 0.008
          and schedule.max_beta == 0.999):
        cfg.update(beta_schedule="squaredcos_cap_v2")
    else:
        cfg.update(trained_betas=schedule.betas.tolist())
    return cfg
