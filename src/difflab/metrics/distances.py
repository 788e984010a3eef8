"""Distances between two sets of features: FID, KID, k-NN precision / recall.

All functions take feature matrices (N, d) (any float dtype; accumulation is float64) and
work in batches, so that 10^4 - 10^5 samples fit in memory.

* FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."): the Frechet
  (2-Wasserstein) distance between Gaussians fitted to the features,

      FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

  tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(S_1^(1/2) S_2 S_1^(1/2))), because S_1 S_2 is
  similar to the symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2). Both square roots use a
  symmetric eigendecomposition in float64 (no scipy, no complex parts to discard).
* KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimator of MMD^2 with
  the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets,

      MMD^2_u = 1/(m(m-1)) sum_{i!=j} k(x_i, x_j) + 1/(m(m-1)) sum_{i!=j} k(y_i, y_j)
                - 2/m^2 sum_{i,j} k(x_i, y_j).

* Improved precision and recall (Kynkaanniemi et al. 2019): the manifold of a set is the union
  of balls around each of its points with radius = distance to its k-th nearest neighbour
  (k = 3). precision = fraction of generated points inside the real manifold; recall =
  fraction of real points inside the generated manifold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GaussianStats",
    "gaussian_stats",
    "sqrtm_psd",
    "trace_sqrt_product",
    "frechet_distance",
    "fid_from_features",
    "mmd2_unbiased",
    "kernel_inception_distance",
    "knn_radii",
    "manifold_coverage",
    "precision_recall",
]


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set (float64), and the number of samples."""

    mu: Tensor
    sigma: Tensor
    n: int


def gaussian_stats(features: Tensor, batch_size: int = 4096) -> GaussianStats:
    """Sample mean and unbiased covariance (divisor N - 1) of (N, d) features, in float64.

    Accumulated in batches around a shift (the first batch's mean) for numerical stability.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, d), got {tuple(features.shape)}")
    n, d = features.shape
    shift = features[:batch_size].to(torch.float64).mean(0)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, batch_size):
        f = features[i:i + batch_size].to(torch.float64) - shift
        s1 += f.sum(0)
        s2 += f.T @ f
    mean_c = s1 / n
    sigma = (s2 - n * torch.outer(mean_c, mean_c)) / (n - 1)
    return GaussianStats(mu=mean_c + shift, sigma=0.5 * (sigma + sigma.T), n=n)


def sqrtm_psd(S: Tensor) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix, via eigh (float64).

    Eigenvalues below zero (round-off) are clipped to 0.
    """
    S = S.to(torch.float64)
    lam, Q = torch.linalg.eigh(0.5 * (S + S.T))
    return (Q * lam.clamp_min(0).sqrt()) @ Q.T


def trace_sqrt_product(S1: Tensor, S2: Tensor) -> Tensor:
    """tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(S_1^(1/2) S_2 S_1^(1/2)))  (float64)."""
    A = sqrtm_psd(S1)
    M = A @ S2.to(torch.float64) @ A
    lam = torch.linalg.eigvalsh(0.5 * (M + M.T))
    return lam.clamp_min(0).sqrt().sum()


def frechet_distance(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor) -> float:
    """FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))  (Heusel et al. 2017).

    Rounding can make the result a tiny negative number for identical inputs; it is clipped to 0.
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    S1, S2 = S1.to(torch.float64), S2.to(torch.float64)
    if mu1.shape != mu2.shape or S1.shape != S2.shape or S1.shape != (mu1.numel(),) * 2:
        raise ValueError(f"incompatible statistics: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(S1.shape)} vs {tuple(S2.shape)}")
    diff = mu1 - mu2
    fid = diff @ diff + S1.trace() + S2.trace() - 2 * trace_sqrt_product(S1, S2)
    return max(float(fid), 0.0)


def fid_from_features(f1: Tensor, f2: Tensor) -> float:
    """FID between two feature sets (N1, d) and (N2, d)."""
    a, b = gaussian_stats(f1), gaussian_stats(f2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 between two equal-size samples x, y (m, d) under the cubic kernel."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"need two samples of equal size m >= 2, got {x.shape[0]}, {y.shape[0]}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())


def kernel_inception_distance(f_real: Tensor, f_fake: Tensor, subsets: int = 50,
                              subset_size: int = 1000,
                              generator: torch.Generator | None = None) -> tuple[float, float]:
    """KID: mean and standard deviation of MMD^2_u over ``subsets`` random subsets.

    Each subset draws ``m = min(subset_size, N_real, N_fake)`` points from each set without
    replacement. The mean is an unbiased estimate of MMD^2 (it can be negative when the two
    distributions are equal); the returned spread is the standard deviation across subsets
    (torch-fidelity's ``kernel_inception_distance_std``); the standard error of the mean is
    at most ``std / sqrt(subsets)`` when the subsets are nearly independent.
    """
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    m = min(subset_size, f_real.shape[0], f_fake.shape[0])
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    values = []
    for _ in range(subsets):
        i = torch.randperm(f_real.shape[0], generator=generator)[:m]
        j = torch.randperm(f_fake.shape[0], generator=generator)[:m]
        values.append(mmd2_unbiased(f_real[i], f_fake[j]))
    v = torch.tensor(values, dtype=torch.float64)
    std = float(v.std()) if subsets > 1 else float("nan")
    return float(v.mean()), std


def knn_radii(features: Tensor, k: int = 3, batch_size: int = 2048) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    f = features.to(torch.float64)
    radii = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, batch_size):
        d = torch.cdist(f[i:i + batch_size], f)
        # the k+1 smallest include the point itself at distance 0
        radii[i:i + batch_size] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def manifold_coverage(manifold: Tensor, radii: Tensor, queries: Tensor,
                      batch_size: int = 2048) -> float:
    """Fraction of ``queries`` inside the union of balls B(manifold_i, radii_i) (boundary in)."""
    m = manifold.to(torch.float64)
    inside = 0
    for i in range(0, queries.shape[0], batch_size):
        d = torch.cdist(queries[i:i + batch_size].to(torch.float64), m)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(f_real: Tensor, f_fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls (k = 3)."""
    precision = manifold_coverage(f_real, knn_radii(f_real, k), f_fake)
    recall = manifold_coverage(f_fake, knn_radii(f_fake, k), f_real)
    return precision, recall


def _check_finite(name: str, f: Tensor) -> None:
    if not torch.isfinite(f).all():
        bad = int((~torch.isfinite(f)).any(dim=1).sum())
        raise ValueError(f"{name}: {bad} feature rows contain NaN/inf (check the images)")


def kid_standard_error(std: float, subsets: int) -> float:
    """std / sqrt(subsets): the standard error of the subset mean for independent subsets."""
    return std / math.sqrt(subsets)
