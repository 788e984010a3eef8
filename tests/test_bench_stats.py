"""The benchmark's statistics: the paired bootstrap interval of an RMSE ratio
(bench/samplers_real.py, ``ratio_interval``) and the pooling of runs on several seeds
(bench/byom_summary.py, ``pool``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import byom_summary
        import samplers_real
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return samplers_real, byom_summary


def test_ratio_interval_is_exact_where_every_draw_has_the_same_ratio(bench):
    """a = b / 4 on every draw: every resample's RMSE ratio is exactly 1/2."""
    b = [0.5, 2.0, 1e-3, 7.0, 0.25]
    lo, hi = bench[0].ratio_interval([v / 4 for v in b], b)
    assert lo == pytest.approx(0.5, rel=1e-12) and hi == pytest.approx(0.5, rel=1e-12)
    assert all(math.isnan(v) for v in bench[0].ratio_interval([1.0, math.inf], [1.0, 1.0]))


def test_ratio_interval_covers_the_true_ratio_at_its_level(bench):
    """Per-draw squared errors a = 1.21 z1^2, b = z2^2 (z normal): the true RMSE ratio is
    sqrt(E a / E b) = 1.1. Over 200 independent sets of 64 draws the 90 % interval holds it
    in about 90 % of them (binomial sd 2.1 %; a percentile bootstrap of a ratio of means
    under-covers slightly at 64 draws), and it narrows as 1 / sqrt(draws)."""
    ratio_interval = bench[0].ratio_interval
    g = torch.Generator().manual_seed(0)
    hits = 0
    for rep in range(200):
        a = (1.21 * torch.randn(64, generator=g, dtype=torch.float64) ** 2).tolist()
        b = (torch.randn(64, generator=g, dtype=torch.float64) ** 2).tolist()
        lo, hi = ratio_interval(a, b, reps=400, seed=rep)
        hits += lo <= 1.1 <= hi
    assert 0.80 <= hits / 200 <= 0.97
    widths = []
    for n in (64, 1024):
        a = (1.21 * torch.randn(n, generator=g, dtype=torch.float64) ** 2).tolist()
        b = (torch.randn(n, generator=g, dtype=torch.float64) ** 2).tolist()
        lo, hi = ratio_interval(a, b)
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # sqrt(16) = 4 in expectation


def test_pool_joins_every_runs_draws_row_by_row(bench):
    """Pooled rows hold every run's draws (matched by label up to ':'), their RMSE is over all
    of them, and a row missing from one run is left out."""
    pool = bench[1].pool

    def run(seed, errs, plan):
        rows = {f"default call: {plan}": errs, "only here": errs}
        return {"spec": "m", "n": len(errs["5"]), "seed": seed, "cfg": None, "family": "vp",
                "prediction": "eps", "schedule": "linear",
                "per_draw": {"difflab": rows if seed == 1 else {f"default call: {plan}": errs},
                             "diffusers": {"UniPC-2 karras": {n: [2 * v for v in e]
                                                              for n, e in errs.items()}}}}

    e1 = {n: [1.0, 4.0] for n in ("5", "10", "20")}
    e2 = {n: [9.0, 16.0, 25.0] for n in ("5", "10", "20")}
    out = pool([run(1, e1, "unipc on log_snr"), run(2, e2, "unipc on karras")])
    assert out["n"] == 5 and out["seed"] == "1,2"
    assert set(out["difflab"]) == {"default call"}
    assert out["difflab"]["default call"]["10"][0] == pytest.approx(math.sqrt(55 / 5))
    assert out["diffusers"]["UniPC-2 karras"]["20"][0] == pytest.approx(math.sqrt(110 / 5))
    assert out["per_draw"]["difflab"]["default call"]["5"] == [1.0, 4.0, 9.0, 16.0, 25.0]


def test_reference_reads_a_discrete_models_end_two_ways(bench):
    """The benchmark's reference on one Gaussian N(mu, s^2 I) under a discrete scaled_linear
    chain (sigma~ = 0.029 at its first trained time 1 / T), against the closed-form flow map
    (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) = z, constant along the ODE:
    ``end="trained"`` stops at t = 1 / T and returns E[x_0 | x_t] = mu + alpha s^2 z /
    sqrt(alpha^2 s^2 + sigma^2) (a shrink of s z by 0.86 for s = 0.05), to 1e-6 of the gap
    between the readings at 960 steps, converging at third order; ``end="zero"`` solves on to
    t = 0, x = mu + s z, but the fine grid has 3 points below 1 / T at any step count, so it
    lands 9 % of the gap short at 960 steps (measured: 10 % at 240, 5 % at 3840;
    docs/results/byom_defaults.md, session 24)."""
    from difflab import schedules
    from difflab.toy import GaussianMixture

    sch = schedules.scaled_linear(0.00085, 0.012, timesteps=1000)
    mu, s = torch.tensor([[0.3, -0.5, 0.1, 0.8]], dtype=torch.float64), 0.05
    den = GaussianMixture(mu, s).denoiser(sch, "x0")
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def flow_state(t: float, x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        a, sg = float(sch.alpha(t)), float(sch.sigma(t))
        return (x - a * mu) / math.sqrt(a * a * s * s + sg * sg), a, sg

    z, _, _ = flow_state(1.0, noise * float(sch.prior_std(1.0)))
    _, a, sg = flow_state(float(sch.t_from_net_time(0.0)), noise)
    exact = {"zero": mu + s * z, "trained": mu + a * s * s * z / math.sqrt(a * a * s * s + sg * sg)}
    gap = float((exact["zero"] - exact["trained"]).pow(2).mean().sqrt())
    assert gap > 5e-3

    def err(end: str, steps: int = 960) -> float:
        with torch.no_grad():
            got = bench[0].reference(den, noise, steps, end=end)
        return float((got - exact[end]).pow(2).mean().sqrt())

    coarse, fine = err("trained", 240), err("trained")
    assert fine < 1e-5 * gap and coarse / fine > 32  # third order: 4^3 = 64 for 4x the steps
    assert 0.05 * gap < err("zero") < 0.15 * gap
    with pytest.raises(ValueError, match="end must be one of"):
        bench[0].reference(den, noise, 30, end="one")
