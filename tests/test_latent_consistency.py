"""Latent consistency distillation (issue #20 on the text-to-image model of #18): the guidance
weight w as a network input (zero-initialised, so the student starts as the teacher), CFG at
per-row weights carried by the condition, the objective's pairs (one step of the teacher guided
at each row's w), and a tiny text-to-image teacher distilled from the command line, resumed
bit-identically and sampled in 1-4 calls."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import train_tiny_t2i

from difflab import samplers
from difflab.cli import main
from difflab.conditioning.text import VocabTextEncoder
from difflab.denoiser import Condition, Denoiser
from difflab.denoiser.parameterization import Consistency
from difflab.guidance import (
    classifier_free,
    guidance_from_condition,
    guidance_input,
    takes_guidance,
)
from difflab.nets import build
from difflab.objectives import LatentConsistencyDistillation
from difflab.pipelines.text_to_image import TextToImagePipeline
from difflab.schedules import from_config
from difflab.train import checkpoint as ckpt

SCHEDULE = from_config({"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999})
NET = {"type": "unet", "in_channels": 4, "model_channels": 8, "channel_mult": [1, 2],
       "num_res_blocks": 1, "attention_resolutions": [4], "image_size": 8, "num_heads": 2,
       "context_dim": 6}
PROMPTS = ["a small bag in the top left", "a large coat in the center"]


def _nets(perturb: float = 0.05):
    """(teacher, student): a U-Net with cross-attention and its copy with a w-embedding."""
    torch.manual_seed(0)
    teacher = build(NET)
    for p in teacher.parameters():  # leave the zero-initialised output: every path matters
        p.data.add_(perturb * torch.randn_like(p))
    student = build({**NET, "guidance_embed": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(".guidance_embed." in k for k in missing)
    return teacher.eval(), student.eval()


def _cond(B: int = 3, seed: int = 1) -> Condition:
    g = torch.Generator().manual_seed(seed)
    return Condition(context=torch.randn(B, 5, 6, generator=g),
                     null_context=torch.randn(1, 5, 6, generator=g))


def _x(B: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_condition_carries_the_guidance_weight():
    cond = _cond()
    c = cond.with_guidance(2.5)
    assert c.guidance.dtype == torch.float32 and c.guidance.tolist() == [2.5] * 3
    w = torch.tensor([0.0, 1.0, 3.0])
    c = cond.with_guidance(w)
    assert torch.equal(c.null().guidance, w)              # guidance is not nulled by CFG
    assert torch.equal(c[1:].guidance, w[1:])             # sliced with the batch
    assert torch.equal(Condition.cat([c, c]).guidance, torch.cat([w, w]))
    assert set(c.kwargs()) == {"context", "guidance"}
    with pytest.raises(ValueError, match="guidance must be a \\(B,\\) float"):
        Condition(context=cond.context, guidance=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="share the batch size"):
        Condition(context=cond.context, guidance=torch.ones(2))


def test_zero_initialised_w_embedding_starts_as_the_teacher():
    """At initialisation the student is the teacher at every w (the w-embedding's last layer
    is zero); once it is trained, w changes the output; each network refuses what it lacks."""
    teacher, student = _nets()
    x, t, cond = _x(), torch.tensor([10.0, 400.0, 900.0]), _cond()
    ref = teacher(x, t, context=cond.context)
    for w in (0.0, 2.0, 7.5):
        out = student(x, t, **cond.with_guidance(w).kwargs())
        assert torch.equal(out, ref), w
    torch.nn.init.normal_(student.encoder.guidance_embed.mlp[-1].weight, std=0.1)
    a = student(x, t, **cond.with_guidance(0.0).kwargs())
    b = student(x, t, **cond.with_guidance(3.0).kwargs())
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="takes the guidance scale w as an input"):
        student(x, t, context=cond.context)
    with pytest.raises(ValueError, match="takes no guidance input"):
        teacher(x, t, **cond.with_guidance(1.0).kwargs())
    assert student.config["guidance_embed"] and "guidance_embed" not in teacher.config


def test_cfg_at_per_row_weights_is_scalar_cfg_row_by_row():
    """CFG with a (B,) tensor of w, and CFG at the weight the condition carries (the guided
    teacher of distillation, which strips w before its network), equal scalar CFG per row."""
    teacher, _ = _nets()
    den = Denoiser(teacher, SCHEDULE, "v")
    x, t, cond = _x(), torch.tensor([0.2, 0.5, 0.8]), _cond()
    w = torch.tensor([0.0, 1.5, 4.0])
    rows = torch.cat([classifier_free(den, float(w[i])).predict(x[i:i + 1], t[i:i + 1],
                                                                cond[i]).x0 for i in range(3)])
    per_row = classifier_free(den, w).predict(x, t, cond).x0
    carried = guidance_from_condition(den).predict(x, t, cond.with_guidance(w)).x0
    # one batched call against three single-row calls: the kernels may round differently
    # (float32, ~1e-7 relative per branch), and (1 + w) x0_c - w x0_u amplifies it by 1 + 2w = 9
    torch.testing.assert_close(per_row, rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(carried, rows, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs cond.guidance"):
        guidance_from_condition(den).predict(x, t, cond)


def test_guidance_input_is_one_call_with_w_in_the_condition():
    _, student = _nets()
    den = Denoiser(student, SCHEDULE, Consistency(0.05, inner="v"))
    assert takes_guidance(den) and not takes_guidance(classifier_free(den, 1.0))
    rows: list[int] = []
    student.register_forward_hook(lambda m, a, k, out: rows.append(a[0].shape[0]),
                                  with_kwargs=True)
    x, t, cond = _x(), torch.tensor([0.3, 0.6, 0.9]), _cond()
    got = guidance_input(den, 2.0).predict(x, t, cond).x0
    assert rows == [3]  # one call of B rows (CFG would be one call of 2B)
    torch.testing.assert_close(got, den.predict(x, t, cond.with_guidance(2.0)).x0)


def _objective(**kw):
    return LatentConsistencyDistillation(
        SCHEDULE, Consistency(0.05, inner="v"),
        functools.partial(samplers.step, sampler="heun"), Consistency(0.05, inner="v").inner,
        guide=guidance_from_condition, latent_shape=(4, 8, 8), **kw)


def test_objective_pairs_step_the_teacher_guided_at_each_rows_weight():
    """x^_{t_n} is one Heun step of CFG_{w_i}(teacher) from x_{t_{n+1}} = alpha z_0 + sigma z,
    row by row; the student and its target see the same w; w ~ U[w_min, w_max]."""
    teacher, student = _nets()
    obj = _objective(w_range=(1.0, 3.0), index_groups=2)
    enc = VocabTextEncoder.from_captions(PROMPTS, dim=6, num_layers=1, num_heads=2,
                                         max_length=12).freeze()
    B = 4
    batch = {"caption": [PROMPTS[i % 2] for i in range(B)], "latent": _x(B, 3)}
    prep = obj.prepare(batch, torch.Generator().manual_seed(0))
    again = obj.prepare(batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(prep[k], again[k]) for k in ("w", "noise", "t_n", "t_next"))
    assert ((prep["w"] >= 1.0) & (prep["w"] <= 3.0)).all() and prep["w"].unique().numel() == B
    seen = {}

    def capture(f_net, f_target, b, x_next, x_n):
        seen.update(x_next=x_next, x_n=x_n, cond=b["cond"])
        return torch.zeros(()), {}

    obj._loss = capture
    target = build({**NET, "guidance_embed": True})
    target.load_state_dict(student.state_dict())
    obj.loss({"net": student, "target": target, "teacher": teacher, "text_encoder": enc}, prep)
    cond = enc.encode(batch["caption"]).condition(enc.null())
    assert torch.equal(seen["cond"].guidance, prep["w"])
    den = Denoiser(teacher, SCHEDULE, "v")
    for i in range(B):
        alpha, sigma = SCHEDULE.alpha_sigma(prep["t_next"][i:i + 1])
        x_next = (alpha * prep["latent"][i:i + 1] + sigma * prep["noise"][i:i + 1]).float()
        x_n = samplers.step(classifier_free(den, float(prep["w"][i])), x_next,
                            float(prep["t_next"][i]), float(prep["t_n"][i]), sampler="heun",
                            cond=cond[i])
        torch.testing.assert_close(seen["x_next"][i:i + 1], x_next, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["x_n"][i:i + 1], x_n, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="w_range"):
        _objective(w_range=(3.0, 1.0))


# --- a tiny text-to-image teacher distilled from the command line ------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return train_tiny_t2i(tmp_path_factory.mktemp("lcm") / "teacher")


def _weights(run):
    ck = ckpt.read(run)
    return {**ck.weights("net"), **{f"ema.{k}": v for k, v in ck.weights("net", True).items()}}


def test_distill_resume_and_sample_a_text_to_image_teacher(teacher_run, tmp_path, capsys):
    """``difflab distill T2I`` makes a text-to-image checkpoint whose network takes w; 4 steps
    straight equal 2 steps and 2 resumed; ``difflab sample`` runs it with the consistency
    sampler at one network call of B rows per step."""
    common = ["distill", str(teacher_run), "--quiet", "--threads", "1", "--batch-size", "8",
              "--w-range", "0", "3", "--cfg", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(common + ["--out", str(straight), "--steps", "4"]) == 0
    assert "--prompt" in capsys.readouterr().out
    assert main(common + ["--out", str(split), "--steps", "2"]) == 0
    assert main(["distill", "--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    a, b = _weights(straight), _weights(split)
    assert a.keys() == b.keys() and any("guidance_embed" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ck = ckpt.read(straight)
    assert ck.kind == "text_to_image" and ck.state()["step"] == 4
    assert ck.config["consistency"]["w_range"] == [0.0, 3.0]
    assert ck.config["sample"] == {"sampler": "consistency", "steps": 4, "cfg": 2.0}
    assert ck.has_weights("text_encoder")  # the teacher's trained encoder, copied frozen

    pipe = TextToImagePipeline.from_checkpoint(straight)
    assert pipe.guidance_input
    rows: list[int] = []
    pipe.denoiser.net.register_forward_hook(lambda m, a, k, o: rows.append(a[0].shape[0]),
                                            with_kwargs=True)
    images = pipe(PROMPTS, steps=2, cfg=1.0, seed=0)
    assert images.shape == (2, 1, 64, 64) and rows == [2, 2]
    torch.testing.assert_close(pipe(PROMPTS, steps=2, cfg=1.0, seed=0), images)
    assert not torch.equal(pipe(PROMPTS, steps=1, cfg=1.0, seed=0), images)
    grid = tmp_path / "grid.png"
    assert main(["sample", str(straight), "--prompt", PROMPTS[0], "--steps", "1",
                 "--out", str(grid)]) == 0 and grid.is_file()
    capsys.readouterr()
    assert main(["sample", str(straight), "--prompt", PROMPTS[0], "--negative-prompt",
                 PROMPTS[1]]) == 2
    assert "no unconditional half" in capsys.readouterr().err


def test_bad_latent_distillation_input_is_a_clear_error(teacher_run, tmp_path, capsys):
    for extra, words in ((["--method", "ect"], "latent consistency distillation"),
                         (["--w-range", "3", "1"], "0 <= LO <= HI"),
                         (["--solver", "nope"], "unknown teacher")):
        assert main(["distill", str(teacher_run), "--out", str(tmp_path / "x"), "--quiet",
                     "--steps", "1"] + extra) == 2
        assert words in capsys.readouterr().err, extra
    assert not (tmp_path / "x").exists()


def test_a_controlnet_on_a_guidance_distilled_base_passes_w_on():
    """A ControlNet copied from a U-Net that takes w gets w too (its encoder is the base's);
    with its zero convolutions the controlled network is the base at every w."""
    from difflab.nets.controlnet import ControlledUNet, ControlNet

    _, student = _nets()
    torch.nn.init.normal_(student.encoder.guidance_embed.mlp[-1].weight, std=0.1)
    cn = ControlNet.from_unet(student, control_channels=1)
    both = ControlledUNet(student, cn)
    x, t, cond = _x(), torch.tensor([10.0, 400.0, 900.0]), _cond().with_guidance(2.0)
    control = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(both(x, t, control=control, **cond.kwargs()),
                               student(x, t, **cond.kwargs()), rtol=0, atol=0)
