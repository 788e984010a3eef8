"""The learned (VDM) schedule: exact endpoints and strict monotonicity for any weights, its
inverse, config and state_dict round trips, gradients to every parameter, and every
deterministic sampler on it (against the probability-flow ODE solved adaptively)."""

from __future__ import annotations

import json

import pytest
import torch

import difflab
from difflab import samplers as S
from difflab import schedules
from difflab.likelihood import probability_flow
from difflab.schedules import LearnedSchedule, NoiseSchedule
from difflab.toy import GaussianMixture

F64 = torch.float64
RING = GaussianMixture.ring(8, radius=2.0, std=0.2)


def randomised(seed: int, scale: float = 3.0, hidden: int = 64, **kw) -> LearnedSchedule:
    """A learned schedule whose network weights are redrawn at ``scale`` (far from VDM's
    near-linear start), so that gamma is strongly non-linear."""
    s = schedules.learned(hidden=hidden, seed=seed, **kw)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in (s.w2, s.b2, s.w3):
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return s


@pytest.mark.parametrize("seed", range(5))
def test_strictly_monotone_with_exact_endpoints(seed):
    gamma_0, gamma_1 = -13.3 + seed, 5.0 - 0.5 * seed
    s = randomised(seed, scale=[0.1, 1.0, 3.0, 10.0, 30.0][seed], gamma_0=gamma_0,
                   gamma_1=gamma_1)
    with torch.no_grad():
        assert float(s.gamma(0.0)) == float(s.gamma_0) == gamma_0
        assert float(s.gamma(1.0)) == float(s.gamma_1)
        assert abs(float(s.gamma_1) - gamma_1) < 1e-13  # gamma_1 = gamma_0 + exp(log span)
        # exact also inside a batch, at any position
        t = torch.rand(1001, dtype=F64, generator=torch.Generator().manual_seed(seed))
        t[17], t[500] = 0.0, 1.0
        gamma = s.gamma(t)
        assert float(gamma[17]) == float(s.gamma_0) and float(gamma[500]) == float(s.gamma_1)
        s.check_monotone(n=20001)  # log_snr strictly decreasing on a fine grid
        grid = torch.linspace(0, 1, 20001, dtype=F64)
        assert bool((s.d_gamma_dt(grid) > 0).all())
        # the closed-form derivative against autograd through log_snr (the base's default)
        auto = NoiseSchedule.d_log_snr_dt(s, grid[::100])
        assert torch.allclose(s.d_log_snr_dt(grid[::100]), auto, rtol=1e-12, atol=1e-12)


def test_variance_preserving_in_gamma():
    s = randomised(0)
    with torch.no_grad():
        t = torch.linspace(0, 1, 101, dtype=F64)
        alpha, sigma = s.alpha_sigma(t)
        gamma = s.gamma(t)
        assert torch.allclose(alpha**2, torch.sigmoid(-gamma), rtol=1e-13, atol=0)
        assert torch.allclose(sigma**2, torch.sigmoid(gamma), rtol=1e-13, atol=0)
        assert torch.allclose(s.log_snr(t), -gamma, rtol=0, atol=0)
        assert s.prior_std() == pytest.approx(1.0, abs=1e-12)
        # t = 0 is not clean: sigma~(0) = exp(gamma_0 / 2); grids stop at 2 sigma~(0) first
        sigma_0 = float(torch.exp(0.5 * s.gamma_0))
        assert float(sigma[0] / alpha[0]) == pytest.approx(sigma_0, rel=1e-12)
        assert s.sigma_min == pytest.approx(2 * sigma_0, rel=1e-12)
        assert s.sigma_max_ratio() == pytest.approx(float(torch.exp(0.5 * s.gamma_1)))
        assert torch.allclose(s.t_from_net_time(s.net_time(t)), t, rtol=1e-15, atol=0)
        assert float(s.net_time(0.5)) == 500.0
    assert s.num_steps is None


@pytest.mark.parametrize("seed", range(3))
def test_inverse_round_trip(seed):
    s = randomised(seed, scale=5.0)
    with torch.no_grad():
        t = torch.cat([torch.rand(2000, dtype=F64, generator=torch.Generator().manual_seed(1)),
                       torch.tensor([0.0, 1.0, 1e-12, 1 - 1e-12], dtype=F64)])
        lam = s.log_snr(t)
        assert float((s.t_from_log_snr(lam) - t).abs().max()) < 1e-10
        lam_grid = torch.linspace(float(lam.min()), float(lam.max()), 2001, dtype=F64)
        assert float((s.log_snr(s.t_from_log_snr(lam_grid)) - lam_grid).abs().max()) < 1e-10
        # outside the range: the nearest end; and through sigma~ (what grids use)
        ends = s.t_from_log_snr(torch.tensor([1e3, -1e3, float("inf"), -float("inf")]))
        assert ends.tolist() == [0.0, 1.0, 0.0, 1.0]
        sigma_tilde = torch.exp(-0.5 * lam[:50])
        assert float((s.t_from_sigma_ratio(sigma_tilde) - t[:50]).abs().max()) < 1e-10


def test_config_and_state_dict_round_trip():
    s = schedules.learned(gamma_0=-10.0, gamma_1=6.0, hidden=32, seed=7, time_scale=1.0)
    cfg = json.loads(json.dumps(s.config()))  # JSON-safe
    assert cfg["type"] == "learned" and schedules.SCHEDULE_TYPES["learned"] is LearnedSchedule
    fresh = schedules.from_config(cfg)
    assert isinstance(fresh, LearnedSchedule) and fresh.config() == s.config()
    t = torch.linspace(0, 1, 33, dtype=F64)
    with torch.no_grad():
        assert torch.equal(fresh.log_snr(t), s.log_snr(t))  # the same seeded start
        for p in s.parameters():  # "train" it
            p.add_(0.3 * torch.randn(p.shape, dtype=F64, generator=torch.Generator()
                                     .manual_seed(p.numel())))
    sd = s.state_dict()
    assert set(sd) == {"gamma_0", "log_gamma_span", "w2", "b2", "w3"}
    rebuilt = schedules.from_config(s.config())
    rebuilt.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(rebuilt.log_snr(t), s.log_snr(t))
        assert not torch.equal(fresh.log_snr(t), s.log_snr(t))
    # inside a denoiser the schedule's parameters are saved with the model
    den = RING.denoiser(s, "x0")
    assert {k for k in den.state_dict() if k.startswith("schedule.")} == {
        f"schedule.{k}" for k in sd}
    with pytest.raises(ValueError, match="gamma_0 < gamma_1"):
        schedules.learned(gamma_0=1.0, gamma_1=1.0)
    with pytest.raises(ValueError, match="hidden"):
        schedules.learned(hidden=0)


def test_time_input_gamma_tells_the_network_the_noise_level():
    """time_input="gamma" (VDM's ScoreUNet input): net_time = time_scale (gamma(t) - gamma_0') /
    (gamma_1' - gamma_0') with the initial endpoints fixed, so after the schedule changes a
    given network input still means the same gamma; t_from_net_time inverts it; it carries
    no gradient into the schedule; configs without the key read as time_input="t"."""
    s = schedules.learned(gamma_0=-10.0, gamma_1=6.0, hidden=32, init_std=1.0, seed=2,
                          time_input="gamma")
    t = torch.linspace(0, 1, 33, dtype=F64)
    with torch.no_grad():
        assert torch.allclose(s.net_time(t), 1000 * (s.gamma(t) + 10) / 16, atol=1e-9)
        assert float(s.net_time(0.0)) == pytest.approx(0.0, abs=1e-9)
        assert float(s.net_time(1.0)) == pytest.approx(1000.0)
        assert torch.allclose(s.t_from_net_time(s.net_time(t)), t, atol=1e-9)
        before = s.net_time(t)
        for p in s.parameters():  # "train" it: endpoints and interior move
            p.add_(0.3 * torch.randn(p.shape, dtype=F64, generator=torch.Generator()
                                     .manual_seed(p.numel())))
        after = s.net_time(t)
        assert (after - before).abs().max() > 10  # the same t now means another level...
        assert torch.allclose(after, 1000 * (s.gamma(t) + 10) / 16, atol=1e-9)  # ...and says so
    tt = t.clone().requires_grad_(True)
    assert not s.net_time(tt).requires_grad
    cfg = json.loads(json.dumps(s.config()))
    assert cfg["time_input"] == "gamma" and schedules.from_config(cfg).time_input == "gamma"
    old = {k: v for k, v in cfg.items() if k != "time_input"}
    assert schedules.from_config(old).time_input == "t"
    assert "time_input" not in schedules.learned().config()
    with pytest.raises(ValueError, match="time_input"):
        schedules.learned(time_input="sigma")


def test_gradients_reach_every_parameter_and_training_keeps_the_invariants():
    s = randomised(1, scale=1.0)
    t = torch.rand(64, dtype=F64, generator=torch.Generator().manual_seed(0))
    alpha, sigma = s.alpha_sigma(t)
    (alpha.sum() + sigma.pow(2).mean()).backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().max()) > 0, name
    s.zero_grad()
    # VDM's continuous loss weights by gamma'(t): its closed form carries gradients too
    s.d_gamma_dt(t).sum().backward()
    assert all(float(p.grad.abs().max()) > 0 for n, p in s.named_parameters() if n != "gamma_0")
    # gamma_1 (= gamma_0 + exp(log_gamma_span)) is reached through both parameters
    s.zero_grad()
    s.alpha_sigma(1.0)[0].backward()
    assert float(s.log_gamma_span.grad) != 0 and float(s.gamma_0.grad) != 0
    # an optimizer trains it; endpoints stay exact and gamma strictly increasing
    opt = torch.optim.Adam(s.parameters(), lr=0.05)
    tt = torch.linspace(0, 1, 64, dtype=F64)
    target = torch.sigmoid(8 - 16 * tt)  # alpha^2 of the linear gamma from -8 to 8
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (s.alpha(tt) ** 2 - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    with torch.no_grad():
        s.check_monotone()
        assert float(s.gamma(0.0)) == float(s.gamma_0)
        assert float(s.gamma(1.0)) == float(s.gamma_1)


# --- every deterministic sampler on the learned schedule ------------------------------------
DETERMINISTIC = [n for n in S.names() if not S.get(n).stochastic and n != "bespoke"]


@pytest.fixture(scope="module")
def ode_reference():
    """x(t = 0) from 32 noises by the adaptive Dormand-Prince solver at rtol = atol = 1e-8
    (checked against 1e-6: the samplers' errors below are > 1e-5)."""
    s = randomised(0, scale=2.0)
    den = RING.denoiser(s, "x0")
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = probability_flow(den, noise, 1.0, 0.0, rtol=1e-8, atol=1e-8)
    loose = probability_flow(den, noise, 1.0, 0.0, rtol=1e-6, atol=1e-6)
    assert float((ref - loose).abs().max()) < 1e-5
    return den, noise, ref


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_sampler_converges_to_the_ode_solution(name, ode_reference):
    """Measured RMSE at 10 / 50 steps: first order ~0.12 / 0.022; 2nd ~0.04-0.09 / 1e-3-3e-3;
    3rd order 0.009-0.065 / 7e-5-1e-3."""
    den, noise, ref = ode_reference
    with torch.no_grad():
        err = {n: float((difflab.sample(den, noise, name, steps=n) - ref).pow(2).mean().sqrt())
               for n in (10, 50)}
    assert err[50] < 0.4 * err[10] and err[50] < 0.03, err
