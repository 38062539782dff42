"""The ``torch.library`` facade: what ``torch.compile``, export and autograd see.

Each public call becomes one opaque custom op, so a compiled graph keeps it whole (no graph
break, no re-derivation of the math by Inductor, which would contract into FMAs) and autograd
uses the registered backward: the same op with ``conjugate`` flipped (rotation by -theta).
Plain eager calls bypass these ops (see dispatch.py): without a gradient they call the backend
directly; with one (training) they go through :class:`_EagerRotation`, a plain
``autograd.Function`` with the same backward. The custom op's autograd wrapper and redispatches
cost ~100 us of host time per forward + backward (H100 machine: a 29 us kernel took 176 us to
differentiate), which a small training step pays for every layer.

The same Function carries forward-mode AD and functorch: its ``jvp`` rotates the tangent by the
same angles (``torch.autograd.forward_ad``, ``torch.func.jvp``/``jacfwd``), its ``vmap`` moves batch
dims to the front and calls the backend on plain tensors once (``torch.func.vmap``, and ``jacrev``,
which vmaps the backward). A backend (a Triton kernel) only ever sees plain tensors: every rule that
still runs under a transform goes through the Function again, one level down.

The backend is resolved when the op runs, from the ``backend`` string (empty: overrides, then
automatic selection), so a compiled graph follows the ``use_backend`` context it is called in.
Checks that read addresses or values (memory overlap of in-place targets, CPU position ranges)
are made again in the op bodies, which run on real tensors: under torch.compile and tracing
validation sees fake tensors and cannot make them.

This module must not import a backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op

from . import override, registry
from .spec import (Layout, MRope, RopeArgs, check_memory, check_position_range, functorch_transform,
                   position_range_checked)

__all__ = ["run", "resolve", "eager_autograd_runner", "rotate", "Rotation"]


def resolve(args: RopeArgs, backend: str | None) -> registry.Backend:
    """The backend for this call: argument > use_backend > ROPE_BACKEND > priority."""
    device_type = args.tensors[0].device.type
    name, source = override.requested(device_type, backend or None)
    return registry.select(device_type, args, name, source)


def run(args: RopeArgs, backend: str | None) -> tuple[Tensor, ...]:
    return resolve(args, backend).forward(args)


class Rotation:
    """One backend's out-of-place rotation with fixed options (layout, rotary_dim, direction), run
    on any tensors and half-form cos/sin: ``rotation(tensors, cos, sin) -> outputs``. It keeps the
    backend's prepared runner per signature of those tensors (a backward sees one or two: its
    gradients' strides), so a repeated call skips the backend's planning."""

    __slots__ = ("backend", "layout", "rotary_dim", "conjugate", "tables", "_runners", "_reverse")
    _MAX_RUNNERS = 16

    def __init__(self, backend: registry.Backend, layout: Layout, rotary_dim: int, conjugate: bool,
                 tables: str = "cos") -> None:
        self.backend, self.layout, self.rotary_dim, self.conjugate = backend, layout, rotary_dim, conjugate
        self.tables = tables  # the caller's name for where cos/sin came from, for errors
        self._runners: dict[tuple, object] = {}
        self._reverse: Rotation | None = None

    def reverse(self) -> "Rotation":
        """The rotation by -theta (the backward), made once."""
        if self._reverse is None:
            self._reverse = Rotation(self.backend, self.layout, self.rotary_dim, not self.conjugate, self.tables)
            self._reverse._reverse = self
        return self._reverse

    def __call__(self, tensors: tuple[Tensor, ...], cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        key = (cos.shape, cos.stride(), cos.dtype, sin.stride(), sin.dtype, cos.device)
        for t in tensors:
            key += (t.shape, t.stride(), t.dtype, t.device)
        run = self._runners.get(key)
        if run is not None:
            return run(tensors, cos, sin)
        args = RopeArgs(tuple(tensors), False, self.layout, self.rotary_dim, self.conjugate, cos=cos, sin=sin)
        outs = self.backend.forward(args)
        if self.backend.prepare is not None and len(self._runners) < self._MAX_RUNNERS:
            run = self.backend.prepare(args)
            if run is not None:
                self._runners[key] = run
        return outs


def rotate(rotation: Rotation, cos: Tensor, sin: Tensor, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``rotation`` of ``tensors`` out of place: through :class:`_EagerRotation` when something must
    see the call (a functorch transform, a forward-AD level, autograd), else the backend directly."""
    if (functorch_transform() is not None or _forward_ad._current_level >= 0
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return _EagerRotation.apply(rotation, cos, sin, *tensors)
    return tuple(rotation(tensors, cos, sin))


class _EagerRotation(torch.autograd.Function):
    """``rotation(tensors, cos, sin)`` with autograd: the gradient of a rotation by theta is the
    rotation of the upstream gradient by -theta (differentiable again under ``create_graph``);
    cos/sin get none, as with the custom ops. Forward-mode AD: the tangent is rotated by theta,
    like the primal; a tangent on cos/sin is refused (it would be dropped). vmap: batch dims to
    the front, one backend call on plain tensors."""

    @staticmethod
    def forward(rotation: Rotation, cos: Tensor, sin: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(rotation(tensors, cos, sin))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # this form also serves torch.func transforms
        rotation, cos, sin = inputs[:3]
        ctx.rotation = rotation
        ctx.shapes = tuple(t.shape for t in inputs[3:])
        ctx.dtype = inputs[3].dtype
        ctx.save_for_backward(cos, sin)
        ctx.save_for_forward(cos, sin)
        # None for an absent gradient or tangent instead of zeros: a tangent on cos/sin must be
        # told from none at all (materialised, both are zeros)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        if not any(ctx.needs_input_grad[3:]) or all(g is None for g in grads):
            return (None,) * (3 + len(grads))
        cos, sin = ctx.saved_tensors
        grads = _filled(grads, ctx.shapes)  # an output that did not reach the loss: zeros
        # a user's grad_outputs reach here as given: a lazily negated view must be read as values
        grads = tuple(g.resolve_neg() for g in grads)
        back = ctx.rotation.reverse()
        if torch.is_grad_enabled() or functorch_transform() is not None:
            # create_graph=True records the backward too; under jacrev (vmap of the backward) the
            # gradients are batched: the Function's vmap rule hands the backend plain tensors
            grads_in = _EagerRotation.apply(back, cos, sin, *grads)
        else:
            grads_in = back(grads, cos, sin)
        return (None, None, None, *grads_in)

    @staticmethod
    def jvp(ctx, _rotation, cos_t, sin_t, *tangents):
        if cos_t is not None or sin_t is not None:
            name = ctx.rotation.tables
            what = "cos/sin" if name == "cos" else name
            raise ValueError(
                f"{name}: expected {what} without a forward-mode tangent (derivatives flow through the rotated "
                f"tensors only), got {what} carrying one; pass {what} without a tangent (e.g. a tensor made outside the "
                f"dual level or transform)"
            )
        cos, sin = ctx.saved_tensors
        if all(t is None for t in tangents):
            return tuple(cos.new_zeros(shape, dtype=ctx.dtype) for shape in ctx.shapes)
        tangents = tuple(t.resolve_neg() for t in _filled(tangents, ctx.shapes))
        return rotate(ctx.rotation, cos, sin, tangents)

    @staticmethod
    def vmap(info, in_dims, rotation: Rotation, cos: Tensor, sin: Tensor, *tensors: Tensor):
        """Batch dims to the front; every rotated tensor gets rank 1 + the largest per-sample rank
        (size-1 dims after the batch dim, so a batched cos/sin lines up with the batch dim under
        torch's right-aligned broadcasting); unbatched rotated tensors are expanded (read only:
        the rotation is out of place). One call on the backend, then the extra dims dropped."""
        size = info.batch_size
        cos_dim, sin_dim = in_dims[1], in_dims[2]
        dims = in_dims[3:]
        ranks = [t.dim() - (d is not None) for t, d in zip(tensors, dims)]
        rank = 1 + max(ranks)
        moved = []
        for t, d, r in zip(tensors, dims, ranks):
            t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(size, *t.shape)
            moved.append(t[(slice(None),) + (None,) * (rank - 1 - r)])
        if cos_dim is not None or sin_dim is not None:
            cos = cos.movedim(cos_dim, 0) if cos_dim is not None else cos.unsqueeze(0).expand(size, *cos.shape)
            sin = sin.movedim(sin_dim, 0) if sin_dim is not None else sin.unsqueeze(0).expand(size, *sin.shape)
            pad = (slice(None),) + (None,) * (rank - cos.dim())
            cos, sin = cos[pad], sin[pad]
        outs = rotate(rotation, cos, sin, tuple(moved))
        outs = tuple(o.reshape(size, *(t.shape if d is None else _sample_shape(t, d)))
                     for o, t, d in zip(outs, tensors, dims))
        return outs, (0,) * len(outs)


def _filled(values: tuple[Tensor | None, ...], shapes: tuple) -> tuple[Tensor, ...]:
    """Gradients or tangents with zeros (of the rotated tensor's shape) standing in for None."""
    like = next(v for v in values if v is not None)
    return tuple(like.new_zeros(shape) if v is None else v for v, shape in zip(values, shapes))


def _sample_shape(t: Tensor, dim: int) -> tuple[int, ...]:
    shape = list(t.shape)
    del shape[dim]
    return tuple(shape)


def eager_autograd_runner(backend: registry.Backend, args: RopeArgs):
    """For a validated out-of-place table call that needs a gradient, outside compile:
    ``runner(tensors, cos, sin) -> outputs`` (cos/sin as the caller passed them, either form),
    recording :class:`_EagerRotation` on the autograd graph (torch.func.grad included: the custom
    ops' generated autograd.Function does not support functorch transforms)."""
    rotation = Rotation(backend, args.layout, args.rotary_dim, args.conjugate)
    half_tables = args.half_tables

    def run(tensors, cos, sin):
        return _EagerRotation.apply(rotation, *half_tables(cos, sin), *tensors)
    return run


_peek_interpreter_stack = functorch_transform
_forward_ad = torch.autograd.forward_ad  # its _current_level (-1: no dual level) is read per call


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
