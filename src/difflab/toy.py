"""Gaussian mixtures: data distributions whose every diffusion quantity is closed form.

For p_0 = sum_k w_k N(mu_k, diag(s_k^2)) and x_t = alpha x_0 + sigma eps,

    p_t(x)          = sum_k w_k N(x; alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))
    r_k(x)          = w_k N(x; alpha mu_k, ...) / p_t(x)                 (responsibilities)
    E[x_0 | x_t, k] = mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) * (x - alpha mu_k)
    E[x_0 | x_t]    = sum_k r_k(x) E[x_0 | x_t, k]                        (Tweedie)
    grad log p_t(x) = -sum_k r_k(x) (x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)

so the exact denoiser, the exact score and the exact classifier log p(k | x_t) = log r_k(x_t)
are available to test every sampler and every guidance transform against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.denoiser import Denoiser
from difflab.schedules import NoiseSchedule

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """A mixture of diagonal Gaussians in D dimensions (float64 throughout).

    Args:
        means: (K, D) component means mu_k.
        stds: (K,) or (K, D) component standard deviations s_k.
        weights: (K,) mixture weights (normalised here); uniform by default.
    """

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        K, D = self.means.shape
        s = torch.as_tensor(stds, dtype=torch.float64)
        self.vars = (s.reshape(K, -1) if s.ndim else s.expand(K, 1)).expand(K, D).clone() ** 2
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def ring(cls, k: int = 8, radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
        """k equally weighted components on a circle in 2-D."""
        a = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        return cls(torch.stack([radius * a.cos(), radius * a.sin()], 1), std)

    @classmethod
    def random(cls, k: int, dim: int, *, seed: int = 0, spread: float = 1.0,
               std_range: tuple[float, float] = (0.1, 0.4)) -> GaussianMixture:
        """k components in `dim` dimensions with random means, stds and weights."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(k, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(k, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
        return cls(means, stds, weights)

    # -- sampling -----------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None,
               labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """n draws from p_0 and their component labels."""
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.vars[labels].sqrt() * z, labels

    # -- closed forms at noise level (alpha, sigma) -----------------------------------
    def _component_terms(self, x: Tensor, alpha: Tensor, sigma: Tensor):
        x = x.to(torch.float64)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = a * a * self.vars[None] + s * s  # (B|1, K, D)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        log_n = -0.5 * (diff * diff / var + torch.log(2 * math.pi * var)).sum(-1)
        return x, a, s, var, diff, log_n + torch.log(self.weights)[None]

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0,
                 sigma: Tensor | float = 0.0) -> Tensor:
        """log p_t(x)."""
        *_, log_joint = self._component_terms(x, alpha, sigma)
        return torch.logsumexp(log_joint, -1)

    def log_prob_box(self, lo: Tensor, hi: Tensor) -> Tensor:
        """log P(lo <= x_0 < hi) for boxes (B, D) (e.g. the 8-bit cells of dequantisation):
        log sum_k w_k prod_d (Phi((hi_d - mu_kd) / s_kd) - Phi((lo_d - mu_kd) / s_kd)), each
        difference taken in log space on the side of the mean that keeps it accurate."""
        lo = torch.as_tensor(lo, dtype=torch.float64)[:, None, :]
        hi = torch.as_tensor(hi, dtype=torch.float64)[:, None, :]
        s = self.vars.sqrt()[None]
        a, b = (lo - self.means[None]) / s, (hi - self.means[None]) / s  # (B, K, D)
        upper = a > 0  # both in the upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
        big = torch.special.log_ndtr(torch.where(upper, -a, b))
        small = torch.special.log_ndtr(torch.where(upper, -b, a))
        log_mass = big + torch.log1p(-torch.exp(small - big))
        return torch.logsumexp(log_mass.sum(-1) + torch.log(self.weights)[None], -1)

    def log_posterior(self, x: Tensor, alpha: Tensor | float,
                      sigma: Tensor | float) -> Tensor:
        """log p(k | x_t), (B, K): the exact noise-aware classifier."""
        *_, log_joint = self._component_terms(x, alpha, sigma)
        return torch.log_softmax(log_joint, -1)

    def score(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float,
              labels: Tensor | None = None) -> Tensor:
        """grad_x log p_t(x) (or log p_t(x | k) for given labels)."""
        x, a, s, var, diff, log_joint = self._component_terms(x, alpha, sigma)
        r = self._responsibilities(log_joint, labels)
        return -(r[..., None] * diff / var).sum(1)

    def posterior_mean(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float,
                       labels: Tensor | None = None) -> Tensor:
        """E[x_0 | x_t] (Tweedie), optionally conditioned on the component label."""
        x, a, s, var, diff, log_joint = self._component_terms(x, alpha, sigma)
        r = self._responsibilities(log_joint, labels)
        mean_k = self.means[None] + a * self.vars[None] / var * diff
        return (r[..., None] * mean_k).sum(1)

    @staticmethod
    def _responsibilities(log_joint: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            return torch.softmax(log_joint, -1)
        r = torch.zeros_like(log_joint)
        r[torch.arange(log_joint.shape[0]), labels.to(log_joint.device).long()] = 1.0
        return r

    # -- as a difflab denoiser ----------------------------------------------------------
    def denoiser(self, schedule: NoiseSchedule, prediction: str = "x0") -> Denoiser:
        """The exact denoiser wrapped as a network predicting ``prediction``.

        The network goes through the same path as a trained one (net_time in, the chosen
        parameterisation out), so conversions are exercised too. ``cond`` may be a (B,) long
        tensor of component labels (the class-conditional model) or a Condition with
        ``labels``; the null label (-1, or ``K``: one past the last component) means "no
        condition", as a classifier-free null label does.
        """
        return Denoiser(ExactMixtureNet(self, schedule, prediction), schedule, prediction)


class ExactMixtureNet(nn.Module):
    """The exact network for a :class:`GaussianMixture` (see ``GaussianMixture.denoiser``)."""

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction: str):
        super().__init__()
        self.mixture, self.schedule, self.prediction = mixture, schedule, prediction
        self.calls = 0  # number of forward calls (NFE counting in tests)

    def forward(self, x: Tensor, net_t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls += 1
        shape = x.shape
        xf = x.reshape(shape[0], -1).to(torch.float64)
        if self.prediction == "edm":
            raise ValueError("ExactMixtureNet does not emulate EDM preconditioning")
        t = self.schedule.t_from_net_time(net_t.to(torch.float64))
        alpha, sigma = self.schedule.alpha_sigma(t)
        if labels is not None:
            uncond = (labels < 0) | (labels >= self.mixture.num_components)
            if bool(uncond.any()):
                out_u = self.mixture.posterior_mean(xf, alpha, sigma)
                out_c = self.mixture.posterior_mean(
                    xf, alpha, sigma, labels.clamp(0, self.mixture.num_components - 1))
                x0 = torch.where(uncond[:, None], out_u, out_c)
            else:
                x0 = self.mixture.posterior_mean(xf, alpha, sigma, labels)
        else:
            x0 = self.mixture.posterior_mean(xf, alpha, sigma)
        a, s = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
        if self.prediction == "x0":
            out = x0
        elif self.prediction == "eps":
            out = (xf - a * x0) / s
        elif self.prediction == "score":
            out = -(xf - a * x0) / (s * s)
        elif self.prediction == "flow":  # the flow-matching velocity u = eps - x0
            out = (xf - a * x0) / s - x0
        else:  # v
            eps = (xf - a * x0) / s
            out = a * eps - s * x0
        return out.to(x.dtype).reshape(shape)
