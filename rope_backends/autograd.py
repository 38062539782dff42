"""The eager autograd path: a plain ``autograd.Function`` around a backend.

Eager calls that need a gradient (training), and every call under a functorch transform
(``torch.func.vmap``/``grad``/``jvp``/``jacrev``/``jacfwd``) or a forward-AD level
(``torch.autograd.forward_ad``), run the backend through :class:`_EagerRotation` instead of the
custom ops (ops.py): the custom op's autograd wrapper and redispatches cost ~100 us of host time
per forward + backward (H100 machine: a 29 us kernel took 176 us to differentiate), which a
small training step pays for every layer. The gradient of a rotation by theta is the rotation of
the upstream gradient by -theta (docs/contract.md, "Numerics"), so backward is the same backend
call with ``conjugate`` flipped.

The same Function carries forward-mode AD and functorch: its ``jvp`` rotates the tangent by the
same angles, its ``vmap`` moves batch dims to the front and calls the backend on plain tensors
once (``jacrev`` vmaps the backward). A backend (a Triton kernel) only ever sees plain tensors:
every rule that still runs under a transform goes through the Function again, one level down.

This module validates nothing (its callers pass validated args), selects no backend (it is
handed one) and must not import a backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import registry
from .contract import Layout, RopeArgs
from .modes import functorch_transform
from .signatures import metadata_guard

__all__ = ["Rotation", "rotate", "eager_autograd_runner"]

_forward_ad = torch.autograd.forward_ad  # its _current_level (-1: no dual level) is read per call


class Rotation:
    """One backend's out-of-place rotation with fixed options (layout, rotary_dim, direction), run
    on any tensors and half-form cos/sin: ``rotation(tensors, cos, sin) -> outputs``. It keeps the
    backend's prepared runner per signature of those tensors (a backward sees one or two: its
    gradients' strides), so a repeated call skips the backend's planning."""

    __slots__ = ("backend", "layout", "rotary_dim", "conjugate", "tables", "_runners", "_reverse", "_recent")
    _MAX_RUNNERS = 16
    _RECENT_SIZE = 4

    def __init__(self, backend: registry.Backend, layout: Layout, rotary_dim: int, conjugate: bool,
                 tables: str = "cos") -> None:
        self.backend, self.layout, self.rotary_dim, self.conjugate = backend, layout, rotary_dim, conjugate
        self.tables = tables  # the caller's name for where cos/sin came from, for errors
        self._runners: dict[tuple, object] = {}
        self._reverse: Rotation | None = None
        # the last few signatures as (tensor count, C++ guard of their metadata, runner): a repeated
        # call (every backward of a training loop) checks one in C++ instead of building the key
        self._recent: list[tuple] = []

    def reverse(self) -> "Rotation":
        """The rotation by -theta (the backward), made once."""
        if self._reverse is None:
            self._reverse = Rotation(self.backend, self.layout, self.rotary_dim, not self.conjugate, self.tables)
            self._reverse._reverse = self
        return self._reverse

    def __call__(self, tensors: tuple[Tensor, ...], cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        n = len(tensors)
        for count, guard, run in self._recent:
            if count == n:
                try:
                    if guard.check(*tensors, cos, sin):
                        return run(tensors, cos, sin)
                except (TypeError, RuntimeError):  # not plain tensors: the key below
                    break
        key = (cos.shape, cos.stride(), cos.dtype, sin.stride(), sin.dtype, cos.device)
        for t in tensors:
            key += (t.shape, t.stride(), t.dtype, t.device)
        run = self._runners.get(key)
        if run is not None:
            self._remember(tensors, cos, sin, run)
            return run(tensors, cos, sin)
        args = RopeArgs(tuple(tensors), False, self.layout, self.rotary_dim, self.conjugate, cos=cos, sin=sin)
        outs = self.backend.forward(args)
        if self.backend.prepare is not None and len(self._runners) < self._MAX_RUNNERS:
            run = self.backend.prepare(args)
            if run is not None:
                self._runners[key] = run
                self._remember(tensors, cos, sin, run)
        return outs

    def _remember(self, tensors: tuple[Tensor, ...], cos: Tensor, sin: Tensor, run) -> None:
        """Put ``run`` at the front of the recent signatures, behind a guard of every tensor's
        metadata (signatures.metadata_guard: a superset of the key's fields)."""
        every = (*tensors, cos, sin)
        if not all(type(t) is Tensor for t in every):
            return  # a subclass's own metadata is not in the guard
        guard = metadata_guard(every)
        if guard is not None:
            self._recent.insert(0, (len(tensors), guard, run))
            del self._recent[self._RECENT_SIZE:]


def rotate(rotation: Rotation, cos: Tensor, sin: Tensor, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``rotation`` of ``tensors`` out of place: through :class:`_EagerRotation` when something must
    see the call (a functorch transform, a forward-AD level, autograd), else the backend directly."""
    if (functorch_transform() is not None or _forward_ad._current_level >= 0
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return _apply_rotation(rotation, cos, sin, *tensors)
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
        if len(grads) == 1:  # apply: the common case without generators (host time per layer)
            if grads[0] is None or not ctx.needs_input_grad[3]:
                return None, None, None, None
            # a user's grad_outputs reach here as given: a lazily negated view must be read as values
            grads = (grads[0].resolve_neg(),)
        else:
            if not any(ctx.needs_input_grad[3:]) or all(g is None for g in grads):
                return (None,) * (3 + len(grads))
            grads = _filled(grads, ctx.shapes)  # an output that did not reach the loss: zeros
            grads = tuple(g.resolve_neg() for g in grads)
        cos, sin = ctx.saved_tensors
        back = ctx.rotation.reverse()
        if torch.is_grad_enabled() or functorch_transform() is not None:
            # create_graph=True records the backward too; under jacrev (vmap of the backward) the
            # gradients are batched: the Function's vmap rule hands the backend plain tensors
            grads_in = _apply_rotation(back, cos, sin, *grads)
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


# torch's Function.apply binds the arguments to forward's signature through inspect.signature on
# every call when setup_context is defined (~20 us of host time per call on a CI core, about as much
# as the rest of a training call), then, with no functorch transform active, calls the C++
# apply. forward here takes positional arguments without defaults, so the binding changes nothing:
# outside transforms, the C++ apply directly (after unwrapping dead functorch wrappers, as torch does).
try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead
    _c_apply = super(torch.autograd.Function, _EagerRotation).apply
    _transforms_active = torch._C._are_functorch_transforms_active
except Exception:  # another torch: Function.apply as it is
    _c_apply = None


def _apply_rotation(*args):
    """``_EagerRotation.apply(*args)``, without the per-call signature binding where it changes nothing."""
    if _c_apply is None or _transforms_active():
        return _EagerRotation.apply(*args)
    return _c_apply(*_unwrap_dead(args))


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
        return _apply_rotation(rotation, *half_tables(cos, sin), *tensors)
    return run
