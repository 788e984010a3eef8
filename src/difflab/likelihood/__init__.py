"""Exact log-likelihood through the probability-flow ODE, in nats and bits per dimension.

The front door is :func:`log_likelihood`; the ODE integrators it uses (the embedded
Runge-Kutta pairs and the fixed-step multistep solver) are in :mod:`difflab.likelihood.solvers`.

**The ODE.** Every schedule has x_t = alpha(t) x_0 + sigma(t) eps. The probability-flow ODE
(Song et al. 2021, "Score-Based Generative Modeling through SDEs", Eq. 13) of a denoiser is

    dx/dt = f(x, t) = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat(x, t),

the time derivative of x_t = alpha x0_hat + sigma eps_hat with the two predictions held fixed
(the continuous limit of DDIM, Song et al. 2021a, Eq. 14). For the VP and VE families this is
the familiar dx/dt = (d log alpha / dt) x - (sigma^2 d lambda/dt / 2) score, since
alpha'/alpha - sigma'/sigma = lambda'(t) / 2 (lambda = log_snr, ``schedule.d_log_snr_dt``);
alpha'(t) and sigma'(t) are taken by autograd through ``schedule.alpha_sigma`` (float64), which
holds for every family (VP, VE/EDM, discrete, learned, rectified flow) and stays finite where
alpha = 0 (zero terminal SNR, where only the data form alpha' x0_hat exists).

**The change of variables.** Along a solution x(t), d log p_t(x(t)) / dt = -div f(x(t), t)
(Chen et al. 2018, "Neural ODEs", Thm. 1; Song et al. 2021, Appendix D.2), so

    log p_{t_min}(x(t_min)) = log p_1(x(1)) + int_{t_min}^{1} div f(x(t), t) dt,

with p_1 replaced by the prior N(0, prior_std^2 I), prior_std = ``schedule.prior_std(1)``
(1 for VP, sqrt(1 + sigma_max^2) for VE).

**The solver.** The state (x, int div f) is integrated in the log-SNR lambda rather than in t:
with dt = d lambda / lambda'(t) the same ODE reads

    dx/d lambda = (alpha'/lambda') x0_hat + (sigma'/lambda') eps_hat,   t = t_from_log_snr(lambda)

(the integral likewise), whose coefficients depend on the schedule only through alpha(lambda)
and sigma(lambda) (VP: d alpha / d lambda = alpha sigma^2 / 2): smooth for every family, also
where t -> lambda is not (a DDPM chain interpolated between its 1000 knots has a kink at each;
in t, Dormand-Prince needed > 10^4 steps there at rtol = 1e-7, in lambda 41), the approach of
DPM-Solver (Lu et al. 2022, Sec. 3.1). It runs from lambda(t_min) down to lambda(1), or to
:data:`LAMBDA_FLOOR` = -40 on a zero-terminal-SNR schedule (lambda(1) = -inf; there
alpha^2 ~ 4e-18 and x is N(0, prior_std^2 I) to that accuracy; ``t_max`` says where). The
solver is an adaptive Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Norsett & Wanner,
"Solving ODEs I", Sec. II.4-5): FSAL, the error of a step per sample max(RMS over x, RMS over
the probes' integrals), each component scaled by atol + rtol |y|, the largest over the batch;
step factor 0.9 err^(-1/5) in [0.2, 10]; Hairer's initial step.

**The multistep solver** (``solver="multistep"``, a fixed number of ``steps``: NFE = steps + 1,
one network call and one vector-Jacobian product each). Written with the half log-SNR
l = log(alpha / sigma) and the data prediction, the drift is a linear term plus the network's part,

    dx/dl = (d log sigma / dl) x + alpha x0_hat(x, l),
    div_x dx/dl = D d log sigma / dl + alpha div_x x0_hat,

since alpha'/lambda' - (sigma'/sigma) alpha/lambda' = alpha / 2 for every schedule. The linear
part is integrated exactly (the exponential-integrator form of DPM-Solver++, Lu et al. 2022b,
Eq. 9), x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} int_{l_i}^{l_{i+1}} e^{l - l_{i+1}}
P(l) dl, with P the polynomial through the last ``solvers.MULTISTEP_ORDER`` = 3 data predictions
(the exponential Adams-Bashforth step of DEIS, Zhang & Chen 2023, its weights integrated by
Gauss-Legendre quadrature), then corrected once with the prediction at the new point among the
nodes (the Adams-Moulton form of UniPC's corrector, Zhao et al. 2023: no extra call). The
divergence's D log(sigma_end / sigma_start) is exact (also for Gaussian probes, whose noise it
removes), and int alpha v^T (dx0_hat/dx) v dl is a composite 4-point Lagrange quadrature over the
nodes. The nodes are l_i = l_start + (l_end - l_start) (i / steps)^1.5 (``solvers.GRID_POWER``):
smaller steps near the data, where the smoothed density changes fastest. On the exact 64-D
mixture the error falls at third order (tests/test_likelihood.py). Measured on trained U-Nets
(bench/likelihood_rtol.py, 32 Fashion-MNIST test images each, against Dormand-Prince at rtol
1e-4): at 30 steps the mean difference is within 0.005 bits/dim on the three models the grid
was chosen on, at 20-40 steps within 0.01, for 31 calls against Dormand-Prince's 50-110 at
rtol 1e-2 .. 1e-3 (docs/benchmarks.md, "likelihood"). What limits it there is the network, not
the order: the divergence along a path of these chain-trained networks is rough in time (jumps
of ~3% between nodes 0.06 apart in l), so the error does not fall steadily with the steps. It
has no error control: check it against the adaptive solver on a new model.

**The divergence.** ``exact_divergence=True``: tr(df/dx) by autograd, one vector-Jacobian
product per dimension (the batch is replicated D times and one backward pass gives every
e_j^T J e_j; small D only). Otherwise Hutchinson's estimator (Hutchinson 1989; FFJORD,
Grathwohl et al. 2019): tr J = E_v[v^T J v] for Rademacher or Gaussian v with E[v v^T] = I, with
k probes drawn once from ``generator`` and fixed over the solve, so that the integrand is a
smooth function of t. Since x(t) does not depend on v, the estimate of log p is unbiased; its
standard error over the k probes is reported (each probe's integral is carried separately).

**The starting time.** With sigma(t_min) > 0 the denoiser is defined; at sigma = 0 it is not
(eps_hat = 0 / 0). The result is the density of the data smoothed by the schedule at t_min,
read in the data's scale: with sigma~ = sigma / alpha,

    log p(x) := log p_{t_min}(alpha(t_min) x) + D log alpha(t_min),

the log-density of x_0 + sigma~(t_min) eps (a proper density: a lower bound argument below
holds for it). Default ``t_min``: 0 where sigma(0) > 0 (the learned / VDM schedule: the model's
own z_0), else the time of sigma~ = :data:`SIGMA_START` = 1e-3. The bias against the
unsmoothed log p_0 is, for a smooth density, 0.5 sigma~^2 (Delta log p + |grad log p|^2) per
point, zero on average over the data to this order (its mean is int Delta p = 0); measured in
``tests/test_likelihood.py`` on Gaussian mixtures.

**Dequantisation and bits per dimension.** 8-bit images are k in {0, ..., 255}^D, stored as
x = 2k / 255 - 1 in [-1, 1]. Uniform dequantisation (Theis et al. 2016; Ho et al. 2019;
the convention of Song et al. 2021's likelihood code) evaluates the continuous model at

    y = 2 (k + u) / 256 - 1,   u ~ U[0, 1)^D,

the cell of k being the box [2k/256 - 1, 2(k+1)/256 - 1) of side Delta = 2/256 and volume
Delta^D (the cells tile [-1, 1); the stored x = 2k/255 - 1 lies in the closure of its cell).
The discrete model is P(k) = int_cell p(y) dy = Delta^D E_u[p(y)], so by Jensen

    log P(k) >= E_u[log p(y)] + D log Delta,    Delta = 2 / 256,

and one draw of u gives an unbiased estimate of the bound. In bits per dimension of the
discrete data:

    bits/dim = -log2 P(k) / D <= -(log p(y) + D log Delta) / (D ln 2)
             = -log p(y) / (D ln 2) + 8 - log2(2) = -log p(y) / (D ln 2) + 7,

the offset 7 = log2(256) - log2(data range 2) (Song et al. 2021 add the same 7 for data in
[-1, 1], 8 for data in [0, 1]). Without dequantisation, ``bits_per_dim`` is the continuous
-log p(x) / (D ln 2) with no offset (it may be negative).

**Dequantisation by the decoder** (``dequantize="decoder"``). Uniform noise is a poor proposal
for a density peaked at the 8-bit levels more narrowly than a bin. The variational bound's own
construction (Kingma et al. 2021, Eq. 11; Ho et al. 2019's variational dequantisation with the
forward process as the dequantiser) discretises the same density through z = x + sigma~_0 eps_0,
sigma~_0 = sigma~(t_min), and the VLB's 256-bin decoder p(k | z)
(:func:`difflab.objectives.vlb.decoder_nll`, ``"vdm"``), P'(k) = int p(k | z) p(z) dz:

    log P'(k) >= E_{eps_0} [log p(k | z) + log p(z) - log q(z | x)],
    q(z | x) = N(x, sigma~_0^2 I),

with log p(z) the ODE's density of the smoothed data at z (the ``log_density`` below). Its gap
is KL(q(z | x) || p(z | k)): near zero for a model peaked at the levels with width ~sigma~_0,
large for one that is smooth across a bin (there uniform dequantisation is the tight one; both
measured on 1-D mixtures in tests/test_likelihood.py). P'(k) is the discrete model the VLB
bounds, and for sigma~_0 well below the bin width it is the cell probability P(k) to within the
decoder's overlap of neighbouring bins. bits/dim = -(log p(z) + log p(k | z) - log q(z | x)) /
(D ln 2), no offset. On trained Fashion-MNIST U-Nets (docs/benchmarks.md, "likelihood") it is
0.9 bits/dim looser than uniform on the smooth preset and within 0.03 of it on VDM's learned
schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from difflab.denoiser import BaseDenoiser, Condition
from difflab.likelihood.solvers import (
    TABLEAUS,
    State,
    Stats,
    embedded_rk,
    exponential_multistep,
    multistep_grid,
)
from difflab.objectives.vlb import SIGMA_START, decoder_nll, start_time
from difflab.schedules import NoiseSchedule

__all__ = ["LikelihoodResult", "log_likelihood", "pf_ode_drift", "divergence",
           "probability_flow", "dequantize_uniform", "bits_per_dim", "SIGMA_START", "LAMBDA_FLOOR",
           "DEQUANTIZE", "PROBES", "BIN_WIDTH", "SOLVERS", "MULTISTEP_STEPS"]

LAMBDA_FLOOR = -40.0  # where the ODE ends on a zero-terminal-SNR schedule (alpha^2 ~ 4e-18)
DEQUANTIZE = (None, "uniform", "decoder")
MULTISTEP_STEPS = 30  # solver="multistep": the default number of steps
PROBES = ("rademacher", "gaussian")
BIN_WIDTH = 2.0 / 256  # Delta: the side of an 8-bit cell in [-1, 1]
#: the solvers of :func:`log_likelihood` (``solver=``): the adaptive pairs and the multistep
SOLVERS = (*TABLEAUS, "multistep")
F64 = torch.float64


# ------------------------------------------------------------------------------------------
# the probability-flow ODE and its divergence
# ------------------------------------------------------------------------------------------
def _rates(schedule: NoiseSchedule, t: float) -> tuple[float, float, float, float]:
    """(alpha, sigma, alpha', sigma') at time t, the derivatives by autograd in float64."""
    with torch.inference_mode(False), torch.enable_grad():
        tt = torch.tensor(float(t), dtype=F64, requires_grad=True)
        alpha, sigma = schedule.alpha_sigma(tt)
        d_alpha, d_sigma = (  # a constant (alpha = 1 in VE) has no graph: its rate is 0
            float(torch.autograd.grad(c, tt, retain_graph=True)[0]) if c.requires_grad else 0.0
            for c in (alpha, sigma))
    return float(alpha.detach()), float(sigma.detach()), d_alpha, d_sigma


def _lambda_coefficients(schedule: NoiseSchedule, lam: float) -> tuple[float, float, float]:
    """(t, d alpha / d lambda, d sigma / d lambda) at log-SNR ``lam``: t = t_from_log_snr(lam)
    and the rates alpha'(t) / lambda'(t), sigma'(t) / lambda'(t), with lambda'(t) =
    2 (alpha'/alpha - sigma'/sigma) from the same autograd pass (so that at a kink of a
    discrete schedule both are one-sided derivatives on the same side)."""
    with torch.no_grad():
        t = float(schedule.t_from_log_snr(torch.tensor(float(lam), dtype=F64)))
    alpha, sigma, d_alpha, d_sigma = _rates(schedule, t)
    d_lam = 2 * (d_alpha / alpha - d_sigma / sigma)
    return t, d_alpha / d_lam, d_sigma / d_lam


def _replicate_cond(cond: Any, batch: int, copies: int) -> Any:
    if cond is None or copies == 1:
        return cond
    return Condition.of(cond)[torch.arange(batch).repeat(copies)]


def pf_ode_drift(denoiser: BaseDenoiser, x: Tensor, t: float, cond: Any = None) -> Tensor:
    """f(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat: the probability-flow ODE's velocity
    (module docstring), in x's dtype. One denoiser call."""
    _, _, d_alpha, d_sigma = _rates(denoiser.schedule, t)
    pred = denoiser.predict(x, float(t), cond)
    return d_alpha * pred.x0 + d_sigma * pred.eps


def _drift_and_quadratic(denoiser: BaseDenoiser, x: Tensor, t: float, c_x0: float,
                         c_eps: float, cond: Any, probes: Tensor) -> tuple[Tensor, Tensor]:
    """f = c_x0 x0_hat(x, t) + c_eps eps_hat(x, t) and v_i^T (df/dx) v_i for each of the R
    probes v_i, shape (R, B, *x.shape[1:]).

    The batch is replicated R times (each copy sees one probe) and one backward pass of
    sum_i v_i . f(x_i) gives every J^T v_i: the network must treat batch rows independently
    (any network in eval mode does). One denoiser call on R * B rows."""
    R, B = probes.shape[0], x.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        x_rep = x.detach().clone().repeat(R, *([1] * (x.ndim - 1))).requires_grad_(True)
        pred = denoiser.predict(x_rep, float(t), _replicate_cond(cond, B, R))
        f = c_x0 * pred.x0 + c_eps * pred.eps
        v = probes.reshape(R * B, *x.shape[1:]).to(f.dtype)
        (vjp,) = torch.autograd.grad(f, x_rep, grad_outputs=v)
    quad = (vjp * v).reshape(R, B, -1).sum(-1)
    return f[:B].detach(), quad.detach()


def _basis(x: Tensor) -> Tensor:
    """The D unit vectors e_j for every sample: shape (D, B, *x.shape[1:])."""
    D = x[0].numel()
    eye = torch.eye(D, dtype=x.dtype, device=x.device).reshape(D, 1, *x.shape[1:])
    return eye.expand(D, *x.shape)


def divergence(denoiser: BaseDenoiser, x: Tensor, t: float, *, cond: Any = None,
               probes: Tensor | None = None) -> Tensor:
    """div_x f(x, t) of the probability-flow drift.

    ``probes=None``: the exact trace tr(df/dx), shape (B,) (D vector-Jacobian products,
    batched as one call on D * B rows). ``probes``: a (k, B, *x.shape[1:]) tensor of probe
    vectors v_i; returns the k quadratic forms v_i^T (df/dx) v_i, shape (k, B), whose mean over
    k is Hutchinson's estimate (unbiased for E[v v^T] = I)."""
    _, _, d_alpha, d_sigma = _rates(denoiser.schedule, t)
    if probes is None:
        return _drift_and_quadratic(denoiser, x, t, d_alpha, d_sigma, cond, _basis(x))[1].sum(0)
    if probes.ndim != x.ndim + 1 or tuple(probes.shape[1:]) != tuple(x.shape):
        raise ValueError(f"probes must have shape (k, *x.shape) = (k, *{tuple(x.shape)}), got "
                         f"{tuple(probes.shape)}")
    return _drift_and_quadratic(denoiser, x, t, d_alpha, d_sigma, cond, probes)[1]


def _draw_probes(kind: str, k: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """k probe vectors per sample, (k, *x.shape), drawn on the generator's device (CPU by
    default): Rademacher (+-1 with probability 1/2) or standard Gaussian."""
    device = generator.device if generator is not None else torch.device("cpu")
    shape = (k, *x.shape)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=device).to(x.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    return v.to(x.device)


# ------------------------------------------------------------------------------------------
# checks and conversions
# ------------------------------------------------------------------------------------------
def _check_tolerances(rtol: float, atol: float, max_steps: int) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError("x must be a floating-point tensor of shape (B, ...) with B >= 1, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} "
                         f"{tuple(getattr(x, 'shape', ()))}")


def _levels(x: Tensor, dequantize: str) -> Tensor:
    """k = (x + 1) 255 / 2, the 8-bit levels of x (float64, rounded). Raises ValueError unless
    every value of x lies in [-1, 1] on the 255-step grid (to 1% of a step)."""
    _check_batch(x)
    x64 = x.detach().to(F64)
    if not bool(torch.isfinite(x64).all()) or float(x64.min()) < -1 or float(x64.max()) > 1:
        raise ValueError(f"x must lie in [-1, 1] for dequantize={dequantize!r} (8-bit images "
                         f"scaled as 2 k / 255 - 1), got values in [{float(x64.min()):.4g}, "
                         f"{float(x64.max()):.4g}]")
    k = (x64 + 1) * 127.5
    off = float((k - k.round()).abs().max())
    if off > 0.01:
        raise ValueError("x must lie on the 8-bit grid 2 k / 255 - 1 (k = 0 .. 255) for "
                         f"dequantize={dequantize!r}; a value is {off:.3g} of a step off the "
                         "grid")
    return k.round()


def _noise(kind: str, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) or N(0, 1) noise of x's shape in float64, drawn on the generator's device."""
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(x.shape, generator=generator, device=device, dtype=F64).to(x.device)


def dequantize_uniform(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """y = 2 (k + u) / 256 - 1 with k = (x + 1) 255 / 2 the 8-bit levels of x and
    u ~ U[0, 1)^D drawn from ``generator`` (module docstring), in float64. Raises ValueError
    unless every value of x lies in [-1, 1] on the 255-step grid (to 1% of a step)."""
    k = _levels(x, "uniform")
    return (k + _noise("uniform", x, generator)) * BIN_WIDTH - 1


def _dequantize(x: Tensor, dequantize: str | None, sigma_tilde: float,
                generator: torch.Generator | None) -> tuple[Tensor, Tensor | float]:
    """The point y whose density the ODE evaluates and the term added to log p(y) (module
    docstring): uniform, y = 2 (k + u) / 256 - 1 and D log(2 / 256); decoder, y = x +
    sigma~_0 eps_0 and log p(k | y) - log q(y | x) per sample; None, x and 0."""
    if dequantize == "uniform":
        return dequantize_uniform(x, generator), x[0].numel() * math.log(BIN_WIDTH)
    if dequantize == "decoder":
        x64 = _levels(x, "decoder") / 127.5 - 1
        eps_0 = _noise("gaussian", x, generator)
        gamma_0 = torch.tensor(2 * math.log(sigma_tilde), dtype=F64, device=x.device)
        term = decoder_nll(x64, eps_0, gamma_0, "gaussian") - decoder_nll(x64, eps_0, gamma_0,
                                                                           "vdm")
        return x64 + sigma_tilde * eps_0, term
    return x.detach().to(F64), 0.0


def bits_per_dim(log_likelihood: Tensor, dim: int) -> Tensor:
    """-log_likelihood / (D ln 2): nats per sample to bits per dimension. For a dequantised
    8-bit likelihood (which includes D log(2/256)) this is -log p(y) / (D ln 2) + 7."""
    return -log_likelihood / (dim * math.log(2))


def _log_snr(schedule: NoiseSchedule, t: float) -> float:
    with torch.no_grad():
        return float(schedule.log_snr(float(t)))


def _end(schedule: NoiseSchedule) -> tuple[float, float]:
    """(lambda, t) where the likelihood's ODE ends: t = 1, or lambda = LAMBDA_FLOOR on a
    zero-terminal-SNR schedule (lambda(1) = -inf)."""
    lam_1 = _log_snr(schedule, 1.0)
    if lam_1 >= LAMBDA_FLOOR:
        return lam_1, 1.0
    with torch.no_grad():
        return LAMBDA_FLOOR, float(schedule.t_from_log_snr(LAMBDA_FLOOR))


# ------------------------------------------------------------------------------------------
# the front doors
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LikelihoodResult:
    """The log-likelihood of a batch and its parts (all (B,) float64 tensors in nats unless
    said otherwise):

        log_likelihood = prior + integral + rescale + dequantization

    * ``prior``          log N(x_1; 0, prior_std^2 I), the prior's log-density at the ODE's end
    * ``integral``       int_{t_min}^{t_max} div f dt (mean over the probes; exact with
                         ``exact_divergence``); ``integral_stderr`` its standard error over the
                         probes (0 when exact, NaN with one probe)
    * ``rescale``        D log alpha(t_min) (float): reading p_{t_min} in the data's scale
    * ``dequantization`` D log(2 / 256) (float) with uniform dequantisation; with the decoder
                         the (B,) tensor log p(k | y) - log q(y | x); else 0
    * ``log_density``    prior + integral + rescale: log p(x) of the continuous point ``x``
    * ``bits_per_dim``   -log_likelihood / (D ln 2) (with dequantisation: bits per dimension of
                         the 8-bit data, for uniform -log p(y) / (D ln 2) + 7; module docstring)

    ``x`` is the point whose density was evaluated (the dequantised y, float64), ``x_1`` the
    ODE's end point at ``t_max`` (1, or lambda = -40 on a zero-terminal-SNR schedule), ``t_min``
    its start; ``nfe`` counts denoiser calls (each on k x B rows: k probes, or D with the exact
    divergence), ``steps`` / ``rejected`` the solver's accepted and rejected steps (the
    multistep solver: its steps, none rejected).
    """

    log_likelihood: Tensor
    bits_per_dim: Tensor
    prior: Tensor
    integral: Tensor
    integral_stderr: Tensor
    rescale: float
    dequantization: Tensor | float
    x: Tensor
    x_1: Tensor
    t_min: float
    t_max: float
    dim: int
    nfe: int
    steps: int
    rejected: int

    @property
    def log_density(self) -> Tensor:
        """log p(x) of the continuous point ``x``: prior + integral + rescale."""
        return self.prior + self.integral + self.rescale


def log_likelihood(denoiser: BaseDenoiser, x: Tensor, *, cond: Any = None,
                   exact_divergence: bool = False, probes: int = 1, probe: str = "rademacher",
                   rtol: float = 1e-5, atol: float = 1e-5,
                   generator: torch.Generator | None = None, dequantize: str | None = None,
                   t_min: float | None = None, max_steps: int = 10_000,
                   solver: str = "dopri5", steps: int = MULTISTEP_STEPS) -> LikelihoodResult:
    """log p(x) of a denoiser's model through the probability-flow ODE (module docstring).

    Args:
        denoiser: any denoiser (any network, parameterisation and schedule; guidance
            transforms too); its network must treat batch rows independently (eval mode).
        x: (B, ...) data. With ``dequantize``: 8-bit images 2 k / 255 - 1 in [-1, 1].
        cond: None, class labels or a Condition, passed to every denoiser call.
        exact_divergence: the trace by D autograd products (small D) instead of Hutchinson.
        probes: k >= 1 Hutchinson probes per sample (fixed over the solve).
        probe: "rademacher" or "gaussian".
        rtol, atol: the adaptive solvers' tolerances (> 0).
        generator: draws the dequantisation noise (first), then the probes.
        dequantize: None (x is continuous data), "uniform" or "decoder" (module docstring).
        t_min: where the ODE starts; default 0 if sigma(0) > 0, else sigma~(t_min) = 1e-3.
        max_steps: the solver's limit on accepted + rejected steps.
        solver: the adaptive pair, "dopri5" (Dormand-Prince 5(4), 6 calls a step) or "bosh3"
            (Bogacki-Shampine 3(2), 3 calls a step: fewer calls at loose tolerances), or
            "multistep" (``steps`` fixed steps, steps + 1 calls, no error control; module
            docstring).
        steps: the multistep solver's steps (>= 2).

    Returns:
        A :class:`LikelihoodResult`: nats per sample, bits per dimension and the parts.
    """
    _check_batch(x)
    _check_tolerances(rtol, atol, max_steps)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver={solver!r}; valid: {list(SOLVERS)}")
    if solver == "multistep" and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 2):
        raise ValueError(f"steps must be an integer >= 2 for solver='multistep', got {steps!r}")
    if dequantize not in DEQUANTIZE:
        raise ValueError(f"unknown dequantize={dequantize!r}; valid: {list(DEQUANTIZE)}")
    if not exact_divergence:
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes must be an integer >= 1 (Hutchinson probes per sample), "
                             f"got {probes!r}; or pass exact_divergence=True")
        if probe not in PROBES:
            raise ValueError(f"unknown probe={probe!r}; valid: {list(PROBES)}")
    schedule = denoiser.schedule
    if t_min is None:
        t_min = start_time(schedule)
    t_min = float(t_min)
    if not 0 <= t_min < 1:
        raise ValueError(f"t_min must lie in [0, 1), got {t_min}")
    alpha_min, sigma_min, _, _ = _rates(schedule, t_min)
    if not (sigma_min > 0 and alpha_min > 0):
        raise ValueError(f"t_min={t_min} has sigma = {sigma_min:.3g}, alpha = {alpha_min:.3g}; "
                         "the denoiser needs sigma > 0 and alpha > 0 there: pass a larger t_min "
                         "or leave it out")

    B, D = x.shape[0], x[0].numel()
    net_dtype = x.dtype
    y, dequantization = _dequantize(x, dequantize, sigma_min / alpha_min, generator)
    if exact_divergence:
        V = _basis(x.to(net_dtype))
    else:
        V = _draw_probes(probe, probes, x.to(net_dtype), generator)

    def drift(x_t: Tensor, t: float, c_x0: float, c_eps: float) -> tuple[Tensor, Tensor]:
        """c_x0 x0_hat + c_eps eps_hat and its v^T J v per probe column, (B, 1 | k)."""
        f, quad = _drift_and_quadratic(denoiser, x_t.to(net_dtype), t, c_x0, c_eps, cond, V)
        rate = quad.sum(0, keepdim=True) if exact_divergence else quad  # (1 | k, B)
        return f.to(F64), rate.to(F64).T

    columns = 1 if exact_divergence else probes
    lam_start, (lam_end, t_max) = _log_snr(schedule, t_min), _end(schedule)
    if solver == "multistep":
        ls = multistep_grid(lam_start / 2, lam_end / 2, steps)
        x_1, integrals, nfe = exponential_multistep(
            schedule, lambda x_t, t: drift(x_t, t, 1.0, 0.0), alpha_min * y, ls)
        stats = Stats(nfe, steps, 0)
    else:
        def fun(lam: float, state: State) -> State:  # d(x, integral) / d lambda
            return drift(state[0], *_lambda_coefficients(schedule, lam))

        state0 = (alpha_min * y, torch.zeros(B, columns, dtype=F64, device=x.device))
        (x_1, integrals), stats = embedded_rk(fun, lam_start, lam_end, state0, rtol, atol,
                                               max_steps, solver)

    prior_std = schedule.prior_std(t_max)
    flat = x_1.reshape(B, -1)
    prior = (-0.5 * flat.pow(2).sum(1) / prior_std**2
             - 0.5 * D * math.log(2 * math.pi * prior_std**2))
    integral = integrals.mean(1)
    if exact_divergence:
        stderr = torch.zeros_like(integral)
    elif columns == 1:
        stderr = torch.full_like(integral, math.nan)
    else:
        stderr = integrals.std(1) / math.sqrt(columns)
    rescale = D * math.log(alpha_min)
    total = prior + integral + rescale + dequantization
    return LikelihoodResult(
        log_likelihood=total, bits_per_dim=bits_per_dim(total, D), prior=prior,
        integral=integral, integral_stderr=stderr, rescale=rescale,
        dequantization=dequantization, x=y, x_1=x_1, t_min=t_min, t_max=t_max, dim=D,
        nfe=stats.nfe,
        steps=stats.steps, rejected=stats.rejected)


def probability_flow(denoiser: BaseDenoiser, x: Tensor, t_start: float, t_end: float, *,
                     cond: Any = None, rtol: float = 1e-5, atol: float = 1e-5,
                     max_steps: int = 10_000) -> Tensor:
    """x(t_end) of the probability-flow ODE dx/dt = f(x, t) from x(t_start) = ``x``, by the
    adaptive Dormand-Prince 5(4) solver (either direction; both times need sigma > 0 unless
    the denoiser is defined at sigma = 0). A reference solution for the samplers, or the
    encoding x -> x(1) of the likelihood. ``x`` is *not* scaled by the prior's std."""
    _check_batch(x)
    _check_tolerances(rtol, atol, max_steps)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not 0 <= float(value) <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    schedule, dtype = denoiser.schedule, x.dtype
    lams = [max(_log_snr(schedule, t), LAMBDA_FLOOR) for t in (t_start, t_end)]
    if not all(math.isfinite(lam) for lam in lams):
        raise ValueError(f"t_start={t_start} or t_end={t_end} has sigma = 0, where eps_hat "
                         "is 0 / 0; stop at a small t > 0")

    def fun(lam: float, state: State) -> State:  # dx / d lambda
        t, c_x0, c_eps = _lambda_coefficients(schedule, lam)
        with torch.no_grad():
            pred = denoiser.predict(state[0].to(dtype), t, cond)
            return ((c_x0 * pred.x0 + c_eps * pred.eps).to(F64),)

    (x_end,), _ = embedded_rk(fun, lams[0], lams[1], (x.detach().to(F64),), rtol, atol,
                               max_steps)
    return x_end.to(dtype)
