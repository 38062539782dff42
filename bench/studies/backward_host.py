"""One-off study: where the host time of an autograd backward through rope goes (CUDA).

    python bench/studies/backward_host.py [--out DIR] [--layers 8] [--calls 6]

The benchmark's backward rows read 2-3x the forward under ``torch.autograd.grad`` while the
backward's kernel takes the forward's time, and its model-step rows (8 layers' calls, one backward
through all) still read 1.4-2.1x back to back: the host is the bottleneck even with 8 nodes per
backward. This profiles ``torch.autograd.grad`` through L layers of ``rb.apply`` (this library's
Function around the triton backend) and of ``x * 2`` (torch's own C++ node), bf16 (2,4096,32,128)
neox, with torch's autograd device thread on (the default) and off:

- per call: wall time, and the device's busy time (its kernels' summed duration);
- per node, on the thread that ran it: the duration of torch's ``evaluate_function`` record and the
  gap to the next node's (host time the engine spends between nodes), and the launches in it;
- the return codes of this library's ``cuLaunchKernel`` calls, per thread (a non-zero code means the
  launch fell back to Triton's launcher, e.g. a thread without a current CUDA context).

Each call's outputs are checked bit for bit against the reference first. Writes
``backward-host-study.json`` (and the chrome traces, ``backward-host-<variant>.json``).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rope_backends as rb  # noqa: E402
from rope_backends import reference  # noqa: E402
from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.benchmark import report  # noqa: E402
from rope_backends.contract import Layout  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402

SHAPE = (2, 4096, 32, 128)
CODES: collections.Counter = collections.Counter()  # (thread name, return code) -> launches


def _counting_launch() -> None:
    """This library's ctypes cuLaunchKernel, counting return codes per thread (before any launch)."""
    real = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    real.argtypes, real.restype = None, ctypes.c_int

    def counted(*args):
        err = real(*args)
        CODES[(threading.current_thread().name, err)] += 1
        return err
    launch._LIBCUDA[0] = counted


def _nodes(events, call_marks) -> dict:
    """Per node record (``autograd::engine::evaluate_function: <node>``): its host duration, the gap
    after it to the next node on the same thread, its thread; per call: wall and device busy time."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    evaluated = sorted((e for e in cpu if e.name.startswith("autograd::engine::evaluate_function:")),
                       key=lambda e: e.time_range.start)
    marks = sorted((e for e in cpu if e.name in call_marks), key=lambda e: e.time_range.start)
    per_node: dict = collections.defaultdict(lambda: {"us": [], "gap_after_us": [], "threads": set()})
    by_thread = collections.defaultdict(list)
    for e in evaluated:
        by_thread[e.thread].append(e)
    for thread, evs in by_thread.items():
        for a, b in zip(evs, evs[1:] + [None]):
            name = a.name.split(": ", 1)[1]
            r = per_node[name]
            r["us"].append(a.time_range.end - a.time_range.start)
            if b is not None and b.time_range.start - a.time_range.end < 1000:  # within one call
                r["gap_after_us"].append(b.time_range.start - a.time_range.end)
            r["threads"].add(thread)
    calls = []
    for m in marks:
        lo, hi = m.time_range.start, m.time_range.end
        busy = sum(e.device_time for e in gpu if lo <= e.time_range.start <= hi + 2000)
        calls.append({"wall_us": hi - lo, "device_busy_us": busy})
    return {"nodes": {n: {"count": len(r["us"]), "median_us": statistics.median(r["us"]),
                          "median_gap_after_us": statistics.median(r["gap_after_us"]) if r["gap_after_us"] else None,
                          "threads": len(r["threads"])} for n, r in per_node.items()},
            "calls": calls}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--calls", type=int, default=6)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile, record_function

    _counting_launch()
    dev = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    seq, d = SHAPE[-3], SHAPE[-1]
    cos, sin = rb.cos_sin(torch.arange(seq), d)
    cos, sin = cos.to(dev)[:, None], sin.to(dev)[:, None]
    xs = torch.randn((a.layers, *SHAPE), dtype=torch.bfloat16, device=dev)
    gs = torch.randn_like(xs)
    leaves = tuple(x.detach().requires_grad_(True) for x in xs.unbind(0))
    grads = tuple(gs.unbind(0))
    graphs = {"rb.apply": tuple(rb.apply(x, cos, sin) for x in leaves),
              "x * 2": tuple(x * 2.0 for x in leaves)}
    want = reference.rotate(gs, cos, sin, Layout.NEOX, d, conjugate=True)
    for got in (torch.autograd.grad(graphs["rb.apply"], leaves, grads, retain_graph=True),):
        bad = sum(int(bitwise_mismatches(g, w).sum()) for g, w in zip(got, want.unbind(0)))
        print(f"rb.apply backward vs reference: {bad} mismatching elements")
    out = {"shape": list(SHAPE), "layers": a.layers, "variants": {}}
    for threads_on in (True, False):
        for name, ys in graphs.items():
            variant = f"{name}, device thread {'on' if threads_on else 'off'}"
            mark = f"grad[{name}]"

            def step(ys=ys, mark=mark):
                with record_function(mark):
                    return torch.autograd.grad(ys, leaves, grads, retain_graph=True)
            with torch.autograd.set_multithreading_enabled(threads_on):
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                n = 20
                for _ in range(n):
                    step()
                torch.cuda.synchronize()
                back_to_back = (time.perf_counter() - t0) / n * 1e6
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(a.calls):
                        step()
                    torch.cuda.synchronize()
            summary = _nodes(prof.events(), {mark})
            summary["back_to_back_us"] = back_to_back
            out["variants"][variant] = summary
            trace = Path(a.out) / f"backward-host-{name.replace(' ', '').replace('*', 'x')}-{int(threads_on)}.json"
            trace.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
            walls = [c["wall_us"] for c in summary["calls"]]
            busy = [c["device_busy_us"] for c in summary["calls"]]
            print(f"{variant}: back to back {back_to_back:.1f} µs per call; profiled wall "
                  f"{statistics.median(walls) if walls else float('nan'):.1f}, device busy "
                  f"{statistics.median(busy) if busy else float('nan'):.1f}")
            for node, r in sorted(summary["nodes"].items(), key=lambda kv: -kv[1]["count"]):
                gap = r["median_gap_after_us"]
                print(f"    {node:48s} x{r['count']:3d}  {r['median_us']:7.1f} µs"
                      f"  gap after {gap if gap is None else round(gap, 1)}  threads {r['threads']}")
    out["launch_codes"] = {f"{t} -> {code}": n for (t, code), n in sorted(CODES.items())}
    print("cuLaunchKernel return codes per thread:", out["launch_codes"])
    report.write_study(out, a.out, "backward-host-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
