"""Tensor factories for the conformance suite: every tensor a case hands to a backend is a view
into a larger *canary-padded* buffer, so a backend that writes out of bounds (or into the gaps of
a strided view) changes canary bits the suite then finds, and one that reads out of bounds picks
up NaN (float buffers) or an out-of-range position (integer buffers) and produces a wrong result.

Layouts: contiguous at an aligned or an odd (misaligned) offset, dims physically permuted
(``transposed``: [T, H, D] stored as [H, T, D]; [B, S, H, D] stored as [B, H, S, D]), a padded or
strided head_dim (``padded_rows``, ``strided_last``), a stride-0 leading dim (``expanded``), and
q/k/v as views of one fused qkv buffer (vLLM style). Values: seeded normals, or special values
(+-0, subnormals of the dtype, +-inf, NaN, largest finite) mixed in.

This module builds inputs only; it must not compute any expected result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "CANARY",
    "Buffer",
    "STORAGES",
    "strided_view",
    "padded",
    "fused",
    "contiguous",
    "special_values",
    "fill",
    "cos_sin_values",
    "positions",
]

# Canary bit patterns: quiet NaNs with a recognisable payload for float buffers (read out of
# bounds they poison the result), an out-of-range value for integer (position) buffers.
CANARY = {
    torch.float64: 0x7FFA5A5A5A5A5A5A,
    torch.float32: 0x7FD5A5A5,
    torch.float16: 0x7E5A,
    torch.bfloat16: 0x7FDA,
    torch.int64: (1 << 62) + 12345,
    torch.int32: (1 << 30) + 12345,
    torch.int16: 12345,
}
_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# storages of a rotated tensor (see _storage_params for what each does to the strides)
STORAGES = ("contiguous", "offset", "transposed", "permuted", "padded_rows", "strided_last", "expanded", "fused_qkv")
PAD = 16  # canary elements on each side of a buffer (aligned: 16 elements)


@dataclass
class Buffer:
    """One allocation: ``base`` (flat, canary everywhere no view covers) and the views into it
    that a call receives. ``covered`` marks the elements some view reaches."""

    base: Tensor
    views: list[Tensor] = field(default_factory=list)

    def covered(self) -> Tensor:
        mark = torch.zeros(self.base.numel(), dtype=torch.bool, device=self.base.device)
        for v in self.views:
            if v.numel():
                mark.as_strided(v.shape, v.stride(), v.storage_offset() - self.base.storage_offset()).fill_(True)
        return mark


def _canary_base(numel: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    base = torch.empty(numel, dtype=dtype, device=device)
    pattern = CANARY[dtype]
    if dtype in _INT_OF:
        base.view(_INT_OF[dtype]).fill_(pattern)
    else:
        base.fill_(pattern)
    return base


def _extent(shape: Sequence[int], strides: Sequence[int]) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, strides))


def strided_view(
    shape: Sequence[int],
    *,
    order: Sequence[int] | None = None,
    last_step: int = 1,
    row_pad: int = 0,
    expand_dim: int | None = None,
) -> tuple[tuple[int, ...], int]:
    """Strides of a view of logical ``shape`` whose physical layout is contiguous in ``order``
    (physical dim i is logical dim order[i]) with the innermost dim stepped by ``last_step`` and
    each innermost row padded by ``row_pad``; ``expand_dim`` gets stride 0. Returns
    (strides, elements the view spans from its first element)."""
    n = len(shape)
    order = list(range(n)) if order is None else list(order)
    phys = [shape[o] for o in order]
    if expand_dim is not None:
        phys = [1 if o == expand_dim % n else s for o, s in zip(order, phys)]
    strides_phys = [0] * n
    if n:
        strides_phys[-1] = last_step
        acc = max(phys[-1], 1) * last_step + row_pad
        for i in range(n - 2, -1, -1):
            strides_phys[i] = acc
            acc *= max(phys[i], 1)
    strides = [0] * n
    for i, o in enumerate(order):
        strides[o] = strides_phys[i]
    if expand_dim is not None:
        strides[expand_dim % n] = 0
    return tuple(strides), _extent(shape, strides)


def _storage_params(storage: str, ndim: int) -> dict:
    if storage in ("contiguous", "offset", "fused_qkv"):
        return {}
    if storage == "swap_last2":  # the last two dims stored swapped (a transposed cos table)
        order = list(range(ndim))
        if ndim >= 2:
            order[-2], order[-1] = order[-1], order[-2]
        return {"order": order}
    if storage == "transposed":
        if ndim < 3:
            raise ValueError(f"storage: 'transposed' needs at least 3 dims, got {ndim}")
        order = list(range(ndim))
        order[-3], order[-2] = order[-2], order[-3]
        return {"order": order}
    if storage == "permuted":  # every dim but head_dim in reverse order
        return {"order": list(range(ndim - 2, -1, -1)) + [ndim - 1]}
    if storage == "reversed":  # every dim in reverse order
        return {"order": list(range(ndim - 1, -1, -1))}
    if storage == "padded_rows":
        return {"row_pad": 8}
    if storage == "strided_last":
        return {"last_step": 2}
    if storage == "expanded":
        return {"expand_dim": 0}
    raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")


def padded(shape: Sequence[int], dtype: torch.dtype, device, storage: str = "contiguous") -> Buffer:
    """One tensor of logical ``shape`` laid out as ``storage`` inside a canary-padded buffer
    (``storage`` also takes "swap_last2" and "reversed" for cos/sin and positions tables)."""
    shape = tuple(int(s) for s in shape)
    strides, extent = strided_view(shape, **_storage_params(storage, len(shape)))
    lead = PAD + (3 if storage == "offset" else 0)  # "offset": misaligned first element
    base = _canary_base(lead + extent + PAD, dtype, device)
    view = base.as_strided(shape, strides, lead)
    return Buffer(base, [view])


def contiguous(shape: Sequence[int], dtype: torch.dtype, device) -> Buffer:
    return padded(shape, dtype, device, "contiguous")


def fused(shapes: Sequence[Sequence[int]], axis: int, dtype: torch.dtype, device) -> Buffer:
    """Views of one contiguous buffer concatenated along ``axis`` (q, k, v of a fused qkv
    projection): every shape equal but for ``axis``. Views come back in the given order."""
    shapes = [tuple(int(s) for s in sh) for sh in shapes]
    n = len(shapes[0])
    axis %= n
    total = list(shapes[0])
    total[axis] = sum(sh[axis] for sh in shapes)
    strides, extent = strided_view(total)
    base = _canary_base(PAD + extent + PAD, dtype, device)
    views, start = [], 0
    for sh in shapes:
        views.append(base.as_strided(sh, strides, PAD + start * strides[axis]))
        start += sh[axis]
    return Buffer(base, views)


# --------------------------------------------------------------------------------------------
# values

def special_values(dtype: torch.dtype) -> Tensor:
    """1-D float64 tensor of the special values of ``dtype``: +-0, smallest and largest
    subnormal, smallest normal, largest finite, +-inf, NaN (both signs), +-1, eps."""
    fi = torch.finfo(dtype)
    min_sub = fi.tiny * fi.eps  # 2**-149 (fp32), 2**-24 (fp16), 2**-133 (bf16)
    max_sub = fi.tiny - min_sub
    nan = float("nan")
    vals = [0.0, -0.0, min_sub, -min_sub, max_sub, -max_sub, fi.tiny, -fi.tiny, fi.max, -fi.max,
            math.inf, -math.inf, nan, 1.0, -1.0, fi.eps, 0.5 * fi.max, fi.max / 3]
    out = torch.tensor(vals, dtype=torch.float64)
    return torch.cat((out, -torch.tensor([nan], dtype=torch.float64)))


def fill(view: Tensor, values: str, gen: torch.Generator, *, scale: float = 3.0) -> None:
    """Write seeded values into ``view`` (any strides; a stride-0 view is filled through its
    single underlying element), generated on the generator's device. ``values``: "normal"
    (normals * scale) or "special" (about half replaced by the dtype's special values)."""
    if values not in ("normal", "special"):
        raise ValueError(f"values: expected normal or special, got {values!r}")
    if view.numel() == 0:
        return
    target = _writable(view)
    # generate in float32 (float64 only for a float64 target), in slices along dim 0 so a
    # >2**31-element tensor never needs a float64 copy of itself
    work = torch.float64 if target.dtype == torch.float64 else torch.float32
    rows = max(1, (1 << 24) // max(1, target[0].numel())) if target.dim() else 1
    for start in range(0, target.shape[0] if target.dim() else 1, rows):
        part = target[start:start + rows] if target.dim() else target
        data = torch.randn(part.shape, generator=gen, dtype=work, device=gen.device) * scale
        if values == "special":
            data = _mix_specials(data, target.dtype, gen)
        part.copy_(data)


def _mix_specials(data: Tensor, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Replace about half of ``data`` with special values of ``dtype``."""
    specials = special_values(dtype).to(data.device, data.dtype)  # exact: data is at least as wide
    pick = torch.randint(0, specials.numel(), data.shape, generator=gen, device=gen.device)
    use = torch.rand(data.shape, generator=gen, device=gen.device) < 0.5
    return torch.where(use, specials[pick].to(data.dtype), data)


def cos_sin_values(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator, special: bool = False) -> tuple[Tensor, Tensor]:
    """cos and sin of one set of seeded angles (float64, on the generator's device), rounded
    to ``dtype``; with ``special``, about half of each replaced by special values of ``dtype``."""
    theta = (torch.rand(tuple(shape), generator=gen, dtype=torch.float64, device=gen.device) * 2 - 1) * 1000.0
    cos, sin = torch.cos(theta), torch.sin(theta)
    if special:
        cos, sin = _mix_specials(cos, dtype, gen), _mix_specials(sin, dtype, gen)
        # every row starts with each sign combination of zero cos/sin (and zero against 1 and
        # inf): random mixing alone rarely pairs cos=-0 with sin=+0, which is what tells an
        # exact negation of sin from 0.0 - sin in the backward (found on the H100 by fuzzing)
        n = min(cos.shape[-1], _ZERO_COS.numel()) if cos.dim() else 0
        if n:
            cos[..., :n] = _ZERO_COS[:n].to(cos.device)
            sin[..., :n] = _ZERO_SIN[:n].to(sin.device)
    return cos.to(dtype), sin.to(dtype)


_ZERO_COS = torch.tensor([0.0, -0.0, 0.0, -0.0, 0.0, -0.0, math.inf, -math.inf], dtype=torch.float64)
_ZERO_SIN = torch.tensor([0.0, 0.0, -0.0, -0.0, 1.0, -1.0, -0.0, 0.0], dtype=torch.float64)


def _writable(view: Tensor) -> Tensor:
    """``view`` with stride-0 dims narrowed to one element, so copy_ writes each address once."""
    for d, st in enumerate(view.stride()):
        if st == 0 and view.shape[d] > 1:
            view = view.narrow(d, 0, 1)
    return view


def positions(shape: Sequence[int], max_position: int, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Seeded positions in [0, max_position) (CPU)."""
    return torch.randint(0, max_position, tuple(shape), generator=gen).to(dtype)
