"""Frequency tables: identical bits on every device.

Angles, cosines and sines are computed in float64 on the CPU and rounded once to float32, then
moved to the requested device. Device math libraries differ in the last bit; the CPU's float64
path is the one answer every backend shares. Scaling dicts are parsed strictly by
:func:`rope_backends.rope_config.rope_config` (every ``rope_type`` of transformers'
``ROPE_INIT_FUNCTIONS``, plus ``ntk``: fixed NTK-aware ``base * factor ** (d / (d - 2))``); a
key the type does not read is a ``ValueError``. ``docs/rope_types.md`` lists types and keys.

This module must not import transformers and holds no scaling formulas of its own.
"""

from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch
from torch import Tensor

from .rope_config import RopeConfig, _tables, rope_config

__all__ = ["inv_freq", "cos_sin", "cos_sin_cache", "cos_sin_3d", "wan_dims"]

Scaling = Union[float, Mapping[str, object], None]


def _check_rotary_dim(rotary_dim: object) -> int:
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected an even int >= 2, got {rotary_dim!r}")
    return rotary_dim


def _config(rotary_dim: object, base: object, scaling: Scaling) -> RopeConfig:
    _check_rotary_dim(rotary_dim)
    if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 0):
        raise ValueError(f"base: expected a positive number, got {base!r}")
    if isinstance(scaling, RopeConfig):
        raise TypeError(
            "scaling: expected None, a float (linear factor) or a rope_scaling dict, got RopeConfig "
            "(call its .cos_sin(positions) / .cos_sin_cache() instead)"
        )
    return rope_config(rotary_dim=rotary_dim, base=base, scaling=scaling)


def inv_freq(
    rotary_dim: int, base: float | None = None, scaling: Scaling = None, seq_len: int | None = None
) -> tuple[Tensor, float, float]:
    """float64 inverse frequencies ``[rotary_dim // 2]`` on the CPU, the position divisor (always
    1.0: linear scaling divides the frequencies, as transformers does) and the attention factor
    that multiplies cos/sin (YaRN, LongRoPE).

    ``seq_len``: the longest sequence the table serves (``dynamic``: the base grows past the
    original length; ``longrope``: long factors past it)."""
    cfg = _config(rotary_dim, base, scaling)
    return cfg.inv_freq(seq_len), 1.0, cfg.attention_factor(seq_len)


def cos_sin(
    positions: Tensor, rotary_dim: int, base: float | None = None, scaling: Scaling = None
) -> tuple[Tensor, Tensor]:
    """float32 ``cos, sin [*positions.shape, rotary_dim // 2]`` (half form) on positions' device.

    base: ``rope_theta`` (default: the scaling dict's ``rope_theta``, else 10000; both given
    must agree). scaling: None, a float (linear factor) or a ``rope_scaling`` /
    ``rope_parameters`` dict, checked strictly. For a whole model config use
    ``rb.rope_config(config).cos_sin(positions)``.

    Reads ``positions`` on the host (one transfer when they live on a GPU): that is what makes
    the table identical on every device. For serving, build :func:`cos_sin_cache` once instead.
    """
    if not isinstance(positions, Tensor):
        raise TypeError(f"positions: expected a torch.Tensor, got {type(positions).__name__}")
    return _config(rotary_dim, base, scaling).cos_sin(positions)


def cos_sin_cache(
    max_position: int,
    rotary_dim: int,
    base: float | None = None,
    scaling: Scaling = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[max_position, rotary_dim]``: cos of positions 0..max_position-1 in the first half of
    the columns, sin in the second (the vLLM/FlashInfer layout :func:`apply_cached` reads).
    ``base`` and ``scaling`` as in :func:`cos_sin`; ``longrope`` tables follow the length rule
    (``RopeConfig.cos_sin_cache`` offers the other layouts)."""
    if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position: expected a positive int, got {max_position!r}")
    return _config(rotary_dim, base, scaling).cos_sin_cache(max_position, device=device, dtype=dtype)


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
        freqs = rope_config(rotary_dim=d, base=base).inv_freq()
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
