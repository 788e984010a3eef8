"""diffusers-format models in and out (issue #17), against diffusers itself: tiny random models
built here and saved with ``save_pretrained(safe_serialization=True)`` (nothing downloaded).

Parity is measured relative to the output's scale (max |a - b| / max |b|): diffusers computes
its schedule tables in float32 and difflab in float64, so agreement is to float32 round-off."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import difflab  # noqa: E402
from difflab import interop, schedules  # noqa: E402
from difflab import samplers as S  # noqa: E402
from difflab.denoiser import Condition, Denoiser, parameterization  # noqa: E402
from difflab.nets.unet import UNet  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
TINY = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
            attention_head_dim=8)
F32_TOL = 1e-5  # relative: float32 round-off (measured <= 3e-6; a wrong index or formula: > 1e-3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def tiny_unet(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**{**TINY, **kw}).eval()


def save(folder: Path, unet: torch.nn.Module, scheduler) -> Path:
    unet.save_pretrained(folder, safe_serialization=True)
    scheduler.save_pretrained(folder)
    return folder


def noise(shape=(2, 3, 8, 8), seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


# --- the scheduler config --------------------------------------------------------------------
BETAS = {"linear": {}, "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012},
         "squaredcos_cap_v2": {}, "sigmoid": {},
         "trained": {"trained_betas": torch.linspace(2e-4, 0.03, 1000).tolist()}}


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kind", sorted(BETAS))
def test_every_beta_schedule_maps_to_diffusers_alphas_cumprod(kind, zero_snr):
    """DDPMScheduler's alphas_cumprod (float32) = the difflab schedule's (float64) at the
    DDPM indices, and the network time there is the index itself."""
    kw = dict(BETAS[kind], rescale_betas_zero_snr=zero_snr)
    if kind != "trained":
        kw["beta_schedule"] = kind
    ref = diffusers.DDPMScheduler(**kw)
    m = interop.from_scheduler_config(dict(ref.config))
    s = m.schedule
    assert s.num_steps == 1000 and m.prediction.name == "eps"
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5,
                               atol=2e-7)
    idx = torch.tensor([0, 1, 499, 998, 999], dtype=torch.float64)
    torch.testing.assert_close(s.net_time((idx + 1) / 1000), idx, rtol=0, atol=1e-9)
    assert (float(s.alpha(1.0)) == 0.0) == zero_snr
    # the mapped schedule rebuilds from its own config (checkpoints store it)
    assert schedules.from_config(json.loads(json.dumps(s.config()))).config() == s.config()


def test_prediction_types_and_sampling_options():
    for diff, ours in (("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")):
        sched = diffusers.DDIMScheduler(prediction_type=diff)
        m = interop.from_scheduler_config({**sched.config, "_class_name": "DDIMScheduler"})
        assert m.prediction.name == ours and m.scheduler_class == "DDIMScheduler"
        assert m.sampling_options["clip_sample"] is True  # reported, never applied
    with pytest.raises(ValueError, match="valid"):
        interop.from_scheduler_config({"beta_schedule": "exp"})
    with pytest.raises(ValueError, match="continuous"):
        interop.from_scheduler_config(dict(diffusers.EulerDiscreteScheduler(
            prediction_type="v_prediction", timestep_type="continuous").config))


def test_flow_scheduler_configs_map_to_rectified_flow():
    m = interop.from_scheduler_config(dict(diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0).config))
    assert isinstance(m.schedule, schedules.RectifiedFlowSchedule)
    assert m.schedule.shift == 3.0 and m.schedule.time_scale == 1000.0
    assert m.prediction.name == "flow"
    dyn = dict(diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15).config)
    with pytest.raises(ValueError, match="image_seq_len"):
        interop.from_scheduler_config(dyn)
    s = interop.from_scheduler_config(dyn, image_seq_len=4096).schedule
    assert s.shift == pytest.approx(math.exp(1.15), rel=1e-12)
    assert interop.from_scheduler_config(dyn, shift=2.5).schedule.shift == 2.5
    # DPM-Solver / UniPC configs of flow models (use_flow_sigmas, flow_shift)
    m = interop.from_scheduler_config(dict(diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction").config))
    assert m.schedule.shift == 5.0 and m.prediction.name == "flow"
    m = interop.from_scheduler_config(dict(diffusers.EDMEulerScheduler(sigma_data=0.6).config))
    assert isinstance(m.schedule, schedules.EDMSchedule) and m.prediction.sigma_data == 0.6


# --- the network and its outputs -------------------------------------------------------------
def diffusers_x0_eps(sched, out: torch.Tensor, x: torch.Tensor, k: int):
    """x0 by diffusers' own DDIMScheduler.step, eps by its formulas (scheduling_ddim.py), with
    its alpha_bar table accumulated in float64 from its betas: its float32 cumprod alone is off
    by up to 2e-5 (relative) in 1 - alpha_bar near t = 0, which eps = (x - sqrt(ab) x0) /
    sqrt(1 - ab) amplifies."""
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    sched.set_timesteps(10)
    x0 = sched.step(out, k, x).pred_original_sample
    a, b = sched.alphas_cumprod[k], 1 - sched.alphas_cumprod[k]
    kind = sched.config.prediction_type
    eps = {"epsilon": out, "sample": (x - a**0.5 * out) / b**0.5,
           "v_prediction": a**0.5 * out + b**0.5 * x}[kind]
    return x0, eps


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_denoiser_outputs_equal_diffusers_conversions(kind, unet, tmp_path):
    sched = diffusers.DDIMScheduler(prediction_type=kind, clip_sample=False)
    den = difflab.from_diffusers(save(tmp_path, unet, sched))  # the front door
    assert difflab.from_diffusers is interop.from_diffusers
    x = noise()
    with torch.no_grad():
        for k in (999, 500, 10):
            out = unet(x, k).sample
            x0, eps = diffusers_x0_eps(sched, out, x, k)
            pred = den.predict(x, (k + 1) / 1000)
            assert rel(pred.x0, x0) < F32_TOL and rel(pred.eps, eps) < F32_TOL, k
            v = sched.get_velocity(x0, eps, torch.tensor([k]))  # v = sqrt(ab) eps - ...
            assert rel(pred.v, v) < F32_TOL
        # a fractional time reaches diffusers' time embedding unrounded
        torch.testing.assert_close(den.net(x, torch.full((2,), 499.5)),
                                   unet(x, torch.tensor(499.5)).sample, rtol=0, atol=0)
        assert float((den.net(x, torch.full((2,), 499.5)) - unet(x, 499).sample).abs().max()) \
            > 1e-6


def diffusers_loop(unet, sched, x, steps: int, **set_kw) -> torch.Tensor:
    sched.set_timesteps(steps, **set_kw)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddim_trailing_equals_diffusers_ddim(kind, unet, tmp_path):
    """DDIM, eta = 0, trailing grid: difflab = DDIMScheduler(timestep_spacing="trailing",
    clip_sample=False, set_alpha_to_one=True). difflab's grid ends at t = 0 (alpha = 1), which
    is set_alpha_to_one=True; with False diffusers' last step stops at alpha_bar_0."""
    sched = diffusers.DDIMScheduler(prediction_type=kind, timestep_spacing="trailing",
                                    clip_sample=False, set_alpha_to_one=True)
    den = interop.from_diffusers(save(tmp_path, unet, sched))
    x = noise()
    for steps in (10, 50):
        ref = diffusers_loop(unet, sched, x, steps)
        ours = S.sample(den, x, "ddim", steps, spacing="trailing")
        assert rel(ours, ref) < 1e-5, (steps, rel(ours, ref))
    off = diffusers.DDIMScheduler.from_config(sched.config, set_alpha_to_one=False)
    assert rel(ours, diffusers_loop(unet, off, x, 50)) > 20 * rel(ours, ref)


def test_dpmpp_2m_linspace_equals_diffusers_dpm_solver_multistep(unet, tmp_path):
    """DPM-Solver++(2M) on diffusers' default "linspace" indices (timesteps round(linspace(0,
    T - 1, n + 1)), last dropped) with a first-order step to sigma = 0: difflab's dpmpp_2m on
    spacing="linspace" with final="x0" = DPMSolverMultistepScheduler(final_sigmas_type="zero")
    on the same noise, at step counts with and without diffusers' lower_order_final."""
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=2, final_sigmas_type="zero")
    assert sched.config.timestep_spacing == "linspace"
    den = interop.from_diffusers(save(tmp_path, unet, sched))
    x = noise()
    for steps in (7, 20):
        ref = diffusers_loop(unet, sched, x, steps)
        ts = S.timesteps(den.schedule, steps, "linspace")
        assert (den.schedule.net_time(ts[:-1]).round() == sched.timesteps.double()).all()
        ours = S.sample(den, x, "dpmpp_2m", steps, spacing="linspace", final="x0")
        assert rel(ours, ref) < 1e-5, (steps, rel(ours, ref))
        assert not torch.equal(ts, S.timesteps(den.schedule, steps, "trailing"))


@pytest.mark.parametrize("dynamic", [False, True])
def test_euler_on_a_flow_model_equals_flow_match_euler(dynamic, unet, tmp_path):
    """difflab's Euler on diffusers' own sigmas (mapped to difflab times by the schedule) =
    FlowMatchEulerDiscreteScheduler with the same shift, fixed (SD3) or dynamic (Flux)."""
    if dynamic:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
            base_shift=0.5, max_shift=1.15)
        m = interop.load_diffusers(save(tmp_path, unet, sched), image_seq_len=1024)
        set_kw = {"mu": math.log(schedules.dynamic_shift(1024))}
    else:
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        m = interop.load_diffusers(save(tmp_path, unet, sched))
        set_kw = {}
    x = noise()
    for steps in (4, 28):
        ref = diffusers_loop(unet, sched, x, steps, **set_kw)
        grid = m.schedule.t_from_sigma(sched.sigmas.double())
        assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
        ours = S.sample(m.denoiser, x, "euler", grid=grid)
        assert rel(ours, ref) < 1e-5, (steps, rel(ours, ref))


def test_zero_terminal_snr_model_maps_to_a_zero_terminal_snr_schedule(unet, tmp_path):
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, rescale_betas_zero_snr=True,
                                    prediction_type="v_prediction", clip_sample=False,
                                    timestep_spacing="trailing")
    m = interop.load_diffusers(save(tmp_path / "v", unet, sched))
    s = m.schedule
    assert s.config()["zero_terminal_snr"] is True and float(s.alpha(1.0)) == 0.0
    assert math.isinf(s.sigma_max_ratio())
    torch.testing.assert_close(s.alphas_cumprod, sched.alphas_cumprod.double(), rtol=2e-5,
                               atol=2e-7)
    x = noise()
    ref = diffusers_loop(unet, sched, x, 10)
    assert rel(S.sample(m.denoiser, x, "ddim", 10, spacing="trailing"), ref) < 1e-5
    # an eps model cannot be sampled from alpha = 0 (PITFALLS): refused, not NaN
    eps = diffusers.DDIMScheduler.from_config(sched.config, prediction_type="epsilon")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        interop.load_diffusers(save(tmp_path / "eps", unet, eps))


# --- safetensors only --------------------------------------------------------------------
class _Marker:
    """Unpickling this touches a file: proof that a pickle was (not) opened."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_weights_are_refused_unopened(unet, tmp_path, monkeypatch):
    folder = save(tmp_path / "m", unet, diffusers.DDIMScheduler())
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    marker = tmp_path / "opened"
    for name in ("diffusion_pytorch_model.bin", "model.ckpt"):
        (folder / name).write_bytes(pickle.dumps(_Marker(marker)))

    def never(*a, **k):
        raise AssertionError("diffusers was called")

    monkeypatch.setattr(diffusers.UNet2DModel, "from_pretrained", never)
    with pytest.raises(interop.PickleRefused, match="safe_serialization=True") as e:
        interop.from_diffusers(folder)
    assert "diffusion_pytorch_model.bin" in str(e.value) and "use_safetensors" in str(e.value)
    with pytest.raises(interop.PickleRefused):
        interop.from_diffusers(folder / "model.ckpt")
    assert not marker.exists()
    (folder / "diffusion_pytorch_model.bin").unlink()
    (folder / "model.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        interop.from_diffusers(folder)


def test_safetensors_is_chosen_beside_a_pickle(unet, tmp_path):
    folder = save(tmp_path, unet, diffusers.DDIMScheduler())
    marker = tmp_path / "opened"
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Marker(marker)))
    den = interop.from_diffusers(folder)
    x = noise()
    with torch.no_grad():
        assert rel(den.predict(x, 0.5).eps, unet(x, 499).sample) == 0.0
    assert not marker.exists()


# --- pipeline folders, text conditioning, classes, learned variance -------------------------
def test_pipeline_folder_with_a_text_unet(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
        norm_num_groups=4, attention_head_dim=4).eval()
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012, clip_sample=False)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    sched.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "vae": [None, None]}))
    m = interop.load_diffusers(tmp_path)
    assert m.model_class == "UNet2DConditionModel" and m.sample_shape == (4, 8, 8)
    assert m.schedule.config()["type"] == "scaled_linear"
    x = noise((2, 4, 8, 8))
    ctx = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        ref = unet(x, 699, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        got = m.denoiser.predict(x, 0.7, Condition(context=ctx, context_mask=mask)).eps
        assert rel(got, ref) < F32_TOL
        with pytest.raises(ValueError, match="needs context"):
            m.denoiser.predict(x, 0.7)


def test_class_labels_null_label_and_learned_variance(tmp_path):
    unet = tiny_unet(out_channels=6, num_class_embeds=4)
    sched = diffusers.DDPMScheduler(variance_type="learned_range")
    folder = save(tmp_path, unet, sched)
    m = interop.load_diffusers(folder, null_label=3)
    x, labels = noise(), torch.tensor([0, 2])
    with torch.no_grad():
        out = unet(x, 299, class_labels=labels).sample
        assert rel(m.denoiser.predict(x, 0.3, labels).eps, out[:, :3]) == 0.0
        null = unet(x, 299, class_labels=torch.tensor([3, 3])).sample[:, :3]
        assert rel(m.denoiser.predict(x, 0.3, torch.tensor([-1, -1])).eps, null) == 0.0
        assert rel(m.denoiser.predict(x, 0.3).eps, null) == 0.0
    with pytest.raises(ValueError, match="null_label"):
        interop.from_diffusers(folder).predict(x, 0.3, torch.tensor([-1, 0]))
    with pytest.raises(NotImplementedError, match="UNet2DModel"):
        (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
        interop.from_diffusers(folder)


# --- export ------------------------------------------------------------------------------
EXPORTABLE = {
    "linear_eps": (schedules.linear(), "eps"),
    "scaled_linear_x0": (schedules.scaled_linear(), "x0"),
    "linear_ztsnr_v": (schedules.linear(zero_terminal_snr=True), "v"),
    "cosine_v": (schedules.cosine(), "v"),
    "cosine_s_v": (schedules.cosine(s=0.02), "v"),
    "sigmoid_eps": (schedules.sigmoid(), "eps"),
    "betas_v": (schedules.from_betas(torch.linspace(1e-4, 0.03, 500)), "v"),
    "flow": (schedules.rectified_flow(3.0), "flow"),
    "edm": (schedules.edm(0.002, 80.0, 7.0), parameterization.EDM(0.5)),
}


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_scheduler_config_export_round_trips(name):
    """difflab -> diffusers scheduler config -> diffusers' scheduler (its tables agree) and ->
    difflab again (the same schedule and prediction)."""
    schedule, prediction = EXPORTABLE[name]
    cfg = interop.scheduler_config(schedule, prediction)
    back = interop.from_scheduler_config(json.loads(json.dumps(cfg)))
    assert back.prediction.config() == parameterization.get(prediction).config()
    t = torch.linspace(0, 1, 257, dtype=torch.float64)
    for a, b in zip(back.schedule.alpha_sigma(t), schedule.alpha_sigma(t)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sched = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    if schedule.num_steps is not None:
        torch.testing.assert_close(sched.alphas_cumprod.double(), schedule.alphas_cumprod,
                                   rtol=2e-5, atol=2e-7)


def test_what_diffusers_cannot_express_is_refused():
    with pytest.raises(ValueError, match="continuous-time"):
        interop.scheduler_config(schedules.cosine_continuous(), "v")
    with pytest.raises(ValueError, match="prediction"):
        interop.scheduler_config(schedules.linear(), "score")
    with pytest.raises(ValueError, match="EDM preconditioning"):
        interop.scheduler_config(schedules.edm(), "x0")
    with pytest.raises(ValueError, match="velocity"):
        interop.scheduler_config(schedules.rectified_flow(), "v")


def random_unet(**kw) -> UNet:
    torch.manual_seed(0)
    net = UNet(**{**dict(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                         attention_resolutions=(4,), image_size=8, num_heads=2), **kw})
    with torch.no_grad():  # zero-initialised output layers would make the check vacuous
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


@pytest.mark.parametrize("kw", [{}, {"scale_shift_norm": False, "num_classes": 3}],
                         ids=["scale_shift", "classes"])
def test_unet_export_opens_in_diffusers_with_the_same_output(kw, tmp_path):
    net = random_unet(**kw)
    den = Denoiser(net, schedules.linear(), "v")
    ex = interop.to_diffusers(den, tmp_path)
    assert ex.reason is None and "diffusion_pytorch_model.safetensors" in ex.files
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path, use_safetensors=True).eval()
    x, t = noise(), torch.tensor([999.0, 123.5])
    labels = torch.tensor([0, 3]) if kw else None  # 3 = K: difflab's null label row
    with torch.no_grad():
        assert rel(unet(x, t, class_labels=labels).sample, net(x, t, labels)) < F32_TOL
        # and back: from_diffusers gives the same denoiser
        back = interop.from_diffusers(tmp_path, null_label=3 if kw else None)
        lab = None if labels is None else torch.tensor([0, -1])
        assert rel(back.predict(x, 0.4, lab).x0, den.predict(x, 0.4, lab).x0) < F32_TOL
        assert back.parameterization.name == "v"
    # a loaded diffusers model exports as itself
    again = interop.to_diffusers(back, tmp_path / "again")
    assert again.reason is None and again.scheduler_config == ex.scheduler_config
    assert interop.load_diffusers(tmp_path / "again").model_config["block_out_channels"] == \
        [32, 64]


def test_unets_that_do_not_map_export_the_scheduler_with_a_reason(tmp_path):
    den = Denoiser(random_unet(context_dim=8), schedules.linear(), "eps")
    ex = interop.to_diffusers(den, tmp_path)
    assert ex.files == ("scheduler_config.json",) and "transformer blocks" in ex.reason
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(NotImplementedError, match="time_scale"):
        interop.unet_to_diffusers(random_unet(time_scale=1000.0))
    with pytest.raises(NotImplementedError, match="groups"):
        interop.unet_to_diffusers(random_unet(model_channels=16))
