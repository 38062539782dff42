"""One-off study: does data loaded with ``evict_last`` outlive the benchmark's L2 flush? (CUDA)

    python bench/studies/l2_persistence.py [--out DIR] [--calls N]
    python bench/studies/l2_persistence.py --ncu    # under ncu: only the runs ncu should see

Inside ``python -m rope_backends bench``, whichever kernel was timed right after torch.compile's
implementation on the same q+k inputs read 5-10 % faster (docs/design/benchmark.md). The
hypothesis tested here: a load with the ``evict_last`` priority (Inductor emits it for loads it
reuses; our kernel for cos/sin) leaves lines that normal-priority writes do not evict, so the
256 MB ``zero_()`` flush that do_bench and ``Clock.kernels`` put before every call leaves them in
L2, and the next kernel reading the same addresses hits.

On q+k 4096x24/8 (the ``qk`` group's case), this library's kernel and Liger-Kernel's, each call
after the benchmark's own flush and wait, timed with CUDA events; before each series one of these
"priors" runs 20 times on the same inputs:

* none; a Triton kernel reading q and k with normal loads (writes a scratch buffer); the same with
  ``evict_last`` loads; the same ``evict_last`` read of *other* buffers of the same size;
  torch.compile's implementation (out of place);
* the ``evict_last`` read and torch.compile again, then ``cuCtxResetPersistingL2Cache`` (the driver
  call that returns persisting lines to normal) after every flush.

Prints the median µs per prior and writes ``l2-persistence-study.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rope_backends.benchmark import implementations, report, scenarios  # noqa: E402
from rope_backends.benchmark.timing import _DRAIN_CYCLES, _flush_buffer, persisting_l2_reset  # noqa: E402

CASE = "q+k 4096x24/8"
TIMED = ("triton", "liger-kernel")


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Reads x (with the chosen priority) and writes one sum per block: a kernel whose only
    effect on L2 is what its loads leave there."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if EVICT_LAST:
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    else:
        v = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr + tl.program_id(0), tl.sum(v.to(tl.float32), axis=0))


def _reader(tensors, evict_last: bool):
    block = 4096
    jobs = []
    for t in tensors:
        flat = t.reshape(-1)
        out = torch.empty(triton.cdiv(flat.numel(), block), device=t.device, dtype=torch.float32)
        jobs.append((flat, out))

    def read():
        for flat, out in jobs:
            _read_kernel[(out.numel(),)](flat, out, flat.numel(), BLOCK=block, EVICT_LAST=evict_last)
    return read


def series(fn, device, calls: int, after_flush=None) -> list[float]:
    """``calls`` calls of ``fn``, each after the benchmark's flush and wait, in µs (CUDA events)."""
    flush = _flush_buffer(device)
    out = []
    for _ in range(calls):
        flush.zero_()
        if after_flush is not None:
            after_flush()
        torch.cuda._sleep(_DRAIN_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ncu", action="store_true", help="two priors, two calls of each timed kernel: for ncu")
    a = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    case = next(c for c in scenarios.cases("qk", "gpu", device) if c.scenario == CASE)
    impls = {i.name: i for i in implementations.for_case(case, device, ["triton"],
                                                         implementations.Options(progress=False))}
    inputs, others = case.make(0), case.make(1)
    timed = {n: impls[n].prepare(inputs) for n in TIMED}
    compiled = impls["torch.compile"].prepare(inputs)
    reset = persisting_l2_reset(device)
    if reset is None:
        raise SystemExit("no cuCtxResetPersistingL2Cache here (libcuda): the study needs it")
    priors = {
        "none": None,
        "read q,k (normal loads)": _reader((inputs["q"], inputs["k"]), False),
        "read q,k (evict_last loads)": _reader((inputs["q"], inputs["k"]), True),
        "read other buffers (evict_last loads)": _reader((others["q"], others["k"]), True),
        "torch.compile's implementation": compiled,
    }
    resets = {"read q,k (evict_last loads), reset after each flush": priors["read q,k (evict_last loads)"],
              "torch.compile's implementation, reset after each flush": compiled}
    for fn in (*timed.values(), compiled, *(p for p in priors.values() if p is not None)):
        fn()
    torch.cuda.synchronize()
    if a.ncu:
        for label in ("read q,k (normal loads)", "torch.compile's implementation"):
            for n, fn in timed.items():
                for _ in range(20):
                    priors[label]()
                series(fn, device, 2)
        return 0
    results: dict = {}
    for r in range(a.rounds):
        for label, prior in [*priors.items(), *resets.items()]:
            after = reset if label in resets else None
            for n, fn in timed.items():
                if label in resets or r == 0 and label == "none":
                    reset()
                if prior is not None:
                    for _ in range(20):
                        prior()
                got = series(fn, device, a.calls, after)
                results.setdefault(label, {}).setdefault(n, []).append(got)
            reset()  # the next prior starts from no persisting lines
    print(f"{CASE}: µs per call after the flush (median of {a.calls} calls x {a.rounds} rounds; first call in brackets)")
    rows = []
    for label, per in results.items():
        cells = []
        for n in TIMED:
            flat = [v for got in per[n] for v in got]
            first = statistics.median(got[0] for got in per[n])
            cells.append(f"{n} {statistics.median(flat):6.2f} [{first:6.2f}]")
            rows.append({"prior": label, "implementation": n, "median_us": statistics.median(flat),
                         "first_call_us": first, "us": per[n]})
        print(f"  {label:56s} " + "  ".join(cells), flush=True)
    report.write_study({"case": CASE, "calls": a.calls, "rounds": a.rounds, "rows": rows}, a.out,
                       "l2-persistence-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
