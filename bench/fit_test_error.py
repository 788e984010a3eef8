"""Test error of the default call and of the fit stored beside a model (issue #17, item 5).

    python bench/fit_test_error.py MODEL [--ref-cache DIR] [--n 32] [--seed 1]

MODEL as in bench/samplers_real.py (a run, or ``diffusers:FOLDER``). The reference is
samplers_real's --ref-steps solve of the same noise (read from ``--ref-cache`` where that run
left it, else solved here). Prints, for 5 / 10 / 20 calls, the pixel RMSE of the default call
``difflab.sample(den, noise, steps=n)`` (the probe's plan) and of the stored fit, and the
three worst draws of each (a few draws near a boundary between modes carry much of an RMSE
over 32 draws: docs/results/byom_defaults.md, session 13).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import samplers_real as B  # noqa: E402

import difflab.samplers as S  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ref-steps", type=int, default=960)
    ap.add_argument("--ref-cache", default="")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    den, shape, ckpt, noise, _ = B.setup_test_draws(args)
    with torch.no_grad():
        ref = B.cached_reference(args, args.model, den, noise, args.ref_steps)
    fits = B.stored_fits(args.model, ckpt)
    for n in B.NFES:
        line = [f"{n} calls"]
        for label, fit in (("default call", None), ("stored fit", fits.get(n))):
            with torch.no_grad():
                x = S.sample(den, noise, steps=n, fit=fit)
            draw = (x - ref).double().pow(2).flatten(1).mean(1).sqrt()
            worst = draw.topk(3)
            line.append(f"{label} {math.sqrt(float(draw.pow(2).mean())):.4g} (worst draws "
                        f"{worst.indices.tolist()}: "
                        f"{', '.join(f'{v:.3g}' for v in worst.values.tolist())})")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
