"""Bespoke solvers: the coefficient form of the classical solvers, its consistency, and the fit
on an exact mixture."""

from __future__ import annotations

import math

import pytest
import torch

from difflab import samplers as S
from difflab import schedules
from difflab.fitting import BASES, solver_coefficients, tune_solver
from difflab.samplers.timesteps import timesteps
from difflab.toy import GaussianMixture


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_bespoke_with_base_coefficients_is_the_base_solver(base, steps):
    sch = schedules.linear()
    den = GaussianMixture.random(4, 8, seed=1).denoiser(sch, "eps")
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(sch, steps, "log_snr")
    ours = S.sample(den, x, "bespoke", grid=ts, base=base)
    theirs = S.sample(den, x, base, grid=ts)
    torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)


def test_ddim_coefficients_are_the_first_order_step():
    """Row 1 of DDIM: x_1 = (sigma_1 / sigma_0) x_T + alpha_1 (1 - e^{-h}) D_0."""
    sch = schedules.cosine()
    ts = timesteps(sch, 2, "log_snr")
    (c, d), _ = solver_coefficients("ddim", sch, ts)
    alpha, sigma = (v.tolist() for v in sch.alpha_sigma(ts))
    h = math.log(alpha[1] / sigma[1]) - math.log(alpha[0] / sigma[0])
    assert c == pytest.approx(sigma[1] / sigma[0], rel=1e-12)
    assert d == pytest.approx(-alpha[1] * math.expm1(-h), rel=1e-12)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("schedule", [schedules.linear(), schedules.cosine(), schedules.edm()])
def test_coefficients_are_exact_for_a_point_mass(base, schedule):
    """Data at one point mu: D = mu everywhere and the ODE solution is x_t = alpha_t mu +
    (sigma_t / sigma_T)(x_T - alpha_T mu), so every consistent solver has c_j = sigma_j /
    sigma_T and sum_k d_jk = alpha_j - alpha_T sigma_j / sigma_T at every row."""
    ts = timesteps(schedule, 6, "log_snr")
    alpha, sigma = (v.tolist() for v in schedule.alpha_sigma(ts))
    for j, row in enumerate(solver_coefficients(base, schedule, ts), start=1):
        assert row[0] == pytest.approx(sigma[j] / sigma[0], rel=1e-9, abs=1e-12)
        assert sum(row[1:]) == pytest.approx(alpha[j] - alpha[0] * sigma[j] / sigma[0],
                                             rel=1e-9, abs=1e-12)


def test_bad_coefficients_and_bases_are_named():
    sch = schedules.linear()
    den = GaussianMixture.ring().denoiser(sch, "eps")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="need 3 rows of 2, 3, .., 4 numbers"):
        S.sample(den, x, "bespoke", 3, coeffs=[[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="valid: \\['unipc'"):
        S.sample(den, x, "bespoke", 3, base="heun")
    fit = S.SolverPlan("bespoke", timesteps(sch, 1, "log_snr"), coeffs=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="sampler='bespoke', not 'unipc'"):
        S.sample(den, x, "unipc", fit=fit)


def test_tuned_solver_beats_its_base_on_held_out_noise():
    """Fitted on 256 calibration draws of the 2-D ring, 4 network calls: lower error than the
    base solver on the same grid, on 512 other draws, at the same NFE."""
    sch = schedules.linear()
    mix = GaussianMixture.ring()
    den = mix.denoiser(sch, "eps")
    cal = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    test = torch.randn(512, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_ts = timesteps(sch, 200, "log_snr")
    ref_cal = S.sample(den, cal, "dpm_solver_3", grid=ref_ts)
    ref = S.sample(den, test, "dpm_solver_3", grid=ref_ts)
    grid = timesteps(sch, 4, "log_snr").tolist()
    tuned = tune_solver(den, 4, cal, grid=grid, reference=ref_cal, max_iter=50)
    assert tuned.sampler == "bespoke" and tuned.nfe == 4 and list(tuned.ts) == grid
    assert tuned.rmse < 0.5 * tuned.rmse_base
    assert list(tuned.eval_ts) != grid  # the times the network is told were fitted too
    # the sampler, told the fitted times through EvalTimes, is the function that was fitted
    assert rmse(S.sample(den, cal, "bespoke", fit=tuned), ref_cal) == pytest.approx(
        tuned.rmse, rel=1e-9)
    fixed = tune_solver(den, 4, cal, grid=grid, reference=ref_cal, max_iter=50,
                        fit_times=False)
    assert list(fixed.eval_ts) == grid and fixed.rmse < fixed.rmse_base
    net = den.net
    calls = net.calls
    e_tuned = rmse(S.sample(den, test, "bespoke", fit=tuned), ref)
    assert net.calls - calls == 4  # one batched call per grid point
    e_base = rmse(S.sample(den, test, "unipc", grid=grid), ref)
    assert e_tuned < 0.6 * e_base, (e_tuned, e_base)


def test_cli_tune_bespoke_then_sample_uses_it(tmp_path, capsys):
    """``difflab tune-grid --sampler bespoke`` tunes the base grid first, stores coeffs beside
    it, and ``difflab sample --sampler bespoke`` uses them (same output as the Python call)."""
    import json

    import numpy as np
    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS, load_fit
    from difflab.train.checkpoint import load_denoiser

    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--sampler", "bespoke", "--steps", "3",
                 "--count", "16", "--reference-steps", "20", "--max-evals", "30",
                 "--max-iter", "10"]) == 0
    grids = json.loads((ckpt / FITS).read_text())["fits"]
    base, entry = grids["unipc/3/ema"], grids["bespoke/3/ema"]
    assert entry["ts"] == base["ts"] and entry["eval_ts"] == base["eval_ts"]
    assert [len(r) for r in entry["coeffs"]] == [2, 3, 4]
    assert entry["rmse"] <= entry["rmse_base"] and entry["grid_from"]["sampler"] == "unipc"
    capsys.readouterr()
    out = tmp_path / "x.npy"
    assert main(["sample", str(ckpt), "--sampler", "bespoke", "--steps", "3", "--count", "5",
                 "--seed", "3", "--out", str(out)]) == 0
    assert "using the bespoke solver fitted" in capsys.readouterr().out
    den, _ = load_denoiser(ckpt)
    noise = torch.randn((5, 2), generator=torch.Generator().manual_seed(3))
    expect = S.sample(den, noise, "bespoke", fit=load_fit(ckpt, "bespoke", 3))
    np.testing.assert_allclose(np.load(out), expect.numpy(), rtol=1e-5, atol=1e-6)


def test_tuned_solver_with_classifier_free_guidance():
    """The fit runs through guidance transforms with per-draw conditions (split into chunks):
    a 3-step bespoke solver for a CFG-guided ring (w = 1) lowers the calibration error, and
    the sampler with the same labels reproduces it."""
    from difflab import guidance

    sch = schedules.linear()
    mix = GaussianMixture.ring()
    den = guidance.classifier_free(mix.denoiser(sch, "eps"), 1.0, uncond=mix.num_components)
    y = torch.arange(96) % mix.num_components
    cal = torch.randn(96, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grid = timesteps(sch, 3, "log_snr").tolist()
    tuned = tune_solver(den, 3, cal, grid=grid, cond=y, max_iter=30, batch_size=40,
                        reference_steps=100)
    assert tuned.rmse < 0.7 * tuned.rmse_base, tuned
    ref = S.sample(den, cal, "dpm_solver_3", grid=timesteps(sch, 100, "log_snr"), cond=y,
                   final="x0")  # the fits' reference ends with x0_hat at 1 / T
    x = S.sample(den, cal, "bespoke", fit=tuned, cond=y)
    assert rmse(x, ref) == pytest.approx(tuned.rmse, rel=1e-9)


def test_cli_bespoke_rejects_eval_times_only(tmp_path, capsys):
    from conftest import mlp_checkpoint

    from difflab.cli import main

    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--sampler", "bespoke", "--steps", "3", "--count", "4",
                 "--reference-steps", "10", "--eval-times-only"]) != 0
    assert "--eval-times-only refits a stored grid's times" in capsys.readouterr().err


def test_fitted_solvers_run_when_passed_and_only_then():
    """fit_solvers fits one solver per step count on one calibration batch and returns them;
    ``difflab.sample(den, noise, fit=fits[k])`` runs the fitted k-step solver (on held-out
    noise at least 3x below unipc on the same grid, the fit's starting point). Nothing is left
    on the denoiser: without ``fit=`` (a named sampler, a spacing, any step count, a guidance
    transform) the call runs the classical sampler or the probe's plan (not a fit)."""
    from difflab import guidance
    from difflab.fitting import adaptive_grid, fit_solvers, reference_profile

    sch = schedules.linear()
    mix = GaussianMixture.ring()
    den = mix.denoiser(sch, "eps")
    cal = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    test = torch.randn(512, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # the fits' reference: dpm_solver_3 on log-SNR, ending at 1 / T with x0_hat (trained_end)
    ref = S.sample(den, test, "dpm_solver_3", grid=timesteps(sch, 200, "log_snr"), final="x0")
    fits = fit_solvers(den, [3, 5], cal, max_iter=40, batch_size=128)
    assert sorted(fits) == [3, 5] and not getattr(den, "solvers", {})
    ref_cal = S.sample(den, cal, "dpm_solver_3", grid=timesteps(sch, 100, "log_snr"), final="x0")
    _, profile = reference_profile(den, cal, 100)
    for k in (3, 5):
        # fitted from the adaptive and the uniform-t grid; the fit with the lowest
        # calibration error is kept, and its base is unipc on that grid
        starts = fits[k].starts
        spacing = min(starts, key=starts.get)
        assert sorted(starts) == ["adaptive", "uniform"]
        assert fits[k].spacing == spacing and fits[k].rmse == starts[spacing]
        grid = (adaptive_grid(sch, k, profile) if spacing == "adaptive"
                else timesteps(sch, k, spacing).tolist())
        assert list(fits[k].ts) == grid
        assert fits[k].rmse_base == pytest.approx(
            rmse(S.sample(den, cal, "unipc", grid=grid), ref_cal), rel=1e-9)
        assert fits[k].iterations <= 40 and fits[k].reference_steps == 100
        assert S.choose(None, fits[k]) == S.choose("auto", fits[k]) == "bespoke"
        x = S.sample(den, test, fit=fits[k])
        assert torch.equal(x, S.sample(den, test, "bespoke", k, fit=fits[k]))
        e_base = rmse(S.sample(den, test, "unipc", grid=grid), ref)
        assert rmse(x, ref) < e_base / 3, (k, rmse(x, ref), e_base)
    classical = S.sample(den, test, "dpmpp_2m", steps=5)
    assert S.choose(None) == S.choose("auto") == "dpmpp_2m"
    probed = S.probe_plan(den, 5, (2,), dtype=test.dtype).plan  # the default call's plan
    assert probed.coeffs is None and probed.sampler in ("unipc", "dpmpp_2m")
    assert torch.equal(S.sample(den, test, steps=5), S.sample(den, test, fit=probed))
    assert torch.equal(S.sample(den, test, steps=5, spacing="log_snr"), classical)
    with pytest.raises(ValueError, match="brings its own grid"):
        S.sample(den, test, fit=fits[5], spacing="log_snr")
    with pytest.raises(ValueError, match="a 4-step grid needs 5"):
        S.sample(den, test, steps=4, fit=fits[5])
    y = torch.zeros(512, dtype=torch.long)
    cfg = guidance.classifier_free(den, 1.0, uncond=mix.num_components)
    assert torch.equal(S.sample(cfg, test, steps=5, cond=y, spacing="log_snr"),
                       S.sample(cfg, test, "dpmpp_2m", steps=5, cond=y))
    probed = S.probe_plan(cfg, 5, (2,), cond=y, dtype=test.dtype).plan
    assert torch.equal(S.sample(cfg, test, steps=5, cond=y),
                       S.sample(cfg, test, fit=probed, cond=y))


def test_cli_bespoke_from_a_spacing_needs_no_tuned_grid(tmp_path, capsys):
    """``tune-grid --sampler bespoke --start auto`` fits on fixed rules' grids (no unipc entry is
    tuned or stored) and plain ``difflab sample`` then uses it; a bad --start is named."""
    import json

    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS

    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--sampler", "bespoke", "--start", "best"]) != 0
    assert "unknown --start 'best'; valid: tuned, auto, adaptive, uniform" in (
        capsys.readouterr().err)
    assert main(["tune-grid", str(ckpt), "--sampler", "bespoke", "--steps", "3", "--count", "16",
                 "--reference-steps", "20", "--max-iter", "10", "--start", "auto"]) == 0
    grids = json.loads((ckpt / FITS).read_text())["fits"]
    assert list(grids) == ["bespoke/3/ema"]
    entry = grids["bespoke/3/ema"]
    assert sorted(entry["starts"]) == ["adaptive", "uniform"]
    assert entry["spacing"] in entry["starts"] and entry["rmse"] <= entry["rmse_base"]
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--steps", "3", "--count", "4",
                 "--out", str(tmp_path / "x.npy")]) == 0
    out = capsys.readouterr().out
    assert "using the bespoke solver fitted" in out and "(bespoke, 3 steps)" in out
