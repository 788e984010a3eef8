"""Consistency objectives (issue #20): distillation, improved training, easy tuning.

All three train a consistency model ``"net"`` (a Denoiser with the
:class:`~difflab.denoiser.parameterization.Consistency` parameterisation) to agree with itself
along probability-flow ODE trajectories (the math: :mod:`difflab.denoiser.consistency`),

    L = E[ lambda d( f_theta(x_{t'}, t'),  sg[f_theta-(x_t, t)] ) ],      t < t',

and differ in the pair and the target theta-:

* :class:`ConsistencyDistillation` (Song et al. 2023, Alg. 2): x_t is one step of a frozen
  teacher's ODE solver from x_{t'} (``teacher_step``, e.g. ``functools.partial(samplers.step,
  sampler="heun")``, passed in: the objectives layer sits below the samplers); theta- an EMA
  of theta (``"target"``, decay ``train.ema_decay``, 0.95 in the paper's CIFAR-10 runs); N
  fixed Karras points; d = squared L2 (or pseudo-Huber).  With ``teacher_guide`` (e.g.
  classifier-free guidance at scale w) the student learns the guided teacher's ODE.
* :class:`ConsistencyTraining` (Song & Dhariwal 2023, improved): the same noise at both
  times, no teacher, theta- = theta (stop-gradient, no EMA teacher), N(k) doubling from 10 to
  1280 over ``total_steps``, lognormal pair index, weight 1 / (sigma_{i+1} - sigma_i),
  pseudo-Huber d.
* :class:`EasyConsistencyTuning` (Geng et al. 2024): as consistency training but with sigma
  drawn continuously (lognormal) and r(sigma) < sigma whose gap dt / sigma halves every
  ``iterations_per_stage`` steps, starting from a trained diffusion model's weights; weight
  1 / (sigma - r), pseudo-Huber d.

N(k) and the ECT stage depend on the optimizer step: these objectives set ``uses_step`` and
the trainer passes ``prepare(batch, generator, step=k)`` (k the step counter a checkpoint
restores, so a resumed run draws exactly what an uninterrupted one does).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from difflab.denoiser import BaseDenoiser, Condition, Denoiser
from difflab.denoiser import consistency as C
from difflab.denoiser.parameterization import Consistency, Parameterization
from difflab.objectives.core import Objective
from difflab.schedules import NoiseSchedule

__all__ = ["ConsistencyDistillation", "ConsistencyTraining", "EasyConsistencyTuning",
           "ConsistencyObjective", "TeacherStepFn"]

#: teacher_step(denoiser, x, t_from, t_to, *, cond) -> x at t_to (difflab.samplers.step)
TeacherStepFn = Callable[..., Tensor]


def _times(schedule: NoiseSchedule, sigmas: Tensor) -> Tensor:
    """Schedule times of VE noise levels sigma~ (float64); sigma~ <= 0 maps to t = 0."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    t = schedule.t_from_sigma_ratio(sigmas.clamp(min=1e-12)).to(torch.float64)
    return torch.where(sigmas > 0, t.clamp(0.0, 1.0), torch.zeros_like(t))


class ConsistencyObjective(Objective):
    """What the three consistency objectives share: the student denoiser, the condition
    (class labels when ``conditional``; no condition dropout), the distance."""

    kind = "consistency"
    uses_step = True

    def __init__(self, schedule: NoiseSchedule, parameterization: Consistency, *,
                 distance: str = "pseudo_huber", huber_c: float | None = None,
                 conditional: bool = False):
        if not isinstance(parameterization, Consistency):
            raise ValueError(f"a consistency objective trains a Consistency parameterisation, "
                             f"got {parameterization!r}")
        if distance not in C.DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; valid: {list(C.DISTANCES)}")
        self.schedule, self.parameterization = schedule, parameterization
        self.distance, self.huber_c = distance, huber_c
        self.conditional = bool(conditional)
        self.fields = ("image", "label") if self.conditional else ("image",)
        self._dens: dict[int, tuple[nn.Module, BaseDenoiser]] = {}
        self.sigma_min = parameterization.sigma_min
        self.sigma_top = float(schedule.sigma_max_ratio())

    def denoiser(self, net: nn.Module) -> Denoiser:
        """``net`` as the consistency model (its ``predict(x, t).x0`` is f)."""
        return self._cached(net, lambda m: Denoiser(m, self.schedule, self.parameterization))

    def _cached(self, net: nn.Module, build: Callable[[nn.Module], BaseDenoiser]) -> Any:
        hit = self._dens.get(id(net))
        if hit is None or hit[0] is not net:
            hit = (net, build(net))
            self._dens[id(net)] = hit
        return hit[1]

    def _cond(self, batch: dict[str, Tensor], out: dict[str, Any]) -> dict[str, Any]:
        if self.conditional:
            out["cond"] = Condition.of(batch["label"])
        return out

    def _loss(self, f_net: nn.Module, f_target: nn.Module, batch: dict[str, Any],
              x_next: Tensor, x_n: Tensor) -> tuple[Tensor, dict[str, Any]]:
        cond = batch.get("cond")
        student, target = self.denoiser(f_net), self.denoiser(f_target)
        per = C.consistency_loss(
            lambda x, t: student.predict(x, t, cond).x0,
            lambda x, t: target.predict(x, t, cond).x0,
            x_next, batch["t_next"], x_n, batch["t_n"], kind=self.distance, c=self.huber_c,
            weight=batch.get("weight"))
        return per.mean(), {}

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "distance": self.distance, "conditional": self.conditional}


class ConsistencyDistillation(ConsistencyObjective):
    """Consistency distillation, Song et al. 2023, Alg. 2 (module docstring).

    Args:
        schedule, parameterization: the student's (the teacher's schedule; a Consistency
            parameterisation, ``inner`` = the teacher's to start from its weights).
        teacher_step: ``teacher_step(teacher, x, t_from, t_to, cond=...)``, one ODE-solver step
            (``functools.partial(difflab.samplers.step, sampler="heun")``).
        teacher_parameterization: the frozen ``"teacher"`` network's parameterisation.
        teacher_guide: a transform of the teacher denoiser (classifier-free guidance), or None.
        N: discretisation points (Karras, rho) between sigma_min and ``sigma_max`` (80, the
            paper's; 18 points as on CIFAR-10), plus the schedule's largest sigma~ (t = 1,
            where one-step sampling starts) when that lies above.
        distance: "l2" (the paper's with LPIPS replaced), "l1" or "pseudo_huber".
        index_groups: None draws the pair's index n for every row (the paper); k draws k
            indices per batch, each shared by a block of rows, so the teacher's solver runs
            on k sub-batches instead of up to N - 1 (the same expected loss; on a CPU the
            teacher step then costs about one batched call per solver stage).
    """

    trainable = ("net",)
    frozen = ("teacher",)
    ema = ("net",)
    ema_targets = {"target": "net"}

    def __init__(self, schedule: NoiseSchedule, parameterization: Consistency,
                 teacher_step: TeacherStepFn, teacher_parameterization: Parameterization, *,
                 teacher_guide: Callable[[BaseDenoiser], BaseDenoiser] | None = None,
                 N: int = 18, rho: float = 7.0, sigma_max: float = 80.0, distance: str = "l2",
                 huber_c: float | None = None, conditional: bool = False,
                 index_groups: int | None = None):
        super().__init__(schedule, parameterization, distance=distance, huber_c=huber_c,
                         conditional=conditional)
        self.teacher_step, self.teacher_parameterization = teacher_step, teacher_parameterization
        self.teacher_guide = teacher_guide
        self.N, self.rho = int(N), float(rho)
        self.index_groups = None if index_groups is None else int(index_groups)
        self.sigma_max = min(float(sigma_max), self.sigma_top)
        sigmas = C.karras_sigmas(self.N, self.sigma_min, self.sigma_max, self.rho)
        if self.sigma_top > self.sigma_max * 1.01:  # one more pair up to t = 1 (1-step start)
            sigmas = torch.cat([sigmas, sigmas.new_tensor([self.sigma_top])])
        self.sigmas, self.ts = sigmas, _times(schedule, sigmas)

    def teacher(self, net: nn.Module) -> BaseDenoiser:
        """The frozen teacher network as a (guided) denoiser."""
        def build(m: nn.Module) -> BaseDenoiser:
            den = Denoiser(m, self.schedule, self.teacher_parameterization)
            return self.teacher_guide(den) if self.teacher_guide is not None else den
        return self._cached(net, build)

    def draw_pairs(self, shape: tuple[int, ...], generator: torch.Generator
                   ) -> dict[str, Tensor]:
        """n ~ U{1..N-1} per row (the pair t_n < t_{n+1}) and z of ``shape``, in this order."""
        B = shape[0]
        groups = B if self.index_groups is None else min(B, self.index_groups)
        n = torch.randint(0, len(self.sigmas) - 1, (groups,), generator=generator)
        n = n.repeat_interleave(-(-B // groups))[:B] if groups < B else n
        noise = torch.randn(shape, generator=generator)
        return {"noise": noise, "t_n": self.ts[n], "t_next": self.ts[n + 1]}

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator, *,
                step: int = 0) -> dict[str, Any]:
        x0 = batch["image"]
        return self._cond(batch, {"x0": x0, **self.draw_pairs(tuple(x0.shape), generator)})

    def distill(self, modules: Mapping[str, nn.Module], teacher: BaseDenoiser, x0: Tensor,
                batch: dict[str, Any], teacher_cond: Any = None
                ) -> tuple[Tensor, dict[str, Any]]:
        """The loss of the pair: x_{t_{n+1}} = alpha x0 + sigma z, x^_{t_n} one step of
        ``teacher`` (conditioned on ``teacher_cond``), the student and target on
        ``batch["cond"]``."""
        with warnings.catch_warnings():  # Heun's "large sigma ratio" note on the t = 1 pair
            warnings.simplefilter("ignore", UserWarning)
            x_next, x_n = C.distillation_pair(
                self.schedule,
                lambda x, a, b: self.teacher_step(teacher, x, a, b, cond=teacher_cond),
                x0, batch["noise"], batch["t_n"], batch["t_next"])
        return self._loss(modules["net"], modules["target"], batch, x_next, x_n)

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        return self.distill(modules, self.teacher(modules["teacher"]), batch["x0"], batch,
                            batch.get("cond"))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": "cd", "N": self.N, "rho": self.rho,
                "sigma_max": self.sigma_max, "index_groups": self.index_groups}


class ConsistencyTraining(ConsistencyObjective):
    """Improved consistency training, Song & Dhariwal 2023 (module docstring): N(k) from
    ``s0`` to ``s1`` over ``total_steps``, Karras points up to ``sigma_max`` (default 80, or
    the schedule's largest), lognormal index, weight 1 / (sigma_{i+1} - sigma_i), pseudo-Huber
    distance, theta- = theta. The EMA of ``"net"`` (if any) is only for sampling."""

    trainable = ("net",)
    ema = ("net",)

    def __init__(self, schedule: NoiseSchedule, parameterization: Consistency, *,
                 total_steps: int, s0: int = 10, s1: int = 1280, sigma_max: float = 80.0,
                 rho: float = 7.0, distance: str = "pseudo_huber", huber_c: float | None = None,
                 conditional: bool = False):
        super().__init__(schedule, parameterization, distance=distance, huber_c=huber_c,
                         conditional=conditional)
        self.total_steps, self.s0, self.s1 = int(total_steps), int(s0), int(s1)
        self.sigma_max, self.rho = min(float(sigma_max), self.sigma_top), float(rho)

    def discretization(self, step: int) -> Tensor:
        """The Karras sigmas of iteration ``step`` (N(step) of them)."""
        N = C.discretization_steps(step, self.total_steps, self.s0, self.s1)
        return C.karras_sigmas(N, self.sigma_min, self.sigma_max, self.rho)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator, *,
                step: int = 0) -> dict[str, Any]:
        x0 = batch["image"]
        sigmas = self.discretization(step)
        i = C.sample_indices(C.lognormal_index_probs(sigmas), x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator)
        ts = _times(self.schedule, sigmas)
        weight = C.ict_weights(sigmas)[i].float()
        return self._cond(batch, {"x0": x0, "noise": noise, "t_n": ts[i], "t_next": ts[i + 1],
                                  "weight": weight})

    def loss(self, modules: Mapping[str, nn.Module], batch: dict[str, Any]
             ) -> tuple[Tensor, dict[str, Any]]:
        x_next, x_n = C.training_pair(self.schedule, batch["x0"], batch["noise"],
                                      batch["t_n"], batch["t_next"])
        net = modules["net"]
        return self._loss(net, net, batch, x_next.to(batch["x0"].dtype),
                          x_n.to(batch["x0"].dtype))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": "ct", "total_steps": self.total_steps,
                "s0": self.s0, "s1": self.s1, "sigma_max": self.sigma_max}


class EasyConsistencyTuning(ConsistencyTraining):
    """Easy consistency tuning, Geng et al. 2024 (module docstring): sigma ~ lognormal(P_mean,
    P_std) clipped to [sigma_min, sigma_max], r = :func:`~difflab.denoiser.consistency.
    ect_sigma_r` (sigma, stage) with stage = step // ``iterations_per_stage`` (default: 8
    stages over ``total_steps``), weight 1 / (sigma - r), pseudo-Huber distance, theta- =
    theta; the network starts from a trained diffusion model's weights."""

    def __init__(self, schedule: NoiseSchedule, parameterization: Consistency, *,
                 total_steps: int, iterations_per_stage: int | None = None, q: float = 2.0,
                 k: float = 8.0, b: float = 1.0, sigma_max: float = 80.0,
                 distance: str = "pseudo_huber", huber_c: float | None = None,
                 conditional: bool = False):
        super().__init__(schedule, parameterization, total_steps=total_steps,
                         sigma_max=sigma_max, distance=distance, huber_c=huber_c,
                         conditional=conditional)
        self.iterations_per_stage = int(iterations_per_stage or max(1, self.total_steps // 8))
        self.q, self.k, self.b = float(q), float(k), float(b)

    def prepare(self, batch: dict[str, Tensor], generator: torch.Generator, *,
                step: int = 0) -> dict[str, Any]:
        x0 = batch["image"]
        stage = C.ect_stage(step, self.iterations_per_stage)
        sigma = C.sample_lognormal_sigmas(x0.shape[0], generator).clamp(
            self.sigma_min * 1.001, self.sigma_max)
        r = C.ect_sigma_r(sigma, stage, self.q, self.k, self.b)
        r = torch.where(r < self.sigma_min, torch.zeros_like(r), r)
        noise = torch.randn(x0.shape, generator=generator)
        return self._cond(batch, {"x0": x0, "noise": noise, "t_n": _times(self.schedule, r),
                                  "t_next": _times(self.schedule, sigma),
                                  "weight": C.ect_weight(sigma, r).float()})

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": "ect",
                "iterations_per_stage": self.iterations_per_stage, "q": self.q, "k": self.k,
                "b": self.b}
