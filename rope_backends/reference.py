"""THE semantics of rope_backends, in eager torch. Every backend is tested against this file.

For every rotated pair ``(a, b)`` and angle values ``c = cos``, ``s = sin`` (docs/contract.md, "Numerics"):

    step 1  a, b, c, s are converted to float32 (exact for fp16/bf16/fp32 inputs)
    step 2  each product is rounded to float32:  ac = a*c, bs = b*s, bc = b*c, as = a*s
    step 3  a' = ac - bs ;  b' = bc + as        (no fused multiply-add anywhere)
    step 4  a', b' are rounded once to the output dtype, round-to-nearest-even
    step 5  elements past ``rotary_dim`` are copied unchanged, bit for bit

Backward (``conjugate=True``) is the rotation by -theta: ``s`` is negated before step 2
(``x - (-y)`` equals ``x + y`` exactly in IEEE arithmetic, so this is the contract's
``ga' = ga*c + gb*s``, ``gb' = gb*c - ga*s``).

Pairing (``half = rotary_dim // 2``):
  neox         pair i = (x[i], x[i + half])   (rotate_half: Llama, NeoX, Qwen; HF apply_rotary_pos_emb)
  interleaved  pair i = (x[2i], x[2i + 1])    (rotate_every_two: GPT-J; Wan/Helios complex form)

Position lookup (``apply_cached``): pair i of a token at position p reads
``cos = cache[p, i]``, ``sin = cache[p, half + i]`` (vLLM/FlashInfer cache layout). With MRoPE,
``p = positions[axis_map[i], token]``: the frequency index i picks the temporal (0), height (1)
or width (2) row (the three known axis maps are built in :mod:`rope_backends.mrope`).
A position outside ``[0, max_position)`` -- only reachable on GPU without debug checks, since CPU
positions are range-checked up front -- gives NaN in that token's rotated part and reads no
memory out of bounds.

Each of steps 2-3 is a separate eager torch op, so every product is materialised (rounded) as a
float32 tensor: no op here can be contracted into an FMA. This file is never compiled.
"""

from __future__ import annotations

from torch import Tensor
import torch

from .contract import Layout, RopeArgs
from .mrope import axis_tensor

__all__ = ["rotate", "cos_sin_from_cache", "run"]


def pair_slices(layout: Layout, rotary_dim: int) -> tuple[slice, slice]:
    """Indices of the first and second elements of every pair along head_dim."""
    half = rotary_dim // 2
    if layout is Layout.NEOX:
        return slice(0, half), slice(half, rotary_dim)
    return slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)


def rotate_pairs(a: Tensor, b: Tensor, cos: Tensor, sin: Tensor, conjugate: bool) -> tuple[Tensor, Tensor]:
    """Steps 1-3 on float32: returns (a', b') in float32."""
    a, b = a.float(), b.float()  # step 1
    c, s = cos.float(), sin.float()
    if conjugate:
        s = -s
    ac, bs = a * c, b * s  # step 2: four rounded products
    bc, as_ = b * c, a * s
    return ac - bs, bc + as_  # step 3


def rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: Layout, rotary_dim: int, conjugate: bool = False) -> Tensor:
    """Rotate ``x [..., head_dim]`` by cos/sin in half form ``[..., rotary_dim // 2]``
    (broadcastable to ``x.shape[:-1] + (rotary_dim // 2,)``). Returns a new tensor."""
    first, second = pair_slices(layout, rotary_dim)
    a_new, b_new = rotate_pairs(x[..., first], x[..., second], cos, sin, conjugate)
    out = x.clone()  # step 5: the pass-through part comes along
    out[..., first] = a_new.to(x.dtype)  # step 4
    out[..., second] = b_new.to(x.dtype)
    return out


def cos_sin_from_cache(
    positions: Tensor, cache: Tensor, axis_map: tuple[int, ...] | None
) -> tuple[Tensor, Tensor]:
    """Gather half-form cos/sin ``[*lead, rotary_dim // 2]`` for ``positions`` (``[*lead]`` or,
    with ``axis_map``, ``[3, *lead]``) from ``cache [max_position, rotary_dim]``."""
    half = cache.shape[1] // 2
    max_position = cache.shape[0]
    cols = torch.arange(half, device=positions.device)
    if axis_map is not None:
        pos = positions.index_select(0, axis_tensor(axis_map, positions.device)).movedim(0, -1)  # [*lead, half]
    else:
        pos = positions.unsqueeze(-1)  # [*lead, 1]: one position for every pair
    pos = pos.long()
    valid = (pos >= 0) & (pos < max_position)
    safe = pos.clamp(0, max(max_position - 1, 0))
    cos = cache[safe, cols].float()
    sin = cache[safe, cols + half].float()
    # a Python scalar, not a tensor: building one on the device would be a host->device copy
    return torch.where(valid, cos, float("nan")), torch.where(valid, sin, float("nan"))


def run(args: RopeArgs, rotate_fn=rotate, lookup=cos_sin_from_cache) -> tuple[Tensor, ...]:
    """Carry out one validated call: one result per input tensor (the inputs themselves,
    overwritten, when ``args.inplace``). Other torch-level backends reuse this driver with their
    own ``rotate_fn`` / ``lookup`` (same signatures as :func:`rotate`, :func:`cos_sin_from_cache`)."""
    if args.cache is not None:
        cos, sin = lookup(args.positions, args.cache, args.position_axis_map)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    else:
        cos, sin = args.cos, args.sin
    results = tuple(rotate_fn(t, cos, sin, args.layout, args.rotary_dim, args.conjugate) for t in args.tensors)
    if not args.inplace:
        return results
    for t, r in zip(args.tensors, results):  # every result is computed before the first write
        t.copy_(r)
    return args.tensors
