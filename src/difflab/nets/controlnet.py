"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): spatial control of a trained U-Net without touching it.

A trainable copy of the base U-Net's encoder and middle block reads the noisy input plus an
encoded control image c and returns one residual per skip connection and one for the middle
output; the frozen base adds them (:class:`~difflab.nets.unet.UNet`, ``residuals=``):

    h_0   = conv_in(x_t) + Z_hint(E_hint(c))                         (the copy's first feature)
    r_k   = Z_k(f_k)        k = 0 .. K - 1   (the copy's skip features f_k)
    r_K   = Z_K(m)                           (the copy's middle output m)
    out   = UNet_base(x_t, t; skips_k + s_k r_k, middle + s_K r_K)

where every Z is a convolution initialised to zero ("zero convolution", Zhang et al. 2023,
Sec. 3.1), so at initialisation every r_k is exactly 0 and the controlled model is the base model
bit for bit, whatever the control image; E_hint is a small conv stack with SiLU (the reference
code's ``input_hint_block``) that brings c from the control resolution to the first feature
resolution. The copy starts from the base's weights (``ControlNet.from_unet``) and is built from
the base's ``config`` (never by repeating its constructor arguments).

:class:`ControlledUNet` is the network wrapper used for training and sampling: it holds the
frozen base (``requires_grad`` False, kept in eval mode, never written) and one or several
ControlNets, each with its :class:`ControlSettings`:

* ``scale`` s: one number, or one per residual (K + 1 numbers, shallow to deep, middle last);
  0 switches that ControlNet off (it is then not run at all).
* ``guess_mode``: s_k <- s_k * 0.825^(K - k), shallow residuals damped, the middle one kept, as
  ``control_scales = [strength * 0.825 ** (12 - i) for i in range(13)]`` of the reference code
  (lllyasviel/ControlNet; "0.825**12 < 0.01"). The reference also removes the control from the
  unconditional half of CFG in guess mode; in difflab the control image stays in both halves
  (:class:`~difflab.denoiser.condition.Condition`), so guess mode here is the scale profile only.
* ``interval`` (lo, hi): control is applied only where the VE-equivalent noise level
  sigma~ = sigma / alpha = exp(-lambda / 2) of the network's time input lies in [lo, hi] (a
  noise-level version of diffusers' ``control_guidance_start`` / ``end``, independent of the
  grid). The network only sees its time input (``schedule.net_time(t)``, or EDM's c_noise), so the
  wrapper is given the schedule that made it (:func:`time_schedule`).

Several ControlNets: their residuals are summed, each with its own scale, interval and control
image. The control images reach the wrapper as ``control=``: one (B, C, H, W) tensor for one
ControlNet; for several, the images stacked along channels in the order of ``controlnets``
(``torch.cat([canny, hed], 1)``, which is what ``Condition.control`` carries; each ControlNet
takes its ``control_channels``), or a list with one tensor per ControlNet (direct calls; the
images may then differ in size).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser.parameterization import Parameterization
from difflab.nets.blocks import as_batch_time, zero_module
from difflab.nets.registry import build, register
from difflab.nets.unet import UNet, UNetEncoder
from difflab.schedules import NoiseSchedule, edm, edm_c_noise, from_config

__all__ = ["ControlNet", "ControlledUNet", "ControlSettings", "HintEncoder", "GUESS_MODE_DECAY",
           "time_schedule"]

#: per-level damping of guess mode (reference ControlNet code)
GUESS_MODE_DECAY = 0.825


def _encoder_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """The :class:`UNetEncoder` arguments of a U-Net ``config`` (missing keys take
    :class:`UNet`'s defaults, so configs of earlier versions work)."""
    if not isinstance(config, dict) or config.get("type") != "unet":
        kind = config.get("type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"a ControlNet needs a U-Net base (config type 'unet'), got {kind!r}")
    kwargs = {k: v for k, v in config.items() if k != "type"}
    try:
        bound = inspect.signature(UNet).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"base U-Net config: {e}") from None
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("out_channels")
    return args


class HintEncoder(nn.Sequential):
    """E_hint then Z_hint: the control image (B, C, f H, W f) -> (B, model_channels, H, W).

    With ``channels`` = (c_0, ..., c_n) and f = ``downscale`` = 2^k (k <= n):

        conv3x3(C -> c_0), SiLU,
        for i = 1 .. n:  conv3x3(c_{i-1} -> c_{i-1}), SiLU,
                         conv3x3(c_{i-1} -> c_i, stride 2 for i <= k else 1), SiLU,
        zero conv3x3(c_n -> model_channels)

    The reference ControlNet (latent diffusion, f = 8) uses channels (16, 32, 96, 256); a
    pixel-space U-Net, whose first level is at the input resolution, uses f = 1 (all strides 1).
    Each stride-2 convolution maps n -> ceil(n / 2), like the U-Net's Downsample.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], out_channels: int,
                 downscale: int = 1):
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            raise ValueError(f"hint_channels must be a non-empty list of positive widths, got "
                             f"{channels}")
        k = int(round(math.log2(downscale))) if downscale >= 1 else -1
        if downscale < 1 or 2**k != downscale or k > len(channels) - 1:
            raise ValueError(f"hint_downscale must be a power of 2 with at most "
                             f"len(hint_channels) - 1 = {len(channels) - 1} halvings, got "
                             f"{downscale}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.SiLU()]
        for i in range(1, len(channels)):
            layers += [nn.Conv2d(channels[i - 1], channels[i - 1], 3, padding=1), nn.SiLU(),
                       nn.Conv2d(channels[i - 1], channels[i], 3, padding=1,
                                 stride=2 if i <= k else 1), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(channels[-1], out_channels, 3, padding=1)))
        super().__init__(*layers)
        self.downscale = downscale


class ControlNet(nn.Module):
    """The trainable copy of a U-Net's encoder and middle block with a hint encoder and zero
    convolutions (module docstring). Build it with :meth:`from_unet` (copies the base's weights);
    the constructor (what ``nets.build(config)`` calls) makes the same architecture with fresh
    weights, to be loaded from a checkpoint.

    Args:
        base: the base U-Net's ``config`` (a dict with type "unet").
        control_channels: channels C of the control image (1 for an edge map).
        hint_channels: widths of the hint encoder (:class:`HintEncoder`).
        hint_downscale: control resolution / input resolution (1 for pixel models; 8 for a
            latent model fed pixel-resolution control images, with 4 hint widths).
    """

    def __init__(self, base: dict[str, Any], control_channels: int = 1,
                 hint_channels: Sequence[int] = (16, 32), hint_downscale: int = 1):
        super().__init__()
        kwargs = _encoder_kwargs(base)
        if int(control_channels) < 1:
            raise ValueError(f"control_channels must be >= 1, got {control_channels}")
        self.control_channels, self.hint_downscale = int(control_channels), int(hint_downscale)
        self.encoder = UNetEncoder(**kwargs)
        self.hint = HintEncoder(self.control_channels, hint_channels, kwargs["model_channels"],
                                self.hint_downscale)
        widths = list(self.encoder.skip_channels) + [self.encoder.out_channels]
        self.zero_convs = nn.ModuleList(zero_module(nn.Conv2d(c, c, 1)) for c in widths)
        self.config: dict[str, Any] = {
            "type": "controlnet", "base": dict(base), "control_channels": self.control_channels,
            "hint_channels": [int(c) for c in hint_channels],
            "hint_downscale": self.hint_downscale}

    @classmethod
    def from_unet(cls, base: UNet, control_channels: int = 1,
                  hint_channels: Sequence[int] = (16, 32), hint_downscale: int = 1) -> ControlNet:
        """A ControlNet for ``base``: built from ``base.config``, its encoder and middle block
        initialised from ``base.encoder``'s weights (``base`` itself is only read)."""
        net = cls(base.config, control_channels, hint_channels, hint_downscale)
        net.encoder.load_state_dict(base.encoder.state_dict())
        p = next(base.parameters())
        return net.to(device=p.device, dtype=p.dtype)

    @property
    def num_residuals(self) -> int:
        """K + 1: one residual per skip connection of the base, plus the middle."""
        return len(self.zero_convs)

    def check_control(self, control: Tensor, x: Tensor) -> None:
        """Raise a ValueError naming ``control`` unless it is (B, control_channels, f H, f W)."""
        B, _, H, W = x.shape
        f = self.hint_downscale
        want = (B, self.control_channels, f * H, f * W)
        if not isinstance(control, Tensor) or control.ndim != 4 or tuple(control.shape) != want:
            got = tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__
            raise ValueError(
                f"control must be a (B, C, H, W) = {want} image batch for this ControlNet "
                f"(control_channels={self.control_channels}, hint_downscale={f}, input "
                f"{tuple(x.shape)}), got {got}; resize it first "
                "(difflab.conditioning.control.from_image resizes)")

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, *,
                control: Tensor, guidance: Tensor | None = None) -> list[Tensor]:
        """The K + 1 residuals [Z_0(f_0), ..., Z_{K-1}(f_{K-1}), Z_K(m)] for the base U-Net
        (``guidance``: the weight w of a base that takes it, :mod:`difflab.nets.unet`)."""
        self.check_control(control, x)
        hint = self.hint(control.to(x.dtype))
        skips, middle, _ = self.encoder(x, t, labels, context, context_mask, hint=hint,
                                        guidance=guidance)
        return [z(h) for z, h in zip(self.zero_convs, skips + [middle])]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ControlSettings:
    """How one ControlNet is applied (see the module docstring).

    Args:
        scale: conditioning scale s, one number or one per residual (K + 1, shallow to deep,
            middle last); 0 turns the ControlNet off.
        guess_mode: damp shallow residuals, s_k * 0.825^(K - k).
        interval: (lo, hi) in sigma~ = sigma / alpha; control only where lo <= sigma~ <= hi
            (either end may be None or inf for unbounded). None: at every noise level.
    """

    scale: float | tuple[float, ...] = 1.0
    guess_mode: bool = False
    interval: tuple[float, float] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.scale, Tensor) and self.scale.ndim == 0:
            object.__setattr__(self, "scale", float(self.scale))
        if isinstance(self.scale, (Sequence, Tensor)) and not isinstance(self.scale, str):
            scale: float | tuple[float, ...] = tuple(
                _number(float(s) if isinstance(s, Tensor) else s, "scale") for s in self.scale)
            if not scale:
                raise ValueError("scale must be a number or a non-empty list of numbers")
        else:
            scale = _number(self.scale, "scale")
        object.__setattr__(self, "scale", scale)
        if not isinstance(self.guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {self.guess_mode!r}")
        if self.interval is not None:
            if isinstance(self.interval, str) or len(self.interval) != 2:
                raise ValueError(f"interval must be a pair (lo, hi) of noise levels sigma~, got "
                                 f"{self.interval!r}")
            lo, hi = self.interval
            lo = 0.0 if lo is None else _number(lo, "interval")
            hi = math.inf if hi is None else _number(hi, "interval")
            if not 0 <= lo <= hi:
                raise ValueError(f"interval must satisfy 0 <= lo <= hi (sigma~ = sigma / alpha), "
                                 f"got {self.interval!r}")
            object.__setattr__(self, "interval", (lo, hi))

    def residual_scales(self, num_residuals: int) -> list[float]:
        """s_k for k = 0 .. K (guess mode applied)."""
        if isinstance(self.scale, tuple):
            if len(self.scale) != num_residuals:
                raise ValueError(f"scale has {len(self.scale)} entries; a per-residual scale of "
                                 f"this ControlNet needs {num_residuals} (one per skip "
                                 "connection plus the middle) or one number")
            scales = list(self.scale)
        else:
            scales = [self.scale] * num_residuals
        if self.guess_mode:
            K = num_residuals - 1
            scales = [s * GUESS_MODE_DECAY ** (K - k) for k, s in enumerate(scales)]
        return scales

    def to_config(self) -> dict[str, Any]:
        interval = None
        if self.interval is not None:
            interval = [v if math.isfinite(v) else None for v in self.interval]
        return {"scale": list(self.scale) if isinstance(self.scale, tuple) else self.scale,
                "guess_mode": self.guess_mode, "interval": interval}

    @classmethod
    def of(cls, spec: ControlSettings | dict[str, Any] | None) -> ControlSettings:
        """A ControlSettings from itself, its ``to_config()`` dict, or None (the defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, ControlSettings):
            return spec
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - {"scale", "guess_mode", "interval"})
            if unknown:
                raise ValueError(f"unknown control setting(s) {unknown}; valid: "
                                 "['scale', 'guess_mode', 'interval']")
            return cls(**spec)
        raise ValueError(f"control settings must be a ControlSettings or a dict, got {spec!r}")


def time_schedule(schedule: NoiseSchedule, parameterization: Parameterization | None = None
                  ) -> NoiseSchedule:
    """The schedule whose ``net_time`` made the network's time input: the model's own
    ``schedule`` when the parameterisation feeds ``schedule.net_time(t)`` (eps, x0, v, score,
    flow), and an EDM schedule when it feeds c_noise = log(sigma~) / 4 (EDM preconditioning,
    consistency models): that is :meth:`~difflab.schedules.EDMSchedule.net_time` of any EDM
    schedule. Which of the two is read off the parameterisation's ``net_inputs`` at two noise
    levels.

        ControlledUNet(base, cn, settings, schedule=time_schedule(den.schedule,
                                                                  den.parameterization))
    """
    if parameterization is None or parameterization.uses_net_time():
        return schedule
    alpha = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    sigma = torch.tensor([[0.3], [4.0]], dtype=torch.float64)
    _, time_in = parameterization.net_inputs(torch.zeros(2, 1, dtype=torch.float64), alpha,
                                             sigma, None)
    if torch.allclose(time_in.flatten().double(), edm_c_noise((sigma / alpha).flatten())):
        return edm()
    raise ValueError(f"cannot tell the noise level from the time input of parameterization "
                     f"{parameterization.name!r}; pass the schedule whose net_time it uses")


class ControlledUNet(nn.Module):
    """A frozen base U-Net steered by one or several ControlNets (module docstring).

    Args:
        base: the base :class:`~difflab.nets.unet.UNet` (or its config). Its parameters are set
            to ``requires_grad=False`` and it is kept in eval mode; its weights are never written.
            Train ``controlled.controlnets.parameters()``.
        controlnets: a :class:`ControlNet` or a list of them (or their configs).
        settings: a :class:`ControlSettings` (or its dict) for all ControlNets, a list with one
            per ControlNet, or None (scale 1 everywhere).
        schedule: the schedule whose ``net_time`` produced the network's time input
            (:func:`time_schedule`; a config dict works too); needed only for ``interval``.
    """

    def __init__(self, base: UNet | dict[str, Any],
                 controlnets: ControlNet | dict[str, Any] | Sequence[ControlNet | dict[str, Any]],
                 settings: Any = None, schedule: NoiseSchedule | dict[str, Any] | None = None):
        super().__init__()
        base = build(base) if isinstance(base, dict) else base
        if not isinstance(base, UNet):
            raise ValueError(f"base must be a difflab U-Net, got {type(base).__name__}")
        if isinstance(controlnets, (ControlNet, dict)):
            controlnets = [controlnets]
        nets = [build(c) if isinstance(c, dict) else c for c in controlnets]
        if not nets or not all(isinstance(c, ControlNet) for c in nets):
            raise ValueError("controlnets must be a ControlNet or a non-empty list of them")
        want = _encoder_kwargs(base.config)
        for i, cn in enumerate(nets):
            have = _encoder_kwargs(cn.config["base"])
            diff = sorted(k for k in want if k != "dropout" and want[k] != have.get(k))
            if diff:
                raise ValueError(f"ControlNet {i} was built for another base U-Net (differs in "
                                 f"{diff}: {[have.get(k) for k in diff]} vs the base's "
                                 f"{[want[k] for k in diff]})")
        if settings is None or isinstance(settings, (ControlSettings, dict)):
            settings = [settings] * len(nets)
        settings = [ControlSettings.of(s) for s in settings]
        if len(settings) != len(nets):
            raise ValueError(f"settings must be one ControlSettings or one per ControlNet "
                             f"({len(nets)}), got {len(settings)}")
        for cn, s in zip(nets, settings):
            s.residual_scales(cn.num_residuals)  # validates a per-residual scale's length
        if isinstance(schedule, dict):
            schedule = from_config(schedule)
        if schedule is None and any(s.interval is not None for s in settings):
            raise ValueError("a control interval needs schedule= (the schedule whose net_time "
                             "gives the network's time input; see controlnet.time_schedule)")
        base.requires_grad_(False)
        base.eval()
        self.base = base
        self.controlnets = nn.ModuleList(nets)
        self.settings: list[ControlSettings] = settings
        self.schedule = schedule

    @property
    def config(self) -> dict[str, Any]:
        return {"type": "controlled_unet", "base": self.base.config,
                "controlnets": [c.config for c in self.controlnets],
                "settings": [s.to_config() for s in self.settings],
                "schedule": None if self.schedule is None else self.schedule.config()}

    def with_settings(self, settings: Any) -> ControlledUNet:
        """The same base and ControlNets (shared, not copied) with other settings."""
        return ControlledUNet(self.base, list(self.controlnets), settings, self.schedule)

    def train(self, mode: bool = True) -> ControlledUNet:
        super().train(mode)
        self.base.eval()
        return self

    @property
    def control_channels(self) -> list[int]:
        """Channels of each ControlNet's control image (their sum for a stacked tensor)."""
        return [cn.control_channels for cn in self.controlnets]

    def split_control(self, control: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """One control image per ControlNet from a channel-stacked tensor or a list."""
        n = len(self.controlnets)
        if isinstance(control, Tensor):
            chans = self.control_channels
            if control.ndim != 4 or control.shape[1] != sum(chans):
                raise ValueError(f"control must be (B, {sum(chans)}, H, W): the control images "
                                 f"of the {n} ControlNet(s) stacked along channels "
                                 f"({' + '.join(map(str, chans))}), got {tuple(control.shape)}")
            return list(torch.split(control, chans, dim=1))
        control = list(control)
        if len(control) != n:
            raise ValueError(f"control must hold one image batch per ControlNet ({n}), got "
                             f"{len(control)}")
        return control

    def noise_level(self, t: Tensor | float, x: Tensor) -> Tensor:
        """sigma~ = sigma / alpha = exp(-lambda(t) / 2) (B,) in float64 at the network time input
        ``t``: t = schedule.t_from_net_time(net_t)."""
        net_t = as_batch_time(t, x).detach().to(torch.float64)
        return torch.exp(-0.5 * self.schedule.log_snr(self.schedule.t_from_net_time(net_t)))

    def residuals(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                  context: Tensor | None = None, context_mask: Tensor | None = None, *,
                  control: Tensor | Sequence[Tensor],
                  guidance: Tensor | None = None) -> list[Tensor] | None:
        """sum_j s_j * r_j over the ControlNets j that are on (scale != 0, sigma~ in their
        interval); None when none is."""
        total: list[Tensor] | None = None
        sigma_tilde = None
        for cn, s, c in zip(self.controlnets, self.settings, self.split_control(control)):
            scales = s.residual_scales(cn.num_residuals)
            if all(v == 0 for v in scales):
                continue
            active = None
            if s.interval is not None:
                if sigma_tilde is None:
                    sigma_tilde = self.noise_level(t, x)
                lo, hi = s.interval
                active = (sigma_tilde >= lo) & (sigma_tilde <= hi)
                if not bool(active.any()):
                    continue
                active = None if bool(active.all()) else active.to(x.device).view(-1, 1, 1, 1)
            res = cn(x, t, labels, context, context_mask, control=c, guidance=guidance)
            res = [r if v == 1 else r * v for r, v in zip(res, scales)]
            if active is not None:
                res = [torch.where(active, r, torch.zeros_like(r)) for r in res]
            total = res if total is None else [a + b for a, b in zip(total, res)]
        return total

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                control: Tensor | Sequence[Tensor] | None = None, **unused: Any) -> Tensor:
        """The base U-Net's output with the ControlNets' residuals added (``control`` as in the
        module docstring; other condition inputs go to the base, which refuses what it lacks)."""
        if control is None:
            raise ValueError("a ControlledUNet needs control= (the control image; with a "
                             "Condition: Condition(control=...))")
        residuals = self.residuals(x, t, labels, context, context_mask, control=control,
                                   guidance=unused.get("guidance"))
        return self.base(x, t, labels, context, context_mask, residuals=residuals, **unused)


register("controlnet", ControlNet)
register("controlled_unet", ControlledUNet)
