"""Multimodal RoPE (MRoPE) axis maps for the three known layouts.

An axis map says, for each frequency index ``j`` in ``[0, rotary_dim // 2)``, which row of the
``[3, T]`` positions (0 = temporal, 1 = height, 2 = width) rotates pair ``j``. All backends read
the same map, so a new layout is data, not a kernel. Each builder documents the model code it
was checked against. :func:`axis_tensor` is the map as a device tensor, the one form every
backend and the reference index with.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .positions import rope_index  # the position ids these maps consume (Qwen-VL get_rope_index)
from .contract import MRope

__all__ = ["MRope", "chunked", "interleaved", "ernie", "rope_index", "axis_tensor"]

T, H, W = 0, 1, 2


def _sections(name: str, section: Sequence[int]) -> tuple[int, int, int]:
    if len(section) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in section):
        raise ValueError(f"{name}: expected 3 non-negative ints, got {list(section)!r}")
    return tuple(section)  # type: ignore[return-value]


def chunked(mrope_section: Sequence[int]) -> MRope:
    """Qwen2-VL / Qwen2.5-VL ``mrope_section = [t, h, w]`` (e.g. ``[16, 24, 24]`` for
    head_dim 128): frequencies ``[0, t)`` follow the temporal row, ``[t, t+h)`` height,
    ``[t+h, t+h+w)`` width. Matches transformers' ``apply_multimodal_rotary_pos_emb``
    (``mrope_section * 2`` split of the duplicated cos) and vLLM's ``MRotaryEmbedding``
    (split of the half-width cos)."""
    t, h, w = _sections("mrope_section", mrope_section)
    return MRope((T,) * t + (H,) * h + (W,) * w, name=f"chunked{[t, h, w]}")


def interleaved(mrope_section: Sequence[int]) -> MRope:
    """Qwen3-VL ``mrope_section = [t, h, w]`` (e.g. ``[24, 20, 20]``) with interleaving:
    frequency j follows height when ``j % 3 == 1 and j < 3*h``, width when
    ``j % 3 == 2 and j < 3*w``, temporal otherwise (``[T H W T H W ... T T]``). Matches
    transformers' Qwen3-VL ``apply_interleaved_mrope`` and vLLM's ``apply_interleaved_rope``."""
    t, h, w = _sections("mrope_section", mrope_section)
    half = t + h + w
    axes = []
    for j in range(half):
        if j % 3 == 1 and j < 3 * h:
            axes.append(H)
        elif j % 3 == 2 and j < 3 * w:
            axes.append(W)
        else:
            axes.append(T)
    return MRope(tuple(axes), name=f"interleaved{[t, h, w]}")


def ernie(mrope_section: Sequence[int]) -> MRope:
    """Ernie4.5-VL ``mrope_section = [h, w, t]`` (note the order; e.g. ``[22, 22, 20]``):
    the first ``h + w`` frequencies alternate height (even j) and width (odd j), the last ``t``
    follow the temporal row: ``[h w h w ... t t t]``. Needs ``h == w``. Matches vLLM's
    ``Ernie4_5_VLRotaryEmbedding.forward_native``."""
    h, w, t = _sections("mrope_section", mrope_section)
    if h != w:
        raise ValueError(f"mrope_section: expected equal height and width sections for Ernie4.5-VL, got {[h, w, t]}")
    axes = tuple(H if j % 2 == 0 else W for j in range(h + w)) + (T,) * t
    return MRope(axes, name=f"ernie{[h, w, t]}")


_AXIS_TENSORS: dict[tuple, Tensor] = {}  # (axis_map, device, dtype) -> [len(axis_map)] on device


def axis_tensor(axis_map: Sequence[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``axis_map`` as a 1-D ``dtype`` tensor on ``device`` (e.g. the index that picks each pair's
    row of ``positions[3, T]``), made once per (map, device, dtype) and kept: a host-to-device copy
    per call would synchronise with the device and could not be captured in a CUDA graph.

    Asked for the first time while the current CUDA stream is capturing a graph, it is built from
    fills of the map's runs instead (kernels, which the graph records and replays; a copy from the
    host cannot be captured) and not kept: its memory belongs to the graph's pool. Callers must
    not write to the tensor returned."""
    axis_map = tuple(axis_map)
    key = (axis_map, device, dtype)
    t = _AXIS_TENSORS.get(key)
    if t is not None:
        return t
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _filled(axis_map, device, dtype)
    t = torch.tensor(axis_map, dtype=dtype, device=device)
    _AXIS_TENSORS[key] = t
    return t


def _filled(axis_map: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``axis_map`` on ``device`` built by device ops alone: zeros, then one fill per run of equal
    nonzero values."""
    t = torch.zeros(len(axis_map), dtype=dtype, device=device)
    start = 0
    for j in range(1, len(axis_map) + 1):
        if j == len(axis_map) or axis_map[j] != axis_map[start]:
            if axis_map[start]:
                t[start:j].fill_(axis_map[start])
            start = j
    return t
