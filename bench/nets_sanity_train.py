"""Sanity check of the ADM U-Net: class-conditional v-prediction (min-SNR weighting, 10%
null labels) on Fashion-MNIST for a few minutes with a plain loop (no trainer), then a
classifier-free guided (w = 1) sample grid, 20 DPM++(2M) steps, one row per seed, one
column per class.

    python bench/nets_sanity_train.py MINUTES OUT.png [unet|dit]
"""

from __future__ import annotations

import copy
import sys
import time

import torch
from PIL import Image

import difflab
from difflab import nets, objectives, schedules
from difflab.data import load_dataset, to_uint8

NETS = {
    "unet": {"type": "unet", "model_channels": 32, "channel_mult": [1, 2, 2],
             "num_res_blocks": 1, "attention_resolutions": [7], "num_classes": 10},
    "dit": {"type": "dit", "input_size": 28, "patch_size": 4, "hidden_size": 192, "depth": 6,
            "num_heads": 6, "num_classes": 10},
}


def main(minutes: float, out_png: str, kind: str = "unet") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = load_dataset("fashion_mnist")
    net = nets.build(NETS[kind])
    sched = schedules.cosine()
    den = difflab.Denoiser(net, sched, "v")
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    batches = ds.batches(64, seed=0)
    g = torch.Generator().manual_seed(0)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        x, y = next(batches)
        y = torch.where(torch.rand(len(y), generator=g) < 0.1, torch.full_like(y, 10), y)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 100)
        loss = objectives.diffusion_loss(den, x, cond=y, target="v", weighting="min_snr",
                                         generator=g).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.4f}", flush=True)
        step += 1
    print("steps", step)
    guided = difflab.guidance.classifier_free(difflab.Denoiser(ema.eval(), sched, "v"), 1.0, 10)
    noise = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = difflab.sample(guided, noise, "dpmpp_2m", 20, cond=torch.arange(40) % 10)
    grid = to_uint8(out)[:, 0].view(4, 10, 28, 28).permute(0, 2, 1, 3).reshape(4 * 28, 280)
    Image.fromarray(grid.numpy()).resize((560, 224), Image.NEAREST).save(out_png)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 4.0,
         sys.argv[2] if len(sys.argv) > 2 else "grid.png",
         sys.argv[3] if len(sys.argv) > 3 else "unet")
