"""Exponential moving average of weights with a warmed-up decay.

    theta_ema <- beta_n theta_ema + (1 - beta_n) theta,    beta_n = min(beta, (1 + n) / (10 + n))

n counts EMA updates so far. The warm-up (as in TensorFlow's ExponentialMovingAverage with
num_updates; cf. Karras et al. 2024 on EMA length) keeps a short run from averaging in the
random initial weights: with a constant 0.999, after 1000 steps a fraction 0.999^1000 = 37%
of the EMA is still the initialisation (PITFALLS: "EMA with decay 0.999 on a short run").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMA", "ema_decay"]


def ema_decay(n: int, max_decay: float) -> float:
    """beta_n = min(max_decay, (1 + n) / (10 + n)) for the (n+1)-th update."""
    return min(float(max_decay), (1.0 + n) / (10.0 + n))


class EMA:
    """EMA of a module's floating-point parameters and buffers (kept in float32)."""

    def __init__(self, model: nn.Module, max_decay: float = 0.999):
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {max_decay}")
        self.max_decay = float(max_decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards ``model``; returns the decay used."""
        beta = ema_decay(self.num_updates, self.max_decay)
        shadow, current = [], []
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                shadow.append(s)
                current.append(v.detach().float())
            else:
                s.copy_(v)
        # one multi-tensor kernel per op for all tensors (a loop costs two launches each on GPU)
        torch._foreach_mul_(shadow, beta)
        torch._foreach_add_(shadow, current, alpha=1.0 - beta)
        self.num_updates += 1
        return beta

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state is missing tensors {sorted(missing)[:5]}")
        for k in self.shadow:
            self.shadow[k] = state[k].clone().to(self.shadow[k].dtype)
        self.num_updates = int(num_updates)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        ref = model.state_dict()
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in self.shadow.items()})
