"""ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"),
following the DDPM U-Net (Ho et al. 2020) with ADM's changes: residual blocks with
scale-shift norm, multi-head self-attention at several resolutions, optional class
embedding added to the time embedding, and optional cross-attention to a context sequence
(Rombach et al. 2022) so text conditioning plugs in.

    emb = MLP(sinusoidal(time_scale * t)) + E[labels]        (E[-1] = E[num_classes] = null label)
          [+ MLP_w(sinusoidal(guidance_scale * w))]        (guidance_embed: the guidance scale w
                                                            as an input, LCM's w-embedding, Luo
                                                            et al. 2023; its last layer starts
                                                            at zero, so a network copied from a
                                                            teacher starts as the teacher)
    encoder: conv_in, then per level: num_res_blocks x (ResBlock [+ Attention]), Downsample
    middle:  ResBlock, Attention, ResBlock
    decoder: per level: (num_res_blocks + 1) x (concat skip, ResBlock [+ Attention]), Upsample
    out:     GN, SiLU, conv_out (zero-initialised: the network outputs exactly 0 at init)

Attention is used at the pixel resolutions in ``attention_resolutions`` (e.g. (7,) for a
28 -> 14 -> 7 network with ``channel_mult=(1, 2, 2)``). ``control`` residuals (ControlNet,
Zhang et al. 2023) are added to the skip connections and the middle output (``residuals``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from difflab.nets.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimeEmbedding,
    Upsample,
    as_batch_time,
    embed_labels,
    group_norm,
    label_embedding,
    unused_condition,
    zero_module,
)
from difflab.nets.registry import register

__all__ = ["UNet", "UNetEncoder"]


def _heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels > 0:
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels are not divisible by "
                             f"num_head_channels={num_head_channels}")
        return channels // num_head_channels
    return num_heads


class _Level(nn.Module):
    """One resolution level: ResBlocks ``res[i]`` each followed by ``attn[i]`` (an
    AttentionBlock or Identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class UNetEncoder(nn.Module):
    """The down path and middle of the ADM U-Net, shared by :class:`UNet`, the noise-aware
    classifier and ControlNet. ``forward`` returns (skip features, middle output, emb)."""

    def __init__(self, in_channels: int, model_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int], image_size: int,
                 dropout: float, num_heads: int, num_head_channels: int,
                 num_classes: int | None, context_dim: int | None, time_scale: float,
                 scale_shift_norm: bool = True, guidance_embed: bool = False,
                 guidance_scale: float = 100.0):
        super().__init__()
        self.emb_dim = 4 * model_channels
        self.num_classes, self.context_dim = num_classes, context_dim
        self.time_embed = TimeEmbedding(model_channels, self.emb_dim, time_scale)
        self.class_embed = label_embedding(num_classes, self.emb_dim)
        self.guidance_embed = None
        if guidance_embed:
            self.guidance_embed = TimeEmbedding(model_channels, self.emb_dim, guidance_scale)
            zero_module(self.guidance_embed.mlp[-1])
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)

        def attn(ch: int, res: int) -> nn.Module | None:
            if res not in attention_resolutions:
                return None
            return AttentionBlock(ch, _heads(ch, num_heads, num_head_channels), context_dim)

        ch, res = model_channels, image_size
        self.skip_channels = [ch]
        self.resolutions = [res]
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.res.append(ResBlock(ch, mult * model_channels, self.emb_dim, dropout,
                                          scale_shift_norm))
                ch = mult * model_channels
                level.attn.append(attn(ch, res) or nn.Identity())
                self.skip_channels.append(ch)
            self.levels.append(level)
            if i < len(channel_mult) - 1:
                self.downs.append(Downsample(ch))
                res = (res + 1) // 2
                self.skip_channels.append(ch)
                self.resolutions.append(res)
        missing = sorted(set(attention_resolutions) - set(self.resolutions))
        if missing:
            raise ValueError(
                f"attention_resolutions {missing} are not level resolutions of this network "
                f"(image_size={image_size}, channel_mult={list(channel_mult)} gives "
                f"{self.resolutions}); pick from those or set image_size to the data's")
        self.mid_res1 = ResBlock(ch, ch, self.emb_dim, dropout, scale_shift_norm)
        self.mid_attn = AttentionBlock(ch, _heads(ch, num_heads, num_head_channels), context_dim)
        self.mid_res2 = ResBlock(ch, ch, self.emb_dim, dropout, scale_shift_norm)
        self.out_channels = ch

    def embed(self, x: Tensor, t: Tensor | float, labels: Tensor | None,
              guidance: Tensor | None = None) -> Tensor:
        emb = embed_labels(self.time_embed(as_batch_time(t, x)), self.class_embed, labels,
                           "U-Net")
        if self.guidance_embed is None:
            unused_condition("U-Net (built without guidance_embed)", {"guidance": guidance})
            return emb
        if guidance is None:
            raise ValueError("this U-Net takes the guidance scale w as an input "
                             "(guidance_embed=True): pass Condition(..., guidance=w), e.g. "
                             "cond.with_guidance(w)")
        return emb + self.guidance_embed(as_batch_time(guidance, x))

    @staticmethod
    def _apply_attn(block: nn.Module, h: Tensor, context: Tensor | None,
                    context_mask: Tensor | None) -> Tensor:
        if isinstance(block, AttentionBlock):
            return block(h, context, context_mask)
        return h

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None, *,
                hint: Tensor | None = None, guidance: Tensor | None = None
                ) -> tuple[list[Tensor], Tensor, Tensor]:
        """(skips, middle, emb). ``hint`` (ControlNet) is added after conv_in."""
        if context is not None and self.context_dim is None:
            raise ValueError("this U-Net has no cross-attention (context_dim=None) but got "
                             "context; build it with context_dim=D for text conditioning")
        emb = self.embed(x, t, labels, guidance)
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint
        skips = [h]
        for i, level in enumerate(self.levels):
            for res_block, attn_block in zip(level.res, level.attn):
                h = self._apply_attn(attn_block, res_block(h, emb), context, context_mask)
                skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
                skips.append(h)
        h = self.mid_res1(h, emb)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid_res2(h, emb)
        return skips, h, emb


class UNet(nn.Module):
    """ADM U-Net; see the module docstring.

    Args:
        in_channels / out_channels: image channels (out defaults to in).
        model_channels: base width; level i has ``channel_mult[i] * model_channels``.
        channel_mult: one entry per resolution level; each level after the first halves
            the resolution (ceil), e.g. (1, 2, 2) at 28x28: 28 -> 14 -> 7.
        num_res_blocks: residual blocks per level (the decoder has one more per level).
        attention_resolutions: pixel resolutions with self-attention (the middle always has
            attention); needs ``image_size`` to know them.
        num_heads / num_head_channels: attention heads, or channels per head if > 0.
        num_classes: class-conditional with a learned null label ``num_classes``.
        context_dim: cross-attention to ``context`` (B, L, context_dim) in attention blocks.
        time_scale: multiplies the time input before the sinusoidal embedding.
        guidance_embed: the guidance scale w is an input (``guidance``), embedded as the time
            is (w times ``guidance_scale``) and added to the time embedding.
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None,
                 model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 2, attention_resolutions: Sequence[int] = (7,),
                 image_size: int = 28, dropout: float = 0.0, num_heads: int = 4,
                 num_head_channels: int = -1, num_classes: int | None = None,
                 context_dim: int | None = None, time_scale: float = 1.0,
                 scale_shift_norm: bool = True, guidance_embed: bool = False,
                 guidance_scale: float = 100.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.config: dict[str, Any] = {
            "type": "unet", "in_channels": in_channels, "out_channels": out_channels,
            "model_channels": model_channels, "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions), "image_size": image_size,
            "dropout": dropout, "num_heads": num_heads, "num_head_channels": num_head_channels,
            "num_classes": num_classes, "context_dim": context_dim,
            "time_scale": float(time_scale), "scale_shift_norm": scale_shift_norm}
        if guidance_embed:  # configs of networks without it stay as they were
            self.config.update(guidance_embed=True, guidance_scale=float(guidance_scale))
        self.num_classes, self.context_dim = num_classes, context_dim
        self.encoder = UNetEncoder(in_channels, model_channels, channel_mult, num_res_blocks,
                                   attention_resolutions, image_size, dropout, num_heads,
                                   num_head_channels, num_classes, context_dim, time_scale,
                                   scale_shift_norm, guidance_embed, guidance_scale)
        emb_dim, skips = self.encoder.emb_dim, list(self.encoder.skip_channels)
        ch = self.encoder.out_channels
        res = self.encoder.resolutions[-1]
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.res.append(ResBlock(ch + skips.pop(), mult * model_channels, emb_dim,
                                          dropout, scale_shift_norm))
                ch = mult * model_channels
                level.attn.append(
                    AttentionBlock(ch, _heads(ch, num_heads, num_head_channels), context_dim)
                    if res in attention_resolutions else nn.Identity())
            self.levels.append(level)
            if i > 0:
                self.ups.append(Upsample(ch))
                res = self.encoder.resolutions[i - 1]
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    @property
    def num_skips(self) -> int:
        """Number of skip connections (the length of ``control`` minus one)."""
        return len(self.encoder.skip_channels)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                guidance: Tensor | None = None, *,
                residuals: Sequence[Tensor] | None = None, **unused: Any) -> Tensor:
        """Network output for x (B, C, H, W) at network time t (B,).

        Args:
            labels: (B,) class labels (-1 or ``num_classes`` = null) or None (= null label).
            context: (B, L, context_dim) cross-attention inputs; context_mask (B, L) bool,
                True for tokens that may be attended to.
            guidance: (B,) guidance scales w (a network built with ``guidance_embed``).
            residuals: ``num_skips + 1`` ControlNet residuals added to the skips and the
                middle output.
        """
        unused_condition("U-Net", unused)
        skips, h, emb = self.encoder(x, t, labels, context, context_mask, guidance=guidance)
        if residuals is not None:
            if len(residuals) != len(skips) + 1:
                raise ValueError(f"residuals must hold {len(skips) + 1} tensors (one per skip "
                                 f"connection plus the middle), got {len(residuals)}")
            skips = [s + c for s, c in zip(skips, residuals)]
            h = h + residuals[-1]
        for j, level in enumerate(self.levels):
            for res_block, attn_block in zip(level.res, level.attn):
                h = res_block(torch.cat([h, skips.pop()], dim=1), emb)
                h = UNetEncoder._apply_attn(attn_block, h, context, context_mask)
            if j < len(self.ups):
                h = self.ups[j](h, skips[-1].shape[-2:])
        return self.out(h)


register("unet", UNet)
