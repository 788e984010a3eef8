"""The default call's probe (difflab.samplers.probe): its dynamic programs find the true cheapest
paths, its step costs are the samplers' own steps, and on an exact mixture the plan it picks
beats the fixed grids on noise it never saw."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from difflab import samplers as S
from difflab import schedules
from difflab.fitting import Fit
from difflab.samplers import probe as P
from difflab.toy import GaussianMixture


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).mean().sqrt())


def brute(n: int, steps: int, cost) -> float:
    best = math.inf
    for inner in itertools.combinations(range(1, n), steps - 1):
        best = min(best, cost((0, *inner, n)))
    return best


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_cheapest_paths_are_the_brute_force_minimum(steps):
    g = torch.Generator().manual_seed(steps)
    n = 8
    C1 = torch.rand(n + 1, n + 1, generator=g, dtype=torch.float64)
    C2 = torch.rand(n + 1, n + 1, n + 1, generator=g, dtype=torch.float64)
    C1 = torch.where(torch.ones_like(C1).triu(1).bool(), C1, torch.full_like(C1, math.inf))
    i, j, k = torch.meshgrid(*[torch.arange(n + 1)] * 3, indexing="ij")
    C2 = torch.where((i < j) & (j < k), C2, torch.full_like(C2, math.inf))  # as multistep_costs

    def one(path):
        return sum(float(C1[a, b]) for a, b in zip(path, path[1:]))

    def two(path):
        return float(C1[path[0], path[1]]) + sum(float(C2[a, b, c])
                                                 for a, b, c in zip(path, path[1:], path[2:]))

    p1 = P.cheapest_path(C1, steps)
    assert p1[0] == 0 and p1[-1] == n and len(p1) == steps + 1 and p1 == sorted(set(p1))
    assert one(p1) == pytest.approx(brute(n, steps, one), rel=1e-12)
    p2 = P.cheapest_pair_path(C1, C2, steps)
    assert p2[0] == 0 and p2[-1] == n and len(p2) == steps + 1 and p2 == sorted(set(p2))
    assert two(p2) == pytest.approx(brute(n, steps, two), rel=1e-12)
    with pytest.raises(ValueError, match="needs 1 <= steps"):
        P.cheapest_path(C1, n + 1)


@pytest.fixture(scope="module")
def mixture_probe():
    sch = schedules.linear(1e-4, 0.02, timesteps=1000)
    den = GaussianMixture.random(4, 8, seed=3).denoiser(sch, "eps")
    noise = torch.randn(8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return den, P.probe_trajectory(den, noise, fine=40)


def test_fine_grid_is_dense_where_any_family_is(mixture_probe):
    den, traj = mixture_probe
    ts = traj.ts
    assert ts[0] == 1.0 and ts[-1] == 0.0 and bool((ts[1:] < ts[:-1]).all())
    zero = P.fine_grid(den.schedule, 40, end="zero")  # the density sum on to t = 0
    assert len(zero) == 121
    for family in P.FAMILIES:  # each family's interval holds one unit of the summed density,
        g = S.timesteps(den.schedule, 40, family)  # so at least one fine point
        for a, b in zip(g, g[1:]):
            assert int(((ts <= a) & (ts >= b)).sum()) >= 1, (family, float(a), float(b))


def test_the_fine_solve_stops_at_a_discrete_models_first_trained_time(mixture_probe):
    """The network never saw t < 1 / T: the probe's grid keeps the "zero" grid's points above
    t_min = 1 / T, then t_min, then 0, and the solve ends with x0_hat at t_min (its output is
    the last data prediction); a continuous-time schedule keeps the whole grid."""
    den, traj = mixture_probe
    t_min = S.trained_end(den.schedule)
    assert t_min == pytest.approx(1e-3)
    zero = P.fine_grid(den.schedule, 40, end="zero")
    assert int((zero < t_min).sum()) >= 2  # what the old grid spent below t_min
    assert torch.equal(traj.ts, torch.cat([zero[zero > t_min], zero.new_tensor([t_min, 0.0])]))
    assert torch.equal(traj.x[-1], traj.x0[-1])
    continuous = schedules.cosine_continuous()
    assert S.trained_end(continuous) is None
    assert torch.equal(P.fine_grid(continuous, 40), P.fine_grid(continuous, 40, end="zero"))
    with pytest.raises(ValueError, match="end must be"):
        P.fine_grid(den.schedule, 40, end="one")


def test_first_order_cost_is_the_ddim_step_from_the_probe_state(mixture_probe):
    den, traj = mixture_probe
    C = P.first_order_costs(traj)  # from the first half of the draws (the second selects)
    s, h = traj.data_std, traj.half
    assert h == 4
    for i, k in [(0, 3), (10, 11), (40, 90), (100, 119)]:
        t_i, t_k = float(traj.ts[i]), float(traj.ts[k])
        x_k = S.get("ddim").fn(den, traj.x[i][:h], torch.tensor([t_i, t_k], dtype=torch.float64))
        a, sg = (float(v) for v in den.schedule.alpha_sigma(torch.tensor(t_k)))
        gain = s / math.sqrt(a * a * s * s + sg * sg)
        # the costs come from a Gram matrix: e^2 to ~1e-15 absolute, e to ~1e-7
        assert float(C[i, k]) == pytest.approx(gain * rmse(x_k, traj.x[k][:h]), rel=1e-6, abs=1e-6)
    assert math.isinf(float(C[5, 5])) and math.isinf(float(C[6, 2]))


def test_step_costs_shrink_at_their_orders(mixture_probe):
    """A first-order step's local error is O(h^2), a two-step (2M) step's O(h^3): halving the
    step (in the middle of the trajectory, where the fine grid is smooth) divides them by
    about 4 and 8."""
    _, traj = mixture_probe
    C1, C2 = P.first_order_costs(traj), P.multistep_costs(traj)
    j = 60
    r1 = float(C1[j, j + 8]) / float(C1[j, j + 4])
    r2 = float(C2[j - 8, j, j + 8]) / float(C2[j - 4, j, j + 4])
    assert 3.0 < r1 < 5.0, r1
    assert 6.0 < r2 < 10.0, r2


@pytest.mark.parametrize("prediction,schedule", [
    ("eps", schedules.linear(1e-4, 0.02, timesteps=1000)),
    ("flow", schedules.rectified_flow()),
])
def test_default_call_runs_the_probe_plan_and_beats_fixed_grids(prediction, schedule):
    den = GaussianMixture.random(6, 8, seed=11).denoiser(schedule, prediction)
    test = torch.randn(512, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = S.sample(den, test, "unipc", 500, spacing="uniform")
    P.clear_probe_cache()
    for n in (5, 10):
        choice = S.probe_plan(den, n, (8,), dtype=torch.float64)
        x = S.sample(den, test, steps=n)
        plan = choice.plan
        assert torch.equal(x, S.sample(den, test, plan.sampler, grid=plan.ts, final=plan.final))
        assert plan.steps == n and plan.sampler in ("unipc", "dpmpp_2m")
        fixed = min(rmse(S.sample(den, test, name, n, spacing=sp, final=final), ref)
                    for name, final in P.PROBE_SOLVERS for sp in ("uniform", "log_snr"))
        # noise the probe never saw: at least as good as the best fixed grid (up to the
        # probe's selection noise) and far better than the old default on this schedule
        assert rmse(x, ref) <= 1.05 * fixed, (n, rmse(x, ref), fixed, choice.grid_name)
        assert len(choice.scores) >= 12


def test_probe_is_cached_and_refreshed_when_the_weights_change():
    torch.manual_seed(0)
    sch = schedules.cosine()
    net = torch.nn.Linear(4, 4).double()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = net

        def forward(self, x, t, labels=None):
            return self.lin(x) * 0.1

    from difflab.denoiser import Denoiser

    den = Denoiser(Net(), sch, prediction="eps")
    calls = []
    den.net.register_forward_hook(lambda *a: calls.append(1))
    noise = torch.randn(3, 4, dtype=torch.float64)
    P.clear_probe_cache()
    S.sample(den, noise, steps=4)
    first = len(calls)
    assert first > 3 * P.PROBE_FINE  # the fine probe solve, then the rollouts and the call
    calls.clear()
    S.sample(den, noise, steps=4)
    assert len(calls) == 4  # cached: the call's own 4 network calls
    with torch.no_grad():
        net.weight.add_(0.01)  # an optimizer step bumps the parameters' versions
    calls.clear()
    S.sample(den, noise, steps=4)
    assert len(calls) == first
    calls.clear()  # a named sampler never probes; nor do 1 step or > MAX_PROBE_STEPS
    S.sample(den, noise, "unipc", 4)
    S.sample(den, noise, steps=1)
    assert len(calls) == 5


def test_plan_final_mode_runs_and_round_trips():
    plan = S.SolverPlan("unipc", [1.0, 0.5, 0.0], final="x0")
    assert plan.final == "x0"
    with pytest.raises(ValueError, match="final must be one of"):
        S.SolverPlan("unipc", [1.0, 0.5, 0.0], final="linear")
    fit = Fit("unipc", [1.0, 0.4, 0.0], final="x0", rmse=0.1)
    assert Fit.from_json(fit.to_json()) == fit
    den = GaussianMixture.random(2, 3, seed=0).denoiser(schedules.cosine(), "v")
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(S.sample(den, x, fit=fit), S.sample(den, x, "unipc", grid=fit.ts,
                                                           final="x0"))
    with pytest.raises(ValueError, match="final in the fit or as an option"):
        S.sample(den, x, fit=fit, final="x0")


def test_probe_scores_fixed_grids_on_all_draws_and_paths_on_the_held_half():
    """A fixed grid saw no probe draw, so every draw scores it; a path was placed on the first
    half, so only the second half does; the winner is the best fixed or the best path
    candidate, whichever is closer on the second half (the same draws for both)."""
    den = GaussianMixture.random(6, 8, seed=11).denoiser(schedules.rectified_flow(), "flow")
    P.clear_probe_cache()
    choice = S.probe_plan(den, 5, (8,), dtype=torch.float64)
    traj = next(iter(P._CACHE[den].values()))["traj"]
    half = traj.half
    x_T = traj.noise * den.schedule.prior_std(1.0)
    grids = P.candidate_grids(den, traj, 5)
    assert {"uniform", "log_snr", "path", "path_2m"} <= set(grids)
    held = {}
    for (solver, final, name), score in choice.scores.items():
        x = S.REGISTRY[solver].fn(den, x_T, grids[name], final=final)
        err = (x - traj.x[-1]).pow(2).flatten(1).mean(1)
        start = 0 if name in P.FIXED_GRIDS else half
        assert score == pytest.approx(float(err[start:].mean().sqrt()), rel=1e-9)
        held[solver, final, name] = float(err[half:].mean().sqrt())
    best = {kind: min((k for k in choice.scores if (k[2] in P.FIXED_GRIDS) == kind),
                      key=choice.scores.__getitem__) for kind in (True, False)}
    winner = min(best.values(), key=held.__getitem__)
    assert (choice.plan.sampler, choice.plan.final, choice.grid_name) == winner
    assert list(choice.plan.ts) == pytest.approx(grids[winner[2]].tolist(), abs=1e-12)


@pytest.mark.parametrize("prediction,schedule", [
    ("eps", schedules.linear(1e-4, 0.02, timesteps=1000)),
    ("flow", schedules.rectified_flow()),
])
def test_one_rollout_gives_every_final_mode(prediction, schedule):
    """The probe rolls each solver out once and makes every final-step mode from its last two
    data predictions: the same numbers as a rollout per mode, on grids that end at sigma = 0
    and on one that stops short of it (where the mode does not apply)."""
    den = GaussianMixture.random(4, 6, seed=2).denoiser(schedule, prediction)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x * schedule.prior_std(1.0)
    modes = ("extrapolate", "x0")
    for ts in (S.timesteps(schedule, 6, "uniform"), S.timesteps(schedule, 2, "uniform"),
               torch.tensor([1.0, 0.7, 0.4, 0.2], dtype=torch.float64)):
        for solver in {s for s, _ in P.PROBE_SOLVERS}:
            outs = P.rollout_finals(den, solver, x, ts, None, modes)
            for mode in modes:
                assert torch.equal(outs[mode], S.REGISTRY[solver].fn(den, x, ts, final=mode))
            if ts[-1] == 0 and len(ts) > 3:  # (from alpha = 0 the extrapolation weight is 0)
                assert not torch.equal(outs["x0"], outs["extrapolate"])


def test_probe_rolls_each_solver_out_once_per_grid_and_shares_the_first_call():
    """Network calls of a probe plan once the fine solve is cached: per candidate grid one
    rollout per solver (the final-step modes share it, :func:`rollout_finals`) without its
    first call, which every rollout from the same start makes identically: once for the
    fixed grids' start (all draws) and once for the paths' (the held half)."""
    den = GaussianMixture.random(6, 8, seed=11).denoiser(schedules.rectified_flow(), "flow")
    P.clear_probe_cache()
    S.probe_plan(den, 5, (8,), dtype=torch.float64)
    traj = next(iter(P._CACHE[den].values()))["traj"]
    for n in (6, 9):
        grids = P.candidate_grids(den, traj, n)
        starts = {name in P.FIXED_GRIDS for name in grids}
        calls = den.net.calls
        S.probe_plan(den, n, (8,), dtype=torch.float64)
        solvers = len({s for s, _ in P.PROBE_SOLVERS})
        assert den.net.calls - calls == len(grids) * solvers * (n - 1) + len(starts)


@pytest.mark.parametrize("steps", [10, 20])
def test_a_winning_uniform_grid_meets_its_linspace_twin(monkeypatch, steps):
    """Where the uniform grid wins on a discrete-time model, the winning solver is rolled out
    once more, on diffusers' "linspace" twin, scored on all draws against the fine solve as
    the uniform grid is, and the closer of the two is the plan; a continuous-time model has
    no twin."""
    linear = schedules.linear(1e-4, 0.02, timesteps=1000)
    den = GaussianMixture.random(6, 8, seed=11).denoiser(linear, "eps")
    only_uniform = {"uniform": S.timesteps(linear, steps, "uniform")}
    monkeypatch.setattr(P, "candidate_grids", lambda *a: dict(only_uniform))
    P.clear_probe_cache()
    P.probe_solve(den, (8,), dtype=torch.float64)
    calls = den.net.calls
    choice = S.probe_plan(den, steps, (8,), dtype=torch.float64)
    solvers = len({s for s, _ in P.PROBE_SOLVERS})
    # one rollout per solver on the uniform grid (its first call shared), one on the twin
    assert den.net.calls - calls == (solvers + 1) * (steps - 1) + 1
    traj = next(iter(P._CACHE[den].values()))["traj"]
    x_T = traj.noise * linear.prior_std(1.0)
    best = min((k for k in choice.scores if k[2] == "uniform"), key=choice.scores.__getitem__)
    twin = (best[0], best[1], "linspace")
    assert set(choice.scores) == {k for k in choice.scores if k[2] == "uniform"} | {twin}
    ts = S.timesteps(linear, steps, "linspace")
    x = S.REGISTRY[twin[0]].fn(den, x_T, ts, final=twin[1])
    assert choice.scores[twin] == pytest.approx(rmse(x, traj.x[-1]), rel=1e-9)
    winner = min((best, twin), key=choice.scores.__getitem__)
    assert (choice.plan.sampler, choice.plan.final, choice.grid_name) == winner
    assert list(choice.plan.ts) == pytest.approx(S.timesteps(linear, steps, winner[2]).tolist())
    # no twin on a continuous-time model
    flow = GaussianMixture.random(6, 8, seed=11).denoiser(schedules.rectified_flow(), "flow")
    only_uniform["uniform"] = S.timesteps(flow.schedule, steps, "uniform")
    choice = S.probe_plan(flow, steps, (8,), dtype=torch.float64)
    assert {k[2] for k in choice.scores} == {"uniform"} and choice.grid_name == "uniform"
