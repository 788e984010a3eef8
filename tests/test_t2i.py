"""Latent text-to-image (issue #18): guidance transforms on a text condition (CFG w = 0, negative
prompts, the guidance interval), prompt dropout, the DiT's cross-attention, the two objectives,
a tiny model trained through both stages and sampled from the command line, and bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import T2I_TINY, train_tiny_t2i

import difflab
from difflab.cli import main
from difflab.conditioning.text import VocabTextEncoder
from difflab.data.canvas import all_captions
from difflab.denoiser import Denoiser
from difflab.guidance import classifier_free, guidance_interval
from difflab.nets import build
from difflab.objectives import AutoencoderObjective, TextToImageObjective
from difflab.schedules import from_config
from difflab.train import checkpoint as ckpt

SCHEDULE = {"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999}
PROMPTS = ["a small bag in the top left", "a large coat in the center"]
NEGATIVE = "a large sneaker in the bottom right"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    enc = VocabTextEncoder.from_captions(all_captions(), dim=16, num_layers=1, num_heads=2,
                                         max_length=12).freeze()
    net = build({"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4,
                 "hidden_size": 32, "depth": 2, "num_heads": 2, "context_dim": 16})
    for p in net.parameters():  # leave DiT's zero init: every path must matter
        p.data.add_(0.05 * torch.randn_like(p))
    den = Denoiser(net, from_config(SCHEDULE), "v").eval()
    return den, enc


def _x(B=2, seed=1):
    return torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_dit_cross_attention_config_round_trip_and_mask(model):
    den, enc = model
    net = den.net
    rebuilt = build(json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict())
    cond = enc.condition(PROMPTS)
    x, t = _x(), torch.full((2,), 500.0)
    with torch.no_grad():
        out = net(x, t, **cond.kwargs())
        assert torch.equal(out, rebuilt(x, t, **cond.kwargs()))
        # padding tokens are not attended to: changing them changes nothing
        ctx = torch.where(cond.context_mask[..., None], cond.context, torch.randn_like(
            cond.context) * 5)
        assert torch.allclose(net(x, t, context=ctx, context_mask=cond.context_mask), out,
                              atol=1e-5)
        assert not torch.allclose(net(x, t, **enc.condition(PROMPTS[::-1]).kwargs()), out)
    with pytest.raises(ValueError, match="context_dim"):
        build({"type": "dit", "input_size": 8, "in_channels": 4, "hidden_size": 32,
               "depth": 1, "num_heads": 2})(x, t, context=cond.context)


def test_cfg_w0_is_the_conditional_model_and_w_combines(model):
    den, enc = model
    cond, x, t = enc.condition(PROMPTS), _x(), 0.6
    with torch.no_grad():
        c = den.predict(x, t, cond)
        u = den.predict(x, t, cond.null())
        assert torch.equal(classifier_free(den, 0.0).predict(x, t, cond).x0, c.x0)
        g = classifier_free(den, 2.0).predict(x, t, cond)
    assert torch.allclose(g.x0, 3 * c.x0 - 2 * u.x0, atol=1e-5)
    # the null branch is the empty prompt's encoding
    assert torch.allclose(cond.null().context, enc.null().states.expand(2, -1, -1))


def test_negative_prompt_replaces_the_null_branch(model):
    den, enc = model
    x, t, w = _x(), 0.5, 1.5
    cond = enc.condition(PROMPTS, negative_prompt=NEGATIVE)
    with torch.no_grad():
        g = classifier_free(den, w).predict(x, t, cond)
        c = den.predict(x, t, enc.condition(PROMPTS))
        n = den.predict(x, t, enc.condition([NEGATIVE] * 2))
        plain = classifier_free(den, w).predict(x, t, enc.condition(PROMPTS))
    assert torch.allclose(g.x0, (1 + w) * c.x0 - w * n.x0, atol=1e-5)
    assert not torch.allclose(g.x0, plain.x0, atol=1e-3)


def test_guidance_interval_in_noise_level(model):
    den, enc = model
    cond, noise = enc.condition(PROMPTS), _x(seed=3)
    kw = {"sampler": "dpmpp_2m", "steps": 6, "cond": cond}
    with torch.no_grad():
        plain = difflab.sample(den, noise, **kw)
        outside = difflab.sample(guidance_interval(den, 3.0, 1e-7, 1e-6), noise, **kw)
        everywhere = difflab.sample(guidance_interval(den, 3.0, 0.0, float("inf")), noise, **kw)
        cfg = difflab.sample(classifier_free(den, 3.0), noise, **kw)
        # a mixed batch: row 0 inside, row 1 outside
        gi = guidance_interval(den, 3.0, 0.5, 2.0)
        t = torch.tensor([den.schedule.t_from_log_snr(torch.tensor(0.0)).item(), 0.999])
        mixed = gi.predict(noise, t, cond)
        full, base = classifier_free(den, 3.0).predict(noise, t, cond), den.predict(noise, t,
                                                                                    cond)
    assert torch.equal(outside, plain)
    assert torch.allclose(everywhere, cfg, atol=1e-6)
    assert not torch.allclose(cfg, plain, atol=1e-3)
    assert torch.allclose(mixed.x0[0], full.x0[0], atol=1e-6)
    assert torch.allclose(mixed.x0[1], base.x0[1], atol=1e-6)
    with pytest.raises(ValueError, match="sigma_lo"):
        guidance_interval(den, 1.0, 2.0, 1.0)


def test_prompt_dropout_yields_the_empty_prompt(model):
    den, enc = model
    obj = TextToImageObjective(den.schedule, "v", latent_shape=(4, 8, 8), p_uncond=0.5)
    batch = {"caption": PROMPTS * 4, "image": torch.zeros(8, 1, 32, 32)}
    prep = obj.prepare(batch, torch.Generator().manual_seed(0))
    drop = prep["drop"]
    assert 0 < int(drop.sum()) < 8 and prep["eps"].shape == (8, 4, 8, 8)
    cond = obj.condition(enc, prep["caption_id"], drop)
    null, full = enc.null(), enc.encode(batch["caption"])
    assert torch.equal(cond.context[drop], null.states.expand(int(drop.sum()), -1, -1))
    assert torch.equal(cond.context_mask[drop], null.mask.expand(int(drop.sum()), -1))
    assert torch.equal(cond.context[~drop], full.states[~drop])
    # the same generator state gives the same draws (resumable)
    again = obj.prepare(batch, torch.Generator().manual_seed(0))
    assert torch.equal(again["eps"], prep["eps"]) and torch.equal(again["drop"], drop)


def test_autoencoder_objective_runs_and_reports_psnr():
    torch.manual_seed(0)
    cfg = {"type": "autoencoder", "base_channels": 8, "channel_mult": [1, 2], "z_channels": 2,
           "mid_attention": False}
    ae = build(cfg)
    obj = AutoencoderObjective.for_net(cfg, kl_weight=1e-3)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    loss, logs = obj({"net": ae}, {"image": x}, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and set(logs) == {"rec", "kl", "psnr"}
    assert all(p.grad is not None for p in ae.parameters() if p.requires_grad)


# --- a tiny model through both stages, from the command line -----------------------------------
TINY = T2I_TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_t2i(tmp_path_factory.mktemp("t2i") / "run")


def test_a_finished_or_half_trained_run_is_never_replaced_silently(tmp_path, capsys):
    """`difflab train t2i_canvas --out RUN` on a run (finished, or still in stage 1) is refused
    without --resume / --overwrite, touching nothing; --overwrite moves it aside."""
    out = tmp_path / "run"
    args = ["train", "t2i_canvas", "--out", str(out), "--quiet", "--threads", "1"]
    for s in TINY:
        args += ["--set", s]
    assert main(args + ["--set", "train.steps=1"]) == 0
    before = {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a text-to-image run" in err and "--resume" in err, err
    assert {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == before
    (out / "checkpoint").rename(tmp_path / "moved")  # as if stopped in stage 1
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0
    moved = [d for d in tmp_path.iterdir() if d.name.startswith("run.old-")]
    assert len(moved) == 1 and (moved[0] / "autoencoder" / "checkpoint").is_dir()
    assert json.loads((out / "stages.json").read_text())["stage"] == "done"


def test_tiny_model_trains_both_stages(run):
    assert json.loads((run / "stages.json").read_text())["stage"] == "done"
    ae = ckpt.read(run / "autoencoder")
    assert ae.kind == "autoencoder" and ae.component_config("net")["scale_factor"] != 1.0
    ck = ckpt.read(run)
    assert ck.kind == "text_to_image"
    assert {"net", "schedule", "text_encoder", "autoencoder"} <= set(ck.components)
    # the frozen autoencoder is referenced, not copied; the trained text encoder is stored
    assert not ck.has_weights("autoencoder") and ck.has_weights("text_encoder", ema=True)
    assert len(ck.references["autoencoder"]["sha256"]) == 64
    state = ck.state()
    assert state["modules"]["frozen"] == ["autoencoder"]
    model, cfg = ckpt.load(run)
    assert model.latent_shape == (4, 16, 16) and cfg["kind"] == "text_to_image"


def test_sample_prompt_grid_and_prompts_file_npy(run, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert main(["sample", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--per-prompt", "2", "--cfg", "1.5", "--negative-prompt", NEGATIVE,
                 "--out", str(grid)]) == 0
    from PIL import Image

    img = Image.open(grid)
    assert img.height > 2 * 128  # two rows of 128 px tiles plus caption lines
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([PROMPTS[1], PROMPTS[0], "", PROMPTS[1]]) + "\n")
    out = tmp_path / "x.npy"
    assert main(["sample", str(run), "--prompts-file", str(prompts), "--out", str(out),
                 "--guidance-interval", "0.1", "10", "--cfg", "2"]) == 0
    arr = np.load(out)
    assert arr.shape == (3, 64, 64, 1) and arr.dtype == np.uint8
    assert "wrote 3 images" in capsys.readouterr().out


def test_sample_keeps_the_probed_plan_between_runs(run, tmp_path, monkeypatch):
    """A prompted run's default call probes the guided model once: the second `difflab
    sample` reads the plan from the cache (difflab.commands.plan_cache) and writes the same
    images; another guidance weight is another plan."""
    from difflab.samplers.probe import clear_probe_cache

    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    outs = [tmp_path / f"{i}.npy" for i in range(3)]
    for out, w in zip(outs, ("2", "2", "3")):
        clear_probe_cache()
        assert main(["sample", str(run), "--prompt", PROMPTS[0], "--count", "2", "--steps",
                     "3", "--cfg", w, "--out", str(out)]) == 0
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 2
    assert np.array_equal(np.load(outs[0]), np.load(outs[1]))


def test_sample_count_cycles_prompts_and_conflicts_with_per_prompt(run, tmp_path, capsys):
    """--count N with prompts: sample i takes prompt i mod P (as a diffusers folder's); it was
    silently ignored before. --count with --per-prompt is a clear error."""
    out = tmp_path / "c.npy"
    assert main(["sample", str(run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--count", "5", "--steps", "2", "--out", str(out)]) == 0
    assert np.load(out).shape == (5, 64, 64, 1)
    assert "wrote 5 images (prompt i mod 2)" in capsys.readouterr().out
    assert main(["sample", str(run), "--prompt", PROMPTS[0], "--count", "3", "--per-prompt",
                 "2", "--out", str(tmp_path / "d.npy")]) == 2
    err = capsys.readouterr().err
    assert "--count" in err and "--per-prompt" in err and not (tmp_path / "d.npy").exists()


def test_eval_reports_adherence_table(run, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large bag in the top left\na small coat in the center\n")
    res = tmp_path / "res.json"
    assert main(["eval", str(run), "--prompts", str(prompts), "--cfgs", "0,1", "--steps",
                 "2", "--out", str(res)]) == 0
    data = json.loads(res.read_text())
    assert [r["cfg"] for r in data["results"]] == [0.0, 1.0]
    assert data["results"][0]["held_out"]["n"] == 1 and data["results"][0]["seen"]["n"] == 1
    assert "position" in capsys.readouterr().out


@pytest.mark.parametrize("args,names", [
    (["--prompt", "  "], ["--prompt", "empty"]),
    (["--prompt", " ".join(["a"] * 30)], ["--prompt", "max_length"]),
    (["--prompts-file", "/nonexistent/prompts.txt"], ["--prompts-file", "does not exist"]),
])
def test_bad_prompts_are_clear_errors(run, tmp_path, capsys, args, names):
    assert main(["sample", str(run), *args, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in names), err


def test_checkpoint_without_text_encoder_and_missing_autoencoder(run, tmp_path, capsys):
    from pathlib import Path

    old = Path(__file__).parent / "data" / "old_checkpoint" / "diffusion"
    assert main(["sample", str(old), "--prompt", PROMPTS[0], "--out",
                 str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no text encoder" in err and "--prompt" in err
    moved = tmp_path / "elsewhere" / "checkpoint"
    shutil.copytree(run / "checkpoint", moved)
    ref = json.loads((moved / "checkpoint.json").read_text())
    ref["references"]["autoencoder"]["path"] = str(tmp_path / "gone")
    (moved / "checkpoint.json").write_text(json.dumps(ref))
    assert main(["sample", str(moved), "--prompt", PROMPTS[0], "--out",
                 str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err
    assert "autoencoder" in err and "missing" in err


def test_resume_continues_the_diffusion_stage(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = ckpt.read(copy).state()["step"]
    assert main(["train", "t2i_canvas", "--out", str(copy), "--resume", "--quiet",
                 "--set", f"train.steps={before + 1}"]) == 0
    assert ckpt.read(copy).state()["step"] == before + 1
    assert json.loads((copy / "stages.json").read_text())["stage"] == "done"


def test_tune_grid_fits_prompted_sampling_for_its_guidance(run, tmp_path, capsys):
    """``tune-grid --prompts-file F --cfg W`` fits the latent ODE of sampling guided towards
    prompt i mod P: the stored grid's calibration RMSE is the guided latent sampler's against
    the guided reference (recomputed here), and prompted sampling runs the fit at that w only
    (a negative prompt or another w: none). ``--fast --polish`` runs on prompted draws too."""
    from difflab.commands.model import choose_solver, prompt_fits
    from difflab.fitting import load_fit, reference_profile
    from difflab.pipelines.text_to_image import TextToImagePipeline

    own = tmp_path / "run"  # the module's run stays without fits
    shutil.copytree(run, own)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["tune-grid", str(own), "--sampler", "dpmpp_2m", "--steps", "3", "--count", "4",
            "--reference-steps", "10", "--max-evals", "10"]
    assert main(args) == 2
    assert "--prompts-file" in capsys.readouterr().err
    assert main(args + ["--prompts-file", str(prompts), "--cfg", "2"]) == 0
    assert "on 2 prompts (draw i: prompt i mod 2)" in capsys.readouterr().out
    stored = json.loads((own / "checkpoint" / "fits.json").read_text())["fits"]
    assert sorted(stored) == ["dpmpp_2m/3/ema/cfg=2"]

    pipe = TextToImagePipeline.from_checkpoint(own)
    guided = pipe.guided(2.0)
    cond = pipe.text_encoder.condition([PROMPTS[i % 2] for i in range(4)])
    noise = torch.randn(4, *pipe.latent_shape, generator=torch.Generator().manual_seed(1000))
    fit = load_fit(own / "checkpoint", "dpmpp_2m", 3, guidance="cfg=2")
    with torch.no_grad():
        ref, _ = reference_profile(guided, noise, 10, cond=cond)
        x = difflab.sample(guided, noise, fit=fit, cond=cond)
    assert (x - ref).pow(2).mean().sqrt().item() == pytest.approx(fit.rmse, rel=1e-5)
    assert choose_solver(own, "auto", 3, guidance=prompt_fits(2.0)).fit == fit
    for other in (prompt_fits(1.0), prompt_fits(2.0, negative_prompt=True)):
        assert choose_solver(own, "auto", 3, guidance=other).fit is None
    # the fast fit's polish differentiates through prompted, guided calls on halves of the draws
    assert main(["tune-grid", str(own), "--fast", "--steps", "3", "--count", "4",
                 "--reference-steps", "10", "--prompts-file", str(prompts), "--cfg", "2",
                 "--polish", "2"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "fast fit" in ln)
    assert "L-BFGS iterations (from " in line or "scored worse on held-out draws" in line, line


def test_pipeline_auto_runs_the_first_batchs_probe_plan_for_every_batch(run):
    """The pipeline's default sampler ("auto") is the plan a probe of the guided model picks,
    resolved once on the first batch (its noise and prompts) and run by every batch: the same
    latents as that plan sampled batch by batch."""
    from difflab.pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_checkpoint(run)
    prompts = [PROMPTS[i % 2] for i in range(4)]
    z = pipe(prompts, cfg=1.0, sampler="auto", steps=3, batch_size=2, return_latents=True)
    den = pipe.guided(1.0)
    noise = torch.randn((4, *pipe.latent_shape), generator=torch.Generator().manual_seed(0))
    plan = difflab.samplers.default_plan(den, 3, noise[:2], pipe.condition(prompts[:2]))
    assert plan is not None and plan.sampler in ("unipc", "dpmpp_2m")
    for i in (0, 2):
        with torch.no_grad():
            x = difflab.sample(den, noise[i:i + 2], fit=plan,
                               cond=pipe.condition(prompts[i:i + 2]))
        torch.testing.assert_close(z[i:i + 2], x)
