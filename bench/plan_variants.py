"""Explicit solver plans on samplers_real's test draws (issue #17 item 4, session 22).

    python bench/plan_variants.py MODEL --plans default,unipc:karras:x0,unipc:karras:x0:round \
        [--steps 10,20] [--n 32] [--seed 1] [--cfg W] [--ref-cache DIR] [--json OUT]

Each plan is ``default`` (the default call's probe plan) or ``SAMPLER:SPACING:FINAL`` (FINAL a
final-step mode of ``difflab.samplers.common.FINAL_MODES`` or ``own``), with ``:round``
appended to tell the network the trained knot k / T nearest each grid time while the state
stays on the grid (what diffusers' schedulers do when they round a Karras sigma's timestep;
discrete-time models only). Prints each plan's test RMSE against samplers_real's 960-step
reference (``--ref-cache``); ``--json`` keeps each draw's squared error.

Session 22: on the latent model unguided at 20 calls, ``unipc:karras:x0:round`` gives
diffusers' UniPC-2 Karras error to the digit (docs/results/byom_defaults.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import samplers_real as B  # noqa: E402

from difflab import samplers as S  # noqa: E402
from difflab.samplers.plan import SolverPlan  # noqa: E402


def parse_plan(spec: str, den, n: int, noise: torch.Tensor, cond) -> SolverPlan:
    """The plan named by ``spec`` (module docstring) for ``n`` steps."""
    parts = spec.split(":")
    rounded = parts[-1] == "round"
    parts = parts[:-1] if rounded else parts
    if parts == ["default"]:
        plan = S.default_plan(den, n, noise, cond)
    elif len(parts) == 3:
        sampler, spacing, final = parts
        plan = SolverPlan(sampler, tuple(S.timesteps(den.schedule, n, spacing).tolist()),
                          final=None if final == "own" else final)
    else:
        raise SystemExit(f"plan {spec!r}: give default or SAMPLER:SPACING:FINAL[:round]")
    if rounded:  # the network's told index rounded, mapped back to a time
        sch = den.schedule
        if sch.num_steps is None:
            raise SystemExit(f"{spec}: ':round' needs a discrete-time model (num_steps T)")
        told = [float(sch.t_from_net_time(max(0, round(float(sch.net_time(t))))))
                if 0 < t < 1 else t for t in plan.ts[:-1]]
        plan = SolverPlan(plan.sampler, plan.ts, tuple(told) + (plan.ts[-1],), plan.coeffs,
                          plan.final)
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--plans", required=True)
    ap.add_argument("--steps", default="10,20")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=None,
                    help="a class-conditional or text-to-image model's guidance (0: unguided)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ref-cache", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    den, _, _, noise, cond = B.setup_test_draws(args)  # guided as samplers_real guides
    with torch.no_grad():
        ref = B.cached_reference(args, args.model, den, noise, 960, cond)
    out: dict[str, dict[str, list[float]]] = {}
    for n in (int(s) for s in args.steps.split(",")):
        for spec in args.plans.split(","):
            plan = parse_plan(spec, den, n, noise, cond)
            with torch.no_grad():
                mse = B.draw_mse(S.sample(den, noise, fit=plan, cond=cond), ref)
            out.setdefault(spec, {})[str(n)] = mse
            print(f"{n} calls  {spec:32s} RMSE {math.sqrt(sum(mse) / len(mse)):.5f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "n": args.n,
                                               "seed": args.seed, "cfg": args.cfg,
                                               "per_draw": out}, indent=1))


if __name__ == "__main__":
    main()
