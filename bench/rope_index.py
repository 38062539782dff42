"""Bench: rope_backends.positions.rope_index against the per-row/per-image loop of transformers'
``get_rope_index``, on the three setups of tests/test_positions.py (SETUPS), on the CPU and on
CUDA when a GPU is present, for both conventions:

  v4 -- the loop written from transformers 4.x (the oracle of tests/test_positions.py);
  v5 -- the installed transformers 5.x's own ``Qwen*VLModel.get_rope_index`` (skipped without it).

    python bench/rope_index.py [--out DIR] [--quick] [--devices cpu,cuda] [--variants qwen3_vl,...]
                               [--conventions v4,v5] [--paths auto,device,host] [--threads N]

For every setup, convention and device it checks every path gives the loop's tensors, times the
loop and each path of ``rope_index(path=...)`` (best of repeats; CUDA timings end with a
synchronize, so they include the syncs a path forces), and counts the host syncs of one call:
  cuda -- torch.cuda.set_sync_debug_mode("warn") warnings (every blocking device<->host copy,
          .item(), .tolist(), ...). By design: "device" 0, "host" 1 (one packed device->host copy;
          the results go back asynchronously from pinned memory), "auto" = host for inputs of at
          most positions.HOST_PATH_MAX_TOKENS tokens, device above.
  cpu  -- the host reads the torch code would make on a GPU (.item()/int()/bool() of a tensor,
          nonzero, boolean-mask indexing, .tolist(); counted with a dispatch mode). The NumPy host
          path makes no torch calls on the data, so it shows 0.
Prints a Markdown table and writes bench/results/rope_index-<device>-<date>.json (one per device).
This file contains no implementation: it imports the function from the package and the loops and
inputs from the test module.
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


def loop_for(batch, convention):
    """The baseline: the 4.x loop oracle, or the installed transformers 5.x method (None: absent)."""
    if convention == "v4":
        return lambda: T.rope_index_loop(batch.input_ids, **batch.kwargs())
    run = T.installed_get_rope_index(batch.variant)
    if run is None:
        return None
    return lambda: run(batch, batch.second_per_grid_ts)


def kwargs_for(batch, convention):
    return batch.kwargs() if convention == "v4" else T.v5_kwargs(batch)


def bench_one(name, spec, variant, device, quick, *, convention="v4", paths=("auto", "device", "host")):
    """One setup: a result row (None when the v5 baseline is unavailable). ``vectorised_ms`` /
    ``syncs_vectorised`` repeat the first path's figures (what ``python -m bench`` reads)."""
    batch = T.make_batch(**spec, variant=variant, padding="mixed", seed=1).to(device)
    loop = loop_for(batch, convention)
    if loop is None:
        return None
    kw = kwargs_for(batch, convention)
    want = loop()
    loop_iters, vec_iters, repeats = (2, 20, 3) if quick else (3, 50, 9)
    row = dict(
        setup=name, variant=variant, convention=convention, device=device, batch=spec["batch"], seq=spec["seq"],
        tokens=spec["batch"] * spec["seq"], images=spec["images"], videos=spec["videos"], frames=spec.get("frames"),
        vision_tokens=int(((batch.input_ids == T.IMAGE) | (batch.input_ids == T.VIDEO)).sum()),
        host_path_max_tokens=positions.HOST_PATH_MAX_TOKENS,
        # what path="auto" does here (CPU inputs: always the NumPy path)
        auto_takes="host" if device == "cpu" or spec["batch"] * spec["seq"] <= positions.HOST_PATH_MAX_TOKENS else "device",
        loop_ms=time_ms(loop, device, loop_iters, repeats),
    )
    count = count_cuda_syncs if device == "cuda" else count_host_reads
    row["syncs_loop"] = count(loop)
    equal = True
    for path in paths:
        fn = lambda: positions.rope_index(batch.input_ids, **kw, path=path)  # noqa: E731
        got = fn()
        equal = equal and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got))
        row[f"{path}_ms"] = time_ms(fn, device, vec_iters, repeats)
        row[f"{path}_speedup"] = row["loop_ms"] / row[f"{path}_ms"]
        row[f"syncs_{path}"] = count(fn)
    row["equal"] = bool(equal)
    row["vectorised_ms"], row["syncs_vectorised"] = row[f"{paths[0]}_ms"], row[f"syncs_{paths[0]}"]
    row["speedup"] = row["loop_ms"] / row["vectorised_ms"]
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


def table(rows, paths) -> str:
    head = "| setup | variant | conv | device | loop ms | " + " | ".join(f"{p} ms (x loop)" for p in paths)
    head += " | host syncs loop / " + " / ".join(paths) + " | equal |"
    lines = [head, "|---|---|---|---|---:|" + "---:|" * len(paths) + "---:|---|"]
    for r in rows:
        cells = " | ".join(f"{r[p + '_ms']:.3f} ({r[p + '_speedup']:.1f}x)" for p in paths)
        syncs = " / ".join(str(r[f"syncs_{p}"]) for p in ["loop"] + list(paths))
        lines.append(
            f"| {r['setup']} | {r['variant']} | {r['convention']} | {r['device']} | {r['loop_ms']:.2f} | {cells} | "
            f"{syncs} | {r['equal']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the JSON files")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 60 s on an H100 machine)")
    parser.add_argument("--devices", default=None, help="comma list of cpu,cuda (default: cpu, and cuda if present)")
    parser.add_argument("--variants", default="qwen3_vl", help="comma list of qwen3_vl,qwen2_vl,qwen2_5_vl")
    parser.add_argument("--conventions", default="v5,v4", help="comma list of v5 (transformers 5.x), v4 (4.x)")
    parser.add_argument("--paths", default="auto,device,host", help="comma list of rope_index paths to time")
    parser.add_argument("--setups", default=None, help=f"comma list of {', '.join(T.SETUPS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 keeps the loop's many small ops stable on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    variants, conventions, paths = args.variants.split(","), args.conventions.split(","), args.paths.split(",")
    setups = args.setups.split(",") if args.setups else list(T.SETUPS)
    for flag, values, allowed in (("--variants", variants, positions.VARIANTS),
                                  ("--conventions", conventions, positions.CONVENTIONS),
                                  ("--paths", paths, positions.PATHS), ("--setups", setups, tuple(T.SETUPS)),
                                  ("--devices", devices, ("cpu", "cuda"))):
        for v in values:
            if v not in allowed:
                parser.error(f"{flag}: expected names from {allowed}, got {v!r}")
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices: cuda requested, but torch sees no CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    all_rows, skipped = [], []
    for device in devices:
        rows = []
        for conv in conventions:
            for v in variants:
                for n in setups:
                    row = bench_one(n, T.SETUPS[n], v, device, args.quick, convention=conv, paths=paths)
                    if row is None:
                        skipped.append((conv, v, n))
                    else:
                        rows.append(row)
        all_rows += rows
        label = device
        if device == "cuda":
            label = "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
        path = out / f"rope_index-{label}-{date}.json"
        path.write_text(json.dumps(dict(
            bench="rope_index", date=date, quick=args.quick, environment=environment(device), results=rows,
        ), indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    print(table(all_rows, paths))
    if skipped:
        print(f"skipped (no transformers 5.x for the v5 baseline): {sorted(set(skipped))}", file=sys.stderr)
    bad = [r for r in all_rows if not r["equal"]]
    if bad:
        print(f"NOT EQUAL: {[(r['setup'], r['convention'], r['device']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
