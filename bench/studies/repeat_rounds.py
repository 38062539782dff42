"""One-off study: how much of a side-by-side ratio is run-to-run noise, on a GPU.

    python bench/studies/repeat_rounds.py [--out DIR] [--rounds N]

``python -m rope_backends bench`` times each implementation once per run (a median of many calls),
so a ratio between two implementations carries whatever differs between their moments and their
buffers. Here the ratios the issue's targets are judged on are measured over many alternating
rounds, every round on freshly allocated inputs (new addresses):

* q+k in place (the ``qk`` group's shapes): this library vs Liger-Kernel vs a copy of as many
  bytes, do_bench and the device kernels' time;
* decode (T = 16, ``llm`` group, apply_qk and apply_cached): CUDA-graph replay of this library's
  shipped tile and of a few larger tiles (fewer programs) vs an empty Triton launch.

Prints the median, min and max of each ratio over the rounds; writes ``repeat-rounds-study.json``.
``--engine``: instead, the benchmark engine's ``run_case`` on q+k 4096x24/8 with the implementations
in several orders and subsets (``engine-orders-study.json``). ``--state``: this library vs Liger on
q+k 4096x24/8 after idle time and after torch.compile ran (``gpu-state-study.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.benchmark import baselines, implementations, report, scenarios  # noqa: E402
from rope_backends.benchmark.timing import Clock, buffers, rotating  # noqa: E402

QK = ("q+k 115200x24/8", "q+k 32760x12/4", "q+k 4096x24/8")
DECODE_TILES = (None, (1, 2, 1), (1, 4, 1), (1, 8, 1), (1, 8, 2), (2, 8, 2), (4, 8, 4))


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def _impls(case, device) -> dict:
    return {i.name: i for i in implementations.for_case(case, device, ["triton"],
                                                         implementations.Options(progress=False))}


def qk_rounds(device, clock, rounds: int) -> list[dict]:
    out = []
    for case in scenarios.cases("qk", "gpu", device):
        if case.scenario not in QK:
            continue
        impls = _impls(case, device)
        names = [n for n in ("triton", "liger-kernel") if n in impls]
        times: dict = {n: {"do_bench": [], "kernels": []} for n in names + ["copy-same-bytes"]}
        for _ in range(rounds):
            sets = [case.make(s) for s in range(buffers(case.nbytes, device))]  # new addresses every round
            fns = {n: rotating([impls[n].prepare(s) for s in sets]) for n in names}
            fns["copy-same-bytes"] = rotating([baselines.same_bytes_copy(case.nbytes, device).prepare(s)
                                               for s in sets])
            for n, fn in fns.items():
                fn()
                times[n]["do_bench"].append(clock.time(fn))
                times[n]["kernels"].append(clock.kernels(fn))
            del sets, fns
            torch.cuda.empty_cache()
        ratios = {}
        for other in [n for n in times if n != "triton"]:
            for how in ("do_bench", "kernels"):
                ratios[f"{other} / triton ({how})"] = _spread(
                    [o / t for o, t in zip(times[other][how], times["triton"][how])])
        print(f"{case.scenario}: {rounds} rounds on fresh inputs")
        for n, t in times.items():
            print(f"  {n:18s} do_bench {statistics.median(t['do_bench']):8.2f} "
                  f"[{min(t['do_bench']):.2f}, {max(t['do_bench']):.2f}]  kernels {statistics.median(t['kernels']):8.2f} "
                  f"[{min(t['kernels']):.2f}, {max(t['kernels']):.2f}]")
        for k, v in ratios.items():
            print(f"  {k:36s} median {v['median']:.3f}  [{v['min']:.3f}, {v['max']:.3f}]", flush=True)
        out.append({"scenario": case.scenario, "op": case.op, "shape": case.shape, "bytes": case.nbytes,
                    "times_us": times, "ratios": ratios})
    return out


def decode_rounds(device, clock, rounds: int) -> list[dict]:
    kernel = baselines.empty_kernel()
    x = torch.empty(1, device=device)
    empty = lambda: kernel[(1,)](x)  # noqa: E731
    empty()
    out = []
    for case in scenarios.cases("llm", "gpu", device):
        if case.scenario != "T=16":
            continue
        triton_impl = _impls(case, device)["triton"]
        times: dict = {"empty launch": []}
        for _ in range(rounds):
            times["empty launch"].append(clock.graph(empty))
            for tile in DECODE_TILES:
                launch.set_config(*(tile or (None,)))  # also drops the dispatcher's prepared runners
                fn = triton_impl.prepare(case.make(0))
                fn()
                times.setdefault("shipped" if tile is None else f"tile {tile}", []).append(clock.graph(fn))
            launch.set_config(None)
        print(f"{case.op} {case.scenario}: CUDA-graph replay, {rounds} rounds, µs (ratio to the empty launch)")
        ratios = {}
        for n, t in times.items():
            r = [a / e for a, e in zip(t, times["empty launch"])]
            ratios[n] = _spread(r)
            print(f"  {n:18s} {statistics.median(t):6.2f} [{min(t):.2f}, {max(t):.2f}]  ratio "
                  f"{statistics.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]", flush=True)
        out.append({"scenario": case.scenario, "op": case.op, "shape": case.shape, "times_us": times,
                    "ratio_to_empty_launch": ratios})
    return out


def engine_orders(device, clock, repeats: int) -> list[dict]:
    """The benchmark engine's own ``run_case`` on q+k 4096x24/8 with the implementations in several
    orders and subsets: does Liger-Kernel's figure depend on what ran before it in the case?"""
    from rope_backends.benchmark import engine

    case = next(c for c in scenarios.cases("qk", "gpu", device) if c.scenario == "q+k 4096x24/8")
    names, _ = implementations.backend_names("cuda")
    full = implementations.for_case(case, device, names, implementations.Options(progress=False))
    by_name = {i.name: i for i in full}
    t, lg = by_name["triton"], by_name["liger-kernel"]
    rest = [i for i in full if i.name not in ("triton", "liger-kernel")]
    orders = {"the benchmark's list": full,
              "triton, liger": [t, lg],
              "liger, triton": [lg, t],
              "the list, triton last": [i for i in full if i is not t] + [t],
              "the list, liger first": [lg] + [i for i in full if i is not lg]}
    for other in rest:  # which one, run before, changes what follows (in-place rotation of the sets, GPU state)
        orders[f"{other.name}, triton, liger"] = [other, t, lg]
    out = []
    for rep in range(repeats):
        for label, impls in orders.items():
            rows: list = []
            engine.run_case(case, impls, clock, 1.0, engine.Progress(False, 1), rows, [])
            picked = {f"{r['implementation']} ({r['timing']})": r["us"] for r in rows
                      if r["implementation"] in ("triton", "liger-kernel")}
            print(f"  [{rep}] {label:22s} " + "  ".join(f"{k} {v:7.2f}" for k, v in sorted(picked.items())), flush=True)
            out.append({"repeat": rep, "order": label, "us": picked})
            torch.cuda.empty_cache()
    return out


def state_check(device, clock, rounds: int = 3) -> list[dict]:
    """q+k 4096x24/8, this library vs Liger-Kernel in alternating rounds, in one process: on fresh
    inputs; after the GPU sat idle 5 s; after torch.compile's implementation compiled and ran once;
    again after that (does its effect last?); after another 5 s idle."""
    import time

    case = next(c for c in scenarios.cases("qk", "gpu", device) if c.scenario == "q+k 4096x24/8")
    impls = _impls(case, device)
    out = []

    def measure(label):
        sets = [case.make(s) for s in range(buffers(case.nbytes, device))]
        fns = {n: rotating([impls[n].prepare(s) for s in sets]) for n in ("triton", "liger-kernel")}
        got = {n: [] for n in fns}
        for _ in range(rounds):
            for n, fn in fns.items():
                fn()
                got[n].append(clock.kernels(fn))
        med = {n: statistics.median(v) for n, v in got.items()}
        print(f"  {label:40s} " + "  ".join(f"{n} {v:6.2f}" for n, v in med.items()), flush=True)
        out.append({"state": label, "kernels_us": got})

    measure("fresh")
    torch.cuda.synchronize()
    time.sleep(5)
    measure("after 5 s idle")
    compiled = impls["torch.compile"].prepare(case.make(0))
    compiled()
    torch.cuda.synchronize()
    measure("after torch.compile compiled and ran")
    measure("again")
    for _ in range(200):
        compiled()
    measure("after 200 torch.compile calls")
    torch.cuda.synchronize()
    time.sleep(5)
    measure("after 5 s idle")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--engine", action="store_true", help="only the engine-order check (see engine_orders)")
    ap.add_argument("--state", action="store_true", help="only the GPU-state check (see state_check)")
    a = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(device, quick=False)
    if a.state:
        report.write_study({"state": state_check(device, clock)}, a.out, "gpu-state-study.json")
        return 0
    if a.engine:
        report.write_study({"engine_orders": engine_orders(device, clock, 2)}, a.out, "engine-orders-study.json")
        return 0
    doc = {"rounds": a.rounds, "qk": qk_rounds(device, clock, a.rounds),
           "decode": decode_rounds(device, clock, a.rounds)}
    report.write_study(doc, a.out, "repeat-rounds-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
