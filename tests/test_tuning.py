"""Tuned time grids: the optimiser, the parametrisation, the fit on an exact mixture, and the
fits file a checkpoint carries."""

from __future__ import annotations

import json

import pytest
import torch

from difflab import samplers as S
from difflab import schedules
from difflab.fitting import (
    adaptive_grid,
    grid_from_theta,
    nelder_mead,
    reference_profile,
    tune_grid,
)
from difflab.samplers.timesteps import timesteps
from difflab.toy import GaussianMixture


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def test_nelder_mead_finds_the_rosenbrock_minimum():
    def rosen(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    x, fx, evals = nelder_mead(rosen, [-1.2, 1.0], step=0.5, max_evals=2000, rtol=1e-12)
    assert fx < 1e-8 and abs(x[0] - 1) < 1e-3 and abs(x[1] - 1) < 2e-3
    assert evals <= 2000 + 3  # a shrink may finish its round


def test_theta_zero_is_the_default_log_snr_grid():
    sch = schedules.linear()
    for steps in (1, 2, 5, 12):
        torch.testing.assert_close(grid_from_theta(sch, steps, [0.0] * steps),
                                   timesteps(sch, steps, "log_snr"), rtol=1e-9, atol=1e-12)


def test_reference_profile_is_the_rate_of_the_gaussian_data_prediction():
    """For Gaussian data N(mu, s^2 I) the ODE solution from noise is x_t = alpha_t mu +
    sqrt(alpha_t^2 s^2 + sigma_t^2) z, so the data prediction along it is D(lambda) = mu +
    s^2 z / sqrt(s^2 + e^-lambda) and |dD/dlambda| = s^2 |z| e^-lambda (s^2 + e^-lambda)^-3/2
    / 2. The profile (finite differences on the reference solve, at the log-SNR midpoints)
    matches it to the differences' O(h^2) error; the reference is the ODE solution itself, to
    the first trained time 1 / T, then x0_hat there: mu + alpha s^2 z / sqrt(alpha^2 s^2 +
    sigma^2) at t = 1 / T (samplers.trained_end; 1e-4 from mu + s z here, sigma~ = 0.01)."""
    sch = schedules.linear()
    s, dim = 0.5, 8
    mu = torch.linspace(-1, 1, dim, dtype=torch.float64)
    mix = GaussianMixture(mu[None], s)
    den = mix.denoiser(sch, "eps")
    noise = torch.randn(1024, dim, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    ref, profile = reference_profile(den, noise, 100, batch_size=300)
    x_T = noise * sch.prior_std(1.0)
    a_T, s_T = (float(v) for v in sch.alpha_sigma(torch.tensor(1.0, dtype=torch.float64)))
    z = (x_T - a_T * mu) / (a_T ** 2 * s ** 2 + s_T ** 2) ** 0.5
    a_0, s_0 = (float(v) for v in sch.alpha_sigma(
        torch.tensor(S.trained_end(sch), dtype=torch.float64)))
    exact_end = mu + a_0 * s ** 2 * z / (a_0 ** 2 * s ** 2 + s_0 ** 2) ** 0.5
    assert float((exact_end - (mu + s * z)).abs().max()) > 1e-4  # the two ends differ
    torch.testing.assert_close(ref, exact_end, atol=2e-5, rtol=0)
    lam = torch.tensor(profile["log_snr"], dtype=torch.float64)
    rate = torch.tensor(profile["rate"], dtype=torch.float64)
    e = torch.exp(-lam)
    exact = s ** 2 * z.pow(2).mean().sqrt() * e * (s ** 2 + e) ** -1.5 / 2
    assert lam.numel() == 99 and bool((lam.diff() > 0).all())
    torch.testing.assert_close(rate, exact, rtol=5e-3, atol=0)  # measured 1.6e-3


def test_adaptive_grid_equidistributes_the_square_root_of_the_rate():
    """Density sqrt(r): with r = 1 below lambda = 0 and 4 above, the mass of [-10, 10] is
    10 + 20, and the 6-step grid's points k = 1..5 sit at mass 5 k: lambda = -5, 0, 2.5, 5,
    7.5; then t = 0. A constant rate gives the uniform log-SNR grid over the profile."""
    sch = schedules.linear()
    lam = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    rate = torch.where(lam < 0, 1.0, 4.0)
    grid = adaptive_grid(sch, 6, {"log_snr": lam.tolist(), "rate": rate.tolist()})
    assert len(grid) == 7 and grid[0] == 1.0 and grid[-1] == 0.0
    got = sch.log_snr(torch.tensor(grid[1:-1], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([-5.0, 0.0, 2.5, 5.0, 7.5],
                                                 dtype=torch.float64), atol=5e-3, rtol=0)
    flat = adaptive_grid(sch, 4, {"log_snr": lam.tolist(), "rate": [3.0] * lam.numel()})
    torch.testing.assert_close(sch.log_snr(torch.tensor(flat[1:-1], dtype=torch.float64)),
                               torch.tensor([-5.0, 0.0, 5.0], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rate is zero"):
        adaptive_grid(sch, 4, {"log_snr": lam.tolist(), "rate": [0.0] * lam.numel()})


@pytest.mark.parametrize("schedule", [schedules.linear(), schedules.cosine(),
                                      schedules.edm()])
def test_every_theta_is_a_valid_grid(schedule):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        theta = (4 * torch.randn(8, generator=g, dtype=torch.float64)).tolist()
        ts = grid_from_theta(schedule, 8, theta)
        assert ts.numel() == 9 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
        assert bool((ts[1:] < ts[:-1]).all())


def test_sample_takes_an_explicit_grid():
    sch = schedules.linear()
    den = GaussianMixture.ring().denoiser(sch, "eps")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(sch, 7, "karras")
    torch.testing.assert_close(S.sample(den, x, "unipc", grid=ts),
                               S.sample(den, x, "unipc", 7, spacing="karras"))
    with pytest.raises(ValueError, match="either spacing= or grid="):
        S.sample(den, x, "unipc", grid=ts, spacing="karras")
    with pytest.raises(ValueError, match="8 times, a 5-step grid needs 6"):
        S.sample(den, x, "unipc", 5, grid=ts)
    with pytest.raises(ValueError, match="end at t = 0"):
        S.sample(den, x, "unipc", grid=ts[:-1])
    with pytest.raises(TypeError, match="pass a tuned grid or a fitted solver as fit="):
        S.sample(den, x, "unipc", grid={"ts": ts.tolist()})


def test_a_tuned_grid_generalises_to_new_noise():
    """Fitted on 64 calibration draws, the 5-step unipc grid on the 2-D ring must at least
    halve the default grid's RMSE on 512 *other* draws (measured: 0.28 -> ~0.04)."""
    sch = schedules.linear()
    mix = GaussianMixture.ring()
    den = mix.denoiser(sch, "eps")
    cal = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    test = torch.randn(512, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tuned = tune_grid(den, "unipc", 5, cal, reference_steps=200, max_evals=200)
    assert tuned.rmse <= tuned.rmse_default and tuned.nfe == 5
    ref = S.sample(den, test, "dpm_solver_3", 300)
    e_default = rmse(S.sample(den, test, "unipc", 5), ref)
    e_grid = rmse(S.sample(den, test, "unipc", grid=tuned.ts), ref)
    assert e_grid < 0.5 * e_default, (e_grid, e_default)
    # max_evals=200 leaves 100 runs to the decoupled evaluation times, which lower the error on
    # the calibration draws and, as fitted parameters should, on the other draws too
    assert tuned.rmse < tuned.rmse_grid and tuned.eval_ts != tuned.ts
    e_tuned = rmse(S.sample(den, test, fit=tuned), ref)
    assert e_tuned < e_grid, (e_tuned, e_grid)


def test_eval_times_tell_the_network_another_time():
    """EvalTimes: at grid time t_i the network's own output is taken at t'_i and converted with
    alpha(t_i), sigma(t_i); t'_i = t_i changes nothing (bit for bit)."""
    from difflab.fitting import eval_times_from_phi
    from difflab.samplers.common import EvalTimes, native_target

    sch = schedules.linear()
    mix = GaussianMixture.ring()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = timesteps(sch, 6, "log_snr").tolist()
    for prediction in ("eps", "v", "x0"):
        den = mix.denoiser(sch, prediction)
        assert native_target(den) == prediction
        assert torch.equal(S.sample(den, x, fit=S.SolverPlan("unipc", ts, ts)),
                           S.sample(den, x, "unipc", grid=ts))
        eval_ts = eval_times_from_phi(sch, ts, [0.0, 0.5, -0.5, 0.3, 0.0, 0.2])
        assert eval_ts[0] == ts[0] and eval_ts[-1] == 0.0
        assert eval_ts[1] > ts[1] and eval_ts[2] < ts[2]  # phi > 0: a noisier time
        shifted = EvalTimes(den, dict(zip(ts, eval_ts)))
        point = S.common.Grid(sch, torch.tensor(ts, dtype=torch.float64), x).points[2]
        got = shifted.predict_at(x, point)
        f = den.predict(x, eval_ts[2]).target(prediction)  # the network's output at t'_2
        a, s = point.alpha, point.sigma
        x0 = {"eps": (x - s * f) / a, "x0": f, "v": a * x - s * f}[prediction]
        torch.testing.assert_close(got.x0, x0)
        torch.testing.assert_close(got.eps, (x - a * x0) / s)
    cfg = __import__("difflab").guidance.classifier_free(
        mix.denoiser(sch, "v"), 1.0, uncond=0)
    assert native_target(cfg) == "v"
    with pytest.raises(ValueError, match="eval_ts must hold one time"):
        S.SolverPlan("unipc", ts, ts[:-1])


def test_stochastic_samplers_cannot_be_tuned():
    den = GaussianMixture.ring().denoiser(schedules.linear(), "eps")
    with pytest.raises(ValueError, match="stochastic"):
        tune_grid(den, "ddpm", 5, torch.randn(4, 2))


def test_fits_file_roundtrip_and_stale_weights(tmp_path):
    from difflab.fitting import FITS, Fit, load_fit, save_fit
    from difflab.nets import build
    from difflab.train.checkpoint import save_checkpoint

    net = build({"type": "mlp", "dim": 2, "hidden": 16, "depth": 2})
    config = {"net": net.config, "schedule": schedules.linear().config(), "prediction": "eps",
              "data": {"name": "ring", "channels": 2, "resolution": None}}
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    ckpt = save_checkpoint(tmp_path / "ck", config=config, model=sd, ema=sd)
    assert load_fit(ckpt, "unipc", 5) is None
    ts = timesteps(schedules.linear(), 5, "karras").tolist()
    save_fit(ckpt, Fit("unipc", ts, rmse=0.1))
    got = load_fit(ckpt, "unipc", 5)  # a fit without decoupled evaluation times
    assert got.ts == tuple(ts) and got.eval_ts is None and got.rmse == 0.1
    eval_ts = [min(1.0, 1.01 * t) for t in ts]
    save_fit(ckpt, Fit("unipc", ts, eval_ts, rmse=0.1))
    got = load_fit(ckpt, "unipc", 5)
    assert (list(got.ts), list(got.eval_ts)) == (ts, eval_ts)
    assert got.weights_sha256 is not None
    assert load_fit(ckpt, "unipc", 6) is None
    assert load_fit(ckpt, "unipc", 5, ema=False) is None  # tuned for the EMA weights
    assert json.loads((ckpt / FITS).read_text())["fits"]["unipc/5/ema"]["rmse"] == 0.1
    sd2 = {k: v + 1 for k, v in sd.items()}  # training went on: other weights
    save_checkpoint(tmp_path / "ck2", config=config, model=sd2, ema=sd2)
    (tmp_path / "ck2" / FITS).write_text((ckpt / FITS).read_text())
    with pytest.warns(UserWarning, match="tuned for other weights"):
        assert load_fit(tmp_path / "ck2", "unipc", 5) is None
    (ckpt / FITS).write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_fit(ckpt, "unipc", 5)


def test_fit_json_roundtrip_and_old_grids_files(tmp_path):
    """A Fit is frozen and survives to_json / from_json (through JSON text); the entries of
    the grids.json files of older checkpoints load as fits, and a save moves them to
    fits.json."""
    import dataclasses

    from difflab.fitting import FITS, Fit, load_fit, load_fits, save_fit, weights_file
    from difflab.fitting.store import weights_sha256

    ts = [1.0, 0.5, 0.2, 0.0]
    fit = Fit("bespoke", ts, [1.0, 0.55, 0.21, 0.0],
              [[0.5, 0.1], [0.2, 0.3, 0.1], [0.0, 0.2, 0.3, 0.4]], base="unipc",
              spacing="adaptive", rmse=0.01, rmse_base=0.05, starts={"adaptive": 0.01,
                                                                     "uniform": 0.02},
              calibration=64, seed=1000, reference_steps=100, iterations=12, fit_times=True,
              grid_from={"sampler": "unipc", "rmse": 0.03}, extra={"note": [1, 2]})
    assert fit.steps == 3 and fit.nfe == 3 and fit.ts == tuple(ts)
    back = Fit.from_json(json.loads(json.dumps(fit.to_json())))
    assert back == fit and back.to_json() == fit.to_json()
    assert back.to_json()["steps"] == 3 and back.extra["note"] == (1, 2)
    import pickle

    assert pickle.loads(pickle.dumps(fit)) == fit
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.rmse = 0.0
    with pytest.raises(TypeError):
        fit.starts["uniform"] = 0.0
    assert fit.with_(seed=7).seed == 7 and fit.seed == 1000
    with pytest.raises(ValueError, match="need 3 rows of 2, 3, .., 4 numbers"):
        Fit("bespoke", ts, coeffs=[[1.0, 0.0]])
    with pytest.raises(ValueError, match="for 4 steps has a grid of 4 times"):
        Fit.from_json({"sampler": "unipc", "ts": ts, "steps": 4})
    # a checkpoint with a grids.json of before fits.json (entries as tune-grid wrote them)
    from conftest import mlp_checkpoint

    ckpt = mlp_checkpoint(tmp_path / "ck")
    sha = weights_sha256(weights_file(ckpt))
    old = {"format": "difflab-grids-1", "grids": {
        "unipc/3/ema": {"ts": ts, "sampler": "unipc", "steps": 3, "nfe": 3, "rmse": 0.1,
                        "rmse_grid": 0.2, "rmse_default": 0.3, "default_spacing": "log_snr",
                        "evals": 30, "calibration": 16, "seed": 1000,
                        "reference_steps": 20, "weights_sha256": sha},
        "bespoke/3/ema": {**fit.to_json(), "rmse_default": None, "weights_sha256": sha}}}
    (ckpt / "grids.json").write_text(json.dumps(old))
    grid = load_fit(ckpt, "unipc", 3)
    assert grid.sampler == "unipc" and grid.eval_ts is None and grid.evals == 30
    assert grid.to_json() == old["grids"]["unipc/3/ema"]
    assert load_fits(ckpt) == {3: fit.with_(weights_sha256=sha)}
    save_fit(ckpt, grid.with_(rmse=0.05))
    stored = json.loads((ckpt / FITS).read_text())["fits"]
    assert sorted(stored) == ["bespoke/3/ema", "unipc/3/ema"]
    assert load_fit(ckpt, "unipc", 3).rmse == 0.05  # fits.json wins over grids.json


def test_cli_tune_grid_then_sample_uses_it(tmp_path, capsys):
    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS

    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "4",
                 "--count", "16", "--reference-steps", "20", "--max-evals", "30"]) == 0
    entry = json.loads((ckpt / FITS).read_text())["fits"]["dpmpp_2m/4/ema"]
    assert len(entry["ts"]) == 5 and entry["rmse"] <= entry["rmse_default"]
    capsys.readouterr()
    out = tmp_path / "x.npy"
    assert main(["sample", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "4", "--count", "3",
                 "--out", str(out)]) == 0
    assert "using the tuned dpmpp_2m 4-step grid" in capsys.readouterr().out
    assert main(["sample", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "4", "--count", "3",
                 "--spacing", "log_snr", "--out", str(out), "--overwrite"]) == 0
    assert "tuned" not in capsys.readouterr().out
    # fit only the evaluation times of the stored grid (e.g. a grid tuned on a GPU)
    assert main(["tune-grid", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "4",
                 "--count", "8", "--reference-steps", "20", "--max-evals", "20", "--seed", "7",
                 "--eval-times-only"]) == 0
    again = json.loads((ckpt / FITS).read_text())["fits"]["dpmpp_2m/4/ema"]
    assert again["ts"] == entry["ts"] and len(again["eval_ts"]) == 5
    assert again["grid_from"]["calibration"] == 16 and again["calibration"] == 8
    capsys.readouterr()
    assert main(["tune-grid", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "6", "--count", "4",
                 "--reference-steps", "10", "--eval-times-only"]) != 0
    assert "no dpmpp_2m 6-step grid for these weights; tune one first" in capsys.readouterr().err


def test_cli_tune_grid_fits_a_class_conditional_model_for_its_guidance(tmp_path, capsys):
    """``tune-grid --cfg W`` fits the ODE of classifier-free-guided sampling with weight w,
    draw i of class i mod K: the stored grid's calibration RMSE is that of the guided sampler
    against the guided reference (recomputed here), and ``sample`` runs the fit only at that w.
    """
    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS, load_fit, reference_profile
    from difflab.guidance import classifier_free
    from difflab.train.checkpoint import load_denoiser

    ckpt = mlp_checkpoint(tmp_path / "ck", num_classes=3)
    args = ["tune-grid", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "4", "--count", "12",
            "--reference-steps", "20", "--max-evals", "30"]
    assert main(args + ["--cfg", "2"]) == 0
    assert "3-class sampling (draw i: class i mod 3) with classifier-free guidance w = 2" \
        in capsys.readouterr().out
    assert main(args) == 0  # no --cfg: the conditional model, unguided
    stored = json.loads((ckpt / FITS).read_text())["fits"]
    assert sorted(stored) == ["dpmpp_2m/4/ema/cfg=0", "dpmpp_2m/4/ema/cfg=2"]

    den, _ = load_denoiser(ckpt)
    noise = torch.randn(12, 2, generator=torch.Generator().manual_seed(1000))
    labels = torch.arange(12) % 3
    for w in (2.0, 0.0):
        guided = classifier_free(den, w) if w else den
        fit = load_fit(ckpt, "dpmpp_2m", 4, guidance=f"cfg={w:g}")
        ref, _ = reference_profile(guided, noise, 20, cond=labels)
        x = S.sample(guided, noise, fit=fit, cond=labels)
        assert (x - ref).pow(2).mean().sqrt().item() == pytest.approx(fit.rmse, rel=1e-5)
    assert load_fit(ckpt, "dpmpp_2m", 4, guidance="cfg=2").rmse != pytest.approx(
        load_fit(ckpt, "dpmpp_2m", 4, guidance="cfg=0").rmse, rel=1e-3)

    capsys.readouterr()
    out = tmp_path / "x.npy"
    base = ["sample", str(ckpt), "--sampler", "dpmpp_2m", "--steps", "4", "--count", "3",
            "--out", str(out), "--overwrite"]
    for extra, used in ((["--cfg", "2"], True), ([], True), (["--cfg", "1"], False),
                        (["--cfg", "2", "--cfg-rescale", "0.5"], False)):
        assert main(base + extra) == 0
        assert ("using the tuned dpmpp_2m 4-step grid" in capsys.readouterr().out) == used, extra
    # an unconditional model has no guidance to fit for
    plain = mlp_checkpoint(tmp_path / "plain")
    assert main(["tune-grid", str(plain), "--steps", "3", "--cfg", "2"]) == 2
    assert "needs a class-conditional checkpoint" in capsys.readouterr().err
    assert not (plain / FITS).exists()


@pytest.mark.parametrize("extra, names", [
    (["--cfg", "-1"], "--cfg must be >= 0"),
    (["--cfg", "1", "--cfg-rescale", "2"], "--cfg-rescale must lie in [0, 1]"),
    (["--cfg-rescale", "0.5"], "--cfg-rescale only changes guided predictions"),
    (["--prompts-file", "missing.txt"], "--prompts-file missing.txt does not exist"),
    (["--prompts-file", "PROMPTS"], "--prompts-file: "),
    (["--polish", "5"], "--polish is a number of L-BFGS iterations after --fast's fit"),
    (["--fast", "--polish", "-1"], "(>= 0, with --fast), got -1"),
    (["--ridge", "0.1"], "--ridge is the weight (> 0) of --fast's rows toward the plan's solver, "
                         "got 0.1 without it"),
    (["--fast", "--ridge", "0"], "toward the plan's solver, got 0.0"),
])
def test_cli_tune_grid_refuses_impossible_guidance_before_any_work(tmp_path, capsys, extra,
                                                                    names):
    """Bad guidance options are one-line errors naming the option, and nothing is written:
    a weight out of range, a rescale without a weight, a missing prompts file, prompts for a
    model that takes no text; so is a polish or a ridge without --fast, or out of range."""
    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS

    ckpt = mlp_checkpoint(tmp_path / "ck", num_classes=3)
    (tmp_path / "p.txt").write_text("a cat\n")
    extra = [str(tmp_path / "p.txt") if a == "PROMPTS" else
             str(tmp_path / a) if a.endswith("missing.txt") else a for a in extra]
    assert main(["tune-grid", str(ckpt), "--steps", "3", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names.replace("missing.txt", str(
        tmp_path / "missing.txt")) in err, err
    assert not (ckpt / FITS).exists()
