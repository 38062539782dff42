"""The public calls: validate -> pick the backend for the tensors' device -> run it.

Imports no backend. After validation, one routing function (:func:`_route`) decides how every
call runs (docs/contract.md, "Dispatch"): eager calls that need no gradient go straight to the
backend's ``forward`` through a cached selection (a dict lookup); eager calls that need one, and
every call under a functorch transform (``torch.func.vmap``/``grad``/``jvp``/``jacrev``/``jacfwd``)
or a forward-AD level (``torch.autograd.forward_ad``), go through a plain ``autograd.Function``
around the backend (autograd.py: backward, ``jvp`` and ``vmap`` rules; in place, the out-of-place
result is then copied into the targets, so tangents and batches follow the copy); calls under
``torch.compile``, a TorchDispatchMode (make_fx, FakeTensorMode, ...) or a jit trace go through
the custom ops of ops.py, which those see as one op and which carry the backward.

The repeated call: a call's *signature* (every type, shape, stride, dtype, device, grad flag and
option that validation reads) together with the override state keys a runner that the selected
backend prepared for that signature (``Backend.prepare``). A call whose signature was validated
before runs that runner directly: no re-validation, no selection, no planning. That is what keeps
the host time of ``rb.apply`` near that of launching the kernel by hand. Addresses are not in a
signature, so each runner comes with a memory guard (memory.memory_guard): a few address
comparisons that hold while the tensors that must not overlap keep disjoint byte ranges or the
distance validated for them; otherwise the call takes the full checks. Each runner is kept with
the registry generation read *before* its backend was selected and run, and is used only while
that generation is current: a registry change (``registry.invalidate``), even one made from
inside a backend's forward or by another thread during the call, retires it.

The repeated-call lookups stay inline in each public function, before validation: the
C++-guarded recent signatures (``_RECENT_*``), then the signature key, spelled out field by field
(tests/test_dispatch.py checks that the three keys carry the same fields). They are the measured
host cost of a repeated call; everything after them runs once per new signature.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from . import autograd, ops, override, reference, registry  # noqa: F401  (ops: registers the custom ops)
from .contract import Layout, MRope, RopeArgs
from .memory import memory_guard
from .modes import dispatch_modes, functorch_transform, jit_trace_state, position_range_checked, traced
from .signatures import TensorGuards, metadata_guard
from .validation import args_for_cached, args_for_tables, check_partial_rotary, check_position_range

__all__ = ["apply", "apply_qk", "apply_cached"]

# signature -> (registry generation, runner, memory guard or None)
_RUNNERS: dict[tuple, tuple[int, Callable, Callable | None]] = {}
_MAX_RUNNERS = 4096  # serving changes T every step: bound the memory, rebuild after a clear
_GENERATION = registry._GENERATION  # the registry's counter (a one-element list, updated in place)
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_override_context = override._context
_env_raw = override.raw_env(override.ENV)  # ROPE_BACKEND, as stored: part of every runner key
_DEBUG_ENV = "ROPE_BACKENDS_DEBUG"
_debug_raw = override.raw_env(_DEBUG_ENV)


_traced = traced  # a mode or trace watching: it must see the call as one op (the custom op)


# What a repeated call checks before taking a prepared runner (inline, it runs on every call): no
# torch.func transform (wrapped tensors), no forward-AD level (dual tensors), no dispatch mode
# and no jit trace watching (_traced)
_transform = functorch_transform
_forward_ad = torch.autograd.forward_ad  # _current_level: -1 outside every dual_level()
_modes = dispatch_modes
_jit_trace = jit_trace_state


def _may_take_runner(inplace: object, compiling: bool) -> bool:
    """Whether a call may look up a prepared runner: a plain bool ``inplace`` (validation rejects
    the rest), outside torch.compile, with no functorch transform, forward-AD level, dispatch
    mode or jit trace watching (those must see the call as one op, or need its derivative)."""
    return ((inplace is True or inplace is False) and not compiling and _forward_ad._current_level < 0
            and _transform() is None and not _modes() and _jit_trace() is None)


def _transforming() -> bool:
    """A functorch transform or a forward-AD level is active: the call goes through the autograd
    Function (autograd._EagerRotation), whose rules hand the backend plain tensors."""
    return _transform() is not None or _forward_ad._current_level >= 0


def _check_backend(backend: object, compiling: bool) -> None:
    """The ``backend=`` argument as a string (override.check_argument); under torch.compile, where
    the op resolves it when it runs, at least the empty string that would mean "automatic"."""
    if not compiling:
        override.check_argument(backend)
    elif backend == "":
        override.check_argument(backend)


def _cacheable(tensors: tuple, layout: object, rotary_dim: object, backend: object,
               head_dim: object = None, mrope: object = None) -> bool:
    """Whether a call's key may keep a runner: exact ``torch.Tensor`` arguments (subclasses such
    as Parameter or FakeTensor, and ``None`` for k, aside) and plain option types, so that no two
    calls that validation tells apart share a key (``1 == True``, and a subclass's metadata)."""
    return (all(t is None or type(t) is Tensor for t in tensors) and type(layout) in (str, Layout)
            and (rotary_dim is None or type(rotary_dim) is int) and (head_dim is None or type(head_dim) is int)
            and (backend is None or type(backend) is str) and (mrope is None or type(mrope) is MRope))


def _without_negative_bit(named: tuple[tuple[str, object], ...], rotated: int, inplace: object) -> list:
    """The operands with torch's lazy negation applied (``.conj().imag`` of a complex tensor and
    ``torch._neg_view`` give views whose values are the negated memory): a kernel reads memory,
    so it must see the values. The first ``rotated`` operands are written when in place: a
    negated view cannot take a kernel's write, so that is refused (nothing written)."""
    out = []
    for i, (name, t) in enumerate(named):
        if isinstance(t, Tensor) and t.is_neg():
            if i < rotated and inplace is True:
                raise ValueError(
                    f"{name}: expected a tensor without torch's negative bit for inplace=True, got a lazily "
                    f"negated view (e.g. from .conj().imag); pass {name}.resolve_neg() or inplace=False")
            t = t.resolve_neg()
        out.append(t)
    return out


def _negated(a: object, b: object = None, c: object = None, d: object = None) -> bool:
    """Whether any of these tensors carries torch's negative bit (positional, no generator: this
    runs on every call)."""
    try:
        return a.is_neg() or (b is not None and b.is_neg()) or (c is not None and c.is_neg()) or (
            d is not None and d.is_neg())
    except AttributeError:  # not tensors: validation says why
        return False


def _runner(key: tuple | None) -> Callable | None:
    """The runner kept for ``key``, unless the registry changed since it was prepared."""
    entry = _RUNNERS.get(key) if key is not None else None
    if entry is None or entry[0] != _GENERATION[0]:
        return None
    return entry[1]


def _range_checked(run: Callable) -> Callable:
    """A cached-call runner that checks position values first (CPU positions; debug mode)."""
    def checked(tensors, positions, cache):
        check_position_range(positions, cache)
        return run(tensors, positions, cache)
    return checked


def _tables_checked(run: Callable, args: RopeArgs) -> Callable:
    """A table-call runner that repeats the partial-rotary value check first, where validation
    made it (``args.value_checks``: CPU tables, or ROPE_BACKENDS_DEBUG=1)."""
    if not args.value_checks:
        return run
    layout, head_dim = args.layout, args.tensors[0].shape[-1]

    def checked(tensors, cos, sin):
        check_partial_rotary(cos, sin, layout, head_dim)
        return run(tensors, cos, sin)
    return checked


def _keep(key: tuple | None, run: Callable | None, generation: int, guard: Callable | None = None) -> None:
    """Keep ``run`` under ``key`` with the generation read before it was prepared: an entry of an
    older generation is never used (_runner / the inline lookups compare it)."""
    if key is None or run is None or generation != _GENERATION[0]:
        return
    if len(_RUNNERS) >= _MAX_RUNNERS:
        _RUNNERS.clear()
    _RUNNERS[key] = (generation, run, guard)


# The last few signatures of each public call, checked in C++: torch's TensorGuards (what dynamo
# guards compiled graphs with) compares every tensor's type, dispatch keys (so torch's negative bit
# too), dtype, device, sizes, strides and grad flag in one call, ~4x cheaper than building the
# signature tuple and hashing it. A hit runs the same kept runner as the signature lookup (same
# generation rule, same memory guard); a miss takes the signature path, which stays the reference.
_TensorGuards = TensorGuards  # None: a torch without it, the signature path alone
_RECENT_SIZE = 4
_RECENT_APPLY: list = []
_RECENT_QK: list = []
_RECENT_CACHED: list = []


def _remember_recent(recent: list, key: tuple | None, opts: tuple, tensors: tuple) -> None:
    """Put the runner just kept under ``key`` at the front of ``recent`` with a guard of these
    tensors' metadata and the call's other options."""
    if key is None or _TensorGuards is None:
        return
    entry = _RUNNERS.get(key)
    if entry is None:
        return
    guards = metadata_guard(tensors)
    if guards is None:  # this torch's TensorGuards takes other arguments: the signature path alone
        return
    recent.insert(0, (opts, guards, entry))
    del recent[_RECENT_SIZE:]


def _apply_opts(layout, rotary_dim, inplace, backend) -> tuple:
    """Everything but the tensors that a table call's runner depends on (as the signature has it)."""
    return (layout, rotary_dim.__class__, rotary_dim, inplace, backend, _grad_enabled(), _override_context.get(),
            _env_raw(), _debug_raw())


def _cached_opts(layout, rotary_dim, mrope, inplace, head_dim, backend, no_k) -> tuple:
    return (layout, rotary_dim.__class__, rotary_dim, mrope, inplace, head_dim.__class__, head_dim, backend,
            _grad_enabled(), _override_context.get(), _env_raw(), _debug_raw(), no_k)


_AUTOGRAD_TYPES = (Tensor, torch.nn.Parameter)  # what the eager autograd path serves (see _route)


def _route(args: RopeArgs, backend: str | None, key: tuple | None, passed: tuple, recent: list,
           opts: tuple | None, source: RopeArgs | None = None) -> tuple[Tensor, ...]:
    """How a validated call runs: the one place that chooses, for all three public calls.

    - under a functorch transform or a forward-AD level: autograd.py's Function, out of place
      (its jvp and vmap rules), then copied into the targets when in place (:func:`_transformed`);
    - needing a gradient in eager mode: the eager autograd runner (autograd.py), kept under ``key``;
    - under torch.compile, a dispatch mode or a jit trace, and for gradient calls on tensor
      subclasses other than Parameter (FakeTensor, DTensor, ... which the custom op's
      registrations serve): the custom op (ops.py), seen as one op;
    - otherwise: the backend directly, its prepared runner kept under ``key``.

    ``args``: validated table args, or cached args that need no gradient. ``source``: the cached
    args that ``args`` were gathered from (apply_cached with a gradient or under a transform).
    ``passed``: the caller's tensors as a kept runner receives them: the rotated ones, then cos,
    sin as passed (or positions, cache). ``recent``, ``opts``: the recent-signature list a kept
    runner joins and its options tuple (None when ``key`` is). Returns one output per
    ``args.tensors`` (in place: the targets). Nothing is written before every check has run.
    """
    compiling = _is_compiling()
    if not compiling and _transforming():
        return _transformed(args, backend, "cos" if source is None else "cos_sin_cache")
    watched = compiling or _traced()
    grad = _grad_enabled() and any(t.requires_grad for t in args.tensors)
    if grad and not watched and not args.inplace and all(type(t) in _AUTOGRAD_TYPES for t in args.tensors):
        return _eager_autograd(args, backend, key, passed, recent, opts, source)
    if watched or grad:
        return _through_ops(args, backend)
    return _direct(args, backend, key, passed, recent, opts)


def _kept(key: tuple | None, run: Callable, generation: int, passed: tuple, rotated: int, inplace: bool,
          recent: list, opts: tuple | None) -> None:
    """Keep ``run`` under ``key`` with the memory guard of the caller's tensors ``passed`` (the
    first ``rotated`` of them rotated), and put it at the front of the recent signatures."""
    if key is None:
        return
    _keep(key, run, generation, memory_guard(passed[:rotated], passed[rotated:], inplace))
    _remember_recent(recent, key, opts, passed)


def _direct(args: RopeArgs, backend: str | None, key: tuple | None, passed: tuple, recent: list,
            opts: tuple | None) -> tuple[Tensor, ...]:
    """Run the call on its backend, then keep the backend's prepared runner for the signature. The
    generation is read first: if the registry changes while the backend runs (the backend itself,
    or another thread, registering or removing one), nothing is kept for the new generation."""
    generation = _GENERATION[0]
    chosen = registry.resolve(args, backend)
    outs = chosen.forward(args)
    if key is not None and chosen.prepare is not None and generation == _GENERATION[0]:
        run = chosen.prepare(args)
        if run is not None:
            if args.cache is not None and position_range_checked(args.positions):
                run = _range_checked(run)
            _kept(key, _tables_checked(run, args), generation, passed, len(args.tensors), args.inplace, recent, opts)
    return outs


def _eager_autograd(args: RopeArgs, backend: str | None, key: tuple | None, passed: tuple, recent: list,
                    opts: tuple | None, source: RopeArgs | None) -> tuple[Tensor, ...]:
    """An out-of-place table call that needs a gradient, in eager mode: a plain
    ``autograd.Function`` around the backend (autograd.eager_autograd_runner), kept under ``key``
    like any runner (for apply_cached, behind the gather from the cache: :func:`_gathering`)."""
    generation = _GENERATION[0]
    run = autograd.eager_autograd_runner(registry.resolve(args, backend), args)
    kept = _tables_checked(run, args) if source is None else _gathering(run, source)
    _kept(key, kept, generation, passed, len(args.tensors), False, recent, opts)
    return run(args.tensors, args.cos, args.sin)


def _gathering(run: Callable, cached: RopeArgs) -> Callable:
    """For apply_cached with a gradient: a runner of the cached form ``(tensors, positions, cache)``,
    ``tensors`` the caller's q/k in the shapes it passed, that checks the positions where
    validation did, gathers cos/sin (the reference lookup) and runs the table runner ``run``;
    outputs come back in the caller's shapes."""
    shapes = tuple(t.shape for t in cached.tensors)
    axis_map = cached.position_axis_map
    check = position_range_checked(cached.positions)

    def gathered(tensors, positions, cache):
        if check:
            check_position_range(positions, cache)
        cos, sin = reference.cos_sin_from_cache(positions, cache, axis_map)
        views = tuple(t if t.shape == shape else t.view(shape) for t, shape in zip(tensors, shapes))
        outs = run(views, cos.unsqueeze(-2), sin.unsqueeze(-2))
        return tuple(o if o.shape == t.shape else o.view(t.shape) for o, t in zip(outs, tensors))
    return gathered


def _gathered_tables(args: RopeArgs) -> RopeArgs:
    """Cached args as table args: cos/sin gathered from the cache (the reference lookup, tensor ops
    that autograd and every transform follow), broadcast over the heads."""
    cos, sin = reference.cos_sin_from_cache(args.positions, args.cache, args.position_axis_map)
    return RopeArgs(args.tensors, args.inplace, args.layout, args.rotary_dim,
                    cos=cos.unsqueeze(-2), sin=sin.unsqueeze(-2))


def _transformed(args: RopeArgs, backend: str | None, tables: str) -> tuple[Tensor, ...]:
    """A table call under a functorch transform or a forward-AD level: out of place through
    autograd._EagerRotation (its jvp and vmap rules), then, in place, copied into the targets (a
    tensor op, so the tangent and the batch follow the copy). Validation has run: nothing is
    written before every result exists. ``tables``: the caller's name for cos/sin, for errors."""
    rotation = autograd.Rotation(registry.resolve(args, backend), args.layout, args.rotary_dim, args.conjugate,
                                 tables)
    outs = autograd.rotate(rotation, args.cos, args.sin, args.tensors)
    if not args.inplace:
        return outs
    for t, out in zip(args.tensors, outs):
        t.copy_(out)
    return args.tensors


def _through_ops(args: RopeArgs, backend: str | None) -> tuple[Tensor, ...]:
    """The call as one custom op of ops.py (the op for its kind: tables for one tensor or q and k,
    or positions into a cache; in place or not)."""
    # under compile the op resolves the backend when it runs; in eager, resolve now so a bad
    # override fails here and forward and backward run on the same backend
    name = (backend or "") if _is_compiling() else registry.resolve(args, backend).name
    lib = torch.ops.rope_backends
    if args.cache is None:
        fixed = (args.cos, args.sin, args.layout.value, args.rotary_dim, args.conjugate, name)
        if len(args.tensors) == 1:
            if args.inplace:
                lib.rope_(args.tensors[0], *fixed)
                return args.tensors
            return (lib.rope(args.tensors[0], *fixed),)
        if args.inplace:
            lib.rope_qk_(*args.tensors, *fixed)
            return args.tensors
        return tuple(lib.rope_qk(*args.tensors, *fixed))
    axis_map = list(args.mrope.axis_map) if args.mrope is not None else None
    k = args.tensors[1] if len(args.tensors) == 2 else None
    fixed = (args.positions, args.cache, axis_map, args.layout.value, args.rotary_dim, name)
    if args.inplace:
        lib.rope_cached_(args.tensors[0], k, *fixed)
        return args.tensors
    return tuple(lib.rope_cached(args.tensors[0], k, *fixed))


def apply(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    layout: Layout | str = "neox",
    rotary_dim: int | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Rotate ``x [..., head_dim]`` (typically ``[T, H, D]``, ``[B, S, H, D]`` or ``[B, H, S, D]``).

    cos, sin: broadcastable to ``x.shape[:-1] + (rotary_dim // 2,)``; last dim ``rotary_dim // 2``
        (one value per pair) or ``rotary_dim`` (duplicated HF/diffusers form). Any float dtype.
        For ``[B, S, H, D]`` give ``[S, 1, r/2]`` (or ``[B, S, 1, r/2]``) so they skip the heads.
    layout: ``"neox"`` (rotate_half) or ``"interleaved"`` (GPT-J / complex form).
    rotary_dim: rotated width (even, <= head_dim; default head_dim); the rest is copied. Pass it
        whenever the rotated width is not head_dim: without it cos/sin of width ``head_dim // 2``
        are the half form of a full rotation, and on CPU (or with ``ROPE_BACKENDS_DEBUG=1``) a
        table that is the duplicated form of ``rotary_dim = head_dim // 2`` instead (equal halves,
        some sin != 0) is refused (docs/errors.md, "Partial rotary").
    inplace: write into ``x`` and return it; ``x`` must not overlap itself or cos/sin.
    backend: run on this backend (overrides ``use_backend`` and ``ROPE_BACKEND``); the same strings
        as those: a name, or ``device:name`` pairs.

    Returns a tensor of ``x``'s shape and dtype. Differentiable w.r.t. ``x`` (backward, forward-mode
    AD) and usable under ``torch.func`` transforms (vmap, grad, jvp, jacrev, jacfwd).
    """
    compiling = _is_compiling()  # dynamo folds it; is_neg() cannot be traced
    # _may_take_runner's test, inline (this is the whole host cost of a repeated call)
    if (_RECENT_APPLY and (inplace is True or inplace is False) and not compiling and _forward_ad._current_level < 0
            and _transform() is None and not _modes() and _jit_trace() is None):
        opts = _apply_opts(layout, rotary_dim, inplace, backend)
        try:
            for e_opts, guards, entry in _RECENT_APPLY:
                if e_opts == opts and entry[0] == _GENERATION[0] and guards.check(x, cos, sin):
                    if entry[2] is None or entry[2](x, cos, sin):
                        out = entry[1]((x,), cos, sin)[0]
                        return x if inplace else out
                    break
        except (TypeError, AttributeError, RuntimeError):  # not tensors: the full checks say why
            pass
    if not compiling and _negated(x, cos, sin):
        x, cos, sin = _without_negative_bit((("x", x), ("cos", cos), ("sin", sin)), 1, inplace)
    key = None
    if _may_take_runner(inplace, compiling):
        # the signature, flat and inline: this is the whole host cost of a repeated call
        try:
            key = ("apply", x.__class__, x.shape, x.stride(), x.dtype, x.device, x.requires_grad,
                   cos.__class__, cos.shape, cos.stride(), cos.dtype, cos.device, cos.requires_grad,
                   sin.__class__, sin.shape, sin.stride(), sin.dtype, sin.device, sin.requires_grad,
                   layout, rotary_dim.__class__, rotary_dim, inplace, backend,
                   _grad_enabled(), _override_context.get(), _env_raw(), _debug_raw())
            entry = _RUNNERS.get(key)
        # not tensors, unhashable options, sparse/nested tensors (no strides): the full checks say why
        except (AttributeError, TypeError, RuntimeError):
            key = entry = None
        # the runner of this generation, if the call's addresses keep the validated memory rules
        if entry is not None and entry[0] == _GENERATION[0] and (entry[2] is None or entry[2](x, cos, sin)):
            out = entry[1]((x,), cos, sin)[0]
            return x if inplace else out
    if key is not None and not _cacheable((x, cos, sin), layout, rotary_dim, backend):
        key = None  # tensor subclasses, odd option types: always the full path
    _check_backend(backend, compiling)
    args = args_for_tables((("x", x),), cos, sin, layout, rotary_dim, inplace)
    opts = _apply_opts(layout, rotary_dim, inplace, backend) if key is not None else None
    return _route(args, backend, key, (x, cos, sin), _RECENT_APPLY, opts)[0]


def apply_qk(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    layout: Layout | str = "neox",
    rotary_dim: int | None = None,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Rotate q ``[..., Hq, D]`` and k ``[..., Hk, D]`` with the same cos/sin in one call
    (one kernel launch on GPU). Hq and Hk may differ (GQA/MQA). Same options as :func:`apply`;
    cos/sin must broadcast against both. q and k share no element (views of disjoint columns of
    one fused buffer are fine). Differentiable w.r.t. q and k, like :func:`apply`."""
    compiling = _is_compiling()  # dynamo folds it; is_neg() cannot be traced
    # _may_take_runner's test, inline (this is the whole host cost of a repeated call)
    if (_RECENT_QK and (inplace is True or inplace is False) and not compiling and _forward_ad._current_level < 0
            and _transform() is None and not _modes() and _jit_trace() is None):
        opts = _apply_opts(layout, rotary_dim, inplace, backend)
        try:
            for e_opts, guards, entry in _RECENT_QK:
                if e_opts == opts and entry[0] == _GENERATION[0] and guards.check(q, k, cos, sin):
                    if entry[2](q, k, cos, sin) if inplace else entry[2](q, k):
                        q_out, k_out = entry[1]((q, k), cos, sin)
                        return (q, k) if inplace else (q_out, k_out)
                    break
        except (TypeError, AttributeError, RuntimeError):
            pass
    if not compiling and _negated(q, k, cos, sin):
        q, k, cos, sin = _without_negative_bit((("q", q), ("k", k), ("cos", cos), ("sin", sin)), 2, inplace)
    key = None
    if _may_take_runner(inplace, compiling):
        try:
            key = ("apply_qk", q.__class__, q.shape, q.stride(), q.dtype, q.device, q.requires_grad,
                   k.__class__, k.shape, k.stride(), k.dtype, k.device, k.requires_grad,
                   cos.__class__, cos.shape, cos.stride(), cos.dtype, cos.device, cos.requires_grad,
                   sin.__class__, sin.shape, sin.stride(), sin.dtype, sin.device, sin.requires_grad,
                   layout, rotary_dim.__class__, rotary_dim, inplace, backend,
                   _grad_enabled(), _override_context.get(), _env_raw(), _debug_raw())
            entry = _RUNNERS.get(key)
        except (AttributeError, TypeError, RuntimeError):
            key = entry = None
        if entry is not None and entry[0] == _GENERATION[0] and (
                entry[2](q, k, cos, sin) if inplace else entry[2](q, k)):  # addresses: not in a signature
            q_out, k_out = entry[1]((q, k), cos, sin)
            return (q, k) if inplace else (q_out, k_out)
    if key is not None and not _cacheable((q, k, cos, sin), layout, rotary_dim, backend):
        key = None
    _check_backend(backend, compiling)
    args = args_for_tables((("q", q), ("k", k)), cos, sin, layout, rotary_dim, inplace)
    opts = _apply_opts(layout, rotary_dim, inplace, backend) if key is not None else None
    q_out, k_out = _route(args, backend, key, (q, k, cos, sin), _RECENT_QK, opts)
    return q_out, k_out


def apply_cached(
    q: Tensor,
    k: Tensor | None,
    positions: Tensor,
    cos_sin_cache: Tensor,
    *,
    layout: Layout | str = "neox",
    rotary_dim: int | None = None,
    mrope: MRope | Sequence[int] | None = None,
    inplace: bool = True,
    head_dim: int | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Serving-style RoPE: look up each token's cos/sin by position in a cache.

    q, k: ``[T, Hq*D]`` / ``[T, Hk*D]`` (vLLM style; pass ``head_dim``) or ``[..., T, H, D]``;
        any strides (views into a fused qkv buffer work). ``k`` may be None.
    positions: int ``[T]`` (q's leading dims), or ``[3, T]`` with ``mrope``.
    cos_sin_cache: ``[max_position, rotary_dim]``, cos in the first half, sin in the second
        (vLLM/FlashInfer); build it with :func:`rope_backends.cos_sin_cache`.
    mrope: an :class:`MRope` axis map from :mod:`rope_backends.mrope` (Qwen2-VL chunked,
        Qwen3-VL interleaved, Ernie4.5-VL); 1-row positions with mrope mean text-only input.
    inplace: write into q and k (default, as serving engines do) and return them.

    Positions are range-checked on CPU tensors always (under torch.compile and tracing when the
    op runs) and on GPU only with ``ROPE_BACKENDS_DEBUG=1`` (the check costs a sync); otherwise an
    out-of-range position gives NaN in that token's rotated part and reads nothing out of bounds.
    q and k share no element; in place, neither shares memory with positions or the cache. A
    cache that requires grad is refused with grad enabled (gradients flow to q and k only).
    """
    compiling = _is_compiling()  # dynamo folds it; is_neg() cannot be traced
    # _may_take_runner's test, inline (this is the whole host cost of a repeated call)
    if (_RECENT_CACHED and (inplace is True or inplace is False) and not compiling and _forward_ad._current_level < 0
            and _transform() is None and not _modes() and _jit_trace() is None):
        opts = _cached_opts(layout, rotary_dim, mrope, inplace, head_dim, backend, k is None)
        try:
            for e_opts, guards, entry in _RECENT_CACHED:
                if e_opts != opts or entry[0] != _GENERATION[0]:
                    continue
                guard = entry[2]
                if k is None:
                    if not guards.check(q, positions, cos_sin_cache):
                        continue
                    fits = guard is None or guard(q, positions, cos_sin_cache)
                else:
                    if not guards.check(q, k, positions, cos_sin_cache):
                        continue
                    fits = guard(q, k, positions, cos_sin_cache) if inplace else guard(q, k)
                if fits:
                    outs = entry[1]((q,) if k is None else (q, k), positions, cos_sin_cache)
                    if inplace:
                        return q, k
                    return outs[0], (outs[1] if k is not None else None)
                break
        except (TypeError, AttributeError, RuntimeError):
            pass
    if not compiling and _negated(q, k, positions, cos_sin_cache):
        q, k, positions, cos_sin_cache = _without_negative_bit(
            (("q", q), ("k", k), ("positions", positions), ("cos_sin_cache", cos_sin_cache)), 2, inplace)
    key = None
    if _may_take_runner(inplace, compiling):
        try:
            key = ("apply_cached", q.__class__, q.shape, q.stride(), q.dtype, q.device, q.requires_grad,
                   positions.__class__, positions.shape, positions.stride(), positions.dtype, positions.device,
                   cos_sin_cache.__class__, cos_sin_cache.shape, cos_sin_cache.stride(), cos_sin_cache.dtype,
                   cos_sin_cache.device, cos_sin_cache.requires_grad, layout, rotary_dim.__class__, rotary_dim,
                   mrope, inplace, head_dim.__class__, head_dim, backend,
                   _grad_enabled(), _override_context.get(), _env_raw(), _debug_raw())
            if k is not None:
                key += (k.__class__, k.shape, k.stride(), k.dtype, k.device, k.requires_grad)
            entry = _RUNNERS.get(key)
        except (AttributeError, TypeError, RuntimeError):
            key = entry = None
        if entry is not None and entry[0] == _GENERATION[0]:
            guard = entry[2]
            if k is None:
                fits = guard is None or guard(q, positions, cos_sin_cache)
            else:
                fits = guard(q, k, positions, cos_sin_cache) if inplace else guard(q, k)
            if fits:
                outs = entry[1]((q,) if k is None else (q, k), positions, cos_sin_cache)
                if inplace:
                    return q, k
                return outs[0], (outs[1] if k is not None else None)
    if key is not None and not _cacheable((q, k, positions, cos_sin_cache), layout, rotary_dim, backend,
                                          head_dim, mrope):
        key = None
    _check_backend(backend, compiling)
    args, originals = args_for_cached(q, k, positions, cos_sin_cache, layout, rotary_dim, mrope, inplace, head_dim)
    opts = _cached_opts(layout, rotary_dim, mrope, inplace, head_dim, backend, k is None) if key is not None else None
    passed = (*originals, args.positions, args.cache)
    if (not compiling and _transforming()) or (
            not inplace and _grad_enabled() and any(t.requires_grad for t in args.tensors)):
        # a derivative is asked for: the table path on cos/sin gathered from the cache (the custom
        # cached ops have no autograd); its runner is kept behind the gather (_gathering)
        outs = _route(_gathered_tables(args), backend, key, passed, _RECENT_CACHED, opts, source=args)
    else:
        # a backend's runner is handed the caller's tensors: out of place, those must be args' own
        # views (not a 2-D [T, H*D] reshaped)
        remember = inplace or all(a is b for a, b in zip(originals, args.tensors))
        outs = _route(args, backend, key if remember else None, passed, _RECENT_CACHED, opts)
    if inplace:
        return originals[0], (originals[1] if k is not None else None)
    q_out = outs[0].view(originals[0].shape)
    return q_out, (outs[1].view(originals[1].shape) if k is not None else None)
