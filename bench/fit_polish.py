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

``--fits DIR`` measures what ``difflab tune-grid COPY --fast --polish N`` stored instead (COPY a
copy of MODEL's run, DIR its checkpoint folder, or the ``FOLDER.difflab`` store of a copied
diffusers folder): each of its fits against the fit stored with MODEL, on the same test draws,
with no polishing here.

    cp -r runs/byom_edm /tmp/m/byom_edm
    difflab tune-grid /tmp/m/byom_edm --fast --polish 12 --threads 1
    python bench/fit_polish.py runs/byom_edm --diffusers docs/results/byom_s18_edm.json \
        --steps 5,10,20 --fits /tmp/m/byom_edm/checkpoint --ref-cache REFS
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fit_bound as FB  # noqa: E402
import samplers_real as B  # noqa: E402

from difflab import samplers as S  # noqa: E402
from difflab.fitting import load_fits  # noqa: E402
from difflab.fitting.bespoke import tune_solver  # noqa: E402
from difflab.samplers.probe import PROBE_DRAWS, PROBE_SEED  # noqa: E402


def calibration(args, den, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``args.cal`` draws of the probe's generator and their 480-step reference."""
    noise = torch.randn(args.cal, *shape, generator=torch.Generator().manual_seed(PROBE_SEED),
                        dtype=torch.float64).float()
    name = "".join(c if c.isalnum() else "_" for c in args.model)
    path = Path(args.ref_cache or ".") / f"{name}_probe_seed_n{args.cal}_fine480.pt"
    if args.ref_cache and path.exists():
        return noise, torch.load(path)
    with torch.no_grad():
        ref = B.reference(den, noise, 480)
    if args.ref_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ref, path)
    return noise, ref


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
    ap.add_argument("--fits", default="", help="compare the fits stored in this folder (a "
                    "copy's checkpoint or FOLDER.difflab store) with MODEL's; no polish here")
    ap.add_argument("--cfg", type=float, default=None,
                    help="with --fits: a class-conditional model's fits for guidance w "
                         "(samplers_real's draws and classes)")
    args = ap.parse_args()
    den, shape, ckpt, noise = B.setup_test_draws(args)
    cond, tag = None, None
    if args.cfg is not None:
        if not args.fits:
            raise SystemExit("--cfg measures --fits only")
        from difflab.fitting.store import guidance_tag
        from difflab.guidance import classifier_free

        cond, tag = torch.arange(args.n) % den.net.num_classes, guidance_tag(args.cfg)
        den = classifier_free(den, args.cfg)
    best = FB.diffusers_best(args.model, args.diffusers)
    with torch.no_grad():
        ref = B.cached_reference(args, args.model, den, noise, 960, cond)
    stored = B.stored_fits(args.model, ckpt, tag)

    def rmse(x: torch.Tensor, r: torch.Tensor) -> float:
        return math.sqrt(float((x - r).double().pow(2).mean()))

    rows = []
    if args.fits:
        other = load_fits(Path(args.fits), weights=fit_weights(args.fits), guidance=tag)
        for n in (int(s) for s in args.steps.split(",")):
            cells = {}
            for tag, fit in (("stored", stored.get(n)), ("polish", other.get(n))):
                with torch.no_grad():  # no fit: the default call's probe plan
                    e = rmse(S.sample(den, noise, steps=n, fit=fit, cond=cond), ref)
                how = "plan" if fit is None else fit.extra.get("objective", "")
                cells[tag] = {"test": e, "test_ratio": e / best[n][0], "objective": how,
                              "iters": 0 if fit is None else fit.iterations or 0}
            print(f"{n} calls  " + "  ".join(
                f"{tag} {c['test_ratio']:.3f}x ({c['objective']}, {c['iters']} it)"
                for tag, c in cells.items()), flush=True)
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
            e_test = rmse(S.sample(den, noise, fit=fit), ref)
            e_cal = rmse(S.sample(den, cal, fit=fit), cal_ref)
        print(f"{n} calls  stored fast fit: test {e_test / d_best:.3f}x  calibration "
              f"{e_cal:.5f}", flush=True)
        rows.append({"steps": n, "iters": 0, "test_ratio": e_test / d_best, "test": e_test,
                     "cal": e_cal, "seconds": 0.0})
        for iters in (int(s) for s in args.iters.split(",")):
            t0 = time.perf_counter()
            polished = tune_solver(den, n, cal, base=fit.base, grid=fit, reference=cal_ref,
                                   init=fit.coeffs, max_iter=iters, fit_times=True)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                e_test = rmse(S.sample(den, noise, fit=polished), ref)
            print(f"{n} calls  polished, {polished.iterations} L-BFGS it: test "
                  f"{e_test / d_best:.3f}x  calibration {polished.rmse:.5f}  ({seconds:.1f} s)",
                  flush=True)
            rows.append({"steps": n, "iters": polished.iterations,
                         "test_ratio": e_test / d_best, "test": e_test, "cal": polished.rmse,
                         "seconds": round(seconds, 1)})
    _write(args, best, rows)


def fit_weights(folder: str) -> str | None:
    """The weights a ``FOLDER.difflab`` store's fits belong to (None: a checkpoint's own)."""
    if not folder.rstrip("/").endswith(".difflab"):
        return None
    from difflab.commands.model import fit_store

    return fit_store(folder.rstrip("/")[:-len(".difflab")])[1]


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
