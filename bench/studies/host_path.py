"""One-off study: the dispatcher's and the autograd Function's own host cost, on the CPU.

    python bench/studies/host_path.py [--out DIR]

A repeated GPU call costs its dispatch (this library's Python up to the backend's runner), the
runner and the launch. This times the first part alone: a no-op backend registered for the CPU
with the highest priority (its runner returns the inputs, or fresh outputs out of place), so
``rb.apply`` / ``rb.apply_cached`` measure the dispatch path a GPU call takes. The value checks
that only CPU calls make (partial-rotary tables, position ranges; a GPU call skips them, they
would cost a sync) are switched off for the run, so the path is the GPU's. Next to them: one torch
op (``x.add_(0)``), and ``torch.autograd.grad`` through this library's Function, through
``x * 2`` and through a Function that does nothing (what autograd alone costs).

Host time per call as the benchmark's dispatch group takes it (``Clock.host_times``: the torch
Timer, 11 rounds alternating between the calls; median and least); writes ``host-path-study.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import rope_backends as rb  # noqa: E402
from rope_backends import dispatch, registry, validation  # noqa: E402
from rope_backends.benchmark import report  # noqa: E402
from rope_backends.benchmark.timing import Clock  # noqa: E402

NOOP = "noop-host-study"


def _noop_backend() -> registry.Backend:
    def outputs(tensors, inplace):
        return tuple(tensors) if inplace else tuple(torch.empty_like(t) for t in tensors)

    def prepare(args):
        inplace = args.inplace
        return lambda tensors, a, b: outputs(tensors, inplace)

    return registry.Backend(NOOP, ("cpu",), 10**9, lambda args: outputs(args.tensors, args.inplace), prepare=prepare)


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    # the GPU's path: no CPU-only value checks (restored below)
    saved = (validation.values_readable, validation.position_range_checked, dispatch.position_range_checked)
    validation.values_readable = lambda t: False
    validation.position_range_checked = dispatch.position_range_checked = lambda p: False
    registry.register_backend(_noop_backend())
    try:
        x = torch.randn(1, 8, 128)
        cos, sin = rb.cos_sin(torch.arange(1), 128)
        c, s = cos[:, None], sin[:, None]
        qkv = torch.randn(1, 48 * 128)
        q, k = qkv[:, :4096], qkv[:, 4096:5120]
        positions = torch.zeros(1, dtype=torch.int64)
        cache = rb.cos_sin_cache(4096, 128)
        small = torch.zeros(64)
        calls = {
            "one torch op (x.add_(0), 64 elements)": lambda: small.add_(0),
            "rb.apply (1,8,128), out of place": lambda: rb.apply(x, c, s),
            "rb.apply (1,8,128), in place": lambda: rb.apply(x, c, s, inplace=True),
            "rb.apply_cached q(1,4096) k(1,1024), in place": lambda: rb.apply_cached(q, k, positions, cache,
                                                                                     head_dim=128),
            "torch.empty_like of (1,8,128) (the out-of-place runner's allocation)": lambda: torch.empty_like(x),
        }
        xg = torch.randn(1, 8, 8, 128, requires_grad=True)
        cos8, sin8 = rb.cos_sin(torch.arange(8), 128)
        g = torch.randn(1, 8, 8, 128)
        y_rb, y_mul, y_nothing = rb.apply(xg, cos8[:, None], sin8[:, None]), xg * 2.0, _Nothing.apply(xg)
        backward = {
            "torch.autograd.grad through rb.apply's Function (the no-op backend)":
                lambda: torch.autograd.grad(y_rb, xg, g, retain_graph=True),
            "torch.autograd.grad through x * 2": lambda: torch.autograd.grad(y_mul, xg, g, retain_graph=True),
            "torch.autograd.grad through a do-nothing Function": lambda: torch.autograd.grad(y_nothing, xg, g,
                                                                                             retain_graph=True),
        }
        everything = {**calls, **backward}
        times = Clock(torch.device("cpu"), quick=False).host_times(list(everything.values()))
        rows = [{"call": n, "us": med, "us_min": least} for n, (med, least) in zip(everything, times)]
    finally:
        registry.unregister_backend(NOOP)
        validation.values_readable, validation.position_range_checked, dispatch.position_range_checked = saved
    for r in rows:
        print(f"  {r['call']:72s} {r['us']:7.3f} µs  (least {r['us_min']:.3f})")
    report.write_study({"threads": torch.get_num_threads(), "rows": rows}, a.out, "host-path-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
