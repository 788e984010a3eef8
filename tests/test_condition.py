"""The structured condition: its null value per field, concatenation, slicing, dropout, and its
path through the denoiser, classifier-free guidance and every sampler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import difflab
from difflab import guidance, schedules
from difflab.denoiser import Condition, Denoiser
from difflab.toy import GaussianMixture

B, L, D = 3, 4, 5


def _cond(g: torch.Generator) -> Condition:
    return Condition(labels=torch.tensor([0, 2, 1]), context=torch.randn(B, L, D, generator=g),
                     context_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]).bool(),
                     control=torch.randn(B, 1, 8, 8, generator=g),
                     mask=(torch.rand(B, 1, 8, 8, generator=g) > 0.5).float(),
                     null_context=torch.randn(1, L, D, generator=g),
                     null_context_mask=torch.tensor([[True, True, True, True]]))


def test_null_nulls_labels_and_context_and_keeps_control_and_mask():
    c = _cond(torch.Generator().manual_seed(0))
    n = c.null()
    assert torch.equal(n.labels, torch.full((B,), -1))
    assert torch.equal(n.context, c.null_context.expand(B, L, D))
    assert torch.equal(n.context_mask, torch.ones(B, L, dtype=torch.bool))
    assert n.control is c.control and n.mask is c.mask
    # without a stored empty prompt: zero context, only token 0 attended
    bare = Condition(context=c.context, context_mask=c.context_mask).null()
    assert torch.equal(bare.context, torch.zeros(B, L, D))
    assert torch.equal(bare.context_mask[:, 0], torch.ones(B, dtype=torch.bool))
    assert not bare.context_mask[:, 1:].any()


def test_cat_slice_drop_and_of():
    c = _cond(torch.Generator().manual_seed(1))
    both = Condition.cat([c, c.null()])
    assert both.batch_size == 2 * B
    assert torch.equal(both[:B].context, c.context) and torch.equal(both[B:].labels,
                                                                     torch.full((B,), -1))
    assert torch.equal(both[B:].control, c.control)
    idx = torch.tensor([2, 0])
    assert torch.equal(c[idx].labels, c.labels[idx]) and torch.equal(c[1].context, c.context[1:2])
    drop = torch.tensor([True, False, True])
    d = c.drop(drop)
    assert torch.equal(d.labels, torch.tensor([-1, 2, -1]))
    assert torch.equal(d.context[1], c.context[1])
    assert torch.equal(d.context[0], c.null_context[0]) and torch.equal(d.control, c.control)
    assert Condition.of(None) is None and Condition.of(c) is c
    assert torch.equal(Condition.of(torch.tensor([3, 1])).labels, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="share the batch size"):
        Condition(labels=torch.zeros(2, dtype=torch.long), control=torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="integer"):
        Condition.of(torch.zeros(2))


class _Recorder(nn.Module):
    """A network that uses every condition field linearly and records what it received."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward(self, x, t, labels=None, context=None, context_mask=None, control=None,
                mask=None):
        self.seen.append({"labels": labels, "context": context, "context_mask": context_mask,
                          "control": control, "mask": mask})
        ctx = (context * context_mask[..., None]).sum((1, 2))
        return (0.1 * x + ctx.view(-1, 1, 1, 1) * 0.01 + labels.view(-1, 1, 1, 1) * 0.05
                + control * mask)


def test_cfg_with_context_mask_and_control_keeps_the_control_image_in_the_null_half():
    g = torch.Generator().manual_seed(2)
    c = _cond(g)
    net = _Recorder()
    den = Denoiser(net, schedules.cosine(), prediction="eps")
    x = torch.randn(B, 1, 8, 8, generator=g)
    w = 2.5
    got = guidance.classifier_free(den, w).predict(x, 0.4, c)
    seen = net.seen[-1]
    assert seen["labels"].shape == (2 * B,)
    assert torch.equal(seen["control"], torch.cat([c.control, c.control]))  # kept in both
    assert torch.equal(seen["mask"], torch.cat([c.mask, c.mask]))
    assert torch.equal(seen["context"][B:], c.null_context.expand(B, L, D))
    assert torch.equal(seen["labels"][B:], torch.full((B,), -1))
    cond_eps = den.predict(x, 0.4, c).eps
    null_eps = den.predict(x, 0.4, c.null()).eps
    torch.testing.assert_close(got.eps, (1 + w) * cond_eps - w * null_eps, rtol=1e-6, atol=1e-6)
    # w = 0 is the conditional model exactly
    assert torch.equal(guidance.classifier_free(den, 0.0).predict(x, 0.4, c).x0,
                       den.predict(x, 0.4, c).x0)
    # a negative prompt replaces the null half
    neg = Condition(**{**c.__dict__, "context": torch.randn(B, L, D, generator=g)})
    guidance.classifier_free(den, w, uncond=neg).predict(x, 0.4, c)
    assert torch.equal(net.seen[-1]["context"][B:], neg.context)


MIX = GaussianMixture.ring(k=3, radius=2.0, std=0.3)


@pytest.mark.parametrize("name", difflab.samplers.names())
def test_every_sampler_takes_a_condition_like_a_label_tensor(name):
    """The same labels as a bare tensor or as a Condition give identical samples, guided and
    not (every sampler forwards the condition unchanged)."""
    sched = schedules.linear()
    den = guidance.classifier_free(MIX.denoiser(sched, "eps"), 1.5)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    a = difflab.sample(den, noise, name, steps=6, cond=y,
                       generator=torch.Generator().manual_seed(4))
    b = difflab.sample(den, noise, name, steps=6, cond=Condition(labels=y),
                       generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_per_row_null_contexts_slice_and_concatenate_with_their_rows():
    """A negative prompt per row: its null context is sliced and concatenated with the rows."""
    g = torch.Generator().manual_seed(5)
    c = Condition(context=torch.randn(B, L, D, generator=g),
                  null_context=torch.randn(B, L, D, generator=g))
    assert torch.equal(c[1:3].null_context, c.null_context[1:3])
    assert torch.equal(c[1:3].null().context, c.null_context[1:3])
    shared = Condition(context=torch.randn(2, L, D, generator=g), null_context=c.null_context[:1])
    both = Condition.cat([c, shared])
    assert both.null_context.shape == (B + 2, L, D)
    assert torch.equal(both.null().context[B:], c.null_context[:1].expand(2, L, D))
