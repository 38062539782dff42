"""Bit-for-bit comparison of tensors: the only notion of "equal" the conformance suite uses.

``assert_bitwise_equal`` compares raw bit patterns (every NaN equals every other NaN unless
``nans_equal=False``, which the canary checks use) and, on failure, reports how many elements
differ, the first differing index and both values with their bit patterns.

It must not compare with a tolerance, and must not convert floating values before comparing them
(``-0.0 == 0.0`` numerically, but not here).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bits", "assert_bitwise_equal", "bitwise_mismatches"]

_INT_OF = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
_WIDTH = {torch.int64: 16, torch.int32: 8, torch.int16: 4}


def bits(t: Tensor) -> Tensor:
    """The raw bit patterns of a floating tensor as the signed integer dtype of the same width
    (a contiguous copy); integer and bool tensors are returned as they are."""
    if t.dtype in _INT_OF:
        return t.contiguous().view(_INT_OF[t.dtype])
    return t


def _hex(pattern: int, dtype: torch.dtype) -> str:
    width = _WIDTH.get(_INT_OF.get(dtype, torch.int64), 16)
    return f"0x{pattern & ((1 << (4 * width)) - 1):0{width}x}"


def bitwise_mismatches(actual: Tensor, expected: Tensor, *, nans_equal: bool = True) -> Tensor:
    """Boolean mask (shape of the inputs, on actual's device) of elements whose bits differ."""
    expected = expected.to(actual.device)
    a, e = actual.detach(), expected.detach()
    diff = bits(a) != bits(e)
    if nans_equal and a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(e))
    return diff


def assert_bitwise_equal(actual: Tensor, expected: Tensor, *, nans_equal: bool = True, name: str = "tensor") -> None:
    """Raise AssertionError unless ``actual`` and ``expected`` have the same shape, dtype and
    bit pattern in every element (all NaNs equal when ``nans_equal``). Devices may differ."""
    if not isinstance(actual, Tensor) or not isinstance(expected, Tensor):
        raise TypeError(
            f"assert_bitwise_equal: expected two tensors, got {type(actual).__name__} and {type(expected).__name__}"
        )
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} != expected {expected.dtype}")
    if actual.numel() == 0:
        return
    # compare values: a lazily negated view (torch's negative bit) holds its values negated in memory
    actual, expected = actual.resolve_neg(), expected.resolve_neg()
    diff = bitwise_mismatches(actual, expected, nans_equal=nans_equal)
    if not bool(diff.any()):
        return
    count = int(diff.sum())
    flat = int(diff.reshape(-1).nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(actual.shape)))
    a = actual.detach()[index]
    e = expected.detach().to(actual.device)[index]
    a_bits, e_bits = int(bits(a.reshape(1))[0]), int(bits(e.reshape(1))[0])
    raise AssertionError(
        f"{name}: {count} of {actual.numel()} elements differ (bitwise{', NaNs equal' if nans_equal else ''}); "
        f"first at index {list(index)}: actual {a.item()!r} ({_hex(a_bits, actual.dtype)}), "
        f"expected {e.item()!r} ({_hex(e_bits, actual.dtype)})"
    )
