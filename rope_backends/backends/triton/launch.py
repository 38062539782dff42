"""Host side of the ``triton`` backend: call geometry, launch heuristics, the launch itself.

``forward(args)`` for one validated :class:`~rope_backends.spec.RopeArgs`:

1. outputs are the inputs (in place) or ``torch.empty_like`` of them; empty tensors launch nothing;
2. the call's *signature* (shapes, strides, dtypes, options, device) keys a :class:`Plan` in a
   dict, so after the first call of a shape the host work is one tuple, one lookup, one launch;
3. ``kernel.rope_kernel`` is launched on the tensors' own device with ``enable_fp_fusion=False``
   (with FMA contraction on, 129,256 of 524,288 fp32 outputs differed from eager torch on an
   H100; with it off, none did).

Building a plan (once per signature): every operand -- input and output of q (and k), cos and sin
or positions -- is described by its strides over the common leading dims; cos/sin broadcast
dims get stride 0. Leading dims of size 1 are dropped and adjacent ones merged wherever *every*
operand allows it, so ``[B, S, H, D]`` with cos ``[S, 1, D/2]`` is two leading dims and
contiguous ``[T, H, D]`` one. The kernel takes three; if more are left the call is split along
the first leading dim and each slice runs on its own (correct for any strides, slower). Offsets
are int64 when any operand spans 2**31 elements or more, int32 otherwise.

This module never synchronises with the device: no ``.item()``, ``.tolist()`` or ``.cpu()`` of a
device tensor, so calls can be captured in a CUDA graph. It imports triton (through kernel.py)
only when the first call is made.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from ... import platform, registry
from ...spec import Layout, RopeArgs

__all__ = ["forward", "prepare", "plan_for", "set_config", "Plan"]

_INT32_LIMIT = 2**31 - 1
_PLANS: dict[tuple, "Plan | None"] = {}      # signature -> plan (None: split the call)
_AXIS: dict[tuple, Tensor] = {}              # (axis_map, device) -> int32 [half] on device
_SMS: dict[int, int] = {}                    # device index -> multiprocessors
_FORCED: tuple[int, int] | None = None       # (BLOCK_M, num_warps) for benchmark sweeps
_FAST = True                                 # launch cached compiled kernels directly (see _launch)
_KERNEL = None
_NEOX = Layout.NEOX
# rope_kernel's constexpr parameters, in signature order (kernel.py)
_CONSTEXPRS = ("LAYOUT", "CONJUGATE", "HAS_POSITIONS", "MROPE", "HAS_K", "COPY_PASS", "INT64",
               "HALF", "ROT", "HEAD_DIM", "BLOCK_M", "BLOCK_HALF", "BLOCK_PASS")
_SEPARATE = "separate"  # plan marker: launch q and k separately


class Plan(NamedTuple):
    """Everything about a launch that depends only on the call's signature."""

    ints: tuple[int, ...]    # the kernel's integer arguments, in order
    grid: tuple[int, int, int]
    meta: dict               # constexprs and launch options
    contiguous_cos: bool     # cos/sin strides differ: pass contiguous copies (same strides)
    dummy_cache: bool        # empty cache: every position is out of range, read nothing
    tail: tuple              # ints, then the constexprs in signature order (direct launches)
    compiled: dict           # pointer alignment -> launcher of the compiled kernel


def set_config(block_m: int | None, num_warps: int | None = None) -> None:
    """Force the tile (benchmarks only): BLOCK_M units per program and num_warps; None restores
    the heuristic. Clears the plan cache."""
    global _FORCED
    _FORCED = None if block_m is None else (int(block_m), int(num_warps or 4))
    _PLANS.clear()
    registry.invalidate()  # runners prepared for the dispatcher hold plans


def _kernel():
    """The jitted kernel; importing kernel.py imports triton. Which flavour (compiled or
    interpreted) is fixed by TRITON_INTERPRET when this first runs, as Triton's jit decides it."""
    global _KERNEL, _FAST
    if _KERNEL is None:
        from . import kernel

        names = list(kernel.rope_kernel.arg_names)
        if names[-len(_CONSTEXPRS):] != list(_CONSTEXPRS):  # keep _CONSTEXPRS in step with the kernel
            raise RuntimeError(f"rope_kernel's constexprs {names[-len(_CONSTEXPRS):]} != {_CONSTEXPRS}")
        _FAST = _FAST and not platform.triton_interpret()
        _KERNEL = kernel.rope_kernel
    return _KERNEL


# --------------------------------------------------------------------------------------------
# per call

def forward(args: RopeArgs) -> tuple[Tensor, ...]:
    """Run one validated call: one result per ``args.tensors`` (the inputs, overwritten, when
    ``args.inplace``)."""
    tensors = args.tensors
    if args.inplace:
        outs = tensors
        _bump_version(tensors)
    elif len(tensors) == 1:
        outs = (torch.empty_like(tensors[0]),)
    else:
        outs = (torch.empty_like(tensors[0]), torch.empty_like(tensors[1]))
    if len(tensors) == 1:
        if tensors[0].numel():
            _run(args, ((tensors[0], outs[0]),))
        return outs
    pairs = tuple((t, o) for t, o in zip(tensors, outs) if t.numel())
    if pairs:
        _run(args, pairs)
    return outs


def prepare(args: RopeArgs):
    """A runner for every later call with ``args``' signature (registry.Backend.prepare): the
    plan is fixed, so a call is the outputs' allocation, the pointers' alignment and the launch.
    None where a call needs more than one launch or a per-call tensor (split or separate q/k
    launches, cos/sin with different strides, an empty cache or tensor), or during CUDA graph
    capture (an MRoPE axis map made there lives in the graph's memory)."""
    tensors = args.tensors
    if not all(t.numel() for t in tensors):
        return None
    if tensors[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    outs = tensors if args.inplace else tuple(torch.empty_like(t) for t in tensors)
    pairs = tuple(zip(tensors, outs))
    key = _signature(args, pairs)
    plan = _PLANS.get(key)
    if plan is None and key not in _PLANS:
        plan = _PLANS[key] = _build(args, pairs)
    if not isinstance(plan, Plan) or plan.contiguous_cos or plan.dummy_cache:
        return None
    axis = _axis_tensor(args.mrope.axis_map, tensors[0].device) if plan.meta["MROPE"] else None
    index = tensors[0].get_device()
    inplace, two, cached = args.inplace, len(tensors) == 2, args.cache is not None
    empty_like = torch.empty_like

    def run(tensors, a, b):
        if inplace:
            outs = tensors
            _bump_version(tensors)
        elif two:
            outs = (empty_like(tensors[0]), empty_like(tensors[1]))
        else:
            outs = (empty_like(tensors[0]),)
        q, qo = tensors[0], outs[0]
        k, ko = (tensors[1], outs[1]) if two else (None, None)
        ptrs = (q, qo, k, ko, None, None, a, b, axis) if cached else (q, qo, k, ko, a, b, None, None, None)
        if index >= 0 and index != _current_device():
            with torch.cuda.device(index):
                _launch(plan, ptrs)
        else:
            _launch(plan, ptrs)
        return outs

    return run


def _signature(args: RopeArgs, pairs) -> tuple:
    """What a plan depends on (shapes, strides, dtypes, options, device index)."""
    if args.cache is None:
        c = args.cos
        key = (args.layout is _NEOX, args.rotary_dim, args.conjugate, args.inplace,
               c.shape, c.stride(), args.sin.stride(), c.dtype)
    else:
        p, c = args.positions, args.cache
        key = (args.layout is _NEOX, args.rotary_dim, args.conjugate, args.inplace,
               p.shape, p.stride(), p.dtype, c.shape, c.stride(), c.dtype)
    if args.inplace:
        for t, _ in pairs:
            key += (t.shape, t.stride(), t.dtype)
    else:
        for t, o in pairs:
            key += (t.shape, t.stride(), o.stride(), t.dtype)
    return key + (pairs[0][0].get_device(),)


def _run(args: RopeArgs, pairs) -> None:
    key = _signature(args, pairs)
    try:
        plan = _PLANS[key]
    except KeyError:
        plan = _PLANS[key] = _build(args, pairs)
    if plan is None:  # more than three leading dims: one launch per slice of the first
        for sub_args, sub_pairs in _split(args, pairs):
            _run(sub_args, sub_pairs)
        return
    if plan is _SEPARATE:  # q and k with different leading dims (cos broadcasts to both)
        _run(args, pairs[:1])
        _run(args, pairs[1:])
        return
    q, qo = pairs[0]
    k, ko = pairs[1] if len(pairs) == 2 else (None, None)
    if args.cache is None:
        cos, sin = args.cos, args.sin
        if plan.contiguous_cos:
            cos, sin = cos.contiguous(), sin.contiguous()
        pos = cache = axis = None
    else:
        cos = sin = None
        pos, cache = args.positions, args.cache
        if plan.dummy_cache:
            cache = torch.zeros((1, cache.shape[1]), dtype=cache.dtype, device=cache.device)
        axis = _axis_tensor(args.mrope.axis_map, q.device) if plan.meta["MROPE"] else None
    ptrs = (q, qo, k, ko, cos, sin, pos, cache, axis)
    index = q.get_device()
    if index >= 0 and index != _current_device():
        with torch.cuda.device(index):  # Triton launches on the current device and stream
            _launch(plan, ptrs)
        return
    _launch(plan, ptrs)


def _launch(plan: "Plan", ptrs: tuple) -> None:
    """Launch ``rope_kernel`` for ``plan`` with these tensors.

    Triton's ``JITFunction.run`` re-derives the specialisation of all ~60 arguments on every
    call (about 49 us of host time per launch on the H100 machine, triton 3.6). A plan fixes
    every integer argument and constexpr, so what is left to specialise on is the 16-byte
    alignment of the pointers: the compiled kernel is kept per (plan, alignment) and launched
    directly (``CompiledKernel[grid](*args, stream=...)``, the same launcher ``run`` ends in, given
    the current stream so it skips its own device and stream lookup). The first call of each goes
    through ``run``, which compiles and returns the compiled kernel."""
    global _FAST
    if _FAST:
        first = ptrs[0].data_ptr() | ptrs[1].data_ptr()
        for t in ptrs[2:]:
            if t is not None:
                first |= t.data_ptr()
        align = (first & 15) == 0 or tuple(t is None or t.data_ptr() % 16 == 0 for t in ptrs)
        launcher = plan.compiled.get(align)
        if launcher is not None:
            try:
                if _raw_stream is not None:
                    # the stream handed over: the launcher would otherwise look up the device
                    # and stream through Triton's driver proxy on every call
                    launcher(*ptrs, *plan.tail, stream=_raw_stream(_current_device()))
                else:
                    launcher(*ptrs, *plan.tail)
                return
            except TypeError:  # another Triton's launcher convention: always go through run
                _FAST = False
    kernel = _KERNEL or _kernel()
    compiled = kernel.run(*ptrs, *plan.ints, grid=plan.grid, warmup=False, **plan.meta)
    if _FAST and compiled is not None and hasattr(compiled, "__getitem__"):
        plan.compiled[align] = compiled[plan.grid]  # the runner: reads the current stream per call


# A kernel writing through a pointer is invisible to autograd: bump the version counters as
# torch's own in-place ops do, so a backward that saved the old values raises instead of
# computing a wrong gradient (inference tensors have no counter and are skipped by torch).
def _version_bumper():
    raw = getattr(torch._C, "_increment_version", None)
    if raw is not None:
        try:
            raw((torch.empty(0),))  # recent torch takes a sequence of tensors (older: one tensor)
            return raw
        except TypeError:
            pass
    public = torch.autograd.graph.increment_version

    def bump(tensors):
        for t in tensors:
            public(t)

    return bump


_bump_version = _version_bumper()


# torch.cuda.current_device() re-checks lazy initialisation on every call; a CUDA tensor in
# hand means CUDA is initialised, so ask the device index directly where torch has the call
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
# the current stream of a device as the raw handle Triton's launcher takes (CUDA and ROCm builds)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _axis_tensor(axis_map: tuple[int, ...], device: torch.device) -> Tensor:
    """The MRoPE axis map as an int32 device tensor, made once per (map, device): no
    host-to-device copy per call."""
    key = (axis_map, device)
    t = _AXIS.get(key)
    if t is not None:
        return t
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # a host-to-device copy cannot be captured in a CUDA graph: build this one from fills
        # of the map's runs (recorded in the graph, replayed with it) and do not cache it
        t = torch.zeros(len(axis_map), dtype=torch.int32, device=device)
        start = 0
        for j in range(1, len(axis_map) + 1):
            if j == len(axis_map) or axis_map[j] != axis_map[start]:
                if axis_map[start]:
                    t[start:j].fill_(axis_map[start])
                start = j
        return t
    t = torch.tensor(axis_map, dtype=torch.int32, device=device)
    _AXIS[key] = t
    return t


def _split(args: RopeArgs, pairs):
    """Slices along the first leading dim: for calls whose leading dims do not collapse to three."""
    lead = pairs[0][0].shape[:-2]
    nlead = len(lead)
    if args.cache is None:
        def expand(c: Tensor) -> Tensor:
            c = c[(None,) * (nlead + 2 - c.dim())] if c.dim() < nlead + 2 else c
            return c.expand(*lead, *c.shape[nlead:])
        cos, sin = expand(args.cos), expand(args.sin)
    for i in range(lead[0]):
        sub = tuple((t[i], o[i]) for t, o in pairs)
        tensors = tuple(t for t, _ in sub)
        if args.cache is None:
            yield dataclasses.replace(args, tensors=tensors, cos=cos[i], sin=sin[i]), sub
        else:
            p = args.positions
            p = p[:, i] if args.position_axis_map is not None else p[i]
            yield dataclasses.replace(args, tensors=tensors, positions=p), sub


# --------------------------------------------------------------------------------------------
# plans

def _extent(shape, stride) -> int:
    """Elements an operand spans from its first element (0 for an empty one)."""
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else 0


def _cos_strides(c: Tensor, nlead: int, has_heads: bool) -> tuple[list[int], int, int]:
    """Strides of half-form cos/sin as broadcast to ``[*lead, heads, half]``: (lead strides,
    heads stride, pair stride); 0 wherever it broadcasts."""
    shape, stride = c.shape, c.stride()
    n = c.dim()
    pair = stride[-1]
    heads = stride[-2] if has_heads and n >= 2 and shape[-2] != 1 else 0
    first = n - 1 - (1 if has_heads else 0)  # cos dims that face the lead dims: [0, first)
    lead = [0] * nlead
    for j in range(first):
        if shape[first - 1 - j] != 1:
            lead[nlead - 1 - j] = stride[first - 1 - j]
    return lead, heads, pair


def _collapse(sizes: list[int], operands: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims; merge adjacent dims where every operand's strides allow it."""
    keep = [i for i, s in enumerate(sizes) if s != 1]
    out_sizes: list[int] = []
    out_ops: list[list[int]] = [[] for _ in operands]
    for i in reversed(keep):
        if out_sizes and all(op[i] == oo[0] * out_sizes[0] for op, oo in zip(operands, out_ops)):
            out_sizes[0] *= sizes[i]
            continue
        out_sizes.insert(0, sizes[i])
        for op, oo in zip(operands, out_ops):
            oo.insert(0, op[i])
    return out_sizes, out_ops


def _build(args: RopeArgs, pairs) -> "Plan | str | None":
    x0 = pairs[0][0]
    if len(pairs) == 2 and pairs[1][0].shape[:-2] != x0.shape[:-2]:
        return _SEPARATE
    has_heads = x0.dim() >= 2
    lead = list(x0.shape[:-2]) if has_heads else []
    nlead = len(lead)
    head_dim = x0.shape[-1]
    rot = args.rotary_dim
    half = rot // 2
    operands: list[list[int]] = []
    tensors = []  # per tensor: units, heads, heads stride in/out, last stride in/out
    extents = []
    for t, o in pairs:
        ts, os_ = t.stride(), o.stride()
        operands += [list(ts[:nlead]), list(os_[:nlead])]
        heads = t.shape[-2] if has_heads else 1
        tensors.append((t.numel() // head_dim, heads, ts[-2] if has_heads else 0, ts[-1],
                        os_[-2] if has_heads else 0, os_[-1]))
        extents += [_extent(t.shape, ts), _extent(o.shape, os_)]
    contiguous_cos = dummy_cache = False
    cos_rest = (0, 0)
    pos_rest = (0, 0, 0, 0)
    if args.cache is None:
        cos, sin = args.cos, args.sin
        c_lead, c_heads, c_pair = _cos_strides(cos, nlead, has_heads)
        if _cos_strides(sin, nlead, has_heads) != (c_lead, c_heads, c_pair):
            contiguous_cos = True
            cos = cos.contiguous()
            c_lead, c_heads, c_pair = _cos_strides(cos, nlead, has_heads)
        operands.append(c_lead)
        cos_rest = (c_heads, c_pair)
        extents += [_extent(cos.shape, cos.stride()), _extent(sin.shape, sin.stride())]
        mrope = False
    else:
        p, cache = args.positions, args.cache
        mrope = args.position_axis_map is not None
        p_stride = p.stride()
        if mrope:
            operands.append(list(p_stride[1:]))
            p_row = p_stride[0]
        else:
            operands.append(list(p_stride))
            p_row = 0
        extents.append(_extent(p.shape, p_stride))
        dummy_cache = cache.shape[0] == 0
        pos_rest = (p_row, cache.stride(0), cache.stride(1), cache.shape[0])
    sizes, ops = _collapse(lead, operands)
    if len(sizes) > 3:
        return None
    # pad on the inside: L1 = L2 = 1 are specialised by Triton, so the kernel's divisions by
    # them fold away and one leading dim costs no index arithmetic at all
    pad = 3 - len(sizes)
    sizes = sizes + [1] * pad
    ops = [op + [0] * pad for op in ops]

    units = [t[0] for t in tensors]
    copy_pass = not args.inplace and rot < head_dim
    block_half = _pow2(half)
    block_pass = _pow2(head_dim - rot) if copy_pass else 1
    unit_elems = 2 * block_half + (block_pass if copy_pass else 0)
    block_m, num_warps = _tile(sum(units), max(units), unit_elems, x0.device,
                               1024 if args.cache is None else 2048)
    programs = [-(-u // block_m) for u in units]
    int64 = max(extents) > _INT32_LIMIT or max(units) + block_m > _INT32_LIMIT

    def tensor_ints(n: int) -> tuple[int, ...]:
        u, heads, sh, sd, osh, osd = tensors[n]
        xs, os_ = ops[2 * n], ops[2 * n + 1]
        return (u, heads, *xs, sh, sd, *os_, osh, osd)

    q_ints = tensor_ints(0)
    k_ints = tensor_ints(1) if len(pairs) == 2 else (0,) * len(q_ints)
    side = ops[2 * len(pairs)]
    if args.cache is None:
        cos_ints = (*side, *cos_rest)
        pos_ints = (0, 0, 0, *pos_rest)
    else:
        cos_ints = (0, 0, 0, *cos_rest)
        pos_ints = (*side, *pos_rest)
    ints = (sizes[1], sizes[2], programs[0], *q_ints, *k_ints, *cos_ints, *pos_ints)
    meta = dict(
        LAYOUT=0 if args.layout is Layout.NEOX else 1,
        CONJUGATE=bool(args.conjugate),
        HAS_POSITIONS=args.cache is not None,
        MROPE=mrope,
        HAS_K=len(pairs) == 2,
        COPY_PASS=copy_pass,
        INT64=int64,
        HALF=half,
        ROT=rot,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass,
        num_warps=num_warps,
        enable_fp_fusion=False,  # reference step 2: every product rounded, no FMA
    )
    constexprs = tuple(meta[name] for name in _CONSTEXPRS)
    # a 3-d grid: CompiledKernel[grid] reads grid[0], grid[1] and grid[2]
    return Plan(ints, (sum(programs), 1, 1), meta, contiguous_cos, dummy_cache, ints + constexprs, {})


def plan_for(args: RopeArgs) -> Plan | None:
    """The plan ``forward`` would use for ``args`` (tests and benchmarks)."""
    outs = args.tensors if args.inplace else tuple(torch.empty_like(t) for t in args.tensors)
    pairs = tuple((t, o) for t, o in zip(args.tensors, outs) if t.numel())
    key = _signature(args, pairs)
    if key not in _PLANS:
        _PLANS[key] = _build(args, pairs)
    return _PLANS[key]


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def _sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(index)
    if n is None:
        n = _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return n


def _tile(total_units: int, max_units: int, unit_elems: int, device: torch.device,
          tile_elems: int = 1024) -> tuple[int, int]:
    """(BLOCK_M, num_warps): units per program and warps per program.

    GPU: tiles of ``tile_elems`` elements (1024 for explicit cos/sin, 2048 with positions, whose
    dependent position -> cache loads want more work per program), 4 warps. On the H100 every
    tile of 512-8192 elements with 4-32 elements per thread ran within ~3% of the best on the
    five diffusion shapes and on apply_cached at T=4096 / 16384 (bench/results, sweep), with
    1024 ahead on the mid-size diffusion shapes and 2048 ahead at T=16384. Fewer units per
    program when that would leave fewer than ~4 programs per multiprocessor (decode: one
    (token, head) row per program, one warp). Interpreter: as few programs as possible (each
    costs milliseconds of Python)."""
    if device.type != "cuda" or platform.triton_interpret():
        return min(_pow2(max_units), _pow2_floor(max(1, 8192 // unit_elems))), 1
    if _FORCED is not None:
        block_m, num_warps = _FORCED
    else:
        block_m = _pow2_floor(max(1, tile_elems // unit_elems))
        while block_m > 1 and -(-total_units // block_m) < 4 * _sms(device):
            block_m //= 2
        # Triton needs a power of two (a pass-through block can make the tile 3x 256 elements)
        num_warps = min(4, _pow2_floor(max(1, block_m * unit_elems // 256)))
    if platform.gpu_vendor() == "rocm":
        num_warps = max(1, num_warps // 2)  # a wavefront is 64 lanes: same threads per program
    return block_m, num_warps
