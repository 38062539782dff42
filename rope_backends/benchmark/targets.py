"""The targets a run is judged by, computed from its rows (docs/benchmarks.md states them).

GPU targets, for the device's default backend, each judged on do_bench's figure and again on
the device kernels' own time (timing ``kernels``: a call's host time shows in do_bench's figure
only when it outlasts the L2 flush, which a slow host or an autograd backward does): the largest diffusion shape at >= 98 % of the
large copy's bandwidth in both layouts; the smaller ones, and ``apply_cached`` at T >= 4096,
within 3 % of a copy of as many bytes; decode under CUDA-graph replay within 2x an empty
launch; MRoPE within 10 % of plain positions; backward within 10 % of forward; the host time of
``rb.apply`` / ``rb.apply_cached`` against one torch op. Other lines (speedups over the peers,
host overheads) are reported with no limit.

This module reads a result document and returns the summary; it measures nothing and never
judges a target off the GPU (``met`` is None there).
"""

from __future__ import annotations

from .baselines import EMPTY_LAUNCH, SAME_BYTES_COPY, TORCH_OP
from .scenarios import DIFFUSION_SHAPES

__all__ = ["summarize", "DIFFUSION_LARGE_TARGET", "SAME_BYTES_TARGET", "CACHED_SAME_BYTES_TARGET", "HOST_TARGETS"]

DIFFUSION_LARGE_TARGET = 98.0
SAME_BYTES_TARGET = 97.0
CACHED_SAME_BYTES_TARGET = 97.0
HOST_TARGETS = {"rb.apply_cached": 1.4, "rb.apply": 1.6}


def summarize(doc: dict) -> list[dict]:
    """The GPU targets, computed for the device's default backend from this run's rows.
    ``met`` is None where the target is not defined for the device (they are GPU targets)."""
    rows = doc["rows"]
    best = doc.get("default_backend")
    gpu = doc["device"]["type"] == "cuda"
    out = []

    def pick(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    def add(target, value, limit, higher_is_better, text):
        met = None
        if gpu and value is not None and limit is not None:
            met = value >= limit if higher_is_better else value <= limit
        out.append({"target": target, "value": value, "limit": limit, "met": met, "detail": text})

    timing = "do_bench" if gpu else ("torch_timer" if doc["device"]["type"] == "cpu" else "host_loop")

    def tag(r):
        """Lines judged on the device kernels' own time (timing "kernels") say so."""
        return " (kernels)" if r["timing"] == "kernels" else ""

    def same_bytes(r, limit):
        """The rope call against a copy of as many bytes, timed alike (% of that copy's speed)."""
        copy = pick(group=r["group"], scenario=r["scenario"], op=r["op"], shape=r["shape"],
                    implementation=SAME_BYTES_COPY, timing=r["timing"])
        if copy:
            what = f"{r['group']} {r['op']}" if r["group"] == "llm" else r["group"]  # llm: two ops per T
            add(f"{what} {r['scenario']} {r['shape']} % of a same-bytes copy{tag(r)}",
                100.0 * copy[0]["us"] / r["us"], limit, True,
                f"{best} {r['us']:.1f} µs vs copy {copy[0]['us']:.1f} µs "
                f"({copy[0]['pct_copy']:.0f} % of the large copy's bandwidth)")

    def ratio_to(r, peer, label, limit=1.0):
        """peer time / ours: above 1 we are faster (when the peer ran and was bit-exact or not)."""
        other = pick(group=r["group"], scenario=r["scenario"], implementation=peer, timing=r["timing"])
        if other:
            add(f"{r['group']} {r['scenario']} speedup over {label}{tag(r)}", other[0]["us"] / r["us"], limit, True,
                f"{best} {r['us']:.1f} µs vs {label} {other[0]['us']:.1f} µs")

    # each line on do_bench's figure (what a caller waits for, host included when it outlasts the
    # L2 flush) and, on a GPU, on the kernels' own time after the same flush (device alone)
    timings = (timing, "kernels") if gpu else (timing,)
    for r in (r for t in timings for r in pick(group="diffusion", implementation=best, timing=t)):
        shape = tuple(int(v) for v in r["shape"].strip("()").split(","))
        if shape == DIFFUSION_SHAPES["gpu"][0]:
            if r["timing"] == timing:
                add(f"diffusion {r['scenario']} {r['shape']} % of copy", r["pct_copy"], DIFFUSION_LARGE_TARGET, True,
                    f"{best} {r['gbps']:.4g} GB/s")
            same_bytes(r, None)
        else:
            same_bytes(r, SAME_BYTES_TARGET)
        ratio_to(r, "torch.compile", "torch.compile")
        ratio_to(r, "flash-attn", "flash-attn")
    for r in (r for t in timings for r in pick(group="qk", implementation=best, timing=t)):
        same_bytes(r, None)
        ratio_to(r, "liger-kernel", "Liger-Kernel")
        ratio_to(r, "flash-attn", "flash-attn")
    for r in (r for t in timings for r in pick(group="llm", implementation=best, timing=t)):
        if r["tokens"] >= 4096:
            if r["timing"] == timing:
                add(f"llm {r['op']} T={r['tokens']} % of copy", r["pct_copy"], None, True,
                    f"{best} {r['gbps']:.4g} GB/s")
            same_bytes(r, CACHED_SAME_BYTES_TARGET if r["op"] == "apply_cached" else None)
    empty = pick(group="llm", implementation=EMPTY_LAUNCH, timing="cuda_graph")
    for r in pick(group="llm", implementation=best, timing="cuda_graph"):
        if empty:
            add(f"llm {r['op']} T={r['tokens']} graph replay / empty launch", r["us"] / empty[0]["us"],
                2.0 if r["tokens"] <= 16 else None, False, f"{r['us']:.2f} µs vs empty {empty[0]['us']:.2f} µs")
    for t in timings:
        plain = pick(group="mrope", scenario="plain", implementation=best, timing=t)
        for r in pick(group="mrope", implementation=best, timing=t):
            if plain and r["scenario"] != "plain":
                add(f"mrope {r['scenario']} / plain{tag(r)}", r["us"] / plain[0]["us"], 1.10, False,
                    f"{r['us']:.1f} µs vs {plain[0]['us']:.1f} µs")
    for r in pick(group="backward", op="backward", implementation=best):
        fwd = [f for f in pick(group="backward", op="forward", implementation=best, timing=r["timing"])
               if f["shape"] == r["shape"] and f["layout"] == r["layout"]]
        if fwd:
            # "L x (shape)": L layers' calls, one autograd.grad through all of them
            step = " in one backward" if " x (" in r["shape"] else ""
            add(f"backward / forward {r['shape']}{step} {r['layout']} ({r['timing']})", r["us"] / fwd[0]["us"],
                1.10, False, f"{r['us']:.1f} µs vs {fwd[0]['us']:.1f} µs")
    for r in pick(group="dispatch"):
        op_row = [o for o in pick(group="dispatch", scenario=r["scenario"], implementation=TORCH_OP)]
        if r["implementation"].startswith("rb.") and op_row:
            limit = HOST_TARGETS.get(r["implementation"])
            add(f"host time of {r['implementation']} / one torch op ({r['scenario']})", r["us"] / op_row[0]["us"],
                limit, False, f"{r['us']:.2f} µs vs {op_row[0]['us']:.2f} µs per call (x.add_(0))")
        if "overhead_over_launch_us" in r and r["implementation"].startswith("rb."):
            add(f"host overhead of {r['implementation']} over a direct launch ({r['scenario']})",
                r["overhead_over_launch_us"], None, False,
                f"{r['us']:.2f} µs per call; least disturbed round {r.get('overhead_over_launch_us_min', 0):+.2f} µs")
        elif "overhead_over_forward_us" in r:
            add(f"host overhead of {r['implementation']} over {best}.forward ({r['scenario']})",
                r["overhead_over_forward_us"], None, False,
                f"{r['us']:.2f} µs per call; least disturbed round {r.get('overhead_over_forward_us_min', 0):+.2f} µs")
    return out
