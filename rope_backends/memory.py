"""Memory rules of a call: which of its tensors may share elements, from metadata alone.

Reads addresses, shapes and strides, never values, and never synchronises. The rules
(docs/contract.md, "Errors"): q and k share no element; in place, no target overlaps itself or
anything the kernel reads while it writes (cos/sin, positions, the cache). The exact overlap
search (:func:`self_overlap`, :func:`shared_memory`) answers for the layouts of practice and
says "may overlap" where it gives up, which refuses the call. :func:`memory_guard` turns one
validated call's answers into a few address comparisons for the dispatcher's repeated calls.

This module checks no types, shapes or dtypes (validation.py does) and imports only modes.py.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .modes import plain, traced

__all__ = ["extent", "self_overlap", "shared_memory", "need_distinct", "need_writable", "need_apart",
           "check_memory", "memory_guard"]

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


def _refuse_overlap(an: str, a: Tensor, bn: str, b: Tensor, named: str, expected: str, hint: str) -> None:
    """ValueError naming ``named`` (``an`` or ``bn``) unless ``a`` and ``b`` share no byte: what was
    expected, how their memory meets, both layouts and the distance between their first elements."""
    pa, pb = plain(a), plain(b)
    found = shared_memory(pa, pb)
    if found is False:
        return
    how = "overlaps" if found else "may overlap (their strides differ too much to tell)"
    other = an if named == bn else bn
    raise ValueError(
        f"{named}: expected {expected}, got one whose memory {how} {other}'s: {an} {_layout(pa)}; {bn} "
        f"{_layout(pb)}, starting {_address(pb) - _address(pa)} bytes after {an}; {hint}"
    )


def need_distinct(named: Sequence[tuple[str, Tensor]]) -> None:
    """q and k (the rotated tensors) share no element, in place or not."""
    if len(named) < 2 or not _has_memory(named[0][1], named[1][1]):
        return
    (qn, q), (kn, k) = named[0], named[1]
    _refuse_overlap(qn, q, kn, k, kn, f"a tensor distinct from {qn} (no element in common)",
                    "pass separate tensors (or views of disjoint columns)")


def need_writable(name: str, t: Tensor) -> None:
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


def need_apart(written: Sequence[tuple[str, Tensor]], read: Sequence[tuple[str, Tensor]]) -> None:
    """In place: no written tensor shares memory with what the kernel reads while it writes
    (cos/sin, positions, the cache); q and k are kept apart by :func:`need_distinct`."""
    for wn, w in written:
        for rn, r in read:
            if r is not None and _has_memory(w, r):
                expected = (f"a tensor that shares no memory with {rn} for inplace=True (the kernel reads {rn} "
                            f"while it writes {wn})")
                _refuse_overlap(wn, w, rn, r, wn, expected, "pass inplace=False or separate tensors")


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
    need_distinct(written)
    if inplace:
        for name, t in written:
            need_writable(name, t)
        need_apart(written, read)


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
