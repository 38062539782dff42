"""Study: rope_backends.positions.rope_index against the per-row/per-image loop of transformers'
``get_rope_index``, on the benchmark's three setups, on the CPU and on CUDA when a GPU is present,
for both conventions:

  v4 -- the loop written from transformers 4.x (the oracle of tests/test_positions.py);
  v5 -- the installed transformers 5.x's own ``Qwen*VLModel.get_rope_index`` (skipped without it).

    python bench/studies/rope_index.py [--out DIR] [--quick] [--devices cpu,cuda] [--variants qwen3_vl,...]
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
The loop, the batches, the setups and the measurement are rope_backends.benchmark.rope_index (the
engine's rope_index group runs the same in quick mode); this file only chooses and reports.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rope_backends import positions  # noqa: E402
from rope_backends.benchmark.rope_index import SETUPS, bench_one  # noqa: E402


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
    parser.add_argument("--setups", default=None, help=f"comma list of {', '.join(SETUPS)} (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 keeps the loop's many small ops stable on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    variants, conventions, paths = args.variants.split(","), args.conventions.split(","), args.paths.split(",")
    setups = args.setups.split(",") if args.setups else list(SETUPS)
    for flag, values, allowed in (("--variants", variants, positions.VARIANTS),
                                  ("--conventions", conventions, positions.CONVENTIONS),
                                  ("--paths", paths, positions.PATHS), ("--setups", setups, tuple(SETUPS)),
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
                    row = bench_one(n, SETUPS[n], v, device, args.quick, convention=conv, paths=paths)
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
