"""The baselines: calls timed next to the rope calls that compute no rope, as yardsticks.

- :data:`SAME_BYTES_COPY`: a copy that moves as many bytes as the case (the like-for-like ceiling
  of a case too small to reach the large copy's bandwidth);
- :data:`TORCH_OP`: one eager torch op (``x.add_(0)``), what one C++ op costs the host;
- :data:`TORCH_AUTOGRAD_OP`: ``y = x * 2`` through autograd, what the autograd engine costs;
- :data:`EMPTY_LAUNCH`: a Triton kernel that does nothing (the floor of a launch);
- :data:`DIRECT_LAUNCH`: the triton backend's compiled kernel launched with a plan built up front
  (``launch.launch_floor``), the floor of a call's host time.

Their rows have ``kind="baseline"`` and ``bit_exact`` None (nothing to compare). This module
imports Triton and the triton backend only when a baseline that needs them is built.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..validation import args_for_cached, args_for_tables
from .scenarios import HEAD_DIM, Impl, Skip, autograd_prepare

__all__ = ["SAME_BYTES_COPY", "TORCH_OP", "TORCH_AUTOGRAD_OP", "EMPTY_LAUNCH", "DIRECT_LAUNCH"]

SAME_BYTES_COPY = "copy-same-bytes"
TORCH_OP = "torch add_ (one op)"
TORCH_AUTOGRAD_OP = "torch mul (one op, autograd)"
EMPTY_LAUNCH = "empty-triton-launch"
DIRECT_LAUNCH = "triton compiled launch"


def same_bytes_copy(nbytes: int, device: torch.device) -> Impl:
    """A device copy that reads and writes as many bytes as a case counts (``nbytes`` in all)."""
    def prepare(d):
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return lambda: (dst.copy_(src),)
    return Impl(SAME_BYTES_COPY, "baseline", prepare, checked=False,
                note="Tensor.copy_ of nbytes/2 into nbytes/2, timed like the rope calls: the copy "
                     "bandwidth this device reaches at the case's size (launch, ramp and tail included)")


def torch_op(device: torch.device) -> Impl:
    """What one eager torch op costs the host here, the yardstick of the host-time targets."""
    def prepare(d):
        x = torch.zeros(64, device=device)
        return lambda: (x.add_(0),)
    return Impl(TORCH_OP, "baseline", prepare, checked=False,
                note="x.add_(0) on a 64-element tensor of the device: one torch C++ op, timed the same way")


def torch_autograd_op(op: str) -> Impl:
    return Impl(TORCH_AUTOGRAD_OP, "baseline", autograd_prepare(op, lambda x, c, s: x * 2.0), checked=False,
                note="y = x * 2 through autograd (one torch kernel each way, the same bytes): what the "
                     "autograd engine itself costs a backward on this machine")


_EMPTY = {}


def empty_kernel():
    """A Triton kernel that does nothing: the floor of a launch."""
    if "k" not in _EMPTY:
        import triton

        @triton.jit
        def empty_kernel(x_ptr):
            pass

        _EMPTY["k"] = empty_kernel
    return _EMPTY["k"]


def direct_launch(op: str) -> Impl:
    return Impl(DIRECT_LAUNCH, "baseline", lambda d: direct_triton(d, op), mutates=op == "apply_cached",
                note="the compiled Triton kernel's launcher called directly (prebuilt plan, "
                     "current stream passed): the floor of a call's host time")


def direct_triton(d: dict, op: str) -> Callable[[], tuple]:
    """The triton backend's compiled kernel launched with a plan built up front, as its prepared
    runner launches it (``launch.launch_floor``): the floor for the host cost of a call."""
    try:
        from ..backends.triton import launch
    except Exception as exc:
        raise Skip(f"triton backend launch module unavailable: {exc}") from None
    if op == "apply":
        args = args_for_tables((("x", d["x"]),), d["cos"], d["sin"], "neox", None, False)
    else:
        args, originals = args_for_cached(d["q"], d["k"], d["positions"], d["cache"], "neox", None, None, True,
                                          HEAD_DIM)
    try:
        run_ = launch.launch_floor(args)
    except Exception as exc:
        raise Skip(f"triton direct launch unavailable: {type(exc).__name__}: {exc}") from None
    if op == "apply":
        return run_

    def run_cached():
        run_()
        return originals
    return run_cached
