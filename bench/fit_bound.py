"""How far the bespoke solver form can go: fitted on the test draws themselves (issue #17, item 5).

    python bench/fit_bound.py MODEL [--steps 5,10,20] [--iters 60] [--ref-cache DIR]

The automatic fit (``difflab tune-grid --fast``) fits the rows of the bespoke solver

    x_j = c_j x_T + sum_{k < j} d_jk D_k,   D_k = x0_hat(x_k, t'_k),

(every explicit solver linear in the network's predictions that makes n calls, with the
times t'_k the network is told)
on calibration draws and is judged on other, test draws. This script fits the same form *on
the test draws* against their own reference (samplers_real's, from ``--ref-cache``):
an in-sample error no fit made on other draws can be expected to beat, so where it is above
half of diffusers' best configuration, the 0.5x target is out of reach of this solver form at
that number of calls (up to L-BFGS finding a local optimum only).

Per step count it prints the test RMSE of:

1. the default call's plan and the fit stored beside the model (the ``fit_test_error.py``
   numbers);
2. the row-by-row rollout fit (``rollout_coefficients``) on the test draws, with the grid's
   times and with chosen evaluation times (against a ``fast_fit``-style reference solve of
   the test draws, nested in the plan's grid);
3. L-BFGS of the full objective (``tune_solver``, coefficients and evaluation times) from the
   best of those, ``--iters`` iterations, against that reference;

and each as a ratio to diffusers' best configuration at that number of calls (read from
samplers_real's ``--json`` results, ``--diffusers``).
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
import samplers_real as B  # noqa: E402

import difflab.samplers as S  # noqa: E402
from difflab.fitting import Fit  # noqa: E402
from difflab.fitting.bespoke import tune_solver  # noqa: E402
from difflab.fitting.fast import (  # noqa: E402
    EVAL_SHIFTS,
    plan_rows,
    plans_reference,
    rollout_coefficients,
)

RESULTS = tuple(f"docs/results/byom_ref16_{tag}.json" for tag in ("fm", "flow32", "eps", "zsnr")
                ) + ("docs/results/byom_probe_a.json",)


def diffusers_best(spec: str, paths: list[str]) -> dict[int, tuple[float, str]]:
    """diffusers' best configuration per number of calls for ``spec`` in samplers_real's JSON."""
    for path in paths:
        for r in json.load(open(path)):
            if r["spec"] == spec:
                return {n: min((v[str(n)][0], k) for k, v in r["diffusers"].items()
                               if math.isfinite(v[str(n)][0])) for n in B.NFES}
    raise SystemExit(f"no diffusers rows for {spec} in {paths}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ref-steps", type=int, default=960)
    ap.add_argument("--fine-steps", type=int, default=240,
                    help="points of the reference solve the rollout fit's targets come from")
    ap.add_argument("--ref-cache", default="")
    ap.add_argument("--diffusers", nargs="+", default=list(RESULTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    den, shape, ckpt, noise, _ = B.setup_test_draws(args)
    best = diffusers_best(args.model, args.diffusers)
    schedule = den.schedule
    with torch.no_grad():
        ref = B.cached_reference(args, args.model, den, noise, args.ref_steps)
    stored = B.stored_fits(args.model, ckpt)

    def rmse(x: torch.Tensor) -> float:
        return math.sqrt(float((x - ref).double().pow(2).mean()))

    for n in (int(s) for s in args.steps.split(",")):
        t0 = time.perf_counter()
        d_best = best[n][0]

        def say(label: str, e: float, n: int = n, d_best: float = d_best) -> None:
            print(f"{n} calls  {label:44s} {e:.5f}  {e / d_best:.2f}x", flush=True)

        print(f"{n} calls  diffusers' best: {d_best:.5f} ({best[n][1]})", flush=True)
        with torch.no_grad():
            plan = S.default_plan(den, n, noise)
            say("default call (probe plan)", rmse(S.sample(den, noise, steps=n)))
            if n in stored:
                say("stored fit", rmse(S.sample(den, noise, fit=stored[n])))
            # the rollout fit on the test draws, against the fast fit's kind of reference
            fref, (idx,) = plans_reference(den, noise, [plan], args.fine_steps)
            print(f"{n} calls  (rollout targets: {fref.steps}-step dpmpp_3m, RMSE to the "
                  f"{args.ref_steps}-step reference {rmse(fref.x[fref.steps]):.2g})", flush=True)
            base_rows = plan_rows(plan, schedule)
            targets = [fref.x[i] for i in idx[1:]]
            starts: list[tuple[float, str, Fit]] = []
            for label, shifts in (("grid times", (0.0,)), ("chosen times", EVAL_SHIFTS)):
                rows, taus, _ = rollout_coefficients(den, plan.ts, noise, targets, base_rows,
                                                     shifts=shifts)
                fit = Fit("bespoke", list(plan.ts), taus, rows, base=plan.sampler)
                e = rmse(S.sample(den, noise, fit=fit))
                say(f"rollout fit on the test draws, {label}", e)
                starts.append((e, label, fit))
            if n in stored:
                starts.append((rmse(S.sample(den, noise, fit=stored[n])), "stored fit",
                               stored[n]))
        e0, label, start = min(starts, key=lambda s: s[0])
        full = tune_solver(den, n, noise, base=start.base or plan.sampler, grid=start,
                           reference=ref, init=start.coeffs, max_iter=args.iters,
                           fit_times=True)
        with torch.no_grad():
            e = rmse(S.sample(den, noise, fit=full))
        say(f"L-BFGS on the test draws from {label} ({full.iterations} it)", e)
        print(f"{n} calls  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
