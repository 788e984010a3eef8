"""A small residual MLP denoiser for low-dimensional (e.g. 2-D toy) data.

    h_0 = W_in x + e,   e = TimeEmbedding(t) [+ LabelEmbedding(labels)]
    h_{k+1} = h_k + W_2 SiLU(W_1 SiLU(LN(h_k)) + U_k e)          (k = 0 .. depth-1)
    out = W_out SiLU(LN(h_depth))                                  (W_out zero-initialised)

Inputs of shape (B, dim) or (B, ...) with prod(...) = dim are flattened and restored.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from difflab.nets.blocks import (
    TimeEmbedding,
    as_batch_time,
    embed_labels,
    label_embedding,
    unused_condition,
    zero_module,
)
from difflab.nets.registry import register

__all__ = ["MLP"]


class _Block(nn.Module):
    def __init__(self, hidden: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.act(self.fc1(self.act(self.norm(h))) + self.emb(emb))
        return h + self.fc2(self.dropout(z))


class MLP(nn.Module):
    """Residual MLP; see the module docstring.

    Args:
        dim: data dimension (2 for toy data).
        hidden: width; depth: number of residual blocks.
        num_classes: adds a class embedding (label ``num_classes`` is the null label).
        time_scale: multiplies t before the sinusoidal embedding.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, emb_dim: int = 128,
                 num_classes: int | None = None, time_scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.config: dict[str, Any] = {
            "type": "mlp", "dim": dim, "hidden": hidden, "depth": depth, "emb_dim": emb_dim,
            "num_classes": num_classes, "time_scale": float(time_scale), "dropout": dropout}
        self.dim, self.num_classes = dim, num_classes
        self.time_embed = TimeEmbedding(emb_dim, emb_dim, time_scale)
        self.class_embed = label_embedding(num_classes, emb_dim)
        self.inp = nn.Linear(dim, hidden)
        self.emb_in = nn.Linear(emb_dim, hidden)
        self.blocks = nn.ModuleList(_Block(hidden, emb_dim, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(),
                                 zero_module(nn.Linear(hidden, dim)))

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None,
                **unused: Any) -> Tensor:
        unused_condition("MLP", unused)
        shape = x.shape
        x = x.reshape(shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"MLP(dim={self.dim}) got inputs with {x.shape[1]} features "
                             f"(shape {tuple(shape)})")
        emb = embed_labels(self.time_embed(as_batch_time(t, x)), self.class_embed, labels, "MLP")
        h = self.inp(x) + self.emb_in(emb)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).reshape(shape)


register("mlp", MLP)
