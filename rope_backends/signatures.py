"""The validated-signature cache of table calls (``apply``, ``apply_qk``).

The checks of validation.py read metadata only (types, shapes, strides, dtypes, devices, grad
flags, options), so a call whose *signature* -- all of that metadata -- passed them before passes
again without re-checking: it is what keeps ``rb.apply``'s host overhead in the low microseconds
when the dispatcher has no prepared runner for a call. A new signature takes the full checks,
which raise the precise errors. What is kept per signature: the normalised ``(layout,
rotary_dim, value_checks)``; cos/sin's shapes are in the signature, so their half form is taken
as validation took it.

What a signature cannot cover (addresses, values) validation.py checks on every hit. This module
checks nothing itself and imports only contract.py and modes.py.

:func:`metadata_guard` builds the C++ form of a signature's tensor part that the dispatcher's recent
signatures and autograd.py's rotations check before any Python key is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .contract import Layout
from .modes import debug_checks, functorch_transform

__all__ = ["table_signature", "known", "remember", "metadata_guard", "TensorGuards"]

try:
    from torch._C._dynamo.guards import TensorGuards
except Exception:  # a torch without it: signature keys alone
    TensorGuards = None


def metadata_guard(tensors: tuple[Tensor, ...]):
    """torch's TensorGuards of ``tensors`` (what dynamo guards compiled graphs with): their type,
    dispatch keys (so torch's negative bit too), dtype, device, sizes, strides and grad flag,
    checked in one C++ call by ``guard.check(*tensors)``. None where this torch has no
    TensorGuards or its constructor takes other arguments."""
    if TensorGuards is None:
        return None
    try:
        return TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                            dynamic_dims_strides=[list(t.stride()) for t in tensors])
    except Exception:
        return None

# signature -> (layout, rotary_dim, value_checks)
_TABLE_SIGNATURES: dict[tuple, tuple[Layout, int, bool]] = {}
_MAX_SIGNATURES = 4096  # serving changes T every step: bound the memory, re-validate after a clear


def table_signature(tensors: tuple[tuple[str, object], ...], cos: object, sin: object,
                    layout: object, rotary_dim: object, inplace: object) -> tuple | None:
    """The signature of a table call (``tensors``: ``(name, tensor)`` pairs), or None where no
    signature may stand for the checks: under torch.compile or a functorch transform (fake or
    wrapped tensors), for tensor subclasses and for option types that compare equal to others."""
    if torch.compiler.is_compiling() or functorch_transform() is not None:
        return None
    if type(cos) is not Tensor or type(sin) is not Tensor or type(layout) not in (str, Layout):
        return None  # subclasses (Parameter, FakeTensor) and odd arguments take the full checks
    if (rotary_dim is not None and type(rotary_dim) is not int) or type(inplace) is not bool:
        return None  # 1 == True as a key: only exact ints and bools may share a signature
    try:
        # debug_checks(): whether a GPU table's values may be read (the partial-rotary check), so a
        # signature validated without it is not taken for one with it
        key = (layout, rotary_dim, inplace, torch.is_grad_enabled(), debug_checks(),
               cos.shape, cos.stride(), cos.dtype, cos.device, cos.requires_grad,
               sin.shape, sin.stride(), sin.dtype, sin.device, sin.requires_grad)
        for _, t in tensors:
            if type(t) is not Tensor:
                return None
            key += (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)
    except RuntimeError:  # sparse or nested tensors have no strides: the full checks say why
        return None
    return key


def known(key: tuple | None) -> tuple[Layout, int, bool] | None:
    """What validation normalised for ``key``, if that signature passed before."""
    return _TABLE_SIGNATURES.get(key) if key is not None else None


def remember(key: tuple | None, layout: Layout, rotary_dim: int, value_checks: bool) -> None:
    """Record that ``key`` passed every check, with what validation normalised."""
    if key is None:
        return
    if len(_TABLE_SIGNATURES) >= _MAX_SIGNATURES:
        _TABLE_SIGNATURES.clear()
    _TABLE_SIGNATURES[key] = (layout, rotary_dim, value_checks)
