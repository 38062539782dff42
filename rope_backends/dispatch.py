"""The public calls: validate -> pick the backend for the tensors' device -> run it.

Imports no backend. Eager calls that need no gradient go straight to the backend's ``forward``
through a cached selection (a dict lookup); calls under ``torch.compile`` or that need autograd go
through the custom ops in ops.py, which compile as one node and carry the backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import ops, reference
from .spec import Layout, MRope, RopeArgs, args_for_cached, args_for_tables

__all__ = ["apply", "apply_qk", "apply_cached"]


def _through_ops(args: RopeArgs) -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t.requires_grad for t in args.tensors)


def _op_backend(args: RopeArgs, backend: str | None) -> str:
    """Under compile the op resolves the backend when it runs; in eager, resolve now so a bad
    override fails here and forward and backward run on the same backend."""
    if torch.compiler.is_compiling():
        return backend or ""
    return ops.resolve(args, backend).name


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
    rotary_dim: rotated width (even, <= head_dim; default head_dim); the rest is copied.
    inplace: write into ``x`` and return it.
    backend: run on this backend (overrides ``use_backend`` and ``ROPE_BACKEND``).

    Returns a tensor of ``x``'s shape and dtype. Differentiable w.r.t. ``x``.
    """
    args = args_for_tables((("x", x),), cos, sin, layout, rotary_dim, inplace)
    if _through_ops(args):
        name = _op_backend(args, backend)
        fixed = (args.cos, args.sin, args.layout.value, args.rotary_dim, False, name)
        if inplace:
            torch.ops.rope_backends.rope_(x, *fixed)
            return x
        return torch.ops.rope_backends.rope(x, *fixed)
    return ops.run(args, backend)[0]


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
    cos/sin must broadcast against both. Differentiable w.r.t. q and k."""
    args = args_for_tables((("q", q), ("k", k)), cos, sin, layout, rotary_dim, inplace)
    if _through_ops(args):
        name = _op_backend(args, backend)
        fixed = (args.cos, args.sin, args.layout.value, args.rotary_dim, False, name)
        if inplace:
            torch.ops.rope_backends.rope_qk_(q, k, *fixed)
            return q, k
        q_out, k_out = torch.ops.rope_backends.rope_qk(q, k, *fixed)
        return q_out, k_out
    q_out, k_out = ops.run(args, backend)
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

    Positions are range-checked on CPU tensors always and on GPU only with
    ``ROPE_BACKENDS_DEBUG=1`` (the check costs a sync); otherwise an out-of-range position gives
    NaN in that token's rotated part and reads nothing out of bounds.
    """
    args, originals = args_for_cached(q, k, positions, cos_sin_cache, layout, rotary_dim, mrope, inplace, head_dim)
    if not inplace and torch.is_grad_enabled() and any(t.requires_grad for t in args.tensors):
        # training through a cache: gather cos/sin (the reference lookup), then the autograd op
        cos, sin = reference.cos_sin_from_cache(args.positions, args.cache, args.position_axis_map)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        if k is None:
            out = apply(args.tensors[0], cos, sin, layout=args.layout, rotary_dim=args.rotary_dim, backend=backend)
            return out.view(originals[0].shape), None
        q_out, k_out = apply_qk(*args.tensors, cos, sin, layout=args.layout, rotary_dim=args.rotary_dim, backend=backend)
        return q_out.view(originals[0].shape), k_out.view(originals[1].shape)
    if torch.compiler.is_compiling():
        axis_map = list(args.mrope.axis_map) if args.mrope is not None else None
        k_view = args.tensors[1] if k is not None else None
        fixed = (args.positions, args.cache, axis_map, args.layout.value, args.rotary_dim, backend or "")
        if inplace:
            torch.ops.rope_backends.rope_cached_(args.tensors[0], k_view, *fixed)
            outs = args.tensors
        else:
            outs = tuple(torch.ops.rope_backends.rope_cached(args.tensors[0], k_view, *fixed))
    else:
        outs = ops.run(args, backend)
    if inplace:
        return originals[0], (originals[1] if k is not None else None)
    q_out = outs[0].view(originals[0].shape)
    return q_out, (outs[1].view(originals[1].shape) if k is not None else None)
