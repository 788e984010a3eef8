"""The variational bound (VLB) of a diffusion model, as a number and as a training objective.

Notation of VDM (Kingma et al. 2021, "Variational Diffusion Models"): gamma(t) = -log_snr(t),
alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) (variance preserving), z_t = alpha_t x +
sigma_t eps. For data x in R^D (sums over the D dimensions, nats per example):

    -log p(x) <= L_prior + L_recon + L_diffusion

    L_prior     = KL(q(z_1 | x) || N(0, I))
                = 0.5 sum_i (sigma_1^2 + alpha_1^2 x_i^2 - log sigma_1^2 - 1)          (Eq. 11)
    L_recon     = E_{eps_0} [-log p(x | z_{t_0})]                                      (Eq. 11)
    continuous  L_inf = 0.5 E_{t ~ U(t_0, 1), eps} [(1 - t_0) gamma'(t) ||eps - eps_hat(z_t, t)||^2]
                                                                                        (Eq. 17)
    discrete    L_N   = 0.5 N E_{i ~ U{1..N}, eps} [expm1(gamma(t_i) - gamma(t_{i-1}))
                        ||eps - eps_hat(z_{t_i}, t_i)||^2]        (Eq. 13, t_i on a grid of N steps)

The discrete term is the sum of KL(q(z_s | z_t, x) || p(z_s | z_t)) with p(z_s | z_t) = q(z_s |
z_t, x = x0_hat): equal variances beta~. A model with a learned variance (Nichol & Dhariwal 2021,
Eq. 15: log Sigma = v log beta + (1 - v) log beta~, ``Prediction.variance_v``) has the general
Gaussian KL instead,

    KL = 0.5 sum_i (log Sigma - log beta~ + beta~ / Sigma - 1 + c_x0^2 (x - x0_hat)^2 / Sigma),

with beta = sigma_{t|s}^2, beta~ = sigma_{t|s}^2 sigma_s^2 / sigma_t^2 and c_x0 = alpha_s
sigma_{t|s}^2 / sigma_t^2 (:mod:`difflab.process`); with Sigma = beta~ it is VDM's term.

**t_0 and the decoder.** Where sigma(0) > 0 (the learned schedule: gamma(0) = gamma_0) t_0 = 0;
else t_0 is the time of sigma~ = sigma / alpha = :data:`SIGMA_START` (the likelihood's default
start too). Decoders of x given z_0 = z_{t_0} (``decoder=``):

* ``"vdm"``: VDM's factorised decoder over the 256 values of an 8-bit pixel, x_k = 2k/255 - 1:
  p(x_k | z_0) = softmax_k(-(z_0 / alpha_0 - x_k)^2 / (2 sigma~_0^2)) (VDM's
  ``logprob = -0.5 (z/alpha - x_vals)^2 / exp(gamma_0)`` over the 256 bins); the data must be on
  the 8-bit grid. The bound is then on -log P(k) of the discrete data: bits/dim = total /
  (D ln 2), directly comparable with :func:`difflab.likelihood.log_likelihood`'s dequantised
  bits/dim.
* ``"ddpm"``: DDPM's network decoder (Ho et al. 2020, Eq. 13): a Gaussian of mean x0_hat(z_{t_0})
  and variance beta_1 = sigma(t_0)^2 (or the learned interpolation, with beta~ clipped to the next
  step's, as improved-diffusion does), integrated over each pixel's bin (edge bins to +-inf). It
  is the decoder of a DDPM chain's own discrete bound (``steps="chain"``: t_0 = 1/T and the N =
  T - 1 steps (i + 1)/T).
* ``"gaussian"``: continuous data, N(x; z_0 / alpha_0, sigma~_0^2): nats of a density.

**Training the learned schedule** (VDM Sec. 5.2, Appendix I.2). The continuous diffusion loss
depends on the schedule only through its endpoints gamma_0, gamma_1 (Eq. 18: L_inf = 0.5
int_{SNR_1}^{SNR_0} E||x - x_hat_v||^2 dv); the interior changes only the variance of its
Monte-Carlo estimate. So the endpoints are trained on the whole bound and the interior on that
variance: VDM's trick replaces the gradient of L_diffusion with respect to the interior, d L / d
eta, by d E[L^2] / d eta = E[2 L d L / d eta], i.e. the gradient arriving at the interior
quantities is multiplied by 2 L_diffusion of its example, done here by a gradient hook
(``LearnedSchedule.gamma_and_rate(t, interior=)``). Times are antithetic (VDM's low-discrepancy
sampler): t_b = (u_0 + b / B) mod 1, u_0 ~ U(0, 1) once per global batch.

**The ODE's own likelihood** is not bounded by this bound (Lu et al. 2022):
``VLBObjective(second_order=lambda)`` adds their second-order denoising score matching term
(:func:`second_order_dsm`), which trains the Jacobian of eps_hat as well
(``train.second_order``; measured in docs/results/likelihood.md, session 14).

**Learned variances** (Nichol & Dhariwal 2021, Sec. 3.1): :class:`HybridObjective` trains a
``Denoiser(..., learned_variance=True)`` on L_simple + lambda L_vlb (lambda = 0.001), L_vlb's
term at the drawn step in bits per dimension with a stop-gradient on the mean (x0_hat), so the
mean is trained by L_simple alone and the variance by L_vlb alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.denoiser import (
    BaseDenoiser,
    Denoiser,
    Prediction,
    TimePoint,
    interpolated_log_variance,
)
from difflab.denoiser import parameterization as param
from difflab.objectives.core import DiffusionObjective, Objective, Weighting
from difflab.schedules import NoiseSchedule

__all__ = ["variational_bound", "VLBResult", "VLBObjective", "HybridObjective", "vlb_grid",
           "start_time", "gamma_and_rate", "decoder_nll", "second_order_dsm", "DECODERS",
           "SIGMA_START", "BINS"]

F64 = torch.float64
LN2 = math.log(2.0)
BINS = 256
SIGMA_START = 1e-3  # sigma~ at t_0 where sigma(0) = 0 (difflab.likelihood.SIGMA_START)
DECODERS = ("vdm", "ddpm", "gaussian")


# --- the schedule as gamma -----------------------------------------------------------------
def gamma_and_rate(schedule: NoiseSchedule, t: Tensor,
                   interior: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(gamma(t), gamma'(t)) in float64; a learned schedule's are differentiable in its
    parameters (``interior``: its gradient hook, see the module docstring)."""
    t = torch.as_tensor(t, dtype=F64)
    if hasattr(schedule, "gamma_and_rate"):
        return schedule.gamma_and_rate(t, interior)
    return -schedule.log_snr(t).to(F64), -schedule.d_log_snr_dt(t).to(F64)


def _check_schedule(schedule: NoiseSchedule) -> None:
    if not getattr(schedule, "variance_preserving", True):
        raise ValueError(f"the variational bound is written for variance-preserving schedules; "
                         f"schedule {schedule.config().get('type')!r} is not (its prior is not "
                         "N(0, I))")


def start_time(schedule: NoiseSchedule) -> float:
    """t_0: 0 where sigma(0) > 0 (gamma(0) finite), else the time of sigma~ = SIGMA_START."""
    with torch.no_grad():
        gamma_0 = -float(schedule.log_snr(torch.tensor(0.0, dtype=F64)))
        if math.isfinite(gamma_0):
            return 0.0
        return float(schedule.t_from_log_snr(torch.tensor(-2 * math.log(SIGMA_START), dtype=F64)))


def vlb_grid(schedule: NoiseSchedule, steps: int | str | None) -> Tensor | None:
    """The times t_0 < ... < t_N = 1 of the discrete bound (None: the continuous one).

    ``steps`` an int N: N equal steps from :func:`start_time` to 1; ``"chain"``: a DDPM chain's
    own steps, t_i = (i + 1) / T, i = 0..T-1 (N = T - 1; a clear error for a schedule with no
    discrete form)."""
    if steps is None:
        return None
    if steps == "chain":
        T = schedule.num_steps
        if T is None:
            raise ValueError(
                f"steps='chain' asks for the discrete bound of the model's own chain, but "
                f"schedule {schedule.config().get('type')!r} has no discrete form (num_steps "
                "is None); give steps=N to discretise it in N steps, or steps=None for the "
                "continuous bound")
        if T < 2:
            raise ValueError(f"steps='chain' needs a chain of >= 2 steps, got T={T}")
        return torch.arange(1, T + 1, dtype=F64) / T
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be None (continuous), an integer >= 1 or 'chain', "
                         f"got {steps!r}")
    t0 = start_time(schedule)
    return t0 + (1 - t0) * torch.arange(steps + 1, dtype=F64) / steps


def _alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _shape(c: Tensor, x: Tensor) -> Tensor:
    return c.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1))


def _sum(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


# --- the terms -----------------------------------------------------------------------------
def _prior(schedule: NoiseSchedule, x: Tensor) -> Tensor:
    """KL(q(z_1 | x) || N(0, I)) per example (nats)."""
    gamma_1 = gamma_and_rate(schedule, torch.ones((), dtype=F64))[0].to(x.device)
    a2, s2, log_s2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1), F.logsigmoid(gamma_1)
    x = x.to(F64)
    return 0.5 * _sum(s2 + a2 * x * x - log_s2 - 1)


def _bin_index(x: Tensor) -> Tensor:
    k = torch.round((x.detach().to(F64) + 1) * 127.5)
    if bool(((k * 2 / 255 - 1 - x.detach().to(F64)).abs() > 1e-3).any()) or \
            bool(((k < 0) | (k > 255)).any()):
        raise ValueError("the 'vdm' and 'ddpm' decoders need 8-bit images: x = 2k/255 - 1 "
                         "with k in {0..255}; use decoder='gaussian' for continuous data")
    return k.long()


def _vdm_decoder(gamma_0: Tensor, x: Tensor, eps_0: Tensor) -> Tensor:
    """-log p(x | z_0) of VDM's decoder over the 256 values (module docstring), nats."""
    k = _bin_index(x)
    s_tilde = torch.exp(0.5 * gamma_0).float()
    x_hat = x.float() + s_tilde * eps_0.float()  # z_0 / alpha_0
    grid = torch.arange(BINS, device=x.device, dtype=torch.float32) * (2 / 255) - 1
    out = []
    for xb, kb in zip(x_hat.split(16), k.split(16)):  # the logits are B x D x 256
        logits = -0.5 * (xb[..., None] - grid) ** 2 / (s_tilde * s_tilde)
        logp = logits.gather(-1, kb[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
        out.append(-_sum(logp))
    return torch.cat(out).to(F64)


def _log_bin_probability(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log of the mass of N(mean, exp(log_var)) over x's 8-bit bin [x - 1/255, x + 1/255]
    (edge bins to -inf / +inf: Ho et al. 2020, Eq. 13)."""
    x, mean, log_var = x.to(F64), mean.to(F64), log_var.to(F64)
    inv = torch.exp(-0.5 * log_var)
    lo = torch.where(x < -0.999, -math.inf, (x - mean - 1 / 255) * inv)
    hi = torch.where(x > 0.999, math.inf, (x - mean + 1 / 255) * inv)
    flip = lo > 0  # both in the right tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return lb + torch.log1p(-torch.exp(la - lb).clamp(max=1 - 1e-15))


def _transition(gamma_s: Tensor, gamma_t: Tensor) -> dict[str, Tensor]:
    """beta = sigma_{t|s}^2, beta~, c_x0 from gamma(s) < gamma(t) (float64)."""
    a_s2, s_s2 = torch.sigmoid(-gamma_s), torch.sigmoid(gamma_s)
    s_t2 = torch.sigmoid(gamma_t)
    beta = -s_t2 * torch.expm1(gamma_s - gamma_t)  # sigma_t^2 - alpha_{t|s}^2 sigma_s^2
    beta_tilde = beta * s_s2 / s_t2
    return {"beta": beta, "beta_tilde": beta_tilde, "c_x0": a_s2.sqrt() * beta / s_t2}


def _predict(denoiser: BaseDenoiser, z: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor,
             cond: Any) -> Prediction:
    """The denoiser at z_t with the given (differentiable) alpha, sigma; a plain Denoiser reads
    only alpha, sigma and the network time (so a learned schedule's gradient reaches them)."""
    if isinstance(denoiser, Denoiser):
        net_t = denoiser.schedule.net_time(t).to(z.dtype)
        return denoiser.predict_at(z, TimePoint(float("nan"), _shape(alpha, z), _shape(sigma, z),
                                                net_t), cond)
    return denoiser.predict(z, t.to(z.device), cond)


def _gaussian_kl(x: Tensor, x0_hat: Tensor, tr: dict[str, Tensor], log_var: Tensor) -> Tensor:
    """KL(q(z_s | z_t, x) || N(mu(z_t, x0_hat), exp(log_var))) per example (nats)."""
    like = x
    log_bt = torch.log(_shape(tr["beta_tilde"], like).to(F64).clamp(min=1e-300))
    c = _shape(tr["c_x0"], like).to(F64)
    diff2 = (c * (x.to(F64) - x0_hat.to(F64))) ** 2
    log_var = log_var.to(F64)
    return 0.5 * _sum(log_var - log_bt + torch.exp(log_bt - log_var) - 1
                      + diff2 * torch.exp(-log_var))


def _diffusion_term(denoiser: BaseDenoiser, x: Tensor, u: Tensor, eps: Tensor, cond: Any,
                    grid: Tensor | None, t0: float,
                    interior: Callable[[Tensor], Tensor] | None) -> Tensor:
    """The continuous or discrete diffusion loss per example (nats) at times u in [0, 1)."""
    schedule = denoiser.schedule
    B = x.shape[0]
    u = u.to(F64)
    if grid is None:
        t = t0 + (1 - t0) * u
        gamma_t, rate = gamma_and_rate(schedule, t, interior)
        gamma_t, rate = gamma_t.to(x.device), rate.to(x.device)
    else:
        N = grid.numel() - 1
        i = (u * N).floor().long().clamp(0, N - 1)
        t, s = grid[i + 1], grid[i]
        gammas = gamma_and_rate(schedule, torch.cat([t, s]), interior)[0].to(x.device)
        gamma_t, gamma_s = gammas[:B], gammas[B:]
    alpha, sigma = _alpha_sigma(gamma_t)
    z = _shape(alpha, x) * x + _shape(sigma, x) * eps
    pred = _predict(denoiser, z, t, alpha, sigma, cond)
    if grid is None:
        err = _sum((eps.float() - pred.eps.float()) ** 2).to(F64)
        return (1 - t0) * 0.5 * rate * err
    if pred.variance_v is None:
        err = _sum((eps.float() - pred.eps.float()) ** 2).to(F64)
        return N * 0.5 * torch.expm1(gamma_t - gamma_s) * err
    tr = _transition(gamma_s, gamma_t)
    log_var = interpolated_log_variance(
        pred.variance_v.to(F64), _shape(tr["beta"], x).to(F64).log(),
        _shape(tr["beta_tilde"], x).to(F64).clamp(min=1e-300).log())
    return N * _gaussian_kl(x, pred.x0, tr, log_var)


def second_order_dsm(denoiser: BaseDenoiser, x: Tensor, u: Tensor, eps: Tensor, v: Tensor,
                     t0: float = 0.0, cond: Any = None) -> Tensor:
    """Lu et al. 2022's second-order denoising score matching term per example (continuous
    time, likelihood-weighted like the diffusion term), for training the probability-flow
    ODE's own likelihood.

    The second-order Tweedie identity (Meng et al. 2021, Eq. 5; Lu et al. 2022, "Maximum
    Likelihood Training for Score-Based Diffusion ODEs by High-Order Denoising Score
    Matching", Sec. 4, in score form sigma^2 grad s + I) gives the posterior covariance of the
    noise from the Jacobian of its mean eps_hat = E[eps | z_t]:

        Cov[eps | z_t] = I - sigma_t d eps_hat / d z_t,

    so with r = sg(eps - eps_hat(z_t)) (the first-order residual, no gradient) the matrix
    sigma_t J + r r^T - I is zero in expectation for the exact denoiser. With a Rademacher
    probe v and F = v - sigma_t J v - (r^T v) r (J v by forward-mode AD: one
    Jacobian-vector product), the term is

        L_2 = 0.5 (1 - t_0) gamma'(t) (||F||^2 + (v^T F)^2) / D,

    Lu et al.'s Frobenius and trace losses (their ``losses_2_frob + losses_2``, which divide by
    D^2 against a first-order loss divided by D) on the diffusion term's scale, at u's times
    t = t_0 + (1 - t_0) u and the same eps. First-order matching bounds the KL of the SDE's
    model only; the ODE's KL also needs the score's Jacobian right (Lu et al., Thm. 4.2).
    The schedule enters with no gradient: a learned one is trained by the bound alone.
    """
    from torch.autograd import forward_ad as fwAD

    t = t0 + (1 - t0) * u.to(F64)
    with torch.no_grad():
        gamma_t, rate = gamma_and_rate(denoiser.schedule, t)
    gamma_t, rate = gamma_t.to(x.device), rate.to(x.device)
    alpha, sigma = _alpha_sigma(gamma_t)
    z = _shape(alpha, x) * x + _shape(sigma, x) * eps
    with fwAD.dual_level():
        out = _predict(denoiser, fwAD.make_dual(z, v), t, alpha, sigma, cond).eps
        eps_hat, jv = fwAD.unpack_dual(out)
    r = (eps - eps_hat).detach()
    f = v - _shape(sigma, x) * jv - _shape(_sum(r * v), x) * r
    D = x[0].numel()
    return (1 - t0) * 0.5 * rate * ((_sum(f ** 2) + _sum(v * f) ** 2) / D).to(F64)


def _ddpm_decoder(denoiser: BaseDenoiser, x: Tensor, grid: Tensor, eps_0: Tensor,
                  cond: Any) -> Tensor:
    """-log p(x | z_{t_0}) of DDPM's network decoder (module docstring), nats."""
    gammas = gamma_and_rate(denoiser.schedule, grid[:2])[0].to(x.device)
    alpha, sigma = _alpha_sigma(gammas[:1].expand(x.shape[0]))
    z = _shape(alpha, x) * x + _shape(sigma, x) * eps_0
    pred = _predict(denoiser, z, grid[:1].expand(x.shape[0]), alpha, sigma, cond)
    beta_1 = torch.sigmoid(gammas[0])  # sigma(t_0)^2: the step from clean data
    log_var = torch.log(beta_1).expand_as(x)
    if pred.variance_v is not None:  # beta~ = 0 at t_0: the next step's (improved-diffusion)
        beta_tilde = _transition(gammas[0], gammas[1])["beta_tilde"]
        log_var = interpolated_log_variance(pred.variance_v.to(F64), torch.log(beta_1),
                                            torch.log(beta_tilde))
    return -_sum(_log_bin_probability(x, pred.x0, log_var))


def _decoder(denoiser: BaseDenoiser, x: Tensor, eps_0: Tensor, cond: Any, decoder: str,
             grid: Tensor | None, t0: float) -> Tensor:
    if decoder == "ddpm":
        return _ddpm_decoder(denoiser, x, grid, eps_0, cond)
    gamma_0 = gamma_and_rate(denoiser.schedule, torch.tensor(t0 if grid is None else
                                                             float(grid[0]), dtype=F64))[0]
    return decoder_nll(x, eps_0, gamma_0.to(x.device), decoder)


def decoder_nll(x: Tensor, eps_0: Tensor, gamma_0: Tensor, decoder: str) -> Tensor:
    """-log p(x | z_0) per example (nats) at z_0 = alpha_0 (x + sigma~_0 eps_0), sigma~_0^2 =
    exp(gamma_0), of the ``"vdm"`` decoder over the 256 bins or the ``"gaussian"`` one,
    -log N(x; z_0 / alpha_0, sigma~_0^2) = 0.5 D log(2 pi sigma~_0^2) + 0.5 |eps_0|^2 (module
    docstring). The gaussian figure is also -log q(z_0 / alpha_0 | x), the forward process's own
    density, which :func:`difflab.likelihood.log_likelihood` uses to dequantise by the decoder."""
    if decoder == "vdm":
        return _vdm_decoder(gamma_0, x, eps_0)
    if decoder != "gaussian":
        raise ValueError(f"decoder_nll takes decoder 'vdm' or 'gaussian', got {decoder!r}")
    D = x[0].numel()
    return 0.5 * D * (math.log(2 * math.pi) + gamma_0) + 0.5 * _sum(eps_0.to(F64) ** 2)


def _resolve(denoiser: BaseDenoiser, steps: int | str | None, decoder: str | None
             ) -> tuple[Tensor | None, float, str]:
    schedule = denoiser.schedule
    _check_schedule(schedule)
    grid = vlb_grid(schedule, steps)
    if decoder is None:
        decoder = "ddpm" if steps == "chain" else "vdm"
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; valid: {list(DECODERS)}")
    if decoder == "ddpm" and grid is None:
        raise ValueError("decoder='ddpm' (the network decoder of a chain) needs a discrete "
                         "bound: steps='chain' or steps=N")
    t0 = float(grid[0]) if grid is not None else start_time(schedule)
    return grid, t0, decoder


def antithetic_times(n: int, generator: torch.Generator | None) -> Tensor:
    """u_b = (u_0 + b / n) mod 1, u_0 ~ U(0, 1): VDM's low-discrepancy times (float64)."""
    u0 = torch.rand((), generator=generator, dtype=F64)
    return torch.remainder(u0 + torch.arange(n, dtype=F64) / n, 1.0)


# --- the bound as a number -----------------------------------------------------------------
@dataclass
class VLBResult:
    """Per-example terms of the bound (nats, shape (B,)); ``diffusion`` averages
    ``time_samples`` Monte-Carlo draws, ``diffusion_se`` is their standard error."""

    prior: Tensor
    reconstruction: Tensor
    diffusion: Tensor
    diffusion_se: Tensor
    dim: int
    decoder: str
    steps: int | str | None

    @property
    def total(self) -> Tensor:
        """The bound on -log p(x) per example (nats)."""
        return self.prior + self.reconstruction + self.diffusion

    @property
    def bits_per_dim(self) -> Tensor:
        """total / (D ln 2) per example; for the 8-bit decoders the bits/dim of the discrete
        data (no offset), for ``"gaussian"`` of a density."""
        return self.total / (self.dim * LN2)


@torch.no_grad()
def variational_bound(denoiser: BaseDenoiser, x: Tensor, *, cond: Any = None,
                      steps: int | str | None = None, decoder: str | None = None,
                      time_samples: int = 1, generator: torch.Generator | None = None
                      ) -> VLBResult:
    """The VLB of ``denoiser`` at each example of ``x`` (module docstring).

    Args:
        steps: None: the continuous bound (Eq. 17); N: the discrete one in N steps from t_0
            to 1 (Eq. 13); ``"chain"``: a DDPM chain's own T - 1 steps with DDPM's decoder (a
            ValueError for a schedule without a discrete form). A model with a learned variance
            gets its Gaussian KL in the discrete bound.
        decoder: "vdm" (default; 8-bit images), "ddpm" (default for ``"chain"``), "gaussian"
            (continuous data).
        time_samples: K antithetic times per example for the diffusion term (its standard
            error is reported); eps, eps_0 and the times all come from ``generator``.
    """
    if isinstance(time_samples, bool) or not isinstance(time_samples, int) or time_samples < 1:
        raise ValueError(f"time_samples must be an integer >= 1, got {time_samples!r}")
    grid, t0, decoder = _resolve(denoiser, steps, decoder)
    B = x.shape[0]
    prior = _prior(denoiser.schedule, x).cpu()
    eps_0 = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    recon = _decoder(denoiser, x, eps_0, cond, decoder, grid, t0).cpu()
    u0 = torch.rand(B, generator=generator, dtype=F64)
    draws = []
    for k in range(time_samples):
        u = torch.remainder(u0 + k / time_samples, 1.0)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        draws.append(_diffusion_term(denoiser, x, u, eps, cond, grid, t0, None).cpu())
    d = torch.stack(draws)
    se = d.std(0) / math.sqrt(time_samples) if time_samples > 1 else torch.full((B,), math.nan,
                                                                                  dtype=F64)
    return VLBResult(prior, recon, d.mean(0), se, x[0].numel(), decoder, steps)


# --- objectives ----------------------------------------------------------------------------
class VLBObjective(Objective):
    """Train on the variational bound, in bits per dimension (module docstring): a learned
    schedule (one with parameters) is trained too (``trainable`` = ("net", "schedule")), its
    endpoints on the bound and its interior on the variance of the diffusion term; antithetic
    times. Logs the bound and its terms (bits/dim) and, for a learned schedule, gamma_0 and
    gamma_1.

    Args:
        schedule, prediction, sigma_data: the model (as :class:`DiffusionObjective`).
        steps: None (continuous, Eq. 17), N or ``"chain"`` (discrete, Eq. 13).
        decoder: as :func:`variational_bound` (default "vdm"; "ddpm" for ``"chain"``).
        variance_trick: train the learned schedule's interior on the variance (VDM); False:
            on the bound itself (where it has no effect in expectation).
        second_order: weight lambda of :func:`second_order_dsm` added to the loss (Lu et al.
            2022: it trains the probability-flow ODE's likelihood, which the bound alone does
            not bound); 0 (default): the bound alone. Continuous time only.
    """

    kind = "diffusion"
    ema = ("net",)

    def __init__(self, schedule: NoiseSchedule, prediction: str | param.Parameterization = "eps",
                 *, sigma_data: float = 0.5, steps: int | str | None = None,
                 decoder: str | None = None, variance_trick: bool = True,
                 second_order: float = 0.0):
        _check_schedule(schedule)
        if second_order < 0 or (second_order and steps is not None):
            raise ValueError(f"second_order must be >= 0, and 0 for a discrete bound (steps="
                             f"{steps!r}); got {second_order!r}")
        self.second_order = float(second_order)
        self.schedule = schedule
        kw = {"sigma_data": sigma_data} if prediction == "edm" else {}
        self.parameterization = param.get(prediction, **kw)
        self.steps, self.decoder_name = steps, decoder
        vlb_grid(schedule, steps)  # a clear error now for a schedule with no discrete form
        self.variance_trick = bool(variance_trick)
        self.learned = any(True for _ in schedule.parameters())
        self.trainable = ("net", "schedule") if self.learned else ("net",)
        self._last: tuple[nn.Module, Denoiser] | None = None

    def owned_modules(self) -> dict[str, nn.Module]:
        """Trainable modules the objective owns (the trainer adds them): a learned schedule."""
        return {"schedule": self.schedule} if self.learned else {}

    learned_variance = False
    denoiser = DiffusionObjective.denoiser  # the cached Denoiser of net (the same method)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator) -> dict[str, Any]:
        x0 = batch["image"]
        return {"x0": x0, "u": antithetic_times(x0.shape[0], generator),
                "eps": torch.randn(x0.shape, generator=generator),
                "eps_0": torch.randn(x0.shape, generator=generator),
                **({"probe": torch.randint(0, 2, x0.shape, generator=generator).float() * 2 - 1}
                   if self.second_order else {})}

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        den = self.denoiser(modules["net"])
        x = batch["x0"]
        grid, t0, decoder = _resolve(den, self.steps, self.decoder_name)
        norm = x[0].numel() * LN2
        scale: dict[str, Tensor] = {}
        interior = None
        if self.learned and self.variance_trick and torch.is_grad_enabled():
            def hook(g: Tensor) -> Tensor:  # d L / d eta -> d mean(L_diff^2) / d eta
                s = scale["s"].to(g)
                return g * s.repeat(g.numel() // s.numel())

            def interior(q: Tensor) -> Tensor:
                if q.requires_grad:
                    q.register_hook(hook)
                return q
        prior = _prior(self.schedule, x)
        recon = _decoder(den, x, batch["eps_0"], None, decoder, grid, t0)
        diff = _diffusion_term(den, x, batch["u"], batch["eps"], None, grid, t0, interior)
        scale["s"] = 2 * diff.detach() / norm
        total = (prior + recon + diff) / norm
        loss = total.mean()
        logs: dict[str, Any] = {"vlb_bpd": total.detach().mean(),
                                "diffusion_bpd": diff.detach().mean() / norm,
                                "prior_bpd": prior.detach().mean() / norm,
                                "recon_bpd": recon.detach().mean() / norm}
        if self.learned and hasattr(self.schedule, "gamma_1"):
            logs["gamma_0"] = float(self.schedule.gamma_0.detach())
            logs["gamma_1"] = float(self.schedule.gamma_1.detach())
        if self.second_order:
            l2 = second_order_dsm(den, x, batch["u"], batch["eps"], batch["probe"], t0) / norm
            loss = loss + self.second_order * l2.mean()
            logs["dsm2_bpd"] = l2.detach().mean()
        return loss.float(), logs

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "objective": "vlb", "steps": self.steps,
                "decoder": self.decoder_name, "variance_trick": self.variance_trick,
                "second_order": self.second_order}


class HybridObjective(DiffusionObjective):
    """Nichol & Dhariwal 2021's hybrid loss for a learned-variance DDPM chain:
    L_simple + lambda L_vlb (lambda = 0.001), L_vlb = T * (the bound's term at the drawn step,
    in bits/dim): KL(q(x_s | x_t, x_0) || N(mu(x_t, sg(x0_hat)), Sigma_v)) for s > 0, the
    discretised decoder -log p(x_0 | x_1) for the first step; sg is the stop-gradient, so the
    mean learns from L_simple only and v from L_vlb only. The network has 2C output channels
    (``Denoiser(..., learned_variance=True)``)."""

    learned_variance = True

    def __init__(self, schedule: NoiseSchedule, prediction: str | param.Parameterization = "eps",
                 *, lambda_vlb: float = 0.001, target: str | None = None,
                 weighting: Weighting | None = None, sigma_data: float = 0.5):
        if schedule.num_steps is None or schedule.num_steps < 2:
            raise ValueError(f"the hybrid loss (learned variances) needs a DDPM chain: schedule "
                             f"{schedule.config().get('type')!r} has no discrete form "
                             "(num_steps is None)")
        _check_schedule(schedule)
        super().__init__(schedule, prediction, sigma_data=sigma_data, target=target,
                         weighting=weighting)
        self.lambda_vlb = float(lambda_vlb)


    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        den = self.denoiser(modules["net"])
        x, t, eps = batch["x0"], batch["t"].to(F64), batch["eps"]
        T = self.schedule.num_steps
        B = x.shape[0]
        s = t - 1.0 / T
        gammas = gamma_and_rate(self.schedule, torch.cat([t, s.clamp(min=0)]))[0].to(x.device)
        gamma_t = gammas[:B]
        alpha, sigma = _alpha_sigma(gamma_t)
        z = _shape(alpha, x) * x + _shape(sigma, x) * eps
        pred = den.predict(z, t.to(x.device), batch.get("cond"))
        a, sg = _shape(alpha, x), _shape(sigma, x)
        truth = Prediction(z, x, eps, a, sg).target(self.target)
        w = self.weighting(alpha.float(), sigma.float(), self.target)
        err = (pred.target(self.target).float() - truth.float()) ** 2
        simple = w * err.reshape(B, -1).mean(1)
        # L_vlb's term with the mean stopped
        x0_hat, v = pred.x0.detach(), pred.variance_v.to(F64)
        first = s <= 0.5 / T
        gamma_s = torch.where(first.to(x.device), gamma_t - 1, gammas[B:])  # placeholder at s=0
        tr = _transition(gamma_s, gamma_t)
        log_beta = _shape(tr["beta"], x).to(F64).log()
        # the first step: beta = sigma(t_1)^2, beta~ clipped to the next step's (t_2 -> t_1)
        g12 = gamma_and_rate(self.schedule, torch.tensor([1.0 / T, 2.0 / T], dtype=F64))[0]
        bt_clip = _transition(g12[0], g12[1])["beta_tilde"].to(x.device)
        beta_first = torch.sigmoid(gamma_t)
        log_beta = torch.where(_shape(first, x).bool(), _shape(beta_first, x).to(F64).log(),
                               log_beta)
        log_bt = torch.where(_shape(first, x).bool(), bt_clip.log(),
                             _shape(tr["beta_tilde"], x).to(F64).clamp(min=1e-300).log())
        log_var = interpolated_log_variance(v, log_beta, log_bt)
        kl = _gaussian_kl(x, x0_hat, tr, log_var)
        nll = -_sum(_log_bin_probability(x, x0_hat, log_var))
        D = x[0].numel()
        vlb = torch.where(first.to(x.device), nll, kl) / (D * LN2)
        loss = simple + self.lambda_vlb * T * vlb.float()
        return loss.mean(), {"simple": simple.detach().mean(), "vlb_bpd_term": vlb.detach().mean()}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "objective": "hybrid", "lambda_vlb": self.lambda_vlb}
