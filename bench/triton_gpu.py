"""GPU check and timing of the ``triton`` backend: one script for the GPU machine.

    PYTHONUNBUFFERED=1 python3 bench/triton_gpu.py [--out DIR] [--sweep] [--full] [--skip-large] [--budget S]

1. Conformance on CUDA, bit for bit (all NaNs equal):
   - the shipped suite (``rope_backends.testing``: reference computed from the same inputs, canaries
     checked) on ``sample_cases()`` incl. the >2**31-element bf16 cases, and ``reference_cases()``
     with ``--full`` (within ``--budget`` seconds);
   - triton vs the eager backend on the *same CUDA tensors* over a grid of shapes, dtypes, layouts,
     views and special values;
   - a CUDA-graph captured ``apply_cached`` (plain and MRoPE with an axis map first seen during
     capture) replayed on new data; calls under ``torch.cuda.set_sync_debug_mode("error")``.
2. Timing (``triton.testing.do_bench``, median; it clears L2 before every call): the device's copy
   bandwidth first (one large device-to-device copy, bytes read + written), then every row as
   µs, GB/s and % of copy:
   - diffusion shapes, bf16 interleaved, cos/sin fp32 ``[S, 1, D/2]``: eager strided (reference),
     eager stack+flatten, torch.compile of the eager math, this backend;
   - LLM ``apply_cached`` in place on a fused qkv buffer (q 32 heads, k 8, D=128, neox, bf16, fp32
     cache) for T in 1..16384; T <= 64 also as CUDA-graph replays next to an empty Triton kernel;
   - MRoPE ``apply_cached`` (chunked / interleaved / ernie) next to plain at T=4096;
   - backward next to forward (the conjugate kernel, and autograd's backward alone);
   - host overhead: ``rb.apply`` next to launching the kernel directly with the same arguments.
   ``--sweep`` also times a grid of (BLOCK_M, num_warps) per shape next to the heuristic's choice.
Prints a compact table last and writes JSON to ``--out`` (default ``$OUT`` or bench/results).
This file holds no kernel code: it calls the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform as _platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import rope_backends as rb  # noqa: E402
from rope_backends import dispatch, reference  # noqa: E402
from rope_backends.backends import npu as npu_backend  # noqa: E402
from rope_backends.backends import triton as triton_backend  # noqa: E402
from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.spec import Layout, RopeArgs, args_for_cached, args_for_tables  # noqa: E402
from rope_backends.testing import assert_bitwise_equal, check_case  # noqa: E402
from rope_backends.testing import cases as cases_mod  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402
from rope_backends.testing.make import special_values  # noqa: E402

DIFFUSION = [(1, 115200, 24, 128), (1, 32760, 12, 128), (2, 4096, 24, 128), (1, 4096, 32, 64), (4096, 24, 128)]
LLM_T = [1, 16, 64, 256, 4096, 16384]
MROPE_T = 4096
BACKWARD = [((1, 115200, 24, 128), "interleaved"), ((4096, 32, 128), "neox"), ((2, 512, 16, 64), "neox")]
HQ, HK, D = 32, 8, 128
MAX_POS = 32768
SWEEP = [(4, 2), (8, 2), (8, 4), (16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]

RESULTS: dict = {"rows": [], "errors": []}
OUT_DIR = None


def save():
    """Write the JSON after every section, so a run cut short still leaves its numbers."""
    if OUT_DIR is None:
        return
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, f"triton-gpu-{RESULTS.get('env', {}).get('date', 'run')}.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
DEV = "cuda"
SMOKE = False  # --smoke: tiny sizes on CPU through the Triton interpreter, to test this script itself


def log(*a):
    print(*a, flush=True)


def median_us(fn, warmup=25, rep=200) -> float:
    if SMOKE:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")) * 1e3


_FLUSH = []


def device_us(fn, reps=100) -> float:
    """do_bench's method (CUDA events around each call, L2 flushed before it, median) with a
    1 GiB flush instead of 256 MB: the flush keeps the GPU busy ~350 us, longer than any call's
    host time here, so the kernel is queued before its start event runs and the number is the
    device's time alone. (With do_bench's ~85 us flush, calls whose host time comes near that
    showed up to ~8 us slower than the same kernel measured in the sweep.)"""
    if SMOKE:
        return median_us(fn)
    if not _FLUSH:
        _FLUSH.append(torch.empty(1 << 30, dtype=torch.int8, device=DEV))
    flush = _FLUSH[0]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e3


def row(section, shape, impl, us, nbytes, copy_gbs, **extra):
    gbs = nbytes / (us * 1e3) if us else 0.0
    r = dict(section=section, shape=str(shape), impl=impl, us=round(us, 3), bytes=int(nbytes),
             gbs=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1) if copy_gbs else None, **extra)
    RESULTS["rows"].append(r)
    log(f"  {section:10s} {str(shape):22s} {impl:28s} {us:10.2f} us {gbs:8.0f} GB/s {r['pct_copy']}%")
    return r


def guarded(name):
    def deco(fn):
        def inner(*a, **k):
            t0 = time.time()
            log(f"== {name}")
            try:
                return fn(*a, **k)
            except Exception as exc:  # record and go on: one broken section must not hide the rest
                RESULTS["errors"].append({"section": name, "error": f"{type(exc).__name__}: {exc}",
                                          "trace": traceback.format_exc()[-3000:]})
                log(f"!! {name} failed: {type(exc).__name__}: {exc}")
                traceback.print_exc()
            finally:
                log(f"   ({time.time() - t0:.1f}s)")
                save()
        return inner
    return deco


# --------------------------------------------------------------------------------------------
# 1. conformance

@guarded("conformance: shipped suite")
def suite(full: bool, skip_large: bool, budget: float):
    sample = cases_mod.sample_cases() if not SMOKE else cases_mod.interp_cases()
    tiers = [("sample", sample)]
    if full:
        seen = {c.name for c in sample}
        rest = [c for c in cases_mod.reference_cases() if c.name not in seen]
        import random
        random.Random(0).shuffle(rest)  # a budget-limited run then covers a spread of the tier
        tiers.append(("reference", rest))
    out = {}
    for tier, cases in tiers:
        t0 = time.time()
        passed, failed, skipped = 0, [], []
        for c in cases:
            if c.device == "cuda:1" or "multigpu" in c.marks:
                skipped.append(c.name)
                continue
            if skip_large and "large" in c.marks:
                skipped.append(c.name)
                continue
            if tier != "sample" and time.time() - t0 > budget:
                skipped.append(c.name)
                continue
            dev = c.device or DEV
            t1 = time.time()
            try:
                check_case(c, "triton", dev)
                passed += 1
            except Exception as exc:
                failed.append({"case": c.name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
                log(f"  FAIL {c.name}: {type(exc).__name__}: {str(exc)[:300]}")
            if "large" in c.marks:
                log(f"  large case {c.name}: {time.time() - t1:.1f}s")
                torch.cuda.empty_cache() if not SMOKE else None
        out[tier] = dict(passed=passed, failed=failed, skipped=len(skipped), seconds=round(time.time() - t0, 1),
                         skipped_names=skipped[:20])
        log(f"  {tier}: {passed} passed, {len(failed)} failed, {len(skipped)} skipped, {time.time() - t0:.1f}s")
    RESULTS["conformance_suite"] = out


@guarded("conformance: triton vs eager on the same CUDA tensors")
def versus_eager():
    g = torch.Generator(device=DEV).manual_seed(0)
    n = fails = 0
    bad = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        spec = special_values(dtype).to(DEV)
        for layout in ("neox", "interleaved"):
            for shape, rot, cos_shape in [((64, 8, 128), None, (64, 1, 64)), ((3, 33, 5, 80), 48, (33, 1, 24)),
                                          ((2, 6, 17, 96), None, (17, 48)), ((1, 300, 24, 128), None, (300, 1, 64)),
                                          ((7, 4, 256), 64, (7, 4, 32)), ((4, 2, 3, 2, 64), None, (2, 3, 1, 32))][:6 if not SMOKE else 2]:
                for values in ("normal", "special"):
                    x = torch.randn(shape, generator=g, device=DEV).to(dtype) * 3
                    if values == "special":
                        pick = torch.randint(0, spec.numel(), shape, generator=g, device=DEV)
                        x = torch.where(torch.rand(shape, generator=g, device=DEV) < 0.5, spec[pick].to(dtype), x)
                    th = torch.rand(cos_shape, generator=g, device=DEV, dtype=torch.float64) * 2000 - 1000
                    cos, sin = th.cos().float(), th.sin().float()
                    views = {"contiguous": x}
                    if x.dim() >= 4:
                        views["transposed"] = x.transpose(-2, -3).contiguous().transpose(-2, -3)
                    for vname, xv in views.items():
                        for conj in (False, True):
                            args = args_for_tables((("x", xv),), cos, sin, layout, rot, False)
                            args = dataclasses.replace(args, conjugate=conj)
                            got = triton_backend.forward(args)[0]
                            want = reference.run(args)[0]  # eager on the same CUDA tensors
                            n += 1
                            if bool(bitwise_mismatches(got, want).any()):
                                fails += 1
                                bad.append(f"{dtype} {layout} {shape} {vname} {values} conj={conj}")
    # apply_cached: GQA, fused qkv, three MRoPE maps, fp64/bf16 caches, out-of-range positions -> NaN
    for cache_dtype in (torch.float32, torch.bfloat16, torch.float64):
        cache = rb.cos_sin_cache(4096, 128, device=DEV).to(cache_dtype)
        for m in (None, rb.mrope.chunked([16, 24, 24]), rb.mrope.interleaved([24, 20, 20]), rb.mrope.ernie([22, 22, 20])):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                qkv = torch.randn(37, 48 * 128, generator=g, device=DEV).to(dtype)
                q, k = qkv[:, :4096], qkv[:, 4096:5120]
                pos = torch.randint(0, 4096, (3, 37) if m else (37,), generator=g, device=DEV)
                if DEV == "cuda":  # CPU positions are range-checked up front, GPU ones are not
                    pos.view(-1)[5] = 4096 + 7  # out of range: NaN for that token, no out-of-bounds read
                    pos.view(-1)[11] = -3
                want = reference.run(RopeArgs((q.view(37, 32, 128), k.view(37, 8, 128)), False, Layout.NEOX, 128,
                                              positions=pos, cache=cache, mrope=m))
                rb.apply_cached(q, k, pos, cache, mrope=m, head_dim=128, backend="triton")
                n += 1
                if bool(bitwise_mismatches(q.view(37, 32, 128), want[0]).any()) or \
                   bool(bitwise_mismatches(k.view(37, 8, 128), want[1]).any()):
                    fails += 1
                    bad.append(f"apply_cached {dtype} cache {cache_dtype} mrope {m and m.name}")
    RESULTS["versus_eager"] = dict(calls=n, failed=fails, bad=bad[:20])
    log(f"  {n} calls, {fails} differ {bad[:5]}")


@guarded("conformance: CUDA graph capture and no host sync")
def graphs_and_syncs():
    g = torch.Generator(device=DEV).manual_seed(1)
    cache = rb.cos_sin_cache(4096, 128, device=DEV)
    out = {}
    for label, m in (("plain", None), ("mrope-fresh-map", rb.mrope.interleaved([24, 20, 19]))):
        # [24, 20, 19]: a map no call has used yet, so its device tensor is built inside the capture
        rot = 2 * len(m.axis_map) if m else 128
        cache_m = rb.cos_sin_cache(4096, rot, device=DEV) if m else cache
        qkv = torch.randn(16, 48 * 128, generator=g, device=DEV).bfloat16()
        q, k = qkv[:, :4096], qkv[:, 4096:5120]
        pos = torch.randint(0, 4096, (3, 16) if m else (16,), generator=g, device=DEV)
        rb.apply_cached(q, k, pos, cache_m, mrope=m, head_dim=128, backend="triton")  # warm: compiled, plan cached
        if m is not None:
            # the axis map is built inside the capture (fills, no host-to-device copy): drop the map
            # and the dispatcher's runner that holds it, so the captured call takes the full path
            launch._AXIS.clear()
            dispatch._RUNNERS.clear()
        # "plain": the captured call runs the runner the warm call prepared
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph):
                rb.apply_cached(q, k, pos, cache_m, mrope=m, head_dim=128, backend="triton")
        torch.cuda.current_stream().wait_stream(stream)
        ok = True
        for _ in range(3):
            fresh = torch.randn(qkv.shape, generator=g, device=DEV).bfloat16()
            new_pos = torch.randint(0, 4096, pos.shape, generator=g, device=DEV)
            qkv.copy_(fresh)
            pos.copy_(new_pos)
            want = reference.run(RopeArgs((fresh[:, :4096].view(16, 32, 128), fresh[:, 4096:5120].view(16, 8, 128)),
                                          False, Layout.NEOX, rot, positions=new_pos, cache=cache_m, mrope=m))
            graph.replay()
            ok &= not bool(bitwise_mismatches(q.reshape(16, 32, 128), want[0]).any())
            ok &= not bool(bitwise_mismatches(k.reshape(16, 8, 128), want[1]).any())
        out[f"graph_{label}"] = ok
        log(f"  graph {label}: {'bit-exact' if ok else 'DIFFERS'}")
    # no host-device sync: every call kind, plans and axis maps already cached and not
    x = torch.randn(4, 64, 8, 128, device=DEV).bfloat16()
    cos, sin = rb.cos_sin(torch.arange(64, device=DEV), 128)
    qkv = torch.randn(64, 48 * 128, device=DEV).bfloat16()
    pos3 = torch.randint(0, 4096, (3, 64), device=DEV)
    m = rb.mrope.chunked([16, 24, 24])
    rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos3, cache, mrope=m, head_dim=128, backend="triton")  # map cached
    launch._PLANS.clear()
    dispatch._RUNNERS.clear()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # first: full path, plans built; second: the prepared runners
            rb.apply(x, cos[:, None], sin[:, None], layout="interleaved", backend="triton")
            rb.apply_qk(x, x[:, :, :2].clone(), cos[:, None], sin[:, None], backend="triton")
            rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos3[0], cache, head_dim=128, backend="triton")
            rb.apply_cached(qkv[:, :4096], qkv[:, 4096:5120], pos3, cache, mrope=m, head_dim=128, backend="triton")
        out["no_sync"] = True
    except RuntimeError as exc:
        out["no_sync"] = f"synced: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    log(f"  no sync: {out['no_sync']}")
    RESULTS["graphs_syncs"] = out


# --------------------------------------------------------------------------------------------
# 2. timing

@guarded("copy bandwidth")
def copy_bandwidth() -> float:
    n = 1 << 30 if not SMOKE else 1 << 20  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src))
    gbs = 2 * n / (us * 1e3)
    RESULTS["copy"] = dict(bytes=2 * n, us=us, gbs=gbs)
    log(f"  copy: {us:.1f} us for 2 x 1 GiB -> {gbs:.0f} GB/s")
    del src, dst
    return gbs


def _stack_flatten(x, cos, sin):
    return npu_backend.rotate(x, cos, sin, Layout.INTERLEAVED, x.shape[-1])


@guarded("diffusion shapes")
def diffusion(copy_gbs: float, sweep: bool):
    compiled = _stack_flatten if SMOKE else torch.compile(_stack_flatten, dynamic=False)
    for shape in DIFFUSION:
        S, Dd = shape[-3], shape[-1]
        x = torch.randn(shape, device=DEV).bfloat16()
        c, s = rb.cos_sin(torch.arange(S, device=DEV), Dd)
        cos, sin = c[:, None], s[:, None]  # [S, 1, D/2]
        nbytes = 2 * x.numel() * 2 + 2 * cos.numel() * 4
        want = rb.apply(x, cos, sin, layout="interleaved", backend="eager")
        got = rb.apply(x, cos, sin, layout="interleaved", backend="triton")
        exact = not bool(bitwise_mismatches(got, want).any())
        comp_diff = int(bitwise_mismatches(compiled(x, cos, sin), want).sum())
        del want, got
        t_eager = median_us(lambda: rb.apply(x, cos, sin, layout="interleaved", backend="eager"), rep=100)
        row("diffusion", shape, "eager strided (reference)", t_eager, nbytes, copy_gbs)
        t_sf = median_us(lambda: _stack_flatten(x, cos, sin), rep=100)
        row("diffusion", shape, "eager stack+flatten", t_sf, nbytes, copy_gbs)
        t_comp = median_us(lambda: compiled(x, cos, sin))
        row("diffusion", shape, "torch.compile (not bit-exact)", t_comp, nbytes, copy_gbs, differing=comp_diff)
        t_tr = median_us(lambda: rb.apply(x, cos, sin, layout="interleaved", backend="triton"))
        plan = launch.plan_for(args_for_tables((("x", x),), cos, sin, "interleaved", None, False))
        t_dev = device_us(lambda: rb.apply(x, cos, sin, layout="interleaved", backend="triton"))
        row("diffusion", shape, "triton", t_tr, nbytes, copy_gbs, bit_exact=exact,
            block_m=plan.meta["BLOCK_M"], num_warps=plan.meta["num_warps"], vs_compile=round(t_comp / t_tr, 2),
            us_1g_flush=round(t_dev, 2), pct_1g_flush=round(100 * nbytes / (t_dev * 1e3) / copy_gbs, 1))
        if sweep:
            _sweep("diffusion", shape, lambda: rb.apply(x, cos, sin, layout="interleaved", backend="triton"),
                   nbytes, copy_gbs)
        del x


def _sweep(section, shape, fn, nbytes, copy_gbs):
    best = None
    for bm, nw in SWEEP:
        launch.set_config(bm, nw)
        try:
            us = median_us(fn, rep=60)
        except Exception as exc:
            log(f"  sweep {bm}x{nw}: {type(exc).__name__}")
            continue
        RESULTS.setdefault("sweep", []).append(dict(section=section, shape=str(shape), block_m=bm, num_warps=nw,
                                                    us=round(us, 3), pct_copy=round(100 * nbytes / (us * 1e3) / copy_gbs, 1)))
        if best is None or us < best[0]:
            best = (us, bm, nw)
    launch.set_config(None)
    log(f"  sweep best {shape}: BLOCK_M={best[1]} num_warps={best[2]} {best[0]:.2f} us "
        f"({100 * nbytes / (best[0] * 1e3) / copy_gbs:.1f}% of copy)")


def _llm_inputs(T, mrope_rows=1):
    g = torch.Generator(device=DEV).manual_seed(T)
    qkv = torch.randn(T, (HQ + 2 * HK) * D, generator=g, device=DEV).bfloat16()
    q, k = qkv[:, :HQ * D], qkv[:, HQ * D:(HQ + HK) * D]
    shape = (mrope_rows, T) if mrope_rows == 3 else (T,)
    pos = torch.randint(0, MAX_POS, shape, generator=g, device=DEV)
    return qkv, q, k, pos


def _llm_bytes(T, rows=1):
    return 2 * T * (HQ + HK) * D * 2 + rows * T * 8 + T * D * 4


def _empty(x_ptr):
    pass


def _graph_of(fn, calls=1):
    fn()  # warm: compile, plans
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


@guarded("LLM apply_cached")
def llm(copy_gbs: float, sweep: bool):
    cache = rb.cos_sin_cache(MAX_POS, D, device=DEV)
    empty_kernel = triton.jit(_empty)  # decorated here: --smoke turns the interpreter on first
    dummy = torch.empty(16, device=DEV)
    g_empty = _graph_of(lambda: empty_kernel[(1,)](dummy)) if not SMOKE else None
    t_empty = median_us(g_empty.replay) if not SMOKE else 1.0
    RESULTS["empty_launch_graph_us"] = t_empty
    t_empty_eager = median_us(lambda: empty_kernel[(1,)](dummy))
    if not SMOKE:
        g10 = _graph_of(lambda: empty_kernel[(1,)](dummy), calls=10)
        row("llm", "empty kernel", "graph of 10 launches / 10", median_us(g10.replay) / 10, 0, copy_gbs)
    row("llm", "empty kernel", "graph replay", t_empty, 0, copy_gbs)
    row("llm", "empty kernel", "eager launch", t_empty_eager, 0, copy_gbs)
    for T in LLM_T:
        qkv, q, k, pos = _llm_inputs(T)
        nbytes = _llm_bytes(T)
        q0, k0 = q.clone(), k.clone()
        want = reference.run(RopeArgs((q0.view(T, HQ, D), k0.view(T, HK, D)), False, Layout.NEOX, D,
                                      positions=pos, cache=cache))
        rb.apply_cached(q, k, pos, cache, head_dim=D, backend="triton")
        exact = not (bool(bitwise_mismatches(q.reshape(T, HQ, D), want[0]).any())
                     or bool(bitwise_mismatches(k.reshape(T, HK, D), want[1]).any()))
        eager = lambda: rb.apply_cached(q, k, pos, cache, head_dim=D, backend="eager")  # noqa: E731
        tri = lambda: rb.apply_cached(q, k, pos, cache, head_dim=D, backend="triton")  # noqa: E731
        row("llm", f"T={T}", "eager", median_us(eager, rep=100), nbytes, copy_gbs)
        args = RopeArgs((q.view(T, HQ, D), k.view(T, HK, D)), True, Layout.NEOX, D, positions=pos, cache=cache)
        plan = launch.plan_for(args)
        t_dev = device_us(tri)
        row("llm", f"T={T}", "triton", median_us(tri), nbytes, copy_gbs, bit_exact=exact,
            block_m=plan.meta["BLOCK_M"], num_warps=plan.meta["num_warps"], programs=plan.grid[0],
            us_1g_flush=round(t_dev, 2), pct_1g_flush=round(100 * nbytes / (t_dev * 1e3) / copy_gbs, 1))
        if T <= 64 and not SMOKE:
            # (eager is not capturable: reference.cos_sin_from_cache makes a tensor from a Python
            # scalar, a host-to-device copy)
            gt = _graph_of(tri)
            t_g = median_us(gt.replay)
            row("llm", f"T={T}", "triton, graph replay", t_g, nbytes, copy_gbs, vs_empty=round(t_g / t_empty, 2))
            g10 = _graph_of(tri, calls=10)
            row("llm", f"T={T}", "triton, graph of 10 calls / 10", median_us(g10.replay) / 10, nbytes, copy_gbs)
            del gt, g10
        if sweep and T >= min(4096, LLM_T[-1]):
            _sweep("llm", f"T={T}", tri, nbytes, copy_gbs)


@guarded("MRoPE apply_cached next to plain")
def mrope_rows(copy_gbs: float):
    T = MROPE_T
    cache = rb.cos_sin_cache(MAX_POS, D, device=DEV)
    qkv, q, k, pos1 = _llm_inputs(T)
    _, _, _, pos3 = _llm_inputs(T, 3)
    plain = lambda: rb.apply_cached(q, k, pos1, cache, head_dim=D, backend="triton")  # noqa: E731
    t_plain, d_plain = median_us(plain), device_us(plain)
    row("mrope", f"T={T}", "plain", t_plain, _llm_bytes(T), copy_gbs, us_1g_flush=round(d_plain, 2))
    for name, m in (("chunked[16,24,24]", rb.mrope.chunked([16, 24, 24])),
                    ("interleaved[24,20,20]", rb.mrope.interleaved([24, 20, 20])),
                    ("ernie[22,22,20]", rb.mrope.ernie([22, 22, 20]))):
        fn = lambda: rb.apply_cached(q, k, pos3, cache, mrope=m, head_dim=D, backend="triton")  # noqa: E731
        t, d = median_us(fn), device_us(fn)
        row("mrope", f"T={T}", name, t, _llm_bytes(T, 3), copy_gbs, vs_plain=round(t / t_plain, 3),
            us_1g_flush=round(d, 2), vs_plain_1g_flush=round(d / d_plain, 3))


@guarded("backward vs forward")
def backward(copy_gbs: float):
    for shape, layout in BACKWARD:
        S = shape[-3]
        x = torch.randn(shape, device=DEV).bfloat16()
        c, s = rb.cos_sin(torch.arange(S, device=DEV), shape[-1])
        cos, sin = c[:, None], s[:, None]
        nbytes = 2 * x.numel() * 2 + 2 * cos.numel() * 4
        fwd = args_for_tables((("x", x),), cos, sin, layout, None, False)
        bwd = dataclasses.replace(fwd, conjugate=True)
        t_f = device_us(lambda: triton_backend.forward(fwd))
        t_b = device_us(lambda: triton_backend.forward(bwd))
        row("backward", shape, f"{layout} forward", t_f, nbytes, copy_gbs)
        row("backward", shape, f"{layout} backward kernel", t_b, nbytes, copy_gbs, vs_forward=round(t_b / t_f, 3))
        xg = x.detach().requires_grad_()
        y = rb.apply(xg, cos, sin, layout=layout, backend="triton")
        gy = torch.randn_like(y)
        t_ag = median_us(lambda: torch.autograd.grad(y, xg, gy, retain_graph=True))
        row("backward", shape, f"{layout} autograd backward", t_ag, nbytes, copy_gbs, vs_forward=round(t_ag / t_f, 3))
        # training as a user sees it, side by side: the eager autograd.Function (rb.apply) vs the
        # torch.library custom op it replaced in eager mode (what torch.compile still uses);
        # median_us is do_bench's time, which a host-bound call stretches to its host time
        D = shape[-1]
        op = lambda: torch.ops.rope_backends.rope(xg, cos, sin, layout, D, False, "triton")  # noqa: E731
        y_op = op()
        t_train_f = median_us(lambda: rb.apply(xg, cos, sin, layout=layout, backend="triton"))
        t_op_f = median_us(op)
        t_op_b = median_us(lambda: torch.autograd.grad(y_op, xg, gy, retain_graph=True))
        t_step = median_us(lambda: torch.autograd.grad(rb.apply(xg, cos, sin, layout=layout, backend="triton"), xg, gy))
        t_op_step = median_us(lambda: torch.autograd.grad(op(), xg, gy))
        row("backward", shape, f"{layout} training forward (rb.apply, requires_grad)", t_train_f, nbytes, copy_gbs,
            vs_forward=round(t_train_f / t_f, 3), vs_custom_op=round(t_train_f / t_op_f, 3))
        row("backward", shape, f"{layout} custom-op forward (requires_grad)", t_op_f, nbytes, copy_gbs,
            vs_forward=round(t_op_f / t_f, 3))
        row("backward", shape, f"{layout} custom-op autograd backward", t_op_b, nbytes, copy_gbs,
            vs_forward=round(t_op_b / t_f, 3), eager_vs_custom_op=round(t_ag / t_op_b, 3))
        row("backward", shape, f"{layout} forward + backward (rb.apply)", t_step, 2 * nbytes, copy_gbs,
            vs_custom_op=round(t_step / t_op_step, 3))
        row("backward", shape, f"{layout} forward + backward (custom op)", t_op_step, 2 * nbytes, copy_gbs)
        del x, xg, y, gy, y_op


@guarded("host overhead")
def host_overhead():
    """Host time per call of back-to-back calls (best of 3 x 20,000), the public call next to
    launching the compiled kernel by hand with the same plan: ``rb.apply`` out of place (the
    direct launch also allocates its output), and ``rb.apply_cached`` in place for one decode
    token of a fused qkv buffer (q 32 heads, k 8, D=128: the serving hot path)."""
    x = torch.randn(1, 32, 128, device=DEV).bfloat16()
    c, s = rb.cos_sin(torch.arange(1, device=DEV), 128)
    cos, sin = c[:, None], s[:, None]
    args = args_for_tables((("x", x),), cos, sin, "neox", None, False)
    rb.apply(x, cos, sin, backend="triton")
    plan = launch.plan_for(args)
    kern = launch._kernel()
    out = torch.empty_like(x)
    ptrs = (x, out, None, None, cos, sin, None, None, None)

    def jit_run():
        kern.run(*ptrs, *plan.ints, grid=plan.grid, warmup=False, **plan.meta)

    compiled = kern.run(*ptrs, *plan.ints, grid=plan.grid, warmup=False, **plan.meta)

    def direct():
        compiled[plan.grid](*ptrs, *plan.tail)

    # decode: apply_cached in place on q/k views of a fused qkv row
    qkv = torch.randn(1, (32 + 2 * 8) * 128, device=DEV).bfloat16()
    q, k = qkv[:, :32 * 128], qkv[:, 32 * 128:40 * 128]
    cache = rb.cos_sin_cache(4096, 128, device=DEV)
    pos = torch.tensor([7], device=DEV)
    rb.apply_cached(q, k, pos, cache, head_dim=128)
    cargs, _ = args_for_cached(q, k, pos, cache, "neox", None, None, True, 128)
    cplan = launch.plan_for(cargs)
    cptrs = (cargs.tensors[0], cargs.tensors[0], cargs.tensors[1], cargs.tensors[1], None, None, pos, cache, None)
    ccompiled = kern.run(*cptrs, *cplan.ints, grid=cplan.grid, warmup=False, **cplan.meta)

    def cdirect():
        ccompiled[cplan.grid](*cptrs, *cplan.tail)

    # the tightest floor: the launcher handed the current stream, as launch.py's own path does
    raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    def direct_stream():
        compiled[plan.grid](*ptrs, *plan.tail, stream=raw_stream(torch._C._cuda_getDevice()))

    def cdirect_stream():
        ccompiled[cplan.grid](*cptrs, *cplan.tail, stream=raw_stream(torch._C._cuda_getDevice()))

    sync = torch.cuda.synchronize if not SMOKE else (lambda: None)

    def per_call(fn, n=20000 if not SMOKE else 3):
        for _ in range(500 if not SMOKE else 1):
            fn()
        sync()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
            sync()
        return best

    res = {
        "JITFunction.run (triton's own launch path)": per_call(jit_run),
        "compiled kernel launch (out preallocated)": per_call(direct) if not SMOKE else 0.0,
        "compiled kernel launch + empty_like": per_call(lambda: (torch.empty_like(x), direct())) if not SMOKE else 0.0,
        "launch.forward(RopeArgs)": per_call(lambda: launch.forward(args)),
        "validation args_for_tables": per_call(lambda: args_for_tables((("x", x),), cos, sin, "neox", None, False)),
        "rb.apply(backend='triton')": per_call(lambda: rb.apply(x, cos, sin, backend="triton")),
        "rb.apply (auto dispatch)": per_call(lambda: rb.apply(x, cos, sin)),
        "rb.apply, no prepared runner": per_call(lambda: (dispatch._RUNNERS.clear(), rb.apply(x, cos, sin))),
        "decode: compiled kernel launch (in place)": per_call(cdirect) if not SMOKE else 0.0,
        "decode: rb.apply_cached (auto dispatch)": per_call(lambda: rb.apply_cached(q, k, pos, cache, head_dim=128)),
        "compiled kernel launch, stream passed + empty_like":
            per_call(lambda: (torch.empty_like(x), direct_stream())) if not SMOKE else 0.0,
        "decode: compiled kernel launch, stream passed (in place)": per_call(cdirect_stream) if not SMOKE else 0.0,
    }
    base = res["compiled kernel launch + empty_like"]
    res["overhead: rb.apply - compiled launch(+empty_like)"] = res["rb.apply (auto dispatch)"] - base
    res["overhead: rb.apply_cached - compiled launch (decode, in place)"] = (
        res["decode: rb.apply_cached (auto dispatch)"] - res["decode: compiled kernel launch (in place)"])
    res["overhead: rb.apply - stream-passed launch(+empty_like)"] = (
        res["rb.apply (auto dispatch)"] - res["compiled kernel launch, stream passed + empty_like"])
    res["overhead: rb.apply_cached - stream-passed launch (decode, in place)"] = (
        res["decode: rb.apply_cached (auto dispatch)"] - res["decode: compiled kernel launch, stream passed (in place)"])
    res["overhead: launch.forward - compiled launch(+empty_like)"] = res["launch.forward(RopeArgs)"] - base
    res["overhead: rb.apply - JITFunction.run"] = res["rb.apply (auto dispatch)"] - res["JITFunction.run (triton's own launch path)"]
    RESULTS["host_us"] = {k: round(v, 2) for k, v in res.items()}
    for k, v in res.items():
        log(f"  {k:48s} {v:7.2f} us")


# --------------------------------------------------------------------------------------------

def targets() -> list:
    """Issue 3's targets, each met or missed, from the rows of this run."""
    rows = RESULTS["rows"]

    def get(section, shape, impl):
        for r in rows:
            if r["section"] == section and r["shape"] == str(shape) and r["impl"] == impl:
                return r
        return None

    out = []
    for i, shape in enumerate(DIFFUSION):
        t, c = get("diffusion", shape, "triton"), get("diffusion", shape, "torch.compile (not bit-exact)")
        if t and c:
            need = 95 if i == 0 else 90 if i < 3 else 75
            out.append((f"diffusion {shape} >= {need}% of copy (do_bench)", t["pct_copy"], t["pct_copy"] >= need))
            out.append((f"diffusion {shape} >= {need}% of copy (1 GiB flush)", t["pct_1g_flush"], t["pct_1g_flush"] >= need))
            out.append((f"diffusion {shape} faster than torch.compile", round(c["us"] / t["us"], 2), t["us"] < c["us"]))
    for T in LLM_T:
        t = get("llm", f"T={T}", "triton")
        if t and T >= 4096:
            out.append((f"apply_cached T={T} >= 85% of copy (do_bench)", t["pct_copy"], t["pct_copy"] >= 85))
            out.append((f"apply_cached T={T} >= 85% of copy (1 GiB flush)", t["pct_1g_flush"], t["pct_1g_flush"] >= 85))
        g = get("llm", f"T={T}", "triton, graph replay")
        if g:
            out.append((f"apply_cached T={T} graph replay <= 2x empty launch", g["vs_empty"], g["vs_empty"] <= 2))
    for r in rows:
        if r["section"] == "mrope" and "vs_plain" in r:
            out.append((f"MRoPE {r['impl']} within 10% of plain (do_bench)", r["vs_plain"], r["vs_plain"] <= 1.10))
            out.append((f"MRoPE {r['impl']} within 10% of plain (1 GiB flush)", r["vs_plain_1g_flush"],
                        r["vs_plain_1g_flush"] <= 1.10))
        if r["section"] == "backward" and r["impl"].endswith("backward kernel"):
            out.append((f"backward {r['shape']} within 10% of forward", r["vs_forward"], r["vs_forward"] <= 1.10))
    host = RESULTS.get("host_us", {})
    if host:
        v = host["overhead: rb.apply - compiled launch(+empty_like)"]
        out.append(("host overhead rb.apply over a direct launch <= 5 us", v, v <= 5))
        v = host.get("overhead: rb.apply_cached - compiled launch (decode, in place)")
        if v is not None:
            out.append(("host overhead rb.apply_cached (decode, in place) over a direct launch <= 5 us", v, v <= 5))
    RESULTS["targets"] = [dict(target=a, value=b, met=bool(m)) for a, b, m in out]
    return out


def table() -> str:
    lines = ["| section | shape | implementation | µs | GB/s | % of copy | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in RESULTS["rows"]:
        note = ", ".join(f"{k}={r[k]}" for k in ("us_1g_flush", "pct_1g_flush", "bit_exact", "vs_compile", "vs_empty",
                                                  "vs_plain", "vs_forward", "differing", "block_m", "num_warps") if k in r)
        lines.append(f"| {r['section']} | {r['shape']} | {r['impl']} | {r['us']:.2f} | {r['gbs']:.0f} | "
                     f"{r['pct_copy']} | {note} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the reference tier (--full)")
    ap.add_argument("--only", default="", help="comma list of sections: suite,eager,graphs,diffusion,llm,mrope,backward,host")
    ap.add_argument("--smoke", action="store_true", help="test this script on CPU (Triton interpreter, tiny sizes)")
    a = ap.parse_args()
    if a.smoke:
        global DEV, SMOKE, DIFFUSION, LLM_T, MAX_POS, SWEEP, MROPE_T, BACKWARD
        os.environ["TRITON_INTERPRET"] = "1"
        DEV, SMOKE = "cpu", True
        DIFFUSION = [(1, 6, 3, 16), (5, 2, 8)]
        LLM_T, MAX_POS, SWEEP, MROPE_T = [1, 16, 64], 4096, SWEEP[:2], 16
        BACKWARD = [((1, 6, 3, 16), "interleaved"), ((5, 4, 16), "neox")]
    only = set(filter(None, a.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731
    props = torch.cuda.get_device_properties(0) if not SMOKE else None
    RESULTS["env"] = dict(device=torch.cuda.get_device_name(0) if not SMOKE else "cpu (smoke)",
                          sms=props.multi_processor_count if props else 0,
                          torch=torch.__version__, triton=triton.__version__, python=_platform.python_version(),
                          date=_dt.date.today().isoformat(), argv=sys.argv[1:])
    global OUT_DIR
    OUT_DIR = a.out
    log(RESULTS["env"])
    t0 = time.time()
    if want("suite"):
        suite(a.full, a.skip_large, a.budget)
    if want("eager"):
        versus_eager()
    if want("graphs") and not SMOKE:
        graphs_and_syncs()
    copy_gbs = copy_bandwidth() or 0.0
    if want("diffusion"):
        diffusion(copy_gbs, a.sweep)
    if want("llm"):
        llm(copy_gbs, a.sweep)
    if want("mrope"):
        mrope_rows(copy_gbs)
    if want("backward"):
        backward(copy_gbs)
    if want("host"):
        host_overhead()
    RESULTS["seconds"] = round(time.time() - t0, 1)
    save()
    log("\n" + table())
    log("\n| target | value | met |\n|---|---:|---|")
    for name, value, met in targets():
        log(f"| {name} | {value} | {'yes' if met else 'NO'} |")
    save()
    log(f"\nerrors: {[e['section'] + ': ' + e['error'][:200] for e in RESULTS['errors']]}")
    log(f"conformance: {RESULTS.get('conformance_suite', {}) and {k: (v['passed'], len(v['failed'])) for k, v in RESULTS['conformance_suite'].items()}}"
        f" versus_eager: {RESULTS.get('versus_eager')} graphs/syncs: {RESULTS.get('graphs_syncs')}")
    log(f"host: {RESULTS.get('host_us')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
