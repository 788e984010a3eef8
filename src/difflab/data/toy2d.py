"""2-D toy data sets for fast experiments with small MLP denoisers.

* ``ring``: a mixture of k Gaussians on a circle, drawn from
  :meth:`difflab.toy.GaussianMixture.ring`, so the exact denoiser of the same data is
  available (``GaussianMixture.ring(k, radius, std).denoiser(schedule)``).
* ``moons``: two interleaving half circles (as scikit-learn's make_moons), centred at the
  origin: upper (cos u, sin u) - (0.5, 0.25), lower (1 - cos u, 0.5 - sin u) - (0.5, 0.25),
  u ~ U[0, pi], plus N(0, noise^2) per coordinate.
* ``swiss_roll``: (u cos u, u sin u) / 5 with u = 1.5 pi (1 + 2 r), r ~ U[0, 1], plus
  N(0, noise^2) (the 2-D swiss roll of Sohl-Dickstein et al. 2015).

All are float32 tensors of shape (n, 2); ``return_labels=True`` also returns the mixture
component (ring), the moon (moons) or None (swiss_roll).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.toy import GaussianMixture

__all__ = ["TOY2D_NAMES", "toy2d"]

TOY2D_NAMES = ("ring", "moons", "swiss_roll")


def toy2d(name: str, n: int, generator: torch.Generator | None = None, *,
          return_labels: bool = False, **params: float) -> Tensor | tuple[Tensor, Tensor | None]:
    """n samples of a 2-D toy distribution (see the module docstring for the formulas).

    Params: ring: ``k`` (8), ``radius`` (2.0), ``std`` (0.2); moons: ``noise`` (0.05);
    swiss_roll: ``noise`` (0.05).
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    labels: Tensor | None
    if name == "ring":
        mix = GaussianMixture.ring(int(params.pop("k", 8)), float(params.pop("radius", 2.0)),
                                   float(params.pop("std", 0.2)))
        x, labels = mix.sample(n, generator)
    elif name == "moons":
        noise = float(params.pop("noise", 0.05))
        labels = (torch.rand(n, generator=generator) < 0.5).long()
        u = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        upper = torch.stack([u.cos(), u.sin()], 1)
        lower = torch.stack([1 - u.cos(), 0.5 - u.sin()], 1)
        x = torch.where(labels[:, None] == 0, upper, lower) - torch.tensor([0.5, 0.25])
        x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    elif name == "swiss_roll":
        noise = float(params.pop("noise", 0.05))
        u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
        x = torch.stack([u * u.cos(), u * u.sin()], 1) / 5
        x = x + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)
        labels = None
    else:
        raise ValueError(f"unknown toy data set {name!r}; valid: {list(TOY2D_NAMES)}")
    if params:
        raise ValueError(f"unknown parameters for {name!r}: {sorted(params)}")
    x = x.to(torch.float32)
    return (x, labels) if return_labels else x
