"""The default call's plan kept between runs: a command probes a model once, not every run.

``difflab sample`` / ``difflab eval`` on a model with no stored fit run the plan a probe of the
model picks (:func:`difflab.samplers.default_plan`; :mod:`difflab.samplers.probe`). The probe
costs a fine solve and the candidates' rollouts (~20 s on 2 CPU cores for a 28x28 U-Net, far
more for a large latent model) and the library keeps its result only in memory, so each run of
a command paid it again. :func:`default_plan` keeps the plan in a small JSON file in the user's
cache folder and reads it back on the next run, when the model and everything else the probe's
choice depends on are the same:

* **the model's behaviour**, not its files: the guided denoiser's data predictions on two of
  the probe's own noises at six times from t = 1 to 0.02 (12 network evaluations), projected
  on fixed directions and rounded to four digits, and its schedule's log-SNR at 65 times. Any
  change to the weights (training resumed, another EMA), the guidance (its weight, interval,
  classifier) or the schedule changes them; a model saved elsewhere or converted keeps them.
  (Rounding makes a different thread count a cache miss only rarely; a miss costs one probe.)
* the probe's condition rows (the first :data:`~difflab.samplers.probe.PROBE_DRAWS` rows of
  the run's condition, as the probe cycles them), the image shape, dtype, device type and
  step count;
* the probe's code: the source of :mod:`difflab.samplers`, so a new difflab version probes
  afresh.

The key is the SHA-256 of all of it; the file, ``plans/<key>.json``, holds the plan (sampler,
grid, final step) and what it was made for. The folder is ``$DIFFLAB_CACHE/plans``
(``DIFFLAB_CACHE=off``: no cache), else ``$XDG_CACHE_HOME/difflab/plans``, else
``~/.cache/difflab/plans``; deleting it only makes the next run probe again. A file that
cannot be read is ignored and the model probed; a folder that cannot be written is skipped
silently: the cache never stops a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import difflab.files as files

if TYPE_CHECKING:
    from difflab.denoiser import BaseDenoiser
    from difflab.samplers import SolverPlan

__all__ = ["CACHE_ENV", "FORMAT", "plan_cache_dir", "plan_key", "default_plan"]

CACHE_ENV = "DIFFLAB_CACHE"
FORMAT = "difflab-plan-1"
_OFF = ("", "0", "off", "none", "false")
_TIMES = (1.0, 0.8, 0.6, 0.4, 0.2, 0.02)  # where the model's behaviour is read
_DIRECTIONS = 4  # fixed random directions each prediction is projected on


def plan_cache_dir() -> Path | None:
    """The folder of the kept plans (module docstring), or None when ``DIFFLAB_CACHE=off``."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser() / "plans"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "difflab" / "plans"


def _digits(values: Tensor) -> list[str]:
    return [f"{v:.4e}" for v in values.double().flatten().tolist()]


def _code_digest() -> str:
    import difflab.samplers as samplers

    h = hashlib.sha256()
    for path in sorted(Path(samplers.__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@torch.no_grad()
def plan_key(denoiser: BaseDenoiser, steps: int, noise: Tensor, cond: Any = None) -> str:
    """The cache key of the default call's plan for ``denoiser`` at ``steps`` steps on images
    shaped like ``noise``'s, with condition ``cond`` (module docstring)."""
    from difflab.samplers.probe import (
        PROBE_DRAWS,
        PROBE_SEED,
        condition_fingerprint,
        probe_condition,
    )

    shape = tuple(noise.shape[1:])
    device, dtype = noise.device, noise.dtype
    pcond = probe_condition(cond, PROBE_DRAWS)
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    u = torch.randn(_DIRECTIONS, x[0].numel(), generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=1, keepdim=True)
    x = x.to(device=device, dtype=dtype)
    c2 = None if pcond is None else pcond[:2]
    schedule = denoiser.schedule
    behaviour = []
    for t in _TIMES:  # inputs at the scale of x_t for unit-variance data
        x0 = denoiser.predict(x * float(schedule.prior_std(t)), t, c2).x0
        x0 = x0.detach().double().cpu().flatten(1)
        behaviour += _digits(torch.cat([x0 @ u.T, x0.pow(2).mean(1, keepdim=True)], 1))
    t_grid = torch.linspace(0, 1, 65, dtype=torch.float64)[1:-1]
    record = {"format": FORMAT, "steps": int(steps), "shape": shape, "dtype": str(dtype),
              "device": device.type, "cond": condition_fingerprint(pcond),
              "log_snr": _digits(schedule.log_snr(t_grid)), "behaviour": behaviour,
              "code": _code_digest()}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=repr).encode()).hexdigest()


def _read(path: Path) -> SolverPlan | None:
    from difflab.samplers import SolverPlan

    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            return None
        p = d["plan"]
        return SolverPlan(p["sampler"], tuple(p["ts"]), final=p.get("final"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def default_plan(denoiser: BaseDenoiser, steps: int, noise: Tensor,
                 cond: Any = None) -> SolverPlan | None:
    """:func:`difflab.samplers.default_plan` (the probe's plan, or None outside the probe's
    range), read from the cache when this model was probed before for the same run
    (module docstring), else probed and written there."""
    from difflab.samplers import default_plan as probe_default_plan
    from difflab.samplers import probes

    folder = plan_cache_dir()
    if folder is None or not probes(denoiser, steps):
        return probe_default_plan(denoiser, steps, noise, cond)
    path = folder / f"{plan_key(denoiser, steps, noise, cond)}.json"
    plan = _read(path)
    if plan is not None and len(plan.ts) == steps + 1:
        return plan
    plan = probe_default_plan(denoiser, steps, noise, cond)
    if plan is not None:
        entry = {"format": FORMAT, "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "steps": int(steps), "shape": list(noise.shape[1:]),
                 "plan": {"sampler": plan.sampler, "ts": list(plan.ts), "final": plan.final}}
        try:
            files.write_json(path, entry)
        except OSError:
            pass  # a cache that cannot be written is no reason to stop a run
    return plan
