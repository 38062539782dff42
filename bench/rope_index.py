"""Bench: rope_backends.positions.rope_index (vectorised) vs the per-row/per-image loop of
transformers 4.x ``get_rope_index`` (the oracle of tests/test_positions.py), on the three setups of
issue 5, on the CPU and on CUDA when a GPU is present.

    python bench/rope_index.py [--out DIR] [--quick] [--devices cpu,cuda] [--variants qwen3_vl,...] [--threads N]

For every setup and device it checks the two give identical tensors, times both (best of
repeats; CUDA timings include the syncs the loop forces and end with a synchronize), and counts
host syncs of one call:
  cuda  -- torch.cuda.set_sync_debug_mode("warn") warnings (every blocking device->host read);
  cpu   -- the host reads the same code would make on a GPU: .item()/int()/bool() of a tensor,
           nonzero/argwhere, boolean-mask indexing, .tolist() (counted with a dispatch mode and a
           .tolist wrapper). The CPU vectorised timing is the NumPy host path; its sync column
           shows the torch device path (the one GPU tensors take), which makes no host read.
On CUDA it also times the "copy in, host path, copy out" alternative (one device->host transfer of
the inputs and one host->device transfer of the result).
Prints a Markdown table and writes bench/results/rope_index-<device>-<date>.json (one per device).
This file contains no implementation: it imports both from the package and the test module.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rope_backends import positions  # noqa: E402


def _load_tests():
    """tests/test_positions.py by path: make_batch, SETUPS and the loop oracle live there."""
    spec = importlib.util.spec_from_file_location("_rope_index_tests", ROOT / "tests" / "test_positions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


T = _load_tests()
_READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in _READ_OPS:
            self.count += 1
        elif name == "index" and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(fn) -> int:
    """CPU: host reads the code makes (what would be syncs on a GPU)."""
    real_tolist = torch.Tensor.tolist
    calls = [0]

    def tolist(self):
        calls[0] += 1
        return real_tolist(self)

    torch.Tensor.tolist = tolist
    try:
        with _HostReads() as mode:
            fn()
    finally:
        torch.Tensor.tolist = real_tolist
    return mode.count + calls[0]


def count_cuda_syncs(fn) -> int:
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def time_ms(fn, device: str, iters: int, repeats: int) -> float:
    """Best over ``repeats`` of the mean time of ``iters`` back-to-back calls (the minimum is the
    sample least disturbed by other work on the machine, as timeit advises)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / iters * 1e3)
    return min(samples)


def device_path(batch):
    kw = batch.kwargs(validate=False)
    return T.device_path(batch.input_ids, **kw)


def bench_one(name, spec, variant, device, quick):
    batch = T.make_batch(**spec, variant=variant, padding="mixed", seed=1).to(device)
    loop = lambda: T.rope_index_loop(batch.input_ids, **batch.kwargs())  # noqa: E731
    vec = lambda: positions.rope_index(batch.input_ids, **batch.kwargs())  # noqa: E731
    want, got = loop(), vec()
    equal = all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got))
    if device == "cpu":
        equal = equal and all(torch.equal(a, b) for a, b in zip(want, device_path(batch)))
    loop_iters, vec_iters, repeats = (2, 20, 3) if quick else (3, 50, 9)
    row = dict(
        setup=name,
        variant=variant,
        device=device,
        batch=spec["batch"],
        seq=spec["seq"],
        images=spec["images"],
        videos=spec["videos"],
        frames=spec.get("frames"),
        vision_tokens=int(((batch.input_ids == T.IMAGE) | (batch.input_ids == T.VIDEO)).sum()),
        equal=bool(equal),
        loop_ms=time_ms(loop, device, loop_iters, repeats),
        vectorised_ms=time_ms(vec, device, vec_iters, repeats),
    )
    row["speedup"] = row["loop_ms"] / row["vectorised_ms"]
    if device == "cuda":
        row["syncs_loop"] = count_cuda_syncs(loop)
        row["syncs_vectorised"] = count_cuda_syncs(vec)

        def roundtrip():
            host = batch.to("cpu")
            pos, deltas = positions.rope_index(host.input_ids, **host.kwargs())
            return pos.to(device), deltas.to(device)

        row["copy_host_copy_ms"] = time_ms(roundtrip, device, vec_iters, repeats)
        row["syncs_copy_host_copy"] = count_cuda_syncs(roundtrip)
    else:
        row["syncs_loop"] = count_host_reads(loop)
        row["syncs_vectorised"] = count_host_reads(lambda: device_path(batch))
    return row


def environment(device: str) -> dict:
    env = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        # other work on the machine inflates the loop far more than the vectorised path
        load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    )
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def table(rows) -> str:
    lines = [
        "| setup | variant | device | loop ms | vectorised ms | speedup | host syncs loop | host syncs vectorised | equal |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['variant']} | {r['device']} | {r['loop_ms']:.2f} | {r['vectorised_ms']:.3f} | "
            f"{r['speedup']:.1f}x | {r['syncs_loop']} | {r['syncs_vectorised']} | {r['equal']} |"
        )
    extra = [r for r in rows if "copy_host_copy_ms" in r]
    if extra:
        lines.append("")
        lines.append("| setup | variant | cuda: copy in + host path + copy out ms | its syncs |")
        lines.append("|---|---|---:|---:|")
        for r in extra:
            lines.append(f"| {r['setup']} | {r['variant']} | {r['copy_host_copy_ms']:.3f} | {r['syncs_copy_host_copy']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON files")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 60 s on an H100 machine)")
    parser.add_argument("--devices", default=None, help="comma list of cpu,cuda (default: cpu, and cuda if present)")
    parser.add_argument("--variants", default="qwen3_vl", help="comma list of qwen3_vl,qwen2_vl,qwen2_5_vl")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 keeps the loop's many small ops stable on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    variants = args.variants.split(",")
    for v in variants:
        if v not in positions.VARIANTS:
            parser.error(f"--variants: expected names from {positions.VARIANTS}, got {v!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    all_rows = []
    for device in devices:
        rows = [bench_one(n, s, v, device, args.quick) for v in variants for n, s in T.SETUPS.items()]
        all_rows += rows
        label = device
        if device == "cuda":
            label = "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        path = out / f"rope_index-{label}-{date}.json"
        path.write_text(json.dumps(dict(
            bench="rope_index", date=date, quick=args.quick, environment=environment(device), results=rows,
        ), indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    print(table(all_rows))
    bad = [r for r in all_rows if not r["equal"]]
    if bad:
        print(f"NOT EQUAL: {[(r['setup'], r['device']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
