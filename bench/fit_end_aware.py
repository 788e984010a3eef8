"""A lead for issue #17 item 5 (session 21): evaluation times chosen by the error at x(0).

    python bench/fit_end_aware.py MODEL REFERENCE.pt [--steps 5,10]

The fast fit (``difflab.fitting.fast.rollout_coefficients``) fits the bespoke rows one after
another on the solver's own rollout, and with each row j it chooses the time t'_{j-1} the network
is told (t_{j-1} + f (t_j - t_{j-1}), f in ``EVAL_SHIFTS``) by the row's own residual at t_j.
Here the same rows are fitted, but each candidate time is judged by the error at x(0) of a
greedy completion: the rows after j fitted in turn (grid times) to the end. Calibrated on the
probe's draws against the probe's solve (as ``difflab tune-grid --fast``); judged on ``--n``
test draws of ``--seed`` against REFERENCE (samplers_real.py's ``--ref-cache`` file for them).
Prints the test RMSE of the probe plan, the residual choice and the choice by x(0)
(docs/results/byom_defaults.md, session 21). Cost of the completions: ~n^2 / 2 calls per draw
and candidate time.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import samplers_real as B  # noqa: E402

from difflab import samplers as S  # noqa: E402
from difflab.fitting import Fit  # noqa: E402
from difflab.fitting.fast import (  # noqa: E402
    EVAL_SHIFTS,
    FAST_RIDGE,
    _fit_row,
    nested_indices,
    plan_rows,
    probe_reference,
    rollout_coefficients,
)
from difflab.samplers import probe as P  # noqa: E402
from difflab.samplers.bespoke import combine  # noqa: E402


def completion_error(x_T: torch.Tensor, ts: list[float], targets: list[torch.Tensor],
                     base: list[list[float]]):
    """``rollout_coefficients``' judge: a candidate row j scored by the squared error at x(0)
    of the greedy completion from it (rows j + 1 .. n fitted in turn, grid times)."""
    n = len(ts) - 1

    def row_fit(D: list[torch.Tensor], y: torch.Tensor, k: int) -> list[float]:
        F = torch.stack([x_T.reshape(-1)] + [d.reshape(-1) for d in D]).double()
        return _fit_row(F, y.reshape(-1).double(), base[k - 1], FAST_RIDGE).tolist()

    def judge(j: int, row: list[float], D: list[torch.Tensor], x0_at) -> float:
        x, D = combine(row, x_T, D), list(D)
        for k in range(j + 1, n + 1):
            D.append(x0_at(x, k - 1, float(ts[k - 1])))
            x = combine(row_fit(D, targets[k - 1], k), x_T, D)
        return float((x - targets[-1]).double().pow(2).mean())

    return judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("reference", help="the test draws' reference solve (a .pt tensor)")
    ap.add_argument("--steps", default="5,10")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    den, shape, _, noise, _ = B.setup_test_draws(args)
    ref = torch.load(args.reference)
    traj = P.probe_solve(den, shape)
    x_T = traj.noise * den.schedule.prior_std(1.0)

    def rmse(x: torch.Tensor) -> float:
        return math.sqrt(float((x - ref).double().pow(2).mean()))

    for n in (int(s) for s in args.steps.split(",")):
        plan = P.probe_plan(den, n, shape).plan
        fr = probe_reference(den, traj, [plan.ts])
        targets = [fr.x[i] for i in nested_indices(fr.ts, plan.ts)[1:]]
        base = plan_rows(plan, den.schedule)
        with torch.no_grad():
            cells = [f"plan {rmse(S.sample(den, noise, fit=plan)):.5f}"]
            for by, judge in (("residual", None),
                              ("x0", completion_error(x_T, list(plan.ts), targets, base))):
                rows, taus, _ = rollout_coefficients(den, plan.ts, traj.noise, targets, base,
                                                     shifts=EVAL_SHIFTS, judge=judge)
                fit = Fit("bespoke", list(plan.ts), taus, rows, base=plan.sampler)
                cells.append(f"by {by} {rmse(S.sample(den, noise, fit=fit)):.5f}")
        print(f"{args.model} {n} calls: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
