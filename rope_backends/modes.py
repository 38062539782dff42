"""What the current call is running under, asked of torch: probes, no decisions.

Each probe answers one question per call, cheaply (most are one C query): is a functorch
transform active (``vmap``/``grad``/``jvp``...), is a TorchDispatchMode or a jit trace watching,
are debug checks on (``ROPE_BACKENDS_DEBUG=1``), and therefore may a check read tensor values
(:func:`values_readable`, :func:`position_range_checked`) without a device sync or a fake tensor.
:func:`plain` peels functorch's wrappers off a tensor to reach its memory.

Where a torch lacks one of the C queries, a stand-in answers "not active". This module decides
no routing (dispatch.py does) and imports no other rope_backends module.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["debug_checks", "functorch_transform", "plain", "dispatch_modes", "jit_trace_state", "traced",
           "values_readable", "position_range_checked"]


def debug_checks() -> bool:
    """Opt-in checks that cost a device sync (position ranges on GPU): ``ROPE_BACKENDS_DEBUG=1``."""
    return os.environ.get("ROPE_BACKENDS_DEBUG", "0") not in ("", "0")


_F = getattr(torch._C, "_functorch", None)
_is_wrapped = getattr(_F, "is_functorch_wrapped_tensor", None)
_is_batched = getattr(_F, "is_batchedtensor", None)
_unwrapped = getattr(_F, "get_unwrapped", None)
_bdim = getattr(_F, "maybe_get_bdim", None)
# the innermost active functorch transform, or None
functorch_transform = getattr(_F, "peek_interpreter_stack", None) or (lambda: None)


def plain(t: Tensor) -> Tensor:
    """The tensor with its memory: functorch's wrappers (vmap, grad, jvp levels) peeled off, a
    vmapped tensor's batch dim moved to the front (its memory is every sample's). Plain tensors
    come back as they are."""
    if _is_wrapped is None or _unwrapped is None:
        return t
    while _is_wrapped(t):
        if _is_batched is not None and _bdim is not None and _is_batched(t):
            t = _unwrapped(t).movedim(_bdim(t), 0)
        else:
            t = _unwrapped(t)
    return t


# C queries (stand-ins where a torch lacks them): active TorchDispatchModes, the jit trace state
dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None) or (lambda: 0)
jit_trace_state = getattr(torch._C, "_get_tracing_state", None) or (lambda: None)


def traced() -> bool:
    """A TorchDispatchMode (make_fx, FakeTensorMode, FlopCounterMode, ...) or a jit trace is
    active: the call must reach it as one op (the custom op; a kernel launch is invisible to it),
    and tensor values may not be readable (no data-dependent checks)."""
    return bool(dispatch_modes()) or jit_trace_state() is not None


def values_readable(t: Tensor) -> bool:
    """Whether a check may read ``t``'s values: a CPU tensor (or any device with
    ``ROPE_BACKENDS_DEBUG=1``, where a read costs a sync), outside torch.compile and dispatch
    modes (fake tensors have none)."""
    if torch.compiler.is_compiling() or traced():
        return False
    kind = plain(t).device.type
    return kind != "meta" and (kind == "cpu" or debug_checks())


def position_range_checked(positions: Tensor) -> bool:
    """Whether calls check position values: always on CPU; on devices only with
    ``ROPE_BACKENDS_DEBUG=1``, since reading values back costs a sync."""
    return positions.device.type == "cpu" or debug_checks()
