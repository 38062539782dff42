"""``npu``: the Ascend NPU backend -- RoPE built from contiguous tensors only.

On Ascend, a strided slice assignment (``out[..., 0::2] = v``, ``out[..., :half] = v``) is
lowered to ViewCopy/InplaceCopy kernels. This path never writes into a strided view: it computes
the rotated halves ``a'``, ``b'`` as fresh float32 tensors, rounds each once to the output dtype
and assembles the result with one contiguous op:

    neox         torch.cat((a', b', pass_through), -1)
    interleaved  torch.stack((a', b'), -1).flatten(-2), then cat with pass_through (if any)

Positions (``apply_cached``) are looked up with ``index_select`` (and, for MRoPE, ``gather``
along the three position rows), never by writing into a table. In place (``args.inplace``), the
only write into the caller's memory is one ``copy_`` of each full contiguous result into its
input tensor, after every result is computed; when that input is itself a non-contiguous view
(q/k slices of a fused qkv buffer) that final strided copy is unavoidable -- it is the caller's
memory layout -- and it is the single write ``rope_backends.optrace`` allows.

Numerics follow ``rope_backends.reference`` step for step (fp32 products each rounded, no FMA,
one round-to-nearest-even conversion per element), so results are bit-identical; the op-trace
test (tests/test_optrace.py) and the conformance tests hold it to both properties.

The backend serves ``"npu"`` tensors (``torch_npu`` registers that device). With
``ROPE_BACKENDS_SIMULATE_NPU=1`` the same functions serve ``"cpu"`` tensors when the backend is
named explicitly, which is how CI runs this code without Ascend hardware.

This module must not import ``torch_npu`` (only :mod:`rope_backends.environment` does, from the
probe), and must not issue any in-place or ``out=`` op on a non-contiguous tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import environment, reference
from ..contract import Layout, RopeArgs
from ..mrope import axis_tensor
from ..registry import Backend, prepare_forward, register_backend

__all__ = ["forward", "probe", "rotate", "cos_sin_from_cache"]

NOT_INSTALLED = "torch_npu is not installed (pip install rope-backends[npu])"
NO_DEVICE = "torch_npu imported but no NPU device"


def probe() -> str | None:
    """None when this backend can run here (a simulated NPU counts), else the reason."""
    if environment.simulated_npu():
        return None
    if environment.npu_available():
        return None
    if environment.torch_npu_version() is None:
        return NOT_INSTALLED
    return NO_DEVICE


def _explicit_device_types() -> tuple[str, ...]:
    return ("cpu",) if environment.simulated_npu() else ()


def _rotated_pairs(a: Tensor, b: Tensor, cos: Tensor, sin: Tensor, conjugate: bool) -> tuple[Tensor, Tensor]:
    """reference steps 1-3: ``(a', b')`` as fresh float32 tensors of the broadcast shape."""
    a, b = a.float(), b.float()  # step 1 (exact for fp16/bf16/fp32)
    c, s = cos.float(), sin.float()
    ac, bc = a * c, b * c  # step 2: four separately rounded products, so nothing can fuse into FMA
    as_, bs = a * s, b * s
    if conjugate:
        # rotation by -theta. The reference negates s first; since x*(-s) == -(x*s) exactly and
        # x - (-y) == x + y exactly in IEEE arithmetic, swapping the signs here gives the same
        # bits without materialising -s.
        return ac + bs, bc - as_
    return ac - bs, bc + as_  # step 3


def rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: Layout, rotary_dim: int, conjugate: bool = False) -> Tensor:
    """Rotate ``x [..., head_dim]`` by half-form ``cos``/``sin`` (broadcastable to
    ``x.shape[:-1] + (rotary_dim // 2,)``). Returns a new contiguous tensor of ``x``'s shape and
    dtype; ``x`` is only read (strided reads are fine, strided writes are what this avoids)."""
    half = rotary_dim // 2
    if layout is Layout.NEOX:
        a, b = x[..., :half], x[..., half:rotary_dim]
    else:
        pairs = x[..., :rotary_dim].unflatten(-1, (half, 2))
        a, b = pairs[..., 0], pairs[..., 1]
    a_new, b_new = _rotated_pairs(a, b, cos, sin, conjugate)
    # step 4: one round-to-nearest-even conversion per element (a no-op for float32)
    a_new, b_new = a_new.to(x.dtype), b_new.to(x.dtype)
    if layout is Layout.NEOX:
        parts = (a_new, b_new)
    else:
        parts = (torch.stack((a_new, b_new), dim=-1).flatten(-2),)
    if rotary_dim < x.shape[-1]:
        parts = parts + (x[..., rotary_dim:],)  # step 5: pass-through, copied bit for bit by cat
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=-1)


def cos_sin_from_cache(positions: Tensor, cache: Tensor, axis_map: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """``reference.cos_sin_from_cache`` by contiguous ops: half-form float32 ``cos``, ``sin``
    ``[*lead, rotary_dim // 2]`` for ``positions [*lead]`` (or ``[3, *lead]`` with ``axis_map``)
    from ``cache [max_position, rotary_dim]``. An out-of-range position gives NaN in its pairs
    and reads only row 0 (clamped), never memory outside the cache."""
    max_position, rotary_dim = cache.shape
    half = rotary_dim // 2
    pos = positions.long()
    if axis_map is None:
        lead = tuple(pos.shape)
        pos = pos.reshape(-1, 1)  # [N, 1]: one position for every pair of a token
    else:
        lead = tuple(pos.shape[1:])
        pos = pos.reshape(3, -1)  # [3, N]: the t, h, w rows
    safe = pos.clamp(0, max(max_position - 1, 0))
    if axis_map is None:
        table = cache.index_select(0, safe.reshape(-1))  # [N, rotary_dim]: cos | sin of each token
    else:
        # rows of the cache for all three position rows, then pick, per column, the row the axis
        # map names: column j (cos) and half + j (sin) follow axis_map[j]
        rows = cache.index_select(0, safe.reshape(-1)).reshape(3, -1, rotary_dim)  # [3, N, rotary_dim]
        axis = axis_tensor(tuple(axis_map) * 2, cache.device)  # [rotary_dim]
        table = rows.gather(0, axis.view(1, 1, rotary_dim).expand(1, rows.shape[1], rotary_dim))[0]
    table = table.float()
    valid = (pos >= 0) & (pos < max_position)  # [N, 1] or [3, N]
    if axis_map is not None:
        axis = axis_tensor(axis_map, cache.device)
        valid = valid.index_select(0, axis).t()  # [N, half]: validity of the row pair j reads
        valid = torch.cat((valid, valid), dim=-1)  # the same for the cos and the sin column
    table = table.masked_fill(~valid, float("nan"))
    table = table.reshape(*lead, rotary_dim)
    return table[..., :half], table[..., half:]


def forward(args: RopeArgs) -> tuple[Tensor, ...]:
    """Carry out one validated call with the contiguous lookup and rotation, through the reference's
    driver: one result per ``args.tensors`` (the inputs, overwritten by one full copy each, when
    ``args.inplace``)."""
    return reference.run(args, rotate_fn=rotate, lookup=cos_sin_from_cache)


register_backend(
    Backend(
        name="npu",
        device_types=("npu",),
        priority=100,
        forward=forward,
        prepare=prepare_forward(forward),
        probe=probe,
        explicit_device_types=_explicit_device_types,
        description="Ascend NPU: contiguous cat / stack+flatten, no strided writes; "
        "serves cpu when named under ROPE_BACKENDS_SIMULATE_NPU=1",
    )
)
