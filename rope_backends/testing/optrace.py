"""Record the aten ops a call issues and flag every write into strided memory.

On Ascend NPUs a write into a non-contiguous view (``out[..., 0::2] = v``, an in-place op or an
``out=`` op on a strided tensor, a ``*_scatter``/``index_put`` into a slice) becomes
ViewCopy/InplaceCopy work. :class:`OpRecorder` is a ``TorchDispatchMode`` that sees every aten op
below autograd (forward and backward), records what it is and what it writes, and judges each
write:

- a ``scatter`` op (slice_scatter, select_scatter, index_put, scatter, as_strided_, ...) is a
  violation wherever it writes;
- an in-place, ``out=`` or ``copy_`` write into a non-contiguous tensor is a violation, except the
  single final ``copy_`` of a contiguous result over the whole of a caller's tensor that the call
  was asked to overwrite (``targets``): when that tensor is itself a strided view (q/k inside a
  fused qkv buffer) the copy is unavoidable and is allowed once per target;
- any other write into the memory of a caller's tensor (a second copy, a partial write, a write
  into an input such as cos/sin) is a violation, contiguous or not.

Custom ops (``rope_backends::*``, the torch.library facade) are recorded and then run with the
recorder still active, so the aten ops inside them are seen too.

A test tool, shipped with :mod:`rope_backends.testing` so plug-in authors can hold their own
backend to the same rule. Used by tests/test_optrace.py (the npu path must be free of violations,
the eager reference must not be) and bench/studies/optrace.py (op counts per implementation).
This module imports no backend and never changes what the recorded code computes.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["SCATTER_OPS", "KINDS", "OpRecord", "Write", "Trace", "OpRecorder", "record", "recording"]

# ops that write at an index set or into a slice of their destination: the strided writes this
# module exists to find, flagged wherever they write (functional forms included, since they are
# what a strided assignment becomes once functionalised)
SCATTER_OPS = frozenset(
    {
        "slice_scatter", "select_scatter", "diagonal_scatter", "as_strided_scatter", "as_strided_",
        "index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "_unsafe_index_put",
        "index_copy", "index_copy_", "index_add", "index_add_", "index_fill", "index_fill_",
        "index_reduce", "index_reduce_", "masked_scatter", "masked_scatter_", "put", "put_",
        "scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_",
    }
)

KINDS = ("compute", "view", "copy", "inplace", "out", "scatter", "custom")

_AFTER_PYTHON = torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


@dataclass(frozen=True)
class Write:
    """One tensor an op wrote into (a mutated argument of its schema).

    shape, stride    of the destination view
    contiguous       ``destination.is_contiguous()``
    caller           name of the caller's tensor whose memory the destination overlaps, or None
    allowed_final    the one permitted final copy over a whole target
    violation        why this write is not allowed, or None
    """

    arg: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    contiguous: bool
    caller: str | None
    allowed_final: bool
    violation: str | None


@dataclass(frozen=True)
class OpRecord:
    """One op as the dispatcher saw it.

    op      ``"aten::mul.Tensor"``
    kind    compute (fresh output) | view (output aliases an input) | copy (copy_) |
            inplace | out (``out=``) | scatter | custom (a non-aten op, whose aten ops follow)
    writes  the tensors it wrote into (in-place, out= and copy_ destinations)
    bytes_written  bytes of fresh outputs plus bytes of written destinations
    """

    op: str
    kind: str
    writes: tuple[Write, ...]
    bytes_written: int
    violation: str | None = None


@dataclass
class Trace:
    """Everything one recording saw, with the verdicts."""

    records: list[OpRecord] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        out = []
        for i, r in enumerate(self.records):
            if r.violation is not None:
                out.append(f"#{i} {r.op}: {r.violation}")
            for w in r.writes:
                if w.violation is not None:
                    out.append(f"#{i} {r.op} {w.arg}{list(w.shape)} stride {list(w.stride)}: {w.violation}")
        return out

    def counts(self) -> collections.Counter:
        """Ops by name (views included)."""
        return collections.Counter(r.op for r in self.records)

    def kinds(self) -> collections.Counter:
        """Ops by kind (see :class:`OpRecord`)."""
        return collections.Counter(r.kind for r in self.records)

    @property
    def strided_writes(self) -> int:
        """Writes into non-contiguous destinations plus scatter ops, the allowed final copy
        included (it is still ViewCopy work on an NPU, just unavoidable)."""
        n = sum(1 for r in self.records if r.kind == "scatter")
        return n + sum(1 for r in self.records if r.kind != "scatter" for w in r.writes if not w.contiguous)

    @property
    def caller_writes(self) -> int:
        """Writes that landed in the memory of a caller's tensor."""
        return sum(1 for r in self.records for w in r.writes if w.caller is not None)

    @property
    def kernels(self) -> int:
        """Ops that move data (everything but views and custom-op facades)."""
        return sum(1 for r in self.records if r.kind not in ("view", "custom"))

    @property
    def bytes_written(self) -> int:
        return sum(r.bytes_written for r in self.records)

    def summary(self) -> dict[str, Any]:
        """JSON-ready report: op counts by kind and by name, strided writes, violations."""
        return {
            "ops": len(self.records),
            "kernels": self.kernels,
            "by_kind": {k: self.kinds().get(k, 0) for k in KINDS},
            "by_op": dict(sorted(self.counts().items())),
            "strided_writes": self.strided_writes,
            "caller_writes": self.caller_writes,
            "bytes_written": self.bytes_written,
            "violations": self.violations,
        }


def _footprint(t: Tensor) -> tuple:
    """A canonical description of the elements a view addresses: start address and its
    (stride, size) dims, size-1 dims dropped and mergeable dims merged. Two views with equal
    footprints address the same memory (``[T, H*D]`` and its ``[T, H, D]`` view, for example)."""
    dims = sorted(((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1), reverse=True)
    merged: list[list[int]] = []
    for st, sz in reversed(dims):  # innermost first
        if merged and st == merged[-1][0] * merged[-1][1]:
            merged[-1][1] *= sz
        else:
            merged.append([st, sz])
    return (t.data_ptr(), t.element_size(), tuple(tuple(m) for m in merged))


def _byte_range(t: Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) of the elements ``t`` views."""
    lo = hi = t.storage_offset()
    for st, sz in zip(t.stride(), t.shape):
        if st >= 0:
            hi += st * (sz - 1)
        else:
            lo += st * (sz - 1)
    size = t.element_size()
    return t.untyped_storage().data_ptr(), lo * size, (hi + 1) * size


def _overlaps(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, sparse): no alias
        return -1


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class OpRecorder(TorchDispatchMode):
    """Records every op issued inside ``with OpRecorder(...) as rec:`` into ``rec.trace``.

    targets  caller tensors the call is asked to overwrite (in-place): each may receive one
             final ``copy_`` of a contiguous result over its whole extent, nothing else
    inputs   other caller tensors (cos, sin, positions, cache, out-of-place inputs): never written
    """

    def __init__(self, targets: Mapping[str, Tensor] | None = None, inputs: Mapping[str, Tensor] | None = None):
        super().__init__()
        self.trace = Trace()
        self._targets = {n: t for n, t in (targets or {}).items() if t is not None and t.numel()}
        self._inputs = {n: t for n, t in (inputs or {}).items() if t is not None and t.numel()}
        self._footprints = {n: _footprint(t) for n, t in self._targets.items()}
        self._ranges = {n: _byte_range(t) for n, t in {**self._inputs, **self._targets}.items()}
        self._final_done: set[str] = set()

    # -- judging one write ---------------------------------------------------------------------

    def _judge(self, name: str, arg: str, dest: Tensor, src: Tensor | None) -> Write:
        contiguous = dest.is_contiguous()
        rng = _byte_range(dest)
        caller = next((n for n, r in self._ranges.items() if _overlaps(rng, r)), None)
        whole = next((n for n, fp in self._footprints.items() if _footprint(dest) == fp), None)
        allowed = (
            name == "copy_"
            and whole is not None
            and whole not in self._final_done
            and isinstance(src, Tensor)
            and src.is_contiguous()
        )
        violation = None
        if allowed:
            self._final_done.add(whole)
            caller = whole
        elif whole is not None:
            violation = f"second or non-copy write into caller tensor {whole!r} (one final copy_ is allowed)"
        elif caller is not None:
            what = "input" if caller in self._inputs else "part of caller tensor"
            violation = f"write into {what} {caller!r}"
        elif not contiguous:
            violation = "write into a non-contiguous view"
        return Write(arg, tuple(dest.shape), tuple(dest.stride()), contiguous, caller, allowed, violation)

    # -- the dispatch hook -----------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        ns, _, base = schema.name.partition("::")
        op = f"{schema.name}.{func._overloadname}"
        if ns != "aten":
            # a custom op (the rope_backends facade): record it, then run its kernel with this
            # recorder still active so the aten ops it issues are recorded and judged
            self.trace.records.append(OpRecord(op, "custom", (), 0))
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor):
                    keys = keys | torch._C._dispatch_keys(t)
            with self:
                return func.redispatch(keys & _AFTER_PYTHON, *args, **kwargs)

        # the schema names what the op mutates: in-place self, out= arguments, copy_ destination
        bound = dict(zip((a.name for a in schema.arguments), args))
        bound.update(kwargs)
        mutated = [
            (a.name, bound[a.name], a.kwarg_only)
            for a in schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and isinstance(bound.get(a.name), Tensor)
        ]
        # judge before running: a write's destination is described as the op receives it
        src = bound.get("src") if base == "copy_" else None
        writes = tuple(
            self._judge(base, name, t, src) for name, t, _ in mutated if t.numel()
        )
        in_storages = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        result = func(*args, **kwargs)

        if base in SCATTER_OPS:
            kind = "scatter"
        elif base == "copy_":
            kind = "copy"
        elif mutated and any(kw for _, _, kw in mutated):
            kind = "out"
        elif mutated:
            kind = "inplace"
        else:
            outs = [t for t in tree_leaves(result) if isinstance(t, Tensor)]
            kind = "view" if outs and all(_storage(t) in in_storages for t in outs) else "compute"
        nbytes = sum(_nbytes(t) for _, t, _ in mutated)
        if kind == "compute":
            nbytes += sum(_nbytes(t) for t in tree_leaves(result) if isinstance(t, Tensor))
        violation = f"scatter op {base} writes into a strided slice" if kind == "scatter" else None
        self.trace.records.append(OpRecord(op, kind, writes, nbytes, violation))
        return result


def record(
    fn: Callable[[], Any],
    targets: Mapping[str, Tensor] | None = None,
    inputs: Mapping[str, Tensor] | None = None,
) -> tuple[Any, Trace]:
    """Run ``fn()`` under an :class:`OpRecorder`; return its result and the trace."""
    with OpRecorder(targets, inputs) as rec:
        result = fn()
    return result, rec.trace


@contextlib.contextmanager
def recording(targets: Mapping[str, Tensor] | None = None, inputs: Mapping[str, Tensor] | None = None) -> Iterator[Trace]:
    """``with recording(targets={"x": x}) as trace: ...`` -- the trace fills as ops run."""
    with OpRecorder(targets, inputs) as rec:
        yield rec.trace
