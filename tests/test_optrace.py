"""The npu path writes no strided memory: every aten op it issues, recorded by
``rope_backends.testing.optrace``, on every layout and option.

Three parts:
1. the recorder itself flags each kind of strided write (so the clean verdicts below mean
   something) and accepts the contiguous patterns the npu path uses;
2. the eager reference and a strided-write implementation are flagged;
3. the npu path -- apply, apply_qk, apply_cached (plain, chunked/interleaved/ernie MRoPE,
   text-only), full and partial rotary, in place and out of place, contiguous and fused-qkv
   inputs, forward and backward -- has no violation, writes caller memory only by one final copy
   per in-place tensor, and still equals the reference bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

import rope_backends as rb
from rope_backends import mrope, registry
from rope_backends.contract import RopeArgs
from rope_backends.testing.check import assert_bitwise_equal
from rope_backends.testing.optrace import OpRecorder, record


@pytest.fixture
def npu(monkeypatch):
    """Simulated NPU, and a counter proving the npu forward (not eager) produced the trace."""
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "1")
    original = registry.get("npu")
    calls: list[RopeArgs] = []

    def counted(args):
        calls.append(args)
        return original.forward(args)

    # the prepared runners must count too: a repeated signature runs through them
    registry.register_backend(dataclasses.replace(original, forward=counted, prepare=registry.prepare_forward(counted)),
                              replace=True)
    registry._SELECTED.clear()
    try:
        yield calls
    finally:
        registry.register_backend(original, replace=True)
        registry._SELECTED.clear()


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=_g(seed)).to(dtype)


# --------------------------------------------------------------------------------------------
# 1. the recorder catches each kind of strided write


def _violations(fn, targets=None, inputs=None):
    _, trace = record(fn, targets, inputs)
    return trace


def test_contiguous_scratch_writes_are_fine():
    x = _randn((4, 8))

    def fn():
        y = x * 2
        y.mul_(3)  # in place on a fresh contiguous tensor
        z = torch.empty(4, 8)
        torch.mul(y, 2, out=z)  # out= into a contiguous tensor
        z[1:3].copy_(y[1:3])  # a contiguous row block
        return z

    trace = _violations(fn, inputs={"x": x})
    assert trace.violations == [] and trace.strided_writes == 0
    assert trace.kinds()["inplace"] == 1 and trace.kinds()["out"] == 1 and trace.kinds()["copy"] == 1


@pytest.mark.parametrize(
    "name, fn",
    [
        ("inplace on a transpose", lambda y: y.t().mul_(2)),
        ("inplace on a column slice", lambda y: y[:, :4].add_(1)),
        ("out= into a strided view", lambda y: torch.mul(y[:, ::2], 2, out=y[:, 1::2])),
        ("slice assignment, every other", lambda y: y[..., 0::2].copy_(y[..., 1::2] * 2)),
        ("slice assignment, first half", lambda y: y.__setitem__((Ellipsis, slice(0, 4)), 1.0)),
        ("index_put", lambda y: y.__setitem__(torch.tensor([0, 2]), 1.0)),
        ("slice_scatter (functional)", lambda y: torch.slice_scatter(y, y[:, :4] * 2, dim=1, start=0, end=4)),
        ("select_scatter", lambda y: torch.select_scatter(y, y[0] * 2, 0, 1)),
        ("scatter_", lambda y: y.scatter_(1, torch.zeros(4, 1, dtype=torch.long), 1.0)),
        ("as_strided_", lambda y: y.as_strided_((4, 4), (8, 2))),
        ("index_copy_", lambda y: y.index_copy_(0, torch.tensor([1]), y[:1] * 2)),
    ],
)
def test_strided_write_is_flagged(name, fn):
    x = _randn((4, 8))
    trace = _violations(lambda: fn(x * 1.0), inputs={"x": x})  # x * 1.0: a fresh scratch tensor
    assert trace.violations, f"{name}: not flagged; ops {trace.counts()}"
    assert trace.strided_writes >= 1


def test_write_into_an_input_is_flagged():
    cos = _randn((4, 8))
    trace = _violations(lambda: cos.mul_(1.0), inputs={"cos": cos})
    assert any("input 'cos'" in v for v in trace.violations)


def test_one_final_copy_into_a_strided_target_is_allowed_once():
    buf = _randn((5, 3, 4, 8))
    q = buf[:, 0]  # a strided view of a fused qkv buffer
    result = _randn((5, 4, 8))

    trace = _violations(lambda: q.copy_(result), targets={"q": q})
    assert trace.violations == [] and trace.caller_writes == 1 and trace.strided_writes == 1

    trace = _violations(lambda: (q.copy_(result), q.copy_(result)), targets={"q": q})
    assert len(trace.violations) == 1 and "second" in trace.violations[0]

    trace = _violations(lambda: q.copy_(result.transpose(0, 1).contiguous().transpose(0, 1)), targets={"q": q})
    assert trace.violations, "a copy from a strided source is not the allowed final copy"

    trace = _violations(lambda: q[:, :, :4].copy_(result[:, :, :4]), targets={"q": q})
    assert trace.violations, "a partial write into a target is not allowed"

    x = _randn((5, 4, 8))
    trace = _violations(lambda: x[1:].copy_(result[1:]), targets={"x": x})  # contiguous, but partial
    assert any("part of caller tensor 'x'" in v for v in trace.violations)


def test_reshaped_view_of_a_target_counts_as_the_whole_target():
    """apply_cached gets q as [T, H*D] and writes through its [T, H, D] view."""
    q = _randn((6, 4 * 8))
    trace = _violations(lambda: q.view(6, 4, 8).copy_(_randn((6, 4, 8))), targets={"q": q})
    assert trace.violations == [] and trace.caller_writes == 1


def test_custom_ops_are_entered(npu):
    """The custom ops (what torch.compile and torch.func calls go through) are recorded, and so
    is what runs inside them."""
    x = _randn((3, 2, 8)).requires_grad_(True)
    cos, sin = _randn((3, 1, 4)), _randn((3, 1, 4), seed=1)
    _, trace = record(lambda: torch.ops.rope_backends.rope(x, cos, sin, "neox", 8, False, "npu").sum().backward())
    counts = trace.counts()
    assert counts["rope_backends::rope.default"] == 2  # forward and its backward
    assert counts["aten::cat.default"] == 2  # recorded inside the custom ops
    assert len(npu) == 2
    json.dumps(trace.summary())


def test_public_calls_under_a_dispatch_mode_enter_the_custom_ops(npu):
    """A recording TorchDispatchMode (this trace, make_fx, FakeTensorMode) sees each public call as
    its custom op -- forward and backward -- and the backend's ops inside it, not a bare launch."""
    x = _randn((3, 2, 8)).requires_grad_(True)
    cos, sin = _randn((3, 1, 4)), _randn((3, 1, 4), seed=1)
    _, trace = record(lambda: rb.apply(x, cos, sin, backend="npu").sum().backward())
    counts = trace.counts()
    assert counts["rope_backends::rope.default"] == 2
    assert counts["aten::cat.default"] == 2
    assert len(npu) == 2
    with torch.no_grad():
        _, trace = record(lambda: rb.apply(x, cos, sin, backend="npu"))
    assert trace.counts()["rope_backends::rope.default"] == 1


# --------------------------------------------------------------------------------------------
# 2. strided-write implementations are flagged


def _strided_write_rope(x, cos, sin, layout, rotary_dim):
    """The pattern this backend avoids: assemble the result by slice assignment."""
    half = rotary_dim // 2
    if layout == "neox":
        first, second = slice(0, half), slice(half, rotary_dim)
    else:
        first, second = slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)
    a, b = x[..., first].float(), x[..., second].float()
    out = torch.empty_like(x)
    out[..., first] = (a * cos - b * sin).to(x.dtype)
    out[..., second] = (b * cos + a * sin).to(x.dtype)
    out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_reference_and_strided_impl_are_flagged(layout):
    x = _randn((4, 3, 64), torch.bfloat16)
    cos, sin = _randn((4, 1, 24)), _randn((4, 1, 24), seed=1)
    _, ref = record(lambda: rb.apply(x, cos, sin, layout=layout, rotary_dim=48, backend="eager"),
                    inputs={"x": x, "cos": cos, "sin": sin})
    assert len(ref.violations) == 2 and ref.strided_writes == 2, ref.violations  # out[..., first/second] = ...
    _, strided = record(lambda: _strided_write_rope(x, cos, sin, layout, 48), inputs={"x": x, "cos": cos, "sin": sin})
    assert len(strided.violations) == 3, strided.violations  # first, second, pass-through


# --------------------------------------------------------------------------------------------
# 3. the npu path on every layout and option


def _mrope(kind: str, half: int):
    if kind in ("none",):
        return None
    if kind in ("chunked", "text-only"):
        return mrope.chunked([half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8])
    if kind == "interleaved":
        h = (half - half // 3) // 2
        return mrope.interleaved([half - 2 * h, h, h])
    h = 5 * half // 16
    return mrope.ernie([h, h, half - 2 * h])


def _judge(npu, trace, outs, refs, n_targets, strided_targets, inplace):
    assert npu, "the npu forward did not run"
    assert trace.violations == [], "\n".join(trace.violations)
    assert trace.caller_writes == (n_targets if inplace else 0)
    assert trace.strided_writes == (strided_targets if inplace else 0)
    assert trace.kinds()["scatter"] == 0 and trace.kinds()["out"] == 0
    for a, e in zip(outs, refs):
        if a is not None:
            assert_bitwise_equal(a.detach(), e.detach())


def _fresh(t):
    return t.clone() if t is not None else None


GRID = list(itertools.product(["neox", "interleaved"], [64, 40], [False, True], ["contiguous", "fused"],
                              [torch.float32, torch.bfloat16]))
GRID_IDS = [f"{l}-r{r}-{'inplace' if i else 'out'}-{s}-{'fp32' if d == torch.float32 else 'bf16'}"
            for l, r, i, s, d in GRID]


def _qkv(storage, t, hq, hk, d, dtype, seed):
    if storage == "fused":
        buf = _randn((t, hq + 2 * hk, d), dtype, seed)
        return buf, buf[:, :hq], buf[:, hq : hq + hk]
    q, k = _randn((t, hq, d), dtype, seed), _randn((t, hk, d), dtype, seed + 1)
    return None, q, k


@pytest.mark.parametrize("layout, r, inplace, storage, dtype", GRID, ids=GRID_IDS)
def test_npu_apply_and_apply_qk_are_clean(npu, layout, r, inplace, storage, dtype):
    t, d = 5, 64
    cos, sin = _randn((t, 1, r // 2), seed=7), _randn((t, 1, r // 2), seed=8)
    consts = {"cos": cos, "sin": sin}
    for entry in ("apply", "apply_qk"):
        buf, q, k = _qkv(storage, t, 4, 2, d, dtype, 1)
        ref_q, ref_k = q.clone(), k.clone()
        npu.clear()
        if entry == "apply":
            call = lambda: (rb.apply(q, cos, sin, layout=layout, rotary_dim=r, inplace=inplace, backend="npu"),)  # noqa: E731
            refs = (rb.apply(ref_q, cos, sin, layout=layout, rotary_dim=r, backend="eager"),)
            callers = {"q": q}
        else:
            call = lambda: rb.apply_qk(q, k, cos, sin, layout=layout, rotary_dim=r, inplace=inplace, backend="npu")  # noqa: E731
            refs = rb.apply_qk(ref_q, ref_k, cos, sin, layout=layout, rotary_dim=r, backend="eager")
            callers = {"q": q, "k": k}
        outs, trace = record(call, targets=callers if inplace else None,
                             inputs=consts if inplace else {**consts, **callers})
        strided = sum(1 for v in callers.values() if not v.is_contiguous())
        _judge(npu, trace, outs, refs, len(callers), strided, inplace)


@pytest.mark.parametrize("layout, r, inplace, storage, dtype", GRID, ids=GRID_IDS)
@pytest.mark.parametrize("mkind", ["none", "chunked", "interleaved", "ernie", "text-only"])
def test_npu_apply_cached_is_clean(npu, mkind, layout, r, inplace, storage, dtype):
    t, d, hq, hk, max_pos = 7, 64, 4, 2, 40
    m = _mrope(mkind, r // 2)
    rows = mkind not in ("none", "text-only")
    positions = torch.randint(0, max_pos, (3, t) if rows else (t,), generator=_g(2))
    cache = torch.cat((_randn((max_pos, r // 2), seed=3), _randn((max_pos, r // 2), seed=4)), -1)
    if storage == "fused":  # vLLM: q, k are column slices of the flat [T, (Hq + 2Hk) * D] qkv
        buf = _randn((t, (hq + 2 * hk) * d), dtype, 5)
        q, k = buf[:, : hq * d], buf[:, hq * d : (hq + hk) * d]
    else:
        q, k = _randn((t, hq * d), dtype, 5), _randn((t, hk * d), dtype, 6)
    refs = rb.apply_cached(q.clone(), k.clone(), positions, cache, layout=layout, mrope=m, inplace=False,
                           head_dim=d, backend="eager")
    consts = {"positions": positions, "cache": cache}
    callers = {"q": q, "k": k}
    outs, trace = record(
        lambda: rb.apply_cached(q, k, positions, cache, layout=layout, mrope=m, inplace=inplace, head_dim=d, backend="npu"),
        targets=callers if inplace else None, inputs=consts if inplace else {**consts, **callers},
    )
    strided = sum(1 for v in callers.values() if not v.is_contiguous())
    _judge(npu, trace, outs, refs, 2, strided, inplace)
    assert trace.counts()["aten::index_select.default"] >= 1
    assert trace.counts()["aten::gather.default"] == (1 if rows else 0)


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
@pytest.mark.parametrize("r", [64, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_npu_backward_is_clean(npu, layout, r, dtype):
    """Forward and backward through autograd (custom ops entered), for apply, apply_qk with a
    GQA k, and apply_cached with grad (gather + the differentiable op)."""
    t, d = 5, 64
    cos, sin = _randn((t, 1, r // 2), seed=7), _randn((t, 1, r // 2), seed=8)
    positions = torch.randint(0, 30, (3, t), generator=_g(2))
    cache = torch.cat((_randn((30, r // 2), seed=3), _randn((30, r // 2), seed=4)), -1)
    m = _mrope("interleaved", r // 2)

    def entries(backend, q, k):
        return {
            "apply": lambda: (rb.apply(q, cos, sin, layout=layout, rotary_dim=r, backend=backend),),
            "apply_qk": lambda: rb.apply_qk(q, k, cos, sin, layout=layout, rotary_dim=r, backend=backend),
            "apply_cached": lambda: rb.apply_cached(q.flatten(-2), k.flatten(-2), positions, cache, layout=layout,
                                                    mrope=m, inplace=False, head_dim=d, backend=backend),
        }

    for name in ("apply", "apply_qk", "apply_cached"):
        grads = {}
        for backend in ("npu", "eager"):
            q = _randn((t, 4, d), dtype, 1).requires_grad_(True)
            k = _randn((t, 2, d), dtype, 2).requires_grad_(True)
            fn = entries(backend, q, k)[name]

            def fwd_bwd():
                outs = fn()
                sum((o.float() * (i + 2)).sum() for i, o in enumerate(outs)).backward()
                return outs

            npu.clear()
            if backend == "npu":
                outs, trace = record(fwd_bwd, inputs={"q": q, "k": k, "cos": cos, "sin": sin, "cache": cache})
                assert len(npu) == 2, f"{name}: npu ran {len(npu)} times (forward + backward expected)"
                assert trace.violations == [], "\n".join(trace.violations)
                assert trace.strided_writes == 0 and trace.caller_writes == 0
            else:
                outs = fwd_bwd()
            grads[backend] = (outs, q.grad, k.grad if name != "apply" else None)
        for a, e in zip(grads["npu"][0] + grads["npu"][1:], grads["eager"][0] + grads["eager"][1:]):
            if a is not None:
                assert_bitwise_equal(a.detach(), e.detach(), name=name)


def test_recording_leaves_results_alone(npu):
    """Recording does not change what is computed."""
    x = _randn((4, 3, 64), torch.bfloat16)
    cos, sin = _randn((4, 1, 32)), _randn((4, 1, 32), seed=1)
    plain = rb.apply(x, cos, sin, layout="interleaved", backend="npu")
    with OpRecorder(inputs={"x": x}) as rec:
        recorded = rb.apply(x, cos, sin, layout="interleaved", backend="npu")
    assert_bitwise_equal(recorded, plain)
    assert rec.trace.counts()["aten::stack.default"] == 1


def test_bench_report_smoke():
    """bench/studies/optrace.py (quick shapes, CPU): the report it prints keeps its meaning -- the npu
    path clean, the two strided implementations flagged, every implementation bit-exact."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "studies" / "optrace.py"
    spec = importlib.util.spec_from_file_location("_bench_optrace", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run_device("cpu", quick=True, min_run_time=0.001, repeats=1)
    rows = {(r["case"], r["impl"]): r for r in result["rows"]}
    for case in ("diffusion", "llm-cached"):
        assert rows[(case, "npu")]["violations"] == 0 and rows[(case, "npu")]["strided_writes"] == 0
        assert rows[(case, "eager-reference")]["strided_writes"] >= 2
        assert rows[(case, "strided-write")]["strided_writes"] >= 2
    json.dumps(result)
    assert "| diffusion | npu |" in bench.markdown(result)


def test_old_module_name_is_a_deprecated_alias(monkeypatch):
    """``rope_backends.optrace`` (its home before it joined rope_backends.testing) still imports,
    warns, and hands out the same objects."""
    import importlib
    import sys

    from rope_backends.testing import optrace

    monkeypatch.delitem(sys.modules, "rope_backends.optrace", raising=False)
    with pytest.warns(DeprecationWarning, match="rope_backends.testing.optrace"):
        old = importlib.import_module("rope_backends.optrace")
    assert old.OpRecorder is OpRecorder and old.record is record and old.KINDS is optrace.KINDS
    assert set(old.__all__) == set(optrace.__all__)
