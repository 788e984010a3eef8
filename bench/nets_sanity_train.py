"""Sanity check of the ADM U-Net (or DiT): class-conditional v-prediction (min-SNR weighting,
10% null labels) on Fashion-MNIST for a few minutes on the one trainer, then a classifier-free
guided (w = 1) sample grid, 20 DPM++(2M) steps, one row per seed, one column per class.

    python bench/nets_sanity_train.py MINUTES OUT.png [unet|dit]
"""

from __future__ import annotations

import copy
import sys

import torch
from PIL import Image

import difflab
from difflab.data import to_uint8
from difflab.train.config import preset
from difflab.train.trainer import Trainer

NETS = {
    "unet": {"type": "unet", "model_channels": 32, "channel_mult": [1, 2, 2],
             "num_res_blocks": 1, "attention_resolutions": [7], "num_classes": 10},
    "dit": {"type": "dit", "input_size": 28, "patch_size": 4, "hidden_size": 192, "depth": 6,
            "num_heads": 6, "num_classes": 10},
}


def main(minutes: float, out_png: str, kind: str = "unet") -> None:
    torch.set_num_threads(1)
    config = copy.deepcopy(preset("fashion_mnist"))
    config["net"] = NETS[kind]
    config["train"].update({"batch_size": 64, "lr": 2e-3, "warmup": 100, "conditional": True,
                            "p_uncond": 0.1, "fit_steps": [], "grid_size": 0,
                            "sample_every": 0, "ckpt_every": 0, "max_minutes": minutes})
    trainer = Trainer(config, None)
    summary = trainer.run()
    print("steps", summary["steps"])
    guided = difflab.guidance.classifier_free(trainer.ema_denoiser(), 1.0)
    noise = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = difflab.sample(guided, noise, "dpmpp_2m", 20, cond=torch.arange(40) % 10)
    grid = to_uint8(out)[:, 0].view(4, 10, 28, 28).permute(0, 2, 1, 3).reshape(4 * 28, 280)
    Image.fromarray(grid.numpy()).resize((560, 224), Image.NEAREST).save(out_png)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 4.0,
         sys.argv[2] if len(sys.argv) > 2 else "grid.png",
         sys.argv[3] if len(sys.argv) > 3 else "unet")
