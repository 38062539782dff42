"""One-off study: the program order of q+k launches (kernel.py's ``QK_BY_ROW``) and the tile, on a GPU.

    python bench/studies/qk_order.py [--out DIR] [--jobs N]

With q and k in one launch the programs either take all of q's tiles, then all of k's
(``QK_BY_ROW`` off), or run row block by row block, each row block's q tiles then its k tiles
(on: the order of Liger-Kernel's one-program-per-token kernel). For the ``qk`` group's shapes of
``python -m rope_backends bench`` (neox, in place, bf16) and serving prefill (``apply_cached``),
every candidate tile of ``python -m rope_backends tune`` is compiled in both orders, checked bit
for bit against the reference, and timed the tuner's way; Liger-Kernel (when importable) is timed
on the same inputs beside them. Writes ``qk-order-study.json`` to ``--out`` and prints a table.

``--timing``: instead, the same calls (this library's default plan, a few tiles, Liger-Kernel, a
copy of as many bytes) on the q+k shapes, each timed three ways in alternating rounds: do_bench
(L2 flushed before each call) on one input set, do_bench cycling through input sets (what
``python -m rope_backends bench`` does), and CUDA-graph replays over input sets (the tuner's way
below 64 MB). Writes ``qk-timing-study.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rope_backends.backends.triton import launch, tune, tuning  # noqa: E402
from rope_backends.benchmark import report  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402

W = tune.Workload
WORKLOADS = (
    W("q+k 115200 x 24/8", "apply_qk", (1, 115200, 24, 128), 8, inplace=True),
    W("q+k 32760 x 12/4", "apply_qk", (1, 32760, 12, 128), 4, inplace=True),
    W("q+k 2 x 4096 x 24/8", "apply_qk", (2, 4096, 24, 128), 8, inplace=True),
    W("serving T=16384, 32/8", "apply_cached", (16384, 32, 128), 8, inplace=True),
    W("serving T=4096, 32/8", "apply_cached", (4096, 32, 128), 8, inplace=True),
)
ORDERS = (False, True)


def _tiles(w, device, sms) -> list[tuning.Tile]:
    d = tune._inputs(w, device, 0)
    shape = tune._shape_of(w, d)
    size = shape.shape_class().size
    tiles = {tuning.concrete(shape, p, sms) for p in tune.candidates(size, False)}
    tiles.add(tuning.tile_for(shape, device))
    return sorted(tiles)


def _compile(job) -> int:
    index, items = job
    torch.cuda.set_device(index)
    device = torch.device("cuda", index)
    for w, tiles in items:
        d = tune._inputs(w, device, 0)
        call = tune._call(w, d)
        for tile in tiles:
            for order in ORDERS:
                launch.set_config(*tile, qk_by_row=order)
                call()
    torch.cuda.synchronize()
    return 0


def _liger_us(w, sets) -> float | None:
    if w.op != "apply_qk":
        return None
    try:
        fns = [_liger_call(d) for d in sets]
    except ImportError:
        return None
    return tune._time_us(fns, tune._bytes(w))


def _liger_call(d):
    from liger_kernel.ops.rope import LigerRopeFunction

    cos = torch.cat((d["cos"][:, 0], d["cos"][:, 0]), -1)[None].contiguous()
    sin = torch.cat((d["sin"][:, 0], d["sin"][:, 0]), -1)[None].contiguous()
    q4, k4 = d["q"].transpose(1, 2), d["k"].transpose(1, 2)
    return lambda: LigerRopeFunction.apply(q4, k4, cos, sin)


def timing_methods(out: Path) -> None:
    from triton.testing import do_bench

    device = torch.device("cuda", torch.cuda.current_device())
    rows = []
    for w in WORKLOADS[:3]:
        sets = [tune._inputs(w, device, s) for s in range(4)]
        nbytes = tune._bytes(w)
        half = nbytes // 4  # elements of a bf16 copy moving nbytes (read + written)
        src = [torch.empty(half, dtype=torch.bfloat16, device=device) for _ in sets]
        dst = [torch.empty_like(t) for t in src]
        # name -> (forced tile or None, call maker)
        makers = {"rb default": (None, lambda d: tune._call(w, d))}
        for tile in ((1, 8, 2), (2, 4, 1), (8, 4, 4), (2, 8, 4)):
            makers[f"rb tile {tile}"] = (tile, lambda d: tune._call(w, d))
        try:
            _liger_call(sets[0])
            makers["liger"] = (None, _liger_call)
        except Exception as exc:
            print(f"liger: {exc}")
        results = {}
        for rnd in range(3):
            for name, (tile, make) in makers.items():
                if tile is not None:
                    launch.set_config(*tile)
                fns = [make(d) for d in sets]
                fns[0]()  # compile and plan outside the timed calls
                ring = iter(range(1 << 30))
                rotating = lambda: fns[next(ring) % len(fns)]()  # noqa: E731
                r = results.setdefault(name, {"one_set": [], "rotating": [], "graph": []})
                r["one_set"].append(1e3 * do_bench(fns[0], warmup=10, rep=50, return_mode="median"))
                r["rotating"].append(1e3 * do_bench(rotating, warmup=10, rep=50, return_mode="median"))
                r["graph"].append(tune.graph_us(fns))
                launch.set_config(None)
            copies = [lambda s=s, t=t: t.copy_(s) for s, t in zip(src, dst)]
            ring2 = iter(range(1 << 30))
            r = results.setdefault("copy-same-bytes", {"one_set": [], "rotating": [], "graph": []})
            r["one_set"].append(1e3 * do_bench(copies[0], warmup=10, rep=50, return_mode="median"))
            r["rotating"].append(1e3 * do_bench(lambda: copies[next(ring2) % 4](), warmup=10, rep=50,
                                                return_mode="median"))
            r["graph"].append(tune.graph_us(copies))
        print(f"{w.name}: median of 3 rounds, µs (one set / rotating sets / graph replay)")
        for name, r in results.items():
            med = {k: sorted(v)[1] for k, v in r.items()}
            print(f"  {name:24s} {med['one_set']:8.2f} {med['rotating']:8.2f} {med['graph']:8.2f}", flush=True)
        rows.append({"workload": w.name, "bytes": nbytes, "results": results})
        del sets, src, dst
    report.write_study({"rows": rows}, out, "qk-timing-study.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--timing", action="store_true", help="compare timing methods instead (see above)")
    args = parser.parse_args()
    if args.timing:
        timing_methods(Path(args.out))
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    plan = [(w, _tiles(w, device, sms)) for w in WORKLOADS]
    chunks = [[] for _ in range(args.jobs)]
    n = 0
    for w, tiles in plan:
        for t in tiles:
            chunks[n % args.jobs].append((w, [t]))
            n += 1
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        list(pool.imap_unordered(_compile, [(device.index, c) for c in chunks if c]))
    rows = []
    for w, tiles in plan:
        sets = [tune._inputs(w, device, s) for s in range(tune._sets(w, device))]
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sets[0].items()}
        want = tune._reference(w, fresh)
        launch.set_config(None)
        default_tile = launch.plan_for(tune.rope_args(w, fresh, w.inplace)).tile
        timed = {}
        for tile in tiles:
            for order in ORDERS:
                launch.set_config(*tile, qk_by_row=order)
                check = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in fresh.items()}
                got = [t for t in tune._call(w, check)() if t is not None]
                exact = not any(bool(bitwise_mismatches(g, r).any()) for g, r in zip(got, want))
                us = tune._time_us([tune._call(w, s) for s in sets], tune._bytes(w)) if exact else None
                timed[(tuple(tile), order)] = us
                if not exact:
                    print(f"{w.name}: tile {tuple(tile)} order {order}: NOT bit-exact")
        launch.set_config(None)
        liger = _liger_us(w, sets)
        best = {o: min((us, t) for (t, oo), us in timed.items() if oo == o and us is not None) for o in ORDERS}
        row = {"workload": w.name, "bytes": tune._bytes(w), "default_tile": list(default_tile),
               "default_us": {str(o): timed.get((tuple(default_tile), o)) for o in ORDERS},
               "best": {str(o): {"us": best[o][0], "tile": list(best[o][1])} for o in ORDERS},
               "liger_us": liger,
               "tried": [[*t, o, us] for (t, o), us in timed.items()]}
        rows.append(row)
        d0, d1 = row["default_us"]["False"], row["default_us"]["True"]
        print(f"{w.name:24s} default {tuple(default_tile)}: tensors {d0:8.2f}  rows {d1:8.2f} | best tensors "
              f"{best[False][0]:8.2f} {best[False][1]}  rows {best[True][0]:8.2f} {best[True][1]} | liger "
              f"{'-' if liger is None else f'{liger:8.2f}'}", flush=True)
        del sets, fresh, want
    report.write_study({"timing": "rope_backends tune's (do_bench median >= 64 MB, else CUDA-graph replays over "
                                  "input sets that leave L2)", "rows": rows}, args.out, "qk-order-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
