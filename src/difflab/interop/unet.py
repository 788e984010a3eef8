"""difflab's ADM U-Net (:class:`difflab.nets.unet.UNet`) as a diffusers ``UNet2DModel``: the
config and the weight names, one to one, where the architectures coincide.

Both are the ADM U-Net (Dhariwal & Nichol 2021) with the same sinusoidal time embedding
([cos, sin] of t f_i, f_i = 10000^(-i / h): diffusers' ``flip_sin_to_cos=True``,
``freq_shift=0``), the same time MLP, residual blocks (GN, SiLU, conv; the embedding added, or
ADM's scale-shift norm GN(h) (1 + s) + b: ``resnet_time_scale_shift="scale_shift"``; a 1x1
shortcut when the width changes), single-head-dim self-attention with a residual (difflab's
fused k/v projection split into ``to_k`` / ``to_v``), strided-conv downsampling, nearest 2x
upsampling + conv, and a class embedding of K + 1 rows added to the time embedding (difflab's
null label is row K: load the export with ``null_label=K``).

They coincide when (else :func:`unet_to_diffusers` raises NotImplementedError naming why):

* no cross-attention (``context_dim=None``): diffusers' text U-Net uses transformer blocks
  (``UNet2DConditionModel``), a different architecture;
* ``time_scale = 1``: ``UNet2DModel`` embeds the timestep unscaled (difflab's discrete
  schedules give the DDPM index, as diffusers does);
* ``channel_mult[0] = 1`` (diffusers' ``conv_in`` width is the first block's width);
* every GroupNorm has the same number of groups and every attention block the same head
  width (diffusers has one ``norm_num_groups`` and one ``attention_head_dim``);
* ``image_size`` divisible by 2^(levels - 1) (``UNet2DModel`` upsamples by exactly 2).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from difflab.nets.blocks import AttentionBlock
from difflab.nets.unet import UNet
from difflab.schedules import NoiseSchedule

__all__ = ["unet_to_diffusers"]

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose UNet2DModel reads every key written


def _groups(net: nn.Module) -> set[int]:
    return {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}


def _levels(block: str, sampler: str, levels: Any, resamplers: Any, out: dict[str, Tensor],
            source: str) -> None:
    """The weights of the U-Net's resolution levels (ResBlocks, attention, the resampling conv)
    under diffusers' ``{down,up}_blocks.i`` names."""
    for i, level in enumerate(levels):
        for j, (rb, ab) in enumerate(zip(level.res, level.attn)):
            _resnet(f"{block}.{i}.resnets.{j}", rb, out, f"{source}.{i}.res.{j}")
            if isinstance(ab, AttentionBlock):
                _attention(f"{block}.{i}.attentions.{j}", ab, out)
        if i < len(resamplers):
            out[f"{block}.{i}.{sampler}.0.conv.weight"] = resamplers[i].conv.weight
            out[f"{block}.{i}.{sampler}.0.conv.bias"] = resamplers[i].conv.bias


def _resnet(prefix: str, block: nn.Module, out: dict[str, Tensor], src: str) -> None:
    sd = block.state_dict()
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_norm": "norm2", "out_layers.2": "conv2", "skip": "conv_shortcut"}
    for k, v in sd.items():
        mod, param = k.rsplit(".", 1)
        if mod not in names:  # pragma: no cover - a ResBlock holds exactly these
            raise NotImplementedError(f"{src}.{k} has no diffusers counterpart")
        out[f"{prefix}.{names[mod]}.{param}"] = v


def _attention(prefix: str, block: nn.Module, out: dict[str, Tensor]) -> None:
    C = block.norm.num_channels
    out[f"{prefix}.group_norm.weight"] = block.norm.weight
    out[f"{prefix}.group_norm.bias"] = block.norm.bias
    out[f"{prefix}.to_q.weight"] = block.attn.q.weight
    out[f"{prefix}.to_q.bias"] = block.attn.q.bias
    kw, kb = block.attn.kv.weight, block.attn.kv.bias
    out[f"{prefix}.to_k.weight"], out[f"{prefix}.to_v.weight"] = kw[:C], kw[C:]
    out[f"{prefix}.to_k.bias"], out[f"{prefix}.to_v.bias"] = kb[:C], kb[C:]
    out[f"{prefix}.to_out.0.weight"] = block.attn.proj.weight
    out[f"{prefix}.to_out.0.bias"] = block.attn.proj.bias


def unet_to_diffusers(net: nn.Module, schedule: NoiseSchedule | None = None
                      ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(``UNet2DModel`` config, state dict) of a difflab U-Net; raises NotImplementedError with
    the reason when the architectures do not coincide (module docstring). ``schedule`` sets
    ``num_train_timesteps`` in the config when it is a discrete chain."""
    if not isinstance(net, UNet):
        raise NotImplementedError(
            f"only difflab's ADM U-Net maps onto a diffusers network, not {type(net).__name__} "
            "(difflab's DiT is Peebles & Xie's, but diffusers' DiTTransformer2DModel embeds time "
            "with frequencies 10000^(-i / (h - 1)) (downscale_freq_shift=1), not 10000^(-i / h), "
            "and keeps one time/label embedder per block: its outputs would not match)")
    c = net.config
    if c["context_dim"] is not None:
        raise NotImplementedError("a U-Net with cross-attention (context_dim) has no one-to-one "
                                  "diffusers counterpart: UNet2DConditionModel uses transformer "
                                  "blocks (proj_in, self/cross-attention, feed-forward)")
    if float(c["time_scale"]) != 1.0:
        raise NotImplementedError(f"time_scale={c['time_scale']}: diffusers' UNet2DModel embeds "
                                  "the timestep unscaled (time_scale 1)")
    mult = list(c["channel_mult"])
    if mult[0] != 1:
        raise NotImplementedError(f"channel_mult[0] = {mult[0]}: diffusers' conv_in has the "
                                  "first block's width")
    groups = _groups(net)
    if len(groups) != 1:
        raise NotImplementedError(f"GroupNorms with {sorted(groups)} groups: diffusers has one "
                                  "norm_num_groups")
    attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    head_dims = {m.norm.num_channels // m.attn.num_heads for m in attn}
    if len(head_dims) > 1:
        raise NotImplementedError(f"attention head widths {sorted(head_dims)}: diffusers has one "
                                  "attention_head_dim (use num_head_channels)")
    levels, size = len(mult), int(c["image_size"])
    if size % 2 ** (levels - 1):
        raise NotImplementedError(f"image_size {size} is not divisible by 2^{levels - 1}: "
                                  "UNet2DModel upsamples by exactly 2")
    m0 = int(c["model_channels"])
    res = [size // 2**i for i in range(levels)]
    has_attn = [r in c["attention_resolutions"] for r in res]
    config: dict[str, Any] = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size, "in_channels": c["in_channels"], "out_channels": c["out_channels"],
        "center_input_sample": False, "time_embedding_type": "positional",
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "mid_block_type": "UNetMidBlock2D", "block_out_channels": [m * m0 for m in mult],
        "layers_per_block": c["num_res_blocks"], "mid_block_scale_factor": 1,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": c["dropout"], "act_fn": "silu",
        "attention_head_dim": head_dims.pop() if head_dims else None,
        "norm_num_groups": groups.pop(), "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if c["scale_shift_norm"] else "default",
        "add_attention": True, "class_embed_type": None,
        "num_class_embeds": None if c["num_classes"] is None else int(c["num_classes"]) + 1,
        "num_train_timesteps": None if schedule is None else schedule.num_steps}
    config["attn_norm_num_groups"] = config["norm_num_groups"]

    out: dict[str, Tensor] = {}
    enc = net.encoder
    out["conv_in.weight"], out["conv_in.bias"] = enc.conv_in.weight, enc.conv_in.bias
    for i, name in ((0, "linear_1"), (2, "linear_2")):
        out[f"time_embedding.{name}.weight"] = enc.time_embed.mlp[i].weight
        out[f"time_embedding.{name}.bias"] = enc.time_embed.mlp[i].bias
    if enc.class_embed is not None:
        out["class_embedding.weight"] = enc.class_embed.embedding.weight
    _levels("down_blocks", "downsamplers", enc.levels, enc.downs, out, "encoder.levels")
    _resnet("mid_block.resnets.0", enc.mid_res1, out, "encoder.mid_res1")
    _attention("mid_block.attentions.0", enc.mid_attn, out)
    _resnet("mid_block.resnets.1", enc.mid_res2, out, "encoder.mid_res2")
    _levels("up_blocks", "upsamplers", net.levels, net.ups, out, "levels")
    out["conv_norm_out.weight"], out["conv_norm_out.bias"] = net.out[0].weight, net.out[0].bias
    out["conv_out.weight"], out["conv_out.bias"] = net.out[2].weight, net.out[2].bias
    n_params = sum(1 for _ in net.state_dict())
    if len(out) != n_params + 2 * len(attn):  # each attention's kv (weight, bias) -> k and v
        raise NotImplementedError(  # pragma: no cover - every parameter is mapped above
            f"mapped {len(out)} tensors for {n_params} difflab parameters")
    return config, {k: v.detach().clone() for k, v in out.items()}
