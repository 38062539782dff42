"""Bench: what each RoPE implementation asks of the device, as op counts and as time.

    python bench/studies/optrace.py [--out [DIR]] [--devices cpu,cuda] [--quick] [--min-run-time S]

Three implementations of the same contract, each fed the same validated call (``RopeArgs``) and
checked bit for bit against the reference before anything is reported:

  eager-reference  ``rope_backends.reference.run``: clone, then ``out[..., first] = a'`` and
                   ``out[..., second] = b'`` (two strided slice writes)
  strided-write    the usual hand-written form: ``torch.empty_like`` (or the input, in place) and
                   slice assignment of a', b' and the pass-through -- no clone, all writes strided
  npu              ``rope_backends.backends.npu.forward``: contiguous cat / stack+flatten, the
                   only caller write one final full copy (in place)

Cases (the benchmark's anchor shapes):
  diffusion    x ``(1, 4096, 24, 128)`` bf16, interleaved, full rotary, cos/sin ``[4096, 1, 64]``
               fp32, out of place (Wan/Helios self-attention)
  llm-cached   serving: q ``[4096, 32*128]``, k ``[4096, 8*128]`` bf16, neox, positions into a
               ``[8192, 128]`` fp32 cache, in place (vLLM ``forward`` style)

For each case, implementation and device: the op-trace report (``rope_backends.testing.optrace``: ops by
kind, data-moving kernels, strided writes, violations, bytes written by all ops) and the time of
one call (``torch.utils.benchmark`` blocked_autorange medians, ``--repeats`` of them interleaved
across the implementations; the median and the range are reported). Devices: the CPU always, CUDA
(eager) when a GPU is present. The implementations are called directly (no dispatch), so the
numbers compare the op sequences, not the Python front end. ``--out`` writes one JSON per device
to ``bench/results/optrace-<device>-<date>.json``.

What this shows on a CPU or a GPU is op counts and eager timings; the NPU claim (strided writes
become ViewCopy/InplaceCopy kernels) is what the op counts stand for, and is measured only by
``bench/studies/npu_rotary_mul.py`` on a real Ascend machine. This file contains no implementation the
package ships: the strided-write form below exists only as the counter-example.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rope_backends import freqs, reference  # noqa: E402
from rope_backends.backends import npu as npu_backend  # noqa: E402
from rope_backends.testing.optrace import KINDS, record  # noqa: E402
from rope_backends.spec import RopeArgs, args_for_cached, args_for_tables  # noqa: E402
from rope_backends.testing.check import assert_bitwise_equal  # noqa: E402


def strided_write_forward(args: RopeArgs) -> tuple[Tensor, ...]:
    """The counter-example: same math as the reference (fp32, no FMA, one rounding), result
    assembled by slice assignment into ``empty_like`` (or into the input, in place)."""
    if args.cache is not None:
        cos, sin = reference.cos_sin_from_cache(args.positions, args.cache, args.position_axis_map)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    else:
        cos, sin = args.cos, args.sin
    first, second = reference.pair_slices(args.layout, args.rotary_dim)
    r = args.rotary_dim
    staged = []
    for t in args.tensors:
        a_new, b_new = reference.rotate_pairs(t[..., first], t[..., second], cos, sin, args.conjugate)
        staged.append((t, a_new.to(t.dtype), b_new.to(t.dtype)))
    outs = []
    for t, a_new, b_new in staged:  # every rotated pair is computed before the first write
        out = t if args.inplace else torch.empty_like(t)
        out[..., first] = a_new
        out[..., second] = b_new
        if not args.inplace and r < t.shape[-1]:
            out[..., r:] = t[..., r:]
        outs.append(out)
    return tuple(outs)


IMPLS: dict[str, Callable[[RopeArgs], tuple[Tensor, ...]]] = {
    "eager-reference": reference.run,
    "strided-write": strided_write_forward,
    "npu": npu_backend.forward,
}


# --------------------------------------------------------------------------------------------
# cases: each builds fresh inputs on a device and returns (args, caller tensors, minimal bytes)


def _diffusion(device: str, quick: bool):
    s, h, d = (256, 4, 128) if quick else (4096, 24, 128)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, s, h, d), generator=g).to(torch.bfloat16).to(device)
    cos, sin = freqs.cos_sin(torch.arange(s), d)  # float32 [S, D/2]
    cos, sin = cos.unsqueeze(1).to(device), sin.unsqueeze(1).to(device)  # [S, 1, D/2]
    args = args_for_tables((("x", x),), cos, sin, "interleaved", None, False)
    minimal = 2 * x.numel() * x.element_size() + 2 * cos.numel() * 4
    return args, {"x": x}, {"cos": cos, "sin": sin}, minimal, f"x{tuple(x.shape)} bf16 interleaved, out of place"


def _llm_cached(device: str, quick: bool):
    t, hq, hk, d, max_pos = (256, 8, 2, 128, 1024) if quick else (4096, 32, 8, 128, 8192)
    g = torch.Generator().manual_seed(1)
    q = torch.randn((t, hq * d), generator=g).to(torch.bfloat16).to(device)
    k = torch.randn((t, hk * d), generator=g).to(torch.bfloat16).to(device)
    positions = torch.randint(0, max_pos, (t,), generator=g).to(device)
    cache = freqs.cos_sin_cache(max_pos, d).to(device)
    args, _ = args_for_cached(q, k, positions, cache, "neox", None, None, True, d)
    minimal = 2 * (q.numel() + k.numel()) * 2 + t * d * 4 + t * 8
    return (args, {"q": q, "k": k}, {"positions": positions, "cache": cache}, minimal,
            f"q[{t}, {hq}*{d}] k[{t}, {hk}*{d}] bf16 neox, cache[{max_pos}, {d}], in place")


CASES = {"diffusion": _diffusion, "llm-cached": _llm_cached}


def _fresh(args: RopeArgs) -> RopeArgs:
    """The same call on cloned q/k (an in-place run must not feed the next one)."""
    tensors = tuple(t.clone() for t in args.tensors)
    return RopeArgs(tensors, args.inplace, args.layout, args.rotary_dim, args.conjugate,
                    args.cos, args.sin, args.positions, args.cache, args.mrope)


def _time(fn: Callable[[], object], min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark synchronises CUDA around its blocks)."""
    fn()  # warm-up (allocator, first-call costs)
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return float(m.median)


def run_device(device: str, quick: bool, min_run_time: float, repeats: int) -> dict:
    rows = []
    for case_name, make in CASES.items():
        args, callers, consts, minimal, desc = make(device, quick)
        expected = reference.run(_fresh(args))
        case_rows = []
        for impl_name, impl in IMPLS.items():
            # 1. bit-exact, on fresh inputs
            got = impl(_fresh(args))
            for i, (a, e) in enumerate(zip(got, expected)):
                assert_bitwise_equal(a, e, name=f"{case_name}/{impl_name} output {i}")
            # 2. the op trace of one call, with the caller's tensors named
            run_args = _fresh(args)
            named = dict(zip(callers, run_args.tensors))
            _, trace = record(lambda: impl(run_args), targets=named if args.inplace else None,
                              inputs=consts if args.inplace else {**consts, **named})
            summary = trace.summary()
            case_rows.append({
                "case": case_name,
                "description": desc,
                "impl": impl_name,
                "kernels": summary["kernels"],
                "by_kind": summary["by_kind"],
                "by_op": summary["by_op"],
                "strided_writes": summary["strided_writes"],
                "violations": len(summary["violations"]),
                "caller_writes": summary["caller_writes"],
                "bytes_written_by_ops": summary["bytes_written"],
                "minimal_bytes": minimal,
            })
        # 3. time, the implementations interleaved over the repeats so that drift in the
        # machine (other load, allocator state) spreads over all of them; in place, the same
        # tensors are rotated again and again (a rotation preserves the norm)
        samples: dict[str, list[float]] = {name: [] for name in IMPLS}
        for _ in range(repeats):
            for impl_name, impl in IMPLS.items():
                timed_args = _fresh(args)
                samples[impl_name].append(_time(lambda: impl(timed_args), min_run_time))
        for row in case_rows:
            times = sorted(samples[row["impl"]])
            mid = times[len(times) // 2]
            row.update({
                "median_ms": mid * 1e3,
                "min_ms": times[0] * 1e3,
                "max_ms": times[-1] * 1e3,
                "repeats_ms": [t * 1e3 for t in samples[row["impl"]]],
                "effective_GBps": minimal / mid / 1e9,
            })
        rows.extend(case_rows)
    return {
        "bench": "optrace",
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
        "quick": quick,
        "min_run_time_s": min_run_time,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    head = (f"### optrace on {result['device']} ({result['device_name']}, {result['threads']} threads, "
            f"torch {result['torch']})\n\n")
    cols = ["case", "impl", "kernels"] + [k for k in KINDS if k != "custom"] + [
        "strided writes", "violations", "MB written", "ms (median)", "ms (min-max)", "GB/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        vals = [r["case"], r["impl"], r["kernels"]] + [r["by_kind"][k] for k in KINDS if k != "custom"] + [
            r["strided_writes"], r["violations"], f"{r['bytes_written_by_ops'] / 1e6:.1f}",
            f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}-{r['max_ms']:.3f}", f"{r['effective_GBps']:.2f}"]
        lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    cases = {r["case"]: r["description"] for r in result["rows"]}
    notes = "\n".join(f"- {k}: {v}" for k, v in cases.items())
    return head + "\n".join(lines) + "\n\n" + notes + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", nargs="?", const=str(ROOT / "bench" / "results"), default=None,
                   help="write optrace-<device>-<date>.json into this directory (default bench/results)")
    p.add_argument("--devices", default=None, help="comma-separated: cpu,cuda (default: cpu, plus cuda if present)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement")
    p.add_argument("--repeats", type=int, default=5, help="measurements per implementation (median reported)")
    opts = p.parse_args(argv)
    devices = opts.devices.split(",") if opts.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped")
            continue
        result = run_device(device, opts.quick, opts.min_run_time, opts.repeats)
        results.append(result)
        print(markdown(result))
        if opts.out:
            out = Path(opts.out)
            out.mkdir(parents=True, exist_ok=True)
            suffix = "-quick" if opts.quick else ""
            path = out / f"optrace-{device}-{result['date']}{suffix}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
