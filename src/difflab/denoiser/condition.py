"""The structured condition: everything a denoiser is conditioned on, as one object.

A condition reaches the network as keyword arguments (``net(x, t, **cond.kwargs())``) and knows,
field by field, its *null* (unconditional) value, so classifier-free guidance, condition dropout
in training and chunked calibration treat every kind of condition alike (DESIGN.md, "Condition"):

    field          shape               null (unconditional) value
    labels         (B,) long           -1: the learned null label (Ho & Salimans 2022)
    context        (B, L, D)           the empty prompt's states ``null_context``, else zeros
    context_mask   (B, L) bool         ``null_context_mask``, else only token 0 attended
    control        (B, C, H, W)        kept: a control image stays in both halves of CFG
    mask           (B, 1, H, W)        kept: an inpainting / region mask is not guidance
    guidance       (B,) float          kept: the guidance scale w a guidance-distilled network
                                       takes as an input (LCM's w-embedding, Luo et al. 2023)

``null_context`` / ``null_context_mask`` are not inputs of the network; they carry the null
value of ``context`` (the text encoder's output for the empty prompt, shape (1, L, D) or
(B, L, D)) so that guidance needs no text encoder.

It lives in the denoiser layer because guidance and the samplers (below ``conditioning/``)
null, concatenate and slice it; :mod:`difflab.conditioning` re-exports it beside the encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["Condition", "NULL_LABEL", "INPUTS", "NULLABLE"]

NULL_LABEL = -1
#: fields that are network inputs, in the order they are passed
INPUTS = ("labels", "context", "context_mask", "control", "mask", "guidance")
#: fields that guidance and condition dropout replace by their null value
NULLABLE = ("labels", "context", "context_mask")
#: the null values carried beside the inputs: one row (broadcast) or one per row
NULL_FIELDS = ("null_context", "null_context_mask")


def _cat_nulls(vals: list[Tensor | None], sizes: list[int]) -> Tensor | None:
    """Concatenate null values: one shared row stays one row; otherwise each is expanded to
    its batch."""
    if all(v is None for v in vals):
        return None
    if any(v is None for v in vals):
        raise ValueError("cannot concatenate conditions where only some carry a null context")
    first = vals[0]
    if all(v.shape[0] == 1 and v.shape == first.shape and torch.equal(v, first) for v in vals):
        return first
    return torch.cat([v.expand(n, *v.shape[1:]) for v, n in zip(vals, sizes)])


@dataclass(frozen=True, eq=False)
class Condition:
    """A batch of conditions (see the module docstring). Every field is optional; those given
    share the batch size B."""

    labels: Tensor | None = None
    context: Tensor | None = None
    context_mask: Tensor | None = None
    control: Tensor | None = None
    mask: Tensor | None = None
    guidance: Tensor | None = None
    null_context: Tensor | None = None
    null_context_mask: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {f: int(v.shape[0]) for f in INPUTS if (v := getattr(self, f)) is not None}
        if not sizes:
            raise ValueError(f"a Condition needs at least one of {list(INPUTS)}; pass cond=None "
                             "for an unconditional call")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"condition fields must share the batch size, got {sizes}")
        for name in INPUTS + ("null_context", "null_context_mask"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, Tensor):
                raise ValueError(f"Condition.{name} must be a torch.Tensor, got {type(v).__name__}")
        if self.labels is not None and (self.labels.is_floating_point() or self.labels.ndim != 1):
            raise ValueError("Condition.labels must be a (B,) integer tensor of class labels, got "
                             f"dtype {self.labels.dtype} shape {tuple(self.labels.shape)}")
        if self.guidance is not None and (not self.guidance.is_floating_point()
                                          or self.guidance.ndim != 1):
            raise ValueError("Condition.guidance must be a (B,) float tensor of guidance scales "
                             f"w, got dtype {self.guidance.dtype} shape "
                             f"{tuple(self.guidance.shape)}")
        if self.context is not None and self.context.ndim != 3:
            raise ValueError("Condition.context must be (B, L, D), got "
                             f"{tuple(self.context.shape)}")
        if self.context_mask is not None:
            if self.context is None:
                raise ValueError("Condition.context_mask needs Condition.context")
            if tuple(self.context_mask.shape) != tuple(self.context.shape[:2]):
                raise ValueError(f"Condition.context_mask must be (B, L) = "
                                 f"{tuple(self.context.shape[:2])}, got "
                                 f"{tuple(self.context_mask.shape)}")

    # -- construction ------------------------------------------------------------------------
    @staticmethod
    def of(cond: Any) -> Condition | None:
        """None -> None; a Condition -> itself; a tensor (or list) of class labels ->
        ``Condition(labels=...)``."""
        if cond is None or isinstance(cond, Condition):
            return cond
        labels = torch.as_tensor(cond)
        if labels.ndim == 0:
            labels = labels.reshape(1)
        if labels.is_floating_point():
            raise ValueError("a bare tensor condition means class labels and must be integer; "
                             "build a Condition(context=..., control=...) for other inputs")
        return Condition(labels=labels.long())

    @property
    def batch_size(self) -> int:
        return next(int(v.shape[0]) for f in INPUTS if (v := getattr(self, f)) is not None)

    # -- the operations guidance, training and chunking need ---------------------------------
    def null(self) -> Condition:
        """The unconditional counterpart: labels -> -1, context -> the empty prompt's states
        (else zeros), its mask likewise; control images and masks are kept."""
        changes: dict[str, Tensor] = {}
        if self.labels is not None:
            changes["labels"] = torch.full_like(self.labels, NULL_LABEL)
        if self.context is not None:
            B, L, D = self.context.shape
            if self.null_context is not None:
                nc = self.null_context.to(self.context.device, self.context.dtype)
                changes["context"] = nc.expand(B, *nc.shape[1:])
                if self.null_context_mask is not None:
                    changes["context_mask"] = self.null_context_mask.to(
                        self.context.device).expand(B, -1)
                elif self.context_mask is not None:
                    changes["context_mask"] = torch.ones(
                        B, nc.shape[1], dtype=torch.bool, device=self.context.device)
            else:
                changes["context"] = torch.zeros_like(self.context)
                if self.context_mask is not None:
                    m = torch.zeros_like(self.context_mask, dtype=torch.bool)
                    m[:, 0] = True  # attention needs one key; a zero vector is the null token
                    changes["context_mask"] = m
        return replace(self, **changes)

    def with_guidance(self, w: float | Tensor) -> Condition:
        """This condition with the guidance-scale input ``w`` (a number, or one per row)."""
        ref = next(v for f in INPUTS if (v := getattr(self, f)) is not None)
        w = torch.as_tensor(w, dtype=torch.float32, device=ref.device)
        return replace(self, guidance=w.expand(self.batch_size).clone() if w.ndim == 0 else w)

    def drop(self, drop: Tensor) -> Condition:
        """Rows where the (B,) bool tensor ``drop`` is True replaced by their null value
        (condition dropout in training); other rows unchanged."""
        drop = torch.as_tensor(drop, dtype=torch.bool)
        if drop.shape != (self.batch_size,):
            raise ValueError(f"drop must be a ({self.batch_size},) bool tensor, got "
                             f"{tuple(drop.shape)}")
        null = self.null()
        changes = {}
        for name in NULLABLE:
            v, n = getattr(self, name), getattr(null, name)
            if v is not None:
                d = drop.to(v.device).view(-1, *([1] * (v.ndim - 1)))
                changes[name] = torch.where(d, n.to(v.dtype), v)
        return replace(self, **changes)

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        """Concatenation along the batch (e.g. the conditional and null halves of CFG)."""
        conds = list(conds)
        out: dict[str, Tensor | None] = {}
        for f in fields(Condition):
            vals = [getattr(c, f.name) for c in conds]
            if f.name in NULL_FIELDS:
                out[f.name] = _cat_nulls(vals, [c.batch_size for c in conds])
            elif all(v is None for v in vals):
                out[f.name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"cannot concatenate conditions where only some have {f.name}")
            else:
                out[f.name] = torch.cat(vals)
        return Condition(**out)

    def __getitem__(self, index: slice | int | Tensor) -> Condition:
        """The conditions of a part of the batch (``cond[i:j]``, an index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        B = self.batch_size
        per_row = [f for f in NULL_FIELDS if (v := getattr(self, f)) is not None
                   and v.shape[0] == B > 1]  # one null per row (per-prompt negative prompts)
        return replace(self, **{f: getattr(self, f)[index] for f in INPUTS + tuple(per_row)
                                if getattr(self, f) is not None})

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str) -> Condition:
        return Condition(**{f.name: (None if (v := getattr(self, f.name)) is None
                                     else v.to(device)) for f in fields(Condition)})

    def kwargs(self) -> dict[str, Tensor]:
        """The network inputs that are present, as keyword arguments."""
        return {f: v for f in INPUTS if (v := getattr(self, f)) is not None}

    def __repr__(self) -> str:
        parts = [f"{f}={tuple(v.shape)}" for f in INPUTS if (v := getattr(self, f)) is not None]
        return f"Condition({', '.join(parts)})"
