"""One-off study: a call's device-kernel time next to the figures the benchmark reports (CUDA).

    python bench/studies/kernel_time.py [--out DIR] [--groups qk,llm,diffusion,backward]

``python -m rope_backends bench`` times each call with ``triton.testing.do_bench`` (L2 flushed
before each call, events around the call). Where a row disagrees with CUDA-graph replay of the
same call (Liger-Kernel's q+k at (2, 4096, 24, 128) reads faster than a copy of as many bytes;
backward rows read slower than their forward), this tells device time from host time: for the
benchmark's own cases and implementations (this library's triton backend, Liger-Kernel,
flash-attn, the same-bytes copy, torch's autograd op), in alternating rounds,

- ``do_bench``: the benchmark's :class:`~rope_backends.benchmark.timing.Clock` figure;
- ``kernels``: the summed duration of the call's device kernels (torch.profiler / CUPTI), each call
  right after the same L2 flush as do_bench (no wait between them, unlike the benchmark's kernels
  rows, which this study led to), the median over calls; ``gap``: the time from the flush's end to
  the first kernel's start (host time the device waited for);
- ``graph``: CUDA-graph replay (the benchmark's ``cuda_graph`` timing), where the call is capturable.

Then the host cost of small calls, back to back (``Clock.host_times``): one torch op, ``rb.apply``,
its compiled launch alone, and the autograd backward of ``rb.apply`` next to torch's own op and a
do-nothing Python ``autograd.Function``, with torch's autograd worker thread on and off. Writes
``kernel-time-study.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rope_backends as rb  # noqa: E402
from rope_backends.benchmark import baselines, implementations, report, scenarios  # noqa: E402
from rope_backends.freqs import cos_sin  # noqa: E402
from rope_backends.benchmark.timing import Clock, _flush_buffer, buffers, per_call_kernels, rotating  # noqa: E402

KEEP = ("triton", "liger-kernel", "flash-attn", baselines.SAME_BYTES_COPY, baselines.TORCH_AUTOGRAD_OP)
ROUNDS = 3
PROFILED_CALLS = 12


def kernel_times(fn, flush: torch.Tensor, clock: Clock) -> tuple[float, float, int]:
    """(median summed kernel µs per call, median gap µs flush end -> first kernel, kernels per call).
    The persisting L2 lines earlier implementations left are reset first (as before do_bench); the
    calls then run without a sync between them, so the gap is the host's."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    clock.fresh_l2()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    calls = per_call_kernels(prof.events())
    if not calls:
        return float("nan"), float("nan"), 0
    return (statistics.median(c[0] for c in calls), statistics.median(c[1] for c in calls),
            int(statistics.median(c[2] for c in calls)))


def device_rows(groups, device, clock, flush) -> list[dict]:
    names, _ = implementations.backend_names("cuda")
    options = implementations.Options(impls=KEEP, progress=False)
    rows = []
    for group in groups:
        for case in scenarios.cases(group, "gpu", device):
            if group == "llm" and case.tokens < 4096:
                continue
            if group == "diffusion" and case.scenario not in ("batch2-4k", "3d-[S,H,D]", "video-33k"):
                continue
            impls = [i for i in implementations.for_case(case, device, names, options)
                     if i.name in KEEP]
            nbuf = buffers(case.nbytes, device)
            sets = [case.make(s) for s in range(nbuf)]
            fns = {}
            for impl in impls:
                try:
                    fns[impl.name] = rotating([impl.prepare(s) for s in sets])
                    fns[impl.name]()
                except Exception as exc:  # a peer not installed here
                    print(f"  {case.scenario} {impl.name}: {type(exc).__name__}: {exc}")
                    fns.pop(impl.name, None)
            res = {n: {"do_bench": [], "kernels": [], "gap": [], "kernels_per_call": 0, "graph": None} for n in fns}
            for _ in range(ROUNDS):
                for n, fn in fns.items():
                    res[n]["do_bench"].append(clock.time(fn))
                    k, g, c = kernel_times(fn, flush, clock)
                    res[n]["kernels"].append(k)
                    res[n]["gap"].append(g)
                    res[n]["kernels_per_call"] = c
            for n in fns:
                if case.op == "backward":
                    continue
                try:
                    res[n]["graph"] = clock.graph(rotating([i.prepare(s) for i in impls if i.name == n
                                                            for s in sets]))
                except Exception as exc:
                    torch.cuda.synchronize()
                    res[n]["graph"] = f"{type(exc).__name__}"
            print(f"{case.group} {case.scenario} {case.shape} (buffers {nbuf}): median of {ROUNDS} rounds, µs")
            print(f"  {'impl':32s} {'do_bench':>9s} {'kernels':>9s} {'gap':>7s} {'n':>3s} {'graph':>9s}")
            for n, r in res.items():
                g = r["graph"]
                gtxt = f"{g:9.2f}" if isinstance(g, float) else f"{str(g):>9s}"
                print(f"  {n:32s} {statistics.median(r['do_bench']):9.2f} {statistics.median(r['kernels']):9.2f} "
                      f"{statistics.median(r['gap']):7.2f} {r['kernels_per_call']:3d} {gtxt}", flush=True)
            rows.append({"group": case.group, "scenario": case.scenario, "op": case.op, "shape": case.shape,
                         "bytes": case.nbytes, "buffers": nbuf, "results": res})
            del sets, fns
            torch.cuda.empty_cache()
    return rows


class _Identity(torch.autograd.Function):
    """A do-nothing Python Function: what any Python backward costs through the engine."""

    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        return g


def host_rows(device, clock) -> dict:
    x = torch.randn(1, 8, 128, dtype=torch.bfloat16, device=device)
    cos, sin = cos_sin(torch.tensor([5]), 128)   # the dispatch group's tiny call: [1, 1, 64]
    cos, sin = cos.to(device)[:, None], sin.to(device)[:, None]
    g = torch.randn_like(x)
    add = torch.zeros(64, device=device)
    xs = x.detach().requires_grad_(True)
    y_rb = rb.apply(xs, cos, sin)
    y_mul = xs * 2.0
    y_id = _Identity.apply(xs)
    back = y_rb.grad_fn.rotation.reverse()
    direct = baselines.direct_triton({"x": x, "cos": cos, "sin": sin}, "apply")
    # the dispatcher alone: rb.apply with its kept runner swapped for one that does nothing
    from rope_backends import dispatch
    rb.apply(x, cos, sin)
    kept = dispatch._RECENT_APPLY[0]
    runner = kept[2][1]
    nothing = (torch.empty_like(x),)

    def dispatch_only():
        dispatch._RECENT_APPLY[0] = (kept[0], kept[1], (kept[2][0], lambda t, a, b: nothing, kept[2][2]))
        try:
            for _ in range(100):
                rb.apply(x, cos, sin)
        finally:
            dispatch._RECENT_APPLY[0] = kept
    calls = {
        "torch add_ (one op)": lambda: add.add_(0),
        "rb.apply's kept runner, called directly": lambda: runner((x,), cos, sin),
        "torch.empty_like (the output)": lambda: torch.empty_like(x),
        "rb.apply": lambda: rb.apply(x, cos, sin),
        "triton compiled launch": direct,
        "rb.apply, x requires grad (forward)": lambda: rb.apply(xs, cos, sin),
        "rotation by -theta (backward's backend call)": lambda: back((g,), cos, sin),
        "grad: rb.apply": lambda: torch.autograd.grad(y_rb, xs, g, retain_graph=True),
        "grad: torch mul": lambda: torch.autograd.grad(y_mul, xs, g, retain_graph=True),
        "grad: python Function (identity)": lambda: torch.autograd.grad(y_id, xs, g, retain_graph=True),
    }
    out = {}
    for name, (med, best) in zip(calls, clock.host_times(list(calls.values()))):
        out[name] = {"median": med, "min": best}
    t0 = __import__("time").perf_counter()
    for _ in range(50):
        dispatch_only()
    out["rb.apply's dispatch alone (runner a no-op)"] = {
        "median": (__import__("time").perf_counter() - t0) / 5000 * 1e6, "min": None}
    grads = {k: v for k, v in calls.items() if k.startswith("grad:")}
    with torch.autograd.set_multithreading_enabled(False):
        for name, (med, best) in zip(grads, clock.host_times(list(grads.values()))):
            out[name + " (no worker thread)"] = {"median": med, "min": best}
    print("host µs per call, back to back (median / min of rounds)")
    for name, r in out.items():
        print(f"  {name:52s} {r['median']:8.2f} {r['min'] or 0:8.2f}")
    return out


def host_profiles(device, top: int = 22) -> dict:
    """cProfile of the Python in small calls (the autograd worker thread off, so the backward's
    Python runs on this thread where cProfile sees it): the functions with the most own time."""
    import cProfile
    import io
    import pstats

    x = torch.randn(1, 8, 128, dtype=torch.bfloat16, device=device)
    cos, sin = cos_sin(torch.tensor([5]), 128)
    cos, sin = cos.to(device)[:, None], sin.to(device)[:, None]
    xs = x.detach().requires_grad_(True)
    g = torch.randn_like(x)
    y = rb.apply(xs, cos, sin)
    q = torch.randn(1, 32 * 128, dtype=torch.bfloat16, device=device)
    k = torch.randn(1, 8 * 128, dtype=torch.bfloat16, device=device)
    pos = torch.tensor([17], device=device)
    cache = rb.cos_sin_cache(4096, 128, device=device)
    calls = {"rb.apply": lambda: rb.apply(x, cos, sin),
             "rb.apply_cached": lambda: rb.apply_cached(q, k, pos, cache, head_dim=128),
             "grad: rb.apply": lambda: torch.autograd.grad(y, xs, g, retain_graph=True)}
    out = {}
    with torch.autograd.set_multithreading_enabled(False):
        for name, fn in calls.items():
            for _ in range(200):
                fn()
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
            out[name] = text.getvalue()
            print(f"--- cProfile, 2000 calls of {name}\n{out[name]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--groups", default="qk,llm,diffusion,backward")
    ap.add_argument("--no-host", action="store_true")
    a = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(device, quick=False)
    flush = _flush_buffer(device)
    doc = {"rounds": ROUNDS, "profiled_calls": PROFILED_CALLS}
    if not a.no_host:
        doc["host"] = host_rows(device, clock)
        doc["host_profiles"] = host_profiles(device)
    doc["rows"] = device_rows([g for g in a.groups.split(",") if g], device, clock, flush)
    report.write_study(doc, a.out, "kernel-time-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
