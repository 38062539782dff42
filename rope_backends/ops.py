"""The ``torch.library`` facade: what ``torch.compile``, export and dispatch modes see.

Each public call becomes one opaque custom op, so a compiled graph keeps it whole (no graph
break, no re-derivation of the math by Inductor, which would contract into FMAs) and autograd
uses the registered backward: the same op with ``conjugate`` flipped (rotation by -theta).
Calls reach these ops only under torch.compile, a TorchDispatchMode (make_fx, FakeTensorMode,
...) or a jit trace, and for gradient calls on tensor subclasses (dispatch.py decides). Plain
eager calls bypass them: without a gradient they call the backend directly; with one they go
through autograd.py's Function.

The backend is resolved when the op runs (registry.resolve), from the ``backend`` string
(empty: overrides, then automatic selection), so a compiled graph follows the ``use_backend``
context it is called in. Checks that read addresses or values (memory overlap of in-place
targets, CPU position ranges) are made again in the op bodies, which run on real tensors: under
torch.compile and tracing validation sees fake tensors and cannot make them.

This module holds the ops and their registrations only, and must not import a backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import registry
from .contract import Layout, MRope, RopeArgs
from .memory import check_memory
from .modes import position_range_checked
from .validation import check_position_range

__all__ = ["run"]


def run(args: RopeArgs, backend: str | None) -> tuple[Tensor, ...]:
    """One op body's work: the backend :func:`registry.resolve` picks, on the validated args."""
    return registry.resolve(args, backend).forward(args)


def _checked(args: RopeArgs, names: tuple[str, ...]) -> RopeArgs:
    """The checks validation could not make on fake tensors (torch.compile, tracing), made where
    the op runs on real ones: memory overlap of in-place targets and, for CPU positions (or with
    ROPE_BACKENDS_DEBUG=1), position ranges. Out-of-place table ops (which also serve the
    backward) write nothing the caller holds and need neither."""
    if args.cache is not None:
        if position_range_checked(args.positions):
            check_position_range(args.positions, args.cache)
        read = (("positions", args.positions), ("cos_sin_cache", args.cache))
    else:
        read = (("cos", args.cos), ("sin", args.sin))
    if args.inplace:  # out of place nothing the caller holds is written
        check_memory(tuple(zip(names, args.tensors)), read, True)
    return args


def _table_args(tensors, inplace, cos, sin, layout, rotary_dim, conjugate) -> RopeArgs:
    return RopeArgs(tuple(tensors), inplace, Layout(layout), rotary_dim, conjugate, cos=cos, sin=sin)


def _cached_args(tensors, inplace, positions, cache, axis_map, layout, rotary_dim) -> RopeArgs:
    mrope = MRope(tuple(axis_map)) if axis_map is not None else None
    return RopeArgs(tuple(tensors), inplace, Layout(layout), rotary_dim,
                    positions=positions, cache=cache, mrope=mrope)


# ---- explicit cos/sin, one tensor -------------------------------------------------------------

@custom_op("rope_backends::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor, layout: str, rotary_dim: int, conjugate: bool, backend: str) -> Tensor:
    return run(_table_args((x,), False, cos, sin, layout, rotary_dim, conjugate), backend)[0]  # reads only


@rope.register_fake
def _(x, cos, sin, layout, rotary_dim, conjugate, backend):
    return torch.empty_like(x)


def _rope_setup(ctx, inputs, output):
    _, cos, sin, layout, rotary_dim, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.meta = (layout, rotary_dim, not conjugate, backend)


def _rope_backward(ctx, grad):
    cos, sin = ctx.saved_tensors
    grad = grad.resolve_neg()  # a negated-view grad_outputs: the kernel must read its values
    return torch.ops.rope_backends.rope(grad, cos, sin, *ctx.meta), None, None, None, None, None, None


rope.register_autograd(_rope_backward, setup_context=_rope_setup)


@custom_op("rope_backends::rope_", mutates_args=("x",))
def rope_(x: Tensor, cos: Tensor, sin: Tensor, layout: str, rotary_dim: int, conjugate: bool, backend: str) -> None:
    run(_checked(_table_args((x,), True, cos, sin, layout, rotary_dim, conjugate), ("x",)), backend)


@rope_.register_fake
def _(x, cos, sin, layout, rotary_dim, conjugate, backend):
    return None


# ---- explicit cos/sin, q and k in one call ----------------------------------------------------

@custom_op("rope_backends::rope_qk", mutates_args=())
def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, rotary_dim: int,
            conjugate: bool, backend: str) -> tuple[Tensor, Tensor]:
    q_out, k_out = run(_table_args((q, k), False, cos, sin, layout, rotary_dim, conjugate), backend)  # reads only
    return q_out, k_out


@rope_qk.register_fake
def _(q, k, cos, sin, layout, rotary_dim, conjugate, backend):
    return torch.empty_like(q), torch.empty_like(k)


def _rope_qk_setup(ctx, inputs, output):
    q, k, cos, sin, layout, rotary_dim, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.meta = (layout, rotary_dim, not conjugate, backend)
    ctx.like = (q, k)


def _rope_qk_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    # an output that did not reach the loss brings no gradient: stand in zeros of its shape
    grad_q = torch.zeros_like(ctx.like[0]) if grad_q is None else grad_q
    grad_k = torch.zeros_like(ctx.like[1]) if grad_k is None else grad_k
    grad_q, grad_k = grad_q.resolve_neg(), grad_k.resolve_neg()  # negated-view grad_outputs
    gq, gk = torch.ops.rope_backends.rope_qk(grad_q, grad_k, cos, sin, *ctx.meta)
    return gq, gk, None, None, None, None, None, None


rope_qk.register_autograd(_rope_qk_backward, setup_context=_rope_qk_setup)


@custom_op("rope_backends::rope_qk_", mutates_args=("q", "k"))
def rope_qk_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, rotary_dim: int,
             conjugate: bool, backend: str) -> None:
    run(_checked(_table_args((q, k), True, cos, sin, layout, rotary_dim, conjugate), ("q", "k")), backend)


@rope_qk_.register_fake
def _(q, k, cos, sin, layout, rotary_dim, conjugate, backend):
    return None


# ---- positions into a cos/sin cache (serving; k optional) -------------------------------------

@custom_op("rope_backends::rope_cached", mutates_args=())
def rope_cached(q: Tensor, k: Optional[Tensor], positions: Tensor, cache: Tensor, axis_map: Optional[list[int]],
                layout: str, rotary_dim: int, backend: str) -> list[Tensor]:
    tensors = (q,) if k is None else (q, k)
    args = _cached_args(tensors, False, positions, cache, axis_map, layout, rotary_dim)
    return list(run(_checked(args, ("q", "k")), backend))


@rope_cached.register_fake
def _(q, k, positions, cache, axis_map, layout, rotary_dim, backend):
    return [torch.empty_like(q)] + ([] if k is None else [torch.empty_like(k)])


@custom_op("rope_backends::rope_cached_", mutates_args=("q", "k"))
def rope_cached_(q: Tensor, k: Optional[Tensor], positions: Tensor, cache: Tensor, axis_map: Optional[list[int]],
                 layout: str, rotary_dim: int, backend: str) -> None:
    tensors = (q,) if k is None else (q, k)
    run(_checked(_cached_args(tensors, True, positions, cache, axis_map, layout, rotary_dim), ("q", "k")), backend)


@rope_cached_.register_fake
def _(q, k, positions, cache, axis_map, layout, rotary_dim, backend):
    return None
