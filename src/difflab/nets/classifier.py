"""Noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021, Sec. 4 and App. C):
the ADM U-Net's encoder (down path + middle, with the time embedding) followed by a pooling
head that gives class logits for a noisy x_t,

    logits = Head(Encoder(x_t, t)),     log p(y | x_t, t) = log_softmax(logits)_y,

used by :func:`difflab.guidance.classifier_log_prob`. Heads:

* ``"attention"`` (ADM's default): attention pooling, a query = mean token + a learned
  position embedding attends over all H*W tokens (as CLIP's AttentionPool2d), then a linear
  map to logits;
* ``"adaptive"``: GN, SiLU, global average pooling, 1x1 convolution to logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from difflab.nets.blocks import Attention, group_norm, unused_condition
from difflab.nets.registry import register
from difflab.nets.unet import UNetEncoder

__all__ = ["EncoderClassifier", "AttentionPool2d"]


class AttentionPool2d(nn.Module):
    """Pool a (B, C, H, W) map to (B, out_dim): the mean token, with positions added to all
    tokens, attends over [mean, tokens]; its output is projected to ``out_dim``."""

    def __init__(self, resolution: int, channels: int, num_heads: int, out_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(resolution * resolution + 1, channels)
                                / channels**0.5)
        self.attn = Attention(channels, num_heads)
        self.out = nn.Linear(channels, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + self.pos.to(x.dtype)
        pooled = self.attn(tokens[:, :1], context=tokens)[:, 0]
        return self.out(pooled)


class EncoderClassifier(nn.Module):
    """Noise-aware classifier (see the module docstring); ``forward(x, t)`` returns
    (B, num_classes) logits; it takes no condition.

    Args mirror :class:`~difflab.nets.unet.UNet`; ``num_classes`` is the number of outputs,
    ``pool`` is "attention" or "adaptive".
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, model_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (7,), image_size: int = 28,
                 dropout: float = 0.0, num_heads: int = 4, num_head_channels: int = -1,
                 time_scale: float = 1.0, pool: str = "attention"):
        super().__init__()
        if pool not in ("attention", "adaptive"):
            raise ValueError(f"unknown pool {pool!r}; valid: 'attention', 'adaptive'")
        self.config: dict[str, Any] = {
            "type": "classifier", "in_channels": in_channels, "num_classes": num_classes,
            "model_channels": model_channels, "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions), "image_size": image_size,
            "dropout": dropout, "num_heads": num_heads, "num_head_channels": num_head_channels,
            "time_scale": float(time_scale), "pool": pool}
        self.num_classes = num_classes
        self.encoder = UNetEncoder(in_channels, model_channels, channel_mult, num_res_blocks,
                                   attention_resolutions, image_size, dropout, num_heads,
                                   num_head_channels, None, None, time_scale)
        ch, res = self.encoder.out_channels, self.encoder.resolutions[-1]
        self.norm = nn.Sequential(group_norm(ch), nn.SiLU())
        if pool == "attention":
            heads = ch // num_head_channels if num_head_channels > 0 else num_heads
            self.head: nn.Module = AttentionPool2d(res, ch, heads, num_classes)
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, num_classes, 1),
                                      nn.Flatten())

    def forward(self, x: Tensor, t: Tensor | float, **unused: Any) -> Tensor:
        unused_condition("classifier", unused)
        _, h, _ = self.encoder(x, t)
        return self.head(self.norm(h))


register("classifier", EncoderClassifier)
