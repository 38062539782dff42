"""The triton backend on a real GPU, beyond the shared conformance suite.

- triton vs the eager backend on the *same CUDA tensors* (eager's torch ops on the device are the
  reference there), over shapes, dtypes, layouts, views, special values and both directions;
- ``apply_cached`` with GQA on a fused qkv buffer, the three MRoPE maps, fp64/bf16 caches and
  out-of-range positions (NaN for those tokens; GPU positions are not range-checked);
- CUDA-graph capture and replay (plain, and an MRoPE map first seen inside the capture);
- no host-device synchronisation in any kind of call (``torch.cuda.set_sync_debug_mode("error")``).

Needs a CUDA or ROCm GPU: every test here is marked ``gpu`` and skipped without one (the cuda and
rocm CI lanes run it; so does ``pytest --device cuda tests/test_cuda.py`` on a GPU machine).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rope_backends as rb
from rope_backends import dispatch, reference
from rope_backends.contract import Layout, RopeArgs
from rope_backends.validation import args_for_tables
from rope_backends.testing.check import bitwise_mismatches
from rope_backends.testing.make import special_values

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")]
DEV = "cuda"


def _triton():
    from rope_backends.backends import triton as triton_backend

    if triton_backend.probe() is not None:
        pytest.skip(f"triton backend unavailable: {triton_backend.probe()}")
    return triton_backend


def _differs(got, want) -> bool:
    return bool(bitwise_mismatches(got, want).any())


TABLE_SHAPES = [((64, 8, 128), None, (64, 1, 64)), ((3, 33, 5, 80), 48, (33, 1, 24)),
                ((2, 6, 17, 96), None, (17, 48)), ((1, 300, 24, 128), None, (300, 1, 64)),
                ((7, 4, 256), 64, (7, 4, 32)), ((4, 2, 3, 2, 64), None, (2, 3, 1, 32))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_triton_equals_eager_on_the_same_cuda_tensors(dtype, layout):
    backend = _triton()
    g = torch.Generator(device=DEV).manual_seed(0)
    spec = special_values(dtype).to(DEV)
    bad = []
    for shape, rot, cos_shape in TABLE_SHAPES:
        for values in ("normal", "special"):
            x = torch.randn(shape, generator=g, device=DEV).to(dtype) * 3
            if values == "special":
                pick = torch.randint(0, spec.numel(), shape, generator=g, device=DEV)
                x = torch.where(torch.rand(shape, generator=g, device=DEV) < 0.5, spec[pick].to(dtype), x)
            theta = torch.rand(cos_shape, generator=g, device=DEV, dtype=torch.float64) * 2000 - 1000
            cos, sin = theta.cos().float(), theta.sin().float()
            views = {"contiguous": x}
            if x.dim() >= 4:
                views["transposed"] = x.transpose(-2, -3).contiguous().transpose(-2, -3)
            for name, view in views.items():
                for conjugate in (False, True):
                    args = dataclasses.replace(args_for_tables((("x", view),), cos, sin, layout, rot, False),
                                               conjugate=conjugate)
                    if _differs(backend.forward(args)[0], reference.run(args)[0]):
                        bad.append(f"{shape} {name} {values} conjugate={conjugate}")
    assert not bad, bad


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_apply_cached_gqa_mrope_and_out_of_range_positions(cache_dtype):
    _triton()
    g = torch.Generator(device=DEV).manual_seed(1)
    cache = rb.cos_sin_cache(4096, 128, device=DEV).to(cache_dtype)
    bad = []
    for m in (None, rb.mrope.chunked([16, 24, 24]), rb.mrope.interleaved([24, 20, 20]), rb.mrope.ernie([22, 22, 20])):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            qkv = torch.randn(37, 48 * 128, generator=g, device=DEV).to(dtype)
            q, k = qkv[:, :4096], qkv[:, 4096:5120]
            pos = torch.randint(0, 4096, (3, 37) if m else (37,), generator=g, device=DEV)
            pos.view(-1)[5] = 4096 + 7  # out of range: NaN for that token, no out-of-bounds read
            pos.view(-1)[11] = -3
            want = reference.run(RopeArgs((q.view(37, 32, 128), k.view(37, 8, 128)), False, Layout.NEOX, 128,
                                          positions=pos, cache=cache, mrope=m))
            rb.apply_cached(q, k, pos, cache, mrope=m, head_dim=128, backend="triton")
            if _differs(q.view(37, 32, 128), want[0]) or _differs(k.view(37, 8, 128), want[1]):
                bad.append(f"{dtype} mrope {m and m.name}")
    assert not bad, bad


@pytest.mark.parametrize("mrope", [None, rb.mrope.interleaved([24, 20, 19])], ids=["plain", "mrope-fresh-map"])
def test_cuda_graph_capture_and_replay(mrope):
    """[24, 20, 19] is a map no call has used before: its device tensor is built inside the capture
    (from fills, no host-to-device copy)."""
    _triton()
    g = torch.Generator(device=DEV).manual_seed(2)
    rot = 2 * len(mrope.axis_map) if mrope else 128
    cache = rb.cos_sin_cache(4096, rot, device=DEV)
    qkv = torch.randn(16, 48 * 128, generator=g, device=DEV).bfloat16()
    q, k = qkv[:, :4096], qkv[:, 4096:5120]
    pos = torch.randint(0, 4096, (3, 16) if mrope else (16,), generator=g, device=DEV)
    rb.apply_cached(q, k, pos, cache, mrope=mrope, head_dim=128, backend="triton")  # compiled, plan cached
    if mrope is not None:  # drop the map and the runner holding it: the captured call builds it
        rb.mrope._AXIS_TENSORS.clear()
        dispatch._RUNNERS.clear()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            rb.apply_cached(q, k, pos, cache, mrope=mrope, head_dim=128, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        fresh = torch.randn(qkv.shape, generator=g, device=DEV).bfloat16()
        new_pos = torch.randint(0, 4096, pos.shape, generator=g, device=DEV)
        qkv.copy_(fresh)
        pos.copy_(new_pos)
        want = reference.run(RopeArgs((fresh[:, :4096].view(16, 32, 128), fresh[:, 4096:5120].view(16, 8, 128)),
                                      False, Layout.NEOX, rot, positions=new_pos, cache=cache, mrope=mrope))
        graph.replay()
        assert not _differs(q.reshape(16, 32, 128), want[0])
        assert not _differs(k.reshape(16, 8, 128), want[1])


def test_no_host_sync_in_any_call():
    _triton()
    from rope_backends.backends.triton import launch

    x = torch.randn(4, 64, 8, 128, device=DEV).bfloat16()
    cos, sin = rb.cos_sin(torch.arange(64, device=DEV), 128)
    cache = rb.cos_sin_cache(4096, 128, device=DEV)
    qkv = torch.randn(64, 48 * 128, device=DEV).bfloat16()
    pos3 = torch.randint(0, 4096, (3, 64), device=DEV)
    m = rb.mrope.chunked([16, 24, 24])
    rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos3, cache, mrope=m, head_dim=128, backend="triton")
    launch._PLANS.clear()
    dispatch._RUNNERS.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # first: the full path, plans built; second: the prepared runners
            rb.apply(x, cos[:, None], sin[:, None], layout="interleaved", backend="triton")
            rb.apply_qk(x, x[:, :, :2].clone(), cos[:, None], sin[:, None], backend="triton")
            rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos3[0], cache, head_dim=128, backend="triton")
            rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos3, cache, mrope=m, head_dim=128, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_direct_launch_is_taken_on_the_gpu():
    """The prepared runner's launch goes through the kept launch function (not JITFunction.run),
    and gives the first call's bits."""
    _triton()
    from rope_backends.backends.triton import launch

    q = torch.randn(8, 4, 128, device=DEV).bfloat16()
    cos, sin = rb.cos_sin(torch.arange(8, device=DEV), 128)
    first = rb.apply(q, cos[:, None], sin[:, None])
    again = rb.apply(q, cos[:, None], sin[:, None])
    args = args_for_tables((("x", q),), cos[:, None], sin[:, None], "neox", None, False)
    plan = launch.plan_for(args)
    assert plan.launchers, "no launch function kept: every call goes through JITFunction.run"
    assert not _differs(again, first)


def test_two_threads_on_two_streams_share_one_plan():
    """Two threads, each on its own stream, call the same signature (one plan, one kept launch
    function with one parameter block): every result equals the reference. Guards the launch
    path's lock around writing the block and launching."""
    import threading

    _triton()
    cos, sin = rb.cos_sin(torch.arange(64, device=DEV), 128)
    cos, sin = cos[:, None], sin[:, None]
    xs = [torch.randn(64, 8, 128, device=DEV).bfloat16() for _ in range(2)]
    want = [reference.run(RopeArgs((x,), False, Layout.NEOX, 128, cos=cos, sin=sin))[0] for x in xs]
    for x in xs:
        rb.apply(x, cos, sin)
    bad, errors = [0, 0], []

    def work(i):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                outs = [rb.apply(xs[i], cos, sin) for _ in range(1000)]
            stream.synchronize()
            bad[i] = sum(_differs(o, want[i]) for o in outs)
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert bad == [0, 0]


def test_benchmark_clock_resets_persisting_l2_lines():
    """The benchmark's clock can return ``evict_last`` lines to normal on this GPU (they outlive its
    L2 flush otherwise: bench/studies/l2_persistence.py); on ROCm there is no such call."""
    from rope_backends.benchmark import timing

    reset = timing.persisting_l2_reset(torch.device(DEV, torch.cuda.current_device()))
    if torch.version.hip:
        assert reset is None
        return
    assert reset is not None
    x = torch.randn(1 << 20, device=DEV)
    x.sum()  # some work in flight on the stream; the reset must not disturb it
    reset()
    torch.cuda.synchronize()
    assert timing.Clock(torch.device(DEV), quick=True).resets_persisting_l2
