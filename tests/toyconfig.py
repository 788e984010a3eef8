"""The tiny training config the reliability suites run: an MLP on 256 points of the 2-D ring."""

from __future__ import annotations

import copy
from typing import Any

_TOY = {
    "net": {"type": "mlp", "dim": 2, "hidden": 16, "depth": 2, "num_classes": None},
    "schedule": {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999},
    "prediction": "eps",
    "data": {"name": "ring", "resolution": None, "channels": 2, "num_classes": None,
             "split": "train", "n": 256},
    "train": {"steps": 2, "batch_size": 16, "warmup": 1, "ema_decay": 0.9, "log_every": 1,
              "grid_size": 0, "fit_steps": [], "sample_every": 0},
}


def toy_config(**train: Any) -> dict[str, Any]:
    """A fresh copy of the toy config with ``train`` entries replaced."""
    cfg = copy.deepcopy(_TOY)
    cfg["train"].update(train)
    return cfg
