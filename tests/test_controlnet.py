"""ControlNet (nets/controlnet.py): zero-initialised control is the base bit for bit, scale 0
and an interval outside the grid are the base, several ControlNets sum, the hint encoder reaches
the first feature resolution at every U-Net configuration, training never touches the base, and
CFG keeps the control image in both halves with every sampler."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab import guidance, schedules
from difflab import samplers as S
from difflab.denoiser import Condition, Denoiser
from difflab.denoiser.parameterization import EDM, get
from difflab.nets import build
from difflab.nets.controlnet import (
    GUESS_MODE_DECAY,
    ControlledUNet,
    ControlNet,
    ControlSettings,
    time_schedule,
)
from difflab.nets.unet import UNet

SCHEDULE = schedules.linear()
B, K_CLASSES, D_CTX = 2, 3, 8
STEPS = 6  # few enough to be quick, enough that no sampler warns about a large first step


def small_unet(seed: int = 0, **kw) -> UNet:
    torch.manual_seed(seed)
    cfg = dict(in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(6,), image_size=12, num_classes=K_CLASSES,
               context_dim=D_CTX, num_heads=2)
    cfg.update(kw)
    net = UNet(**cfg)
    with torch.no_grad():  # a "trained" base: its zero-initialised output layers made nonzero
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.1)
    return net


def perturb(cn: ControlNet, seed: int = 1, std: float = 0.3) -> ControlNet:
    """Give the zero convolutions (and the hint's last conv) random weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in list(cn.zero_convs) + [cn.hint[-1]]:
            for p in conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return cn


def inputs(seed: int = 0, n: int = B, size: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    t = torch.tensor([37.0, 801.5][:n] + [500.0] * max(0, n - 2))
    labels = torch.randint(0, K_CLASSES, (n,), generator=g)
    context = torch.randn(n, 4, D_CTX, generator=g)
    control = torch.rand(n, 1, size, size, generator=g)
    return x, t, labels, context, control


def test_at_initialisation_the_output_is_the_base_bit_for_bit():
    base = small_unet()
    cn = ControlNet.from_unet(base)
    two = ControlledUNet(base, [cn, ControlNet.from_unet(base)])
    x, t, labels, context, _ = inputs()
    want = base(x, t, labels, context)
    g = torch.Generator().manual_seed(5)
    for control in (torch.rand(B, 1, 12, 12, generator=g),
                    1e4 * torch.randn(B, 1, 12, 12, generator=g),
                    torch.zeros(B, 1, 12, 12), -torch.ones(B, 1, 12, 12)):
        assert torch.equal(ControlledUNet(base, cn)(x, t, labels, context, control=control), want)
        assert torch.equal(two(x, t, labels, context, control=control.repeat(1, 2, 1, 1)), want)
    # the copy starts from the base's encoder weights
    for (k, a), (_, b) in zip(base.encoder.state_dict().items(), cn.encoder.state_dict().items()):
        assert torch.equal(a, b), k


def test_perturbed_zero_convs_make_the_control_image_matter():
    base = small_unet()
    m = ControlledUNet(base, perturb(ControlNet.from_unet(base)))
    x, t, labels, context, control = inputs()
    out = m(x, t, labels, context, control=control)
    assert not torch.allclose(out, base(x, t, labels, context))
    assert not torch.allclose(out, m(x, t, labels, context, control=control.flip(-1)))


def test_scale_zero_equals_the_base_and_scales_are_linear():
    base = small_unet()
    cn = perturb(ControlNet.from_unet(base))
    x, t, labels, context, control = inputs()
    want = base(x, t, labels, context)
    n = cn.num_residuals
    for settings in (ControlSettings(scale=0.0), ControlSettings(scale=[0.0] * n),
                     ControlSettings(scale=0, guess_mode=True)):
        assert torch.equal(ControlledUNet(base, cn, settings)(x, t, labels, context,
                                                               control=control), want)
    # per-residual scale and guess mode: s_k * 0.825^(K - k) times the raw residuals
    raw = cn(x, t, labels, context, control=control)
    scale = [0.5 + 0.1 * k for k in range(n)]
    got = ControlledUNet(base, cn, ControlSettings(scale=scale, guess_mode=True)).residuals(
        x, t, labels, context, control=control)
    for k, (r, g) in enumerate(zip(raw, got)):
        torch.testing.assert_close(g, r * scale[k] * GUESS_MODE_DECAY ** (n - 1 - k))
    assert ControlSettings(guess_mode=True).residual_scales(13)[0] == pytest.approx(
        0.825**12)


def test_two_controlnets_one_at_scale_zero_equal_the_other_alone():
    base = small_unet()
    cn1 = perturb(ControlNet.from_unet(base), seed=1)
    cn2 = perturb(ControlNet.from_unet(base, control_channels=2), seed=2)
    x, t, labels, context, c1 = inputs()
    c2 = torch.rand(B, 2, 12, 12, generator=torch.Generator().manual_seed(9))
    alone = ControlledUNet(base, cn1)(x, t, labels, context, control=c1)
    both = ControlledUNet(base, [cn1, cn2], [ControlSettings(), ControlSettings(scale=0.0)])
    assert torch.equal(both(x, t, labels, context, control=torch.cat([c1, c2], 1)), alone)
    assert torch.equal(both(x, t, labels, context, control=[c1, c2]), alone)
    # both on: the residuals are summed, each with its own scale and image
    on = both.with_settings([ControlSettings(scale=0.5), ControlSettings(scale=2.0)])
    got = on.residuals(x, t, labels, context, control=[c1, c2])
    r1, r2 = cn1(x, t, labels, context, control=c1), cn2(x, t, labels, context, control=c2)
    for g, a, b in zip(got, r1, r2):
        torch.testing.assert_close(g, 0.5 * a + 2.0 * b)


def test_noise_level_of_the_time_input():
    t = torch.tensor([0.05, 0.3, 0.9], dtype=torch.float64)
    x = torch.zeros(3, 1, 4, 4)
    for schedule in (schedules.linear(), schedules.cosine_continuous(), schedules.edm()):
        base = small_unet()
        m = ControlledUNet(base, ControlNet.from_unet(base), schedule=schedule)
        alpha, sigma = schedule.alpha_sigma(t)
        torch.testing.assert_close(m.noise_level(schedule.net_time(t), x), sigma / alpha,
                                   rtol=1e-6, atol=0)
    # EDM preconditioning feeds c_noise = log(sigma~) / 4 whatever the schedule
    vp = schedules.linear()
    assert isinstance(time_schedule(vp, EDM()), schedules.EDMSchedule)
    assert time_schedule(vp, None) is vp
    assert time_schedule(vp, get("v")) is vp
    base = small_unet()
    m = ControlledUNet(base, ControlNet.from_unet(base), schedule=time_schedule(vp, EDM()))
    s_tilde = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(m.noise_level(torch.log(s_tilde) / 4, x), s_tilde)


def test_interval_selects_noise_levels():
    base = small_unet()
    cn = perturb(ControlNet.from_unet(base))
    x, _, labels, context, control = inputs()
    times = torch.tensor([0.1, 0.8], dtype=torch.float64)  # sigma~ ~ 0.3 and ~ 14
    net_t = SCHEDULE.net_time(times).float()
    s_tilde = (SCHEDULE.sigma(times) / SCHEDULE.alpha(times)).tolist()
    want = base(x, net_t, labels, context)
    full = ControlledUNet(base, cn)(x, net_t, labels, context, control=control)
    low = ControlledUNet(base, cn, ControlSettings(interval=(0.0, 1.0)), schedule=SCHEDULE)
    out = low(x, net_t, labels, context, control=control)
    assert s_tilde[0] < 1.0 < s_tilde[1]
    assert torch.equal(out[1], want[1])  # outside: the base
    torch.testing.assert_close(out[0], full[0])  # inside: controlled
    assert not torch.allclose(out[0], want[0])
    outside = low.with_settings(ControlSettings(interval=(1e3, None)))
    assert torch.equal(outside(x, net_t, labels, context, control=control), want)


def test_interval_outside_the_grid_samples_the_base():
    base = small_unet()
    cn = perturb(ControlNet.from_unet(base))
    _, _, labels, context, control = inputs()
    noise = torch.randn(B, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    sigma_max = float(SCHEDULE.sigma(1.0) / SCHEDULE.alpha(1.0))
    cond = Condition(labels=labels, context=context, control=control)
    base_cond = Condition(labels=labels, context=context)
    want = S.sample(Denoiser(base, SCHEDULE), noise, "ddim", 6, cond=base_cond)
    for interval in ((2 * sigma_max, 1e6), (0.0, 1e-6)):
        m = ControlledUNet(base, cn, ControlSettings(interval=interval), schedule=SCHEDULE)
        assert torch.equal(S.sample(Denoiser(m, SCHEDULE), noise, "ddim", 6, cond=cond), want)
    m = ControlledUNet(base, cn, ControlSettings(interval=(0.0, sigma_max)), schedule=SCHEDULE)
    assert not torch.allclose(S.sample(Denoiser(m, SCHEDULE), noise, "ddim", 6, cond=cond), want)


@pytest.mark.parametrize("channel_mult,image_size,attn", [
    ((1, 2, 2), 28, (7,)),  # 28 -> 14 -> 7
    ((1, 2), 16, ()),
    ((1,), 9, ()),
    ((1, 2, 2, 2), 32, (4,)),
    ((1, 1, 2), 13, ()),  # 13 -> 7 -> 4
])
def test_hint_encoder_reaches_the_first_feature_resolution(channel_mult, image_size, attn):
    base = small_unet(channel_mult=channel_mult, image_size=image_size,
                      attention_resolutions=attn, num_classes=None, context_dim=None)
    x = torch.randn(1, 1, image_size, image_size)
    skips, middle, _ = base.encoder(x, 3.0)
    for downscale, widths in ((1, (16, 32)), (2, (8, 16)), (8, (16, 32, 96, 256))):
        cn = ControlNet.from_unet(base, control_channels=3, hint_channels=widths,
                                  hint_downscale=downscale)
        control = torch.rand(1, 3, downscale * image_size, downscale * image_size)
        assert cn.hint(control).shape == base.encoder.conv_in(x).shape
        res = cn(x, 3.0, control=control)
        assert [r.shape for r in res] == [s.shape for s in skips] + [middle.shape]
        assert len(res) == base.num_skips + 1
        m = ControlledUNet(base, cn)
        assert torch.equal(m(x, 3.0, control=control), base(x, 3.0))
        with pytest.raises(ValueError, match="control must be"):
            cn(x, 3.0, control=torch.rand(1, 3, image_size + 1, image_size + 1))
    with pytest.raises(ValueError, match="control must be"):
        cn(x, 3.0, control=torch.rand(1, 1, 8 * image_size, 8 * image_size))  # channels


def test_training_the_controlnet_leaves_the_base_untouched():
    base = small_unet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m = ControlledUNet(base, ControlNet.from_unet(base))
    m.train()
    assert not base.training and all(not p.requires_grad for p in base.parameters())
    opt = torch.optim.Adam(m.controlnets.parameters(), lr=1e-2)
    zero_before = [p.clone() for p in m.controlnets[0].zero_convs.parameters()]
    for step in range(3):
        x, t, labels, context, control = inputs(seed=step)
        loss = (m(x, t, labels, context, control=control) - control).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in base.parameters())
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b)
               for a, b in zip(zero_before, m.controlnets[0].zero_convs.parameters()))
    x, t, labels, context, control = inputs(seed=7)
    assert not torch.allclose(m(x, t, labels, context, control=control),
                              base(x, t, labels, context))


@pytest.mark.parametrize("name", S.names())
def test_cfg_keeps_the_control_image_in_both_halves_with_every_sampler(name):
    base = small_unet()
    cn = ControlNet.from_unet(base)
    seen = []
    cn.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["control"]),
                                 with_kwargs=True)
    _, _, labels, context, control = inputs()
    noise = torch.randn(B, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    cond = Condition(labels=labels, context=context, control=control)
    run = dict(cond=cond, generator=torch.Generator().manual_seed(4))
    guided = guidance.classifier_free(Denoiser(ControlledUNet(base, cn), SCHEDULE), 2.0)
    out = S.sample(guided, noise, name, STEPS, **run)
    assert seen and all(c.shape[0] == 2 * B and torch.equal(c[:B], control)
                        and torch.equal(c[B:], control) for c in seen)
    # at initialisation, guided controlled sampling is guided base sampling bit for bit
    base_run = dict(cond=Condition(labels=labels, context=context),
                    generator=torch.Generator().manual_seed(4))
    want = S.sample(guidance.classifier_free(Denoiser(base, SCHEDULE), 2.0), noise, name, STEPS,
                    **base_run)
    assert torch.equal(out, want)
    perturb(cn)
    steered = S.sample(guided, noise, name, STEPS, cond=cond,
                       generator=torch.Generator().manual_seed(4))
    assert bool(torch.isfinite(steered).all()) and not torch.allclose(steered, want)


def test_configs_rebuild_the_networks():
    base = small_unet()
    cn = perturb(ControlNet.from_unet(base, control_channels=2))
    m = ControlledUNet(base, cn, ControlSettings(scale=0.7, interval=(0.1, None)),
                       schedule=SCHEDULE)
    cfg = json.loads(json.dumps(m.config))
    again = build(cfg)
    assert isinstance(again, ControlledUNet) and again.config == m.config
    assert again.settings[0].interval == (0.1, math.inf)
    again.load_state_dict(m.state_dict())
    x, t, labels, context, _ = inputs()
    control = torch.rand(B, 2, 12, 12)
    t = SCHEDULE.net_time(torch.tensor([0.02, 0.5])).float()
    assert torch.equal(again(x, t, labels, context, control=control),
                       m(x, t, labels, context, control=control))
    assert build(json.loads(json.dumps(cn.config))).config == cn.config


def test_bad_inputs_are_named():
    base = small_unet()
    cn = ControlNet.from_unet(base)
    x, t, labels, context, control = inputs()
    with pytest.raises(ValueError, match="scale must be a number"):
        ControlSettings(scale="strong")
    with pytest.raises(ValueError, match="scale must be a number"):
        ControlSettings(scale=True)
    with pytest.raises(ValueError, match="interval"):
        ControlSettings(interval=(2.0, 1.0))
    with pytest.raises(ValueError, match="needs schedule="):
        ControlledUNet(base, cn, ControlSettings(interval=(0.0, 1.0)))
    with pytest.raises(ValueError, match="per-residual scale"):
        ControlledUNet(base, cn, ControlSettings(scale=[1.0, 2.0]))
    with pytest.raises(ValueError, match="another base"):
        ControlledUNet(small_unet(model_channels=16), cn)
    with pytest.raises(ValueError, match="needs control="):
        ControlledUNet(base, cn)(x, t, labels, context)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        ControlledUNet(base, [cn, cn])(x, t, labels, context, control=control)
    with pytest.raises(ValueError, match="U-Net base"):
        ControlNet({"type": "dit"})
