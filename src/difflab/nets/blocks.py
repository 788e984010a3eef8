"""Building blocks shared by the networks: time / class embeddings, attention, residual blocks.

* Sinusoidal time embedding (Vaswani et al. 2017; DDPM, Ho et al. 2020, App. B) of a
  fractional time s = time_scale * t:

      emb(s) = [cos(s f_0), ..., cos(s f_{h-1}), sin(s f_0), ..., sin(s f_{h-1})],
      f_i = max_period^(-i / h),  h = dim / 2.

  Networks receive the DDPM index in [0, T - 1] for discrete schedules (time_scale = 1),
  t in [0, 1] for continuous VP schedules (time_scale = 1000 suits), or EDM's
  c_noise = log(sigma) / 4 in about [-1.6, 1.1] (time_scale = 250 or so).
* Residual block with scale-shift norm (ADM, Dhariwal & Nichol 2021, Sec. 3 "AdaGN"):

      h = conv(SiLU(GN(x)));   (s, b) = Linear(SiLU(emb))
      h = conv_0(dropout(SiLU(GN(h) * (1 + s) + b)));   out = skip(x) + h

  where conv_0 is zero-initialised, so every block is the identity (or its skip) at init.
* Multi-head attention with torch.nn.functional.scaled_dot_product_attention:
  softmax(q k^T / sqrt(d)) v per head; self-attention when no context is given,
  cross-attention to a (B, L, context_dim) sequence otherwise (Rombach et al. 2022).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD

__all__ = [
    "timestep_embedding", "TimeEmbedding", "LabelEmbedding", "label_embedding", "embed_labels",
    "unused_condition", "group_norm", "zero_module",
    "Attention", "AttentionBlock", "ResBlock", "Downsample", "Upsample", "as_batch_time",
]


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (and return it)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, max_groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= max_groups that divides ``channels``."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


def as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """The network time as a float32 (B,) tensor (a scalar is broadcast to the batch)."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(torch.float32)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of fractional times; see the module docstring."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """s = time_scale * t -> sinusoidal(freq_dim) -> Linear -> SiLU -> Linear (emb_dim)."""

    def __init__(self, freq_dim: int, emb_dim: int, time_scale: float = 1.0,
                 max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.time_scale, self.max_period = freq_dim, float(time_scale), max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(),
                                 nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t * self.time_scale, self.freq_dim, self.max_period)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """A learned vector per class label 0..K-1 plus one for the null label (classifier-free
    guidance, Ho & Salimans 2022): row K. The null label is written -1 by
    :class:`~difflab.denoiser.condition.Condition` and K by checkpoints of earlier versions;
    both select row K, as does ``labels=None``. Every network embeds labels through this one
    module (:func:`embed_labels`)."""

    def __init__(self, num_classes: int, emb_dim: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.embedding = nn.Embedding(self.num_classes + 1, emb_dim)

    def forward(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        K = self.num_classes
        if labels is None:
            labels = torch.full((batch,), K, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device)
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.is_floating_point() or labels.shape != (batch,):
            raise ValueError(f"labels must be a (B,) = ({batch},) integer tensor of class labels, "
                             f"got dtype {labels.dtype} shape {tuple(labels.shape)}")
        if labels.device.type == "cpu" and labels.numel() and (
                int(labels.min()) < -1 or int(labels.max()) > K):
            raise ValueError(f"class labels must lie in [0, {K - 1}] or be the null label (-1 or "
                             f"{K}), got min {int(labels.min())}, max {int(labels.max())}")
        return self.embedding(torch.where(labels < 0, K, labels).long())


def label_embedding(num_classes: int | None, emb_dim: int) -> LabelEmbedding | None:
    """The label embedding of a network built with ``num_classes`` (None: unconditional)."""
    return LabelEmbedding(num_classes, emb_dim) if num_classes else None


def embed_labels(emb: Tensor, embedding: LabelEmbedding | None, labels: Tensor | None,
                 net: str) -> Tensor:
    """emb + E[labels] for a network with a label embedding; emb itself for one without, which
    refuses labels (the one place that says so)."""
    if embedding is not None:
        return emb + embedding(labels, emb.shape[0], emb.device)
    if labels is not None:
        raise ValueError(f"this {net} has no class embedding (num_classes=None) but got class "
                         "labels; build it with num_classes=K for class conditioning")
    return emb


def unused_condition(net: str, given: dict[str, Any]) -> None:
    """Refuse condition inputs a network has no input for, naming them (one message for all
    networks)."""
    names = sorted(k for k, v in given.items() if v is not None)
    if names:
        raise ValueError(f"this {net} takes no {', '.join(names)} input(s); a condition with "
                         f"{', '.join(names)} needs a network built for it")


class Attention(nn.Module):
    """Multi-head attention softmax(q k^T / sqrt(d_head)) v via scaled_dot_product_attention.

    ``forward(x, context=None, mask=None)``: x is (B, N, dim); keys/values come from x
    (self-attention) or from ``context`` (B, L, context_dim) (cross-attention); ``mask`` is a
    (B, L) bool tensor, True for context tokens that may be attended to.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None,
                 bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        B, N, C = x.shape
        src = x if context is None else context
        H = self.num_heads
        q = self.q(x).view(B, N, H, C // H).transpose(1, 2)
        k, v = self.kv(src).view(B, src.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask.to(torch.bool)[:, None, None, :]
        if _dual(q) or _dual(k):  # forward-mode AD: the fused kernels have no JVP formula
            w = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
            if attn_mask is not None:
                w = w.masked_fill(~attn_mask, float("-inf"))
            w = (w - w.amax(-1, keepdim=True).detach()).exp()  # softmax's own JVP works in
            out = (w / w.sum(-1, keepdim=True)) @ v  # place, which reverse mode then rejects
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def _dual(x: Tensor) -> bool:
    """Whether x carries a forward-mode tangent (inside ``torch.autograd.forward_ad``)."""
    return fwAD.unpack_dual(x).tangent is not None


class AttentionBlock(nn.Module):
    """Spatial self-attention (and optional cross-attention) over the H*W tokens of a feature
    map, with residual connections and zero-initialised output projections (identity at init).

        h = x + SelfAttn(GN(x));   h = h + CrossAttn(LN(h), context)   (if context_dim)
    """

    def __init__(self, channels: int, num_heads: int = 4, context_dim: int | None = None):
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, num_heads)
        zero_module(self.attn.proj)
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross = Attention(channels, num_heads, context_dim=context_dim)
            zero_module(self.cross.proj)

    def forward(self, x: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)
        h = x.reshape(B, C, H * W).transpose(1, 2) + self.attn(tokens)
        if self.context_dim is not None and context is not None:
            h = h + self.cross(self.norm_cross(h), context.to(h.dtype), context_mask)
        return h.transpose(1, 2).reshape(B, C, H, W)


class ResBlock(nn.Module):
    """ADM residual block with timestep embedding via scale-shift norm (see module docstring).

    With ``scale_shift=False`` the embedding is added instead: h = h + Linear(SiLU(emb)).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int,
                 dropout: float = 0.0, scale_shift: bool = True):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(group_norm(in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels))
        self.out_norm = group_norm(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 convolution with stride 2: H -> ceil(H / 2) (28 -> 14 -> 7 -> 4)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (default 2x), then a 3x3 convolution; the
    target size lets odd resolutions (7 -> 4 -> 7) round-trip."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
