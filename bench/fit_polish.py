"""Issue #17 item 5 (session 22): what the full objective buys out of sample.

    python bench/fit_polish.py MODEL --diffusers RESULTS.json [--steps 5] [--iters 6,12,30]
        [--cal 24] [--ref-cache DIR] [--json OUT.json]

``bench/fit_bound.py`` fits the bespoke form on the *test* draws: an in-sample figure. Here the
fast fit stored beside MODEL (``difflab tune-grid MODEL --fast``) is polished by L-BFGS of the
full objective (``difflab.fitting.bespoke.tune_solver``: coefficients and the times the network
is told, a backward pass through every call of the rollout) on *calibration* draws, and judged,
as the fast fit is, on ``--n`` test draws of ``--seed`` that it never saw:

- calibration draws: the first ``--cal`` normal draws of the probe's generator
  (``difflab.samplers.probe.PROBE_SEED``; 24 = the probe's own draws, which the fast fit is
  calibrated on), against a 480-step dpmpp_3m solve on the probe's fine grid
  (``samplers_real.reference``), cached in ``--ref-cache``;
- test draws and their 960-step reference: ``samplers_real``'s (``--ref-cache``).

Per step count and iteration budget it prints the test RMSE as a ratio to diffusers' best
configuration (``fit_bound.diffusers_best``, from samplers_real's ``--json`` results), the
calibration RMSE, and the seconds of the polish alone (one thread): what a fit that sees the
error at x(0) through the network costs and gains once it must generalise from its draws.

``--fits COPY`` measures what ``difflab tune-grid COPY --fast --polish N`` stored instead (COPY
a copy of MODEL, given as MODEL is: a run folder, or ``diffusers:FOLDER``, whose fits are in
``FOLDER.difflab``): each of its fits against the fit stored with MODEL, on the same test
draws (``--cfg W``: the fits for guidance w, on samplers_real's guided draws), with no
polishing here.

    cp -r runs/byom_edm /tmp/m/byom_edm
    difflab tune-grid /tmp/m/byom_edm --fast --polish 12 --threads 1
    python bench/fit_polish.py runs/byom_edm --diffusers docs/results/byom_s18_edm.json \\
        --steps 5,10,20 --fits /tmp/m/byom_edm --ref-cache REFS
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fit_bound as FB  # noqa: E402
import samplers_real as B  # noqa: E402

from difflab import samplers as S  # noqa: E402
from difflab.fitting.fast import _polish  # noqa: E402
from difflab.fitting.store import guidance_tag  # noqa: E402
from difflab.samplers.probe import PROBE_DRAWS, PROBE_SEED  # noqa: E402


def calibration(args, den, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``args.cal`` draws of the probe's generator and their 480-step reference."""
    noise = torch.randn(args.cal, *shape, generator=torch.Generator().manual_seed(PROBE_SEED),
                        dtype=torch.float64).float()
    with torch.no_grad():
        return noise, B.cached_reference(args, args.model, den, noise, 480,
                                         draws=f"probe_seed_n{args.cal}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--diffusers", nargs="+", required=True,
                    help="samplers_real.py --json results holding diffusers' rows for MODEL")
    ap.add_argument("--steps", default="5")
    ap.add_argument("--iters", default="6,12,30", help="L-BFGS iteration budgets, each from "
                    "the stored fit")
    ap.add_argument("--cal", type=int, default=PROBE_DRAWS, help="calibration draws")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-cache", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--fits", default="", help="a copy of MODEL (given as MODEL is) whose "
                    "fits `tune-grid --polish` made: compared with MODEL's; no polish here")
    ap.add_argument("--cfg", type=float, default=None,
                    help="with --fits: a guided model's fits for guidance w (samplers_real's "
                         "draws, classes and prompts)")
    args = ap.parse_args()
    if args.cfg is not None and not args.fits:
        raise SystemExit("--cfg measures --fits only")
    den, shape, ckpt, noise, cond = B.setup_test_draws(args)
    guidance = None if args.cfg is None else guidance_tag(args.cfg)
    best = FB.diffusers_best(args.model, args.diffusers)
    with torch.no_grad():
        ref = B.cached_reference(args, args.model, den, noise, 960, cond)
    stored = B.stored_fits(args.model, ckpt, guidance)
    rows = []
    if args.fits:
        copy = None if args.fits.startswith("diffusers:") else B.resolve(args.fits)
        other = B.stored_fits(args.fits, copy, guidance)
        for n in (int(s) for s in args.steps.split(",")):
            cells = {}
            for which, fit in (("stored", stored.get(n)), ("polish", other.get(n))):
                with torch.no_grad():  # no fit: the default call's probe plan
                    e = B.rmse(S.sample(den, noise, steps=n, fit=fit, cond=cond), ref)
                how = "plan" if fit is None else fit.extra.get("objective", "")
                cells[which] = {"test": e, "test_ratio": e / best[n][0], "objective": how,
                                "iters": 0 if fit is None else fit.iterations or 0}
            print(f"{n} calls  " + "  ".join(
                f"{which} {c['test_ratio']:.3f}x ({c['objective']}, {c['iters']} it)"
                for which, c in cells.items()), flush=True)
            rows.append({"steps": n, **cells})
        _write(args, best, rows)
        return
    cal, cal_ref = calibration(args, den, shape)
    for n in (int(s) for s in args.steps.split(",")):
        if n not in stored:
            raise SystemExit(f"no fast fit stored for {n} steps: run `difflab tune-grid "
                             f"{args.model} --fast` first")
        fit, d_best = stored[n], best[n][0]
        with torch.no_grad():
            e_test = B.rmse(S.sample(den, noise, fit=fit), ref)
            e_cal = B.rmse(S.sample(den, cal, fit=fit), cal_ref)
        print(f"{n} calls  stored fast fit: test {e_test / d_best:.3f}x  calibration "
              f"{e_cal:.5f}", flush=True)
        rows.append({"steps": n, "iters": 0, "test_ratio": e_test / d_best, "test": e_test,
                     "cal": e_cal, "seconds": 0.0})
        for iters in (int(s) for s in args.iters.split(",")):
            t0 = time.perf_counter()
            polished = _polish(den, fit, cal, None, cal_ref, iters, None, 1.0)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                e_test = B.rmse(S.sample(den, noise, fit=polished), ref)
            print(f"{n} calls  polished, {polished.iterations} L-BFGS it: test "
                  f"{e_test / d_best:.3f}x  calibration {polished.rmse:.5f}  ({seconds:.1f} s)",
                  flush=True)
            rows.append({"steps": n, "iters": polished.iterations,
                         "test_ratio": e_test / d_best, "test": e_test, "cal": polished.rmse,
                         "seconds": round(seconds, 1)})
    _write(args, best, rows)


def _write(args, best: dict, rows: list) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cal": args.cal,
                                               "fits": args.fits, "n": args.n,
                                               "seed": args.seed,
                                               "diffusers_best": {str(k): v for k, v in
                                                                  best.items()},
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
