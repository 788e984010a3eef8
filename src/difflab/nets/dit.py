"""DiT: Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), the adaLN-Zero variant.

    tokens = PatchEmbed(x) + pos            (p x p patches, fixed 2-D sin-cos positions)
    c      = TimeEmbedding(t) + E[y]        (E[num_classes] = null label)
    block:  (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))   (zero init)
            h = h + gate1 * Attn(LN(h) * (1 + scale1) + shift1)
            h = h + gate2 * MLP(LN(h) * (1 + scale2) + shift2)
    final:  (shift, scale) = Linear(SiLU(c));  out = Linear(LN(h) * (1 + scale) + shift)
            (both zero-initialised), then unpatchify to (B, C, H, W).
    cross:  with ``context_dim``, each block also attends to a context sequence (text states)
            after its self-attention, as PixArt-alpha (Chen et al. 2023, Sec. 2.3):
            h = h + CrossAttn(LN(h), context, context_mask)   (output projection zero-init)

At init every block is the identity (gates are 0) and the output is exactly 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflab.nets.blocks import (
    Attention,
    TimeEmbedding,
    as_batch_time,
    embed_labels,
    label_embedding,
    unused_condition,
)
from difflab.nets.registry import register

__all__ = ["DiT", "DiTBlock", "sincos_pos_embed_2d"]


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE / DiT): half the channels encode the row,
    half the column, each with the 1-D embedding [sin(p w_i), cos(p w_i)],
    w_i = 10000^(-i / (d/4)). Returns (grid^2, dim)."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D positions, got {dim}")
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def emb1d(p: Tensor) -> Tensor:
        a = p.flatten()[:, None] * w[None]
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([emb1d(rows), emb1d(cols)], 1).float()  # (grid^2, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (see the module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross = Attention(hidden_size, num_heads, context_dim=context_dim)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.context_dim is not None and context is not None:
            x = x + self.cross(self.norm_cross(x), context.to(x.dtype), context_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion Transformer; see the module docstring.

    Args:
        input_size: image side (divisible by ``patch_size``), e.g. 28 with patch 2 or 4.
        in_channels / out_channels: image channels (out defaults to in).
        hidden_size, depth, num_heads, mlp_ratio: transformer size (DiT-S: 384, 12, 6, 4).
        num_classes: class-conditional with a learned null label ``num_classes``.
        time_scale: multiplies the time input before the sinusoidal embedding.
        context_dim: cross-attention to ``context`` (B, L, context_dim) in every block.
    """

    def __init__(self, input_size: int = 28, patch_size: int = 2, in_channels: int = 1,
                 out_channels: int | None = None, hidden_size: int = 256, depth: int = 6,
                 num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int | None = None,
                 time_scale: float = 1.0, freq_dim: int = 256, context_dim: int | None = None):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size "
                             f"{patch_size}")
        out_channels = out_channels or in_channels
        self.config: dict[str, Any] = {
            "type": "dit", "input_size": input_size, "patch_size": patch_size,
            "in_channels": in_channels, "out_channels": out_channels,
            "hidden_size": hidden_size, "depth": depth, "num_heads": num_heads,
            "mlp_ratio": mlp_ratio, "num_classes": num_classes, "time_scale": float(time_scale),
            "freq_dim": freq_dim}
        if context_dim is not None:  # only then: earlier configs stay as they were
            self.config["context_dim"] = int(context_dim)
        self.context_dim = context_dim
        self.patch_size, self.out_channels = patch_size, out_channels
        self.grid = input_size // patch_size
        self.num_classes = num_classes
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimeEmbedding(freq_dim, hidden_size, time_scale)
        self.y_embedder = label_embedding(num_classes, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None],
                             persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim)
                                    for _ in range(depth))
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear_final = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
            if block.context_dim is not None:
                nn.init.zeros_(block.cross.proj.weight)
                nn.init.zeros_(block.cross.proj.bias)
        for layer in (self.adaLN_final[1], self.linear_final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, g*g, p*p*C) -> (B, C, g*p, g*p)."""
        B, g, p, C = tokens.shape[0], self.grid, self.patch_size, self.out_channels
        x = tokens.reshape(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                context: Tensor | None = None, context_mask: Tensor | None = None,
                **unused: Any) -> Tensor:
        unused_condition("DiT", unused)
        if context is not None and self.context_dim is None:
            raise ValueError("this DiT has no cross-attention (context_dim=None) but got "
                             "context; build it with context_dim=D for text conditioning")
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = embed_labels(self.t_embedder(as_batch_time(t, x)), self.y_embedder, labels, "DiT")
        for block in self.blocks:
            h = block(h, c, context, context_mask)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        h = self.linear_final(modulate(self.norm_final(h), shift, scale))
        return self.unpatchify(h)


register("dit", DiT)
