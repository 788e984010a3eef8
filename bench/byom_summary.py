"""The table of docs/results/byom_defaults.md from the JSON files that bench/samplers_real.py
wrote (``--json``): per model, diffusers' best configuration at 5 / 10 / 20 calls and the
ratio of the main difflab rows (and of the stored fits, from a second run) to it, with the
ratio's 90 % paired bootstrap interval over the test draws where the run kept each draw's
error (``per_draw``, session 21 on). ``--pool`` joins the runs of one model on other seeds
(the same guidance) into one set of draws, rows matched by label. ``--tails`` adds, where the
draws were kept, the ratio on the *median* draw (sqrt of the median squared error over sqrt of
diffusers' best's) and the share of the row's summed squared error its worst draw holds: a
diagnostic of heavy tails (session 25), not a second reading of the target, which is the RMSE
ratio over all draws.

    python bench/byom_summary.py docs/results/byom_defaults.json \\
        docs/results/byom_defaults_flow_edm.json docs/results/byom_defaults_eps.json \\
        --fits docs/results/byom_defaults_fits.json
    python bench/byom_summary.py --pool --tails docs/results/byom_s24_latent0_s{1,2,3}.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from samplers_real import ratio_interval  # noqa: E402

NFES = ("5", "10", "20")
ROWS = ("default call", "auto with the fitted", "unipc (own", "unipc spacing=uniform",
        "dpmpp_2m spacing=uniform", "dpmpp_3m (own", "ddim (own")


def pool(runs: list[dict]) -> dict:
    """One result of the runs of one model: every row kept per draw by all of them, its
    draws joined (a row's label up to its first ':', so the default call and the fits match
    whatever plan each run printed), the RMSE over all draws."""
    if not all("per_draw" in r for r in runs):
        raise SystemExit(f"--pool needs per-draw errors (samplers_real.py, session 21 on): "
                         f"{runs[0]['spec']}")
    out = {**runs[0], "n": sum(r["n"] for r in runs),
           "seed": ",".join(str(r["seed"]) for r in runs), "per_draw": {}}
    for side in ("difflab", "diffusers"):
        labels = [{k.split(":")[0]: k for k in r["per_draw"][side]} for r in runs]
        rows, draws = {}, {}
        for short in labels[0]:
            if not all(short in la for la in labels):
                continue
            joined = {n: sum((r["per_draw"][side][la[short]].get(n, [math.inf])
                              for r, la in zip(runs, labels)), []) for n in NFES}
            draws[short] = joined
            rows[short] = {n: [math.sqrt(sum(v) / len(v)), 0] for n, v in joined.items()}
        out[side], out["per_draw"][side] = rows, draws
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="--json files of bench/samplers_real.py")
    ap.add_argument("--fits", default=None, help="a run whose rows include the stored fits")
    ap.add_argument("--pool", action="store_true",
                    help="join the runs of each model (and guidance) into one set of draws")
    ap.add_argument("--tails", action="store_true",
                    help="add the median draw's ratio and the worst draw's share of the error")
    args = ap.parse_args()
    runs: dict[tuple, list[dict]] = {}
    for path in args.results:
        for r in json.load(open(path)):
            runs.setdefault((r["spec"], r.get("cfg")), []).append(r)
    models = {key: pool(rs) if args.pool else rs[0] for key, rs in runs.items()}
    fits = {r["spec"]: r for r in json.load(open(args.fits))} if args.fits else {}
    for (spec, cfg), r in models.items():
        best = {n: min((v[n][0], k) for k, v in r["diffusers"].items() if math.isfinite(v[n][0]))
                for n in NFES}
        guided = "" if cfg is None else f", cfg {cfg:g}"
        draws = f", {r['n']} draws (seed {r['seed']})" if "n" in r else ""
        print(f"== {spec} ({r['family']}, {r['prediction']}, {r['schedule']}{guided}{draws})  "
              "diffusers best: " + ", ".join(f"{n}: {best[n][0]:.4f} {best[n][1]}"
                                             for n in NFES))
        rows = {k: v for k, v in r["difflab"].items() if k.startswith(ROWS)}
        for k, v in fits.get(spec, {}).get("difflab", {}).items():
            if "fitted" in k:
                rows["fast fit (bespoke, stored): " + k] = v
        per_draw = r.get("per_draw", {})
        for k, v in rows.items():
            cells = []
            for n in NFES:
                cell = f"{v[n][0]:.4f} ({v[n][0] / best[n][0]:.2f}x"
                a = per_draw.get("difflab", {}).get(k, {}).get(n)
                b = per_draw.get("diffusers", {}).get(best[n][1], {}).get(n)
                if a and b:
                    cell += " [{:.2f}, {:.2f}]".format(*ratio_interval(a, b))
                    if args.tails:
                        typical = math.sqrt(statistics.median(a) / statistics.median(b))
                        cell += f"; median draw {typical:.2f}x, worst draw {max(a) / sum(a):.0%}"
                cells.append(cell + ")")
            print(f"   {k[:58]:58s} " + " ".join(cells))


if __name__ == "__main__":
    main()
