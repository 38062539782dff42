"""Multimodal (MRoPE) position ids, vectorised: Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``get_rope_index``.

:func:`rope_index` returns the same ``position_ids [3, B, S]`` and ``mrope_position_deltas [B, 1]``
as transformers' ``Qwen*VLModel.get_rope_index``, element for element, with whole-batch array
ops instead of a loop over rows, images and frames. Two conventions, because transformers
changed the function's inputs and results in 5.0:

``convention="v5"`` (transformers 5.x, checked against the installed 5.24 in the tests)
    Vision groups are the runs of equal non-zero ``mm_token_type_ids`` (1 = image, 2 = video)
    among the unpadded tokens (``attention_mask != 0``); ``mm_token_type_ids`` may be derived
    from ``image_token_id`` / ``video_token_id`` instead, as the processors build it. Text
    continues from a running position that grows by 1 per text token and by
    ``max(h, w) // m`` per group (the temporal extent does not advance it); a group's three
    rows are its (frame, row, column) indices plus that running position; Qwen2.5-VL scales
    the video frame index by ``tokens_per_second * second_per_grid_t`` in floating point.
    Padded slots get 0; ``deltas[b] = max(positions of row b) + 1 - (unpadded length of b)``.

``convention="v4"`` (transformers 4.x, checked against 4.57.6)
    Groups start at every image/video token whose previous unpadded token
    (``attention_mask == 1``) is ``vision_start_token_id``; text continues from the maximum so
    far + 1 (the temporal extent counts); Qwen2.5-VL truncates ``second_per_grid_t`` to an
    integer first unless ``truncate_seconds=False`` (4.49 and the upstream fix); padded slots
    get 1; ``deltas[b] = max + 1 - S``. Calls without grids take transformers' text-only branch.

In both, a group of grid ``(t, h, w)`` is ``L = t * (h // m) * (w // m)`` tokens
(``m = spatial_merge_size``), frame-major then row-major; groups take the next grid of their
kind in batch order; ``variant="qwen3_vl"`` splits each video into ``t`` groups of grid
``(1, h, w)`` (Qwen3-VL writes a timestamp before every frame, so video tokens have temporal
index 0).

Where it runs (``path=``):

* ``"device"``: a fixed sequence of tensor ops on the inputs' device that never reads device
  memory on the host -- no ``.item()``, ``.tolist()``, boolean-mask indexing or data-dependent
  shape -- so on a GPU it issues **no** host-device sync and is CUDA-graph capturable;
* ``"host"``: NumPy on CPU memory, touching every token a few times and each group once. CPU
  inputs are read in place; GPU inputs are packed into one tensor and copied to the host (**one**
  sync), and the results come back in one asynchronous copy from pinned memory;
* ``"auto"`` (default): ``"host"`` for CPU inputs and for GPU inputs of at most
  :data:`HOST_PATH_MAX_TOKENS` tokens (where kernel launches, not data, bound the device path),
  ``"device"`` otherwise and always while a CUDA graph is being captured or torch.compile traces.

The well-formedness the vectorisation relies on -- every image/video token sits in a group,
each group is exactly its grid's ``L`` tokens of its kind, there are no more groups than grids,
grids have ``t >= 1`` and ``h, w >= m``, seconds are ``>= 0``, type ids are 0, 1 or 2 -- is what
the Qwen processors produce. The host path always checks it; the device path checks it when
``validate=True`` or ``ROPE_BACKENDS_DEBUG=1`` (one host read of one bool). A violation raises
``ValueError``; unchecked malformed input on the device path gives wrong positions, never an
out-of-bounds read.

This module must not move data between host and device except as the host path above says; the
device path copies grids and ``second_per_grid_ts`` given on another device once each.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .contract import INT_DTYPES
from .modes import debug_checks

__all__ = ["rope_index", "VARIANTS", "CONVENTIONS", "PATHS", "HOST_PATH_MAX_TOKENS"]

VARIANTS = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")
CONVENTIONS = ("v5", "v4")
PATHS = ("auto", "device", "host")
#: ``path="auto"`` computes GPU inputs of at most this many tokens (``B * S``) on the host: there
#: the device path is bound by its fixed number of kernel launches, and one transfer costs less.
#: H200 (Qwen3-VL, v5): at 8,192 tokens host 1.13 ms vs device 1.78 ms; at 32,768 host 1.83 ms vs
#: device 1.56 ms (bench/results/rope_index-cuda-nvidia-h200-2026-12-02.json)
HOST_PATH_MAX_TOKENS = 16384

@dataclass
class _Call:
    """One validated call: tensors on ``ids.device``, grids int64. ``scale`` is the per-video
    temporal factor of qwen2_5_vl: v4 ``second_per_grid_t`` (already int64 when truncated), v5
    ``tokens_per_second * second_per_grid_t`` in transformers' dtype; None otherwise."""

    ids: Tensor
    mask: Tensor | None
    types: Tensor | None  # v5: mm_token_type_ids [B, S] (None: derived from the token ids)
    images: Tensor  # [Ni, 3]
    videos: Tensor  # [Nv, 3]
    scale: Tensor | None  # [Nv]
    variant: str
    convention: str
    merge: int
    image_id: int | None
    video_id: int | None
    start_id: int | None
    tokens_per_second: float
    validate: bool


def rope_index(
    input_ids: Tensor,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    mm_token_type_ids: Tensor | None = None,
    spatial_merge_size: int = 2,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    variant: str = "qwen3_vl",
    convention: str | None = None,
    second_per_grid_ts: Tensor | Sequence[float] | None = None,
    tokens_per_second: float = 2,
    truncate_seconds: bool | None = None,
    validate: bool | None = None,
    path: str = "auto",
) -> tuple[Tensor, Tensor]:
    """MRoPE position ids for a batch of Qwen-VL style sequences (see the module doc).

    input_ids: int ``[B, S]``.
    image_grid_thw, video_grid_thw: int ``[num_images, 3]`` / ``[num_videos, 3]`` (t, h, w in
        patches, before the spatial merge), the rows of the whole batch concatenated in order.
        Pass ``video_grid_thw`` as the processor returns it (one row per video); ``qwen3_vl``
        splits it per frame itself.
    attention_mask: ``[B, S]``; padding anywhere (left, right, inside rows).
    mm_token_type_ids: ``[B, S]`` 0 = text, 1 = image, 2 = video, as the 5.x processors return
        it (``convention="v5"``). Without it, v5 derives it from ``image_token_id`` /
        ``video_token_id``.
    spatial_merge_size, image_token_id, video_token_id, vision_start_token_id: from the model
        config (``vision_config.spatial_merge_size``, ...). v4 needs the three token ids; v5
        needs ``mm_token_type_ids`` or the image and video ids, and no ``vision_start_token_id``.
    variant: ``"qwen3_vl"`` (also Qwen3-VL-MoE), ``"qwen2_vl"`` or ``"qwen2_5_vl"``.
    convention: ``"v5"`` (transformers 5.x) or ``"v4"`` (4.x). Default: ``"v5"`` when
        ``mm_token_type_ids`` is given, else ``"v4"`` (the inputs of a 4.x call).
    second_per_grid_ts: ``[num_videos]`` seconds per temporal grid (``qwen2_5_vl`` only;
        default 1 per video, as transformers).
    tokens_per_second: ``vision_config.tokens_per_second`` (``qwen2_5_vl`` only).
    truncate_seconds: v4 ``qwen2_5_vl`` only: True (default) casts each second to int64 as
        transformers 4.5x-4.57 do; False keeps it floating point (4.49, transformers PR #48669).
        v5 never truncates.
    validate: check well-formedness on the device path (one host read of one bool). Default:
        ``ROPE_BACKENDS_DEBUG=1``. The host path always checks (it costs nothing extra).
    path: ``"auto"``, ``"device"`` (zero syncs: for CUDA graphs) or ``"host"``.

    Returns ``(position_ids [3, B, S], mrope_position_deltas [B, 1])`` on ``input_ids``' device:
    positions in ``input_ids``' dtype, deltas int64 (v4's text-only branch keeps transformers'
    dtypes). Feed ``position_ids`` to ``rb.apply_cached(..., mrope=...)`` with the model's axis
    map from :mod:`rope_backends.mrope`.
    """
    call = _validate(
        input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids, spatial_merge_size,
        image_token_id, video_token_id, vision_start_token_id, variant, convention, second_per_grid_ts,
        tokens_per_second, truncate_seconds, validate, path,
    )
    if isinstance(call, tuple):  # text-only
        return call
    return _run(call, path)


def _run(call: _Call, path: str) -> tuple[Tensor, Tensor]:
    dev = call.ids.device
    if dev.type == "cpu":
        call = _on(call, dev)
        return _device(call) if path == "device" else _host(call)
    if path == "device" or (path == "auto" and not _host_pays(call)):
        return _device(_on(call, dev))
    return _via_host(call)


def _on(call: _Call, dev: torch.device) -> _Call:
    """Every tensor of the call on ``dev`` (a copy for those given elsewhere)."""
    move = lambda t: None if t is None else t.to(dev)  # noqa: E731
    return replace(call, mask=move(call.mask), types=move(call.types), images=move(call.images),
                   videos=move(call.videos), scale=move(call.scale))


def _host_pays(call: _Call) -> bool:
    """auto: small GPU inputs go to the host, unless a sync is not allowed right now."""
    if call.ids.device.type != "cuda" or call.ids.numel() > HOST_PATH_MAX_TOKENS:
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------------------- arguments ---
def _need_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def _need_grid(name: str, grid: object) -> Tensor | None:
    if grid is None:
        return None
    if not isinstance(grid, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [num, 3] or None, got {type(grid).__name__}")
    if grid.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype, got {grid.dtype}")
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [num, 3] (t, h, w), got {tuple(grid.shape)}")
    return grid.to(dtype=torch.int64)


def _need_bs(name: str, t: object, b: int, s: int) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, S] or None, got {type(t).__name__}")
    if tuple(t.shape) != (b, s):
        raise ValueError(f"{name}: expected shape {(b, s)} (that of input_ids), got {tuple(t.shape)}")
    return t


def _validate(
    input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids, spatial_merge_size,
    image_token_id, video_token_id, vision_start_token_id, variant, convention, second_per_grid_ts,
    tokens_per_second, truncate_seconds, validate, path,
) -> _Call | tuple[Tensor, Tensor]:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor [B, S], got {type(input_ids).__name__}")
    if input_ids.dtype not in INT_DTYPES:
        raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [B, S], got {tuple(input_ids.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if convention is None:
        convention = "v5" if mm_token_type_ids is not None else "v4"
    if convention not in CONVENTIONS:
        raise ValueError(f"convention: expected one of {CONVENTIONS}, got {convention!r}")
    merge = _need_int("spatial_merge_size", spatial_merge_size)
    if merge < 1:
        raise ValueError(f"spatial_merge_size: expected an int >= 1, got {merge}")
    ids3 = [None if v is None else _need_int(n, v) for n, v in (
        ("image_token_id", image_token_id), ("video_token_id", video_token_id),
        ("vision_start_token_id", vision_start_token_id),
    )]
    if convention == "v4":
        if mm_token_type_ids is not None:
            raise ValueError("mm_token_type_ids: only used by convention 'v5' (transformers 5.x), got a tensor with 'v4'")
        for name, v in zip(("image_token_id", "video_token_id", "vision_start_token_id"), ids3):
            if v is None:
                raise TypeError(f"{name}: expected an int (convention 'v4' finds groups through it), got None")
    else:
        if ids3[2] is not None:
            raise ValueError(
                "vision_start_token_id: only used by convention 'v4' (5.x groups tokens by mm_token_type_ids), "
                f"got {ids3[2]}"
            )
        if mm_token_type_ids is None and (ids3[0] is None or ids3[1] is None):
            raise TypeError(
                "mm_token_type_ids: expected a tensor [B, S], or image_token_id and video_token_id to derive it "
                "(convention 'v5'), got none"
            )
        if mm_token_type_ids is not None and (ids3[0] is not None or ids3[1] is not None):
            raise ValueError("image_token_id: expected None when mm_token_type_ids is given (convention 'v5' reads one of them), got an int")
        if truncate_seconds:
            raise ValueError("truncate_seconds: expected None or False with convention 'v5' (5.x never truncates), got True")
    if isinstance(tokens_per_second, bool) or not isinstance(tokens_per_second, (int, float)):
        raise TypeError(f"tokens_per_second: expected a number, got {type(tokens_per_second).__name__}")
    if truncate_seconds is not None and not isinstance(truncate_seconds, bool):
        raise TypeError(f"truncate_seconds: expected a bool or None, got {type(truncate_seconds).__name__}")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate: expected a bool or None, got {type(validate).__name__}")
    dev = input_ids.device
    b, s = input_ids.shape
    attention_mask = _need_bs("attention_mask", attention_mask, b, s)
    types = _need_bs("mm_token_type_ids", mm_token_type_ids, b, s)
    if types is not None and (types.dtype not in INT_DTYPES):
        raise TypeError(f"mm_token_type_ids: expected an integer dtype, got {types.dtype}")
    images = _need_grid("image_grid_thw", image_grid_thw)
    videos = _need_grid("video_grid_thw", video_grid_thw)
    if second_per_grid_ts is not None and variant != "qwen2_5_vl":
        raise ValueError(f"second_per_grid_ts: only used by variant 'qwen2_5_vl', got variant {variant!r}")
    if images is None and videos is None and convention == "v4":
        return _text_only(input_ids, None if attention_mask is None else attention_mask.to(dev))
    # grids stay where they are until the path is chosen (the host path reads CPU grids in place)
    if images is None:
        images = torch.zeros((0, 3), dtype=torch.int64, device=dev if videos is None else videos.device)
    if videos is None:
        videos = torch.zeros((0, 3), dtype=torch.int64, device=images.device)
    scale = None
    if variant == "qwen2_5_vl":
        scale = _seconds(second_per_grid_ts, videos.shape[0], tokens_per_second, convention,
                         truncate_seconds is not False, videos.device)
    return _Call(
        input_ids, attention_mask, types.long() if types is not None else None, images, videos, scale, variant,
        convention, merge, *ids3, tokens_per_second, bool(validate) if validate is not None else debug_checks(),
    )


def _seconds(secs, n_vid, tokens_per_second, convention, truncate, dev) -> Tensor:
    """The per-video temporal factor, in the dtype transformers computes it in."""
    is_list = secs is not None and not isinstance(secs, Tensor)
    if secs is None:
        # transformers' default of 1 per video (4.x: a float32 tensor; 5.x: the Python int 1)
        secs = torch.ones(n_vid, dtype=torch.float32 if convention == "v4" else torch.int64, device=dev)
    elif isinstance(secs, Tensor):
        secs = secs.to(dev)
    else:
        values = [float(v) for v in secs]
        if convention == "v5":  # 5.x: tokens_per_second * Python float, then a float32 multiply
            secs = torch.tensor([tokens_per_second * v for v in values], dtype=torch.float64).float().to(dev)
        else:
            secs = torch.tensor(values, dtype=torch.float32, device=dev)
    if secs.shape != (n_vid,):
        raise ValueError(f"second_per_grid_ts: expected shape ({n_vid},) (one per video), got {tuple(secs.shape)}")
    if convention == "v5":
        return secs if is_list else tokens_per_second * secs
    if truncate or not secs.is_floating_point():
        secs = secs.long()  # transformers 4.5x-4.57: torch.as_tensor(..., dtype=int64)
    return secs


def _text_only(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """transformers 4.x's branch for calls without grids (its dtypes and padding values)."""
    b, s = input_ids.shape
    if attention_mask is None:
        pos = torch.arange(s, device=input_ids.device).view(1, 1, s).expand(3, b, s).contiguous()
        return pos, torch.zeros((b, 1), device=input_ids.device, dtype=input_ids.dtype)
    pos = attention_mask.long().cumsum(-1) - 1
    pos.masked_fill_(attention_mask == 0, 1)
    deltas = pos.amax(-1, keepdim=True) + 1 - s
    return pos.unsqueeze(0).expand(3, b, s).contiguous(), deltas


# ------------------------------------------------------------------------------- grid tables ---
def _t_value(frame, scale, tokens_per_second, convention, xp):
    """The temporal index of qwen2_5_vl video frames. v4: ``(frame * second * tps).long()``
    (all-integer stays exact; else each product rounded to the float dtype torch picks -- that of
    a float ``scale``, else float32). v5: ``(frame * interval).long()`` with the interval
    ``tps * second`` already in transformers' dtype."""
    if convention == "v5":
        if xp is not np:
            return (frame * scale).long()
        if scale.dtype.kind == "f":
            return (frame.astype(scale.dtype) * scale).astype(np.int64)
        return frame * scale
    if xp is not np:
        return ((frame.to(scale.dtype) * scale) * tokens_per_second).long()
    prod = frame.astype(scale.dtype) * scale
    if prod.dtype.kind == "f" or isinstance(tokens_per_second, float):
        ftype = prod.dtype.type if prod.dtype.kind == "f" else np.float32
        prod = prod.astype(ftype) * ftype(tokens_per_second)
    else:
        prod = prod * tokens_per_second
    return prod.astype(np.int64)


def _image_scale(call: _Call, n_img: int, xp, like):
    """Images in qwen2_5_vl: temporal factor 0 (v4) or 1 (v5), in the videos' scale dtype."""
    value = 0 if call.convention == "v4" else 1
    if xp is np:
        return np.full(n_img, value, dtype=like.dtype)
    return torch.full((n_img,), value, dtype=like.dtype, device=like.device)


def _extent(call: _Call, t, hm, wm, scale, xp):
    """Positions a group advances the running position by: v4 ``max index + 1`` over the three
    rows (temporal included), v5 ``max(h, w) // m``."""
    if call.convention == "v5":
        return xp.maximum(hm, wm)
    t_last = t - 1 if scale is None else _t_value(t - 1, scale, call.tokens_per_second, "v4", xp)
    return xp.maximum(xp.maximum(t_last, hm - 1), wm - 1) + 1


def _bad_grids(call: _Call, n_frames_of_videos: object, starts_img: int, starts_vid: int) -> None:
    """Raise for the checks that need only per-grid data (host values already at hand)."""
    images, videos = call.images.tolist(), call.videos.tolist()
    for name, rows in (("image_grid_thw", images), ("video_grid_thw", videos)):
        for row in rows:
            if row[0] < 1 or row[1] < call.merge or row[2] < call.merge:
                raise ValueError(
                    f"{name}: expected t >= 1 and h, w >= spatial_merge_size={call.merge}, got {row}"
                )
    if call.scale is not None and any(v < 0 for v in call.scale.tolist()):
        raise ValueError(f"second_per_grid_ts: expected values >= 0, got {call.scale.tolist()}")
    if starts_img > len(images):
        raise ValueError(
            f"image_grid_thw: expected a row for each of the {starts_img} images in input_ids, got {len(images)}"
        )
    if starts_vid > n_frames_of_videos:  # type: ignore[operator]
        unit = "video frames (qwen3_vl: one group per frame)" if call.variant == "qwen3_vl" else "videos"
        raise ValueError(
            f"video_grid_thw: expected grids for the {starts_vid} {unit} in input_ids, got {n_frames_of_videos}"
        )


def _malformed(call: _Call, vision: int, grouped: int, wrong_kind: int, needed: int) -> ValueError:
    where = ("a run of equal mm_token_type_ids (1 image, 2 video)" if call.convention == "v5"
             else "a run of its kind right after vision_start_token_id")
    return ValueError(
        f"input_ids: expected every image/video token to sit in {where} of exactly t*(h//m)*(w//m) tokens "
        f"(as the Qwen processors emit), got {vision} vision tokens of which {grouped} fall in groups, "
        f"{wrong_kind} of the wrong kind, and groups needing {needed} tokens"
    )


def _bad_types(types_valid_values: list) -> ValueError:
    return ValueError(
        f"mm_token_type_ids: expected 0 (text), 1 (image) or 2 (video) in unpadded slots, got values {types_valid_values}"
    )


# -------------------------------------------------------------------------- device (no sync) ---
def _device(call: _Call) -> tuple[Tensor, Tensor]:
    """Whole-batch tensor ops on ``ids.device``; every shape is known without reading data."""
    ids, dev = call.ids, call.ids.device
    b, s = ids.shape
    v5 = call.convention == "v5"
    if s == 0:  # nothing to place (transformers' loop cannot even run on empty rows)
        return torch.empty((3, b, 0), dtype=ids.dtype, device=dev), torch.zeros((b, 1), dtype=torch.int64, device=dev)
    n_img, n_vid = call.images.shape[0], call.videos.shape[0]
    if n_img + n_vid == 0:  # grids given but empty: no group can exist; keep lookups in bounds
        grids = torch.full((1, 3), call.merge, dtype=torch.int64, device=dev)
    else:
        grids = torch.cat((call.images, call.videos))
    hw_grid = grids[:, 1:] // call.merge  # [G, 2]: h // m, w // m
    g_t = grids[:, 0]
    if call.variant == "qwen3_vl" and n_vid:  # every frame is its own (1, h, w) group
        g_t = g_t.clone()
        g_t[n_img:] = 1
    g_scale = None
    if call.scale is not None:
        g_scale = torch.cat((_image_scale(call, n_img, torch, call.scale), call.scale))
        if n_img + n_vid == 0:
            g_scale = torch.zeros(1, dtype=g_scale.dtype, device=dev)
    g_hw = hw_grid.prod(1)
    g_len = g_t * g_hw
    if v5:
        g_extent = hw_grid.amax(1)
    elif g_scale is None:  # max index + 1 over (t, h, w)
        g_extent = torch.maximum(g_t, hw_grid.amax(1))
    else:
        g_extent = torch.maximum(_t_value(g_t - 1, g_scale, call.tokens_per_second, "v4", torch) + 1, hw_grid.amax(1))
    # one row per group, gathered once per token: length, extent - length, h*w, w (>= 1: no
    # division by zero on malformed grids)
    table = torch.stack((g_len, g_extent - g_len, g_hw.clamp(min=1), hw_grid[:, 1].clamp(min=1)), 1)

    if call.mask is None:
        valid = None
    else:
        valid = call.mask != 0 if v5 else call.mask == 1
    col = torch.arange(s, device=dev).expand(b, s)
    comp = col if valid is None else valid.cumsum(1) - 1  # index among the row's unpadded tokens
    if call.types is not None:
        kind = call.types
        is_img, is_vid = kind == 1, kind == 2
    else:
        is_img, is_vid = ids == call.image_id, ids == call.video_id
        kind = is_img.long() + 2 * is_vid.long() if v5 else None
    # the previous unpadded token of each token (its column; -1 for none)
    if valid is None:
        prev_col = None
    else:
        last_valid = torch.where(valid, col, -1).cummax(1).values
        prev_col = torch.nn.functional.pad(last_valid[:, :-1], (1, 0), value=-1)
    if v5:  # a group starts where the type changes to 1 or 2
        if prev_col is None:
            prev_kind = torch.nn.functional.pad(kind[:, :-1], (1, 0), value=0)
        else:
            prev_kind = torch.where(prev_col >= 0, kind.gather(1, prev_col.clamp(min=0)), 0)
        start_img = is_img & (prev_kind != 1)
        start_vid = is_vid & (prev_kind != 2)
    else:  # a group starts right after vision_start
        if prev_col is None:
            prev_is_start = torch.nn.functional.pad(ids[:, :-1] == call.start_id, (1, 0), value=False)
        else:
            prev_is_start = (ids.gather(1, prev_col.clamp(min=0)) == call.start_id) & (prev_col >= 0)
        start_img = is_img & prev_is_start
        start_vid = is_vid & prev_is_start
    if valid is not None:
        start_img, start_vid = start_img & valid, start_vid & valid
    start = start_img | start_vid
    # global group number in batch order, as transformers' running image/video index
    img_no = start_img.flatten().cumsum(0).view(b, s) - 1
    vid_no = start_vid.flatten().cumsum(0).view(b, s) - 1
    if call.variant == "qwen3_vl":  # frame group j belongs to video searchsorted(cumsum(T), j, right)
        vid_no = torch.searchsorted(call.videos[:, 0].cumsum(0), vid_no.flatten(), right=True).view(b, s)
    code = torch.where(start_img, img_no, n_img + vid_no).clamp(0, max(n_img + n_vid, 1) - 1)

    # each token's latest group start in its row: comp is increasing over unpadded tokens, so the
    # running max of comp at starts is the start's unpadded index (-1: none yet) and its index
    # the start's column
    start_comp, start_col = torch.where(start, comp, -1).cummax(1)
    tok_code = code.gather(1, start_col)
    offset = comp - start_comp
    tok = table[tok_code]  # [B, S, 4]
    tok_len = tok[..., 0]
    in_group = (start_comp >= 0) & (offset < tok_len)
    if valid is not None:
        in_group &= valid

    # positions: text = unpadded index + the (extent - length) of every group so far
    jump = torch.where(start, table[:, 1][code], 0)
    shift = jump.cumsum(1)
    text_pos = comp + shift
    base = text_pos - offset - tok[..., 1]
    if valid is not None:  # padded slots (never in a group): 0 in 5.x, 1 in 4.x
        text_pos = torch.where(valid, text_pos, 0 if v5 else 1)
    hw, wm = tok[..., 2], tok[..., 3]
    frame = offset // hw
    rest = offset - frame * hw
    row = rest // wm
    if g_scale is None:
        t_idx = frame
    else:
        t_idx = _t_value(frame, g_scale[tok_code], call.tokens_per_second, call.convention, torch)
    vis_pos = torch.stack((t_idx, row, rest - row * wm)) + base
    pos = torch.where(in_group, vis_pos, text_pos)
    n_valid = comp[:, -1:] + 1
    if v5:  # 5.x: the row's largest position (a video's frames may pass the running position;
        # padded slots hold 0, below every unpadded position)
        deltas = torch.where(n_valid > 0, pos.amax((0, 2)).unsqueeze(1) + 1 - n_valid, 0)
    else:
        deltas = n_valid + shift[:, -1:] - s

    if call.validate:
        tok_vid = tok_code >= n_img
        kind_ok = torch.where(tok_vid, is_vid, is_img)
        vision = is_img | is_vid
        if valid is not None:
            vision &= valid
        n_frames = call.videos[:, 0].sum() if call.variant == "qwen3_vl" else n_vid
        zero = torch.zeros((), dtype=torch.bool, device=dev)
        types_bad = zero
        if call.types is not None:
            bad_type = (call.types < 0) | (call.types > 2)
            types_bad = (bad_type & valid).any() if valid is not None else bad_type.any()
        bad = torch.stack((
            (call.images[:, 0] < 1).any() | (call.images[:, 1:] < call.merge).any(),
            (call.videos[:, 0] < 1).any() | (call.videos[:, 1:] < call.merge).any(),
            (call.scale < 0).any() if call.scale is not None else zero,
            start_img.sum() > n_img,
            start_vid.sum() > n_frames,
            (in_group & ~kind_ok).any(),
            (vision & ~in_group).any(),
            in_group.sum() != torch.where(start, g_len[code], 0).sum(),
            types_bad,
        )).any()
        if bool(bad):  # the one host read
            if bool(types_bad):
                values = call.types if valid is None else call.types[valid]
                raise _bad_types(sorted(set(values.unique().tolist())))
            _bad_grids(call, int(n_frames), int(start_img.sum()), int(start_vid.sum()))
            raise _malformed(
                call, int(vision.sum()), int(in_group.sum()), int((in_group & ~kind_ok).sum()),
                int(torch.where(start, g_len[code], 0).sum()),
            )
    return pos.to(ids.dtype), deltas


# ------------------------------------------------------------------------------- host (CPU) ---
def _host(call: _Call) -> tuple[Tensor, Tensor]:
    """NumPy on the CPU tensors' memory: per-token work is a handful of passes, per-group work is
    on arrays of one entry per group. Hands the call to :func:`_device` (which handles any mask
    and explains malformed input) when padding interrupts a group or a run is malformed."""
    ids = call.ids.numpy() if call.ids.dtype == torch.int64 else call.ids.long().numpy()
    b, s = ids.shape
    if s == 0:
        return _device(call)
    v5 = call.convention == "v5"
    flat_ids = ids.reshape(-1)
    if call.mask is None:
        flat_valid = None
    else:
        m = call.mask.numpy()
        flat_valid = (m != 0 if v5 else m == 1).reshape(-1)
    if call.types is not None:
        kind = call.types.numpy().reshape(-1)
        if kind.size and (kind.min() < 0 or kind.max() > 2):
            bad = (kind < 0) | (kind > 2)
            if flat_valid is not None:
                bad &= flat_valid
            if bad.any():
                raise _bad_types(sorted(set(np.unique(kind[bad]).tolist()) | {0}))
            kind = np.where(bad, 0, kind)  # out-of-range values sit in padded slots only
    else:
        kind = (flat_ids == call.image_id).view(np.int8) + 2 * (flat_ids == call.video_id).view(np.int8)
    images, videos = call.images.numpy(), call.videos.numpy()
    n_img, n_vid = images.shape[0], videos.shape[0]
    grids = np.concatenate((images, videos))
    g_t, g_h, g_w = grids[:, 0], grids[:, 1] // call.merge, grids[:, 2] // call.merge
    n_frames = n_vid
    if call.variant == "qwen3_vl":
        n_frames = int(g_t[n_img:].sum())
        g_t = g_t.copy()
        g_t[n_img:] = 1  # every frame is its own (1, h, w) group
    scale = None if call.scale is None else call.scale.numpy()

    # group starts, as flat indices
    if v5:  # where the type of consecutive unpadded tokens changes to 1 or 2
        if flat_valid is not None:
            valid2 = flat_valid.reshape(b, s)
            # padding inside a row would make "consecutive" mean "consecutive once compacted"
            if (np.count_nonzero(valid2[:, 1:] & ~valid2[:, :-1], axis=1) + valid2[:, 0] > 1).any():
                return _device(_with_validation(call))
            kind = np.where(flat_valid, kind, 0)
        prev = np.empty_like(kind)
        prev[1:] = kind[:-1]
        prev[::s] = 0  # a row's first token has no predecessor
        at = np.flatnonzero((kind != 0) & (prev != kind))
    else:  # a vision token right after a vision_start, both unpadded, in one row
        at = np.flatnonzero(flat_ids == call.start_id) + 1  # flat index of the token after
        at = at[at % s != 0]
        if flat_valid is not None:
            at = at[flat_valid[at - 1]]
            if not flat_valid[at].all():
                return _device(_with_validation(call))  # padding between vision_start and its tokens
        at = at[kind[at] != 0]
    kind_vid = kind[at] == 2
    n_start_vid = int(np.count_nonzero(kind_vid))
    n_start_img = len(at) - n_start_vid
    if (
        n_start_img > n_img
        or n_start_vid > n_frames
        or (len(grids) and (grids[:, 0].min() < 1 or min(g_h.min(), g_w.min()) < 1))
        or (scale is not None and len(scale) and scale.min() < 0)
    ):
        _bad_grids(call, n_frames, n_start_img, n_start_vid)
    if n_start_vid:
        videos_so_far = np.cumsum(kind_vid)
        vid_no = videos_so_far - 1
        if call.variant == "qwen3_vl":
            vid_no = np.searchsorted(np.cumsum(videos[:, 0]), vid_no, side="right")
        # an image's number = groups before it - videos before it
        code = np.where(kind_vid, n_img + vid_no, np.arange(len(at)) - videos_so_far)
    else:
        code = np.arange(len(at))
    g_t, g_h, g_w = g_t[code], g_h[code], g_w[code]
    length = g_t * g_h * g_w
    if scale is not None:
        scale = np.concatenate((_image_scale(call, n_img, np, scale), scale))[code]
    extent = _extent(call, g_t, g_h, g_w, scale, np)

    # vision tokens: each group's L tokens from its first column on, offset o = 0..L-1
    total = int(length.sum())
    ends = at + length  # flat index one past each group
    # a group must end inside its row and before the next group starts
    if len(at) and (((ends - 1) // s != at // s).any() or (at[1:] < ends[:-1]).any()):
        return _device(_with_validation(call))
    gid = np.repeat(np.arange(len(at)), length)
    offset = np.arange(total, dtype=np.int64)
    offset -= (np.cumsum(length) - length)[gid]
    where = at[gid] + offset  # flat index of every vision token
    if (kind[where] != np.where(kind_vid, 2, 1)[gid]).any() or (
        flat_valid is not None and not flat_valid[where].all()
    ):
        return _device(_with_validation(call))  # padding inside a group, or a run of the wrong kind
    n_vision = int(np.count_nonzero(kind if flat_valid is None or v5 else kind * flat_valid))
    if n_vision != total:
        raise _malformed(call, n_vision, total, 0, total)

    # text positions: unpadded index + the (extent - length) of every group so far
    text_pos = np.zeros(b * s, dtype=np.int64)
    text_pos[at] = extent - length
    text_pos = text_pos.reshape(b, s)
    np.cumsum(text_pos, axis=1, out=text_pos)
    shift_last = text_pos[:, -1].copy()
    if flat_valid is None:
        n_valid = np.full(b, s, dtype=np.int64)
        text_pos += np.arange(s, dtype=np.int64)
    else:
        comp = np.cumsum(flat_valid.reshape(b, s), axis=1, dtype=np.int64)
        n_valid = comp[:, -1].copy()
        text_pos += comp
        text_pos -= 1
        np.copyto(text_pos, 0 if v5 else 1, where=~flat_valid.reshape(b, s))  # padded slots
    text_flat = text_pos.reshape(-1)
    base = text_flat[at] - (extent - length)
    pos = np.empty((3, b * s), dtype=np.int64)
    pos[:] = text_flat
    hw, wm = (g_h * g_w)[gid], g_w[gid]
    frame = offset // hw
    rest = offset - frame * hw
    hrow = rest // wm
    b_tok = base[gid]
    t_idx = frame if scale is None else _t_value(frame, scale[gid], call.tokens_per_second, call.convention, np)
    pos[0, where] = b_tok + t_idx
    pos[1, where] = b_tok + hrow
    rest -= hrow * wm
    pos[2, where] = b_tok + rest
    if v5:  # the row's largest position: its last running position, or a video frame past it
        row_top = n_valid + shift_last  # running position after the row's last token
        if len(at):
            t_last = g_t - 1 if scale is None else _t_value(g_t - 1, scale, call.tokens_per_second, "v5", np)
            np.maximum.at(row_top, at // s, base + t_last + 1)
        deltas = np.where(n_valid > 0, row_top - n_valid, 0)
    else:
        deltas = n_valid + shift_last - s
    out = torch.from_numpy(pos).view(3, b, s)
    return (out if call.ids.dtype == torch.int64 else out.to(call.ids.dtype)), torch.from_numpy(deltas).view(b, 1)


def _with_validation(call: _Call) -> _Call:
    return replace(call, validate=True)


# --------------------------------------------------------------------- GPU inputs, host path ---
def _resident(t: Tensor) -> bool:
    """Already in host memory (read in place by the host path)."""
    return t.device.type == "cpu"


def _via_host(call: _Call) -> tuple[Tensor, Tensor]:
    """One device->host copy of every input (packed into one int64 tensor: the one sync), the
    NumPy path, and one asynchronous host->device copy of both results from pinned memory."""
    dev = call.ids.device
    b, s = call.ids.shape
    names = ("ids", "mask", "types", "images", "videos", "scale")
    given = {n: getattr(call, n) for n in names if getattr(call, n) is not None}
    host_values = {n: t for n, t in given.items() if _resident(t)}
    remote = {n: t for n, t in given.items() if not _resident(t)}
    if remote:
        packed = _pack([t.to(dev) for t in remote.values()]).cpu()  # the one sync
        host_values.update(zip(remote, _unpack(packed, list(remote.values()))))
    pos, deltas = _host(replace(call, **host_values))
    out = torch.empty(pos.numel() + deltas.numel(), dtype=torch.int64, pin_memory=dev.type == "cuda")
    out[: pos.numel()].copy_(pos.reshape(-1))
    out[pos.numel():].copy_(deltas.reshape(-1))
    out = out.to(dev, non_blocking=True)
    return out[: pos.numel()].view(3, b, s).to(call.ids.dtype), out[pos.numel():].view(b, 1)


def _pack(tensors: list[Tensor]) -> Tensor:
    """One flat int64 tensor holding every value exactly: integers and bools widened, floats
    widened to float64 and carried bit for bit."""
    return torch.cat([(t.double().view(torch.int64) if t.is_floating_point() else t.long()).reshape(-1) for t in tensors])


def _unpack(packed: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`_pack`: tensors of ``like``'s dtypes and shapes, on packed's device."""
    out = []
    for t, piece in zip(like, torch.split(packed, [t.numel() for t in like])):
        piece = piece.view(torch.float64) if t.is_floating_point() else piece
        out.append(piece.to(t.dtype).view(t.shape))
    return out
