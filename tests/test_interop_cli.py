"""``difflab sample / eval / tune-grid FOLDER`` on local diffusers folders (issue #17), and the
further diffusers classes (AutoencoderKL, ControlNetModel, SD3Transformer2DModel, a pipeline's
CLIP text encoder): tiny random models built and saved here (nothing downloaded)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_interop import TINY  # noqa: E402  (the tiny UNet2DModel of the parity tests)

from difflab import interop  # noqa: E402
from difflab.cli import main  # noqa: E402
from difflab.commands.model import choose_solver  # noqa: E402
from difflab.denoiser import Condition  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
TEXT_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(8, 16),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                 norm_num_groups=4, attention_head_dim=4)
F32_TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def gauss(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def model_folder(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    diffusers.UNet2DModel(**TINY).save_pretrained(folder, safe_serialization=True)
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(folder)
    return folder


def index(folder: Path, **components) -> None:
    entries = {k: (list(v) if v else [None, None]) for k, v in components.items()}
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiffusionPipeline", "_diffusers_version": "0.30.0", **entries}))


def pipeline_folder(folder: Path, unet: torch.nn.Module, scheduler=None, **components) -> Path:
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    (scheduler or diffusers.DDIMScheduler(clip_sample=False)).save_pretrained(
        folder / "scheduler")
    index(folder, unet=("diffusers", type(unet).__name__),
          scheduler=("diffusers", "DDIMScheduler"), **components)
    return folder


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# --- difflab sample FOLDER ------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_sample_a_model_folder_and_a_pipeline_folder(layout, tmp_path, capsys):
    if layout == "model":
        folder = model_folder(tmp_path / "m")
    else:
        torch.manual_seed(0)
        folder = pipeline_folder(tmp_path / "p", diffusers.UNet2DModel(**TINY))
    assert interop.is_diffusers_folder(folder)
    out = tmp_path / "x.npy"
    rc, text, err = run(capsys, "sample", folder, "--steps", 3, "--count", 2, "--out", out)
    assert rc == 0, err
    images = np.load(out)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8  # the config's shape
    assert "wrote 2 samples" in text
    # an existing output is kept without --overwrite, replaced with it
    rc, _, err = run(capsys, "sample", folder, "--steps", 3, "--count", 2, "--out", out)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run(capsys, "sample", folder, "--steps", 3, "--count", 2, "--out", out,
                     "--overwrite", "--seed", 1)
    assert rc == 0, err


# --- difflab tune-grid FOLDER: beside, never in ------------------------------------------------
def test_tune_grid_writes_beside_the_folder_and_sample_uses_the_fit(tmp_path, capsys):
    folder = model_folder(tmp_path / "m")
    before = snapshot(folder)
    args = ["tune-grid", folder, "--sampler", "unipc", "--steps", 3, "--count", 4,
            "--reference-steps", 8, "--max-evals", 12, "--no-eval-times"]
    rc, text, err = run(capsys, *args)
    assert rc == 0, err
    assert snapshot(folder) == before  # the model's folder: same files, same mtimes
    store = tmp_path / "m.difflab"
    assert interop.fits_folder(folder) == store.resolve()
    fits = json.loads((store / "fits.json").read_text())
    assert "unipc/3/ema" in fits["fits"]
    assert fits["fits"]["unipc/3/ema"]["weights_sha256"]
    # sample finds the fit through the one lookup difflab runs use (choose_solver)
    solver = choose_solver(folder, "unipc", 3)
    assert solver.source == "tuned"
    assert [float(t) for t in solver.fit.ts] == fits["fits"]["unipc/3/ema"]["ts"]
    rc, text, err = run(capsys, "sample", folder, "--sampler", "unipc", "--steps", 3,
                        "--count", 2, "--out", tmp_path / "a.npy")
    assert rc == 0, err
    assert "using the tuned unipc 3-step" in text
    rc, text, err = run(capsys, "sample", folder, "--sampler", "unipc", "--steps", 3,
                        "--spacing", "uniform", "--count", 2, "--out", tmp_path / "b.npy")
    assert rc == 0 and "tuned" not in text
    assert not np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert snapshot(folder) == before
    # a stored fit is replaced only with --overwrite, refused before any work otherwise
    stamp = (store / "fits.json").stat().st_mtime_ns
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "--overwrite" in err and "unipc/3/ema" in err
    assert (store / "fits.json").stat().st_mtime_ns == stamp
    rc, _, err = run(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert snapshot(folder) == before


# --- latent pipelines: the VAE's scale factor from its config ----------------------------------
def tiny_vae(seed: int = 3, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16, **kw).eval()


def latent_pipeline(folder: Path, scaling_factor: float) -> Path:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{**TINY, "in_channels": 4, "out_channels": 4})
    tiny_vae(scaling_factor=scaling_factor).save_pretrained(folder / "vae",
                                                            safe_serialization=True)
    return pipeline_folder(folder, unet, vae=("diffusers", "AutoencoderKL"))


def test_latent_pipeline_decodes_with_the_config_scale_factor(tmp_path, capsys):
    folder = latent_pipeline(tmp_path / "p", 0.5)
    m = interop.load_diffusers(folder)
    assert m.sample_shape == (4, 8, 8) and m.image_shape == (3, 16, 16)
    assert m.scaling_factor == 0.5 and m.shift_factor == 0.0
    z = gauss((2, 4, 8, 8))
    vae = tiny_vae(scaling_factor=0.5)
    with torch.no_grad():
        a = m.decode(z)
        assert torch.equal(a, vae.decode(z / 0.5).sample)
    # another scaling_factor (and a shift_factor) in vae/config.json, nothing else changed
    cfg_path = folder / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(scaling_factor=0.25, shift_factor=0.1)
    cfg_path.write_text(json.dumps(cfg))
    m2 = interop.load_diffusers(folder)
    assert m2.scaling_factor == 0.25 and m2.shift_factor == 0.1
    b = m2.decode(z)
    # decode'(z) = vae(z / 0.25 + 0.1) = decode(0.5 (z / 0.25 + 0.1))
    torch.testing.assert_close(b, m.decode(0.5 * (z / 0.25 + 0.1)), rtol=1e-5, atol=1e-6)
    assert rel(b, a) > 1e-2
    # the command decodes: images at the VAE's resolution
    out = tmp_path / "x.npy"
    rc, _, err = run(capsys, "sample", folder, "--steps", 3, "--count", 2, "--out", out)
    assert rc == 0, err
    assert np.load(out).shape == (2, 16, 16, 3)


# --- ControlNet --------------------------------------------------------------------------------
def test_controlnet_residuals_reach_the_unet(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TEXT_UNET).eval()
    controlnet = diffusers.ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(4, 8)).eval()
    folder = pipeline_folder(tmp_path / "p", unet, controlnet=("diffusers", "ControlNetModel"))
    controlnet.save_pretrained(folder / "controlnet", safe_serialization=True)
    m = interop.load_diffusers(folder)
    plain = interop.load_diffusers(folder, controlnet=False)
    assert m.net.controlnet is not None and plain.net.controlnet is None
    x, ctx = gauss((2, 4, 8, 8)), gauss((2, 5, 12), 2)
    control = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = Condition(context=ctx, control=control)
    with torch.no_grad():
        ref = plain.denoiser.predict(x, 0.6, Condition(context=ctx)).eps
        # ControlNet's output convs start at zero (zero_module): no change to the U-Net
        assert torch.equal(m.denoiser.predict(x, 0.6, cond).eps, ref)
        with pytest.raises(ValueError, match="control"):
            m.denoiser.predict(x, 0.6, Condition(context=ctx))
        for mod in [*m.controlnet.controlnet_down_blocks, m.controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(mod.weight, std=0.1)
        got = m.denoiser.predict(x, 0.6, cond).eps
        assert rel(got, ref) > 1e-3
        down, mid = m.controlnet(x, 599, encoder_hidden_states=ctx, controlnet_cond=control,
                                 return_dict=False)
        want = unet(x, 599, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        assert rel(got, want) < F32_TOL


# --- SD3's transformer -------------------------------------------------------------------------
def test_sd3_transformer_velocity_equals_the_transformer_output(tmp_path):
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    net.save_pretrained(tmp_path, safe_serialization=True)
    sched.save_pretrained(tmp_path)
    m = interop.load_diffusers(tmp_path)
    assert m.model_class == "SD3Transformer2DModel" and m.prediction.name == "flow"
    assert m.sample_shape == (4, 8, 8) and m.needs_context
    x, emb, pooled = gauss((2, 4, 8, 8)), gauss((2, 5, 16), 2), gauss((2, 8), 3)
    cond = Condition(context=interop.sd3_context(emb, pooled))
    sched.set_timesteps(4)
    with torch.no_grad():
        for timestep in sched.timesteps:  # diffusers' timestep = sigma * 1000
            t = m.schedule.t_from_sigma(torch.tensor(float(timestep) / 1000, dtype=torch.float64))
            assert abs(float(m.schedule.net_time(t)) - float(timestep)) < 1e-3
            ref = net(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                      timestep=timestep.expand(2)).sample
            got = m.denoiser.predict(x, float(t), cond).target("flow")
            assert rel(got, ref) < F32_TOL, (float(timestep), rel(got, ref))
        with pytest.raises(ValueError, match="needs context"):
            m.denoiser.predict(x, 0.5)


# --- a pipeline's CLIP text encoder: prompts on the command line -------------------------------
def tiny_clip(folder: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"),
                        str(folder / "tokenizer" / "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder / "tokenizer")
    torch.manual_seed(5)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).save_pretrained(folder / "text_encoder", safe_serialization=True)


def test_text_pipeline_samples_prompts_with_cfg_and_control(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = pipeline_folder(tmp_path / "p", diffusers.UNet2DConditionModel(**TEXT_UNET),
                             text_encoder=("transformers", "CLIPTextModel"),
                             tokenizer=("transformers", "CLIPTokenizer"))
    tiny_clip(folder)
    capsys.readouterr()  # transformers' save progress
    rc, _, err = run(capsys, "sample", folder, "--steps", 2, "--count", 2,
                     "--out", tmp_path / "none.npy")
    assert rc == 2 and "--prompt" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "x.npy"
    rc, text, err = run(capsys, "sample", folder, "--steps", 2, "--count", 2, "--prompt",
                        "a cat", "--cfg", 2.0, "--out", out)
    assert rc == 0, err
    assert np.load(out).shape == (2, 8, 8, 4)
    rc, text, err = run(capsys, "sample", folder, "--steps", 2, "--count", 2, "--prompt",
                        "a cat", "--out", tmp_path / "plain.npy")
    assert rc == 0, err
    assert not np.array_equal(np.load(out), np.load(tmp_path / "plain.npy"))  # cfg acts
    # the condition: the encoder's states, the empty prompt's as the null context
    from difflab.commands.model import load_diffusers_model

    model = load_diffusers_model(folder, prompts=["a cat"])
    cond = model.guided.labels(3)
    enc = model.guided.encoder
    assert cond.context.shape == (3, 16, 12) and bool(cond.context_mask.all())
    torch.testing.assert_close(cond.null_context, enc.encode([""]).states)
    torch.testing.assert_close(cond.context[:1], enc.encode(["a cat"]).states)
    # tune-grid on prompts: stored beside the folder for its w; prompted sampling at that w
    # runs it, at another w the probe
    from difflab.commands.model import choose_solver, prompt_fits

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    before = snapshot(folder)
    rc, text, err = run(capsys, "tune-grid", folder, "--sampler", "dpmpp_2m", "--steps", 2,
                        "--count", 4, "--reference-steps", 10, "--max-evals", 10, "--cfg", 2,
                        "--prompts-file", tmp_path / "p.txt")
    assert rc == 0, err
    assert "on 2 prompts" in text and snapshot(folder) == before
    stored = json.loads((interop.fits_folder(folder) / "fits.json").read_text())["fits"]
    assert sorted(stored) == ["dpmpp_2m/2/ema/cfg=2"]
    assert choose_solver(folder, "auto", 2, guidance=prompt_fits(2.0)).source == "tuned"
    assert choose_solver(folder, "auto", 2, guidance=prompt_fits(1.0)).source == "probe"
    # the same pipeline with a ControlNet: --control-image is its controlnet_cond
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)) \
        .save_pretrained(folder / "controlnet", safe_serialization=True)
    index(folder, unet=("diffusers", "UNet2DConditionModel"),
          scheduler=("diffusers", "DDIMScheduler"), controlnet=("diffusers", "ControlNetModel"),
          text_encoder=("transformers", "CLIPTextModel"),
          tokenizer=("transformers", "CLIPTokenizer"))
    capsys.readouterr()
    rc, _, err = run(capsys, "sample", folder, "--steps", 2, "--count", 2, "--prompt", "a cat",
                     "--out", tmp_path / "c.npy")
    assert rc == 2 and "--control-image" in err
    np.save(tmp_path / "control.npy", np.zeros((16, 16, 3), np.uint8))
    rc, _, err = run(capsys, "sample", folder, "--steps", 2, "--count", 2, "--prompt", "a cat",
                     "--control-image", tmp_path / "control.npy", "--out", tmp_path / "c.npy")
    assert rc == 0, err
    # zero-initialised ControlNet outputs: the plain pipeline's samples
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.load(tmp_path / "plain.npy"))


# --- pickle: refused unopened by every command --------------------------------------------------
class _Marker:
    """Unpickling this touches a file: proof that a pickle was (not) opened."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_pickle_only_folders_are_refused_unopened_by_every_command(layout, tmp_path, capsys,
                                                                     monkeypatch):
    folder = model_folder(tmp_path / "m")
    if layout == "pipeline":
        root = tmp_path / "p"
        root.mkdir()
        folder.rename(root / "unet")
        (root / "scheduler").mkdir()
        (root / "unet" / "scheduler_config.json").rename(
            root / "scheduler" / "scheduler_config.json")
        index(root, unet=("diffusers", "UNet2DModel"), scheduler=("diffusers", "DDIMScheduler"))
        folder, weights_dir = root, root / "unet"
    else:
        weights_dir = folder
    (weights_dir / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "opened"
    (weights_dir / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))

    def never(*a, **k):
        raise AssertionError("diffusers was called")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", never)
    before = snapshot(folder)
    for argv in (["sample", folder, "--out", tmp_path / "x.png"],
                 ["eval", folder, "--num", 4],
                 ["tune-grid", folder, "--steps", 3]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2, (argv[0], err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert "pickle" in lines[0] and "safetensors" in lines[0]
        assert "save_pretrained(folder, safe_serialization=True)" in lines[0]
    assert not marker.exists()
    assert snapshot(folder) == before
    assert not (tmp_path / "x.png").exists() and not interop.fits_folder(folder).exists()


def test_class_conditional_folder_cycles_labels_and_names_what_is_missing(tmp_path, capsys):
    torch.manual_seed(0)
    folder = tmp_path / "c"
    diffusers.UNet2DModel(**TINY, num_class_embeds=4).save_pretrained(
        folder, safe_serialization=True)
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(folder)
    rc, _, err = run(capsys, "sample", folder, "--steps", 2, "--count", 4, "--label", 2,
                     "--out", tmp_path / "a.npy")
    assert rc == 0, err
    rc, _, err = run(capsys, "sample", folder, "--steps", 2, "--count", 4, "--label", 7,
                     "--out", tmp_path / "b.npy")
    assert rc == 2 and "--label 7" in err and "0..3" in err
    rc, _, err = run(capsys, "sample", folder, "--steps", 2, "--cfg", 1, "--out",
                     tmp_path / "b.npy")
    assert rc == 2 and "--cfg" in err and "null" in err and not (tmp_path / "b.npy").exists()
    rc, _, err = run(capsys, "tune-grid", folder, "--steps", 2, "--cfg", 1)
    assert rc == 2 and "--cfg" in err and "null" in err
    assert not interop.fits_folder(folder).exists()
    before = snapshot(folder)  # no --cfg: its conditional sampling, class i mod 4 for draw i
    rc, out, err = run(capsys, "tune-grid", folder, "--steps", 2, "--count", 4,
                       "--reference-steps", 10, "--max-evals", 10)
    assert rc == 0, err
    assert "4-class sampling (draw i: class i mod 4) with no guidance" in out \
        and "/ema/cfg=0" in out
    fits = json.loads((interop.fits_folder(folder) / "fits.json").read_text())["fits"]
    assert sorted(fits) == ["unipc/2/ema/cfg=0"] and snapshot(folder) == before
