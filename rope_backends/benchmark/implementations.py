"""Which implementations run a case, in the order their rows appear.

For every case: each rope_backends backend that serves the device (through the public call, the
backend named), then the package's own code called without dispatch -- ``eager-strided`` (the
reference itself) and :data:`NPU_PATH` (the shipped npu backend's contiguous stack+flatten code,
``rope_backends.backends.npu``, run on this device) -- then the :mod:`.peers`, then the
:mod:`.baselines`. The dispatch group has its own list (:func:`for_dispatch`): the public call
with automatic selection, the selected backend's ``forward`` on pre-validated arguments, one
torch op and, on a GPU with the triton backend, the compiled kernel launched directly.

This module decides what runs and under which name; it times nothing and builds no inputs.
Names are part of the result schema: rename only with an entry in :data:`ALIASES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import reference
from ..backends import npu as npu_backend
from ..dispatch import apply, apply_cached, apply_qk
from ..registry import list_backends as backend_infos
from ..registry import get as get_backend
from ..contract import Layout
from ..validation import args_for_cached, args_for_tables
from . import baselines, peers
from .scenarios import HEAD_DIM, Case, Impl, autograd_prepare

__all__ = ["Options", "NPU_PATH", "ALIASES", "canonical", "backend_names", "for_case", "for_dispatch"]

STRIDED = "eager-strided"
NPU_PATH = "npu-path (eager stack+flatten)"
# old implementation names -> the current ones: results written before a rename still select
ALIASES = {"eager-stack+flatten": NPU_PATH}
_REFERENCE_NOTE = "the reference (rope_backends.reference.rotate) called directly"
_NPU_NOTE = "rope_backends.backends.npu (contiguous cat / stack+flatten, no strided writes) called directly"


def canonical(name: str) -> str:
    """The current name of an implementation (an old name from :data:`ALIASES` maps to its new one)."""
    return ALIASES.get(name, name)


@dataclass
class Options:
    quick: bool = False
    impls: tuple[str, ...] = ()     # only these implementations (old names accepted)
    skip: tuple[str, ...] = ()      # leave these out (old names accepted)
    progress: bool = True

    def selects(self, name: str) -> bool:
        """``name`` is among ``impls`` (or ``impls`` is empty)."""
        return not self.impls or name in {canonical(n) for n in self.impls}

    def keep(self, name: str) -> bool:
        """Selected and not skipped."""
        return self.selects(name) and name not in {canonical(n) for n in self.skip}


def backend_names(device_type: str) -> tuple[list[str], list[dict]]:
    """Backends benchmarked on this device (available and serving it without being named) and
    the others with the reason."""
    names, skipped = [], []
    for info in backend_infos():
        serves = "*" in info.device_types or device_type in info.device_types
        if not serves:
            if device_type in info.explicit_device_types:
                skipped.append({"implementation": info.name, "reason":
                                f"serves {device_type!r} only when named (a test vehicle, e.g. the Triton "
                                "interpreter or the simulated NPU): not benchmarked"})
            else:
                skipped.append({"implementation": info.name,
                                "reason": f"serves {', '.join(info.device_types)}, not {device_type!r}"})
            continue
        if not info.available:
            skipped.append({"implementation": info.name, "reason": f"unavailable: {info.reason}"})
            continue
        names.append(info.name)
    return names, skipped


def npu_path(x: Tensor, cos: Tensor, sin: Tensor, layout: str) -> Tensor:
    """The shipped npu backend's rotation of ``x [..., D]`` (full rotary), out of place."""
    return npu_backend.rotate(x, cos, sin, Layout(layout), x.shape[-1])


def _backends(case: Case, names: list[str]) -> list[Impl]:
    layout = case.layout
    if case.op == "apply":
        return [Impl(b, "backend", lambda d, b=b: lambda: (apply(d["x"], d["cos"], d["sin"], layout=layout, backend=b),))
                for b in names]
    if case.op == "apply_qk":
        inplace = case.inplace
        return [Impl(b, "backend", lambda d, b=b: lambda: apply_qk(d["q"], d["k"], d["cos"], d["sin"], layout=layout,
                                                                  inplace=inplace, backend=b), mutates=inplace)
                for b in names]
    if case.op == "apply_cached":
        return [Impl(b, "backend", lambda d, b=b: lambda: apply_cached(
            d["q"], d["k"], d["positions"], d["cache"], layout=layout, mrope=d["mrope"],
            head_dim=HEAD_DIM, backend=b), mutates=True) for b in names]
    if case.op in ("forward", "backward"):
        return [Impl(b, "backend", autograd_prepare(case.op, lambda x, c, s, b=b: apply(x, c, s, layout=layout, backend=b)))
                for b in names]
    return []


def _own_code(case: Case) -> list[Impl]:
    """The package's own code without dispatch: the reference and the shipped npu path."""
    op, layout = case.op, case.layout
    if op == "apply":
        return [Impl(STRIDED, "peer", lambda d: lambda: (reference.rotate(d["x"], d["cos"], d["sin"], Layout(layout),
                                                                          d["x"].shape[-1]),), note=_REFERENCE_NOTE),
                Impl(NPU_PATH, "peer", lambda d: lambda: (npu_path(d["x"], d["cos"], d["sin"], layout),),
                     note=_NPU_NOTE)]
    if op == "apply_qk":
        return [Impl(STRIDED, "peer", lambda d: lambda: tuple(
                    reference.rotate(t, d["cos"], d["sin"], Layout(layout), t.shape[-1]) for t in (d["q"], d["k"])),
                     note=_REFERENCE_NOTE),
                Impl(NPU_PATH, "peer", lambda d: lambda: (npu_path(d["q"], d["cos"], d["sin"], layout),
                                                          npu_path(d["k"], d["cos"], d["sin"], layout)),
                     note=_NPU_NOTE + ", out of place")]
    if op == "apply_cached":
        def by(forward):
            def prepare(d):
                args, originals = args_for_cached(d["q"], d["k"], d["positions"], d["cache"], layout, None,
                                                  d["mrope"], True, HEAD_DIM)
                return lambda: (forward(args), originals)[1]
            return prepare
        return [Impl(STRIDED, "peer", by(reference.run), mutates=True,
                     note="the reference (rope_backends.reference.run) on pre-validated args"),
                Impl(NPU_PATH, "peer", by(npu_backend.forward), mutates=True,
                     note="rope_backends.backends.npu.forward on pre-validated args: index_select lookup, "
                          "contiguous rotation, one final copy_ per tensor")]
    if op in ("forward", "backward"):
        return [Impl(STRIDED, "peer", autograd_prepare(op, lambda x, c, s: reference.rotate(x, c, s, Layout(layout),
                                                                                           x.shape[-1])),
                     note="autograd through the reference"),
                Impl(NPU_PATH, "peer", autograd_prepare(op, lambda x, c, s: npu_path(x, c, s, layout)),
                     note="autograd through the shipped npu backend's contiguous rotation")]
    return []


def for_case(case: Case, device: torch.device, names: list[str], options: Options) -> list[Impl]:
    """Every implementation of a (non-dispatch) case that ``options`` keeps."""
    out = _backends(case, names)
    if case.layers == 1:  # the model-step rows (layers > 1): the backends and torch's own op alone
        out += _own_code(case) + peers.for_case(case.op, case.layout)
    if case.op in ("forward", "backward"):
        out.append(baselines.torch_autograd_op(case.op))
    if case.op in ("apply", "apply_qk", "apply_cached") and case.group in ("diffusion", "qk", "llm"):
        out.append(baselines.same_bytes_copy(case.nbytes, device))
    return [i for i in out if options.keep(i.name)]


def for_dispatch(case: Case, device: torch.device, backend: str) -> list[Impl]:
    """rb.apply (automatic selection) vs the selected backend's forward on pre-validated args vs
    one torch op vs (GPU, triton) the kernel launched directly."""
    impls = []
    if case.op == "apply":
        impls.append(Impl("rb.apply", "backend", lambda d: lambda: (apply(d["x"], d["cos"], d["sin"]),),
                          note="public call, automatic backend selection"))

        def fwd(d):
            b = get_backend(backend)
            args = args_for_tables((("x", d["x"]),), d["cos"], d["sin"], "neox", None, False)
            return lambda: b.forward(args)
    else:
        impls.append(Impl("rb.apply_cached", "backend", lambda d: lambda: apply_cached(
            d["q"], d["k"], d["positions"], d["cache"], head_dim=HEAD_DIM), mutates=True,
            note="public call, automatic backend selection, in place"))

        def fwd(d):
            b = get_backend(backend)
            args, originals = args_for_cached(d["q"], d["k"], d["positions"], d["cache"], "neox", None, None, True,
                                              HEAD_DIM)
            return lambda: (b.forward(args), originals)[1]
    impls.append(Impl(f"{backend}.forward", "backend", fwd, mutates=case.op == "apply_cached",
                      note="the selected backend's forward on pre-validated RopeArgs"))
    impls.append(baselines.torch_op(device))
    if device.type == "cuda" and backend == "triton":
        impls.append(baselines.direct_launch(case.op))
    return impls
