"""Networks: config round trips, conditioning, zero-init, adaLN-Zero, attention equivariance and
its forward-mode derivative, gradient flow."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from difflab import nets
from difflab.nets.blocks import Attention, AttentionBlock, timestep_embedding

SMALL_UNET = {"type": "unet", "in_channels": 1, "model_channels": 16, "channel_mult": [1, 2],
              "num_res_blocks": 1, "attention_resolutions": [7], "image_size": 14,
              "num_heads": 2, "num_classes": 3}


@pytest.fixture(autouse=True)
def _seed():
    """Fixed initial weights in every test (nets are built from the global RNG); the one-thread
    setting is suite-wide (conftest.py)."""
    torch.manual_seed(0)


def _randomize_zero_params(net: nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised layers random weights (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not bool(p.any()):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _inputs(net_cfg: dict, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if net_cfg["type"] == "mlp":
        x = torch.randn(batch, net_cfg.get("dim", 2), generator=g)
    else:
        c = net_cfg.get("in_channels", 1)
        s = net_cfg.get("image_size", net_cfg.get("input_size", 14))
        x = torch.randn(batch, c, s, s, generator=g)
    t = torch.rand(batch, generator=g) * 999
    return x, t


def _round_trip(net: nn.Module) -> nn.Module:
    twin = nets.build(json.loads(json.dumps(net.config)))
    assert twin.config == net.config
    twin.load_state_dict(net.state_dict())
    return twin


# -- time embedding --------------------------------------------------------------------------
def test_timestep_embedding_formula_and_fractional_t():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = timestep_embedding(t, 8)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    args = t.double()[:, None] * freqs
    # float32 phase error at t = 999 is ~ 999 * 2^-24 * few ~ 1e-4
    assert torch.allclose(emb[:, :4].double(), torch.cos(args), atol=5e-4)
    assert torch.allclose(emb[:, 4:].double(), torch.sin(args), atol=5e-4)
    assert emb[0, :4].eq(1).all() and emb[0, 4:].eq(0).all()
    # fractional times give distinct embeddings (no rounding to integer timesteps)
    assert not torch.allclose(timestep_embedding(torch.tensor([10.0]), 64),
                              timestep_embedding(torch.tensor([10.25]), 64))


# -- MLP ----------------------------------------------------------------------------------------
def test_mlp_round_trip_conditioning_and_zero_init():
    cfg = {"type": "mlp", "dim": 2, "hidden": 32, "depth": 2, "emb_dim": 16, "num_classes": 4}
    net = nets.build(cfg)
    x, t = _inputs(cfg)
    assert torch.equal(net(x, t, torch.tensor([0, 1, 4])), torch.zeros_like(x))  # zero-init out
    _randomize_zero_params(net)
    twin = _round_trip(net)
    c = torch.tensor([0, 1, 2])
    assert torch.equal(net(x, t, c), twin(x, t, c))
    assert not torch.allclose(net(x, t, c), net(x, t + 100, c))
    assert not torch.allclose(net(x, t, c), net(x, t, torch.tensor([3, 3, 3])))
    null = torch.full((3,), 4)
    assert not torch.allclose(net(x, t, c), net(x, t, null))
    assert torch.equal(net(x, t), net(x, t, null))  # cond=None is the null label
    assert torch.equal(net(x, t, torch.full((3,), -1)), net(x, t, null))  # -1: Condition's null
    with pytest.raises(ValueError, match=r"\[0, 3\] or be the null label"):
        net(x, t, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="takes no context"):
        net(x, t, c, context=torch.zeros(3, 2, 4))


# -- U-Net --------------------------------------------------------------------------------------
def test_unet_28_levels_and_zero_output_at_init():
    net = nets.build({"type": "unet", "in_channels": 1, "model_channels": 16,
                      "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                      "attention_resolutions": [7], "image_size": 28})
    assert net.encoder.resolutions == [28, 14, 7]
    x = torch.randn(2, 1, 28, 28)
    out = net(x, torch.tensor([3.0, 500.0]))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    assert nets.count_parameters(net) == sum(p.numel() for p in net.parameters())


def test_unet_round_trip_time_and_class_dependence():
    net = nets.build(SMALL_UNET)
    _randomize_zero_params(net)
    net.eval()
    x, t = _inputs(SMALL_UNET)
    c = torch.tensor([0, 1, 2])
    out = net(x, t, c)
    assert torch.equal(out, _round_trip(net)(x, t, c))
    assert (out - net(x, t + 1.0, c)).abs().max() > 1e-4
    assert (out - net(x, t, torch.tensor([1, 2, 0]))).abs().max() > 1e-4
    null = torch.full((3,), 3)
    assert (out - net(x, t, null)).abs().max() > 1e-4
    assert torch.equal(net(x, t), net(x, t, null))
    # one image of a batch does not depend on the others (no batch statistics)
    assert torch.allclose(net(x[:1], t[:1], c[:1]), out[:1], atol=1e-5)


def test_unet_odd_resolution_and_channels_last():
    cfg = dict(SMALL_UNET, channel_mult=[1, 1, 2], image_size=7, attention_resolutions=[4])
    net = nets.build(cfg)
    _randomize_zero_params(net)
    x, t = _inputs(cfg, 2)
    assert net.encoder.resolutions == [7, 4, 2]
    out = net(x, t)
    net_cl = net.to(memory_format=torch.channels_last)
    out_cl = net_cl(x.to(memory_format=torch.channels_last), t)
    # same math, different float32 summation order in the convolutions: outputs are O(1)
    # after ~20 layers, so differences of a few 1e-6 (up to ~1e-5) are rounding
    assert out.shape == x.shape and torch.allclose(out, out_cl, atol=1e-4)


def test_unet_cross_attention_and_control_residuals():
    cfg = dict(SMALL_UNET, context_dim=5, num_classes=None)
    net = nets.build(cfg)
    _randomize_zero_params(net)
    x, t = _inputs(cfg, 2)
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(2, 4, 5, generator=g)
    base = net(x, t, context=ctx)
    assert (base - net(x, t, context=ctx.flip(0))).abs().max() > 1e-4
    # cross-attention is invariant to the order of the context tokens
    assert torch.allclose(base, net(x, t, context=ctx[:, [2, 0, 3, 1]]), atol=1e-5)
    # masked-out tokens do not matter
    mask = torch.tensor([[True, True, False, False]] * 2)
    ctx2 = ctx.clone()
    ctx2[:, 2:] = 7.0
    assert torch.allclose(net(x, t, context=ctx, context_mask=mask),
                          net(x, t, context=ctx2, context_mask=mask), atol=1e-5)
    zeros = [torch.zeros(1)] * (net.num_skips + 1)
    assert torch.allclose(net(x, t, context=ctx, residuals=zeros), base)
    with pytest.raises(ValueError, match="residuals must hold"):
        net(x, t, context=ctx, residuals=zeros[:-1])


def test_unet_gradient_reaches_every_parameter():
    net = nets.build(dict(SMALL_UNET, context_dim=4))
    _randomize_zero_params(net)
    x, t = _inputs(SMALL_UNET, 2)
    loss = net(x, t, torch.tensor([0, 3]), context=torch.randn(2, 3, 4)).square().mean()
    loss.backward()
    # the null-label row and one class row get gradient; unused class rows cannot
    for name, p in net.named_parameters():
        if name.endswith("class_embed.embedding.weight"):
            assert p.grad[[0, 3]].abs().sum(1).gt(0).all()
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- attention ---------------------------------------------------------------------------------
def test_self_attention_is_permutation_equivariant():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(2, 5, 8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(attn(x)[:, perm], attn(x[:, perm]), atol=1e-6)
    # and matches the textbook formula softmax(q k^T / sqrt(d)) v, head by head
    q = attn.q(x).view(2, 5, 2, 4).transpose(1, 2)
    k, v = attn.kv(x).view(2, 5, 2, 2, 4).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(attn(x), ref, atol=1e-6)


def test_attention_jacobian_vector_product_under_forward_mode_ad():
    # forward-mode AD (second-order score matching's JVP) takes the explicit softmax path: its
    # value equals the fused kernel's, its tangent a central difference, with a mask too, and
    # reverse mode runs through the tangent
    from torch.autograd import forward_ad as fwAD

    torch.manual_seed(0)
    attn = Attention(8, 2, context_dim=6).double()
    x, ctx = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    dx = torch.randn_like(x)
    with fwAD.dual_level():
        out, jv = fwAD.unpack_dual(attn(fwAD.make_dual(x, dx), ctx, mask))
    assert torch.allclose(out, attn(x, ctx, mask), atol=1e-12)
    h = 1e-6
    fd = (attn(x + h * dx, ctx, mask) - attn(x - h * dx, ctx, mask)) / (2 * h)
    assert torch.allclose(jv, fd, atol=1e-8)
    jv.pow(2).sum().backward()
    assert all(m.weight.grad is not None for m in (attn.q, attn.kv, attn.proj))  # not proj's
    # bias: a constant offset has no Jacobian


def test_spatial_attention_block_identity_at_init_and_equivariant():
    block = AttentionBlock(8, 2)
    x = torch.randn(1, 8, 3, 3)
    assert torch.equal(block(x), x)  # zero-initialised output projection
    _randomize_zero_params(block)
    # permuting pixels permutes the output the same way (no positional information)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    xp = x.flatten(2)[:, :, perm].view_as(x)
    assert torch.allclose(block(x).flatten(2)[:, :, perm], block(xp).flatten(2), atol=1e-5)


def test_build_errors():
    with pytest.raises(ValueError, match="unknown network type 'resnet'.*unet"):
        nets.build({"type": "resnet"})
    with pytest.raises(ValueError, match="'type'"):
        nets.build({"in_channels": 1})
    with pytest.raises(ValueError, match=r"\['base_channels'\].*model_channels"):
        nets.build({"type": "unet", "base_channels": 32})
    with pytest.raises(ValueError, match=r"attention_resolutions \[8\].*\[28, 14, 7\]"):
        nets.build({"type": "unet", "attention_resolutions": [8], "image_size": 28})
    net = nets.build({"type": "unet", "model_channels": 8, "channel_mult": [1],
                      "num_res_blocks": 1, "attention_resolutions": [], "image_size": 4})
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(1, 1, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long))


# -- DiT ----------------------------------------------------------------------------------------
SMALL_DIT = {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 2,
             "hidden_size": 32, "depth": 2, "num_heads": 4, "num_classes": 3}


def test_dit_adaln_zero_identity_blocks_and_zero_output():
    net = nets.build(SMALL_DIT)
    x, t = _inputs(dict(SMALL_DIT, in_channels=2, image_size=8))
    assert torch.equal(net(x, t, torch.tensor([0, 1, 3])), torch.zeros_like(x))
    h = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in net.blocks:  # gates are zero: each block is exactly the identity
        assert torch.equal(block(h, c), h)


def test_dit_patchify_unpatchify_and_conditioning():
    net = nets.build(SMALL_DIT)
    x, t = _inputs(dict(SMALL_DIT, image_size=8))
    B, C, p, g = 3, 2, 2, 4
    tokens = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)
    assert torch.equal(net.unpatchify(tokens), x)  # inverse of the patch layout
    _randomize_zero_params(net)
    c = torch.tensor([0, 1, 2])
    out = net(x, t, c)
    assert torch.equal(out, _round_trip(net)(x, t, c))
    assert (out - net(x, t + 1, c)).abs().max() > 1e-4
    assert (out - net(x, t, torch.tensor([2, 0, 1]))).abs().max() > 1e-4
    assert (out - net(x, t, torch.full((3,), 3))).abs().max() > 1e-4
    assert torch.equal(net(x, t), net(x, t, torch.full((3,), 3)))


def test_dit_blocks_are_token_permutation_equivariant():
    net = nets.build(SMALL_DIT)
    _randomize_zero_params(net)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    for block in net.blocks:  # position only enters through pos_embed, not the blocks
        assert torch.allclose(block(h, c)[:, perm],
                              block(h[:, perm], c), atol=1e-5)


def test_dit_gradient_reaches_every_parameter():
    net = nets.build(SMALL_DIT)
    _randomize_zero_params(net)
    x, t = _inputs(dict(SMALL_DIT, image_size=8), 2)
    net(x, t, torch.tensor([1, 3])).square().mean().backward()
    for name, p in net.named_parameters():
        if name == "y_embedder.embedding.weight":
            assert p.grad[[1, 3]].abs().sum(1).gt(0).all()
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# -- classifier ---------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["attention", "adaptive"])
def test_classifier_logits_time_dependence_and_input_gradient(pool):
    cfg = {"type": "classifier", "in_channels": 1, "num_classes": 4, "model_channels": 16,
           "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [7],
           "image_size": 14, "num_heads": 2, "pool": pool}
    net = nets.build(cfg)
    _randomize_zero_params(net)
    x, t = _inputs(cfg)
    logits = net(x, t)
    assert logits.shape == (3, 4)
    assert torch.equal(logits, _round_trip(net)(x, t))
    assert (logits - net(x, t + 50)).abs().max() > 1e-4
    # guidance needs grad_x log p(y | x_t): nonzero and per image independent
    x = x.clone().requires_grad_(True)
    logp = torch.log_softmax(net(x, t), -1)[:, 1]
    (grad,) = torch.autograd.grad(logp.sum(), x)
    assert grad[0].abs().sum() > 0
    (grad0,) = torch.autograd.grad(torch.log_softmax(net(x[:1], t[:1]), -1)[0, 1], x)
    assert torch.allclose(grad0[0], grad[0], atol=1e-5)


def test_classifier_plugs_into_classifier_guidance():
    from difflab import guidance, schedules

    net = nets.build({"type": "classifier", "num_classes": 3, "model_channels": 8,
                      "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
                      "image_size": 6})
    sched = schedules.linear()
    log_prob = guidance.classifier_log_prob(net, sched)
    x, t, y = torch.randn(2, 1, 6, 6), torch.tensor([0.3, 0.7]), torch.tensor([0, 2])
    expected = torch.log_softmax(net(x, sched.net_time(t).float()), -1)[[0, 1], y]
    assert torch.allclose(log_prob(x, t, y), expected)


# -- as denoisers -------------------------------------------------------------------------------
def test_mlp_learns_the_ring_close_to_the_exact_denoiser():
    """400 Adam steps of eps-MSE on the 8-Gaussian ring: the held-out loss comes within 15% of
    the Bayes-optimal loss of the exact mixture denoiser (and far below 1, the loss of eps=0)."""
    import difflab
    from difflab import objectives, schedules
    from difflab.data import toy2d
    from difflab.toy import GaussianMixture

    _train_and_compare_ring(difflab, objectives, schedules, toy2d, GaussianMixture)


def _train_and_compare_ring(difflab, objectives, schedules, toy2d, GaussianMixture) -> None:
    torch.manual_seed(0)
    sched = schedules.linear()
    net = nets.MLP(dim=2, hidden=64, depth=2, emb_dim=32)
    den = difflab.Denoiser(net, sched, "eps")
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        loss = objectives.diffusion_loss(den, toy2d("ring", 256, g), generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ge = torch.Generator().manual_seed(1)
    x = toy2d("ring", 4000, ge)
    t = objectives.sample_t(sched, 4000, generator=ge)
    eps = torch.randn(4000, 2, generator=ge)
    exact = GaussianMixture.ring().denoiser(sched, "eps")
    with torch.no_grad():
        l_net = objectives.diffusion_loss(den, x, t=t, eps=eps).mean().item()
        l_exact = objectives.diffusion_loss(exact, x.double(), t=t, eps=eps.double()).mean()
    assert l_exact < l_net < 1.15 * float(l_exact) < 0.4


@pytest.mark.parametrize("schedule_name", ["linear", "edm"])
def test_unet_denoiser_with_fractional_and_negative_net_time(schedule_name):
    import difflab
    from difflab import schedules

    sched = schedules.NAMES[schedule_name]()
    prediction = "edm" if schedule_name == "edm" else "eps"
    net = nets.build(dict(SMALL_UNET, time_scale=250.0 if schedule_name == "edm" else 1.0))
    _randomize_zero_params(net)
    den = difflab.Denoiser(net, sched, prediction)
    x = torch.randn(2, 1, 14, 14)
    a, b = den(x, torch.tensor([0.5, 0.5]), torch.tensor([0, 1])), den(
        x, torch.tensor([0.5001, 0.5]), torch.tensor([0, 1]))
    assert torch.isfinite(a).all() and (a[0] - b[0]).abs().max() > 0
    assert torch.equal(a[1], b[1])


# -- dropout and mixed precision -------------------------------------------------------------
def test_unet_dropout_only_in_training_mode():
    net = nets.build(dict(SMALL_UNET, dropout=0.3))
    _randomize_zero_params(net)
    x, t = _inputs(SMALL_UNET, 2)
    net.train()
    assert (net(x, t) - net(x, t)).abs().max() > 1e-4  # a fresh mask per call
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize("cfg", [dict(SMALL_UNET, context_dim=4), SMALL_DIT],
                         ids=["unet", "dit"])
def test_bf16_autocast_matches_float32(cfg):
    """Under bf16 autocast (what the trainer uses on GPUs) outputs agree with float32 to a
    few bf16 roundings (eps = 2^-8 = 0.4%) per layer: 5% of the output scale."""
    net = nets.build(cfg)
    _randomize_zero_params(net)
    x, t = _inputs(dict(cfg, image_size=cfg.get("image_size", cfg.get("input_size"))))
    kw = {"context": torch.randn(3, 2, 4)} if cfg.get("context_dim") else {}
    ref = net(x, t, torch.tensor([0, 1, 2]), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, torch.tensor([0, 1, 2]), **kw)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
