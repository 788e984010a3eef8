"""Error of a checkpoint's tuned grids (``difflab tune-grid``) on the test images of
``bench/samplers_real.py``: the same 32 noise draws (seed 0) and 500-step dpm_solver_3 reference.

    difflab tune-grid CKPT --sampler unipc --steps 5 10 --count 64 --max-evals 150 --threads 2
    python bench/tuned_grids_real.py CKPT --sampler unipc --steps 5 10

prints, per step count, the RMSE of the sampler's default grid and of the tuned grid. The
diffusers bests to divide by are in docs/results/samplers_real.md (same images and reference).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from difflab import samplers as S
from difflab.fitting import load_fit
from difflab.train.checkpoint import load_denoiser, resolve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from samplers import reference, rmse  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--sampler", default="unipc")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--n", type=int, default=32, help="test images (seed 0)")
    ap.add_argument("--ref-steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    den, cfg = load_denoiser(args.checkpoint)
    c, r = cfg["data"]["channels"], cfg["data"]["resolution"]
    noise = torch.randn(args.n, c, r, r, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = reference(den, noise, args.ref_steps)
        for steps in args.steps:
            ts = load_fit(resolve(args.checkpoint), args.sampler, steps)
            if ts is None:
                print(f"{args.sampler} {steps}: no tuned grid in {args.checkpoint}")
                continue
            e0 = rmse(S.sample(den, noise, args.sampler, steps), ref)
            e = rmse(S.sample(den, noise, args.sampler, fit=ts), ref)
            print(f"{args.sampler} {steps} steps: default grid {e0:.4f}, tuned grid {e:.4f}")


if __name__ == "__main__":
    main()
