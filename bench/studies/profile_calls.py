"""Which device kernels one public call launches, and for how long (CUDA; torch.profiler).

    python bench/studies/profile_calls.py [--out DIR]

For the backward group's shapes (python -m rope_backends bench --groups backward): the forward
``rb.apply(x, cos, sin)`` and the backward ``torch.autograd.grad(y, x, g)`` each run a few times
under ``torch.profiler`` (CUDA activity); per call it lists every device kernel with its duration,
so a backward slower than its forward can be told apart as more kernels, a slower kernel, or host
time (the sum of kernel time against ``triton.testing.do_bench``'s figure for the same call).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import rope_backends as rb  # noqa: E402
from rope_backends.benchmark.machine import device_info  # noqa: E402
from rope_backends.benchmark.scenarios import backward_cases  # noqa: E402

REPS = 5


def _kernels(fn) -> tuple[list[tuple[str, float]], float]:
    """Device kernels of one call of ``fn`` (name, µs; the median of REPS profiled calls per
    kernel position) and their summed time."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    per_call: list[list[tuple[str, float]]] = []
    for _ in range(REPS):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per_call.append([(e.name, e.device_time) for e in events])
    lengths = {len(c) for c in per_call}
    calls = [c for c in per_call if len(c) == min(lengths)]
    out = []
    for i, (name, _) in enumerate(calls[0]):
        times = sorted(c[i][1] for c in calls)
        out.append((name[:90], times[len(times) // 2]))
    return out, sum(t for _, t in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_calls.py needs a CUDA device")
    from triton.testing import do_bench
    device = torch.device("cuda")
    result: dict = {"device": device_info(device), "command": "python bench/studies/profile_calls.py", "cases": []}
    # the backward group's own inputs (x, g, cos, sin), one case per shape
    for case in (c for c in backward_cases("gpu", device) if c.op == "forward"):
        shape, layout = case.shape, case.layout
        d = case.make(0)
        x, g, cos, sin = d["x"], d["g"], d["cos"], d["sin"]
        xg = x.detach().requires_grad_(True)
        y = rb.apply(xg, cos, sin, layout=layout)
        calls = {
            "forward (no grad)": lambda: rb.apply(x, cos, sin, layout=layout),
            "forward (grad recorded)": lambda: rb.apply(xg, cos, sin, layout=layout),
            "backward (autograd.grad)": lambda: torch.autograd.grad(y, xg, g, retain_graph=True),
        }
        for name, fn in calls.items():
            kernels, total = _kernels(fn)
            us = do_bench(fn, return_mode="median") * 1e3
            row = {"shape": shape, "layout": layout, "call": name, "kernels": kernels,
                   "kernel_us": total, "do_bench_us": us}
            result["cases"].append(row)
            print(f"{shape:22s} {layout:11s} {name:26s} do_bench {us:8.1f} µs  kernels {total:8.1f} µs")
            for kname, t in kernels:
                print(f"{'':62s}{t:8.1f} µs  {kname}")
    summary: dict = defaultdict(dict)
    for r in result["cases"]:
        summary[f"{r['shape']} {r['layout']}"][r["call"]] = round(r["do_bench_us"], 1)
    result["summary"] = summary
    if a.out:
        path = Path(a.out) / "profile-calls.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
