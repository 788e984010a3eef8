"""Denoiser conversions and training objectives against closed forms (Gaussian data)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import difflab
from difflab import objectives, schedules
from difflab.denoiser import PREDICTIONS, Denoiser, eps_to_x0, v_to_x0_eps, x0_eps_to_v, x0_to_eps
from difflab.toy import GaussianMixture

F64 = torch.float64
MU, S = 0.7, 0.4  # Gaussian data N(MU, S^2) in every coordinate
GAUSS = GaussianMixture(torch.full((1, 3), MU, dtype=F64), S)
SCHEDULES = {"linear": schedules.linear(), "cosine_continuous": schedules.cosine_continuous(),
             "edm": schedules.edm()}



def test_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 4, generator=g, dtype=F64)
    alpha = torch.rand(5, 1, generator=g, dtype=F64) + 0.05
    sigma = torch.rand(5, 1, generator=g, dtype=F64) * 3 + 0.05  # VE-like too: no a^2+s^2=1
    x = alpha * x0 + sigma * eps
    torch.testing.assert_close(eps_to_x0(x, eps, alpha, sigma), x0)
    torch.testing.assert_close(x0_to_eps(x, x0, alpha, sigma), eps)
    v = x0_eps_to_v(x0, eps, alpha, sigma)
    torch.testing.assert_close(v, alpha * eps - sigma * x0)
    x0_v, eps_v = v_to_x0_eps(x, v, alpha, sigma)
    torch.testing.assert_close(x0_v, x0)
    torch.testing.assert_close(eps_v, eps)


def analytic_score(x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """grad log p_t for data N(MU, S^2): -(x - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    return -(x - alpha * MU) / (alpha**2 * S**2 + sigma**2)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_exact_denoiser_gives_the_analytic_score(kind, prediction):
    schedule = SCHEDULES[kind]
    den = GAUSS.denoiser(schedule, prediction)
    g = torch.Generator().manual_seed(1)
    for s_tilde in (0.05, 0.5, 5.0):  # sigma / alpha; tiny sigma would test cancellation only
        t = float(schedule.t_from_sigma_ratio(s_tilde))
        alpha, sigma = (float(c) for c in schedule.alpha_sigma(t))
        x = alpha * MU + math.sqrt(alpha**2 * S**2 + sigma**2) * torch.randn(
            6, 3, generator=g, dtype=F64)
        pred = den.predict(x, t)
        want = analytic_score(x, alpha, sigma)
        torch.testing.assert_close(pred.score, want, rtol=1e-7, atol=1e-7)
        # Tweedie: x0_hat = (x + sigma^2 score) / alpha; and x = alpha x0 + sigma eps
        torch.testing.assert_close(pred.x0, (x + sigma**2 * want) / alpha, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(alpha * pred.x0 + sigma * pred.eps, x, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(pred.v, alpha * pred.eps - sigma * pred.x0)
        torch.testing.assert_close(den(x, t), pred.x0)


def test_edm_preconditioning_reproduces_the_exact_denoiser():
    """With F = (D - c_skip x~) / c_out, D(x~; sigma~) = c_skip x~ + c_out F is exact (EDM
    Table 1), on a VP schedule too (x~ = x / alpha, sigma~ = sigma / alpha)."""
    sd = 0.5
    for schedule in (schedules.edm(), schedules.linear()):
        def net(x_in, c_noise, schedule=schedule):
            s_tilde = torch.exp(4 * c_noise.to(F64)).view(-1, 1)
            x_tilde = x_in * (s_tilde**2 + sd**2).sqrt()
            alpha = 1 / (1 + s_tilde**2).sqrt() if schedule.variance_preserving else 1.0
            sigma = s_tilde * alpha
            d = GAUSS.posterior_mean(x_tilde * alpha, alpha, sigma)
            c_skip = sd**2 / (s_tilde**2 + sd**2)
            c_out = s_tilde * sd / (s_tilde**2 + sd**2).sqrt()
            return (d - c_skip * x_tilde) / c_out

        den = difflab.Denoiser(net, schedule, "edm", sigma_data=sd)
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
        for t in (0.1, 0.5, 0.95):
            alpha, sigma = schedule.alpha_sigma(t)
            torch.testing.assert_close(den(x, t), GAUSS.posterior_mean(x, alpha, sigma))


def test_denoiser_rejects_bad_configurations():
    with pytest.raises(ValueError) as e:
        difflab.Denoiser(torch.nn.Identity(), schedules.linear(), "epsilon")
    assert all(p in str(e.value) for p in PREDICTIONS)
    ztsnr = schedules.linear(zero_terminal_snr=True)
    for prediction in ("eps", "score"):
        with pytest.raises(ValueError, match="zero-terminal-SNR"):
            difflab.Denoiser(torch.nn.Identity(), ztsnr, prediction)
    # v prediction on zero terminal SNR: x0_hat is finite at alpha = 0 (x0_hat = -v)
    den = GAUSS.denoiser(ztsnr, "v")
    x = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(den(x, 1.0), torch.full_like(x, MU))


# --- objectives ---------------------------------------------------------------------------
class Perturbed(difflab.Denoiser):
    """The exact denoiser with x0_hat off by a fixed amount (so losses are not zero)."""

    def predict(self, x, t, cond=None):
        p = super().predict(x, t, cond)
        x0 = p.x0 + 0.3
        return difflab.Prediction(x, x0, x0_to_eps(x, x0, p.alpha, p.sigma), p.alpha, p.sigma)


def perturbed(schedule):
    den = GAUSS.denoiser(schedule, "x0")
    return Perturbed(den.net, schedule, "x0")


@pytest.mark.parametrize("weighting", ["min_snr", "edm"])
def test_weightings_are_one_x0_space_loss_in_every_target(weighting):
    for schedule in (schedules.linear(), schedules.edm()):
        den = perturbed(schedule)
        g = torch.Generator().manual_seed(3)
        x0 = GAUSS.sample(64, g)[0]
        t = torch.rand(64, generator=g, dtype=F64) * 0.9 + 0.05
        eps = torch.randn(64, 3, generator=g, dtype=F64)
        losses = {target: objectives.diffusion_loss(den, x0, target=target, weighting=weighting,
                                                    t=t, eps=eps) for target in ("eps", "x0", "v")}
        torch.testing.assert_close(losses["eps"], losses["x0"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses["v"], losses["x0"], rtol=1e-4, atol=1e-6)
        # and it is the stated x0-space weight times the x0-space error
        alpha, sigma = (c.view(-1, 1) for c in schedule.alpha_sigma(t))
        err_x0 = (den(alpha * x0 + sigma * eps, t) - x0).pow(2).mean(1)
        snr, s2 = (alpha / sigma).flatten() ** 2, (sigma / alpha).flatten() ** 2
        w = snr.clamp(max=5.0) if weighting == "min_snr" else (s2 + 0.25) / (s2 * 0.25)
        torch.testing.assert_close(losses["x0"].to(F64), w * err_x0, rtol=1e-4, atol=1e-6)


def test_unweighted_targets_differ_by_the_snr_factor():
    schedule = schedules.linear()
    den = perturbed(schedule)
    g = torch.Generator().manual_seed(4)
    x0 = GAUSS.sample(32, g)[0]
    t = torch.rand(32, generator=g, dtype=F64) * 0.9 + 0.05
    eps = torch.randn(32, 3, generator=g, dtype=F64)
    loss = {k: objectives.diffusion_loss(den, x0, target=k, t=t, eps=eps)
            for k in ("eps", "x0", "v")}
    alpha, sigma = schedule.alpha_sigma(t)
    snr = (alpha / sigma) ** 2
    torch.testing.assert_close(loss["eps"], (snr * loss["x0"]).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss["v"], ((snr + 1) * loss["x0"]).float(), rtol=1e-4, atol=1e-6)


def test_min_snr_v_weight_is_min_snr_gamma_over_snr_plus_one():
    schedule = schedules.linear()
    t = torch.linspace(0.01, 1.0, 50, dtype=F64)
    alpha, sigma = schedule.alpha_sigma(t)
    snr = (alpha / sigma) ** 2
    w = objectives.loss_weight(alpha, sigma, target="v", weighting="min_snr", gamma=5.0)
    torch.testing.assert_close(w, snr.clamp(max=5.0) / (snr + 1))
    w_eps = objectives.loss_weight(alpha, sigma, target="eps", weighting="min_snr", gamma=5.0)
    torch.testing.assert_close(w_eps, snr.clamp(max=5.0) / snr)
    assert not torch.allclose(w, snr.clamp(max=5.0) / snr)  # the diffusers #5654 form differs


def test_exact_denoiser_loss_is_the_irreducible_loss():
    """E ||x0_hat - x0||^2 per coordinate of the exact denoiser = the posterior variance
    S^2 sigma^2 / (alpha^2 S^2 + sigma^2); a wrong denoiser (x0_hat + 0.3) pays 0.09 more."""
    schedule = schedules.linear()
    den = GAUSS.denoiser(schedule, "eps")
    g = torch.Generator().manual_seed(5)
    n = 20000
    x0 = GAUSS.sample(n, g)[0]
    for t_val in (0.1, 0.4):
        t = torch.full((n,), t_val, dtype=F64)
        alpha, sigma = (float(c) for c in schedule.alpha_sigma(t_val))
        post_var = S**2 * sigma**2 / (alpha**2 * S**2 + sigma**2)
        loss = objectives.diffusion_loss(den, x0, target="x0", t=t, generator=g).to(F64)
        se = float(loss.std()) / math.sqrt(n)
        assert abs(float(loss.mean()) - post_var) < 4 * se, (float(loss.mean()), post_var, se)
        wrong = objectives.diffusion_loss(perturbed(schedule), x0, target="x0", t=t,
                                          generator=g).to(F64)
        assert abs(float(wrong.mean()) - post_var - 0.09) < 4 * float(wrong.std()) / n**0.5
        # eps target: the same loss times snr
        loss_eps = objectives.diffusion_loss(den, x0, target="eps", t=t, generator=g).to(F64)
        assert abs(float(loss_eps.mean()) - post_var * alpha**2 / sigma**2) < 4 * float(
            loss_eps.std()) / math.sqrt(n)


def test_conversions_differentiate_like_the_formulas():
    """The fused (addcmul + in-place division) conversions give the gradients of the written
    formulas, also with respect to alpha and sigma (a learned schedule trains through them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    base = [torch.randn(4, 3, generator=g, dtype=torch.float64),
            0.2 + torch.rand(4, 1, generator=g, dtype=torch.float64),
            0.2 + torch.rand(4, 1, generator=g, dtype=torch.float64)]
    formulas = [  # (fused, written), each a function of (network output, alpha, sigma)
        (lambda e, a, s: eps_to_x0(x, e, a, s), lambda e, a, s: (x - s * e) / a),
        (lambda x0, a, s: x0_to_eps(x, x0, a, s), lambda x0, a, s: (x - a * x0) / s),
        (lambda v, a, s: sum(v_to_x0_eps(x, v, a, s)),
         lambda v, a, s: ((a * x - s * v) + (s * x + a * v)) / (a * a + s * s)),
    ]
    for fused, written in formulas:
        ins1 = [t.clone().requires_grad_() for t in base]
        ins2 = [t.clone().requires_grad_() for t in base]
        out1, out2 = fused(*ins1), written(*ins2)
        torch.testing.assert_close(out1, out2)
        w = torch.randn(out1.shape, generator=g, dtype=torch.float64)
        for d1, d2 in zip(torch.autograd.grad((out1 * w).sum(), ins1),
                          torch.autograd.grad((out2 * w).sum(), ins2)):
            torch.testing.assert_close(d1, d2)


def test_parameterisations_are_objects_with_a_config_round_trip():
    """A parameterisation is chosen once: by name or as an object, with its native target; its
    config rebuilds it; EDM's coefficients are Karras et al.'s Table 1."""
    from difflab.denoiser import parameterization as param

    for name in PREDICTIONS:
        p = param.get(name, sigma_data=0.7)
        q = param.from_config(json.loads(json.dumps(p.config())))
        assert type(q) is type(p) and q.config() == p.config()
        assert p.target in difflab.denoiser.TARGETS
    assert {n: param.get(n).target for n in ("eps", "x0", "v", "score", "edm")} == {
        "eps": "eps", "x0": "x0", "v": "v", "score": "eps", "edm": "x0"}
    assert param.get("edm", sigma_data=0.7).sigma_data == 0.7
    with pytest.raises(ValueError, match="unknown option"):
        param.from_config({"type": "v", "sigma_data": 0.5})
    edm = param.EDM(sigma_data=0.7)
    s = torch.tensor([0.01, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = edm.coefficients(s)
    torch.testing.assert_close(c_skip, 0.49 / (s**2 + 0.49))
    torch.testing.assert_close(c_out, s * 0.7 / (s**2 + 0.49).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + 0.49).sqrt())
    net = lambda x, t: torch.tanh(x) + t.view(-1, 1)  # noqa: E731
    sched = schedules.edm()
    x = torch.randn(4, 3, dtype=torch.float64)
    a = Denoiser(net, sched, prediction=edm).predict(x, 0.3).x0
    b = Denoiser(net, sched, prediction="edm", sigma_data=0.7).predict(x, 0.3).x0
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown prediction type"):
        Denoiser(net, sched, prediction="velocity")
