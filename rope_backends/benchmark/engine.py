"""The benchmark engine: run the chosen groups on a device and build the result document.

What one run does, per device:
  1. measures the device's copy bandwidth (:func:`.machine.copy_bandwidth`);
  2. for every case of the chosen groups (:mod:`.scenarios`) and every implementation
     (:mod:`.implementations`), checks the output once, bit for bit, against the reference on
     that case, then times it (:mod:`.timing`); the dispatch group first (seconds, and a target
     of its own, so a time budget never cuts it), rope_index last (:mod:`.rope_index`);
  3. returns the document: rows (µs, GB/s, % of the copy bandwidth, ``bit_exact``), what was
     skipped and why, and the targets (:func:`.targets.summarize`). With ``budget_s`` the cases
     left when the budget is spent are listed as skipped; with ``checkpoint`` the partial
     document is handed out after every case, so a run that is killed keeps its results.

:func:`run` does it for several devices and writes the JSON (and PNG); :func:`run_short` is the
short bench of ``python -m rope_backends check --bench``. The engine never benchmarks the
Triton interpreter or a backend that serves a device only when named (test vehicles), and never
changes a backend or a global setting beyond the torch thread count it restores.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..testing.check import bitwise_mismatches
from . import baselines, implementations, machine, peers, report, rope_index, scenarios, targets
from .implementations import Options
from .scenarios import BYTE_RULE, GROUPS, Case, Impl, Skip
from .timing import Clock, buffers, rotating, synchronises

__all__ = ["Progress", "run_device", "run", "run_short"]


class Progress:
    """One status line on stderr: rewritten in place on a terminal, one line per case otherwise."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = max(total, 1)
        self.done = 0
        self.start = time.perf_counter()
        self.tty = enabled and sys.stderr.isatty()

    def show(self, text: str, case_start: bool = False) -> None:
        if not self.enabled:
            return
        line = f"[{self.done}/{self.total} {time.perf_counter() - self.start:5.0f}s] {text}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line[:160])
            sys.stderr.flush()
        elif case_start:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _equal(outs: Sequence[Tensor], refs: Sequence[Tensor]) -> bool:
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if o.shape != r.shape or o.dtype != r.dtype:
            return False
        if o.numel() and bool(bitwise_mismatches(o, r).any()):
            return False
    return True


def _clone(d: dict) -> dict:
    return {k: (v.clone() if isinstance(v, Tensor) and k not in ("cache",) else v) for k, v in d.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def make_row(case: Case, impl: Impl, us: float, timing: str, copy_gbps: float, bit_exact, nbuf: int) -> dict:
    """One row of the document (the keys are the schema: see tests/test_bench.py ROW_KEYS)."""
    gbps = case.nbytes / us / 1e3 if us > 0 else None
    row = {
        "group": case.group, "scenario": case.scenario, "op": case.op, "shape": case.shape,
        "dtype": _dtype_name(case.dtype), "layout": impl.layout or case.layout, "tokens": case.tokens,
        "implementation": impl.name, "kind": impl.kind, "timing": timing, "us": us,
        "gbps": gbps, "pct_copy": (100.0 * gbps / copy_gbps) if gbps and copy_gbps else None,
        "bytes": case.nbytes, "bit_exact": bit_exact, "buffers": nbuf,
    }
    if impl.note:
        row["note"] = impl.note
    return row


def run_case(case: Case, impls: list[Impl], clock: Clock, copy_gbps: float, progress: Progress,
             rows: list, skipped: list) -> None:
    """Check and time every implementation of one case; rows and skips are appended."""
    device = clock.device
    gpu = clock.type == "cuda"
    progress.show(f"{case.group} {case.scenario} {case.op} {case.shape}", case_start=True)
    nbuf = 1 if case.host else buffers(case.nbytes, device)
    try:
        sets = [case.make(seed) for seed in range(nbuf)]
    except torch.cuda.OutOfMemoryError as exc:  # type: ignore[attr-defined]
        skipped.append({"group": case.group, "scenario": case.scenario, "reason": f"inputs: out of memory ({exc})"})
        return
    pristine = _clone(sets[0])  # in-place implementations rotate the sets while they are timed
    refs: dict[str, tuple] = {}
    host: list[tuple[Impl, Callable, bool]] = []  # dispatch: timed together at the end
    timed: list[tuple[Impl, Callable, bool]] = []  # GPU: timed in alternating rounds below
    for impl in impls:
        progress.show(f"{case.group} {case.scenario} {case.op}: {impl.name}")
        layout = impl.layout or case.layout
        try:
            if layout not in refs:
                refs[layout] = tuple(t.detach() for t in case.reference(_clone(pristine), layout))
            exact = None
            if impl.checked:  # bit-exactness, once, on a copy of the first input set
                check = impl.prepare(_clone(pristine))
                outs = check()
                exact = _equal([t.detach() for t in outs], refs[layout])
                del check, outs
            fn = rotating([impl.prepare(s) for s in sets])
            if case.host:
                fn()
                host.append((impl, fn, exact))
            elif gpu:
                fn()  # compiled and warm before any implementation is timed
                timed.append((impl, fn, exact))
            else:
                rows.append(make_row(case, impl, clock.time(fn), clock.method, copy_gbps, exact, len(sets)))
        except Skip as exc:
            _skip(skipped, case, impl, str(exc))
        except Exception as exc:
            _failed(case, impl, exc, gpu, skipped)
        progress.done += 1
    if timed:
        _time_in_rounds(case, timed, clock, copy_gbps, progress, rows, skipped, len(sets))
    if host:
        progress.show(f"{case.group} {case.scenario}: host time, {len(host)} calls in alternating rounds")
        timing = "torch_timer" if clock.type == "cpu" else "host_loop"
        for (impl, _, exact), (us, best) in zip(host, clock.host_times([fn for _, fn, _ in host])):
            rows.append(dict(make_row(case, impl, us, timing, copy_gbps, exact, 1), us_min=best))
    del sets, refs, pristine, host, timed
    if gpu:
        torch.cuda.empty_cache()


def _skip(skipped: list, case: Case, impl: Impl, reason: str, timing: str | None = None) -> None:
    entry = {"group": case.group, "scenario": case.scenario, "implementation": impl.name}
    if timing:
        entry["timing"] = timing
    entry["reason"] = reason
    skipped.append(entry)


def _failed(case: Case, impl: Impl, exc: Exception, gpu: bool, skipped: list) -> None:
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    _skip(skipped, case, impl, f"failed: {type(exc).__name__}: {str(exc)[:300]}")


def round_order(items: list, rnd: int) -> list:
    """The order of round ``rnd``: as given, reversed, evens then odds, then rotations of those.
    Each changes who runs right after whom (a rotation alone would not): on the H200 the
    implementation timed right after torch.compile's read 5-10 % faster, whichever it was."""
    base = (list(items), list(reversed(items)), list(items[0::2]) + list(items[1::2]))[rnd % 3]
    shift = (rnd // 3) % len(base) if base else 0
    return base[shift:] + base[:shift]


def _persisting_l2_note(clock: Clock) -> str:
    if clock.resets_persisting_l2:
        return ("persisting (evict_last) L2 lines returned to normal before each kernels flush and before each "
                "do_bench (cuCtxResetPersistingL2Cache); ")
    if clock.type == "cuda":
        return "persisting (evict_last) L2 lines NOT reset (no cuCtxResetPersistingL2Cache here): they outlive the flush; "
    return ""


def _time_in_rounds(case: Case, timed: list, clock: Clock, copy_gbps: float, progress: Progress, rows: list,
                    skipped: list, nbuf: int) -> None:
    """A GPU case's implementations timed side by side: ``clock.rounds`` rounds, each timing every
    implementation once (do_bench, then the kernels' own time) in the order of :func:`round_order`;
    each row is the median over the rounds. Timed one after another instead, an implementation's
    figure depends on what ran right before it (H200, q+k 4096x24/8: whichever kernel ran right
    after torch.compile's read 32-33 µs instead of 34-36, until the clock reset the L2 lines its
    ``evict_last`` loads left: timing.persisting_l2_reset).
    Then, once each, the backward group's training-loop timing and CUDA-graph replay."""
    samples = {id(impl): {"do_bench": [], "kernels": []} for impl, _, _ in timed}
    alive = list(timed)
    for rnd in range(clock.rounds):
        progress.show(f"{case.group} {case.scenario} {case.op}: round {rnd + 1} of {clock.rounds}")
        for impl, fn, exact in round_order(alive, rnd):
            got = samples[id(impl)]
            try:
                got["do_bench"].append(clock.time(fn, rounds=clock.rounds))
            except Exception as exc:
                _failed(case, impl, exc, True, skipped)
                alive = [t for t in alive if t[0] is not impl]
                continue
            # the device's share of that figure: a peer launched from Python on a slow host (or
            # an autograd backward) can outlast the L2 flush, and do_bench then counts host time;
            # the kernels' own time after the same flush does not
            if got["kernels"] is None:
                continue
            try:
                kus = clock.kernels(fn)
            except Exception as exc:
                torch.cuda.synchronize()
                _skip(skipped, case, impl, f"profiler: {type(exc).__name__}: {exc}"[:300], "kernels")
                got["kernels"] = None
                continue
            if math.isfinite(kus):
                got["kernels"].append(kus)
            else:  # no kernel between two flushes (or another name for the flush's)
                _skip(skipped, case, impl, "the profiler saw no kernel of the call between two L2 flushes", "kernels")
                got["kernels"] = None
    for impl, fn, exact in alive:
        got = samples[id(impl)]
        rows.append(make_row(case, impl, statistics.median(got["do_bench"]), clock.method, copy_gbps, exact, nbuf))
        if got["kernels"]:
            rows.append(make_row(case, impl, statistics.median(got["kernels"]), "kernels", copy_gbps, exact, nbuf))
    for impl, fn, exact in alive:
        try:
            if case.group == "backward":
                # as a training loop runs it: calls back to back, one sync at the end, so the host
                # can run ahead of the device (do_bench serialises each call after an L2 flush:
                # the autograd engine's host time then shows in every call)
                us = statistics.median(clock.host_sample(fn) for _ in range(3 if clock.quick else 7))
                rows.append(make_row(case, impl, us, "back_to_back", copy_gbps, exact, nbuf))
            if case.graph:
                sync = synchronises(fn)
                if sync is not None:  # a capture would fail: say so instead of trying
                    _skip(skipped, case, impl, f"not capturable: a call synchronises with the host ({sync[:160]})",
                          "cuda_graph")
                else:
                    try:
                        rows.append(make_row(case, impl, clock.graph(fn), "cuda_graph", copy_gbps, exact, nbuf))
                    except Exception as exc:
                        torch.cuda.synchronize()
                        _skip(skipped, case, impl, f"capture failed: {type(exc).__name__}: {str(exc)[:200]}",
                              "cuda_graph")
        except Exception as exc:
            _failed(case, impl, exc, True, skipped)


def launch_rows(device: torch.device, clock: Clock, copy_gbps: float, skipped: list) -> list[dict]:
    """An empty Triton launch, timed as the rope calls are (do_bench and CUDA-graph replay)."""
    if clock.type != "cuda":
        return []
    try:
        kernel = baselines.empty_kernel()
        x = torch.empty(1, device=device)
        fn = lambda: kernel[(1,)](x)  # noqa: E731
        fn()
        case = Case("llm", "empty launch", "launch", "-", torch.float32, "-", 0, 0, lambda s: {}, None)
        impl = Impl(baselines.EMPTY_LAUNCH, "baseline", lambda d: fn)
        rows = [make_row(case, impl, clock.time(fn), clock.method, copy_gbps, None, 1),
                make_row(case, impl, clock.graph(fn), "cuda_graph", copy_gbps, None, 1)]
        for r in rows:
            r["gbps"] = r["pct_copy"] = None
        return rows
    except Exception as exc:
        skipped.append({"group": "llm", "implementation": baselines.EMPTY_LAUNCH, "reason": f"failed: {exc}"})
        return []


def add_overheads(rows: list[dict]) -> None:
    """Dispatch rows: µs over the backend's forward and over the direct launch."""
    by_scenario: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["group"] == "dispatch":
            by_scenario.setdefault(r["scenario"], {})[r["kind"] + ":" + r["implementation"]] = r
    for rs in by_scenario.values():
        public = next((r for r in rs.values() if r["implementation"].startswith("rb.")), None)
        forward = next((r for r in rs.values() if r["implementation"].endswith(".forward")), None)
        direct = next((r for r in rs.values() if r["implementation"] == baselines.DIRECT_LAUNCH), None)
        if public is None:
            continue
        if forward is not None:
            public["overhead_over_forward_us"] = public["us"] - forward["us"]
            if "us_min" in public and "us_min" in forward:  # the least disturbed rounds
                public["overhead_over_forward_us_min"] = public["us_min"] - forward["us_min"]
        if direct is not None:
            public["overhead_over_launch_us"] = public["us"] - direct["us"]
            if "us_min" in public and "us_min" in direct:
                public["overhead_over_launch_us_min"] = public["us_min"] - direct["us_min"]
            if forward is not None:
                forward["overhead_over_launch_us"] = forward["us"] - direct["us"]


def run_device(device: str | torch.device, groups: Sequence[str] = GROUPS, *, quick: bool = False,
               scale: str | None = None, impls: Sequence[str] = (), skip: Sequence[str] = (),
               progress: bool = True, command: str | None = None, short: bool = False,
               budget_s: float | None = None, threads: int | None = None,
               checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Run the chosen groups on one device and return the result document (the JSON's content).

    scale: "gpu" shapes on a GPU, "cpu" shapes elsewhere by default; "tiny" for tests.
    budget_s: once this many seconds have passed, the remaining cases are listed as skipped
    (so a run under a wall-clock limit still writes its results).
    threads: torch CPU threads for this run (default: torch's setting); on a machine that other
    work keeps busy, threaded kernels wait for each other and 1 thread measures more steadily.
    checkpoint: called with the partial document (``"partial": True``) after every case."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_device(device, groups, quick=quick, scale=scale, impls=impls, skip=skip, progress=progress,
                           command=command, short=short, budget_s=budget_s, checkpoint=checkpoint)
    finally:
        torch.set_num_threads(previous_threads)


def _run_device(device, groups, *, quick, scale, impls, skip, progress, command, short, budget_s, checkpoint) -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # do_bench and Triton launch on the current device
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"groups: expected names from {GROUPS}, got {g!r}")
    if scale is None:
        scale = "gpu" if device.type == "cuda" else "cpu"
        if short:
            scale = "short-gpu" if device.type == "cuda" else "short-cpu"
    options = Options(quick=quick or short, impls=tuple(impls), skip=tuple(skip), progress=progress)
    if short:
        options.skip += (peers.COMPILE, implementations.STRIDED)
    clock = Clock(device, options.quick)
    info = machine.device_info(device)
    t0 = time.perf_counter()
    if progress:
        print(f"rope_backends bench on {info['name']}: measuring copy bandwidth", file=sys.stderr)
    copy = machine.copy_bandwidth(device, quick=options.quick)
    backend_names, skipped = implementations.backend_names(device.type)
    default = backend_names[0] if backend_names else None
    plan = []
    # dispatch first: seconds, and a target of its own, so a time budget never cuts it
    for g in sorted(groups, key=lambda g: g != "dispatch"):
        if g == "rope_index" or (scale.startswith("short") and g in ("mrope", "backward")):
            continue
        plan.extend(scenarios.cases(g, scale, device))
    last_llm = next((c for c in reversed(plan) if c.group == "llm"), None)
    total = sum(len(implementations.for_case(c, device, backend_names, options)) if not c.host else 3 for c in plan)
    bar = Progress(progress, total)
    rows: list[dict] = []

    def document(partial: bool) -> dict:
        done = [dict(r) for r in rows]
        add_overheads(done)
        doc = {
            "schema": report.SCHEMA,
            "date": _dt.date.today().isoformat(),
            "device": info,
            "device_label": machine.device_label(info),
            "versions": machine.versions(),
            "command": command if command is not None else " ".join(getattr(sys, "orig_argv", sys.argv)),
            "quick": options.quick,
            "short": short,
            "scale": scale,
            "groups": list(groups),
            "default_backend": default,
            "copy_bandwidth": copy,
            "byte_counting": BYTE_RULE,
            "timing": {"cuda": "triton.testing.do_bench median (L2 flushed before each call) with rotating input "
                               "buffers; timing 'kernels': the summed device time of the call's kernels after the same "
                               "flush and a fixed wait on the device (torch.profiler, median of 12 calls); "
                               + _persisting_l2_note(clock) + "both "
                               f"the median of {clock.rounds} rounds alternating between a case's implementations "
                               "(as listed, reversed, evens then odds); decode sizes also under CUDA-graph "
                               "replay (do_bench_cudagraph median)",
                       "cpu": "torch.utils.benchmark.Timer.blocked_autorange median, torch threads = "
                              f"{torch.get_num_threads()}",
                       "dispatch": "host time per call of back-to-back calls (CPU: the torch Timer)"},
            "bit_exact_rule": "each implementation's output compared once, bit for bit (all NaNs equal), with "
                              "rope_backends.reference on the same inputs; for the backward group the gradient",
            "rows": done,
            "skipped": list(skipped),
            "elapsed_s": time.perf_counter() - t0,
            "budget_s": budget_s,
            "partial": partial,
        }
        doc["summary"] = targets.summarize(doc)
        return doc

    for case in plan:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append({"group": case.group, "scenario": case.scenario,
                            "reason": f"time budget of {budget_s:.0f} s spent: not run"})
            continue
        if case.host:
            if default is None:
                continue
            case_impls = [i for i in implementations.for_dispatch(case, device, default) if options.selects(i.name)]
        else:
            case_impls = implementations.for_case(case, device, backend_names, options)
        run_case(case, case_impls, clock, copy["gbps"], bar, rows, skipped)
        if case is last_llm:
            rows.extend(launch_rows(device, clock, copy["gbps"], skipped))
        if checkpoint is not None:  # results so far survive a run that is killed
            checkpoint(document(partial=True))
    if "rope_index" in groups and not short:
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            skipped.append({"group": "rope_index", "reason": f"time budget of {budget_s:.0f} s spent: not run"})
        else:
            rows.extend(rope_index.rows(device, scale, skipped, lambda text: bar.show(text, case_start=True)))
    bar.end()
    return document(partial=False)


def run(devices: Sequence[str] | None = None, groups: Sequence[str] = GROUPS, *, quick: bool = False,
        out_dir: str | Path | None = None, scale: str | None = None, impls: Sequence[str] = (),
        skip: Sequence[str] = (), progress: bool = True, command: str | None = None, short: bool = False,
        plot: bool = True, print_tables: bool = True, budget_s: float | None = None,
        threads: int | None = None) -> list[dict]:
    """Run the bench on each device; write ``<out_dir>/<device>-<date>.json`` (+ ``.png``) when
    ``out_dir`` is given; print the tables. Returns the result documents."""
    docs = []
    suffix = "-short" if short else ("-quick" if quick else "")
    if scale == "tiny":
        suffix += "-tiny"
    checkpoint = (lambda partial: report.write_json(partial, out_dir, suffix)) if out_dir is not None else None
    for dev in devices or machine.present_devices():
        doc = run_device(dev, groups, quick=quick, scale=scale, impls=impls, skip=skip, progress=progress,
                         command=command, short=short, budget_s=budget_s, threads=threads, checkpoint=checkpoint)
        if out_dir is not None:
            path = report.write_json(doc, out_dir, suffix)
            png = report.write_plot(doc, path.with_suffix(".png")) if plot else None
            doc["_files"] = [str(path)] + ([str(png)] if png else [])
            if progress:
                print(f"wrote {path}" + (f" and {png.name}" if png else " (no plot: matplotlib not installed)"),
                      file=sys.stderr)
        if print_tables:
            print(report.format_tables(doc))
            print()
        docs.append(doc)
    return docs


def run_short(devices: list[str] | None = None, out_dir: str | None = None, *, device: str | None = None) -> list[dict]:
    """The short bench of ``python -m rope_backends check --bench``: on each device (default:
    every device present) the copy bandwidth, one diffusion shape, decode and prefill
    ``apply_cached`` and the dispatch overhead, for the backends and the cheap peers (no
    ``torch.compile``: its compile time would dominate). Prints its table; returns the rows
    (each with a ``device`` key). A few seconds on a 2-core CPU.

    ``device``: one device type, the same as ``devices=[device]`` (for callers that have one)."""
    if device is not None:
        devices = [device] if devices is None else list(devices) + [device]
    rows = []
    for doc in run(devices, ("diffusion", "llm", "dispatch"), short=True, out_dir=out_dir,
                   command=" ".join(getattr(sys, "orig_argv", sys.argv)), plot=False):
        for r in doc["rows"]:
            rows.append(dict(r, device=doc["device"]["name"], device_type=doc["device"]["type"]))
    return rows
