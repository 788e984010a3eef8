"""The math of consistency distillation and consistency training, one function per formula.

A consistency model (Song et al. 2023, "Consistency Models") is a Denoiser with the
:class:`~difflab.denoiser.parameterization.Consistency` parameterisation; its consistency
function is ``f(x, t) = denoiser.predict(x, t, cond).x0`` (a BaseDenoiser called as
``denoiser(x, t)`` is one). Training makes f agree with itself along probability-flow ODE
trajectories: for adjacent times t_n < t_{n+1} of a discretisation,

    L = E[ lambda(t_n) d( f_theta(x_{t_{n+1}}, t_{n+1}),  f_theta-(x^_{t_n}, t_n) ) ],

with f_theta- a stop-gradient target (an EMA of theta, or theta itself), and the pair from

* distillation (Alg. 2): x_{t_{n+1}} = alpha x + sigma z, x^_{t_n} = one ODE step of a trained
  diffusion model (the teacher) from t_{n+1} to t_n (:func:`distillation_pair`);
* training (Alg. 3): x_{t_{n+1}} = alpha_{n+1} x + sigma_{n+1} z and x_{t_n} = alpha_n x +
  sigma_n z with the same z (:func:`training_pair`).

Here t is difflab's schedule time; noise levels are the VE-equivalent sigma~ = sigma / alpha
(written sigma below, as in the papers, where x_t = x + sigma z), mapped to times with
``schedule.t_from_sigma_ratio``. The improved recipe (Song & Dhariwal 2023, "Improved Techniques
for Training Consistency Models", Sec. 3-3.5): the discretisation N(k) doubling from s0 = 10 to
s1 = 1280 (:func:`discretization_steps`) of Karras' sigmas (:func:`karras_sigmas`), a lognormal
distribution of the pair's index (:func:`lognormal_index_probs`), the weight 1 / (sigma_{i+1} -
sigma_i) (:func:`ict_weights`) and the pseudo-Huber distance (:func:`pseudo_huber`). Easy
consistency tuning (Geng et al. 2024, "Consistency Models Made Easy"; the reference code
``locuslab/ect``, ``training/loss.py``) draws sigma from the same lognormal continuously and pairs
it with r(sigma) < sigma, the gap shrinking stage by stage (:func:`ect_sigma_r`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difflab.process import q_sample
from difflab.schedules import NoiseSchedule

__all__ = ["ConsistencyFn", "TeacherStep", "discretization_steps", "karras_sigmas",
           "lognormal_index_probs", "sample_indices", "ict_weights", "sample_lognormal_sigmas",
           "pseudo_huber_c", "pseudo_huber", "DISTANCES", "distance", "ect_stage", "ect_sigma_r",
           "ect_weight", "training_pair", "distillation_pair", "consistency_loss"]

#: f(x, t) -> the estimate of x0 (a consistency function, e.g. a BaseDenoiser called as den(x, t))
ConsistencyFn = Callable[[Tensor, Tensor | float], Tensor]
#: teacher_step(x, t_from, t_to) -> x at t_to by one ODE-solver step of the teacher, e.g.
#: ``lambda x, a, b: difflab.samplers.step(teacher, x, a, b, sampler="heun", cond=cond)``
TeacherStep = Callable[[Tensor, Tensor | float, Tensor | float], Tensor]

P_MEAN, P_STD = -1.1, 2.0  # the lognormal over sigma of Song & Dhariwal 2023 (Sec. 3.5) and ECT
DISTANCES = ("l2", "l1", "pseudo_huber")


# --- the discretisation and its sampling (Song & Dhariwal 2023) ---------------------------
def discretization_steps(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k), the number of discretisation points at training iteration k of K (Song &
    Dhariwal 2023, Eq. 7 / Sec. 3.4: doubling every K' iterations from s0 to s1),

        N(k) = min(s0 2^floor(k / K'), s1) + 1,     K' = floor(K / (log2 floor(s1 / s0) + 1)),

    with K' at least 1 (a run shorter than the number of stages doubles every iteration).
    Defaults: s0 = 10, s1 = 1280 (8 stages of K / 8 iterations)."""
    if not 0 < s0 <= s1:
        raise ValueError(f"need 0 < s0 <= s1, got s0 = {s0}, s1 = {s1}")
    if k < 0 or K < 1:
        raise ValueError(f"need iteration k >= 0 and K >= 1, got k = {k}, K = {K}")
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1) + 1


def karras_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> Tensor:
    """The increasing discretisation sigma_1 < ... < sigma_N (float64) of Karras et al. 2022
    (Eq. 5) as consistency models use it (Song et al. 2023, Sec. 5; Song & Dhariwal 2023),

        sigma_i = (sigma_min^(1/rho) + (i - 1) / (N - 1) (sigma_max^(1/rho) -
                   sigma_min^(1/rho)))^rho,       i = 1 .. N,

    so sigma_1 = sigma_min and sigma_N = sigma_max exactly."""
    if N < 2:
        raise ValueError(f"a discretisation needs N >= 2 points, got {N}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas


def lognormal_index_probs(sigmas: Tensor, P_mean: float = P_MEAN,
                          P_std: float = P_STD) -> Tensor:
    """p(i) of the pair (sigma_i, sigma_{i+1}), i = 1 .. N-1 (returned 0-based, length N - 1),
    the lognormal log sigma ~ N(P_mean, P_std^2) discretised over the intervals (Song &
    Dhariwal 2023, Sec. 3.5):

        p(i) proportional to erf((log sigma_{i+1} - P_mean) / (sqrt2 P_std))
                             - erf((log sigma_i - P_mean) / (sqrt2 P_std)),

    normalised to sum to 1 (float64)."""
    log_s = torch.as_tensor(sigmas, dtype=torch.float64).log()
    cdf = torch.erf((log_s - P_mean) / (math.sqrt(2) * P_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def sample_indices(probs: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n pair indices i in 0 .. N-2 drawn from ``probs`` (:func:`lognormal_index_probs`), with
    replacement, from ``generator``: the pair is (sigmas[i], sigmas[i + 1])."""
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def ict_weights(sigmas: Tensor) -> Tensor:
    """lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i), i = 1 .. N-1 (0-based, length N - 1;
    Song & Dhariwal 2023, Sec. 3.3)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return 1 / (sigmas[1:] - sigmas[:-1])


def sample_lognormal_sigmas(n: int, generator: torch.Generator | None = None,
                            P_mean: float = P_MEAN, P_std: float = P_STD) -> Tensor:
    """n noise levels sigma = exp(P_mean + P_std u), u ~ N(0, 1) (float64): EDM's training
    distribution (Karras et al. 2022, Sec. 5) with ECT's P_mean = -1.1, P_std = 2.0."""
    u = torch.randn(n, generator=generator, dtype=torch.float64)
    return (P_mean + P_std * u).exp()


# --- distances ----------------------------------------------------------------------------
def pseudo_huber_c(d: int) -> float:
    """The pseudo-Huber constant c = 0.00054 sqrt(d) for data of dimension d (Song & Dhariwal
    2023, Sec. 3.3; d = 3072 on CIFAR-10 gives c = 0.03)."""
    return 0.00054 * math.sqrt(d)


def _flat(x: Tensor, y: Tensor) -> Tensor:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    return (x - y).reshape(x.shape[0], -1)


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """d(x, y) = sqrt(||x - y||_2^2 + c^2) - c per sample (B,), over all non-batch dimensions,
    with c = :func:`pseudo_huber_c` (d) by default (Song & Dhariwal 2023, Sec. 3.3); c = 0 is
    the L2 norm ||x - y||_2 (ECT's default). Evaluated as ||x - y||^2 / (sqrt(||x - y||^2 + c^2)
    + c), which is the same number without the cancellation of the difference near x = y."""
    diff = _flat(x, y)
    c = pseudo_huber_c(diff.shape[1]) if c is None else float(c)
    if c < 0:
        raise ValueError(f"the pseudo-Huber constant c must be >= 0, got {c}")
    sq = diff.square().sum(1)
    return sq.sqrt() if c == 0 else sq / ((sq + c * c).sqrt() + c)


def distance(x: Tensor, y: Tensor, kind: str = "l2", c: float | None = None) -> Tensor:
    """The distance d of the consistency loss per sample (B,), over all non-batch dims:
    ``l2`` ||x - y||_2^2 and ``l1`` ||x - y||_1 (Song et al. 2023, Sec. 3), ``pseudo_huber``
    sqrt(||x - y||_2^2 + c^2) - c (:func:`pseudo_huber`; ``c`` is its constant)."""
    if kind == "l2":
        return _flat(x, y).square().sum(1)
    if kind == "l1":
        return _flat(x, y).abs().sum(1)
    if kind == "pseudo_huber":
        return pseudo_huber(x, y, c)
    raise ValueError(f"unknown distance {kind!r}; valid: {list(DISTANCES)}")


# --- easy consistency tuning (Geng et al. 2024) -------------------------------------------
def ect_stage(iteration: int, iterations_per_stage: int) -> int:
    """ECT's stage floor(iteration / d) at a training iteration, d iterations per stage."""
    if iteration < 0 or iterations_per_stage < 1:
        raise ValueError(f"need iteration >= 0 and iterations_per_stage >= 1, got {iteration}, "
                         f"{iterations_per_stage}")
    return iteration // iterations_per_stage


def ect_sigma_r(sigma: Tensor, stage: int, q: float = 2.0, k: float = 8.0,
                b: float = 1.0) -> Tensor:
    """ECT's mapping function: the smaller noise level r paired with sigma (Geng et al. 2024,
    Sec. 3, "mapping function"; ``t_to_r_sigmoid`` of the reference code, where t is sigma),

        r = max(0, sigma (1 - n(sigma) / q^(a))),   n(sigma) = 1 + k sigmoid(-b sigma),
        a = stage + 1,

    so that dt / t = n(sigma) / q^a shrinks by q every stage (the paper writes a = ceil(iteration
    / d), equal to stage + 1 except at multiples of d). r = 0 pairs sigma with the clean data
    (f(x, 0) = x): stage-0 pairs at small sigma are diffusion (denoising) training. Defaults q = 2,
    k = 8, b = 1 (CIFAR-10; ImageNet uses q = 4)."""
    sigma = torch.as_tensor(sigma)
    n = 1 + k * torch.sigmoid(-b * sigma)
    return (sigma * (1 - n / q ** (stage + 1))).clamp(min=0)


def ect_weight(sigma: Tensor, r: Tensor) -> Tensor:
    """ECT's weight w(sigma, r) = 1 / (sigma - r) (reference code, CIFAR-10), applied to the
    pseudo-Huber distance (c = 0: the L2 norm)."""
    return 1 / (sigma - r)


# --- the pairs and the loss (Song et al. 2023, Algs. 2-3) ---------------------------------
def training_pair(schedule: NoiseSchedule, x0: Tensor, noise: Tensor, t_n: Tensor | float,
                  t_next: Tensor | float) -> tuple[Tensor, Tensor]:
    """(x_{t_{n+1}}, x_{t_n}) of consistency training (Song et al. 2023, Alg. 3): the same
    noise z at both times, x_t = alpha_t x + sigma_t z (in VE terms x + sigma~ z); ``t_n`` and
    ``t_next`` are numbers or one time per row of ``x0``."""
    return q_sample(schedule, x0, t_next, noise), q_sample(schedule, x0, t_n, noise)


@torch.no_grad()
def distillation_pair(schedule: NoiseSchedule, teacher_step: TeacherStep, x0: Tensor,
                      noise: Tensor, t_n: Tensor | float,
                      t_next: Tensor | float) -> tuple[Tensor, Tensor]:
    """(x_{t_{n+1}}, x^_{t_n}) of consistency distillation (Song et al. 2023, Alg. 2):
    x_{t_{n+1}} = alpha x + sigma z from the data, and x^_{t_n} its image under one step of the
    teacher's probability-flow ODE solver from t_{n+1} to t_n, ``teacher_step(x, t_from, t_to)``
    (e.g. :func:`difflab.samplers.step` with Heun or DPM-Solver on the teacher). No gradient."""
    x_next = q_sample(schedule, x0, t_next, noise)
    return x_next, teacher_step(x_next, t_next, t_n)


def consistency_loss(f: ConsistencyFn, f_target: ConsistencyFn, x_next: Tensor,
                     t_next: Tensor | float, x_n: Tensor, t_n: Tensor | float, *,
                     kind: str = "l2", c: float | None = None,
                     weight: Tensor | float | None = None) -> Tensor:
    """The consistency loss per sample (B,) of one pair (Song et al. 2023, Eqs. 7 and 10),

        lambda(t_n) d( f(x_{t_{n+1}}, t_{n+1}),  sg[f_target(x_n, t_n)] ),

    with ``x_n`` the teacher's x^_{t_n} (:func:`distillation_pair`) or the same-noise x_{t_n}
    (:func:`training_pair`). The target is evaluated without gradient (stop-gradient, theta-:
    an EMA of theta, or theta itself in improved consistency training); d is :func:`distance`
    ``kind`` (with pseudo-Huber constant ``c``), lambda = ``weight`` (None: 1), a number or one
    weight per row (e.g. :func:`ict_weights` at the drawn indices)."""
    pred = f(x_next, t_next)
    with torch.no_grad():
        target = f_target(x_n, t_n).detach()
    loss = distance(pred, target, kind, c)
    if weight is None:
        return loss
    return loss * torch.as_tensor(weight, dtype=loss.dtype, device=loss.device)
