"""Memory rules of a call (memory.py): an in-place target that overlaps itself, q and k
sharing memory, and an in-place target sharing memory with cos/sin/positions/cache are refused,
from metadata only, before anything is written -- on the first call of a signature and on the
repeated one (the dispatcher's prepared runner keeps a memory guard: addresses are not part of a
signature). The overlap analysis is checked against brute force over random strided views.
The error catalogue holds the refusals themselves (testing/cases.py: error_cases()).
"""

from __future__ import annotations

import random

import pytest
import torch

import rope_backends as rb
from rope_backends import dispatch, memory, reference
from rope_backends.testing import assert_bitwise_equal


# ---- the analysis, against brute force ---------------------------------------------------------

def _bytes(t: torch.Tensor) -> set[int]:
    """Every byte address an element of ``t`` occupies."""
    if not t.numel():
        return set()
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(n) * st)
    size = t.element_size()
    base = t.data_ptr()
    return {base + int(o) * size + b for o in offsets.reshape(-1) for b in range(size)}


def _random_view(rng: random.Random, storage: torch.Tensor, equal_strides_of=None) -> torch.Tensor:
    ndim = rng.randint(1, 3)
    shape = [rng.randint(1, 4) for _ in range(ndim)]
    if equal_strides_of is not None:
        strides = list(equal_strides_of.stride())
        shape = [rng.randint(1, 4) for _ in strides]
    else:
        strides = [rng.randint(0, 12) for _ in range(ndim)]
    span = sum((n - 1) * st for n, st in zip(shape, strides)) + 1
    offset = rng.randint(0, max(0, storage.numel() - span))
    return storage.as_strided(shape, strides, offset)


def test_shared_memory_matches_brute_force():
    rng = random.Random(0)
    storage = torch.zeros(96)
    unsure = 0
    for trial in range(3000):
        a = _random_view(rng, storage)
        b = _random_view(rng, storage, equal_strides_of=a if trial % 2 else None)
        if rng.random() < 0.2:  # another dtype over the same bytes (cos of another dtype than q)
            b = storage.view(torch.float16).as_strided(b.shape, b.stride(), 2 * b.storage_offset() + rng.randint(0, 1))
        want = bool(_bytes(a) & _bytes(b))
        got = memory.shared_memory(a, b)
        if got is None:
            unsure += 1
            assert trial % 2 == 0, "the search gave up on equal strides"
            continue
        assert got == want, (a.shape, a.stride(), a.storage_offset(), b.shape, b.stride(), b.storage_offset(), b.dtype)
    assert unsure < 30, unsure  # "may overlap" (refused) stays rare even for unrelated strides


def test_self_overlap_matches_brute_force():
    rng = random.Random(1)
    storage = torch.zeros(200)
    for _ in range(3000):
        t = _random_view(rng, storage)
        offsets = [sum(i * st for i, st in zip(idx, t.stride())) for idx in _indices(t.shape)]
        want = len(offsets) != len(set(offsets))
        got = memory.self_overlap(t)
        assert got is not None and got == want, (t.shape, t.stride())


def _indices(shape):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _indices(shape[1:]):
            yield (i, *rest)


def test_fused_qkv_views_are_exactly_apart():
    """q and k of one fused projection: disjoint columns never overlap, whatever T and head
    counts; one column too many always does."""
    for T, hq, hk, d in ((1, 4, 2, 16), (7, 32, 8, 128), (5, 3, 3, 80)):
        qkv = torch.empty(T, (hq + 2 * hk) * d)
        q, k = qkv[:, : hq * d].view(T, hq, d), qkv[:, hq * d: (hq + hk) * d].view(T, hk, d)
        assert memory.shared_memory(q, k) is False
        k_slip = qkv[:, hq * d - 1: (hq + hk) * d - 1]
        assert memory.shared_memory(qkv[:, : hq * d], k_slip) is (T > 0)


def test_memory_guard():
    q, k = torch.empty(4, 4, 16), torch.empty(4, 2, 16)
    assert memory.memory_guard((q,), (), False) is None  # one tensor out of place: nothing to keep apart
    guard = memory.memory_guard((q, k), (), False)
    assert guard(q, k) and guard(torch.empty(4, 4, 16), torch.empty(4, 2, 16))
    assert not guard(q, q.view(-1)[16:].as_strided((4, 2, 16), (32, 16, 1)))  # inside q's range, new distance
    buf = torch.empty(4, 6, 16)
    fused = memory.memory_guard((buf[:, :4], buf[:, 4:]), (), False)
    assert fused(buf[:, :4], buf[:, 4:])  # byte ranges intersect: the validated distance passes
    assert not fused(buf[:, :4], buf[:, 3:5])  # another distance: the full checks decide


# ---- on every backend, first and repeated calls ----------------------------------------------

def _tables(n, d, dev):
    cos, sin = rb.cos_sin(torch.arange(n) + 1, d)
    return cos[:, None].to(dev), sin[:, None].to(dev)


def test_fused_views_in_place_then_a_slip_with_the_same_signature(target):
    """A fused buffer rotated in place twice (the second call takes the prepared runner), then
    the same shapes and strides but k one head to the left: refused, nothing written; then the
    right views again: bit-exact."""
    dev, b = target.device, target.backend
    T, d = 4, 16
    c, s = _tables(T, d, dev)
    cache = rb.cos_sin_cache(16, d, device=dev)
    pos = torch.tensor([3, 0, 9, 15], device=dev)
    base = torch.randn(T, 8 * d).to(dev)
    calls = {
        "apply_qk": lambda buf, shift: rb.apply_qk(buf[:, : 4 * d].view(T, 4, d),
                                                   buf[:, (4 - shift) * d: (6 - shift) * d].view(T, 2, d),
                                                   c, s, inplace=True, backend=b),
        "apply_cached": lambda buf, shift: rb.apply_cached(buf[:, : 4 * d], buf[:, (4 - shift) * d: (6 - shift) * d],
                                                           pos, cache, head_dim=d, backend=b),
    }
    cp, sp = reference.cos_sin_from_cache(pos, cache, None)
    tables = {"apply_qk": (c, s), "apply_cached": (cp[:, None], sp[:, None])}
    for name, call in calls.items():
        tc, ts = tables[name]
        want = base.clone()
        want[:, : 6 * d] = reference.rotate(base[:, : 6 * d].view(T, 6, d), tc, ts, rb.Layout.NEOX, d).view(T, 6 * d)
        for _ in range(2):
            buf = base.clone()
            call(buf, 0)
            assert_bitwise_equal(buf, want, name=f"{name}: fused in place")
        buf = base.clone()
        with pytest.raises(ValueError, match="^k: expected a tensor distinct from q"):
            call(buf, 1)
        assert_bitwise_equal(buf, base, name=f"{name}: nothing written by the refused call")
        buf = base.clone()
        call(buf, 0)
        assert_bitwise_equal(buf, want, name=f"{name}: fused in place after the refusal")


def test_tables_inside_the_target_with_a_known_signature(target):
    """In place with cos/sin of their own (prepared runner kept), then cos of the same shape and
    strides living inside x: refused on the runner path too, nothing written."""
    dev, b = target.device, target.backend
    c, s = _tables(4, 16, dev)
    x0 = torch.randn(4, 2, 16).to(dev)
    for _ in range(2):
        x = x0.clone()
        rb.apply(x, c.contiguous(), s.contiguous(), inplace=True, backend=b)
    x = x0.clone()
    inside = x.view(-1)[32:64].view(4, 1, 8)
    inside.copy_(c)
    before = x.clone()
    with pytest.raises(ValueError, match="^x: expected a tensor that shares no memory with cos"):
        rb.apply(x, inside, s.contiguous(), inplace=True, backend=b)
    assert_bitwise_equal(x, before, name="nothing written")
    # out of place the same tables are only read: fine
    got = rb.apply(x, inside, s.contiguous(), backend=b)
    assert_bitwise_equal(got, reference.rotate(before, inside.clone(), s, rb.Layout.NEOX, 16), name="out of place")


def test_guard_failure_takes_the_full_checks_and_keeps_serving(target):
    """A guard that fails because a new distance is valid (k moved to another disjoint place in the
    same buffer) runs the full checks, passes, and the result is exact."""
    dev, b = target.device, target.backend
    T, d = 3, 16
    c, s = _tables(T, d, dev)
    base = torch.randn(T, 10, d).to(dev)
    for shift in (0, 0, 2, 2, 0):
        buf = base.clone()
        q, k = buf[:, 0:4], buf[:, 4 + shift: 6 + shift]
        rb.apply_qk(q, k, c, s, inplace=True, backend=b)
        assert_bitwise_equal(q, reference.rotate(base[:, 0:4], c, s, rb.Layout.NEOX, d), name="q")
        assert_bitwise_equal(k, reference.rotate(base[:, 4 + shift: 6 + shift], c, s, rb.Layout.NEOX, d), name="k")


def test_torch_compile_checks_memory_when_the_op_runs():
    """Under torch.compile validation sees fake tensors (no addresses): the in-place op makes the
    memory checks on the real ones when it runs."""
    c, s = _tables(4, 16, "cpu")

    def f(buf, c, s, shift: int):
        rb.apply_qk(buf[:, 0:4], buf[:, 4 - shift: 6 - shift], c, s, inplace=True)
        return buf * 1

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    base = torch.randn(4, 6, 16)
    assert_bitwise_equal(g(base.clone(), c, s, 0), f(base.clone(), c, s, 0), name="compiled fused in place")
    with pytest.raises(ValueError, match="^k: expected a tensor distinct from q"):
        g(base.clone(), c, s, 1)


def test_runner_entries_carry_their_guard():
    """Every kept runner has a guard where two tensors must stay apart (in place, or q and k)."""
    x, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    c, s = _tables(3, 16, "cpu")
    dispatch._RUNNERS.clear()
    rb.apply(x.clone(), c, s)
    rb.apply(x.clone(), c, s, inplace=True)
    rb.apply_qk(x.clone(), k.clone(), c, s)
    entries = list(dispatch._RUNNERS.values())
    assert len(entries) == 3
    assert [e[2] is None for e in entries] == [True, False, False]  # only apply out of place has nothing to check
