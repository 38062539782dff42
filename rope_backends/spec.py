"""The contract types (``Layout``, ``MRope``, ``RopeArgs``) and input validation.

Every public entry point turns its arguments into one :class:`RopeArgs` here, so every backend
receives inputs that are already checked and normalised: ``cos``/``sin`` in *half form* (one value
per rotated pair), q/k as ``[..., heads, head_dim]``. Bad input raises ``TypeError`` (wrong kind of
thing) or ``ValueError`` (wrong value) with the argument's name, what was expected and what came.
Validation never synchronises with a device: checks that would read device memory (position
ranges, the partial-rotary table check) run only for CPU tensors or when debug checks are on
(``ROPE_BACKENDS_DEBUG=1``). Memory checks (which tensors share elements) read metadata only:
addresses, shapes, strides.

This module imports no backend.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Layout", "MRope", "RopeArgs", "X_DTYPES", "COS_DTYPES", "debug_checks"]

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


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


def debug_checks() -> bool:
    """Opt-in checks that cost a device sync (position ranges on GPU): ``ROPE_BACKENDS_DEBUG=1``."""
    return os.environ.get("ROPE_BACKENDS_DEBUG", "0") not in ("", "0")


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
               :func:`check_partial_rotary`), so a repeated call with this signature must read its
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
        return _half_view(cos, sin, self.layout, self.rotary_dim)

    @property
    def feature_key(self) -> tuple:
        """What a backend's ``supports()`` may depend on; dispatch caches its answer by this."""
        return (self.kind, self.tensors[0].dtype, self.layout, self.mrope is not None)


# --------------------------------------------------------------------------------------------
# checks, each naming the argument, the expectation and what came


def _need_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided or value.is_nested:
        what = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise TypeError(f"{name}: expected a dense (strided) tensor, got {what}; pass {name}.to_dense() or a padded tensor")
    return value


def _need_x_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in X_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def _need_same_device(name: str, t: Tensor, device: torch.device, ref_name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {ref_name}), got {t.device}")


def _no_grad_inplace(name: str, t: Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}: expected a tensor that does not require grad for inplace=True (not differentiable), "
            f"got one that requires grad; use inplace=False (or torch.no_grad() for inference)"
        )


def _rotary_dim(rotary_dim: object, head_dim: int, name: str = "rotary_dim") -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    elif isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int or None, got {type(rotary_dim).__name__}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"{name}: expected an even value in [2, head_dim={head_dim}], got {rotary_dim}"
        )
    return int(rotary_dim)


def _half_view(cos: Tensor, sin: Tensor, layout: Layout, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """Checked cos/sin in half form: as given when the last dim is ``rotary_dim // 2``, else the
    duplicated form read at index i (neox) or 2i (interleaved), by a view."""
    half = rotary_dim // 2
    if cos.shape[-1] == half:
        return cos, sin
    if layout is Layout.NEOX:
        return cos[..., :half], sin[..., :half]
    return cos[..., ::2], sin[..., ::2]


def _half_form(cos: Tensor, sin: Tensor, layout: Layout, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin as one value per pair. The duplicated form (last dim ``rotary_dim``, as HF and
    diffusers build it) is read at index i (neox) or 2i (interleaved), by a view: no copy."""
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in COS_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype (float32/16, bfloat16, float64), got {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"{name}: expected at least 1 dimension, got a 0-d tensor")
    if cos.dtype != sin.dtype:
        raise TypeError(f"sin: expected the dtype of cos ({cos.dtype}), got {sin.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    half = rotary_dim // 2
    last = cos.shape[-1]
    if last == half or last == rotary_dim:
        return _half_view(cos, sin, layout, rotary_dim)
    raise ValueError(
        f"cos: expected last dim rotary_dim//2={half} (one value per pair) or rotary_dim={rotary_dim} "
        f"(duplicated form), got {last} (shape {tuple(cos.shape)})"
    )


def _need_broadcast(name: str, small: Sequence[int], target: Sequence[int], target_name: str) -> None:
    ok = len(small) <= len(target) and all(
        s == t or s == 1 for s, t in zip(reversed(small), reversed(target))
    )
    if not ok:
        raise ValueError(
            f"{name}: expected a shape broadcastable to {tuple(target)} ({target_name}.shape[:-1] + "
            f"(rotary_dim//2,)), got {tuple(small)}"
        )


# --------------------------------------------------------------------------------------------
# memory: which tensors of a call share elements (metadata only: addresses, shapes, strides)
#
# A kernel writing a tensor in place runs many programs at once: if two written elements are one
# memory location (a target that overlaps itself, q and k overlapping) or a written element is
# one a program still has to read (cos/sin, positions, the cache), the result depends on the
# order the programs run in. So an in-place call refuses a target that overlaps itself or any
# other argument of the call, and q and k never share memory (in place or not). The answers are
# exact for the layouts of practice (sub-views of one buffer with the same strides, e.g. q and k
# of a fused qkv projection); where strides differ and the search below gives up, the answer is
# "may overlap" and the call is refused: never a race let through.

_NEVER = -(1 << 62)  # an extent that makes every address test pass (empty tensors have no elements)
_SEARCH_BUDGET = 4096  # nodes of the exact search before it answers "may overlap"

_F = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_F, "is_functorch_wrapped_tensor", None)
_is_batched = getattr(_F, "is_batchedtensor", None)
_unwrapped = getattr(_F, "get_unwrapped", None)
_bdim = getattr(_F, "maybe_get_bdim", None)
functorch_transform = getattr(_F, "peek_interpreter_stack", None) or (lambda: None)


def plain(t: Tensor) -> Tensor:
    """The tensor with its memory: functorch's wrappers (vmap, grad, jvp levels) peeled off, a
    vmapped tensor's batch dim moved to the front (its memory is every sample's). Plain tensors
    come back as they are."""
    if _is_wrapped is None or _unwrapped is None:
        return t
    while _is_wrapped(t):
        if _is_batched is not None and _bdim is not None and _is_batched(t):
            t = _unwrapped(t).movedim(_bdim(t), 0)
        else:
            t = _unwrapped(t)
    return t


def _address(t: Tensor) -> int:
    """Byte address of the first element; 0 where there is no memory (empty, meta, fake)."""
    return t.data_ptr() if t.numel() else 0


def extent(t: Tensor) -> int:
    """Bytes from the first element's address to the end of the last one (0: no elements)."""
    if not t.numel():
        return 0
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


class _TooHard(Exception):
    pass


def _solvable(target: int, terms: list[tuple[int, int, int]], nonzero: bool) -> bool:
    """Whether ``sum(m_i * stride_i) == target`` has an integer solution with ``lo_i <= m_i <= hi_i``
    (``terms`` = (stride > 0, lo, hi)); with ``nonzero``, one other than all m_i = 0 (the ranges
    are then symmetric, so the first nonzero m may be taken positive). Depth-first from the largest
    stride; each level tries only the m that leave a reachable remainder, which for nested strides
    is one or two values. Raises _TooHard past the budget."""
    terms = sorted(terms, key=lambda term: -term[0])
    n = len(terms)
    lo_rest = [0] * (n + 1)
    hi_rest = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        s, lo, hi = terms[i]
        lo_rest[i] = lo_rest[i + 1] + lo * s
        hi_rest[i] = hi_rest[i + 1] + hi * s
    budget = [_SEARCH_BUDGET]

    def search(i: int, rem: int, moved: bool) -> bool:
        if i == n:
            return rem == 0 and (moved or not nonzero)
        budget[0] -= 1
        if budget[0] < 0:
            raise _TooHard
        s, lo, hi = terms[i]
        first = max(lo, -((hi_rest[i + 1] - rem) // s))  # ceil((rem - hi_rest) / s)
        last = min(hi, (rem - lo_rest[i + 1]) // s)
        if nonzero and not moved:
            first = max(first, 0)
        for m in range(first, last + 1):
            if search(i + 1, rem - m * s, moved or m != 0):
                return True
        return False

    return search(0, target, False)


def self_overlap(t: Tensor) -> bool | None:
    """Whether two elements of ``t`` are one memory location: False, True, or None (the exact
    search gave up: treat as overlapping)."""
    dims = sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1)
    reach = 0  # the largest offset the smaller strides reach
    nested = True
    for i, (st, n) in enumerate(dims):
        if st == 0 or (i and st == dims[i - 1][0]):
            return True  # an expanded dim, or two dims stepping alike
        if st <= reach:
            nested = False
        reach += (n - 1) * st
    if nested:
        return False
    try:
        return _solvable(0, [(st, 1 - n, n - 1) for st, n in dims], nonzero=True)
    except _TooHard:
        return None


def shared_memory(a: Tensor, b: Tensor) -> bool | None:
    """Whether ``a`` and ``b`` have a byte in common: False, True, or None (the exact search gave
    up: treat as overlapping). Exact for equal strides (views of one buffer) and for any tensors
    whose byte ranges are disjoint."""
    if not a.numel() or not b.numel():
        return False
    pa, pb = _address(a), _address(b)
    if pb - pa >= extent(a) or pa - pb >= extent(b):
        return False
    ia, ib = a.element_size(), b.element_size()
    terms: dict[int, list[int]] = {}
    for t, size, sign in ((a, ia, -1), (b, ib, 1)):
        for n, st in zip(t.shape, t.stride()):
            if n > 1 and st:  # a stride-0 dim repeats elements: the same bytes as without it
                lo_hi = terms.setdefault(st * size, [0, 0])
                lo_hi[0 if sign < 0 else 1] += sign * (n - 1)
    if ia > 1 or ib > 1:  # bytes within one element
        lo_hi = terms.setdefault(1, [0, 0])
        lo_hi[0] -= ia - 1
        lo_hi[1] += ib - 1
    try:
        return _solvable(pa - pb, [(st, lo, hi) for st, (lo, hi) in terms.items()], nonzero=False)
    except _TooHard:
        return None


def _layout(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, strides {t.stride()}, {t.dtype}"


def _need_distinct(named: Sequence[tuple[str, Tensor]]) -> None:
    """q and k (the rotated tensors) share no element, in place or not."""
    if len(named) < 2 or not _has_memory(named[0][1], named[1][1]):
        return
    (qn, q), (kn, k) = named[0], named[1]
    pq, pk = plain(q), plain(k)
    found = shared_memory(pq, pk)
    if found is not False:
        how = "overlaps" if found else "may overlap (their strides differ too much to tell)"
        raise ValueError(
            f"{kn}: expected a tensor distinct from {qn} (no element in common), got one whose memory {how} "
            f"{qn}'s: {qn} {_layout(pq)}; {kn} {_layout(pk)}, starting {_address(pk) - _address(pq)} bytes "
            f"after {qn}; pass separate tensors (or views of disjoint columns)"
        )


def _need_writable(name: str, t: Tensor) -> None:
    """An in-place target none of whose elements share memory: a kernel's programs would race."""
    for size, stride in zip(t.shape, t.stride()):
        if stride == 0 and size > 1:
            raise ValueError(
                f"{name}: expected a tensor whose elements do not share memory for inplace=True, got "
                f"shape {tuple(t.shape)} with strides {t.stride()} (an expanded view); pass inplace=False"
            )
    if not t.numel() or torch.compiler.is_compiling():  # metadata only, but not SymInt arithmetic
        return
    p = plain(t)
    quick = getattr(torch, "_debug_has_internal_overlap", None)
    if quick is not None and quick(p) == 0:
        return
    found = self_overlap(p)
    if found is not False:
        how = "overlap" if found else "may overlap (not provable from the strides)"
        raise ValueError(
            f"{name}: expected a tensor whose elements do not share memory for inplace=True, got "
            f"shape {tuple(p.shape)} with strides {p.stride()} whose elements {how}; pass inplace=False"
        )


def _need_apart(written: Sequence[tuple[str, Tensor]], read: Sequence[tuple[str, Tensor]]) -> None:
    """In place: no written tensor shares memory with what the kernel reads while it writes
    (cos/sin, positions, the cache); q and k are kept apart by :func:`_need_distinct`."""
    for wn, w in written:
        for rn, r in read:
            if r is None or not _has_memory(w, r):
                continue
            pw, pr = plain(w), plain(r)
            found = shared_memory(pw, pr)
            if found is not False:
                how = "overlaps" if found else "may overlap (their strides differ too much to tell)"
                raise ValueError(
                    f"{wn}: expected a tensor that shares no memory with {rn} for inplace=True (the kernel "
                    f"reads {rn} while it writes {wn}), got one whose memory {how} {rn}'s: {wn} {_layout(pw)}; "
                    f"{rn} {_layout(pr)}, starting {_address(pr) - _address(pw)} bytes after {wn}; "
                    f"pass inplace=False or separate tensors"
                )


def _has_memory(*tensors: Tensor) -> bool:
    """Whether the addresses of these tensors can be read and mean something: not under
    torch.compile or a dispatch mode (fake tensors; the custom op checks at run time), and not
    meta or fake tensors (address 0)."""
    if torch.compiler.is_compiling() or traced():
        return False
    for t in tensors:
        if t is not None and t.numel() and _address(plain(t)) == 0:
            return False
    return True


def check_memory(written: Sequence[tuple[str, Tensor]], read: Sequence[tuple[str, Tensor]], inplace: bool) -> None:
    """Every memory rule of a call: q and k distinct; in place, every target free of
    self-overlap and apart from every other argument. ``written`` are the rotated tensors
    (written only when ``inplace``)."""
    _need_distinct(written)
    if inplace:
        for name, t in written:
            _need_writable(name, t)
        _need_apart(written, read)


def memory_guard(rotated: Sequence[Tensor], read: Sequence[Tensor], inplace: bool):
    """For the dispatcher's prepared runner: ``guard(*rotated, *read) -> bool`` that is True when
    a later call with the same signature (shapes, strides, dtypes) but other addresses keeps every
    rule :func:`check_memory` checked for this call, else False (then the call takes the full
    checks). None when there is nothing to check (one tensor out of place). Per pair of tensors
    that must stay apart it tests, from two addresses, that their byte ranges are disjoint or that
    their distance is the one validated here (overlap depends on the distance alone)."""
    tensors = list(rotated) + (list(read) if inplace else [])
    if len(tensors) < 2:
        return None
    addresses = [_address(plain(t)) for t in tensors]
    extents = [extent(t) or _NEVER for t in tensors]
    if len(rotated) == 2:
        pairs = [(0, 1)] + ([(0, 2), (0, 3), (1, 2), (1, 3)] if inplace else [])
    else:
        pairs = [(0, 1), (0, 2)]
    checks = tuple((i, j, extents[i], extents[j], addresses[j] - addresses[i]) for i, j in pairs)
    if len(checks) == 1:
        return _guard2(*checks[0][2:])
    if len(checks) == 2:
        return _guard3(checks)
    return _guard4(checks)


# Guards run on every repeated call: unrolled, a few additions and comparisons per pair.

def _guard2(ea: int, eb: int, ok: int):
    def guard(a, b):
        d = b.data_ptr() - a.data_ptr()
        return d >= ea or -d >= eb or d == ok
    return guard


def _guard3(checks):
    (_, _, ea, eb, ok_b), (_, _, _, ec, ok_c) = checks

    def guard(a, b, c):
        pa = a.data_ptr()
        d = b.data_ptr() - pa
        if not (d >= ea or -d >= eb or d == ok_b):
            return False
        d = c.data_ptr() - pa
        return d >= ea or -d >= ec or d == ok_c
    return guard


def _guard4(checks):
    (_, _, ea, eb, ok_ab), (_, _, _, ec, ok_ac), (_, _, _, ed, ok_ad), (_, _, _, _, ok_bc), (_, _, _, _, ok_bd) = checks

    def guard(a, b, c, d):
        pa, pb, pc, pd = a.data_ptr(), b.data_ptr(), c.data_ptr(), d.data_ptr()
        x = pb - pa
        if not (x >= ea or -x >= eb or x == ok_ab):
            return False
        x = pc - pa
        if not (x >= ea or -x >= ec or x == ok_ac):
            return False
        x = pd - pa
        if not (x >= ea or -x >= ed or x == ok_ad):
            return False
        x = pc - pb
        if not (x >= eb or -x >= ec or x == ok_bc):
            return False
        x = pd - pb
        return x >= eb or -x >= ed or x == ok_bd
    return guard


# --------------------------------------------------------------------------------------------
# one builder per public entry point


# Signatures of calls that passed every check below. Those checks read metadata only (types,
# shapes, strides, dtypes, devices, grad flags, options), so a signature seen before passes again
# without re-checking: it is what keeps rb.apply's host overhead in the low microseconds. A new
# signature takes the full checks, which raise the precise errors. Value: (layout, rotary_dim);
# cos/sin's shapes are in the signature, so their half form is taken as validation took it.
_TABLE_SIGNATURES: dict[tuple, tuple[Layout, int]] = {}
_MAX_SIGNATURES = 4096  # serving changes T every step: bound the memory, re-validate after a clear


def _signature(tensors: tuple[tuple[str, object], ...], cos: object, sin: object,
               layout: object, rotary_dim: object, inplace: object) -> tuple | None:
    if type(cos) is not Tensor or type(sin) is not Tensor or type(layout) not in (str, Layout):
        return None  # subclasses (Parameter, FakeTensor) and odd arguments take the full checks
    if (rotary_dim is not None and type(rotary_dim) is not int) or type(inplace) is not bool:
        return None  # 1 == True as a key: only exact ints and bools may share a signature
    try:
        key = (layout, rotary_dim, inplace, torch.is_grad_enabled(),
               cos.shape, cos.stride(), cos.dtype, cos.device, cos.requires_grad,
               sin.shape, sin.stride(), sin.dtype, sin.device, sin.requires_grad)
        for _, t in tensors:
            if type(t) is not Tensor:
                return None
            key += (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
    except RuntimeError:  # sparse or nested tensors have no strides: the full checks say why
        return None
    return key


def args_for_tables(
    tensors: tuple[tuple[str, object], ...],
    cos: object,
    sin: object,
    layout: Layout | str,
    rotary_dim: int | None,
    inplace: bool,
) -> RopeArgs:
    """Validate ``apply`` (one tensor) or ``apply_qk`` (q, k) with explicit cos/sin."""
    key = None
    if not torch.compiler.is_compiling() and functorch_transform() is None:
        key = _signature(tensors, cos, sin, layout, rotary_dim, inplace)
    known = _TABLE_SIGNATURES.get(key) if key is not None else None
    if known is not None:
        layout, rotary_dim, value_checks = known
        checked = tuple(t for _, t in tensors)
        check_memory(tensors, (("cos", cos), ("sin", sin)), inplace)  # addresses are not in the signature
        if value_checks and values_readable(cos):  # values are not in the signature either
            check_partial_rotary(cos, sin, layout, checked[0].shape[-1])
        cos, sin = _half_view(cos, sin, layout, rotary_dim)
        return RopeArgs(checked, inplace, layout, rotary_dim, cos=cos, sin=sin, value_checks=value_checks)
    args = _check_tables(tensors, cos, sin, layout, rotary_dim, inplace)
    if key is not None:
        if len(_TABLE_SIGNATURES) >= _MAX_SIGNATURES:
            _TABLE_SIGNATURES.clear()
        _TABLE_SIGNATURES[key] = (args.layout, args.rotary_dim, args.value_checks)
    return args


def _check_tables(
    tensors: tuple[tuple[str, object], ...],
    cos: object,
    sin: object,
    layout: Layout | str,
    rotary_dim: int | None,
    inplace: bool,
) -> RopeArgs:
    """Every check of :func:`args_for_tables`, raising the precise error."""
    layout = Layout.parse(layout)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    checked = []
    first_name = tensors[0][0]
    for name, t in tensors:
        t = _need_tensor(name, t)
        _need_x_dtype(name, t)
        if t.dim() < 1:
            raise ValueError(f"{name}: expected at least 1 dimension [..., head_dim], got a 0-d tensor")
        checked.append(t)
    x0 = checked[0]
    head_dim = x0.shape[-1]
    for (name, _), t in zip(tensors[1:], checked[1:]):
        if t.dtype != x0.dtype:
            raise TypeError(f"{name}: expected the dtype of {first_name} ({x0.dtype}), got {t.dtype}")
        _need_same_device(name, t, x0.device, first_name)
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name}: expected head_dim {head_dim} (that of {first_name}), got {t.shape[-1]}")
    named = tuple((name, t) for (name, _), t in zip(tensors, checked))
    _need_distinct(named)
    asked_rotary_dim = rotary_dim
    rotary_dim = _rotary_dim(rotary_dim, head_dim)
    cos = _need_tensor("cos", cos)
    sin = _need_tensor("sin", sin)
    _need_same_device("cos", cos, x0.device, first_name)
    _need_same_device("sin", sin, x0.device, first_name)
    passed = (("cos", cos), ("sin", sin))
    cos, sin = _half_form(cos, sin, layout, rotary_dim)
    for (name, _), t in zip(tensors, checked):
        _need_broadcast("cos", cos.shape, (*t.shape[:-1], rotary_dim // 2), name)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            "cos: expected cos/sin that do not require grad (gradients flow to the rotated tensors only), "
            "got cos/sin that require grad; pass cos.detach(), sin.detach()"
        )
    # a width that reads two ways (docs/errors.md, "partial rotary"): checked by value where reading costs no sync
    # (the width as passed: a duplicated full-rotation table is head_dim wide and reads one way only)
    value_checks = (asked_rotary_dim is None and head_dim % 4 == 0 and passed[0][1].shape[-1] == head_dim // 2
                    and values_readable(cos))
    if value_checks:
        check_partial_rotary(cos, sin, layout, head_dim)
    if inplace:
        for name, t in named:
            _no_grad_inplace(name, t)
            _need_writable(name, t)
        _need_apart(named, passed)
    return RopeArgs(tuple(checked), inplace, layout, rotary_dim, cos=cos, sin=sin, value_checks=value_checks)


def values_readable(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values: a CPU tensor (or any device with
    ``ROPE_BACKENDS_DEBUG=1``, where a read costs a sync), outside torch.compile and dispatch
    modes (fake tensors have none)."""
    if torch.compiler.is_compiling() or traced():
        return False
    kind = plain(t).device.type
    return kind != "meta" and (kind == "cpu" or debug_checks())


def _pair_halves(t: Tensor, layout: Layout, w: int) -> tuple[Tensor, Tensor]:
    """The halves (neox) or the even and odd columns (interleaved) of the last dim, by views."""
    if layout is Layout.NEOX:
        return t.chunk(2, -1)
    return t.unflatten(-1, (w // 2, 2)).unbind(-1)


def check_partial_rotary(cos: Tensor, sin: Tensor, layout: Layout, head_dim: int) -> None:
    """cos/sin (half form as passed) of width ``head_dim // 2`` for a call without ``rotary_dim=``
    read as the half form of a full rotation; they may be meant as the duplicated form of
    ``rotary_dim = head_dim // 2`` (GLM-style partial rotary), which metadata cannot tell apart.
    A table whose halves (neox) or even/odd columns (interleaved) are equal, for cos and sin, and
    that rotates something (some sin != 0; cos = 1, sin = 0 gives the same result either way) is
    the duplicated form: ValueError naming cos. Reads the values (callers check values_readable)."""
    c, s = plain(cos), plain(sin)
    w = c.shape[-1]
    # it runs on every CPU call of this width: as few ops as possible, cos first (a half-form
    # table's halves differ there, which settles it)
    if not torch.equal(*_pair_halves(c, layout, w)):
        return
    if not torch.equal(*_pair_halves(s, layout, w)) or not bool(s.ne(0).any()):
        return
    pairs = "halves" if layout is Layout.NEOX else "even and odd columns"
    raise ValueError(
        f"cos: expected rotary_dim= for cos/sin of width head_dim//2={w} whose {pairs} are equal, got "
        f"rotary_dim=None; such a table is the duplicated form of a partial rotation (GLM-style), but without "
        f"rotary_dim it reads as the half form of a full one: pass rotary_dim={w} (rotate the first {w} dims) "
        f"or rotary_dim={head_dim} (a full rotation with this half-form table)"
    )


# C queries (stand-ins where a torch lacks them): active TorchDispatchModes, the jit trace state
dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 0)
jit_trace_state = getattr(torch._C, "_get_tracing_state", None) or (lambda: None)


def traced() -> bool:
    """A TorchDispatchMode (make_fx, FakeTensorMode, FlopCounterMode, ...) or a jit trace is
    active: the call must reach it as one op (the custom op; a kernel launch is invisible to it),
    and tensor values may not be readable (no data-dependent checks)."""
    return bool(dispatch_modes()) or jit_trace_state() is not None


def position_range_checked(positions: Tensor) -> bool:
    """Whether calls check position values: always on CPU; on devices only with
    ``ROPE_BACKENDS_DEBUG=1``, since reading values back costs a sync."""
    return positions.device.type == "cpu" or debug_checks()


def check_position_range(positions: Tensor, cache: Tensor) -> None:
    """ValueError unless every position indexes a row of ``cache`` (reads the values: a sync on a
    device). Under vmap the check covers every sample."""
    positions = plain(positions)
    if positions.numel():
        lo, hi = (int(v) for v in torch.aminmax(positions))  # one pass (CPU: ~1 us less than min + max)
        if lo < 0 or hi >= cache.shape[0]:
            raise ValueError(
                f"positions: expected values in [0, {cache.shape[0]}) (cos_sin_cache rows), got min {lo}, max {hi}"
            )


def args_for_cached(
    q: object,
    k: object,
    positions: object,
    cos_sin_cache: object,
    layout: Layout | str,
    rotary_dim: int | None,
    mrope: MRope | Sequence[int] | None,
    inplace: bool,
    head_dim: int | None,
) -> tuple[RopeArgs, tuple[Tensor, ...]]:
    """Validate ``apply_cached``. Returns the args (q/k as ``[..., heads, head_dim]`` views) and
    the caller's original tensors, which are what the user gets back."""
    layout = Layout.parse(layout)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    q = _need_tensor("q", q)
    originals = [q]
    named = [("q", q)]
    if k is not None:
        k = _need_tensor("k", k)
        originals.append(k)
        named.append(("k", k))
    views = []
    for name, t in named:
        _need_x_dtype(name, t)
        if name == "k":
            if t.dtype != q.dtype:
                raise TypeError(f"k: expected the dtype of q ({q.dtype}), got {t.dtype}")
            _need_same_device("k", t, q.device, "q")
        if t.dim() == 2:  # vLLM style [T, heads * head_dim]
            if head_dim is None:
                raise ValueError(
                    f"head_dim: expected an int when {name} is 2-D [tokens, heads*head_dim], got None"
                )
            if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
                raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
            if t.shape[1] % head_dim:
                raise ValueError(
                    f"{name}: expected last dim divisible by head_dim={head_dim}, got {t.shape[1]}"
                )
            t = t.view(t.shape[0], t.shape[1] // head_dim, head_dim)
        elif t.dim() < 3:
            raise ValueError(
                f"{name}: expected [tokens, heads*head_dim] or [..., tokens, heads, head_dim], got shape {tuple(t.shape)}"
            )
        elif head_dim is not None and t.shape[-1] != head_dim:
            raise ValueError(f"head_dim: expected {t.shape[-1]} (the last dim of {name}), got {head_dim}")
        views.append(t)
    if len(views) == 2:
        if views[1].shape[-1] != views[0].shape[-1]:
            raise ValueError(f"k: expected head_dim {views[0].shape[-1]} (that of q), got {views[1].shape[-1]}")
        if views[1].shape[:-2] != views[0].shape[:-2]:
            raise ValueError(
                f"k: expected leading dims {tuple(views[0].shape[:-2])} (those of q), got {tuple(views[1].shape[:-2])}"
            )
        _need_distinct((("q", views[0]), ("k", views[1])))
    lead = tuple(views[0].shape[:-2])
    cache = _need_tensor("cos_sin_cache", cos_sin_cache)
    if cache.dtype not in COS_DTYPES:
        raise TypeError(f"cos_sin_cache: expected a floating dtype, got {cache.dtype}")
    if cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected shape [max_position, rotary_dim], got {tuple(cache.shape)}")
    _need_same_device("cos_sin_cache", cache, q.device, "q")
    if torch.is_grad_enabled() and cache.requires_grad:
        raise ValueError(
            "cos_sin_cache: expected a cache that does not require grad (gradients flow to q and k only), got "
            "one that requires grad (e.g. an nn.Parameter); pass cos_sin_cache.detach() or call under torch.no_grad()"
        )
    if rotary_dim is not None and rotary_dim != cache.shape[1]:
        raise ValueError(
            f"rotary_dim: expected cos_sin_cache.shape[1]={cache.shape[1]} (or None), got {rotary_dim}"
        )
    rotary_dim = _rotary_dim(cache.shape[1], views[0].shape[-1], "cos_sin_cache.shape[1] (rotary_dim)")
    mrope = MRope.parse(mrope)
    if mrope is not None and len(mrope.axis_map) != rotary_dim // 2:
        raise ValueError(
            f"mrope: expected an axis map of length rotary_dim//2={rotary_dim // 2}, got {len(mrope.axis_map)}"
        )
    positions = _need_tensor("positions", positions)
    if positions.dtype not in _INT_DTYPES:
        raise TypeError(f"positions: expected an integer dtype (int64/int32/...), got {positions.dtype}")
    _need_same_device("positions", positions, q.device, "q")
    if tuple(positions.shape) == lead:
        pass  # one position per token (with mrope: text-only input, all rows equal)
    elif mrope is not None and tuple(positions.shape) == (3, *lead):
        pass
    else:
        want = f"{lead}" + (f" or {(3, *lead)}" if mrope is not None else "")
        hint = "" if mrope is not None or positions.shape[:1] != (3,) else " (3-row positions need mrope=)"
        raise ValueError(f"positions: expected shape {want}, got {tuple(positions.shape)}{hint}")
    # a data-dependent check cannot be traced: under torch.compile, make_fx or fake tensors the
    # custom op makes it when it runs on real tensors (ops.py)
    if position_range_checked(positions) and not torch.compiler.is_compiling() and not traced():
        check_position_range(positions, cache)
    if inplace:
        named_views = tuple((name, t) for (name, _), t in zip(named, views))
        for name, t in named_views:
            _no_grad_inplace(name, t)
            _need_writable(name, t)
        _need_apart(named_views, (("positions", positions), ("cos_sin_cache", cache)))
    args = RopeArgs(
        tuple(views), inplace, layout, rotary_dim,
        positions=positions, cache=cache, mrope=mrope,
    )
    return args, tuple(originals)
