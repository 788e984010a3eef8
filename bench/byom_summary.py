"""The table of docs/results/byom_defaults.md from the JSON files that bench/samplers_real.py
wrote (``--json``): per model, diffusers' best configuration at 5 / 10 / 20 calls and the
ratio of the main difflab rows (and of the stored fits, from a second run) to it.

    python bench/byom_summary.py docs/results/byom_defaults.json \\
        docs/results/byom_defaults_flow_edm.json docs/results/byom_defaults_eps.json \\
        --fits docs/results/byom_defaults_fits.json
"""

from __future__ import annotations

import argparse
import json
import math

NFES = ("5", "10", "20")
ROWS = ("default call", "auto with the fitted", "unipc (own", "unipc spacing=uniform",
        "dpmpp_2m spacing=uniform", "dpmpp_3m (own", "ddim (own")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", help="--json files of bench/samplers_real.py")
    ap.add_argument("--fits", default=None, help="a run whose rows include the stored fits")
    args = ap.parse_args()
    models: dict[str, dict] = {}
    for path in args.results:
        for r in json.load(open(path)):
            models.setdefault(r["spec"], r)
    fits = {r["spec"]: r for r in json.load(open(args.fits))} if args.fits else {}
    for spec, r in models.items():
        best = {n: min((v[n][0], k) for k, v in r["diffusers"].items() if math.isfinite(v[n][0]))
                for n in NFES}
        print(f"== {spec} ({r['family']}, {r['prediction']}, {r['schedule']})  diffusers best: "
              + ", ".join(f"{n}: {best[n][0]:.4f} {best[n][1]}" for n in NFES))
        rows = {k: v for k, v in r["difflab"].items() if k.startswith(ROWS)}
        for k, v in fits.get(spec, {}).get("difflab", {}).items():
            if "fitted" in k:
                rows["fast fit (bespoke, stored): " + k] = v
        for k, v in rows.items():
            print(f"   {k[:58]:58s} " + " ".join(
                f"{v[n][0]:.4f} ({v[n][0] / best[n][0]:.2f}x)" for n in NFES))


if __name__ == "__main__":
    main()
