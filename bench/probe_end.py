"""The default call's probe aimed at either end of a discrete model's flow (issue #17 item 4,
session 24).

    python bench/probe_end.py MODEL REF_CACHE SEED N CFG|none trained|zero

Prints the probe's plan at 5 / 10 / 20 calls and its RMSE on samplers_real's test draws against
both readings of the reference (``--ref-end zero`` and ``trained``, both kept in REF_CACHE
under samplers_real's names). ``trained`` runs the probe as the library has it since session 24 (its
fine solve stops at the first trained time t = 1 / T and ends with x0_hat there); ``zero``
patches it back to the probe before (the fine grid on to t = 0, the network called below
1 / T, unipc's own final step). docs/results/byom_defaults.md, session 24.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import samplers_real as B  # noqa: E402

import difflab.samplers.probe as P  # noqa: E402
from difflab import samplers as S  # noqa: E402


def main() -> None:
    model, refs, seed, n, cfg, mode = sys.argv[1:7]
    if mode == "zero":
        P.fine_grid = functools.partial(P.fine_grid, end="zero")
        P.reference_final = lambda schedule, ts, solver: {}  # unipc's own final step
    torch.set_num_threads(1)
    args = argparse.Namespace(model=model, n=int(n), seed=int(seed), threads=1, ref_end="zero",
                              cfg=None if cfg == "none" else float(cfg), ref_cache=refs)
    den, _, _, noise, cond = B.setup_test_draws(args)
    with torch.no_grad():
        ref_zero = B.cached_reference(args, model, den, noise, 960, cond)
        args.ref_end = "trained"
        ref_trained = B.cached_reference(args, model, den, noise, 960, cond)
    for steps in (5, 10, 20):
        choice = P.probe_plan(den, steps, tuple(noise.shape[1:]), cond=cond)
        with torch.no_grad():
            x = S.sample(den, noise, fit=choice.plan, cond=cond)
        e_zero, e_trained = (math.sqrt(sum(B.draw_mse(x, r)) / len(noise))
                             for r in (ref_zero, ref_trained))
        print(mode, steps, choice.plan.sampler, choice.plan.final, choice.grid_name,
              f"zero {e_zero:.5f} trained {e_trained:.5f}", flush=True)


if __name__ == "__main__":
    main()
