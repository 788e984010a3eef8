"""Explicit solver plans on samplers_real's test draws (issue #17 item 4, session 22).

    python bench/plan_variants.py MODEL --plans default,unipc:karras:x0,unipc:karras:x0:round \
        [--steps 10,20] [--n 32] [--seed 1] [--cfg W] [--ref-cache DIR] [--json OUT]

Each plan is ``default`` (the default call's probe plan) or ``SAMPLER:SPACING:FINAL`` (FINAL a
final-step mode of ``difflab.samplers.common.FINAL_MODES`` or ``own``; SPACING a spacing of
``difflab.samplers.timesteps``, ``karrasRHO`` (Karras with that rho, e.g. ``karras5``) or
``karras+log_snr@M``: the Karras grid's first M steps, then log-spaced sigma~ down to
sigma_min in the remaining ones; on a discrete-time model also ``uniform_trained``, the
``linspace`` grid unrounded: uniform from t = 1 to the first trained time 1 / T with that last
point made 0), with ``:round``
appended to tell the network the trained knot k / T nearest each grid time while the state
stays on the grid (what diffusers' schedulers do when they round a Karras sigma's timestep;
discrete-time models only). Prints each plan's test RMSE against samplers_real's 960-step
reference (``--ref-cache``); ``--json`` keeps each draw's squared error.

``--seeds 1:32,2:128`` runs several draw sets (SEED:N) in turn and also prints each plan's
error pooled over all their draws, with the median draw's error and the share of the summed
squared error that the worst draw holds (heavy tails, session 25).

Session 22: on the latent model unguided at 20 calls, ``unipc:karras:x0:round`` gives
diffusers' UniPC-2 Karras error to the digit (docs/results/byom_defaults.md). Session 25: the
same model on 544 draws, the Karras grid against the probe's plan and the hybrids above.
Session 26: ``dpmpp_2m:linspace:x0`` gives diffusers' DPM++2M ``linspace`` error to 5 digits on
the eps / linear model; the plan's 1 % at 20 calls is the grid's integer rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import samplers_real as B  # noqa: E402

from difflab import samplers as S  # noqa: E402
from difflab.samplers.plan import SolverPlan  # noqa: E402


def grid(schedule, n: int, spacing: str) -> tuple[float, ...]:
    """The n-step grid of ``spacing`` (module docstring: a spacing, ``karrasRHO``,
    ``karras+log_snr@M`` or ``uniform_trained``)."""
    if spacing.startswith("karras") and spacing[6:].replace(".", "", 1).isdigit():
        return tuple(S.timesteps(schedule, n, "karras", rho=float(spacing[6:])).tolist())
    if spacing == "uniform_trained":  # timesteps' linspace grid before its rounding
        T = schedule.num_steps
        if T is None:
            raise SystemExit(f"{spacing}: needs a discrete-time model (num_steps T)")
        idx = torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[:-1]  # DDPM indices
        return tuple(((idx + 1) / T).tolist() + [0.0])
    if not spacing.startswith("karras+log_snr@"):
        return tuple(S.timesteps(schedule, n, spacing).tolist())
    m = int(spacing.split("@")[1])
    if not 0 < m < n:
        raise SystemExit(f"{spacing}: M must lie in (0, {n})")
    karras = S.timesteps(schedule, n, "karras")  # its first m steps, then the log-SNR grid
    rest = S.timesteps(schedule, n - m, "log_snr", t_start=float(karras[m]))
    return tuple(karras[:m].tolist() + rest.tolist())


def parse_plan(spec: str, den, n: int, noise: torch.Tensor, cond) -> SolverPlan:
    """The plan named by ``spec`` (module docstring) for ``n`` steps."""
    parts = spec.split(":")
    rounded = parts[-1] == "round"
    parts = parts[:-1] if rounded else parts
    if parts == ["default"]:
        plan = S.default_plan(den, n, noise, cond)
    elif len(parts) == 3:
        sampler, spacing, final = parts
        plan = SolverPlan(sampler, grid(den.schedule, n, spacing),
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
    ap.add_argument("--seeds", default="",
                    help="SEED:N,...: draw sets, pooled at the end (instead of --seed, --n)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    sets = ([tuple(int(v) for v in item.split(":")) for item in args.seeds.split(",")]
            if args.seeds else [(args.seed, args.n)])
    out: dict[str, dict[str, list[float]]] = {}
    for args.seed, args.n in sets:
        den, _, _, noise, cond = B.setup_test_draws(args)  # guided as samplers_real guides
        with torch.no_grad():
            ref = B.cached_reference(args, args.model, den, noise, 960, cond)
        for n in (int(s) for s in args.steps.split(",")):
            for spec in args.plans.split(","):
                plan = parse_plan(spec, den, n, noise, cond)
                with torch.no_grad():
                    mse = B.draw_mse(S.sample(den, noise, fit=plan, cond=cond), ref)
                out.setdefault(spec, {}).setdefault(str(n), []).extend(mse)
                print(f"seed {args.seed} ({args.n})  {n} calls  {spec:32s} "
                      f"RMSE {math.sqrt(sum(mse) / len(mse)):.5f}", flush=True)
    if len(sets) > 1:
        for spec, by_n in out.items():
            for n, mse in by_n.items():
                print(f"pooled ({len(mse)} draws)  {n} calls  {spec:32s} "
                      f"RMSE {math.sqrt(sum(mse) / len(mse)):.5f}  median draw "
                      f"{math.sqrt(statistics.median(mse)):.5f}  worst draw "
                      f"{max(mse) / sum(mse):.0%}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "sets": sets,
                                               "cfg": args.cfg, "per_draw": out}, indent=1))


if __name__ == "__main__":
    main()
