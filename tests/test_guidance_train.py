"""Noise-aware classifier training, its checkpoint, and guided sampling of a checkpoint
(:mod:`difflab.commands.guidance`: the typed options, their checks, and the CLI flags).

Data: a two-component Gaussian mixture of 8x8 "images" (horizontal versus vertical stripes,
per-pixel std 0.3), so that the exact unconditional denoiser (difflab.toy) is available and a
tiny classifier can be trained in seconds.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import difflab
from difflab.commands.common import ParameterError
from difflab.commands.guidance import Guidance, add_guidance_args, guidance_from_args, guide
from difflab.commands.train_classifier import register
from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance
from difflab.schedules import cosine
from difflab.toy import GaussianMixture
from difflab.train.classifier import (
    classifier_accuracy_at,
    classifier_config,
    load_classifier,
    train_classifier,
)

RES, AMP, STD = 8, 0.7, 0.3


def stripes_mixture() -> GaussianMixture:
    rows = torch.arange(RES).view(RES, 1).expand(RES, RES)
    horizontal = AMP * (1 - 2 * (rows % 2)).double()
    vertical = horizontal.T.contiguous()
    return GaussianMixture(torch.stack([horizontal.flatten(), vertical.flatten()]), STD)


def data_section() -> dict:
    return {"name": "stripes", "resolution": RES, "channels": 1, "num_classes": 2}


def images_labels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = stripes_mixture().sample(n, torch.Generator().manual_seed(seed))
    return x.float().view(n, 1, RES, RES), y


TINY_NET = {"type": "classifier", "in_channels": 1, "num_classes": 2, "model_channels": 8,
            "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
            "image_size": RES, "pool": "adaptive"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classifier trained for 150 steps (a few seconds) and its summary."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("clf")
    schedule = cosine()
    cfg = classifier_config(data_section(), schedule.config(), TINY_NET,
                            {"steps": 150, "batch_size": 64, "lr": 3e-3, "warmup": 10,
                             "ema_decay": 0.9, "eval_times": [0.05, 1.0], "eval_count": 600,
                             "log_every": 50})
    summary = train_classifier(cfg, out, data=images_labels(4096, 0),
                               eval_data=images_labels(600, 1), device="cpu")
    return out, summary, schedule


def test_classifier_learns_and_is_at_chance_at_pure_noise(trained):
    _, summary, _ = trained
    acc = summary["accuracy"]
    # at t = 0.05 the classes are separable (means differ by 1.4 in 64 pixels, std 0.3):
    # the Bayes accuracy is ~1; an untrained or label-blind net stays at 0.5
    assert acc["0.05"] > 0.95
    # at t = 1, alpha ~ 1e-4: x_t carries no label information, so accuracy is chance 0.5;
    # with 600 test images its std is 0.02, so 0.1 is a 5-sigma band
    assert abs(acc["1.0"] - 0.5) < 0.1
    assert summary["steps"] == 150 and math.isfinite(summary["loss"])


def test_classifier_checkpoint_round_trip(trained):
    out, summary, schedule = trained
    net, config = load_classifier(out)
    assert config["kind"] == "classifier"
    assert config["data"]["name"] == "stripes" and config["data"]["num_classes"] == 2
    assert config["schedule"] == schedule.config()
    raw = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert raw["kind"] == "classifier" and raw["config"]["net"] == TINY_NET
    assert "prediction" not in raw["config"]  # no fake diffusion entry to pass a loader check
    x, y = images_labels(600, 1)
    # the reloaded (EMA) weights reproduce the accuracy measured right after training
    assert classifier_accuracy_at(net, schedule, x, y, 0.05) == pytest.approx(
        summary["accuracy"]["0.05"], abs=1e-12)
    assert not any(p.requires_grad for p in net.parameters())


def test_load_classifier_refuses_a_diffusion_checkpoint(tmp_path):
    from difflab.train.checkpoint import save_checkpoint

    net = difflab.nets.build({"type": "mlp", "dim": 4, "hidden": 8, "depth": 1})
    save_checkpoint(tmp_path / "ck", config={"net": net.config, "schedule": cosine().config(),
                                             "prediction": "eps"}, model=net.state_dict())
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "ck")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")


# --- guide ----------------------------------------------------------------------------------
def parse(*argv: str) -> Guidance:
    """The typed options of command-line flags (add_guidance_args + guidance_from_args)."""
    p = argparse.ArgumentParser()
    add_guidance_args(p)
    return guidance_from_args(p.parse_args(list(argv)))


def guided_denoiser(den, config: dict, guidance: Guidance, n: int):
    """(guided denoiser, labels of n samples or None)."""
    guided = guide(den, config, guidance)
    return guided.denoiser, guided.labels(n)


def model_config(conditional: bool, **data) -> dict:
    return {"net": {"type": "mlp", "num_classes": 2 if conditional else None},
            "schedule": cosine().config(), "prediction": "x0",
            "data": data_section() | data, "train": {"conditional": conditional}}


def exact_denoiser():
    return stripes_mixture().denoiser(cosine(), "x0")


def test_guidance_args_conventions_and_stacking(trained):
    out, _, _ = trained
    den, cond = guided_denoiser(exact_denoiser(), model_config(True), parse("--cfg", "2"), 5)
    # the null half is the condition's null (label -1, the learned null label)
    assert isinstance(den, ClassifierFreeGuidance) and den.w == 2.0 and den.uncond is None
    assert cond.tolist() == [0, 1, 0, 1, 0]
    # w = 0 is unguided: the plain conditional denoiser with labels
    base = exact_denoiser()
    den, cond = guided_denoiser(base, model_config(True), parse("--label", "1"), 3)
    assert den is base and cond.tolist() == [1, 1, 1]
    # unconditional model without guidance: no labels at all
    den, cond = guided_denoiser(base, model_config(False), parse(), 3)
    assert den is base and cond is None
    # classifier guidance on top of CFG for a conditional model, label passed through
    den, cond = guided_denoiser(base, model_config(True),
                                parse("--cfg", "1", "--classifier", str(out),
                                      "--classifier-scale", "3"), 2)
    assert isinstance(den, ClassifierGuidance) and den.scale == 3.0 and den.pass_cond
    assert isinstance(den.denoiser, ClassifierFreeGuidance)
    # --guidance is an alias of --cfg; an existing --label option is kept, not duplicated
    p = argparse.ArgumentParser()
    p.add_argument("--label", type=int, default=7)
    add_guidance_args(p)
    ns = p.parse_args(["--guidance", "0.5"])
    assert ns.cfg == 0.5 and ns.label == 7


@pytest.mark.parametrize("argv, config, match", [
    (("--label", "2"), model_config(True), r"outside the trained classes: valid labels are 0\.\.1"),
    (("--label", "-1"), model_config(True), "outside the trained classes"),
    (("--cfg", "2"), model_config(False), "needs a class-conditional checkpoint"),
    (("--label", "0"), model_config(False), "needs a class-conditional checkpoint"),
    (("--cfg", "-1"), model_config(True), "must be >= 0"),
    (("--cfg", "nan"), model_config(True), "finite"),
    (("--cfg-rescale", "0.7"), model_config(True), "give cfg W > 0"),
    (("--cfg", "1", "--cfg-rescale", "2"), model_config(True), r"\[0, 1\]"),
    (("--classifier-scale", "2"), model_config(False), "needs classifier"),
])
def test_guided_denoiser_rejects_bad_options(argv, config, match):
    with pytest.raises(ValueError, match=match):
        guided_denoiser(exact_denoiser(), config, parse(*argv), 4)


def test_guidance_errors_name_the_parameter_and_render_flags():
    """The library names its parameters; a front end renders its own names for them."""
    with pytest.raises(ParameterError) as e:
        guide(exact_denoiser(), model_config(True), Guidance(cfg_rescale=0.5))
    assert str(e.value) == "cfg_rescale only changes guided predictions; give cfg W > 0"
    assert e.value.params == ["cfg_rescale", "cfg"]
    flags = {"cfg": "--cfg", "cfg_rescale": "--cfg-rescale"}
    assert e.value.render(flags) == ("--cfg-rescale only changes guided predictions; give "
                                     "--cfg W > 0")
    with pytest.raises(ParameterError, match=r"^classifier_scale must be >= 0, got -1\.0$"):
        guide(exact_denoiser(), model_config(False), Guidance(classifier="x",
                                                               classifier_scale=-1))


@pytest.mark.parametrize("change, match", [
    ({"data": {"name": "fashion_mnist"}}, "data set 'stripes'.*'fashion_mnist'"),
    ({"data": {"resolution": 16}}, "resolution"),
    ({"data": {"channels": 3}}, "channel count"),
    ({"data": {"num_classes": 10}}, "2 classes"),
    ({"schedule": {"type": "linear", "timesteps": 1000}}, "noise schedule"),
])
def test_guided_denoiser_rejects_mismatched_classifier(trained, change, match):
    out, _, _ = trained
    cfg = model_config(False)
    for section, values in change.items():
        cfg[section] = (cfg[section] | values) if section == "data" else values
    with pytest.raises(ValueError, match=match) as e:
        guided_denoiser(exact_denoiser(), cfg, parse("--classifier", str(out)), 4)
    assert "difflab train-classifier --like" in str(e.value)


def test_classifier_path_must_be_a_classifier(tmp_path):
    with pytest.raises(FileNotFoundError):
        guided_denoiser(exact_denoiser(), model_config(False),
                        parse("--classifier", str(tmp_path / "nope")), 4)


def nearest_component(x: torch.Tensor) -> torch.Tensor:
    means = stripes_mixture().means.float()
    return torch.cdist(x.view(len(x), -1), means).argmin(1)


def test_classifier_guidance_with_trained_classifier_moves_samples_to_the_class(trained):
    """Exact unconditional denoiser + trained classifier through the CLI glue: unguided
    samples split ~50/50 between the two components; guided towards label 1 they land there.
    """
    out, _, _ = trained
    n = 200
    noise = torch.randn(n, 1, RES, RES, generator=torch.Generator().manual_seed(0))
    results = {}
    for scale in ("0", "2"):
        den, cond = guided_denoiser(exact_denoiser(), model_config(False),
                                    parse("--classifier", str(out), "--classifier-scale",
                                          scale, "--label", "1", "--classifier-t-max", "0.95"),
                                    n)
        x = difflab.sample(den, noise, "dpmpp_2m", steps=10, cond=cond,
                           generator=torch.Generator().manual_seed(1))
        results[scale] = float((nearest_component(x) == 1).float().mean())
    # unguided: component 1 with probability 1/2 (binomial std 0.035 at n = 200); guided:
    # far above (the 150-step classifier is 73% accurate at t = 0.9, where the sample's
    # component is mostly decided, so it does not reach the exact classifier's 100%).
    # t_max = 0.95: this weak classifier's gradient at t = 0.9755 (alpha 0.04) still hurts
    assert abs(results["0"] - 0.5) < 0.15
    assert results["2"] > 0.68


def test_classifier_guidance_interval_switches_guidance_off_near_pure_noise(trained):
    """Above --classifier-t-max the guided prediction is exactly the unguided one; below it
    differs (the limit exists because the 1 / alpha_t amplification at t = 1, see
    limit_log_prob)."""
    out, _, _ = trained
    base = exact_denoiser()
    den, cond = guided_denoiser(base, model_config(False),
                                parse("--classifier", str(out), "--classifier-scale", "2",
                                      "--label", "1", "--classifier-t-max", "0.9"), 8)
    x = torch.randn(8, 1, RES, RES, generator=torch.Generator().manual_seed(2))
    for t, same in ((1.0, True), (0.95, True), (0.9, False), (0.5, False)):
        guided, plain = den.predict(x, t, cond).eps, base.predict(x, t).eps
        assert torch.equal(guided, plain) == same, t
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        guided_denoiser(base, model_config(False),
                        parse("--classifier", str(out), "--classifier-t-max", "0"), 8)


def test_train_classifier_cli_registers(tmp_path):
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    ns = p.parse_args(["train-classifier", "--data", "digits", "--steps", "5",
                       "--out", str(tmp_path / "c")])
    assert ns.func.__name__ == "cmd_train_classifier" and ns.steps == 5
    # flags become the typed config of difflab.commands.train_classifier
    from difflab.commands.train_classifier import classifier_training_config

    cfg = classifier_training_config(data="digits", steps=5, overrides=["net.model_channels=8"])
    assert cfg["data"]["name"] == "digits" and cfg["train"]["steps"] == 5
    assert cfg["net"]["model_channels"] == 8
    with pytest.raises(ValueError, match="overrides x=1: keys start with net."):
        classifier_training_config(overrides=["x=1"])
    with pytest.raises(FileNotFoundError, match="like"):
        classifier_training_config(like=tmp_path / "missing")


def test_classifier_config_validation():
    with pytest.raises(ValueError, match="unknown classifier train option"):
        classifier_config(data_section(), cosine().config(), TINY_NET, {"stepz": 3})
    with pytest.raises(ValueError, match="num_classes"):
        classifier_config(data_section() | {"num_classes": None}, cosine().config())
    cfg = classifier_config(data_section(), cosine().config())
    assert cfg["net"]["type"] == "classifier" and cfg["net"]["num_classes"] == 2
