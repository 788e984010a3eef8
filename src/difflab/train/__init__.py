"""Training: the one loop over an objective (:mod:`.trainer`), EMA (:mod:`.ema`), the
checkpoint format and its loader (:mod:`.checkpoint`), configs and presets (:mod:`.config`),
torchrun/DDP (:mod:`.ddp`), logs and grids (:mod:`.monitor`) and the noise-aware classifier
(:mod:`.classifier`). The command line is :mod:`difflab.commands`."""

from difflab.train.checkpoint import load, load_denoiser, save, save_checkpoint
from difflab.train.config import PRESETS, apply_overrides, load_config, preset
from difflab.train.ema import EMA
from difflab.train.trainer import Trainer, train

__all__ = ["PRESETS", "EMA", "Trainer", "apply_overrides", "load", "load_config",
           "load_denoiser", "preset", "save", "save_checkpoint", "train"]
