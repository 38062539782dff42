"""The ``npu`` backend's code on CPU tensors (simulated NPU), bit for bit against the reference,
plus detection of an Ascend machine by simulation and the registration contract.

Every conformance check here goes through the public calls with ``backend="npu"`` and proves the
npu forward really ran (a counting wrapper around it), so a dispatch that quietly reached the
eager backend would fail rather than pass trivially. The reference is the same call with
``backend="eager"`` on identical inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import rope_backends as rb
from rope_backends import environment, mrope, reference, registry
from rope_backends.backends import npu as npu_backend
from rope_backends.contract import Layout, MRope, RopeArgs
from rope_backends.testing.check import assert_bitwise_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LAYOUTS = ["neox", "interleaved"]
# (head_dim, rotary_dim): full, partial, non power of two, smallest
DIMS = [(64, 64), (80, 48), (6, 2)]


# --------------------------------------------------------------------------------------------
# fixtures


def _clear_selection() -> None:
    registry._SELECTED.clear()


@pytest.fixture
def npu(monkeypatch):
    """Simulated NPU on, selection cache cleared, and the npu backend wrapped by a call counter
    (restored afterwards). Yields the list the counter appends to."""
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "1")
    original = registry.get("npu")
    calls: list[RopeArgs] = []

    def counted(args: RopeArgs):
        calls.append(args)
        return original.forward(args)

    # the prepared runners must count too: a repeated signature runs through them
    registry.register_backend(dataclasses.replace(original, forward=counted, prepare=registry.prepare_forward(counted)),
                              replace=True)
    _clear_selection()
    try:
        yield calls
    finally:
        registry.register_backend(original, replace=True)
        _clear_selection()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed, scale=3.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _cos_sin(shape, dtype=torch.float32, seed=0):
    """Angles of any size, so rotations hit every rounding case (not just |c|, |s| <= 1 ints)."""
    theta = torch.rand(shape, generator=_gen(seed), dtype=torch.float64) * 200.0 - 100.0
    return theta.cos().to(dtype), theta.sin().to(dtype)


def _specials(dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    sub = fi.tiny * fi.eps
    vals = [0.0, -0.0, sub, -sub, fi.tiny - sub, fi.tiny, -fi.tiny, fi.max, -fi.max, math.inf, -math.inf,
            math.nan, 1.0, -1.0, fi.eps, 0.5 * fi.max, 1e-3, 0.7]
    return torch.tensor(vals, dtype=torch.float64)


def _special_fill(shape, dtype, seed) -> torch.Tensor:
    """About half special values of ``dtype`` (+-0, subnormals, +-inf, NaN, largest finite),
    the rest normals."""
    vals = _specials(dtype)
    g = _gen(seed)
    pick = vals[torch.randint(0, len(vals), shape, generator=g)]
    normal = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape, generator=g) < 0.5
    return torch.where(mask, pick, normal).to(dtype)


def _storage(kind: str, shape, dtype, seed):
    """``(view, buffer)``: a tensor of ``shape`` ([..., H, D]) laid out as ``kind``, and the
    whole buffer it lives in (to check that nothing outside the view changes)."""
    *lead, h, d = shape
    if kind == "contiguous":
        buf = _randn(shape, dtype, seed)
        return buf, buf
    if kind == "transposed":  # [.., H, S, D] memory viewed as [.., S, H, D] (the BHSD case)
        buf = _randn((*lead[:-1], h, lead[-1], d), dtype, seed)
        return buf.transpose(-2, -3), buf
    if kind == "fused":  # q-like slice of a fused qkv buffer [..., 3H, D]
        buf = _randn((*lead, 3 * h, d), dtype, seed)
        return buf[..., h : 2 * h, :], buf
    if kind == "lastdim":  # head_dim elements with stride 2
        buf = _randn((*lead, h, 2 * d), dtype, seed)
        return buf[..., ::2], buf
    raise ValueError(kind)


STORAGES = ["contiguous", "transposed", "fused", "lastdim"]


def _check_call(calls, fn, inputs, *, inplace, targets, expect_npu_calls=1, context=""):
    """Run ``fn(backend)`` on npu and eager with identical copies of ``inputs`` (a dict of
    name -> (view, buffer)); compare outputs and whole buffers bit for bit."""
    copies = {}
    for which in ("npu", "eager"):
        bufs = {}
        views = {}
        for name, (view, buf) in inputs.items():
            nb = buf.clone()
            # rebuild the same view on the copy
            nv = nb.as_strided(view.shape, view.stride(), view.storage_offset() - buf.storage_offset() + nb.storage_offset())
            bufs[name], views[name] = nb, nv
        copies[which] = (views, bufs)
    before = len(calls)
    out_npu = fn("npu", copies["npu"][0])
    assert len(calls) - before == expect_npu_calls, f"{context}: npu forward ran {len(calls) - before} times"
    out_ref = fn("eager", copies["eager"][0])
    outs_n = out_npu if isinstance(out_npu, tuple) else (out_npu,)
    outs_r = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    for i, (a, e) in enumerate(zip(outs_n, outs_r)):
        if a is None:
            assert e is None
            continue
        assert_bitwise_equal(a, e, name=f"{context} output {i}")
    for name in inputs:
        assert_bitwise_equal(copies["npu"][1][name], copies["eager"][1][name], name=f"{context} buffer {name}")
        if not inplace or name not in targets:  # untouched inputs keep their exact bits
            assert_bitwise_equal(copies["npu"][1][name], inputs[name][1], nans_equal=False, name=f"{context} input {name}")
    if inplace:  # in place returns the caller's tensors themselves
        views = copies["npu"][0]
        for out, name in zip(outs_n, targets):
            assert out is not None and out.data_ptr() == views[name].data_ptr() and out.shape == views[name].shape
    return outs_n


# --------------------------------------------------------------------------------------------
# apply: layouts x dtypes x dims x in-place, each over shapes x cos forms x storages


APPLY_SHAPES = {
    # name: (x shape, cos shape without the last dim)
    "THD": ((6, 4), (6, 1)),
    "BSHD-lowrank-cos": ((2, 5, 3), (5, 1)),
    "BSHD-full-cos": ((2, 5, 3), (2, 5, 1)),
    "BHSD": ((2, 3, 5), (5,)),
    "D-only": ((), ()),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dims", DIMS, ids=[f"d{d}r{r}" for d, r in DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_grid(npu, layout, dtype, dims, inplace):
    d, r = dims
    seed = 0
    for (sname, (lead, cos_lead)), storage, form, cos_dtype in itertools.product(
        APPLY_SHAPES.items(), STORAGES, ["half", "duplicated"], [torch.float32, torch.float64, torch.bfloat16]
    ):
        if not lead and storage in ("transposed", "fused"):
            continue  # a 1-D x has no head axis to slice or transpose
        seed += 1
        if lead:
            view, buf = _storage(storage, (*lead, d), dtype, seed)
        else:  # x is just [head_dim]
            view, buf = _storage(storage, (1, d), dtype, seed)
            view = view[0]
        cos, sin = _cos_sin((*cos_lead, r // 2), cos_dtype, seed)
        if form == "duplicated":
            if layout == "neox":
                cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            else:
                cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
        ctx = f"{sname}/{storage}/{form}/{cos_dtype}"

        def fn(backend, v):
            return rb.apply(v["x"], cos, sin, layout=layout, rotary_dim=r, inplace=inplace, backend=backend)

        _check_call(npu, fn, {"x": (view, buf)}, inplace=inplace, targets=("x",), context=ctx)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_expanded_cos_and_input(npu, layout):
    """cos/sin as expanded (stride-0) and sliced views; x an expanded view (out of place)."""
    base_c, base_s = _cos_sin((7, 1, 40), torch.float32, 3)
    cos, sin = base_c[..., ::2].expand(7, 4, 20), base_s[..., ::2].expand(7, 4, 20)
    x = _randn((1, 4, 48), torch.bfloat16, 4).expand(7, 4, 48)

    def fn(backend, v):
        return rb.apply(v["x"], cos, sin, layout=layout, rotary_dim=40, backend=backend)

    _check_call(npu, fn, {"x": (x, x)}, inplace=False, targets=(), context="expanded")


# --------------------------------------------------------------------------------------------
# apply_qk: GQA / MQA from a fused buffer and separate tensors


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dims", DIMS, ids=[f"d{d}r{r}" for d, r in DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_qk_grid(npu, layout, dtype, dims, inplace):
    d, r = dims
    for hk, fusedbuf in itertools.product([8, 2, 1], [True, False]):
        seed = hk * 10 + fusedbuf
        t = 5
        if fusedbuf:  # [T, Hq + 2*Hk, D] qkv buffer; q and k are strided views into it
            buf = _randn((t, 8 + 2 * hk, d), dtype, seed)
            q, k = buf[:, :8], buf[:, 8 : 8 + hk]
            inputs = {"q": (q, buf), "k": (k, buf)}
        else:
            q, k = _randn((2, t, 8, d), dtype, seed), _randn((2, t, hk, d), dtype, seed + 1)
            inputs = {"q": (q, q), "k": (k, k)}
        cos, sin = _cos_sin((t, 1, r // 2), torch.float32, seed)

        def fn(backend, v):
            if fusedbuf:  # q and k share one buffer: rebuild both views on the same copy
                qv = v["q"]
                kv = qv.as_strided(k.shape, k.stride(), qv.storage_offset() + (k.storage_offset() - q.storage_offset()))
            else:
                qv, kv = v["q"], v["k"]
            return rb.apply_qk(qv, kv, cos, sin, layout=layout, rotary_dim=r, inplace=inplace, backend=backend)

        if fusedbuf:
            # one buffer: compare through q's copy only, the k view is rebuilt inside fn
            outs = _check_call(npu, fn, {"q": (q, buf)}, inplace=inplace, targets=("q",), context=f"fused hk={hk}")
        else:
            outs = _check_call(npu, fn, inputs, inplace=inplace, targets=("q", "k"), context=f"separate hk={hk}")
        assert outs[1].shape[-2] == hk


# --------------------------------------------------------------------------------------------
# apply_cached: positions, caches, every MRoPE layout


def _mrope_for(kind: str, half: int) -> MRope | None:
    if kind == "none":
        return None
    if kind == "chunked":
        h = 3 * half // 8
        return mrope.chunked([half - 2 * h, h, h])
    if kind == "interleaved":
        h = (half - half // 3) // 2
        return mrope.interleaved([half - 2 * h, h, h])
    if kind == "ernie":
        h = 5 * half // 16
        return mrope.ernie([h, h, half - 2 * h])
    raise ValueError(kind)


MROPES = ["none", "chunked", "interleaved", "ernie", "text-only"]
QFORMS = ["flat", "thd", "bshd", "fused-flat", "k-none"]


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dims", [(64, 64), (80, 48)], ids=["d64r64", "d80r48"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_cached_grid(npu, layout, dtype, dims, inplace):
    d, r = dims
    hq, hk, t, max_pos = 4, 2, 9, 50
    for n, (mkind, qform, cache_dtype, pos_dtype) in enumerate(itertools.product(
        MROPES, QFORMS, [torch.float32, torch.bfloat16, torch.float64], [torch.int64, torch.int32]
    )):
        if (cache_dtype is not torch.float32) + (pos_dtype is not torch.int64) and n % 3:
            continue  # other cache/position dtypes on a third of the combinations keep this quick
        m = _mrope_for("chunked" if mkind == "text-only" else mkind, r // 2)
        lead = (2, t) if qform == "bshd" else (t,)
        rows = 3 if mkind not in ("none", "text-only") else None
        pshape = (3, *lead) if rows else lead
        positions = torch.randint(0, max_pos, pshape, generator=_gen(n), dtype=torch.int64).to(pos_dtype)
        c, s = _cos_sin((max_pos, r // 2), torch.float64, n)
        cache = torch.cat((c, s), -1).to(cache_dtype)
        head_dim = None
        if qform in ("flat", "k-none"):
            q = _randn((t, hq * d), dtype, n)
            k = None if qform == "k-none" else _randn((t, hk * d), dtype, n + 1)
            head_dim = d
            inputs = {"q": (q, q)} | ({} if k is None else {"k": (k, k)})
        elif qform == "fused-flat":  # vLLM: q, k = qkv.split(...) of [T, (Hq + 2Hk) * D]
            buf = _randn((t, (hq + 2 * hk) * d), dtype, n)
            q, k = buf[:, : hq * d], buf[:, hq * d : (hq + hk) * d]
            head_dim = d
            inputs = {"q": (q, buf)}
        else:
            q = _randn((*lead, hq, d), dtype, n)
            k = _randn((*lead, hk, d), dtype, n + 1)
            inputs = {"q": (q, q), "k": (k, k)}

        def fn(backend, v, q=q, k=k, qform=qform):
            qv = v["q"]
            if qform == "fused-flat":
                kv = qv.as_strided(k.shape, k.stride(), qv.storage_offset() + (k.storage_offset() - q.storage_offset()))
            else:
                kv = v.get("k")
            return rb.apply_cached(qv, kv, positions, cache, layout=layout, mrope=m, inplace=inplace,
                                   head_dim=head_dim, backend=backend)

        targets = tuple(inputs)
        _check_call(npu, fn, inputs, inplace=inplace, targets=targets,
                    context=f"{mkind}/{qform}/{cache_dtype}/{pos_dtype}")


@pytest.mark.parametrize("max_pos", [1, 17])
@pytest.mark.parametrize("mkind", ["none", "ernie"])
def test_strided_cache(npu, mkind, max_pos):
    """A cache that is itself a strided view (transposed storage, a column slice), a one-row
    cache, and positions that are a transposed view."""
    r = 16
    m = _mrope_for(mkind, r // 2)
    base = torch.cat(_cos_sin((max_pos, r // 2), torch.float64, 2), -1).float()
    for cache in (base.t().contiguous().t(), torch.cat((base, base), -1)[:, :r]):
        pos = torch.randint(0, max_pos, (5, 3) if m else (5, 2), generator=_gen(3)).t()
        pos = pos if m else pos[0]
        q = _randn((5, 2, 24), torch.float16, 4)

        def fn(backend, v):
            return rb.apply_cached(v["q"], None, pos, cache, mrope=m, inplace=False, backend=backend)

        _check_call(npu, fn, {"q": (q, q)}, inplace=False, targets=(), context=f"cache stride {cache.stride()}")


@pytest.mark.parametrize("mkind", ["none", "chunked", "ernie"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_of_range_positions_give_nan(layout, mkind):
    """Positions outside the cache (reachable only on a device without debug checks) give NaN in
    the rotated part, as the reference says; called on the backend directly, as validation
    rejects them on CPU."""
    r, d, max_pos = 32, 40, 10
    m = _mrope_for(mkind, r // 2)
    t = 6
    pos = torch.tensor([-3, 0, 9, 10, 4, 1000])
    if m is not None:
        pos = torch.stack((pos, pos.roll(1), pos.roll(2)))
    c, s = _cos_sin((max_pos, r // 2), torch.float32, 1)
    cache = torch.cat((c, s), -1)
    q = _randn((t, 3, d), torch.bfloat16, 2)
    args = RopeArgs((q,), False, Layout(layout), r, positions=pos, cache=cache, mrope=m)
    got = npu_backend.forward(args)[0]
    want = reference.run(args)[0]
    assert_bitwise_equal(got, want, name="out-of-range")
    if m is None:  # token 0 is at -3 (all pairs NaN), token 1 at 0 (valid)
        assert got[0, :, :r].isnan().all() and not got[1].isnan().any()
    else:  # token 0 reads rows -3 / 1000 / 4: the pairs on the bad rows are NaN, the rest not
        assert got[0, :, :r].isnan().any() and not got[0, :, :r].isnan().all()
    assert_bitwise_equal(got[..., r:], q[..., r:], nans_equal=False, name="pass-through")


# --------------------------------------------------------------------------------------------
# empty tensors, special values, conjugate, backward


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty(npu, layout):
    for shape in [(0, 4, 64), (3, 0, 64), (2, 0, 4, 64)]:
        x = torch.empty(shape, dtype=torch.bfloat16)
        cos, sin = torch.empty((*shape[:-2], 1, 32)), torch.empty((*shape[:-2], 1, 32))
        for inplace in (False, True):
            out = rb.apply(x, cos, sin, layout=layout, inplace=inplace, backend="npu")
            assert out.shape == shape and out.dtype == x.dtype
        q, k = torch.empty((0, 4, 64)), torch.empty((0, 2, 64))
        qo, ko = rb.apply_qk(q, k, torch.empty(0, 1, 32), torch.empty(0, 1, 32), layout=layout, backend="npu")
        assert qo.shape == q.shape and ko.shape == k.shape
        pos = torch.empty(0, dtype=torch.long)
        cache = torch.randn(8, 64)
        for m, p in ((None, pos), (_mrope_for("chunked", 32), torch.empty(3, 0, dtype=torch.long))):
            qo, ko = rb.apply_cached(torch.empty(0, 4 * 64), torch.empty(0, 2 * 64), p, cache, head_dim=64,
                                     layout=layout, mrope=m, inplace=False, backend="npu")
            assert qo.shape == (0, 256) and ko.shape == (0, 128)
    assert len(npu) > 0


@pytest.mark.parametrize("conjugate", [False, True], ids=["fwd", "conj"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_values(layout, dtype, conjugate):
    """+-0, subnormals, +-inf, NaN and the largest finite in x and in cos/sin, forward and the
    conjugate (backward) rotation, on the backend's forward directly."""
    x = _special_fill((16, 3, 40), dtype, 5)
    cos = _special_fill((16, 1, 16), torch.float32, 6)
    sin = _special_fill((16, 1, 16), torch.float32, 7)
    args = RopeArgs((x,), False, Layout(layout), 32, conjugate, cos=cos, sin=sin)
    assert_bitwise_equal(npu_backend.forward(args)[0], reference.run(args)[0], name="specials")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_values_through_apply(npu, layout, dtype):
    x = _special_fill((8, 2, 64), dtype, 11)
    cos = _special_fill((8, 1, 32), torch.float32, 12)
    sin = _special_fill((8, 1, 32), torch.float32, 13)
    for inplace in (False, True):
        def fn(backend, v):
            return rb.apply(v["x"], cos, sin, layout=layout, inplace=inplace, backend=backend)

        _check_call(npu, fn, {"x": (x, x)}, inplace=inplace, targets=("x",), context=f"specials inplace={inplace}")


def _grads(backend, make_inputs, run):
    leaves = make_inputs()
    outs = run(backend, *leaves)
    loss = sum((o.float() * (i + 1.5)).sum() for i, o in enumerate(outs) if o is not None)
    loss.backward()
    return outs, tuple(t.grad for t in leaves)


@pytest.mark.parametrize("dims", DIMS, ids=[f"d{d}r{r}" for d, r in DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward(npu, layout, dtype, dims):
    """Gradients through autograd (the custom op's backward is the conjugate rotation) equal
    the eager backend's, and both forward and backward ran on npu."""
    d, r = dims
    cos, sin = _cos_sin((5, 1, r // 2), torch.float32, 9)
    x0 = _randn((2, 5, 3, d), dtype, 1)
    q0, k0 = _randn((5, 4, d), dtype, 2), _randn((5, 2, d), dtype, 3)

    def one(backend, x):
        return (rb.apply(x, cos, sin, layout=layout, rotary_dim=r, backend=backend),)

    def qk(backend, q, k):
        return rb.apply_qk(q, k, cos, sin, layout=layout, rotary_dim=r, backend=backend)

    def q_only(backend, q, k):  # k's output does not reach the loss: its gradient is zero
        return (rb.apply_qk(q, k, cos, sin, layout=layout, rotary_dim=r, backend=backend)[0],)

    def leaf(t):
        return t.clone().requires_grad_(True)

    for run, make in ((one, lambda: (leaf(x0),)), (qk, lambda: (leaf(q0), leaf(k0))), (q_only, lambda: (leaf(q0), leaf(k0)))):
        before = len(npu)
        outs_n, grads_n = _grads("npu", make, run)
        assert len(npu) - before == 2, "forward and backward must both run on npu"
        outs_e, grads_e = _grads("eager", make, run)
        for a, e in zip(outs_n, outs_e):
            assert_bitwise_equal(a.detach(), e.detach(), name="forward")
        for a, e in zip(grads_n, grads_e):
            assert_bitwise_equal(a, e, name="grad")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_through_cache(npu, layout):
    """apply_cached out of place with grad: positions gathered, then the differentiable op."""
    cache = torch.cat(_cos_sin((30, 16), torch.float64, 4), -1).float()
    pos = torch.randint(0, 30, (3, 7), generator=_gen(1))
    m = _mrope_for("interleaved", 16)
    q0, k0 = _randn((7, 2 * 48), torch.bfloat16, 5), _randn((7, 48), torch.bfloat16, 6)

    def run(backend, q, k):
        return rb.apply_cached(q, k, pos, cache, layout=layout, mrope=m, inplace=False, head_dim=48, backend=backend)

    make = lambda: (q0.clone().requires_grad_(True), k0.clone().requires_grad_(True))  # noqa: E731
    outs_n, grads_n = _grads("npu", make, run)
    outs_e, grads_e = _grads("eager", make, run)
    for a, e in zip(outs_n + grads_n, outs_e + grads_e):
        assert_bitwise_equal(a.detach(), e.detach(), name="cached grad")
    assert len(npu) >= 2


# --------------------------------------------------------------------------------------------
# registration, explicit-only CPU service, optional torch_npu


def test_registration(monkeypatch):
    b = registry.get("npu")
    assert (b.name, b.device_types, b.priority) == ("npu", ("npu",), 100)
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "1")
    assert b.explicit_device_types() == ("cpu",) and b.probe() is None
    assert b.serves("cpu", explicit=True) and not b.serves("cpu", explicit=False)
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "0")
    assert b.explicit_device_types() == ()
    assert not b.serves("cpu", explicit=True)


def test_cpu_auto_dispatch_never_picks_npu(npu):
    """Simulation serves cpu only when named: automatic selection on cpu stays on eager."""
    x = _randn((3, 2, 8), torch.float32, 0)
    cos, sin = _cos_sin((3, 1, 4))
    rb.apply(x, cos, sin)
    assert len(npu) == 0
    assert registry.select("cpu", None).name != "npu"


def test_not_simulated_cpu_call_is_an_error(monkeypatch):
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "0")
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # not installed, whatever this machine has
    _clear_selection()
    try:
        x = _randn((3, 2, 8), torch.float32, 0)
        cos, sin = _cos_sin((3, 1, 4))
        with pytest.raises(ValueError, match="npu"):
            rb.apply(x, cos, sin, backend="npu")
    finally:
        _clear_selection()


class _FakeNpu:
    """Stands in for ``torch.npu`` (what torch_npu installs)."""

    def __init__(self, available: bool, count: int):
        self._available, self._count = available, count

    def is_available(self) -> bool:
        return self._available

    def device_count(self) -> int:
        return self._count


def _fake_torch_npu(monkeypatch, *, available: bool, count: int) -> None:
    import importlib.machinery

    mod = types.ModuleType("torch_npu")
    mod.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    mod.__version__ = "2.5.1.post-fake"
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    monkeypatch.setattr(torch, "npu", _FakeNpu(available, count), raising=False)


@pytest.fixture
def unsimulated(monkeypatch):
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "0")
    _clear_selection()
    yield monkeypatch
    _clear_selection()


def test_ascend_machine_detected(unsimulated):
    _fake_torch_npu(unsimulated, available=True, count=2)
    assert environment.torch_npu_version() == "2.5.1.post-fake"
    assert environment.npu_available()
    p = environment.detect()
    assert p.npu_count == 2 and p.torch_npu == "2.5.1.post-fake" and "npu" in p.device_types()
    assert npu_backend.probe() is None
    assert registry.select("npu", None).name == "npu"
    info = {i.name: i for i in rb.list_backends()}["npu"]
    assert info.available and info.reason is None


def test_torch_npu_without_device(unsimulated):
    _fake_torch_npu(unsimulated, available=False, count=0)
    assert environment.torch_npu_version() is not None and not environment.npu_available()
    assert environment.detect().npu_count == 0
    assert npu_backend.probe() == "torch_npu imported but no NPU device"
    assert registry.select("npu", None).name == "eager"  # the universal fallback, logged
    info = {i.name: i for i in rb.list_backends()}["npu"]
    assert not info.available and info.reason == "torch_npu imported but no NPU device"


def test_torch_npu_not_installed(unsimulated):
    unsimulated.setitem(sys.modules, "torch_npu", None)  # makes find_spec report it absent
    assert environment.torch_npu_version() is None and not environment.npu_available()
    assert npu_backend.probe() == "torch_npu is not installed (pip install rope-backends[npu])"
    with pytest.raises(ValueError, match=r"torch_npu is not installed"):
        registry.select("npu", None, "npu")
    assert registry.select("npu", None).name == "eager"


def test_simulation_overrides_absence(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "1")
    assert npu_backend.probe() is None


def test_import_does_not_import_torch_npu(tmp_path):
    """``import rope_backends`` leaves torch_npu alone; only the probe imports it. A fake
    torch_npu on the path proves the check can see an import when one happens."""
    pkg = tmp_path / "torch_npu"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '0.0-fake'\n")
    code = textwrap.dedent(
        """
        import sys
        import rope_backends as rb
        assert 'torch_npu' not in sys.modules, 'imported at import time'
        reason = {i.name: i for i in rb.list_backends()}['npu'].reason
        assert 'torch_npu' in sys.modules, 'the probe should have imported it'
        print(reason)
        """
    )
    # TORCH_DEVICE_BACKEND_AUTOLOAD=0: on an Ascend machine torch itself would otherwise import
    # the real torch_npu on `import torch` (its device-backend entry point), which is not ours
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               ROPE_BACKENDS_SIMULATE_NPU="0", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "torch_npu imported but no NPU device"


# --------------------------------------------------------------------------------------------
# the custom ops bind on PrivateUse1 (the key torch_npu registers for "npu")


OPS = ["rope", "rope_", "rope_qk", "rope_qk_", "rope_cached", "rope_cached_"]


@pytest.mark.parametrize("op", OPS)
def test_custom_ops_bind_on_privateuse1(op):
    """torch.library.custom_op without device_types registers a CompositeExplicitAutograd kernel,
    which the dispatcher fills into every backend key, PrivateUse1 (= npu under torch_npu)
    included; the autograd kernel likewise covers AutogradPrivateUse1."""
    name = f"rope_backends::{op}"
    assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, "PrivateUse1")
    assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, "AutogradPrivateUse1")


def test_device_restricted_op_would_not_bind():
    """The negative control for the test above: an op registered for cpu only has no
    PrivateUse1 kernel, so that check can fail."""
    from torch.library import custom_op

    @custom_op("rope_backends_npu_test::cpu_only", mutates_args=(), device_types="cpu")
    def cpu_only(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    name = "rope_backends_npu_test::cpu_only"
    assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, "CPU")
    assert not torch._C._dispatch_has_computed_kernel_for_dispatch_key(name, "PrivateUse1")


# --------------------------------------------------------------------------------------------
# bench/studies/npu_rotary_mul.py without an Ascend machine


def _load_rotary_mul_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "studies" / "npu_rotary_mul.py"
    spec = importlib.util.spec_from_file_location("_bench_npu_rotary_mul", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rotary_mul_bench_exits_cleanly_without_torch_npu(unsimulated, capsys):
    unsimulated.setitem(sys.modules, "torch_npu", None)
    bench = _load_rotary_mul_bench()
    assert bench.main([]) == 0
    assert "torch_npu is not installed" in capsys.readouterr().out
    assert bench.main(["--strict"]) == 2


def test_rotary_mul_bench_comparison_logic():
    """The bench's comparison on the op's documented formula evaluated in eager torch: exact in
    fp32 (products rounded, then one add), not in bf16 (each op rounds to bf16) -- so the
    comparison can tell the two apart."""
    bench = _load_rotary_mul_bench()
    dev = bench.Device("cpu", bench._documented_formula, lambda: None, True)
    x = _randn((1, 8, 2, 64), torch.float32, 1)
    c, s = _cos_sin((8, 32), torch.float32, 2)
    for dtype, exact in ((torch.float32, True), (torch.bfloat16, False)):
        for mode, layout in bench.MODES.items():
            xd, cd, sd = x.to(dtype), c.to(dtype), s.to(dtype)
            r1 = bench._full_form(cd, mode).reshape(1, 8, 1, 64)
            r2 = bench._full_form(sd, mode).reshape(1, 8, 1, 64)
            got = bench._call_rotary_mul(dev, xd, r1, r2, mode)
            want = rb.apply(xd, cd.reshape(1, 8, 1, 32), sd.reshape(1, 8, 1, 32), layout=layout, backend="eager")
            assert bench.compare(got, want)["exact"] is exact, (dtype, mode)
