"""Consistency models (issue #20): the parameterisation's exact boundary condition, the math of
distillation and (improved / easy) consistency training, and the ``consistency`` sampler, checked
against the exact Gaussian mixture (float64) whose probability-flow ODE gives the exact
consistency function."""

from __future__ import annotations

import math

import pytest
import torch

import difflab
from difflab import guidance, schedules
from difflab import samplers as S
from difflab.denoiser import BaseDenoiser, Denoiser, Prediction
from difflab.denoiser import consistency as C
from difflab.denoiser.parameterization import Consistency, from_config, get
from difflab.samplers.consistency import boundary_sigma
from difflab.toy import GaussianMixture

F64 = torch.float64
SMIN = 0.002
RING = GaussianMixture.ring(8, radius=2.0, std=0.2)
SCHEDULES = ["linear", "cosine", "edm", "cosine_continuous", "sigmoid", "scaled_linear"]
#: the test's discretisation: Karras sigmas with N = 18 (Song et al. 2023's CIFAR-10 distillation)
SIGMAS = C.karras_sigmas(18, SMIN, 80.0)


# --- an exact consistency function: the mixture's PF-ODE solved on one fixed lattice ---------
class Lattice:
    """Times of a fine log-sigma~ lattice through the Karras points of :data:`SIGMAS` (``m``
    sub-steps per interval, continued above sigma_max up to the prior). Every ODE below runs
    through lattice points with the singlestep third-order DPM-Solver, so that the ODE from
    t_{n+1} to the end equals the ODE to t_n followed by the ODE from t_n (exact consistency
    of the numerical flow, up to rounding)."""

    def __init__(self, schedule, m: int = 12):
        s = SIGMAS.tolist()
        fine = [a * (b / a) ** (j / m) for a, b in zip(s[:-1], s[1:]) for j in range(m)] + [s[-1]]
        while fine[-1] * 1.2 < schedule.sigma_max_ratio():
            fine.append(fine[-1] * 1.2)
        self.schedule, self.m = schedule, m
        self.ts = schedule.t_from_sigma_ratio(torch.tensor(fine, dtype=F64))  # increasing
        self.t_min = float(self.ts[0])

    def t(self, n: int) -> float:
        """The time of Karras point n (0-based: sigma_{n+1} of the paper)."""
        return float(self.ts[n * self.m])

    def ode(self, den, x, t_from: float, t_to: float, cond=None):
        inner = [float(t) for t in self.ts.flip(0) if t_to <= float(t) < t_from]
        assert inner and inner[-1] == t_to, "t_to must be a lattice time"
        grid = torch.tensor([t_from] + inner, dtype=F64)
        return S.get("dpm_solver_3").fn(den, x, grid, cond=cond)


class ExactConsistency(BaseDenoiser):
    """f(x, t) = x~(sigma_min) on the exact PF-ODE trajectory through (x, t): a consistency
    model whose ``predict(x, t).x0`` is the ODE's end point (scalar t)."""

    def __init__(self, den, lattice: Lattice):
        super().__init__()
        self.den, self.lattice, self.schedule = den, lattice, den.schedule
        self.parameterization = Consistency(sigma_min=SMIN)
        self.calls = 0

    def predict(self, x, t, cond=None):
        self.calls += 1
        tb, alpha, sigma = self.coefficients(x, t)
        t = float(tb[0])
        t_min = self.lattice.t_min
        if t <= t_min:
            return Prediction(x, x / alpha, None, alpha, sigma)
        end = self.lattice.ode(self.den, x, t, t_min, cond)
        return Prediction(x, end / self.schedule.alpha(t_min), None, alpha, sigma)


def exact_model(name: str) -> tuple[ExactConsistency, Denoiser, Lattice]:
    schedule = getattr(schedules, name)()
    den = RING.denoiser(schedule, "x0")
    lattice = Lattice(schedule)
    return ExactConsistency(den, lattice), den, lattice


class Affine:
    """net(x_in, time_in) = a x_in + b time_in (counts its calls)."""

    def __init__(self, a: float = 0.3, b: float = 0.1):
        self.a, self.b, self.calls = a, b, 0

    def __call__(self, x, time_in, **kw):
        self.calls += 1
        return self.a * x + self.b * time_in.view((-1,) + (1,) * (x.ndim - 1))


# --- the parameterisation -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", SCHEDULES)
def test_boundary_condition_is_exact_for_every_schedule(name, dtype):
    """f(x, t(sigma_min)) = x / alpha bit for bit (c_skip = 1, c_out = 0 in floating point),
    whatever the network says; also at t = 0, below the boundary."""
    schedule = getattr(schedules, name)()
    den = Denoiser(lambda x, t: 1e3 * (x + 7) * t.view(-1, 1), schedule, Consistency())
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for t in (float(schedule.t_from_sigma_ratio(SMIN)), 0.0):
        _, alpha, sigma = den.coefficients(x, t)
        c_skip, c_out, _ = den.parameterization.coefficients(sigma / alpha)
        assert bool((c_skip == 1).all()) and bool((c_out == 0).all()), (name, t)
        assert torch.equal(den.predict(x, t).x0, x / alpha), (name, t)
    # just above the boundary the network counts
    t_above = float(schedule.t_from_sigma_ratio(1.01 * SMIN))
    _, alpha, _ = den.coefficients(x, t_above)
    assert not torch.allclose(den.predict(x, t_above).x0, x / alpha)


def test_coefficients_are_song_et_al_appendix_c():
    p = Consistency(sigma_data=0.5, sigma_min=SMIN)
    s = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=F64)
    c_skip, c_out, c_in = p.coefficients(s)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / ((s - SMIN) ** 2 + sd**2), rtol=1e-15, atol=0)
    torch.testing.assert_close(c_out, sd * (s - SMIN) / (s**2 + sd**2).sqrt(), rtol=1e-15, atol=0)
    torch.testing.assert_close(c_in, 1 / (s**2 + sd**2).sqrt(), rtol=1e-15, atol=0)
    # the time input is EDM's c_noise = log(sigma~) / 4 (clamped to sigma_min below it)
    x = torch.ones(4, 2, dtype=F64)
    _, c_noise = p.net_inputs(x, torch.ones(4, 1, dtype=F64), s.view(-1, 1), None)
    torch.testing.assert_close(c_noise, schedules.edm_c_noise(s))
    _, c_noise0 = p.net_inputs(x, torch.ones(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64), None)
    torch.testing.assert_close(c_noise0, torch.full((4,), math.log(SMIN) / 4, dtype=F64))


def test_vp_and_ve_schedules_give_one_function_of_sigma_tilde():
    """On a VP schedule f(x, t) is the VE model's f(x / alpha, sigma~): x~ = x / alpha,
    sigma~ = sigma / alpha."""
    vp, ve = schedules.cosine_continuous(), schedules.edm()
    net = Affine()
    f_vp, f_ve = Denoiser(net, vp, "consistency"), Denoiser(net, ve, "consistency")
    x_tilde = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for t in (0.2, 0.6, 0.95):
        alpha, sigma = (float(c) for c in vp.alpha_sigma(t))
        t_ve = float(ve.t_from_sigma_ratio(sigma / alpha))
        torch.testing.assert_close(f_vp(alpha * x_tilde, t), f_ve(x_tilde, t_ve), rtol=1e-12,
                                   atol=1e-12)


def test_config_round_trip_and_errors():
    p = Consistency(sigma_data=0.7, sigma_min=0.01)
    assert p.config() == {"type": "consistency", "sigma_data": 0.7, "sigma_min": 0.01}
    q = from_config(p.config())
    assert isinstance(q, Consistency) and q.config() == p.config()
    assert get("consistency").config() == {"type": "consistency", "sigma_data": 0.5,
                                           "sigma_min": 0.002}
    assert p.target == "x0" and p.name == "consistency"
    den = Denoiser(Affine(), schedules.linear(), prediction=p)
    assert den.prediction == "consistency" and den.sigma_data == 0.7
    with pytest.raises(ValueError, match="sigma_min"):
        Consistency(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_data"):
        Consistency(sigma_data=-1.0)


# --- the schedules of improved consistency training and ECT --------------------------------
def test_discretization_doubles_from_10_to_1280():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    K = 400_000  # K' = 50 000: 8 stages
    want = {0: 11, 49_999: 11, 50_000: 21, 100_000: 41, 150_000: 81, 200_000: 161,
            250_000: 321, 300_000: 641, 349_999: 641, 350_000: 1281, 399_999: 1281,
            400_000: 1281}
    assert {k: C.discretization_steps(k, K) for k in want} == want
    for k in (0, 7, 1234, 98_765, 333_333):
        K_prime = math.floor(K / (math.log2(math.floor(1280 / 10)) + 1))
        assert C.discretization_steps(k, K) == min(10 * 2 ** math.floor(k / K_prime), 1280) + 1
    # K shorter than 8 stages: K' = 1, a doubling every iteration
    assert [C.discretization_steps(k, 5) for k in (0, 3, 7, 8)] == [11, 81, 1281, 1281]
    assert C.discretization_steps(2, 100, s0=2, s1=150) == min(2 * 2 ** (2 // 12), 150) + 1
    with pytest.raises(ValueError):
        C.discretization_steps(-1, 10)


def test_karras_sigmas():
    sigmas = C.karras_sigmas(11, SMIN, 80.0, 7.0)
    assert sigmas.dtype == F64 and sigmas.shape == (11,)
    assert float(sigmas[0]) == SMIN and float(sigmas[-1]) == 80.0
    assert bool((sigmas[1:] > sigmas[:-1]).all())
    i = 4  # 0-based: the paper's i = 5
    want = (SMIN ** (1 / 7) + i / 10 * (80 ** (1 / 7) - SMIN ** (1 / 7))) ** 7
    assert math.isclose(float(sigmas[i]), want, rel_tol=1e-14)
    with pytest.raises(ValueError, match="N >= 2"):
        C.karras_sigmas(1)


def test_lognormal_index_probabilities_and_sampling():
    sigmas = C.karras_sigmas(C.discretization_steps(50, 400), SMIN, 80.0)  # N = 21
    p = C.lognormal_index_probs(sigmas)
    assert p.shape == (20,) and bool((p > 0).all())
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-14)

    def erf_term(s):
        return math.erf((math.log(s) - (-1.1)) / (math.sqrt(2) * 2.0))

    raw = [erf_term(float(sigmas[i + 1])) - erf_term(float(sigmas[i])) for i in range(20)]
    torch.testing.assert_close(p, torch.tensor(raw, dtype=F64) / sum(raw), rtol=1e-12, atol=0)
    # the pair around exp(P_mean) = 0.33 is among the most likely; the extremes are rare
    mode = int(p.argmax())
    assert float(sigmas[mode]) < math.exp(-1.1) * 3 and float(sigmas[mode + 1]) > math.exp(-1.1) / 3
    idx = C.sample_indices(p, 200_000, torch.Generator().manual_seed(0))
    again = C.sample_indices(p, 200_000, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again) and int(idx.min()) >= 0 and int(idx.max()) <= 19
    freq = torch.bincount(idx, minlength=20).to(F64) / idx.numel()
    assert float((freq - p).abs().max()) < 0.005


def test_ict_weights_and_lognormal_sigmas():
    sigmas = C.karras_sigmas(6, SMIN, 80.0)
    w = C.ict_weights(sigmas)
    torch.testing.assert_close(w, 1 / (sigmas[1:] - sigmas[:-1]))
    assert bool((w[1:] < w[:-1]).all())  # wider intervals at high noise: smaller weights
    s = C.sample_lognormal_sigmas(100_000, torch.Generator().manual_seed(0))
    assert abs(float(s.log().mean()) + 1.1) < 0.03 and abs(float(s.log().std()) - 2.0) < 0.03


def test_pseudo_huber_and_distances():
    assert math.isclose(C.pseudo_huber_c(3 * 32 * 32), 0.00054 * math.sqrt(3072))
    assert math.isclose(C.pseudo_huber_c(3072), 0.02993, abs_tol=1e-5)  # CIFAR-10: c ~ 0.03
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g, dtype=F64), torch.randn(4, 3, 8, 8, generator=g,
                                                                          dtype=F64)
    sq = (x - y).pow(2).flatten(1).sum(1)
    c = 0.00054 * math.sqrt(192)
    torch.testing.assert_close(C.pseudo_huber(x, y), (sq + c * c).sqrt() - c)
    torch.testing.assert_close(C.pseudo_huber(x, y, c=0.0), sq.sqrt())
    torch.testing.assert_close(C.distance(x, y, "l2"), sq)
    torch.testing.assert_close(C.distance(x, y, "l1"), (x - y).abs().flatten(1).sum(1))
    torch.testing.assert_close(C.distance(x, y, "pseudo_huber", c=0.5),
                               (sq + 0.25).sqrt() - 0.5)
    # near zero it is the squared distance / (2c) (a smooth L2), far away the L2 norm
    small = C.pseudo_huber(x, x + 1e-6, c=1.0)  # no cancellation: 1e-10 to full precision
    sq_small = (x + 1e-6 - x).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(small, sq_small / 2, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="c must be >= 0"):
        C.pseudo_huber(x, y, c=-1.0)
    with pytest.raises(ValueError, match="unknown distance"):
        C.distance(x, y, "lpips")
    with pytest.raises(ValueError, match="one shape"):
        C.distance(x, y[:, :1])


def test_ect_mapping_function_shrinks_dt_by_q_per_stage():
    """r = max(0, sigma (1 - (1 + k sigmoid(-b sigma)) / q^(stage + 1)))."""
    sigma = torch.tensor([0.01, 0.3, 1.0, 10.0, 80.0], dtype=F64)
    for stage in range(5):
        r = C.ect_sigma_r(sigma, stage)
        n = 1 + 8 * torch.sigmoid(-sigma)
        torch.testing.assert_close(r, (sigma * (1 - n / 2 ** (stage + 1))).clamp(min=0))
        assert bool((r >= 0).all()) and bool((r < sigma).all())
        if stage:  # where r > 0, sigma - r halves every stage (q = 2)
            prev = C.ect_sigma_r(sigma, stage - 1)
            live = prev > 0
            torch.testing.assert_close((sigma - r)[live], (sigma - prev)[live] / 2)
    assert float(C.ect_sigma_r(torch.tensor(1.0, dtype=F64), 0)) == 0.0  # stage 0: the data
    assert math.isclose(float(C.ect_sigma_r(torch.tensor(10.0, dtype=F64), 2, q=4.0)),
                        10 * (1 - (1 + 8 / (1 + math.exp(10))) / 64), rel_tol=1e-14)
    assert C.ect_stage(0, 1000) == 0 and C.ect_stage(2999, 1000) == 2
    torch.testing.assert_close(C.ect_weight(sigma, 0.5 * sigma), 2 / sigma)


# --- the pairs and the loss on the exact mixture -------------------------------------------
def test_training_pair_shares_the_noise():
    schedule = schedules.linear()
    g = torch.Generator().manual_seed(0)
    x0, z = RING.sample(16, g)[0], torch.randn(16, 2, generator=g, dtype=F64)
    t_n, t_next = 0.3, 0.45
    x_next, x_n = C.training_pair(schedule, x0, z, t_n, t_next)
    for x, t in ((x_next, t_next), (x_n, t_n)):
        alpha, sigma = (float(c) for c in schedule.alpha_sigma(t))
        torch.testing.assert_close(x, alpha * x0 + sigma * z)
    # one time per row
    tn = torch.full((16,), t_n, dtype=F64)
    a, b = C.training_pair(schedule, x0, z, tn, torch.full((16,), t_next, dtype=F64))
    torch.testing.assert_close((a, b), (x_next, x_n))


@pytest.mark.parametrize("name", ["edm", "linear"])
def test_exact_consistency_function_has_zero_distillation_loss(name):
    """Song et al. 2023, Alg. 2 on the exact mixture: with the exact teacher step, the exact
    consistency function (the PF-ODE's end point) has zero loss; a slightly perturbed one
    (f (1 + 1e-3 h(sigma~)), the boundary kept) does not."""
    f, den, lattice = exact_model(name)
    schedule = den.schedule

    def exact_step(x, t_from, t_to):
        return lattice.ode(den, x, float(t_from), float(t_to))

    def independent_step(x, t_from, t_to):  # another solver on another grid: 200 dpmpp_3m steps
        s_from, s_to = (float(schedule.sigma(t) / schedule.alpha(t)) for t in (t_from, t_to))
        ts = schedule.t_from_sigma_ratio(torch.logspace(math.log10(s_from), math.log10(s_to), 201,
                                                        dtype=F64))
        ts[0], ts[-1] = t_from, t_to
        return S.get("dpmpp_3m").fn(den, x, ts)

    def perturbed(x, t):
        s = float(schedule.sigma(t) / schedule.alpha(t))
        return f(x, t) * (1 + 1e-3 * (s - SMIN) / (s + 1))

    g = torch.Generator().manual_seed(0)
    x0, z = RING.sample(64, g)[0], torch.randn(64, 2, generator=g, dtype=F64)
    for n in (2, 8, 14):
        t_n, t_next = lattice.t(n), lattice.t(n + 1)
        x_next, x_hat = C.distillation_pair(schedule, exact_step, x0, z, t_n, t_next)
        alpha, sigma = (float(c) for c in schedule.alpha_sigma(t_next))
        torch.testing.assert_close(x_next, alpha * x0 + sigma * z)
        exact = C.consistency_loss(f, f, x_next, t_next, x_hat, t_n).mean()
        off = C.consistency_loss(perturbed, perturbed, x_next, t_next, x_hat, t_n).mean()
        assert float(exact) < 1e-20 and float(off) > 1e-12, (n, float(exact), float(off))
        _, x_ind = C.distillation_pair(schedule, independent_step, x0, z, t_n, t_next)
        ind = C.consistency_loss(f, f, x_next, t_next, x_ind, t_n).mean()
        assert float(ind) < 1e-4 * float(off), (n, float(ind), float(off))
        hub = C.consistency_loss(f, f, x_next, t_next, x_hat, t_n, kind="pseudo_huber",
                                 weight=C.ict_weights(SIGMAS)[n])
        assert float(hub.max()) < 1e-9


def test_consistency_loss_stops_the_target_gradient_and_weights_rows():
    net = torch.nn.Linear(2, 2, dtype=F64)
    den = Denoiser(lambda x, t: net(x), schedules.edm(), Consistency())
    x_next, x_n = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    w = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
    loss = C.consistency_loss(den, den, x_next, 0.5, x_n, 0.4, weight=w)
    plain = C.consistency_loss(den, den, x_next, 0.5, x_n, 0.4)
    torch.testing.assert_close(loss, plain * w)
    assert loss.requires_grad
    loss.sum().backward()  # only through f(x_next): the target is a constant
    target = den(x_n, 0.4).detach()
    net.zero_grad()
    C.distance(den(x_next, 0.5), target).mul(w).sum().backward()
    grad = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    C.consistency_loss(den, den, x_next, 0.5, x_n, 0.4, weight=w).sum().backward()
    for a, p in zip(grad, net.parameters()):
        torch.testing.assert_close(p.grad, a)


# --- the sampler --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["edm", "linear"])
def test_one_step_sampling_reproduces_the_ode_end_point(name):
    f, den, _ = exact_model(name)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    x = difflab.sample(f, noise, "consistency", steps=1)
    assert f.calls == 1
    # an independent solver on its own grid, to t = 0: they agree to the solvers' error (the
    # lattice's is ~5e-5 at 12 sub-steps, 3e-4 at 6: third order) on data of scale 2
    ode = difflab.sample(den, noise, "dpmpp_3m", steps=400)
    assert float((x - ode).abs().max()) < 1.5e-4


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64) -> float:
    d = torch.randn(a.shape[1], n_proj, generator=torch.Generator().manual_seed(0), dtype=F64)
    d = d / d.norm(dim=0)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def test_two_step_sampling_from_the_exact_consistency_function_samples_the_mixture():
    """Alg. 1: f, re-noise to sigma~ with sqrt(sigma~^2 - sigma_min^2), f again; with the exact
    f every intermediate is an exact draw, so the result is distributed as the data."""
    f, _, _ = exact_model("edm")
    n = 2000
    g = torch.Generator().manual_seed(7)
    data_a, data_b = RING.sample(n, g)[0], RING.sample(n, g)[0]
    floor = sliced_w2(data_a, data_b)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = difflab.sample(f, noise, "consistency", 2, generator=torch.Generator().manual_seed(5))
    assert f.calls == 2
    assert sliced_w2(x, data_a) < 2.0 * floor, (sliced_w2(x, data_a), floor)


class ConstantX0(BaseDenoiser):
    """x0_hat = a constant, whatever x: shows what the sampler feeds the next call."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.schedule, self.x0, self.seen = schedule, x0, []
        self.parameterization = Consistency(sigma_min=SMIN)

    def predict(self, x, t, cond=None):
        tb, alpha, sigma = self.coefficients(x, t)
        self.seen.append((float(tb[0]), x.clone()))
        return Prediction(x, self.x0.expand_as(x).clone(), None, alpha, sigma)


@pytest.mark.parametrize("name", ["linear", "edm"])
def test_renoising_is_alpha_times_x0_plus_sqrt_sigma2_minus_sigma_min2(name):
    schedule = getattr(schedules, name)()
    c = torch.tensor([[0.5, -1.0]], dtype=F64)
    den = ConstantX0(schedule, c)
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ts = torch.tensor([1.0, 0.6, 0.45, 0.0], dtype=F64)
    out = S.get("consistency").fn(den, noise, ts, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    for (t, x), t_want in zip(den.seen[1:], ts[1:3].tolist()):
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(t_want))
        z = torch.randn(4, 2, generator=g, dtype=F64)
        want = alpha * (c + math.sqrt((sigma / alpha) ** 2 - SMIN**2) * z)
        assert t == t_want
        torch.testing.assert_close(x, want, rtol=1e-14, atol=1e-14)
    assert torch.equal(out, c.expand(4, 2))  # the step to t = 0 adds no noise


def test_multistep_is_reproducible_with_a_generator_and_counts_its_calls():
    net = Affine()
    den = Denoiser(net, schedules.edm(), Consistency())
    noise = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for steps in (1, 2, 3, 4):
        net.calls = 0
        a = difflab.sample(den, noise, "consistency", steps,
                           generator=torch.Generator().manual_seed(1))
        assert net.calls == steps == S.get("consistency").nfe(steps)
        b = difflab.sample(den, noise, "consistency", steps,
                           generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        if steps > 1:
            c = difflab.sample(den, noise, "consistency", steps,
                               generator=torch.Generator().manual_seed(2))
            assert not torch.allclose(a, c)
    # one generator per image: image k alone is image k of the batch
    gens = [torch.Generator().manual_seed(10 + k) for k in range(4)]
    batch = difflab.sample(den, noise, "consistency", 3, generator=gens)
    alone = difflab.sample(den, noise[2:3], "consistency", 3,
                           generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(batch[2:3], alone, rtol=0, atol=0)


def test_more_steps_than_the_grid_allows_is_a_clear_error():
    """On the EDM schedule the uniform grid is Karras' rho = 7 grid to sigma = 0: 4 steps stay
    above sigma_min = 0.002, 5 put a point at sigma~ = 80 (1/5)^7 = 0.001 (f is the identity)."""
    den = Denoiser(Affine(), schedules.edm(), Consistency())
    noise = torch.randn(2, 2)
    difflab.sample(den, noise, "consistency", 4)
    with pytest.raises(ValueError, match=r"5 steps .* sigma_min = 0.002.* fewer steps"):
        difflab.sample(den, noise, "consistency", 5)
    t_min = float(schedules.edm().t_from_sigma_ratio(SMIN))
    with pytest.raises(ValueError, match="grid point 1"):
        difflab.sample(den, noise, "consistency", grid=[1.0, t_min, 0.0])
    # a grid above sigma_min runs with as many steps as asked
    grid = schedules.edm().t_from_sigma_ratio(torch.logspace(math.log10(80), -2, 8,
                                                             dtype=F64)).tolist()
    difflab.sample(den, noise, "consistency", grid=[1.0] + grid[1:] + [0.0])
    # a diffusion model (sigma_min = 0 for the sampler) may take any grid
    assert boundary_sigma(RING.denoiser(schedules.edm(), "x0")) == 0.0
    difflab.sample(RING.denoiser(schedules.edm(), "x0"), noise.to(F64), "consistency", 8)


def test_classifier_free_guidance_on_a_consistency_model():
    """The sampler only calls predict, so a guided consistency model samples like any other:
    one step is the guided f at the prior time, and the guided samples land in their class."""
    f, _, _ = exact_model("edm")
    guided = guidance.classifier_free(f, 1.0)
    assert boundary_sigma(guided) == SMIN
    y = torch.arange(96) % 8
    noise = torch.randn(96, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    x = difflab.sample(guided, noise, "consistency", 1, cond=y)
    want = guided.predict(noise * schedules.edm().prior_std(1.0), 1.0, y).x0
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    hit = float((torch.cdist(x, RING.means).argmin(1) == y).to(F64).mean())
    assert hit > 0.97, hit


def test_the_front_door_samples_a_consistency_model_with_the_consistency_sampler():
    """``difflab.sample`` with no sampler named runs the parameterisation's own sampler."""
    from difflab.denoiser.parameterization import Consistency

    assert difflab.samplers.choose(None, None, Consistency()) == "consistency"
    assert difflab.samplers.choose("ddim", None, Consistency()) == "ddim"
    assert difflab.samplers.choose(None, None, None) == difflab.samplers.DEFAULT
