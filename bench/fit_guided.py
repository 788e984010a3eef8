"""The fast fit (issue #17 item 5) on a classifier-free-guided text-to-image model, from
Python (``difflab tune-grid --fast --cfg W`` fits a class-conditional model; a prompted one has
no command): what ``tune-grid --fast`` runs (the default call's probe, the fit on the probe's
draws and solve) on the guided latent denoiser with ``samplers_real.py``'s prompt i for draw i
(class i mod K on a class-conditional model: the same steps as ``tune-grid --cfg W``), scoring
the default call and the fit on ``samplers_real.py``'s test draws against its cached
reference (run ``samplers_real.py MODEL --cfg W --ref-cache DIR`` first). As ``tune-grid``
would, the fit replaces the plan only where it beats it on the calibration draws.

    python bench/fit_guided.py runs/byom_latent --cfg 3 --ref-cache REFS \
        --bench docs/results/byom_s20_latent3.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import samplers_real as B  # noqa: E402

from difflab import samplers as S  # noqa: E402
from difflab.fitting.fast import fast_fit_solvers, probe_reference  # noqa: E402
from difflab.guidance import classifier_free  # noqa: E402
from difflab.samplers import probe as P  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--cfg", type=float, required=True, help="guidance weight w")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ref-cache", required=True)
    ap.add_argument("--ref-steps", type=int, default=960)
    ap.add_argument("--bench", required=True, help="samplers_real.py's --json of this model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    den, _, shape, _ = B.load_model(args.model)
    den.eval()
    guided = classifier_free(den, args.cfg)
    labels = B.prompt_condition(args.model, args.n)  # draw i: prompt i, or class i mod K
    labels = labels if labels is not None else torch.arange(args.n) % den.net.num_classes
    noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed))
    ns = argparse.Namespace(ref_cache=args.ref_cache, seed=args.seed, n=args.n, cfg=args.cfg)
    with torch.no_grad():
        ref = B.cached_reference(ns, args.model, guided, noise, args.ref_steps, labels)
        t0 = time.perf_counter()
        choices = {n: P.probe_plan(guided, n, shape, cond=labels) for n in B.NFES}
        traj = P.probe_solve(guided, shape, cond=labels)
        plans = {n: c.plan for n, c in choices.items()}
        fits = fast_fit_solvers(guided, list(B.NFES), traj.noise, plans=plans,
                                objective="rollout", cond=traj.cond,
                                reference=probe_reference(guided, traj,
                                                          [p.ts for p in plans.values()]),
                                plan_mse={n: c.draw_mse for n, c in choices.items()})
        seconds = time.perf_counter() - t0
    result = json.loads(Path(args.bench).read_text())[0]
    print(f"{args.model}, w = {args.cfg:g}: probe + fast fit {seconds:.1f} s "
          f"({args.threads} threads)")
    for n in B.NFES:
        e_best, name = B.best(result["diffusers"], n)
        fit = fits[n] if fits[n].rmse < fits[n].rmse_base else plans[n]
        with torch.no_grad():
            e_plan = B.rmse(S.sample(guided, noise, steps=n, cond=labels), ref)
            e_fit = B.rmse(S.sample(guided, noise, fit=fit, cond=labels), ref)
        print(f"{n} calls: default call {e_plan:.4g} ({e_plan / e_best:.2f}x), fast fit "
              f"{e_fit:.4g} ({e_fit / e_best:.2f}x) against diffusers' best {e_best:.4g} "
              f"({name})")


if __name__ == "__main__":
    main()
