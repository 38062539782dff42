"""``python -m rope_backends tune``: measure this GPU's best tile per shape class and save it.

For every shape class in :data:`WORKLOADS` (one representative call each: diffusion video tensors,
q+k training shapes, serving prefill and decode) the tuner

1. lists candidate :class:`~.tuning.TileParams` and keeps those that give distinct tiles here;
2. compiles them first, in worker processes (``--jobs``; Triton's on-disk cache then serves the
   timing process), since compiling, not timing, is what takes the time;
3. checks every candidate's output bit for bit against the eager reference on the same CUDA
   tensors (a tile that is not exact is reported and never chosen);
4. times each (``triton.testing.do_bench`` median for calls of 64 MB and more, else CUDA-graph
   replays of calls cycling through enough input sets to leave L2) next to the rule's tile;
5. writes a table (:mod:`.tuning`'s format: class -> params, with the measured times) to the
   user's cache directory, or ``--out``; every later process on this GPU reads it on first use.

It takes a few minutes on one GPU (``--quick``: fewer candidates). It never runs by itself: a
call to rb.apply never times anything.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import tuning

__all__ = ["WORKLOADS", "Workload", "main", "candidates"]


@dataclass(frozen=True)
class Workload:
    """One representative call of a shape class."""

    name: str
    op: str                     # apply | apply_qk | apply_cached
    q: tuple[int, ...]          # [..., heads, head_dim]
    k_heads: int = 0            # apply_qk / apply_cached: k's heads (0: no k)
    layout: str = "neox"
    inplace: bool = False
    dtype: str = "bfloat16"
    mrope: tuple[int, int, int] | None = None   # apply_cached: Qwen3-VL interleaved sections, 3-row positions

    @property
    def tokens(self) -> int:
        return math.prod(self.q[:-2])


WORKLOADS = (
    # diffusion / video: one tensor, cos/sin [S, 1, D/2]
    Workload("video 115k x 24 heads, interleaved", "apply", (1, 115200, 24, 128), layout="interleaved"),
    Workload("video 115k x 24 heads, neox", "apply", (1, 115200, 24, 128)),
    Workload("video 4k x 2 x 24 heads, interleaved", "apply", (2, 4096, 24, 128), layout="interleaved"),
    Workload("video 4k x 32 heads d64, interleaved", "apply", (1, 4096, 32, 64), layout="interleaved"),
    Workload("4k x 4 heads, interleaved", "apply", (4096, 4, 128), layout="interleaved"),
    # training-style q + k in place
    Workload("q+k 115k x 24/8 heads, neox in place", "apply_qk", (1, 115200, 24, 128), 8, inplace=True),
    Workload("q+k 32k x 12/4 heads, neox in place", "apply_qk", (1, 32760, 12, 128), 4, inplace=True),
    Workload("q+k 2 x 4k x 24/8 heads, neox in place", "apply_qk", (2, 4096, 24, 128), 8, inplace=True),
    Workload("q+k 2 x 4k x 32/8 heads, neox", "apply_qk", (2, 4096, 32, 128), 8),
    Workload("q+k 1k x 8/2 heads, neox", "apply_qk", (1024, 8, 128), 2),
    Workload("q+k decode 16 x 32/8 heads", "apply_qk", (16, 32, 128), 8),
    # serving: positions into a cache, in place on [T, H, D] views
    Workload("serving T=16384, 32/8 heads", "apply_cached", (16384, 32, 128), 8, inplace=True),
    Workload("serving T=4096, 32/8 heads", "apply_cached", (4096, 32, 128), 8, inplace=True),
    Workload("serving T=256, 32/8 heads", "apply_cached", (256, 32, 128), 8, inplace=True),
    Workload("serving decode T=1, 32/8 heads", "apply_cached", (1, 32, 128), 8, inplace=True),
    Workload("serving decode T=16, 32/8 heads", "apply_cached", (16, 32, 128), 8, inplace=True),
    # multimodal: three position rows, random on every row
    Workload("MRoPE T=16384, 32/8 heads", "apply_cached", (16384, 32, 128), 8, inplace=True, mrope=(24, 20, 20)),
    Workload("MRoPE T=4096, 32/8 heads", "apply_cached", (4096, 32, 128), 8, inplace=True, mrope=(24, 20, 20)),
)


def candidates(size: str, quick: bool) -> list[tuning.TileParams]:
    if size == "decode":
        units, heads, vecs = (1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 32), (16,)
    elif size == "small":
        units, heads, vecs = (2, 4, 8, 16, 32), (1, 4, 8), (16,)
    else:
        units, heads, vecs = (4, 8, 16, 32), (1, 2, 4, 8), (16, 32)
    if quick:
        units, heads, vecs = units[1::2] or units, heads[::2], vecs[-2:] if len(vecs) > 1 else vecs
    return [tuning.TileParams(u, h, v) for u in units for h in heads if h <= u or size == "decode" for v in vecs]


# --------------------------------------------------------------------------------------------
# calls

def _inputs(w: Workload, device: torch.device, seed: int) -> dict:
    import rope_backends as rb

    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, w.dtype)
    d = w.q[-1]
    q = torch.randn(w.q, generator=g, device=device).to(dtype)
    k = None
    if w.k_heads:
        k = torch.randn((*w.q[:-2], w.k_heads, d), generator=g, device=device).to(dtype)
    seq = w.q[-3] if len(w.q) >= 3 else 1
    if w.op == "apply_cached":
        max_pos = 32768
        if w.mrope is not None:
            pos = torch.randint(0, max_pos, (3, w.tokens), generator=g, device=device)
            return {"q": q, "k": k, "positions": pos, "cache": _cache(device, max_pos, d),
                    "mrope": rb.mrope.interleaved(list(w.mrope))}
        pos = (torch.arange(w.tokens, device=device) * 7 + 13 + seed) % max_pos
        return {"q": q, "k": k, "positions": pos, "cache": _cache(device, max_pos, d), "mrope": None}
    cos, sin = rb.cos_sin(torch.arange(seq) + seed, d)
    return {"q": q, "k": k, "cos": cos.to(device)[:, None], "sin": sin.to(device)[:, None]}


_CACHES: dict = {}


def _cache(device, max_pos, d):
    import rope_backends as rb

    key = (str(device), max_pos, d)
    if key not in _CACHES:
        _CACHES[key] = rb.cos_sin_cache(max_pos, d, device=device)
    return _CACHES[key]


def _call(w: Workload, d: dict) -> Callable[[], tuple]:
    import rope_backends as rb

    if w.op == "apply":
        return lambda: (rb.apply(d["q"], d["cos"], d["sin"], layout=w.layout, inplace=w.inplace, backend="triton"),)
    if w.op == "apply_qk":
        return lambda: rb.apply_qk(d["q"], d["k"], d["cos"], d["sin"], layout=w.layout, inplace=w.inplace,
                                   backend="triton")
    return lambda: rb.apply_cached(d["q"], d["k"], d["positions"], d["cache"], layout=w.layout,
                                   mrope=d["mrope"], inplace=w.inplace, backend="triton")


def rope_args(w: Workload, d: dict, inplace: bool):
    """The RopeArgs of workload ``w``'s call on the input set ``d``."""
    from ...contract import Layout, RopeArgs

    tensors = (d["q"],) if d["k"] is None else (d["q"], d["k"])
    if w.op == "apply_cached":
        return RopeArgs(tensors, inplace, Layout(w.layout), w.q[-1], positions=d["positions"], cache=d["cache"],
                        mrope=d["mrope"])
    return RopeArgs(tensors, inplace, Layout(w.layout), w.q[-1], cos=d["cos"], sin=d["sin"])


def _reference(w: Workload, d: dict) -> tuple:
    from ... import reference

    return reference.run(rope_args(w, d, False))


def _bytes(w: Workload) -> int:
    e = torch.finfo(getattr(torch, w.dtype)).bits // 8
    elems = math.prod(w.q) + (math.prod(w.q[:-2]) * w.k_heads * w.q[-1])
    rows = 3 if w.mrope else 1
    side = (rows * w.tokens * 8 + rows * w.tokens * w.q[-1] * 4) if w.op == "apply_cached" else 2 * w.q[-3 if len(w.q) >= 3 else 0] * w.q[-1] // 2 * 4
    return 2 * elems * e + side


def _shape_of(w: Workload, d: dict) -> tuning.Shape:
    from .launch import plan_for

    plan = plan_for(rope_args(w, d, w.inplace))
    v = plan.values
    heads = (v["q_heads"],) + ((v["k_heads"],) if v["HAS_K"] else ())
    kind = "table" if w.op != "apply_cached" else ("mrope" if v["MROPE"] else "cached")
    return tuning.Shape(kind, w.layout == "interleaved",
                        d["q"].element_size(), w.q[-1], w.q[-1], v["COPY_PASS"], v["rows"], heads,
                        v["COS_PER_HEAD"])


# --------------------------------------------------------------------------------------------
# timing

def _time_us(fns: Sequence[Callable], nbytes: int) -> float:
    """Median µs per call: do_bench for calls of 64 MB and more; CUDA-graph replays of 20 calls
    cycling over ``fns`` (distinct input sets) otherwise."""
    from triton.testing import do_bench

    if nbytes >= 64 << 20:
        return 1e3 * do_bench(fns[0], warmup=10, rep=40, return_mode="median")
    return graph_us(fns)


def graph_us(fns: Sequence[Callable], calls: int = 20) -> float:
    """Median µs per call of CUDA-graph replays of ``calls`` calls cycling over ``fns``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for i in range(3):
            fns[i % len(fns)]()
        with torch.cuda.graph(graph):
            for i in range(calls):
                fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _sets(w: Workload, device) -> int:
    per = _bytes(w)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if hasattr(
        torch.cuda.get_device_properties(device), "L2_cache_size") else 50 << 20
    return 1 if per >= 64 << 20 else min(20, max(2, -(-2 * l2 // per)))


# --------------------------------------------------------------------------------------------
# compile in worker processes

def _compile_worker(job: tuple) -> str:
    index, items = job
    torch.cuda.set_device(index)
    from . import launch

    device = torch.device("cuda", index)
    done = 0
    for w, tiles in items:
        d = _inputs(w, device, 0)
        call = _call(w, d)
        for tile in tiles:
            launch.set_config(*tile)
            call()
            done += 1
        del d
    launch.set_config(None)
    torch.cuda.synchronize()
    return f"{done}"


def _progress(done: int, total: int, label: str, t0: float) -> None:
    width = 30
    n = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * n}{'.' * (width - n)}] {done}/{total} {label[:48]:<48} {time.perf_counter() - t0:5.0f} s")
    sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# the run

def tune(device: torch.device, *, quick: bool = False, jobs: int = 0, only: Sequence[str] = (),
         log=print) -> dict:
    """Tune every workload on ``device``; returns the table document (see :mod:`.tuning`)."""
    from . import launch
    from ...testing.check import bitwise_mismatches

    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    props = torch.cuda.get_device_properties(index)
    sms = props.multi_processor_count
    workloads = [w for w in WORKLOADS if not only or any(o in w.name for o in only)]
    plan: list[tuple[Workload, tuning.Shape, dict]] = []
    for w in workloads:
        d = _inputs(w, device, 0)
        shape = _shape_of(w, d)
        cls = shape.shape_class()
        tiles: dict[tuning.Tile, list[tuning.TileParams]] = {}
        for p in candidates(cls.size, quick):
            tiles.setdefault(tuning.concrete(shape, p, sms), []).append(p)
        rule_tile = tuning.concrete(shape, tuning.rule(cls), sms)
        tiles.setdefault(rule_tile, []).append(tuning.rule(cls))
        plan.append((w, shape, {"tiles": tiles, "rule": rule_tile}))
        del d
    total = sum(len(p[2]["tiles"]) for p in plan)
    log(f"tune: {len(plan)} workloads, {total} distinct tiles on {props.name} ({sms} SMs)")
    t0 = time.perf_counter()
    jobs = jobs or min(8, os.cpu_count() or 1)
    if jobs > 1:
        items = [(w, list(p["tiles"])) for w, _, p in plan]
        chunks = [items[i::jobs] for i in range(jobs)]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(jobs) as pool:
            for n, _ in enumerate(pool.imap_unordered(_compile_worker, [(index, c) for c in chunks if c])):
                _progress(n + 1, len([c for c in chunks if c]), "compiling (worker processes)", t0)
        sys.stderr.write("\n")
        log(f"tune: compiled in {time.perf_counter() - t0:.0f} s")
    by_class: dict[tuning.ShapeClass, list[tuple[dict, dict, float]]] = {}
    done = 0
    results = []
    for w, shape, p in plan:
        cls = shape.shape_class()
        sets = [_inputs(w, device, s) for s in range(_sets(w, device))]
        fresh = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sets[0].items()}
        want = _reference(w, fresh)
        timed = {}
        for tile in p["tiles"]:
            launch.set_config(*tile)
            check = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in fresh.items()}
            got = [t for t in _call(w, check)() if t is not None]
            if any(bool(bitwise_mismatches(g, r).any()) for g, r in zip(got, want)):
                log(f"\ntune: {w.name}: tile {tuple(tile)} is NOT bit-exact: never chosen")
                timed[tile] = None
            else:
                timed[tile] = _time_us([_call(w, s) for s in sets], _bytes(w))
            done += 1
            _progress(done, total, w.name, t0)
        launch.set_config(None)
        ok = {t: us for t, us in timed.items() if us is not None}
        best = min(ok, key=ok.get)
        rule_us = timed.get(p["rule"])
        results.append({
            "workload": w.name, "class": cls.label(), "best_tile": list(best), "best_us": round(ok[best], 3),
            "rule_tile": list(p["rule"]), "rule_us": None if rule_us is None else round(rule_us, 3),
            "gbps": round(_bytes(w) / ok[best] / 1e3, 1),
            "tried": [[*t, None if us is None else round(us, 3)] for t, us in timed.items()]})
        # params -> this workload's time with the tile they give here
        per_params = {prm: ok.get(t) for t, prms in p["tiles"].items() for prm in prms}
        by_class.setdefault(cls, []).append((per_params, ok, ok[best]))
        del sets, fresh, want
    entries = {}
    for cls, runs in by_class.items():
        # the params that do best over the class's workloads: the least geometric mean of
        # (time / that workload's best time); params a workload did not try do not compete
        common = set.intersection(*(set(k for k, v in per.items() if v is not None) for per, _, _ in runs))
        score = {prm: math.exp(sum(math.log(per[prm] / best) for per, _, best in runs) / len(runs)) for prm in common}
        chosen = min(score, key=lambda prm: (score[prm], prm != tuning.rule(cls)))
        entries[cls] = {"params": chosen, "slowdown_vs_best": round(score[chosen], 4),
                        "rule_slowdown": (round(score[tuning.rule(cls)], 4) if tuning.rule(cls) in score else None),
                        "workloads": len(runs)}
    sys.stderr.write("\n")
    doc = {
        "schema": tuning.SCHEMA,
        "tile_format": tuning.TILE_FORMAT,
        "device": {"key": tuning.device_key(props=props), "name": props.name,
                   "capability": [props.major, props.minor], "sms": sms,
                   "l2_bytes": getattr(props, "L2_cache_size", 0)},
        "versions": _versions(),
        "measured": _dt.date.today().isoformat(),
        "command": "python -m rope_backends tune" + (" --quick" if quick else ""),
        "seconds": round(time.perf_counter() - t0, 1),
        "entries": [tuning.entry_doc(cls, e["params"], **{k: v for k, v in e.items() if k != "params"})
                    for cls, e in entries.items()],
        "workloads": results,
    }
    return doc


def _versions() -> dict:
    import triton

    import rope_backends

    return {"torch": torch.__version__, "triton": triton.__version__, "rope_backends": rope_backends.__version__}


def table_markdown(doc: dict) -> str:
    lines = ["| workload | class | tuned tile (T, H, warps) | µs | GB/s | rule's tile | µs | tuned vs rule |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in doc["workloads"]:
        rule = r["rule_us"]
        delta = f"{(rule / r['best_us'] - 1) * 100:+.1f} %" if rule else "-"
        lines.append(f"| {r['workload']} | {r['class']} | {tuple(r['best_tile'])} | {r['best_us']:.2f} | {r['gbps']:.0f} "
                     f"| {tuple(r['rule_tile'])} | {'-' if rule is None else f'{rule:.2f}'} | {delta} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rope_backends tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the GPU to tune (default: the current one)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="write the table here (default: the user cache file this GPU's calls read)")
    parser.add_argument("--quick", action="store_true", help="fewer candidates (about a third of the time)")
    parser.add_argument("--jobs", type=int, default=0, help="compile worker processes (default: min(8, cores))")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="only workloads whose name contains TEXT (repeatable)")
    args = parser.parse_args(argv)
    from . import probe

    reason = probe()
    if reason is not None or not torch.cuda.is_available():
        print(f"tune: needs a CUDA or ROCm GPU with triton: {reason or 'no GPU visible'}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"tune: --device: expected a cuda device, got {args.device!r}", file=sys.stderr)
        return 2
    doc = tune(device, quick=args.quick, jobs=args.jobs, only=args.only)
    path = Path(args.out) if args.out else tuning.user_table_path(doc["device"]["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    tuning.reload()
    print(table_markdown(doc))
    print(f"\ntune: wrote {path} ({len(doc['entries'])} classes, {doc['seconds']:.0f} s); "
          f"calls on {doc['device']['name']} read it from the next process on")
    return 0
