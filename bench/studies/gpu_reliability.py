"""GPU reliability checks (more than 2^31 elements, a second GPU, memory, no syncs, CUDA graphs), in one run on a GPU machine.

  python bench/studies/gpu_reliability.py --out DIR [--big-tokens N]

1. a tensor of more than 2^31 elements (q ``[T, 32, 128]`` bf16, ~2.2e9 elements) through
   ``apply_cached`` in place and ``apply`` out of place: bit-exact with the eager reference,
   compared chunk by chunk (the rotation is per token, so chunks of the reference are the
   reference);
2. inputs on ``cuda:1`` while ``cuda:0`` is current (when two GPUs exist): bit-exact, output on
   cuda:1, nothing allocated on cuda:0;
3. memory: out-of-place calls allocate the output and nothing else, in-place calls nothing
   (``torch.cuda.max_memory_allocated``);
4. no host-device synchronisation (``torch.cuda.set_sync_debug_mode("error")``) and CUDA-graph
   capture and replay of ``apply_cached``.
Writes ``gpu_reliability-<device>.json`` into DIR and prints a summary. Contains no kernel code.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import rope_backends as rb


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bit patterns differ (NaNs with different payloads count as equal)."""
    ia, ib = a.view(torch.int16 if a.element_size() == 2 else torch.int32), b.view(torch.int16 if b.element_size() == 2 else torch.int32)
    differ = (ia != ib) & ~(torch.isnan(a) & torch.isnan(b))
    return int(differ.sum())


def check_big(tokens: int, device: str) -> dict:
    torch.manual_seed(0)
    q = torch.randn(tokens, 32, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(tokens, 8, 128, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, 8192, (tokens,), device=device)
    cache = rb.cos_sin_cache(8192, 128, device=device)
    q0, k0 = q.clone(), k.clone()
    t0 = time.perf_counter()
    rb.apply_cached(q, k, positions, cache)  # automatic: triton on CUDA
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    bad_q = bad_k = 0
    chunk = 1 << 16
    for lo in range(0, tokens, chunk):
        sl = slice(lo, lo + chunk)
        rq, rk = rb.apply_cached(q0[sl].clone(), k0[sl].clone(), positions[sl], cache, backend="eager")
        bad_q += mismatches(q[sl], rq)
        bad_k += mismatches(k[sl], rk)
    del q, k
    # out of place, interleaved, explicit cos/sin: [1, T, 32, 128]
    cos, sin = rb.cos_sin(torch.arange(tokens, device=device) % 4096, 128)
    out = rb.apply(q0.view(1, tokens, 32, 128), cos[:, None], sin[:, None], layout="interleaved")
    bad_out = 0
    for lo in range(0, tokens, chunk):
        sl = slice(lo, lo + chunk)
        ref = rb.apply(q0[None, sl], cos[sl, None], sin[sl, None], layout="interleaved", backend="eager")
        bad_out += mismatches(out[:, sl], ref)
    return {
        "q_elements": tokens * 32 * 128,
        "over_2_31": tokens * 32 * 128 > 2**31,
        "apply_cached_inplace_mismatches_q": bad_q,
        "apply_cached_inplace_mismatches_k": bad_k,
        "apply_outofplace_mismatches": bad_out,
        "apply_cached_seconds": seconds,
    }


def check_memory(device: str) -> dict:
    x = torch.randn(1, 32760, 12, 128, device=device, dtype=torch.bfloat16)
    cos, sin = rb.cos_sin(torch.arange(32760, device=device), 128)
    cos, sin = cos[:, None], sin[:, None]
    q = torch.randn(4096, 32 * 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(4096, 8 * 128, device=device, dtype=torch.bfloat16)
    pos3 = torch.randint(0, 4096, (3, 4096), device=device)
    cache = rb.cos_sin_cache(4096, 128, device=device)
    mrope = rb.mrope.interleaved([24, 20, 20])
    for _ in range(2):  # warm-up: compiled kernels, cached axis maps
        rb.apply(x, cos, sin, layout="interleaved")
        rb.apply_cached(q, k, pos3, cache, head_dim=128, mrope=mrope)
    torch.cuda.synchronize()
    result = {}
    for name, fn, expected in (
        ("apply_out_of_place", lambda: rb.apply(x, cos, sin, layout="interleaved"), x.nbytes),
        ("apply_cached_inplace_mrope", lambda: rb.apply_cached(q, k, pos3, cache, head_dim=128, mrope=mrope), 0),
        ("apply_inplace", lambda: rb.apply(x, cos, sin, layout="interleaved", inplace=True), 0),
    ):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        # the caching allocator hands out large blocks in 2 MiB steps: one output = its size rounded up
        rounded = -(-expected // (2 << 20)) * (2 << 20) if expected > (1 << 20) else -(-expected // 512) * 512
        result[name] = {"peak_bytes_over_inputs": peak, "expected_bytes": expected,
                        "expected_after_allocator_rounding": rounded, "ok": peak <= rounded}
    return result


def check_no_sync_and_graph(device: str) -> dict:
    q = torch.randn(64, 32 * 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(64, 8 * 128, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, 4096, (64,), device=device)
    cache = rb.cos_sin_cache(4096, 128, device=device)
    cos, sin = rb.cos_sin(torch.arange(64, device=device), 128)
    x = torch.randn(2, 64, 8, 128, device=device, dtype=torch.float16)
    xk = torch.randn(2, 64, 2, 128, device=device, dtype=torch.float16)
    rb.apply_cached(q, k, positions, cache, head_dim=128)
    rb.apply(x, cos[:, None], sin[:, None])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rb.apply_cached(q, k, positions, cache, head_dim=128)
        rb.apply(x, cos[:, None], sin[:, None])
        rb.apply_qk(x, xk, cos[:, None], sin[:, None])
        no_sync = True
    except RuntimeError as exc:
        no_sync = f"sync detected: {exc}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # CUDA graph: capture in place on static buffers, replay with new data
    sq, sk, sp = q.clone(), k.clone(), positions.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rb.apply_cached(sq, sk, sp, cache, head_dim=128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rb.apply_cached(sq, sk, sp, cache, head_dim=128)
    bad = 0
    for _ in range(3):
        fresh_q, fresh_k = torch.randn_like(q), torch.randn_like(k)
        fresh_p = torch.randint(0, 4096, (64,), device=device)
        sq.copy_(fresh_q), sk.copy_(fresh_k), sp.copy_(fresh_p)
        graph.replay()
        rq, rk = rb.apply_cached(fresh_q, fresh_k, fresh_p, cache, head_dim=128, backend="eager")
        bad += mismatches(sq, rq) + mismatches(sk, rk)
    torch.cuda.synchronize()
    return {"no_sync": no_sync, "graph_replay_mismatches": bad}


def check_second_gpu() -> dict:
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s) here"}
    torch.cuda.set_device(0)
    dev = "cuda:1"
    before0 = torch.cuda.memory_allocated(0)
    x = torch.randn(2, 1024, 16, 128, device=dev, dtype=torch.bfloat16)
    cos, sin = rb.cos_sin(torch.arange(1024, device=dev), 128)
    q = torch.randn(512, 32 * 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(512, 8 * 128, device=dev, dtype=torch.bfloat16)
    pos3 = torch.randint(0, 2048, (3, 512), device=dev)
    cache = rb.cos_sin_cache(2048, 128, device=dev)
    out = rb.apply(x, cos[:, None], sin[:, None], layout="interleaved")
    ref = rb.apply(x, cos[:, None], sin[:, None], layout="interleaved", backend="eager")
    q0, k0 = q.clone(), k.clone()
    rb.apply_cached(q, k, pos3, cache, head_dim=128, mrope=rb.mrope.chunked([16, 24, 24]))
    rq, rk = rb.apply_cached(q0, k0, pos3, cache, head_dim=128, mrope=rb.mrope.chunked([16, 24, 24]), backend="eager")
    torch.cuda.synchronize(1)
    return {
        "out_device": str(out.device),
        "apply_mismatches": mismatches(out, ref),
        "apply_cached_mismatches": mismatches(q, rq) + mismatches(k, rk),
        "cuda0_bytes_allocated_during": torch.cuda.memory_allocated(0) - before0,
        "current_device_after": torch.cuda.current_device(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--big-tokens", type=int, default=540_000, help="q [T, 32, 128]; 540000 gives 2.21e9 elements")
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    device = "cuda"
    name = torch.cuda.get_device_name(0)
    report = {
        "device": name,
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "backend_for_cuda": [b.name for b in rb.list_backends() if b.available and "cuda" in b.device_types],
        "no_sync_and_graph": check_no_sync_and_graph(device),
        "memory": check_memory(device),
        "second_gpu": check_second_gpu(),
    }
    if not args.skip_big:
        report["big"] = check_big(args.big_tokens, device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gpu_reliability-{name.replace(' ', '_')}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
