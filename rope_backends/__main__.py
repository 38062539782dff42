"""``python -m rope_backends info | check | tune | bench``: this machine, its conformance suite, its bench.

    python -m rope_backends info
        torch / triton / torch_npu versions, devices, GPU vendor (CUDA or ROCm), the backend each
        device type gets, every backend with its availability (and the reason when unavailable).

    python -m rope_backends tune [--quick] [--out PATH]
        measures this GPU's best Triton tile per shape class (a few minutes) and writes the table
        that every later process on this GPU reads (see rope_backends/backends/triton/tune.py).

    python -m rope_backends check [--backend NAME ...] [--device TYPE] [--expect NAME] [--full] [--names FILE] [--shard K/N] [--bench] [-v]
        runs the shipped conformance suite (rope_backends.testing: cases and error cases) on every
        device type and backend this machine can run, prints one row per target (backend, device,
        cases, passed, failed, seconds) and exits non-zero on any failure. ``--expect NAME`` also
        fails unless automatic dispatch on the device (``--device``, else the first accelerator
        here, else cpu) picks NAME for every kind of call. ``--bench`` then runs
        ``rope_backends.benchmark.run_short()`` when that package is installed.

    python -m rope_backends bench [--groups G,...] [--device TYPE,...] [--quick] [--out DIR] ...
        the benchmark suite: every implementation checked bit for bit, then timed; writes the
        JSON (and PNG) to DIR (see rope_backends/benchmark/cli.py, ``bench --help``).

This module only reports; it changes no setting and registers no backend.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
import warnings
from typing import Sequence

import torch


def _p(*parts: object) -> None:
    print(*parts, flush=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(c).rjust(w) if str(c).replace(".", "").isdigit() else str(c).ljust(w)
                               for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# info

def _auto_backend(device_type: str) -> str:
    from . import registry

    try:
        return registry.select(device_type, None).name
    except ValueError:
        return "none"


def cmd_info(args: argparse.Namespace) -> int:
    import rope_backends as rb
    from . import environment
    from .backends import plugin_errors

    p = environment.detect()
    _p(f"rope_backends {rb.__version__}  (python {sys.version.split()[0]}, {sys.platform})")
    _p(f"torch       {p.torch}  (CUDA build: {torch.version.cuda or 'no'}, HIP build: {getattr(torch.version, 'hip', None) or 'no'})")
    interp = "on: Triton kernels run on CPU tensors through the interpreter" if p.triton_interpret else "off"
    _p(f"triton      {p.triton or 'not installed'}  (TRITON_INTERPRET {interp})")
    _p(f"torch_npu   {p.torch_npu or 'not installed'}"
       + ("  (ROPE_BACKENDS_SIMULATE_NPU=1: the npu backend serves cpu tensors when named)" if p.simulated_npu else ""))
    gpus = ", ".join(f"cuda:{i} {n}" for i, n in enumerate(p.gpu_names)) or "none"
    _p(f"devices     cpu; GPUs: {gpus}; NPUs: {p.npu_count or 'none'}")
    vendor = {"nvidia": "NVIDIA (CUDA)", "rocm": "AMD (ROCm; torch device type 'cuda')"}.get(p.gpu_vendor or "", "none")
    _p(f"GPU vendor  {vendor}")
    env = os.environ.get("ROPE_BACKEND")
    _p(f"override    ROPE_BACKEND={env}" if env else "override    none (ROPE_BACKEND unset)")
    _p("")
    _p("automatic dispatch (per device type of the input tensors):")
    present = set(p.device_types())
    for kind in ("cpu", "cuda", "npu"):
        note = "" if kind in present else f"   (no {kind} device here)"
        _p(f"  {kind:<5} -> {_auto_backend(kind)}{note}")
    _p("")
    rows = []
    for b in rb.list_backends():
        rows.append([b.name, str(b.priority), ", ".join(b.device_types) or "-",
                     ", ".join(b.explicit_device_types) or "-", "yes" if b.available else "no", b.reason or ""])
    _p(_table(rows, ["backend", "priority", "serves", "also when named", "available", "reason"]))
    if p.gpu_count and p.triton:
        from .backends.triton import tuning

        _p("")
        _p("triton tiles (python -m rope_backends tune writes this GPU's own table):")
        for i in range(p.gpu_count):
            try:
                table = tuning.table_for(i)
            except Exception as exc:  # a GPU whose properties cannot be read (a broken driver)
                _p(f"  cuda:{i}: unknown ({type(exc).__name__}: {exc})")
                continue
            where = f": {table.path}" if table.path else " (no table for this GPU: tiles from its SM count)"
            _p(f"  cuda:{i} {table.device['key']}: {table.source}{where}, {len(table.entries)} shape classes")
    if plugin_errors:
        _p("")
        _p("plug-ins that failed to load (entry-point group rope_backends.backends):")
        for name, err in plugin_errors.items():
            _p(f"  {name}: {err}")
    return 0


# --------------------------------------------------------------------------------------------
# check

def _expect_device(device: str | None) -> str:
    if device is not None:
        return device
    from .testing.runner import present_device_types

    kinds = present_device_types()
    return next((k for k in kinds if k != "cpu"), "cpu")


def _expectation(expect: str, device: str) -> list[str]:
    """Problems with automatic dispatch on ``device`` (empty: it picks ``expect`` for every
    kind of call: both layouts, every dtype, cos/sin tables, positions, MRoPE)."""
    from . import mrope, registry
    from .validation import args_for_cached, args_for_tables

    problems = []
    dev = torch.device(device)
    cos = torch.zeros(2, 1, 4, device=dev)
    cache = torch.zeros(4, 8, device=dev)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in ("neox", "interleaved"):
            q = torch.zeros(2, 2, 8, dtype=dtype, device=dev)
            k = torch.zeros(2, 1, 8, dtype=dtype, device=dev)
            pos = torch.zeros(2, dtype=torch.long, device=dev)
            calls = {
                "apply": args_for_tables((("x", q),), cos, cos, layout, None, False),
                "apply_qk": args_for_tables((("q", q), ("k", k)), cos, cos, layout, None, False),
                "apply_cached": args_for_cached(q, k, pos, cache, layout, None, None, True, None)[0],
                "apply_cached+mrope": args_for_cached(q, k, pos.expand(3, 2), cache, layout, None,
                                                      mrope.chunked((2, 1, 1)), True, None)[0],
            }
            for what, a in calls.items():
                try:
                    got = registry.resolve(a, None).name
                except ValueError as exc:
                    got = f"error: {str(exc).splitlines()[0]}"
                if got != expect:
                    problems.append(f"{what} {str(dtype).replace('torch.', '')} {layout} on {device}: {got}")
    return problems


_BENCH = "rope_backends.benchmark"


def _run_bench(device: str | None) -> int:
    if importlib.util.find_spec(_BENCH) is None:
        _p(f"bench: not installed (the package {_BENCH} is missing)")
        return 0
    bench = importlib.import_module(_BENCH)
    run_short = getattr(bench, "run_short", None)
    if run_short is None:
        _p(f"bench: {_BENCH} has no run_short(); not run")
        return 1
    kwargs = {}
    if device is not None and "device" in inspect.signature(run_short).parameters:
        kwargs["device"] = device
    _p("")
    _p(f"bench: {_BENCH}.run_short()")
    result = run_short(**kwargs)
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0


def cmd_check(args: argparse.Namespace) -> int:
    import rope_backends  # noqa: F401  (registers the backends)
    from .testing import cases as case_data
    from .testing import runner

    try:
        targets = runner.targets(args.backend, args.device)
    except ValueError as exc:
        _p(f"check: {exc}")
        return 2
    errors = case_data.error_cases()
    # the Triton interpreter evaluates kernels with numpy, which warns on inf/NaN arithmetic that
    # the special-value cases do on purpose; the results are checked bit for bit regardless
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    status = 0
    rows, failures, not_run = [], [], []
    t_all = time.perf_counter()
    for t in targets:
        if not t.runnable:
            not_run.append(t)
            if args.backend:  # named explicitly: not being able to run it fails the check
                status = 1
            continue
        kind = torch.device(t.device).type
        cases = case_data.cases_for(t.backend, kind, args.full)
        t_errors = errors
        if args.names is not None:  # a named subset (e.g. what a time-boxed run did not reach)
            cases = [c for c in cases if c.name in args.names]
            t_errors = [e for e in errors if f"error:{e.name}" in args.names]
            if not cases and not t_errors:  # a typo or the wrong tier must not pass as "0 failed"
                _p(f"check: --names: none of the {len(args.names)} names is a case of this tier for {t.backend} "
                   f"on {t.device}" + ("" if args.full else " (add --full for the exhaustive tier)"))
                return 2
            if len(cases) + len(t_errors) < len(args.names):
                _p(f"  ({len(args.names) - len(cases) - len(t_errors)} of the names are not cases of "
                   f"{t.backend}'s tier on {t.device})")
        if args.shard is not None:  # the error catalogue goes with shard 0
            k, n = args.shard
            cases, t_errors = _shard_cases(cases, k, n), (t_errors if k == 0 else [])
        _p(f"checking {t.backend} on {t.device}: {len(cases)} cases + {len(t_errors)} error cases ...")

        # failures print as they happen and a count every 30 s, so a run cut short by a time
        # limit (a GPU lease, a CI job) still says what it covered
        seen = {"done": 0, "failed": 0, "t0": time.perf_counter(), "last": time.perf_counter()}
        total = len(cases) + len(t_errors)

        def progress(o, _t=t, _seen=seen):
            _seen["done"] += 1
            _seen["failed"] += not o.ok
            if args.verbose:
                _p(f"  {'ok  ' if o.ok else 'FAIL'} {o.seconds * 1e3:8.1f} ms  {o.name}")
            elif not o.ok:
                _p(f"  FAIL {o.name}: {o.message.splitlines()[0][:400]}")
            now = time.perf_counter()
            if now - _seen["last"] >= 30 and not args.verbose:
                _seen["last"] = now
                _p(f"  progress: {_seen['done']}/{total} checked, {_seen['failed']} failed, "
                   f"{now - _seen['t0']:.0f} s")

        result = runner.run_target(t, cases, error_cases=t_errors, progress=progress)
        rows.append([t.backend, t.device, str(len(result.outcomes)), str(result.passed), str(result.failed),
                     f"{result.seconds:.1f}"])
        failures += [(t, o) for o in result.outcomes if not o.ok]
        if result.skipped and args.verbose:
            for name, why in result.skipped:
                _p(f"  skipped {name}: {why}")
        elif result.skipped:
            _p(f"  ({len(result.skipped)} device-bound case(s) not for this target: e.g. {result.skipped[0][1]})")
    _p("")
    if rows:
        _p(_table(rows, ["backend", "device", "cases", "passed", "failed", "seconds"]))
    else:
        _p("no backend could run here")
        status = 1
    for t in not_run:
        _p(f"not run: {t.backend} ({t.reason})")
    if failures:
        status = 1
        _p("")
        _p(f"{len(failures)} failure(s):")
        for t, o in failures[: args.max_failures]:
            _p(f"  [{t.backend} on {t.device}] {o.name}: {o.message.splitlines()[0][:400]}")
        if len(failures) > args.max_failures:
            _p(f"  ... and {len(failures) - args.max_failures} more (--max-failures)")
    if args.expect:
        device = _expect_device(args.device)
        problems = _expectation(args.expect, device)
        _p("")
        if problems:
            status = 1
            _p(f"--expect {args.expect}: automatic dispatch on {device} picked something else for:")
            for line in problems:
                _p(f"  {line}")
        else:
            _p(f"--expect {args.expect}: automatic dispatch on {device} picks {args.expect} for every kind of call")
    _p(f"\n{'FAILED' if status else 'OK'} in {time.perf_counter() - t_all:.1f} s")
    if args.bench:
        if status:
            _p("bench: not run, the check failed")
        else:
            status = _run_bench(args.device) or status
    return status


def _shard_cases(cases: list, k: int, n: int) -> list:
    """Shard ``k`` of ``n``: whole ``kernel_group``s, largest first, each to the shard with the
    fewest cases so far (ties: the lowest index), in tier order within the shard. Deterministic,
    so the ``n`` processes agree without talking. Simulated on the exhaustive tier with the kernel
    variants each case compiles (launch stubbed on CPU): 12 shards need at most 199 variants each
    (2,280 compiles in all) against 294 (3,394) for every n-th case. Measured on the H100 (session
    4): the whole tier in 12 shards of 105-443 s. Weighting groups by per-op seconds fitted to that
    run was tried and was slower (apply_cached-heavy shards projected to ~500 s): not additive."""
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        groups.setdefault(case.kernel_group, []).append(i)
    load = [0] * n
    mine: list[int] = []
    for key in sorted(groups, key=lambda g: (-len(groups[g]), repr(g))):
        j = min(range(n), key=lambda s: (load[s], s))
        load[j] += len(groups[key])
        if j == k:
            mine += groups[key]
    return [cases[i] for i in sorted(mine)]


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (two integers), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"expected 0 <= K < N, got {text!r}")
    return k, n


def _names(path: str) -> frozenset[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror}") from None
    names = frozenset(line for line in lines if line)
    if not names:
        raise argparse.ArgumentTypeError(f"expected case names in {path!r}, got none")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rope_backends", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("info", help="versions, devices, GPU vendor, backends and what each device type gets")
    sub.add_parser("tune", add_help=False, help="measure this GPU's Triton tiles and save them (see tune --help)")
    sub.add_parser("bench", add_help=False, help="benchmark every implementation on this machine (see bench --help)")
    check = sub.add_parser("check", help="run the conformance suite on every backend and device here")
    check.add_argument("--backend", action="append", default=None, metavar="NAME",
                       help="only this backend (repeatable)")
    check.add_argument("--device", default=None, metavar="DEVICE", help="only this device (cpu, cuda, cuda:1, npu)")
    check.add_argument("--expect", default=None, metavar="NAME",
                       help="fail unless automatic dispatch on the device picks NAME")
    check.add_argument("--full", action="store_true", help="the exhaustive tier (reference_cases)")
    check.add_argument("--bench", action="store_true", help="then run rope_backends.benchmark.run_short()")
    check.add_argument("--shard", type=_shard, default=None, metavar="K/N",
                       help="shard K of N (0 <= K < N), whole kernel groups per shard: split a long tier over processes")
    check.add_argument("--names", type=_names, default=None, metavar="FILE",
                       help="only the cases named in FILE, one per line ('error:NAME' for an error case; "
                            "'#' starts a comment)")
    check.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    check.add_argument("--max-failures", type=int, default=30, help="failures listed (default 30)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tune"]:
        from .backends.triton import tune

        return tune.main(argv[1:])
    if argv[:1] == ["bench"]:
        from .benchmark import cli

        return cli.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return cmd_info(args)
    if args.command == "check":
        return cmd_check(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
