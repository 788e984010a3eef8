"""The fast bespoke fit (difflab.fitting.fast): one reference solve for every step count,
teacher forcing or the probe plan's own rollout, ridge least squares toward the base solver; on
exact Gaussian mixtures."""

from __future__ import annotations

import pytest
import torch

from difflab import samplers as S
from difflab import schedules
from difflab.fitting import Fit, choose_fit, load_fit, save_fit, solver_coefficients
from difflab.fitting.fast import (
    EVAL_SHIFTS,
    FineReference,
    fast_fit_solvers,
    fine_reference,
    ridge_coefficients,
    rollout_coefficients,
)
from difflab.samplers.bespoke import combine
from difflab.samplers.timesteps import timesteps
from difflab.toy import GaussianMixture


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _point_mass_reference(sch, mu: torch.Tensor, noise: torch.Tensor, fine: int,
                          with_x0: bool) -> FineReference:
    """The exact ODE solution for data at one point mu, x_t = alpha_t mu + (sigma_t /
    sigma_T)(x_T - alpha_T mu), at every point of the ``fine``-step uniform grid."""
    ts = timesteps(sch, fine, "uniform")
    alpha, sigma = (v.tolist() for v in sch.alpha_sigma(ts))
    x_T = noise * sch.prior_std(1.0)
    xs = {i: alpha[i] * mu + (sigma[i] / sigma[0]) * (x_T - alpha[0] * mu)
          for i in range(fine + 1)}
    x0 = {i: mu.expand_as(x_T).clone() for i in range(fine)} if with_x0 else {}
    return FineReference(ts.tolist(), xs, x0, "exact")


@pytest.mark.parametrize("with_x0", [True, False])
@pytest.mark.parametrize("base", ["unipc", "dpmpp_2m"])
def test_exact_reference_of_a_point_mass_gives_the_base_coefficients(with_x0, base):
    """Every consistent solver is exact for data at one point: the base row has zero
    teacher-forced error there, so the ridge fit is the base solver itself (whether the
    predictions come with the reference or are evaluated)."""
    sch = schedules.linear()
    mu = torch.tensor([[0.7, -1.2, 0.3]], dtype=torch.float64)
    den = GaussianMixture(mu, 0.0).denoiser(sch, "eps")
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _point_mass_reference(sch, mu, noise, 20, with_x0)
    fits = fast_fit_solvers(den, [4, 5, 10], noise, base=base, reference=ref, validate=False)
    for k, fit in fits.items():
        expect = solver_coefficients(base, sch, timesteps(sch, k, "uniform"))
        for got, want in zip(fit.coeffs, expect):
            assert got == pytest.approx(want, rel=1e-7, abs=1e-9)
        assert fit.extra["tf_rmse"] < 1e-6 and fit.extra["tf_rmse_base"] < 1e-6


def test_ridge_solves_the_least_squares_problem():
    """With a tiny ridge weight the rows are the least-squares fit: on targets made by known
    coefficients from independent features, the fit recovers them."""
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(64, 8, generator=g, dtype=torch.float64)
    D = [torch.randn(64, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    true = [[0.5, 0.2], [0.1, -0.3, 0.9], [0.0, 0.4, 0.4, 0.2]]
    targets = [row[0] * x_T + sum(d * Dk for d, Dk in zip(row[1:], D)) for row in true]
    base = [[0.0] * len(row) for row in true]
    rows, mse, mse_base = ridge_coefficients(x_T, D, targets, base, ridge=1e-12)
    for got, want in zip(rows, true):
        assert got == pytest.approx(want, abs=1e-8)
    assert max(mse) < 1e-12 and min(mse_base) > 0.01


def _mixture():
    sch = schedules.linear()
    mix = GaussianMixture.random(10, 16, seed=0)
    return sch, mix.denoiser(sch, "eps")


def test_fast_fit_beats_its_base_on_held_out_noise():
    """Fitted on 32 calibration draws of a 16-D mixture from one 120-step reference solve:
    on 256 other draws the fitted 5- and 10-step solvers are closer to the accurate solution
    than unipc on the same grid (their start), at the same NFE; the result is a Fit that
    sample() runs, with its provenance."""
    sch, den = _mixture()
    cal = torch.randn(32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    test = torch.randn(256, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = S.sample(den, test, "dpm_solver_3", grid=timesteps(sch, 200, "log_snr"))
    fits = fast_fit_solvers(den, [5, 10], cal, reference_steps=120)
    for k, fit in fits.items():
        assert isinstance(fit, Fit) and fit.sampler == "bespoke" and fit.nfe == k
        assert list(fit.ts) == timesteps(sch, k, "uniform").tolist()
        assert fit.calibration == 32 and fit.reference_steps == 120
        assert fit.extra["method"] == "fast" and fit.spacing == "uniform"
        assert fit.rmse < fit.rmse_base and not fit.extra.get("kept_base")
        e_fit = rmse(S.sample(den, test, fit=fit), ref)
        e_base = rmse(S.sample(den, test, "unipc", grid=fit.ts), ref)
        assert e_fit < 0.8 * e_base, (k, e_fit, e_base)


def test_one_reference_solve_serves_every_step_count():
    """Network calls (batches of all draws): the reference solve, plus one call per grid
    point where the reference solver's own predictions cannot be reused, plus the two
    validation rollouts when asked for; nothing more."""
    sch, den = _mixture()
    cal = torch.randn(24, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = den.net
    steps = [5, 10, 20]
    for solver, validate, extra in [("dpmpp_3m", False, 0), ("unipc", False, sum(steps)),
                                    ("dpmpp_3m", True, 2 * sum(steps))]:
        calls = net.calls
        fast_fit_solvers(den, steps, cal, reference_steps=60, reference_solver=solver,
                         validate=validate)
        assert net.calls - calls == 60 + extra, (solver, validate)
    # the reused predictions are the network's at the reference states
    ref = fine_reference(den, cal, 60, keep=[0, 12, 30])
    for i in (0, 12, 30):
        t = torch.tensor(ref.ts, dtype=torch.float64)
        g = S.common.Grid(sch, t, cal)
        torch.testing.assert_close(ref.x0[i], S.common.predict(den, ref.x[i], g, i, None).x0)


def test_grids_not_nested_in_the_reference_are_refused():
    sch, den = _mixture()
    cal = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match="not a point of the 60-step reference grid"):
        fast_fit_solvers(den, [7], cal, reference_steps=60)
    with pytest.raises(ValueError, match="ridge must be > 0"):
        fast_fit_solvers(den, [5], cal, reference_steps=60, ridge=0.0)


def test_polish_runs_lbfgs_from_the_ridge_fit():
    """polish > 0: L-BFGS of the full objective warm-started at the ridge fit; its
    calibration error is not above the ridge fit's."""
    sch, den = _mixture()
    cal = torch.randn(32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = fast_fit_solvers(den, [5], cal, reference_steps=60)[5]
    polished = fast_fit_solvers(den, [5], cal, reference_steps=60, polish=5)[5]
    assert 0 < polished.iterations <= 5
    assert polished.extra["rmse_ridge"] == pytest.approx(plain.rmse, rel=1e-9)
    assert polished.rmse <= plain.rmse
    x = S.sample(den, cal, fit=polished)
    ref = fine_reference(den, cal, 60, keep=[]).x[60]
    assert rmse(x, ref) == pytest.approx(polished.rmse, rel=1e-9)


def test_fast_fit_round_trips_through_the_store(tmp_path):
    """A fast fit is stored beside a checkpoint, loaded back equal, chosen by choose_fit for
    sampling, and sample() runs it to the same output."""
    from conftest import mlp_checkpoint

    from difflab.train.checkpoint import load_denoiser

    ckpt = mlp_checkpoint(tmp_path / "ck")
    den, _ = load_denoiser(ckpt)
    cal = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    fits = fast_fit_solvers(den, [2, 4], cal, reference_steps=20)
    save_fit(ckpt, fits[4])
    back = load_fit(ckpt, "bespoke", 4)
    assert back is not None and back.extra["method"] == "fast"
    assert back.with_(weights_sha256=None) == fits[4]
    chosen = choose_fit(ckpt, None, 4)
    assert chosen == back and Fit.from_json(back.to_json()) == back
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(S.sample(den, noise, fit=chosen), S.sample(den, noise, fit=fits[4]))


def test_cli_tune_grid_fast_stores_the_fits(tmp_path, capsys):
    """``difflab tune-grid CKPT --fast`` fits bespoke solvers by the fast method and stores
    each one that beats the default call's probe plan on the calibration draws (the others
    are reported and not stored); ``difflab sample`` then runs the stored ones and the probe's
    plan elsewhere."""
    import json

    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS

    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--fast", "--steps", "2", "4", "--count", "8",
                 "--reference-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("fast fit") == 2
    fits_file = ckpt / FITS
    entries = json.loads(fits_file.read_text())["fits"] if fits_file.is_file() else {}
    for n in (2, 4):
        key = f"bespoke/{n}/ema"
        if key in entries:  # stored: better than the probe's plan on the same draws
            e = entries[key]
            assert e["method"] == "fast" and e["seed"] == 1000
            # the probe's fine grid (3 x 7 steps) merged with both plans' points
            assert 20 <= e["reference_steps"] <= 21 + 2 + 4 and e["calibration"] == 8
            assert e["rmse"] < e["rmse_probe"]
        else:
            assert f"bespoke {n} steps" in out and "not stored" in out
        assert main(["sample", str(ckpt), "--steps", str(n), "--count", "3",
                     "--out", str(tmp_path / f"x{n}.npy")]) == 0
        said = capsys.readouterr().out
        assert ("bespoke" in said) == (key in entries), said


def test_cli_tune_grid_fast_keeps_the_probe_where_the_fit_loses(tmp_path, capsys, monkeypatch):
    """Where the fast fit is not better than the probe's plan on the calibration draws,
    nothing is stored, a stored bespoke fit for that step count is removed, and the command
    says so; ``difflab sample`` then runs the probe's plan."""
    import json

    from conftest import mlp_checkpoint

    import difflab.fitting as fitting
    from difflab.cli import main
    from difflab.fitting import FITS

    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--fast", "--steps", "2", "4", "--count", "8",
                 "--reference-steps", "20"]) == 0
    real = fitting.fast_fit_solvers

    def losing(*args, **kwargs):  # the same fits, with a probe plan that did better
        fits = real(*args, **kwargs)
        return {n: f.with_(extra={**f.extra, "rmse_probe": f.rmse / 2}) if n == 4 else f
                for n, f in fits.items()}

    monkeypatch.setattr(fitting, "fast_fit_solvers", losing)
    capsys.readouterr()
    assert main(["tune-grid", str(ckpt), "--fast", "--steps", "2", "4", "--count", "8",
                 "--reference-steps", "20", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "not stored, the stored one removed; `difflab sample --steps 4` runs the probe" in out
    assert sorted(json.loads((ckpt / FITS).read_text())["fits"]) == ["bespoke/2/ema"]
    assert main(["sample", str(ckpt), "--steps", "4", "--count", "3",
                 "--out", str(tmp_path / "x.npy")]) == 0
    assert "a probe of this model chose" in capsys.readouterr().out


def test_cli_tune_grid_fast_polish_reaches_the_fit(tmp_path, capsys, monkeypatch):
    """``--polish N`` reaches every fast fit as N L-BFGS iterations, and each fit's line says
    whether it was polished (and from which RMSE) or why not (worse on held-out draws);
    ``--ridge`` reaches every fit and is recorded with it."""
    import json

    from conftest import mlp_checkpoint

    import difflab.fitting as fitting
    from difflab.cli import main
    from difflab.fitting import FITS

    real, seen = fitting.fast_fit_solvers, []

    def spy(*args, **kwargs):
        seen.append((kwargs.get("polish"), kwargs.get("ridge")))
        return real(*args, **kwargs)

    monkeypatch.setattr(fitting, "fast_fit_solvers", spy)
    ckpt = mlp_checkpoint(tmp_path / "ck")
    assert main(["tune-grid", str(ckpt), "--fast", "--steps", "2", "4", "--count", "8",
                 "--reference-steps", "20", "--polish", "3", "--ridge", "0.01"]) == 0
    out = capsys.readouterr().out
    assert seen and set(seen) == {(3, 0.01)}
    lines = [ln for ln in out.splitlines() if "fast fit" in ln]
    assert len(lines) == 2
    assert all("L-BFGS iterations (from " in ln or "scored worse on held-out draws" in ln
               for ln in lines), lines
    fits_file = ckpt / FITS
    for e in (json.loads(fits_file.read_text())["fits"] if fits_file.is_file() else {}).values():
        assert e["ridge"] == 0.01
        if e.get("objective") == "rollout+lbfgs":
            assert 0 < e["iterations"] <= 3 and e["rmse"] <= e["rmse_rollout"] * (1 + 1e-9)


# --- the rollout objective: on the probe plan's grid, row by row on its own rollout ----------
def _plans(den, steps, dim=16):
    from difflab.samplers import default_plan

    noise = torch.zeros(1, dim, dtype=torch.float64)
    return {n: default_plan(den, n, noise) for n in steps}


def test_rollout_fit_of_a_point_mass_is_its_plan():
    """Data at one point: every consistent solver is exact, so the plan's rows already meet
    the exact targets with zero residual, and the ridge solution is the plan's rows though
    the features (all D_k = mu) are collinear."""
    sch = schedules.linear()
    mu = torch.tensor([[0.7, -1.2, 0.3]], dtype=torch.float64)
    den = GaussianMixture(mu, 0.0).denoiser(sch, "eps")
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = timesteps(sch, 6, "log_snr").tolist()
    alpha, sigma = (v.tolist() for v in sch.alpha_sigma(torch.tensor(ts, dtype=torch.float64)))
    x_T = noise * sch.prior_std(1.0)
    targets = [alpha[i] * mu + (sigma[i] / sigma[0]) * (x_T - alpha[0] * mu)
               for i in range(1, 7)]
    for base in ("unipc", "dpmpp_2m"):
        rows0 = solver_coefficients(base, sch, ts)
        rows, taus, x_n = rollout_coefficients(den, ts, noise, targets, rows0, ridge=1e-3)
        assert taus == ts
        for got, want in zip(rows, rows0):
            assert got == pytest.approx(want, rel=1e-6, abs=1e-8)
        torch.testing.assert_close(x_n, mu.expand_as(x_n))


def test_rollout_fit_with_evaluation_times_runs_as_fitted():
    """The evaluation times chosen with each row are the ones sampling tells the network:
    the stored fit, run by ``difflab.sample``, reproduces the fitting pass's output exactly;
    the first time (t = 1) moves only toward the data, where t' <= t_0; and each row's
    residual is at most that of the grid's own time (the grid time is always a candidate)."""
    sch, den = _mixture()
    noise = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = timesteps(sch, 6, "uniform").tolist()
    fine = fine_reference(den, noise, 600, family="uniform", keep=list(range(0, 601, 100)))
    targets = [fine.x[i] for i in range(100, 601, 100)]  # the accurate state at each t_j
    rows0 = solver_coefficients("unipc", sch, ts)
    rows, taus, x_n = rollout_coefficients(den, ts, noise, targets, rows0, shifts=EVAL_SHIFTS)
    assert len(taus) == len(ts) and taus[-1] == ts[-1] and taus[0] <= ts[0]
    assert any(abs(a - b) > 1e-12 for a, b in zip(taus, ts))
    fit = Fit("bespoke", ts, taus, rows, base="unipc")
    torch.testing.assert_close(S.sample(den, noise, fit=fit), x_n, rtol=0, atol=1e-12)
    _, _, x_fixed = rollout_coefficients(den, ts, noise, targets, rows0)
    ref = targets[-1]
    assert rmse(x_n, ref) < rmse(x_fixed, ref)


def test_rollout_fit_judge_scores_each_candidate_time():
    """``judge`` replaces the residual as the score of a row's candidate evaluation times: a
    judge that recomputes the residual from what it is given reproduces the default fit, and
    one that scores every candidate alike keeps the first of them, the time nearest the data,
    at every grid point."""
    sch, den = _mixture()
    noise = torch.randn(12, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = timesteps(sch, 5, "uniform").tolist()
    fine = fine_reference(den, noise, 500, family="uniform", keep=list(range(0, 501, 100)))
    targets = [fine.x[i] for i in range(100, 501, 100)]
    rows0 = solver_coefficients("unipc", sch, ts)
    x_T = noise * sch.prior_std(1.0)
    given = []

    def residual(j, row, D, x0_at):
        given.append((len(row), len(D), callable(x0_at)) == (j + 1, j, True))
        return float((targets[j - 1] - combine(row, x_T, D)).pow(2).mean())

    want = rollout_coefficients(den, ts, noise, targets, rows0, shifts=EVAL_SHIFTS)
    got = rollout_coefficients(den, ts, noise, targets, rows0, shifts=EVAL_SHIFTS,
                               judge=residual)
    assert given and all(given) and got[1] == want[1]
    for a, b in zip(got[0], want[0]):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
    _, taus, _ = rollout_coefficients(den, ts, noise, targets, rows0, shifts=EVAL_SHIFTS,
                                      judge=lambda j, row, D, x0_at: 1.0)
    f = max(EVAL_SHIFTS)
    assert taus[:-1] == pytest.approx([a + f * (b - a) for a, b in zip(ts, ts[1:])], abs=1e-15)


def test_rollout_fit_beats_the_probe_plan_on_held_out_noise():
    """On the exact 16-D mixture (DDPM linear betas, eps): fitted on 16 calibration draws,
    on 256 other draws the fitted 5- and 10-step solvers are closer to the accurate solution
    than the default call's probe plan they start from, at the same NFE (0.61x and 0.74x);
    each kept the plan's grid and, scored on held-out halves, its grid times (evaluation
    times chosen with the rows scored worse there); every network call is
    accounted for. At 20 steps (not asserted) the fit gains on its calibration draws (0.0026
    -> 0.0009) but not on held-out halves (0.0046), so the plan is kept: 16 numbers per draw
    are few equations for 21 unknowns; images give 784 or more."""
    sch, den = _mixture()
    steps = [5, 10]
    plans = _plans(den, steps)
    cal = torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    test = torch.randn(256, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = S.sample(den, test, "dpm_solver_3", grid=timesteps(sch, 400, "log_snr"))
    calls = den.net.calls
    fits = fast_fit_solvers(den, steps, cal, plans=plans, objective="rollout",
                            reference_steps=180)
    n_ref = next(iter(fits.values())).reference_steps
    # the reference; then per step count the plan's rollout; each variant (the grid's own
    # times: one call per point; evaluation times chosen with the rows: one per candidate, from
    # t_0 = 1 only the shifts toward the data) fitted on each half and rolled out on the
    # other; the chosen variant fitted on all draws
    first = sum(f >= 0 for f in EVAL_SHIFTS)
    passes = {(0.0,): {n: n for n in steps},
              EVAL_SHIFTS: {n: first + len(EVAL_SHIFTS) * (n - 1) for n in steps}}
    want = n_ref + sum(n + sum(2 * (p[n] + n) for p in passes.values())
                       + passes[tuple(fits[n].extra["eval_shifts"])][n] for n in steps)
    # less the first call at x_T, which the reference solve made (dpmpp_3m keeps its
    # predictions): in the plan's rollout, each fitting pass and the grid-times variant's
    # rollouts; the chosen-times variant's two rollouts make it where their row 1 chose t_0
    known = len(steps) * (1 + 2 * 2 + 2 + 1)
    assert want - known - 2 * len(steps) <= den.net.calls - calls <= want - known
    assert n_ref >= 180
    for k, fit in fits.items():
        assert fit.sampler == "bespoke" and list(fit.ts) == list(plans[k].ts)
        assert fit.extra["objective"] == "rollout" and fit.base == plans[k].sampler
        assert list(fit.extra["eval_shifts"]) == [0.0] and list(fit.eval_ts) == list(fit.ts)
        assert fit.rmse < fit.rmse_base == fit.extra["rmse_probe"]
        e_fit = rmse(S.sample(den, test, fit=fit), ref)
        e_plan = rmse(S.sample(den, test, fit=plans[k]), ref)
        assert e_fit < 0.8 * e_plan, (k, e_fit, e_plan)


def test_rollout_fit_polish_is_kept_only_where_it_scores_better_held_out():
    """``polish``: L-BFGS of the full objective (the error at x(0) through every call) from
    the rollout fit, scored on the variants' held-out folds first. On 256-D mixture draws it
    scores better held out: the fit is then polished on all draws, which lowers the
    calibration RMSE below the unpolished fit's (kept as ``rmse_rollout``), the RMSE it reports
    is the stored fit's own as ``difflab.sample`` runs it against the fit's reference, and the
    told times it fitted are stored. On 16-D draws (16 numbers per draw for ~25 unknowns) the
    polish overfits each half and scores worse on the other: the fit is the unpolished one."""
    from difflab.fitting.fast import plans_reference

    sch = schedules.linear()
    for dim, polished in ((256, True), (16, False)):
        den = GaussianMixture.random(10, dim, seed=0).denoiser(sch, "eps")
        plans = _plans(den, [5], dim)
        cal = torch.randn(16, dim, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
        kw = dict(plans=plans, objective="rollout", reference_steps=180)
        plain = fast_fit_solvers(den, [5], cal, **kw)[5]
        fit = fast_fit_solvers(den, [5], cal, polish=8, **kw)[5]
        held = plain.extra["rmse_held_out"][",".join(map(str, plain.extra["eval_shifts"]))]
        assert (fit.extra["rmse_held_out_polished"] < held) == polished
        if not polished:
            assert fit.coeffs == plain.coeffs and fit.eval_ts == plain.eval_ts
            assert fit.rmse == plain.rmse and fit.iterations == 0
            continue
        assert fit.extra["objective"] == "rollout+lbfgs" and 0 < fit.iterations <= 8
        assert fit.extra["rmse_rollout"] == pytest.approx(plain.rmse, rel=1e-12)
        assert fit.rmse < plain.rmse
        out = plans_reference(den, cal, [plans[5]], 180)[0]
        ran = S.sample(den, cal, fit=fit)
        assert rmse(ran, out.x[out.steps]) == pytest.approx(fit.rmse, rel=1e-6)
        assert fit.fit_times and list(fit.eval_ts) != list(plain.eval_ts)


def test_rollout_fit_needs_a_linear_plan_for_every_step_count():
    sch, den = _mixture()
    cal = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"none for \[10\] steps"):
        fast_fit_solvers(den, [5, 10], cal, plans=_plans(den, [5]), objective="rollout")
    heun = S.SolverPlan("heun", timesteps(sch, 4, "karras").tolist())
    with pytest.raises(ValueError, match="not a linear solver"):
        fast_fit_solvers(den, [4], cal, plans={4: heun}, objective="rollout")
    with pytest.raises(ValueError, match="objective must be"):
        fast_fit_solvers(den, [4], cal, objective="rolout")


# --- the probe's fine solve as the reference (`difflab tune-grid --fast` by default) ----------
def test_probe_reference_is_the_probe_solve_and_adds_no_error_between_its_points():
    """The reference read off the default call's probe solve: at the probe's own fine points
    it is the probe's state; at the plans' other points (the uniform and log-SNR grids are
    not nested in the fine grid) one 2M step from the fine point before reaches them, and is
    no further from an accurate solve than the fine solve's own states are. No network call."""
    from difflab.fitting.fast import probe_reference
    from difflab.samplers import probe as P

    sch, den = _mixture()
    P.clear_probe_cache()
    traj = P.probe_solve(den, (16,), dtype=torch.float64)
    grids = [timesteps(sch, 5, "uniform").tolist(), timesteps(sch, 7, "log_snr").tolist()]
    calls = den.net.calls
    ref = probe_reference(den, traj, grids)
    assert den.net.calls == calls and ref.solver == "probe"
    fine = traj.ts.tolist()
    assert set(fine) <= set(ref.ts) and len(ref.ts) == len(set(fine) | {t for g in grids
                                                                      for t in g})
    # an accurate solve through every reference time: each interval split 20 ways
    ts = torch.tensor(ref.ts, dtype=torch.float64)
    dense = torch.cat([torch.linspace(float(a), float(b), 21, dtype=torch.float64)[:-1]
                       for a, b in zip(ts[:-1], ts[1:])] + [ts[-1:]])
    states = {}
    S.sample(den, traj.noise, "dpmpp_3m", grid=dense,
             callback=lambda s: states.__setitem__(s["i"] + 1, s["x"]))
    own = [rmse(traj.x[i], states[20 * ref.ts.index(t)]) for i, t in enumerate(fine)
           if 0 < i < len(fine) - 1]
    branched = []
    for q, x in ref.x.items():
        if ref.ts[q] in fine:
            assert torch.equal(x, traj.x[fine.index(ref.ts[q])])
        else:
            branched.append(rmse(x, states[20 * q]))
    assert len(branched) == 9  # 4 + 6 interior points; log-SNR's last, 1 / T, is a fine one
    assert max(branched) <= 2 * max(own), (max(branched), max(own))
    assert torch.equal(ref.x[len(ts) - 1], traj.x[-1])


def test_cli_tune_grid_fast_calibrates_on_the_probe_draws(tmp_path, capsys):
    """With no --seed, --count or --reference-steps, ``tune-grid --fast`` fits on the probe's
    own draws and reads its reference off the probe's fine solve: the only network calls after
    the probe are the fit's."""
    import json

    from conftest import mlp_checkpoint

    from difflab.cli import main
    from difflab.fitting import FITS
    from difflab.samplers import probe as P

    ckpt = mlp_checkpoint(tmp_path / "ck")
    P.clear_probe_cache()
    assert main(["tune-grid", str(ckpt), "--fast", "--steps", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("probe reference") == 2, out
    for e in json.loads((ckpt / FITS).read_text())["fits"].values():
        assert e["seed"] == P.PROBE_SEED and e["calibration"] == P.PROBE_DRAWS
        assert e["reference_solver"] == "probe"
        assert e["reference_steps"] >= 3 * P.PROBE_FINE


def test_fit_on_the_probe_draws_reuses_the_probe_plans_errors_and_first_call():
    """Calibrated on the probe's draws, the rollout fit takes the plan's error on each draw
    from the probe (rolling the plan out only on the draws the probe did not score it on: a
    path's first half) and every rollout's first call from the probe solve's first prediction
    (all draws, a fold, a half): the fits are the same as with both made again, for exactly
    that many fewer network calls."""
    from dataclasses import replace

    from difflab.fitting.fast import probe_reference
    from difflab.samplers import probe as P

    sch, den = _mixture()
    steps = [5, 10]
    P.clear_probe_cache()
    choices = {n: P.probe_plan(den, n, (16,), dtype=torch.float64) for n in steps}
    traj = P.probe_solve(den, (16,), dtype=torch.float64)
    plans = {n: c.plan for n, c in choices.items()}
    ref = probe_reference(den, traj, [plans[n].ts for n in steps])
    for c in choices.values():  # NaN exactly where the probe did not roll the plan out
        unscored = 0 if c.grid_name in P.FIXED_GRIDS else traj.half
        assert c.draw_mse.isnan().tolist() == [i < unscored for i in range(P.PROBE_DRAWS)]
        assert c.draw_mse[unscored:].mean().sqrt() == pytest.approx(c.scores[
            c.plan.sampler, c.plan.final, c.grid_name], rel=1e-12)

    def fit(reference, plan_mse):
        calls = den.net.calls
        fits = fast_fit_solvers(den, steps, traj.noise, plans=plans, objective="rollout",
                                reference=reference, plan_mse=plan_mse, eval_shifts=(0.0,))
        return fits, den.net.calls - calls

    fits, calls = fit(ref, {n: c.draw_mse for n, c in choices.items()})
    again, calls_again = fit(replace(ref, x0={}), None)
    # saved: the plan's rollout (n calls; a path's first call on its first half only), and the
    # first call of the fit and of the rollout on both folds and of the final fit (none where
    # the plan is kept). With evaluation times chosen with the rows, a fitted solver that
    # tells the network another time at t_0 makes its first call (not made before) there.
    saved = sum((n if c.grid_name in P.FIXED_GRIDS else 1) + 2 * 2
                + (not fits[n].extra.get("kept_base")) for n, c in choices.items())
    assert calls_again - calls == saved, (calls_again, calls, saved)
    for n in steps:
        a, b = fits[n], again[n]
        assert a.extra["rmse_probe"] == pytest.approx(b.extra["rmse_probe"], rel=1e-10)
        assert a.rmse == pytest.approx(b.rmse, rel=1e-8)
        assert list(a.eval_ts) == list(b.eval_ts)
        assert torch.allclose(torch.tensor(a.coeffs[-1]), torch.tensor(b.coeffs[-1]),
                              rtol=1e-8, atol=1e-10)
