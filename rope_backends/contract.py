"""The contract types: ``Layout``, ``MRope``, ``RopeArgs`` and the dtypes a call may carry.

``RopeArgs`` is the form in which every backend receives one validated call (validation.py
builds it). The rules that define a value of these types live here too: which elements a
``Layout`` pairs, what an axis map may hold, and how the duplicated cos/sin form reads as the
half form (:func:`half_view`). The numbers themselves are reference.py's; docs/contract.md
("API", "Numerics") is the prose.

This module checks nothing about a call (validation.py does), reads no tensor values and imports
no other rope_backends module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Layout", "MRope", "RopeArgs", "X_DTYPES", "COS_DTYPES", "INT_DTYPES", "half_view"]

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Layout(str, enum.Enum):
    """Which elements form a rotated pair (``rotary_dim`` = r, ``half`` = r // 2).

    NEOX:        pair i is (i, i + half)   -- rotate_half: Llama, NeoX, Qwen, vLLM ``is_neox_style``
    INTERLEAVED: pair i is (2i, 2i + 1)    -- rotate_every_two: GPT-J, Wan/Helios complex form
    """

    NEOX = "neox"
    INTERLEAVED = "interleaved"

    @classmethod
    def parse(cls, value: "Layout | str") -> "Layout":
        if isinstance(value, Layout):
            return value
        try:
            return _LAYOUTS[value]
        except (KeyError, TypeError):
            raise ValueError(
                f"layout: expected one of {sorted(_LAYOUTS)} or a rope_backends.Layout, got {value!r}"
            ) from None


_LAYOUTS = {"neox": Layout.NEOX, "interleaved": Layout.INTERLEAVED}


@dataclass(frozen=True)
class MRope:
    """Multimodal RoPE: which position row (0 = t, 1 = h, 2 = w) drives each frequency index.

    ``axis_map[j]`` is the row of ``positions[3, ...]`` whose value rotates pair j; its length is
    ``rotary_dim // 2``. Build it with :mod:`rope_backends.mrope` (``chunked``, ``interleaved``,
    ``ernie``) rather than by hand.
    """

    axis_map: tuple[int, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.axis_map or any(a not in (0, 1, 2) for a in self.axis_map):
            raise ValueError(
                f"mrope: expected an axis map of values in (0, 1, 2), got {self.axis_map!r}"
            )
        object.__setattr__(self, "axis_map", tuple(int(a) for a in self.axis_map))
        # an MRope keys the dispatcher's cache on every call: hash its long map once
        object.__setattr__(self, "_hash", hash((self.axis_map, self.name)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def parse(cls, value: "MRope | Sequence[int] | None") -> "MRope | None":
        if value is None or isinstance(value, MRope):
            return value
        if isinstance(value, Tensor):
            value = value.tolist()
        try:
            return cls(tuple(int(v) for v in value))
        except TypeError:
            raise TypeError(
                f"mrope: expected an MRope (rope_backends.mrope.chunked/interleaved/ernie) or a "
                f"sequence of axis indices, got {type(value).__name__}"
            ) from None


@dataclass
class RopeArgs:
    """One validated call, the form in which every backend receives its work.

    tensors    inputs, each ``[..., heads, head_dim]`` (q and k may differ in heads and leading
               dims); any strides.
    inplace    write results into ``tensors`` and return them; otherwise return fresh tensors
               and leave the inputs untouched.
    layout, rotary_dim, conjugate
               pairing, rotated width (even, <= head_dim), and whether to rotate by -theta
               (backward).
    cos, sin   half form ``[..., rotary_dim // 2]``, broadcastable to each
               ``tensor.shape[:-1] + (rotary_dim // 2,)``; any float dtype; may be strided or
               expanded views. None when positions/cache are given.
    positions  ``tensors[i].shape[:-2]`` (or ``[3, *that]`` with ``mrope``); integer dtype.
    cache      ``[max_position, rotary_dim]``: cos in columns ``[:half]``, sin in ``[half:]``.
    mrope      per-frequency position row, or None.
    value_checks
               validation read cos/sin values (the partial-rotary check,
               :func:`rope_backends.validation.check_partial_rotary`), so a repeated call with this signature must read its
               own again: the dispatcher's runner for it makes that check first. Backends ignore it.
    """

    tensors: tuple[Tensor, ...]
    inplace: bool
    layout: Layout
    rotary_dim: int
    conjugate: bool = False
    cos: Tensor | None = None
    sin: Tensor | None = None
    positions: Tensor | None = None
    cache: Tensor | None = None
    mrope: MRope | None = None
    value_checks: bool = False

    @property
    def kind(self) -> str:
        return "cached" if self.cache is not None else "table"

    @property
    def position_axis_map(self) -> tuple[int, ...] | None:
        """The MRoPE axis map when positions carry the 3 rows, else None (one position per
        token: plain RoPE, or MRoPE on text-only input where the rows would be equal)."""
        if self.mrope is None or self.positions is None:
            return None
        if self.positions.dim() != self.tensors[0].dim() - 1:
            return None
        return self.mrope.axis_map

    def for_call(self, tensors: Sequence[Tensor], a: Tensor, b: Tensor) -> "RopeArgs":
        """These args rebound to a later call with the same signature (``Backend.prepare``'s
        runner arguments): ``tensors`` the call's (in place, possibly the caller's [T, H*D] form
        of them), ``a, b`` its cos, sin as passed (either form) or its positions, cache."""
        tensors = tuple(t if t.shape == like.shape else t.view(like.shape) for t, like in zip(tensors, self.tensors))
        if self.cache is not None:
            return RopeArgs(tensors, self.inplace, self.layout, self.rotary_dim, self.conjugate,
                            positions=a, cache=b, mrope=self.mrope)
        a, b = self.half_tables(a, b)
        return RopeArgs(tensors, self.inplace, self.layout, self.rotary_dim, self.conjugate, cos=a, sin=b)

    def half_tables(self, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """A later call's cos/sin (validated with these args' signature) in half form: the
        duplicated form ``[..., rotary_dim]`` as the same views validation took."""
        return half_view(cos, sin, self.layout, self.rotary_dim)

    @property
    def feature_key(self) -> tuple:
        """What a backend's ``supports()`` may depend on; dispatch caches its answer by this."""
        return (self.kind, self.tensors[0].dtype, self.layout, self.mrope is not None)


def half_view(cos: Tensor, sin: Tensor, layout: Layout, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """Checked cos/sin in half form: as given when the last dim is ``rotary_dim // 2``, else the
    duplicated form read at index i (neox) or 2i (interleaved), by a view."""
    half = rotary_dim // 2
    if cos.shape[-1] == half:
        return cos, sin
    if layout is Layout.NEOX:
        return cos[..., :half], sin[..., :half]
    return cos[..., ::2], sin[..., ::2]
