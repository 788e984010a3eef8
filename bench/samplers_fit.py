"""The default pipeline's fitted solvers on the exact mixtures, against diffusers in the same run.

    python bench/samplers_fit.py --calibration 2048      # writes docs/results/samplers_fit.md

``difflab train`` with ``train.fit_steps`` (and ``difflab tune-grid --sampler bespoke --start
auto``) fits a bespoke solver per step count with
:func:`difflab.fitting.fit_solvers`: unipc on each of ``START_GRIDS`` (the adaptive
grid from the reference solve, uniform-t; the docs/results file of 2026-12-02 also fitted from
log-SNR, which never won and was dropped) as the start, the best fit kept, no grid
tuning, then ``difflab.sample(den, noise, fit=fits[n])`` runs it (``difflab sample`` passes
the checkpoint's fit by default). This measures exactly that call on the two mixtures of
``bench/samplers.py`` (same schedule, test noise and reference), beside the default without a
fit and the best of the ~40 diffusers configurations of ``bench/samplers.py`` at each NFE.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from difflab import samplers as S
from difflab import schedules
from difflab.fitting import fit_solvers
from difflab.toy import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from samplers import (  # noqa: E402
    DiffusersModel,
    benchmark_mixtures,
    diffusers_configs,
    diffusers_sample,
    draw_errors,
    reference,
    rmse,
)

NFES = (5, 10, 20)


def best_diffusers(mix: GaussianMixture, sch, noise: torch.Tensor, ref: torch.Tensor
                   ) -> dict[int, tuple[float, str]]:
    model = DiffusersModel(mix, sch.alphas_cumprod)
    best = {n: (math.inf, "") for n in NFES}
    for name, cls, cfg in diffusers_configs():
        for nfe in NFES:
            try:
                x, _ = diffusers_sample(cls, cfg, model, noise, nfe)
            except Exception as e:  # noqa: BLE001 - a failing option is not a candidate
                print(f"{name} NFE {nfe}: {type(e).__name__}: {e}")
                continue
            e = rmse(x, ref)
            if e < best[nfe][0]:
                best[nfe] = (e, name)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", type=int, default=512, help="calibration draws (seed 123)")
    ap.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per fit")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "samplers_fit.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    sch = schedules.linear(1e-4, 0.02, 1000)
    mixtures = benchmark_mixtures()
    lines = [
        "# The default pipeline's fitted solvers on the exact mixtures", "",
        f"Command: `{shlex.join(['python', 'bench/samplers_fit.py', *sys.argv[1:]])}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
        f"Machine: 2-core CPU (CI-class), {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}", "",
        "Same mixtures, schedule, test noise and reference as `bench/samplers.py`. Row "
        "*fitted*: `fit_solvers(den, [5, 10, 20], calibration, max_iter="
        f"{args.max_iter})` on {args.calibration} calibration draws (seed 123, disjoint from the "
        "test noise), then `difflab.sample(den, noise, fit=fits[n])`, which runs the fitted "
        "solver (what `difflab train` with `train.fit_steps` and `difflab sample` do for a "
        "checkpoint). Row *no fit*: `difflab.sample(den, noise, steps=n)`, the default call "
        "without a fit (dpmpp_2m on its log-SNR grid). Cell: test RMSE (ratio to the best "
        "diffusers configuration at that NFE; target <= 0.5).", "",
    ]
    for label, (mix, n) in mixtures.items():
        den = mix.denoiser(sch, "eps")
        noise = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(1),
                            dtype=torch.float64)
        ref = reference(den, noise, 1000)
        theirs = best_diffusers(mix, sch, noise, ref)
        plain = {k: rmse(S.sample(den, noise, steps=k), ref) for k in NFES}
        cal = torch.randn(args.calibration, mix.dim, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(123))
        t0 = time.perf_counter()
        fits = fit_solvers(den, list(NFES), cal, max_iter=args.max_iter, reference_steps=1000,
                           log=print)
        seconds = time.perf_counter() - t0
        xs = {k: S.sample(den, noise, fit=fits[k]) for k in NFES}
        ours = {k: rmse(xs[k], ref) for k in NFES}
        lines += [f"## {label}, {n} test draws", "",
                  "| | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
                  "|---" * (len(NFES) + 1) + "|",
                  "| fitted (default with fit) | " + " | ".join(
                      f"{ours[k]:.2e} ({ours[k] / theirs[k][0]:.2f})" for k in NFES) + " |",
                  "| no fit (default without) | " + " | ".join(
                      f"{plain[k]:.2e} ({plain[k] / theirs[k][0]:.2f})" for k in NFES) + " |",
                  "| best diffusers | " + " | ".join(
                      f"{theirs[k][0]:.2e} ({theirs[k][1]})" for k in NFES) + " |",
                  "| fit: start grid, calibration RMSE (unipc there) | " + " | ".join(
                      f"{fits[k].spacing}, {fits[k].rmse:.1e} ({fits[k].rmse_base:.1e})"
                      for k in NFES) + " |",
                  "| calibration RMSE from each start | " + " | ".join(
                      ", ".join(f"{g} {e:.1e}" for g, e in fits[k].starts.items())
                      for k in NFES) + " |",
                  "| test draws ending in another component (> 0.5); RMSE without them | "
                  + " | ".join("{1}; {2:.1e}".format(*draw_errors(xs[k], ref)) for k in NFES)
                  + " |", "",
                  f"Fitting all three took {seconds:.0f} s (1 thread).", ""]
        print("\n".join(lines[-11:]), flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
