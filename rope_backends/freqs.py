"""Frequency tables: identical bits on every device.

Angles, cosines and sines are computed in float64 on the CPU and rounded once to float32, then
moved to the requested device. Device math libraries differ in the last bit; the CPU's float64
path is the one answer every backend shares. Scaling follows the Hugging Face
``rope_scaling`` definitions (``linear``, ``dynamic`` -- HF dynamic NTK, needing
``original_max_position_embeddings`` --, ``llama3``, ``yarn``), plus ``ntk`` (fixed NTK-aware:
``base * factor ** (d / (d - 2))``), evaluated in float64.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["inv_freq", "cos_sin", "cos_sin_cache", "cos_sin_3d", "wan_dims"]

Scaling = float | Mapping[str, object] | None


def _check_rotary_dim(rotary_dim: object) -> int:
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected an even int >= 2, got {rotary_dim!r}")
    return rotary_dim


def _scaling_params(scaling: Scaling) -> tuple[str, Mapping[str, object]]:
    if scaling is None:
        return "default", {}
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
        return "linear", {"factor": float(scaling)}
    if isinstance(scaling, Mapping):
        kind = str(scaling.get("rope_type", scaling.get("type", "default")))
        if kind not in ("default", "linear", "dynamic", "ntk", "llama3", "yarn"):
            raise ValueError(
                f"scaling: expected rope_type one of default, linear, dynamic, ntk, llama3, yarn, got {kind!r}"
            )
        if kind != "default" and "factor" not in scaling:
            raise ValueError(f"scaling: expected a 'factor' for rope_type {kind!r}, got keys {sorted(scaling)}")
        return kind, scaling
    raise TypeError(f"scaling: expected None, a float (linear factor) or a rope_scaling dict, got {type(scaling).__name__}")


def inv_freq(
    rotary_dim: int, base: float = 10000.0, scaling: Scaling = None, seq_len: int | None = None
) -> tuple[Tensor, float, float]:
    """float64 inverse frequencies ``[rotary_dim // 2]`` on the CPU, the position divisor
    (linear scaling) and the attention factor that multiplies cos/sin (YaRN).

    ``seq_len``: the longest sequence the table serves (``dynamic`` only: as in HF, the base
    grows once ``seq_len`` exceeds the scaling dict's ``original_max_position_embeddings``)."""
    rotary_dim = _check_rotary_dim(rotary_dim)
    if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
        raise ValueError(f"base: expected a positive number, got {base!r}")
    kind, p = _scaling_params(scaling)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    divisor, attention = 1.0, 1.0
    stretch = rotary_dim / (rotary_dim - 2) if rotary_dim > 2 else 1.0
    if kind == "ntk":  # fixed NTK-aware: stretch the base by factor ** (d / (d - 2))
        base = base * float(p["factor"]) ** stretch
    elif kind == "dynamic":  # HF dynamic NTK: unchanged up to the original length, then stretched
        factor = float(p["factor"])
        old = p.get("original_max_position_embeddings", p.get("max_position_embeddings"))
        if isinstance(old, bool) or not isinstance(old, (int, float)) or old <= 0:
            raise ValueError(
                f"scaling: expected 'original_max_position_embeddings' (the model's max_position_embeddings) "
                f"for rope_type 'dynamic', got {old!r}"
            )
        seq = max(float(seq_len) if seq_len is not None else float(old), float(old))
        base = base * ((factor * seq / float(old)) - (factor - 1)) ** stretch
    freqs = 1.0 / (float(base) ** exponents)
    if kind == "linear":
        divisor = float(p["factor"])
    elif kind == "llama3":
        factor = float(p["factor"])
        low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
        old = float(p.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > old / low, freqs / factor, freqs)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        freqs = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        factor = float(p["factor"])
        old = float(p.get("original_max_position_embeddings", 4096))
        beta_fast, beta_slow = float(p.get("beta_fast", 32.0)), float(p.get("beta_slow", 1.0))

        def correction(rotations: float) -> float:
            return (rotary_dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo = max(math.floor(correction(beta_fast)), 0)
        hi = min(math.ceil(correction(beta_slow)), rotary_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        freqs = (freqs / factor) * (1 - extrapolation) + freqs * extrapolation
        attention = float(p.get("attention_factor", 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0))
    return freqs, divisor, attention


def _tables(angles: Tensor, attention: float, device: torch.device | str | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    cos, sin = torch.cos(angles), torch.sin(angles)
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(dtype).to(device), sin.to(dtype).to(device)


def cos_sin(positions: Tensor, rotary_dim: int, base: float = 10000.0, scaling: Scaling = None) -> tuple[Tensor, Tensor]:
    """float32 ``cos, sin [*positions.shape, rotary_dim // 2]`` (half form) on positions' device.

    Reads ``positions`` on the host (one transfer when they live on a GPU): that is what makes
    the table identical on every device. For serving, build :func:`cos_sin_cache` once instead.
    """
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions: expected a torch.Tensor, got {type(positions).__name__}")
    if positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions: expected an integer or float dtype, got {positions.dtype}")
    host = positions.detach().to("cpu", torch.float64)
    seq_len = int(host.max()) + 1 if host.numel() else None  # HF dynamic: max(position_ids) + 1
    freqs, divisor, attention = inv_freq(rotary_dim, base, scaling, seq_len)
    pos = host / divisor
    return _tables(pos.unsqueeze(-1) * freqs, attention, positions.device, torch.float32)


def cos_sin_cache(
    max_position: int,
    rotary_dim: int,
    base: float = 10000.0,
    scaling: Scaling = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[max_position, rotary_dim]``: cos of positions 0..max_position-1 in the first half of
    the columns, sin in the second (the vLLM/FlashInfer layout :func:`apply_cached` reads)."""
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position: expected a positive int, got {max_position!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
    freqs, divisor, attention = inv_freq(rotary_dim, base, scaling, max_position)
    pos = torch.arange(max_position, dtype=torch.float64) / divisor
    cos, sin = _tables(pos.unsqueeze(-1) * freqs, attention, None, torch.float32)
    return torch.cat((cos, sin), dim=-1).to(dtype).to(device)


def wan_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan 2.x split of head_dim over (frames, height, width): ``t = d - 4*(d//6)`` and
    ``h = w = 2*(d//6)`` -- (44, 42, 42) for d = 128, the head_dim of every released Wan 2.1 /
    Wan 2.2 model. Each axis gets a whole number of rotated pairs and the frame axis takes the
    remainder.

    Matches Wan-Video/Wan2.1 and Wan2.2 ``wan/modules/model.py`` (``rope_params(1024, dim)`` per
    axis with these widths; ``rope_apply`` splits the d/2 complex columns as
    ``[c - 2*(c//3), c//3, c//3]``, the same thing for every even d); diffusers
    ``WanRotaryPosEmbed``, which builds its table with these widths but re-splits it in
    ``forward`` at ``[d - 2*(d//3), d//3, d//3]`` columns -- the same split only when
    ``d % 6 != 4`` (so for 128, not for 64, 112 or 256); and Helios' default
    ``rope_dim=(44, 42, 42)`` for head_dim 128 (Helios reads rope_dim from its config).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 6 or head_dim % 2:
        raise ValueError(f"head_dim: expected an even int >= 6, got {head_dim!r}")
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def cos_sin_3d(
    grid: Sequence[int],
    dims: Sequence[int],
    base: float = 10000.0,
    *,
    offsets: Sequence[int] = (0, 0, 0),
    frame_indices: Sequence[int] | Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """3-D RoPE table for a ``(frames, height, width)`` video grid, flattened frame-major
    (token ``(f, y, x)`` is row ``(f * height + y) * width + x``, as Wan/Helios flatten patches).

    Split rule: ``dims = (t, h, w)`` rotated widths (even; :func:`wan_dims` gives Wan's), laid
    out frames | height | width along head_dim: pairs ``[0, t/2)`` rotate by the frame index,
    ``[t/2, (t+h)/2)`` by the row, the rest by the column. Each axis uses its own frequencies
    ``base ** (-arange(0, d_axis, 2) / d_axis)`` on its own index (plus ``offsets``; the frame
    axis may instead take explicit ``frame_indices``, one per frame, as Helios' ``frame_indices``
    / ``indices_hidden_states`` do). Angles and cos/sin are computed in float64 and rounded once.

    Returns float32 ``cos, sin [frames*height*width, (t + h + w) // 2]`` (half form) for
    ``layout="interleaved"``; index ``[:, None]`` to broadcast over the heads of ``[B, S, H, D]``.

    Checked in tests/test_video_fidelity.py against formulas written from: Wan 2.1/2.2
    ``rope_params``/``rope_apply`` (its complex128 table rounded to float32 equals this table bit
    for bit); diffusers ``WanRotaryPosEmbed`` (float64 angles, repeat-interleaved float32 table:
    equal bit for bit); Helios (diffusers ``HeliosRotaryPosEmbed``: same split and frequencies,
    but inverse frequencies, angles and cos/sin computed in float32 on the model's device, so its
    tables differ from these in the last bits).
    """
    if len(grid) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in grid):
        raise ValueError(f"grid: expected (frames, height, width) non-negative ints, got {tuple(grid)!r}")
    if len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2 for d in dims):
        raise ValueError(f"dims: expected 3 even ints >= 2 (t, h, w), got {tuple(dims)!r}")
    if len(offsets) != 3 or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets):
        raise ValueError(f"offsets: expected 3 ints, got {tuple(offsets)!r}")
    index = [torch.arange(off, off + n, dtype=torch.float64) for n, off in zip(grid, offsets)]
    if frame_indices is not None:
        if offsets[0] != 0:
            raise ValueError(f"offsets: expected 0 for frames when frame_indices is given, got {tuple(offsets)!r}")
        frames = torch.as_tensor(frame_indices).detach().to("cpu")
        if frames.dim() != 1 or frames.shape[0] != grid[0] or frames.is_complex() or frames.dtype == torch.bool:
            raise ValueError(
                f"frame_indices: expected {grid[0]} real numbers (one per frame), got shape {tuple(frames.shape)} "
                f"of {frames.dtype}"
            )
        index[0] = frames.to(torch.float64)
    per_axis = []
    for positions, d in zip(index, dims):
        freqs, _, _ = inv_freq(d, base)
        per_axis.append(positions.unsqueeze(-1) * freqs)  # [n, d/2]
    f, h, w = grid
    angles = torch.cat(
        (
            per_axis[0][:, None, None, :].expand(f, h, w, -1),
            per_axis[1][None, :, None, :].expand(f, h, w, -1),
            per_axis[2][None, None, :, :].expand(f, h, w, -1),
        ),
        dim=-1,
    ).reshape(f * h * w, -1)
    return _tables(angles, 1.0, device, torch.float32)
