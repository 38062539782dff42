"""Run conformance cases against a backend, programmatically (pytest and ``python -m
rope_backends check`` both call this).

For one :class:`~rope_backends.testing.cases.RopeCase` on one target (backend, device):

1. build the inputs on the device, each a view into a canary-padded buffer (make.py), and keep
   a copy of every buffer;
2. compute the expected outputs with :mod:`rope_backends.reference` on CPU copies of the inputs
   (on the device in slices for the >2**31-element cases), out of place;
3. call ``rb.apply`` / ``rb.apply_qk`` / ``rb.apply_cached`` with ``backend=<name>``;
4. check, bit for bit: the outputs (all NaNs equal); that in-place calls return the very input
   tensors and out-of-place calls return fresh ones of the input's shape, dtype and device; and
   that every buffer element no output may touch (canary padding, the gaps of strided views,
   the v part of a fused qkv, cos/sin/positions/cache, and all inputs of an out-of-place call)
   kept its exact bits;
5. with ``case.backward``: the gradient autograd returns for each input equals the reference
   rotation by -theta of the upstream gradient (``conjugate=True``); without it, steps 1, 3 and 4
   again on fresh inputs, so the second call of a signature (the dispatcher's prepared runner,
   dispatch.py) is checked as strictly as the first.

A failure raises ``AssertionError`` naming the case, the tensor and the first differing element.
Error cases (:class:`~rope_backends.testing.cases.ErrorCase`) are checked by
:func:`check_error_case`. This module never changes what a backend computes and has no tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .. import mrope as _mrope
from .. import environment, reference, registry
from ..validation import args_for_cached, args_for_tables
from . import make
from .cases import DTYPES, ErrorCase, RopeCase, cases_for
from .check import assert_bitwise_equal, bits

__all__ = [
    "Target",
    "Outcome",
    "TargetResult",
    "present_device_types",
    "targets",
    "case_device",
    "build",
    "check_case",
    "check_error_case",
    "run_target",
]


# --------------------------------------------------------------------------------------------
# where a backend can run here

@dataclass(frozen=True)
class Target:
    """One backend on one device type of this machine. ``runnable`` False carries the reason."""

    backend: str
    device: str
    runnable: bool
    reason: str | None = None

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.device}"


def present_device_types() -> tuple[str, ...]:
    """Device types with at least one device here: cpu, then cuda (CUDA or ROCm), then npu."""
    kinds = ["cpu"]
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        kinds.append("cuda")
    if environment.npu_available():
        kinds.append("npu")
    return tuple(kinds)


def targets(backend: str | Sequence[str] | None = None, device: str | None = None) -> list[Target]:
    """Every registered backend (or those named) on every device type it can serve here:
    its own device types that are present, then the device types it serves only when named
    (``explicit_device_types``: the Triton interpreter, the simulated NPU). A backend that
    cannot run here gets one non-runnable target with the reason."""
    names = [backend] if isinstance(backend, str) else list(backend) if backend else None
    present = present_device_types()
    if device is not None:
        device_type = torch.device(device).type
        present = tuple(d for d in present if d == device_type) or (device_type,)
    out = []
    for info in registry.list_backends():
        if names is not None and info.name not in names:
            continue
        b = registry.get(info.name)
        if registry.ANY_DEVICE in b.device_types:
            native = list(present)
        else:
            native = [d for d in b.device_types if d in present]
        explicit = [d for d in info.explicit_device_types if d in present and d not in native]
        devices = native + explicit
        if device is not None:
            devices = [device if torch.device(device).type == d else d for d in devices]
        if not info.available:
            where = devices[0] if devices else (b.device_types[0] if b.device_types else "cpu")
            out.append(Target(info.name, where, False, f"{info.name} unavailable: {info.reason}"))
            continue
        if not devices:
            served = ", ".join(b.device_types) or "no device type"
            want = f" {device}" if device else ""
            where = device or (b.device_types[0] if b.device_types else "cpu")
            out.append(Target(info.name, where, False, f"{info.name} serves {served}; no such{want} device here"))
            continue
        for d in devices:
            out.append(Target(info.name, d, True))
    if names is not None:
        unknown = [n for n in names if n not in {t.backend for t in out}]
        if unknown:
            raise ValueError(
                f"backend: expected registered backend names {sorted(i.name for i in registry.list_backends())}, got {unknown}"
            )
    return out


def case_device(case: RopeCase, target_device: str) -> tuple[str | None, str | None]:
    """The device a case runs on for a target, or (None, why not here)."""
    if case.device is None:
        return target_device, None
    want = torch.device(case.device)
    have = torch.device(target_device)
    if have.type != want.type:
        return None, f"{case.name} needs a {want.type} device; this target runs on {have.type}"
    if want.index is not None and torch.cuda.device_count() <= want.index:
        return None, f"{case.name} needs {case.device}; {torch.cuda.device_count()} CUDA device(s) here"
    return case.device, None


# --------------------------------------------------------------------------------------------
# building the inputs

@dataclass
class Inputs:
    """The tensors of one case, as the call receives them, and the buffers they live in."""

    q: Tensor
    k: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    positions: Tensor | None = None
    cache: Tensor | None = None
    buffers: list[make.Buffer] = field(default_factory=list)

    def rotated(self) -> tuple[Tensor, ...]:
        return (self.q,) if self.k is None else (self.q, self.k)


def _generator(case: RopeCase, device: torch.device) -> torch.Generator:
    # large cases generate on the device (a CPU copy of 2**31 elements would be slow)
    gen_device = device if "large" in case.marks else torch.device("cpu")
    return torch.Generator(device=gen_device).manual_seed(zlib.crc32(case.name.encode()))


def _mrope_of(case: RopeCase):
    if case.mrope is None:
        return None
    kind, sections = case.mrope
    return getattr(_mrope, kind)(sections)


def build(case: RopeCase, device: str | torch.device) -> Inputs:
    """The inputs of ``case`` on ``device``, every tensor inside a canary-padded buffer."""
    device = torch.device(device)
    gen = _generator(case, device)
    dtype = DTYPES[case.dtype]
    x_values = "special" if case.values == "special" else "normal"
    qs, ks = case.q_shape(), case.k_shape()
    buffers: list[make.Buffer] = []
    if case.storage == "fused_qkv":
        # q | k | v of one projection output; with k=None the k part is there but unused
        other = ks if ks is not None else qs
        axis = -1 if case.flat else case.heads_axis
        buf = make.fused([qs, other, other], axis, dtype, device)
        for v in buf.views:
            make.fill(v, x_values, gen)
        q, k = buf.views[0], (buf.views[1] if ks is not None else None)
        buffers.append(buf)
    else:
        bq = make.padded(qs, dtype, device, case.storage)
        make.fill(bq.views[0], x_values, gen)
        q, k = bq.views[0], None
        buffers.append(bq)
        if ks is not None:
            bk = make.padded(ks, dtype, device, case.storage)
            make.fill(bk.views[0], x_values, gen)
            k = bk.views[0]
            buffers.append(bk)
    inp = Inputs(q, k, buffers=buffers)
    special_cos = case.values == "special_cos"
    if case.op == "apply_cached":
        cdt = DTYPES[case.cos_dtype]
        cos, sin = make.cos_sin_values((case.max_position, case.rd // 2), cdt, gen, special_cos)
        bc = make.padded((case.max_position, case.rd), cdt, device)
        bc.views[0].copy_(torch.cat((cos, sin), dim=-1))
        inp.cache = bc.views[0]
        lead = case.lead()
        pshape = (3, *lead) if case.mrope is not None and case.mrope_rows == 3 else lead
        pstorage = {"transposed": "reversed", "permuted": "reversed", "strided_last": "strided_last"}.get(case.storage, "contiguous")
        if len(pshape) < 2 and pstorage == "reversed":
            pstorage = "contiguous"
        bp = make.padded(pshape, DTYPES.get(case.positions_dtype) or getattr(torch, case.positions_dtype), device, pstorage)
        bp.views[0].copy_(make.positions(pshape, case.max_position, bp.base.dtype, torch.Generator().manual_seed(gen.initial_seed())))
        inp.positions = bp.views[0]
        buffers += [bc, bp]
        return inp
    # explicit cos/sin: seeded angles in the case's broadcast shape, half or duplicated form
    cdt = DTYPES[case.cos_dtype]
    logical = case.cos_shape()
    data_shape = logical
    if case.cos_bcast == "expanded":  # one row per token, expanded (stride 0) to the full shape
        data_shape = dataclasses.replace(case, cos_bcast="token").cos_shape()
    cos, sin = make.cos_sin_values(data_shape, cdt, gen, special_cos)
    if case.cos_form == "dup":
        if case.layout == "neox":  # HF: cat((freqs, freqs), -1)
            cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        else:  # GPT-J / diffusers: repeat_interleave(2)
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    storage = {"strided": "strided_last", "transposed": "swap_last2"}.get(case.cos_bcast, "contiguous")
    for name, data in (("cos", cos), ("sin", sin)):
        b = make.padded(tuple(data.shape), cdt, device, storage if data.dim() >= 2 or storage == "strided_last" else "contiguous")
        b.views[0].copy_(data)
        view = b.views[0]
        if case.cos_bcast == "expanded":
            full = (*logical[:-1], data.shape[-1])
            view = view.expand(full)
        setattr(inp, name, view)
        buffers.append(b)
    return inp


# --------------------------------------------------------------------------------------------
# calls and expected results

def call(case: RopeCase, inp: Inputs, backend: str | None, q: Tensor | None = None, k: Tensor | None = None) -> tuple[Tensor, ...]:
    """Make the public call the case describes; one output per rotated tensor."""
    import rope_backends as rb

    q = inp.q if q is None else q
    k = inp.k if k is None else k
    if case.op == "apply":
        return (rb.apply(q, inp.cos, inp.sin, layout=case.layout, rotary_dim=case.rotary_dim, inplace=case.inplace,
                         backend=backend),)
    if case.op == "apply_qk":
        return tuple(rb.apply_qk(q, k, inp.cos, inp.sin, layout=case.layout, rotary_dim=case.rotary_dim,
                                 inplace=case.inplace, backend=backend))
    q_out, k_out = rb.apply_cached(q, k, inp.positions, inp.cache, layout=case.layout, rotary_dim=case.rotary_dim,
                                   mrope=_mrope_of(case), inplace=case.inplace, head_dim=case.head_dim, backend=backend)
    if k is None:
        if k_out is not None:
            raise AssertionError(f"{case.name}: apply_cached with k=None returned a k of {type(k_out).__name__}")
        return (q_out,)
    return q_out, k_out


def _reference_args(case: RopeCase, tensors: Sequence[Tensor], inp: Inputs, where: Callable[[Tensor], Tensor]):
    """Validated out-of-place args for ``tensors`` (q[, k]) and the rest of ``inp`` moved by ``where``."""
    if case.op == "apply_cached":
        args, _ = args_for_cached(tensors[0], tensors[1] if len(tensors) > 1 else None, where(inp.positions),
                                  where(inp.cache), case.layout, case.rotary_dim, _mrope_of(case), False, case.head_dim)
        return args
    named = (("x", tensors[0]),) if case.op == "apply" else (("q", tensors[0]), ("k", tensors[1]))
    return args_for_tables(named, where(inp.cos), where(inp.sin), case.layout, case.rotary_dim, False)


def reference_outputs(case: RopeCase, inp: Inputs, tensors: Sequence[Tensor] | None = None, *,
                      conjugate: bool = False, device: str | torch.device = "cpu") -> tuple[Tensor, ...]:
    """The reference result for ``tensors`` (default: the case's q[, k]) computed on ``device``
    from copies, out of place; each shaped like its input. ``conjugate``: rotation by -theta."""
    where = (lambda t: t.detach().to(device))
    src = inp.rotated() if tensors is None else tensors
    moved = [where(t) for t in src]
    args = _reference_args(case, moved, inp, where)
    if conjugate:
        args = dataclasses.replace(args, conjugate=True)
    with torch.no_grad():
        outs = reference.run(args)
    return tuple(o.reshape(t.shape) for o, t in zip(outs, src))


# --------------------------------------------------------------------------------------------
# the check

def _written_mask(buf: make.Buffer, written: Iterable[Tensor]) -> Tensor:
    ptrs = {(t.data_ptr(), t.stride(), tuple(t.shape)) for t in written}
    views = [v for v in buf.views if (v.data_ptr(), v.stride(), tuple(v.shape)) in ptrs]
    return make.Buffer(buf.base, views).covered()


def _check_untouched(case: RopeCase, inp: Inputs, before: list[Tensor], written: Sequence[Tensor]) -> None:
    """Every buffer element outside the in-place outputs keeps its exact bits."""
    for i, (buf, snap) in enumerate(zip(inp.buffers, before)):
        mask = _written_mask(buf, written)
        diff = bits(buf.base) != bits(snap)
        diff &= ~mask
        if bool(diff.any()):
            at = int(diff.nonzero()[0, 0])
            what = "outside the written view (canary padding, gaps or other inputs)" if written else "an input of an out-of-place call"
            raise AssertionError(
                f"{case.name}: {int(diff.sum())} element(s) of buffer {i} ({buf.base.dtype}) changed in {what}; "
                f"first at flat offset {at}: {snap[at].item()!r} became {buf.base[at].item()!r}"
            )


def _check_outputs(case: RopeCase, inp: Inputs, outs: Sequence[Tensor], expected: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    if len(outs) != len(expected):
        raise AssertionError(f"{case.name}: {len(outs)} outputs, expected {len(expected)}")
    for name, out, exp, x in zip(("q", "k"), outs, expected, inputs):
        if not isinstance(out, Tensor):
            raise AssertionError(f"{case.name}: output {name} is a {type(out).__name__}, expected a Tensor")
        if case.inplace and out is not x:
            raise AssertionError(f"{case.name}: inplace=True must return the input tensor {name} itself")
        if not case.inplace and x.numel() and out.data_ptr() == x.data_ptr():
            raise AssertionError(f"{case.name}: inplace=False returned {name} sharing the input's memory")
        if out.device != x.device:
            raise AssertionError(f"{case.name}: output {name} on {out.device}, input on {x.device}")
        assert_bitwise_equal(out, exp, name=f"{case.name}: output {name}")


def check_case(case: RopeCase, backend: str, device: str | torch.device) -> None:
    """Run ``case`` on ``backend`` with tensors on ``device``; raise AssertionError on any
    difference from the reference (see the module docstring for everything checked)."""
    device = torch.device(device)
    if "large" in case.marks:
        try:
            return _check_large(case, backend, device)
        finally:
            if device.type == "cuda":
                # hand the ~20 GiB back to the driver: checks running side by side on one GPU
                # (bench/gpu_conformance.sh) run out of memory on another process's cached blocks
                torch.cuda.empty_cache()
    inp = build(case, device)
    before = [b.base.clone() for b in inp.buffers]
    expected = reference_outputs(case, inp)
    rotated = inp.rotated()
    if case.backward:
        # twice, on fresh inputs: the second call takes the dispatcher's prepared runner (and the
        # backward the backend runner its first backward kept)
        for _ in range(2):
            leaves = tuple(t.requires_grad_() for t in rotated)
            outs = call(case, inp, backend)
            _check_outputs(case, inp, outs, expected, rotated)
            gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()) + 1)
            upstream = []
            for out in outs:
                g = torch.empty(out.shape, dtype=out.dtype)
                make.fill(g, "special" if case.values == "special" else "normal", gen)
                upstream.append(g.to(out.device))
            grads = torch.autograd.grad(outs, leaves, grad_outputs=upstream)
            want = reference_outputs(case, inp, upstream, conjugate=True)
            for name, g, w in zip(("q", "k"), grads, want):
                assert_bitwise_equal(g, w, name=f"{case.name}: grad of {name}")
            for t in rotated:
                t.requires_grad_(False)
            _check_untouched(case, inp, before, ())
            inp = build(case, device)
            before = [b.base.clone() for b in inp.buffers]
            rotated = inp.rotated()
        return
    outs = call(case, inp, backend)
    _check_outputs(case, inp, outs, expected, rotated)
    _check_untouched(case, inp, before, rotated if case.inplace else ())
    # again on fresh inputs (built from the same seed): a repeated signature takes the
    # dispatcher's prepared runner, which must give the same bits as the first, full path
    inp = build(case, device)
    before = [b.base.clone() for b in inp.buffers]
    rotated = inp.rotated()
    outs = call(case, inp, backend)
    _check_outputs(case, inp, outs, expected, rotated)
    _check_untouched(case, inp, before, rotated if case.inplace else ())


def _check_large(case: RopeCase, backend: str, device: torch.device) -> None:
    """>2**31-element cases: the reference on the device, in slices along the token dim."""
    inp = build(case, device)
    before = [b.base.clone() for b in inp.buffers]
    rotated = inp.rotated()
    originals = [t.clone() for t in rotated] if case.inplace else list(rotated)
    outs = call(case, inp, backend)
    if case.inplace:
        for out, x in zip(outs, rotated):
            if out is not x:
                raise AssertionError(f"{case.name}: inplace=True must return the input tensor itself")
    step = 1 << 18
    for start in range(0, case.shape[0], step):
        sl = slice(start, start + step)
        part = Inputs(originals[0][sl], originals[1][sl] if len(originals) > 1 else None,
                      cos=inp.cos[sl] if inp.cos is not None else None, sin=inp.sin[sl] if inp.sin is not None else None,
                      positions=inp.positions[sl] if inp.positions is not None else None, cache=inp.cache)
        want = reference_outputs(case, part, device=device)
        for name, out, w in zip(("q", "k"), outs, want):
            assert_bitwise_equal(out[sl], w, name=f"{case.name}: output {name}[{start}:{start + step}]")
        del want
    del originals
    _check_untouched(case, inp, before, rotated if case.inplace else ())


# --------------------------------------------------------------------------------------------
# error cases

@contextlib.contextmanager
def _environ(env) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_error_case(case: ErrorCase, backend: str | None, device: str | torch.device) -> str:
    """Make the bad call on ``backend``/``device``; it must raise ``case.error`` with a message
    that starts with ``case.arg + ":"`` and says what was expected and what came, and leave
    every input bit-identical. Returns the message."""
    device = str(device)
    ecall = case.build(device)
    # sparse and nested inputs have no bit pattern to compare (they are the bad input there)
    watched = [(t, t.detach().clone()) for t in ecall.watched
               if t.device.type != "meta" and t.layout is torch.strided and not t.is_nested]
    with _environ(ecall.env), ecall.context():
        try:
            ecall.fn(backend)
        except case.error as exc:
            message = str(exc)
        except Exception as exc:
            raise AssertionError(f"{case.name}: expected {case.error.__name__}, got {type(exc).__name__}: {exc}") from exc
        else:
            raise AssertionError(f"{case.name}: expected {case.error.__name__} naming {case.arg!r}, nothing was raised")
    if not message.startswith(case.arg + ":"):
        raise AssertionError(f"{case.name}: the message should start with {case.arg + ':'!r}, got {message!r}")
    if "expected" not in message or "got" not in message:
        raise AssertionError(f"{case.name}: the message should say what was expected and what came, got {message!r}")
    for i, (t, saved) in enumerate(watched):
        assert_bitwise_equal(t.detach(), saved, nans_equal=False, name=f"{case.name}: input {i} after the failed call")
    return message


# --------------------------------------------------------------------------------------------
# a whole target, for the CLI

@dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    message: str = ""


@dataclass
class TargetResult:
    target: Target
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(not o.ok for o in self.outcomes)


def run_target(target: Target, cases: Sequence[RopeCase] | None = None, error_cases: Sequence[ErrorCase] = (),
               full: bool = False, progress: Callable[[Outcome], None] | None = None) -> TargetResult:
    """Every case (default: ``cases_for(target)``) and error case on one target, collecting
    outcomes instead of raising."""
    result = TargetResult(target)
    if not target.runnable:
        return result
    device_type = torch.device(target.device).type
    if cases is None:
        cases = cases_for(target.backend, device_type, full)
    t0 = time.perf_counter()
    for case in cases:
        dev, why = case_device(case, target.device)
        if dev is None:
            result.skipped.append((case.name, why or ""))
            continue
        result.outcomes.append(_timed(case.name, lambda: check_case(case, target.backend, dev)))
        if progress:
            progress(result.outcomes[-1])
    for ec in error_cases:
        if ec.device_types is not None and device_type not in ec.device_types:
            result.skipped.append((f"error:{ec.name}", f"checked on {', '.join(ec.device_types)} only"))
            continue
        result.outcomes.append(_timed(f"error:{ec.name}", lambda: check_error_case(ec, target.backend, target.device)))
        if progress:
            progress(result.outcomes[-1])
    result.seconds = time.perf_counter() - t0
    return result


def _timed(name: str, fn: Callable[[], object]) -> Outcome:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # every failure is reported, the run goes on
        return Outcome(name, False, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
    return Outcome(name, True, time.perf_counter() - t0)
