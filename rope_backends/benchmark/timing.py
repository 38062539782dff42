"""How the benchmark times a call: :class:`Clock` per device, and the rotating input buffers.

GPU (``cuda``): ``triton.testing.do_bench`` (median; L2 flushed before each call), the device
kernels' own time after the same flush and a fixed wait (:meth:`Clock.kernels`, torch.profiler) and, for decode
sizes, CUDA-graph replay (``do_bench_cudagraph``). A flush of normal writes leaves the lines a
load marked ``evict_last`` in L2 (Inductor's kernels and ours mark reused loads so), and the next
kernel reading those addresses hits; on CUDA the driver's ``cuCtxResetPersistingL2Cache`` returns
them to normal first (:func:`persisting_l2_reset`): before every flush of :meth:`Clock.kernels`,
before each do_bench and graph timing. CPU: ``torch.utils.benchmark.Timer.
blocked_autorange`` (median); other devices: a host loop ending with a device sync. Host time of
back-to-back calls (the dispatch group, the backward group's training-loop timing) is
:meth:`Clock.host_sample` / :meth:`Clock.host_times`. When a case's working set fits in the
last-level cache, several input sets are rotated (:func:`buffers`, :func:`rotating`) so no call
reads what the previous one left in cache.

This module measures only what it is given: it builds no inputs and judges no results. Triton is
imported only when a GPU is timed.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["Clock", "cache_bytes", "buffers", "rotating", "synchronises", "per_call_kernels", "persisting_l2_reset"]

ROTATE_CAP = {"cuda": 64, "cpu": 8}   # at most this many rotated input buffers


class Clock:
    """Times a zero-argument callable on one device; returns microseconds (median)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.type = device.type
        self.quick = quick
        self._reset_l2 = persisting_l2_reset(device) if self.type == "cuda" else None

    @property
    def resets_persisting_l2(self) -> bool:
        """Whether lines loaded ``evict_last`` are returned to normal before each flush (CUDA)."""
        return self._reset_l2 is not None

    def fresh_l2(self) -> None:
        """Let the device finish, then return every persisting (``evict_last``) L2 line to normal,
        so the next flush evicts it: nothing an earlier call loaded outlives the flush."""
        if self._reset_l2 is not None:
            self.sync()
            self._reset_l2()

    def sync(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.type != "cpu":
            mod = getattr(torch, self.type, None)
            if mod is not None and hasattr(mod, "synchronize"):
                mod.synchronize()

    @property
    def method(self) -> str:
        """The ``timing`` of a row timed by :meth:`time`."""
        return {"cuda": "do_bench", "cpu": "torch_timer"}.get(self.type, "host_loop")

    @property
    def rounds(self) -> int:
        """Alternating rounds over a GPU case's implementations (the engine's side-by-side timing)."""
        return 1 if self.quick else 3

    def time(self, fn: Callable[[], object], rounds: int = 1) -> float:
        """Median µs per call. ``rounds``: this is one of that many samples taken in alternating
        rounds, so do_bench's measuring time is split between them."""
        if self.type == "cuda":
            from triton.testing import do_bench

            warmup, rep = (10, 40) if self.quick else (25, 100)
            if rounds > 1:
                warmup, rep = max(5, warmup // rounds), max(20, rep // rounds)
            self.fresh_l2()  # what earlier implementations left; this one's own lines may stay
            return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median")) * 1e3
        if self.type == "cpu":
            return self._torch_timer(fn, 0.05 if self.quick else 0.2)
        return statistics.median(self.host_sample(fn) for _ in range(5 if self.quick else 9))

    def kernels(self, fn: Callable[[], object], calls: int = 12) -> float:
        """Median summed duration of the device kernels one call of ``fn`` launches, each call after
        the same L2 flush as :meth:`time` and a fixed wait on the device (torch.profiler's CUDA
        activity). Device time alone: a call whose host time outlasts the flush (a Python launch
        path on a slow host) shows it in do_bench's figure but not here."""
        from torch.profiler import ProfilerActivity, profile

        flush = _flush_buffer(self.device)
        fn()
        self.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                self.fresh_l2()  # a sync (no device time is read here) and the reset, then the flush
                flush.zero_()
                # a fixed wait on the device before the call: every implementation then starts
                # with the flush's dirty lines written back, however long its host launch takes
                # (a GPU left idle by a slow launch drains L2 meanwhile, and its kernel then runs
                # faster: Liger-Kernel's q+k read 33.3 or 36.0 µs with 20 or 7 µs of host gap)
                torch.cuda._sleep(_DRAIN_CYCLES)
                fn()
            self.sync()
        return _per_call_kernel_us(prof.events())

    def graph(self, fn: Callable[[], object]) -> float:
        """Median time per call of ``fn`` replayed in a CUDA graph (many calls per graph)."""
        from triton.testing import do_bench_cudagraph

        rep = 10 if self.quick else 20
        self.fresh_l2()
        try:
            ms = do_bench_cudagraph(fn, rep=rep, return_mode="median")
        except TypeError:  # a Triton without return_mode
            ms = do_bench_cudagraph(fn, rep=rep)
        return float(ms) * 1e3

    def host_sample(self, fn: Callable[[], object]) -> float:
        """One sample of the wall time per call of back-to-back calls ending with one sync: the
        host cost of a call whenever the device work is shorter than it (CPU: the torch Timer)."""
        if self.type == "cpu":
            return self._torch_timer(fn, 0.02 if self.quick else 0.05)
        fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        one = max(time.perf_counter() - start, 1e-6)
        n = max(10, min(5000, int((0.005 if self.quick else 0.02) / one)))
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        self.sync()
        return (time.perf_counter() - start) / n * 1e6

    def host_times(self, fns: Sequence[Callable]) -> list[tuple[float, float]]:
        """(median, min) host time per call of each callable over rounds that alternate between
        them, so that a change of load on the machine biases none against the others."""
        rounds = 5 if self.quick else 11
        samples: list[list[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for i, fn in enumerate(fns):
                samples[i].append(self.host_sample(fn))
        return [(statistics.median(s), min(s)) for s in samples]

    @staticmethod
    def _torch_timer(fn: Callable[[], object], min_run_time: float) -> float:
        from torch.utils.benchmark import Timer

        timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return float(timer.blocked_autorange(min_run_time=min_run_time).median) * 1e6


_FLUSH: dict = {}
_FLUSH_KERNEL = "FillFunctor<int>"  # zero_() of the int32 flush buffer: what separates the calls
_DRAIN_KERNEL = "spin_kernel"       # torch.cuda._sleep's kernel (not counted)
_DRAIN_CYCLES = 300_000             # ~150 µs at 2 GHz: longer than a Python launch and the write-back of L2


_RESET: dict = {}


def persisting_l2_reset(device: torch.device) -> Callable[[], None] | None:
    """The driver's ``cuCtxResetPersistingL2Cache`` for ``device`` (ctypes, libcuda): every L2 line
    a load marked persisting (``evict_last``) becomes normal, so a flush of normal writes evicts
    it. Without it such lines outlive a 256 MB flush: on the H200, q+k 4096x24/8 ran 7-11 % faster
    right after torch.compile's kernel or any ``evict_last`` read of the same inputs, and as fast as
    after nothing once reset (bench/studies/l2_persistence.py). None where there is none (ROCm, no
    libcuda, a driver that refuses the call)."""
    key = str(device)
    if key not in _RESET:
        _RESET[key] = _load_reset(device)
    return _RESET[key]


def _load_reset(device: torch.device) -> Callable[[], None] | None:
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL("libcuda.so.1").cuCtxResetPersistingL2Cache
        fn.restype = ctypes.c_int
        fn.argtypes = []
    except (OSError, AttributeError):
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()

    def reset() -> None:
        with torch.cuda.device(index):  # the call acts on the current context
            err = fn()
        if err:
            raise RuntimeError(f"cuCtxResetPersistingL2Cache: CUDA driver error {err}")

    try:
        reset()
    except RuntimeError:
        return None
    return reset


def _flush_buffer(device: torch.device) -> torch.Tensor:
    """256 MB of int32, as triton.testing.do_bench flushes the L2 with (one per device)."""
    key = str(device)
    if key not in _FLUSH:
        _FLUSH[key] = torch.empty(int(256e6 // 4), dtype=torch.int, device=device)
    return _FLUSH[key]


def per_call_kernels(events) -> list[tuple[float, float, int]]:
    """From profiler events of calls each preceded by the flush kernel: per call that ran a kernel,
    (summed device µs of its kernels, µs from the flush's end to its first kernel, kernel count).
    The fixed wait's kernel is neither counted nor a call's first kernel."""
    device_events = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                            and e.device_time > 0), key=lambda e: e.time_range.start)
    calls: list[tuple[float, float, int]] = []
    current = None  # [sum, gap, count, flush end]
    for e in device_events:
        if _FLUSH_KERNEL in e.name:
            if current and current[2]:
                calls.append((current[0], current[1], current[2]))
            current = [0.0, None, 0, e.time_range.end]
        elif current is not None and _DRAIN_KERNEL not in e.name:
            if current[1] is None:
                current[1] = e.time_range.start - current[3]
            current[0] += e.device_time
            current[2] += 1
    if current and current[2]:
        calls.append((current[0], current[1], current[2]))
    return calls


def _per_call_kernel_us(events) -> float:
    """The median over calls of their kernels' summed device time (NaN when none ran)."""
    calls = per_call_kernels(events)
    return statistics.median(c[0] for c in calls) if calls else float("nan")


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a working set must exceed not to be measured from cache."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except Exception:
        return 32 * 2**20


def buffers(nbytes: int, device: torch.device) -> int:
    """How many input sets to rotate: enough that together they exceed the cache twice over."""
    cap = ROTATE_CAP.get(device.type, 8)
    l2 = cache_bytes(device)
    if nbytes >= 2 * l2:
        return 1
    return max(1, min(cap, math.ceil(4 * l2 / max(nbytes, 1))))


def rotating(fns: list) -> Callable[[], object]:
    """One callable that runs ``fns`` in turn, one per call."""
    if len(fns) == 1:
        return fns[0]
    state = [0]
    n = len(fns)

    def call():
        i = state[0]
        state[0] = (i + 1) % n
        return fns[i]()
    return call


def synchronises(fn: Callable[[], object]) -> str | None:
    """Run ``fn`` once with CUDA sync debugging set to error: the message when it synchronises
    (a host-to-device copy of a Python scalar does), else None."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
