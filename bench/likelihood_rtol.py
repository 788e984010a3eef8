"""The ODE likelihood's accuracy and cost against the solver tolerance on one checkpoint: the same
images, dequantisation noise and Hutchinson probe at each rtol (= atol), the difference to the
tightest, NFE and CPU seconds per image; and the extrapolated time of the full 10k test set.

    python bench/likelihood_rtol.py CHECKPOINT --count 16 --rtols 1e-2 3e-3 1e-3 1e-4 1e-5
    python bench/likelihood_rtol.py CHECKPOINT --solver bosh3 --rtols 3e-2 1e-2 --reference 1e-4
    python bench/likelihood_rtol.py CHECKPOINT --solver multistep --steps 20 30 40 --reference 1e-4

``--reference R``: the differences are taken to a Dormand-Prince solve at rtol R (else to the
tightest rtol of the list, with ``--solver``).

One torch thread (torch.set_num_threads(1)).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rtols", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3, 1e-4, 1e-5])
    ap.add_argument("--out", default=None)
    ap.add_argument("--solver", default="dopri5", help="dopri5 | bosh3 | multistep")
    ap.add_argument("--steps", type=int, nargs="+", default=[30],
                    help="--solver multistep: its step counts (instead of --rtols)")
    ap.add_argument("--reference", type=float, default=None, metavar="R",
                    help="compare to a dopri5 solve at rtol R")
    ap.add_argument("--profile", type=int, default=0, metavar="B",
                    help="only time one call at batch B: the forward, and the forward with "
                         "Hutchinson's vector-Jacobian product (ms of CPU per image)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from likelihood import ode_batch, test_images

    from difflab.train.checkpoint import load_denoiser

    den, _ = load_denoiser(args.checkpoint)
    if args.profile:
        from difflab.likelihood import divergence

        z = torch.randn(args.profile, *test_images(1).shape[1:])
        v = torch.randint(0, 2, (1, *z.shape)).float() * 2 - 1

        def per_image(fn) -> float:
            fn()
            t0 = time.process_time()
            for _ in range(5):
                fn()
            return (time.process_time() - t0) / 5 / args.profile * 1000

        with torch.no_grad():
            fwd = per_image(lambda: den.predict(z, 0.5))
        both = per_image(lambda: divergence(den, z, 0.5, probes=v))
        print(json.dumps({"batch": args.profile, "forward_ms_per_image": fwd,
                          "forward_and_vjp_ms_per_image": both}))
        return
    x = test_images(args.count)
    def solve(setting: float, solver: str) -> dict:
        """setting: the rtol, or the multistep solver's steps"""
        t0 = time.process_time()
        bpd, nfe = [], 0
        for i, xb in enumerate(x.split(args.batch_size)):
            r = (ode_batch(den, xb, rtol=1e-3, seed=100 + i, solver=solver, steps=int(setting))
                 if solver == "multistep" else
                 ode_batch(den, xb, rtol=setting, seed=100 + i, solver=solver))
            bpd.append(r.bits_per_dim)
            nfe += r.nfe
        cpu = (time.process_time() - t0) / len(x)
        return {"bpd": torch.cat(bpd), "nfe": nfe, "cpu_s_per_image": cpu}

    if args.solver == "multistep" and args.reference is None:
        ap.error("--solver multistep needs --reference R (a dopri5 solve to compare with)")
    settings = args.steps if args.solver == "multistep" else args.rtols
    rows = {setting: solve(setting, args.solver) for setting in settings}
    ref = (solve(args.reference, "dopri5") if args.reference is not None
           else rows[min(args.rtols)])["bpd"]
    out = []
    for setting, r in rows.items():
        d = (r["bpd"] - ref).abs()
        key = "steps" if args.solver == "multistep" else "rtol"
        out.append({"solver": args.solver, key: setting, "bpd_mean": float(r["bpd"].mean()),
                    "mean_diff_vs_tightest": float((r["bpd"] - ref).mean()),  # the bias
                    "max_abs_diff_vs_tightest": float(d.max()),
                    "mean_abs_diff_vs_tightest": float(d.mean()),
                    "diff_se": float((r["bpd"] - ref).std() / len(x) ** 0.5),
                    "nfe_per_batch": r["nfe"] / len(x.split(args.batch_size)),
                    "cpu_s_per_image": r["cpu_s_per_image"],
                    "est_10k_minutes_1_thread": r["cpu_s_per_image"] * 10000 / 60,
                    "est_10k_minutes_2_cores": r["cpu_s_per_image"] * 10000 / 120})
        print(json.dumps(out[-1]))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
