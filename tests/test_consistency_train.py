"""Consistency models trained (issue #20): the distillation / training / tuning objectives on
the one trainer (resume bit-identity with the step-dependent discretisation), a 2-D ring
distillation whose one-step samples approach the teacher's ODE end points, ``difflab distill``
and ``difflab sample --steps 1``, and the bad-input errors."""

from __future__ import annotations

import functools

import pytest
import torch

import difflab
from difflab import cli
from difflab import samplers as S
from difflab.denoiser import consistency as C
from difflab.denoiser.parameterization import Consistency
from difflab.objectives.consistency import (
    ConsistencyDistillation,
    ConsistencyTraining,
    EasyConsistencyTuning,
)
from difflab.train import checkpoint as ckpt
from difflab.train.config import preset
from difflab.train.distill import distill_config, distill_modules, max_sampling_steps
from difflab.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A v-prediction MLP on the 2-D ring, trained for a few seconds: (checkpoint, config)."""
    cfg = preset("toy2d")
    cfg["prediction"] = "v"
    cfg["train"].update(steps=250, batch_size=64, lr=3e-3, sample_every=0, grid_size=0,
                        fit_steps=[])
    out = tmp_path_factory.mktemp("teacher")
    train(cfg, out)
    return out / "checkpoint", ckpt.read_config(out / "checkpoint")


def _run(teacher, method, out, steps, **train_kw):
    den, cfg = ckpt.load_denoiser(teacher[0])
    dc = distill_config(cfg, method=method, teacher_path=str(teacher[0]),
                        train={"steps": steps, "batch_size": 64, "ckpt_every": 0,
                               "log_every": 5, **train_kw})
    return dc, distill_modules(dc, den.net), {"teacher": str(teacher[0])} \
        if method == "cd" else None


@pytest.mark.parametrize("method", ["cd", "ect", "ct"])
def test_resume_is_bit_identical(teacher, tmp_path, method):
    """6 steps straight == 3 steps, a checkpoint, and 3 resumed steps (the EMA target, the
    teacher's step and N(k) / ECT's stage, recomputed from the restored step counter)."""
    weights = []
    for split in (False, True):
        out = tmp_path / f"{method}_{split}"
        dc, mods, refs = _run(teacher, method, out, 6)
        if split:
            tr = Trainer(dc, out, modules=mods, references=refs)
            tr.run(steps=3)
            dc, mods, refs = _run(teacher, method, out, 6)
            tr = Trainer(dc, out, modules=mods, references=refs, resume=True)
            assert tr.step == 3
        else:
            tr = Trainer(dc, out, modules=mods, references=refs)
        tr.run()
        weights.append({k: v.clone() for k, v in tr.net.state_dict().items()}
                       | {f"ema.{k}": v.clone() for k, v in tr.ema.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_step_reaches_prepare_and_sets_the_discretisation():
    """The trainer's step counter k sets N(k) (ct) and ECT's stage (the pairs' gap)."""
    sched = difflab.schedules.edm()
    ct = ConsistencyTraining(sched, Consistency(), total_steps=80)
    assert len(ct.discretization(0)) == 11 and len(ct.discretization(79)) == 1281
    ect = EasyConsistencyTuning(sched, Consistency(), total_steps=80)
    batch = {"image": torch.zeros(256, 2)}
    gaps = []
    for k in (0, 79):
        p = ect.prepare(batch, torch.Generator().manual_seed(0), step=k)
        gaps.append(float((p["t_next"] - p["t_n"]).mean()))
    assert gaps[1] < gaps[0] / 10


def test_ring_distillation_improves_one_step_samples(teacher):
    """Distilling the ring teacher (Heun teacher steps): the one-step sample's RMSE to the
    teacher's own ODE end point (dpm_solver_3, 40 steps, same noise) falls with training."""
    den, cfg = ckpt.load_denoiser(teacher[0])
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        end = difflab.sample(den, noise, "dpm_solver_3", steps=40)
    dc, mods, refs = _run(teacher, "cd", None, 150, lr=2e-3)
    tr = Trainer(dc, None, modules=mods, references=refs)

    def error():
        x = difflab.sample(tr.objective.denoiser(tr.ema_module("net")), noise, steps=1)
        return float((x - end).square().sum(1).mean().sqrt())

    tr.run(steps=1)
    before = error()
    tr.run(steps=150)
    after = error()
    print(before, after)
    assert after < 0.6 * before, (before, after)


def test_distillation_pair_uses_the_teacher_solver(teacher):
    """The objective's teacher step is difflab.samplers.step with the named solver."""
    den, cfg = ckpt.load_denoiser(teacher[0])
    sched = den.schedule
    obj = ConsistencyDistillation(sched, Consistency(0.05, inner="v"),
                                  functools.partial(S.step, sampler="heun"),
                                  den.parameterization, N=10)
    x0 = torch.randn(4, 2)
    z = torch.randn(4, 2)
    t_n, t_next = obj.ts[[2, 2, 5, 5]], obj.ts[[3, 3, 6, 6]]
    x_next, x_n = C.distillation_pair(
        sched, lambda x, a, b: obj.teacher_step(obj.teacher(den.net), x, a, b), x0, z, t_n,
        t_next)
    ref = S.step(den, x_next[:2], float(t_next[0]), float(t_n[0]), sampler="heun")
    assert torch.allclose(x_n[:2], ref)


def test_cli_distills_and_samples_one_step(teacher, tmp_path, capsys):
    out = tmp_path / "cm"
    assert cli.main(["distill", str(teacher[0].parent), "--out", str(out), "--steps", "4",
                     "--batch-size", "16", "--quiet"]) == 0
    assert cli.main(["distill", str(teacher[0].parent), "--out", str(out), "--steps", "6",
                     "--resume", "--quiet"]) == 0
    assert ckpt.read(out / "checkpoint").state()["step"] == 6
    assert cli.main(["sample", str(out), "--steps", "1", "--count", "8",
                     "--out", str(tmp_path / "x.npy")]) == 0
    text = capsys.readouterr().out
    assert "consistency, 1 steps" in text
    den, cfg = ckpt.load_denoiser(out)
    assert isinstance(den.parameterization, Consistency) and cfg["kind"] == "consistency"


def test_bad_input_is_a_clear_error(teacher, tmp_path, capsys):
    out = tmp_path / "cm"
    assert cli.main(["distill", str(teacher[0].parent), "--out", str(out), "--steps", "2",
                     "--batch-size", "8", "--quiet"]) == 0
    capsys.readouterr()
    # a teacher that is not a diffusion model (the consistency model just made)
    assert cli.main(["distill", str(out), "--out", str(tmp_path / "b")]) == 2
    assert "not a diffusion model" in capsys.readouterr().err
    # a teacher solver that does not exist
    assert cli.main(["distill", str(teacher[0].parent), "--solver", "rk45",
                     "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "--solver 'rk45'" in err and "heun" in err and "dpm_solver_2" in err
    # more sampling steps than the model's sigma grid allows
    limit = max_sampling_steps(ckpt.read_config(out / "checkpoint"))
    assert cli.main(["sample", str(out), "--steps", str(limit + 1), "--count", "2",
                     "--out", str(tmp_path / "y.npy")]) == 2
    assert "--steps" in capsys.readouterr().err
    # the library errors
    with pytest.raises(ValueError, match="teacher must be a diffusion model"):
        distill_config({"kind": "classifier", "net": {}}, method="cd")
    with pytest.raises(ValueError, match="unknown method"):
        distill_config(ckpt.read_config(teacher[0]), method="lcm")


def test_conditional_teacher_is_distilled_guided():
    """A class-conditional teacher with cfg = w: the teacher step runs classifier-free guidance
    (the student learns the guided ODE and takes the labels; no dropout)."""
    from difflab.guidance import ClassifierFreeGuidance
    from difflab.nets import build
    from difflab.train.distill import consistency_objective

    net = build({"type": "mlp", "dim": 2, "hidden": 16, "depth": 2, "num_classes": 3})
    teacher_cfg = {"kind": "diffusion", "net": net.config,
                   "schedule": difflab.schedules.cosine().config(), "prediction": "v",
                   "data": {"name": "ring", "num_classes": 3},
                   "train": {"conditional": True, "p_uncond": 0.1}}
    dc = distill_config(teacher_cfg, method="cd", consistency={"cfg": 1.5})
    obj = consistency_objective(dc)
    assert obj.conditional and isinstance(obj.teacher(net), ClassifierFreeGuidance)
    assert obj.teacher(net).w == 1.5
    mods = distill_modules(dc, net)
    mods["target"] = mods["net"]
    batch = obj.prepare({"image": torch.randn(8, 2), "label": torch.arange(8) % 3},
                        torch.Generator().manual_seed(0))
    loss, _ = obj.loss(mods, batch)
    assert torch.isfinite(loss) and batch["cond"].labels.tolist() == (torch.arange(8) % 3).tolist()
