"""Training-step throughput of difflab networks on 28x28 single-channel images (CPU).

    python bench/nets_throughput.py --threads 1 --batch 64 --steps 6

One step = forward + backward + Adam update on random data; the median over ``--steps``
timed steps (after 2 warm-up steps) is reported with images/second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from difflab import nets

CONFIGS = {
    "unet-32-1-attn7": {"type": "unet", "model_channels": 32, "channel_mult": [1, 2, 2],
                        "num_res_blocks": 1, "attention_resolutions": [7], "num_classes": 10},
    "unet-32-2-attn7": {"type": "unet", "model_channels": 32, "channel_mult": [1, 2, 2],
                        "num_res_blocks": 2, "attention_resolutions": [7], "num_classes": 10},
    "unet-64-1-attn7": {"type": "unet", "model_channels": 64, "channel_mult": [1, 2, 2],
                        "num_res_blocks": 1, "attention_resolutions": [7], "num_classes": 10},
    "unet-32-1-mid": {"type": "unet", "model_channels": 32, "channel_mult": [1, 2, 2],
                      "num_res_blocks": 1, "attention_resolutions": [], "num_classes": 10},
    "unet-32-1-attn14,7": {"type": "unet", "model_channels": 32, "channel_mult": [1, 2, 2],
                           "num_res_blocks": 1, "attention_resolutions": [14, 7],
                           "num_classes": 10},
    "dit-128-4-p2": {"type": "dit", "input_size": 28, "patch_size": 2, "hidden_size": 128,
                     "depth": 4, "num_heads": 4, "num_classes": 10},
    "dit-192-6-p4": {"type": "dit", "input_size": 28, "patch_size": 4, "hidden_size": 192,
                     "depth": 6, "num_heads": 6, "num_classes": 10},
}


def time_steps(cfg: dict, batch: int, steps: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    net = nets.build(cfg)
    x = torch.randn(batch, 1, 28, 28)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    t = torch.rand(batch) * 999
    y = torch.randint(0, 11, (batch,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = (net(x, t, y) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_gflops(cfg: dict) -> float:
    """Forward GFLOPs per 28x28 image (torch.utils.flop_counter; machine independent)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = nets.build(cfg)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, 1, 28, 28), torch.tensor([500.0]), torch.tensor([0]))
    return counter.get_total_flops() / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--only", nargs="*", default=None, help="config names to run")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--flops-only", action="store_true", help="skip the timing")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"| net | params | fwd GFLOP/image | s/step (batch {a.batch}) | images/s |")
    print("|---|---:|---:|---:|---:|")
    for name, cfg in CONFIGS.items():
        if a.only and name not in a.only:
            continue
        s = float("nan") if a.flops_only else time_steps(cfg, a.batch, a.steps, a.channels_last)
        n = nets.count_parameters(nets.build(cfg))
        gf = forward_gflops(cfg)
        print(f"| {name} | {n / 1e6:.2f}M | {gf:.3f} | {s:.3f} | {a.batch / s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
