"""Training: the loop (:mod:`.trainer`), EMA (:mod:`.ema`), checkpoints (:mod:`.checkpoint`),
configs and presets (:mod:`.config`), torchrun/DDP (:mod:`.ddp`), logs and grids
(:mod:`.monitor`) and the ``difflab train | sample | demo`` commands (:mod:`.commands`)."""

from difflab.train.checkpoint import load_denoiser, save_checkpoint
from difflab.train.config import PRESETS, apply_overrides, load_config, preset
from difflab.train.ema import EMA
from difflab.train.trainer import Trainer, train

__all__ = ["PRESETS", "EMA", "Trainer", "apply_overrides", "load_config", "load_denoiser",
           "preset", "save_checkpoint", "train"]
