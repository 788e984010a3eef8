"""Guidance transforms against an exact class-conditional Gaussian mixture (classes = components,
label K = the null label): CFG, classifier guidance with the exact classifier, rescale."""

from __future__ import annotations

import pytest
import torch

from difflab import guidance, schedules
from difflab import samplers as S
from difflab.toy import GaussianMixture

F64 = torch.float64
K = 4
MIX = GaussianMixture.ring(K, radius=2.0, std=0.3)
NULL = K
SCHEDULE = schedules.linear()



def batch(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=F64) * 2, torch.randint(0, K, (n,), generator=g)


def times(schedule=SCHEDULE):
    return [float(schedule.t_from_sigma_ratio(s)) for s in (0.1, 1.0, 10.0)]


def exact_log_prob(schedule):
    """log p(y | x_t) of the mixture: the exact noise-aware classifier."""

    def log_prob(x, t, y):
        alpha, sigma = schedule.alpha_sigma(t.to(F64))
        return MIX.log_posterior(x, alpha, sigma).gather(1, y.view(-1, 1)).squeeze(1)

    return log_prob


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_weight_zero_is_the_conditional_model(prediction):
    den = MIX.denoiser(SCHEDULE, prediction)
    x, y = batch()
    for t in times():
        want = den.predict(x, t, y)
        for rescale in (0.0, 0.7):  # rescale of v(c) by std(v(c)) / std(v(c)) is the identity
            got = guidance.classifier_free(den, 0.0, uncond=NULL, rescale=rescale).predict(x, t, y)
            torch.testing.assert_close(got.x0, want.x0)
            torch.testing.assert_close(got.eps, want.eps)


def test_cfg_combination_and_the_diffusers_convention():
    den = MIX.denoiser(SCHEDULE, "eps")
    x, y = batch()
    w = 1.5
    for t in times():
        c, u = den.predict(x, t, y), den.predict(x, t, torch.full_like(y, NULL))
        got = guidance.classifier_free(den, w, uncond=NULL).predict(x, t, y)
        torch.testing.assert_close(got.eps, (1 + w) * c.eps - w * u.eps)
        torch.testing.assert_close(got.x0, (1 + w) * c.x0 - w * u.x0)
        scale = 1 + w  # diffusers: eps_u + scale (eps_c - eps_u)
        torch.testing.assert_close(got.eps, u.eps + scale * (c.eps - u.eps))
        torch.testing.assert_close(got.alpha * got.x0 + got.sigma * got.eps, x)  # consistent
    with pytest.raises(ValueError, match="cond"):
        guidance.classifier_free(den, w, uncond=NULL).predict(x, 0.5)


def test_classifier_guidance_with_the_exact_classifier_is_the_conditional_model():
    """score(x) + grad log p(y|x_t) = score(x | y): with s = 1 and the sigma_t factor
    (eps~ = eps - sigma_t grad log p) the unconditional model becomes the conditional one."""
    for schedule in (SCHEDULE, schedules.edm()):
        den = MIX.denoiser(schedule, "x0")
        guided = guidance.classifier_guidance(den, exact_log_prob(schedule), scale=1.0)
        x, y = batch(seed=1)
        for t in times(schedule):
            got, want = guided.predict(x, t, y), den.predict(x, t, y)
            torch.testing.assert_close(got.x0, want.x0, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(got.score, want.score, rtol=1e-9, atol=1e-9)
            # s = 2 is a different (sharper) model: the check above can fail
            sharper = guidance.classifier_guidance(den, exact_log_prob(schedule), 2.0)
            assert not torch.allclose(sharper.predict(x, t, y).x0, want.x0, atol=1e-3)


def nearest_component(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, MIX.means).argmin(1)


@pytest.mark.parametrize("name", S.names())
def test_guided_sampling_lands_in_the_right_component(name):
    den = guidance.classifier_free(MIX.denoiser(SCHEDULE, "eps"), 1.0, uncond=NULL)
    y = torch.arange(200) % K
    x1 = torch.randn(200, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    x = S.sample(den, x1, name, 20, cond=y, generator=torch.Generator().manual_seed(4))
    assert bool(torch.isfinite(x).all())
    hit = float((nearest_component(x) == y).to(F64).mean())
    assert hit > 0.98, (name, hit)


def test_classifier_guided_sampling_inside_no_grad_samplers():
    den = guidance.classifier_guidance(MIX.denoiser(SCHEDULE, "eps"), exact_log_prob(SCHEDULE))
    y = torch.arange(100) % K
    x1 = torch.randn(100, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    for name in ("ddim", "dpmpp_2m"):
        x = S.sample(den, x1, name, 20, cond=y)
        assert float((nearest_component(x) == y).to(F64).mean()) > 0.98


def test_guidance_rescale():
    """Lin et al. 2024, Alg. 2: phi = 1 gives std(v) = std(v_cond) per sample; phi blends."""
    den = MIX.denoiser(SCHEDULE, "v")
    x, y = batch(16, seed=2)
    w = 3.0
    for t in times():
        cond = den.predict(x, t, y).v
        cfg = guidance.classifier_free(den, w, uncond=NULL).predict(x, t, y).v
        full = guidance.classifier_free(den, w, uncond=NULL, rescale=1.0).predict(x, t, y)
        torch.testing.assert_close(full.v.std(1), cond.std(1))
        ratio = cond.std(1, keepdim=True) / cfg.std(1, keepdim=True)
        torch.testing.assert_close(full.v, cfg * ratio)
        half = guidance.classifier_free(den, w, uncond=NULL, rescale=0.5).predict(x, t, y)
        torch.testing.assert_close(half.v, 0.5 * full.v + 0.5 * cfg)
        torch.testing.assert_close(half.alpha * half.x0 + half.sigma * half.eps, x)
