"""Multimodal (MRoPE) position ids, vectorised: Qwen2-VL / Qwen2.5-VL / Qwen3-VL ``get_rope_index``.

:func:`rope_index` returns the same ``position_ids [3, B, S]`` and ``mrope_position_deltas [B, 1]``
as transformers' ``Qwen*VLModel.get_rope_index`` (4.x API, where vision groups are found through
the ``vision_start`` token; checked against transformers 4.57.6), element for element, with whole-
batch array ops instead of a loop over rows, images and frames:

* inputs on a GPU (or any non-CPU device): a fixed sequence of tensor ops on that device that
  never reads device memory on the host -- no ``.item()``, ``.tolist()``, boolean-mask indexing
  or data-dependent shape -- so it issues **no** host-device sync and is CUDA-graph capturable
  (the reference loop syncs several times per row, image and video frame);
* inputs on the CPU: the same arithmetic in NumPy on the inputs' memory, touching every token a
  few times and each vision group once (no device is involved, so nothing is transferred).

Semantics reproduced (transformers 4.x):

* Rows are read through ``attention_mask == 1`` (padding removed, order kept); padded slots get
  position 1 in all three rows.
* A vision *group* starts at every image/video token whose previous unpadded token is
  ``vision_start_token_id``. Groups take the next grid of their kind in batch order
  (``image_grid_thw`` rows for images, ``video_grid_thw`` rows for videos). A grid
  ``(t, h, w)`` covers ``L = t * (h // m) * (w // m)`` tokens (``m = spatial_merge_size``),
  frame-major then row-major: token ``o`` of the group has indices
  ``(o // (hm*wm), (o // wm) % hm, o % wm)`` with ``hm = h // m``, ``wm = w // m``.
* Text continues from (max of everything before) + 1; a group's three rows are its indices
  plus ``base``, the position its first token would have had as text. The next text token gets
  ``base + max(group indices) + 1``.
* ``variant="qwen3_vl"``: each video of ``T`` frames is ``T`` separate groups of grid
  ``(1, h, w)`` (Qwen3-VL writes timestamp text and a ``vision_start`` before every frame), so
  a video token's temporal index is always 0 and time is carried by the timestamp text.
  ``"qwen2_vl"``: temporal index = frame index. ``"qwen2_5_vl"``: temporal index of a video frame
  = ``long((frame * second_per_grid_t) * tokens_per_second)``, with ``second_per_grid_t``
  first truncated to int64 as transformers 4.5x-4.57 do (``truncate_seconds=True``), or kept
  in floating point (float32, or the dtype of a floating ``second_per_grid_ts`` tensor) as in
  transformers 4.49 and after the upstream fix; images use 0.
* ``mrope_position_deltas[b] = max(positions of row b's unpadded tokens) + 1 - S`` (S counts the
  padding). Positions never decrease past a group's extent, so that max is the row's final
  "next position" minus one, which is how it is computed here.
* With neither grid given, transformers' text-only branch: ``cumsum(mask) - 1`` with padding set
  to 1 (deltas from the max including those 1s), or ``arange(S)`` and zero deltas without a mask.

Not reproduced (documented, not silent): transformers 5.x ``get_rope_index(input_ids,
mm_token_type_ids, ...)`` groups tokens by ``mm_token_type_ids``, puts 0 (not 1) in padded slots
and subtracts the unpadded length (not S) in the deltas.

The well-formedness the vectorisation relies on -- every image/video token sits in a group,
each group is exactly its grid's ``L`` tokens of its kind, there are no more groups than grids,
grids have ``t >= 1`` and ``h, w >= m``, seconds are ``>= 0`` -- is what the Qwen processors
produce. It is checked on CPU inputs, and on a GPU when ``validate=True`` or
``ROPE_BACKENDS_DEBUG=1`` (one host read of one bool); a violation raises ``ValueError``.
Unchecked malformed input on a GPU gives wrong positions, never an out-of-bounds read.

This module must not move inputs or results between host and device: grids and
``second_per_grid_ts`` on another device than ``input_ids`` are the one exception (copied to it
once each).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .spec import debug_checks

__all__ = ["rope_index", "VARIANTS"]

VARIANTS = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class _Call:
    """One validated call: tensors on ``ids.device``, grids int64, ``secs`` already int64 when
    transformers truncates them."""

    ids: Tensor
    mask: Tensor | None
    images: Tensor  # [Ni, 3]
    videos: Tensor  # [Nv, 3]
    secs: Tensor | None  # [Nv] (qwen2_5_vl only)
    variant: str
    merge: int
    image_id: int
    video_id: int
    start_id: int
    tokens_per_second: float
    validate: bool


def rope_index(
    input_ids: Tensor,
    image_grid_thw: Tensor | None = None,
    video_grid_thw: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    variant: str = "qwen3_vl",
    second_per_grid_ts: Tensor | Sequence[float] | None = None,
    tokens_per_second: float = 2,
    truncate_seconds: bool = True,
    validate: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """MRoPE position ids for a batch of Qwen-VL style sequences, without host-device syncs.

    input_ids: int ``[B, S]``.
    image_grid_thw, video_grid_thw: int ``[num_images, 3]`` / ``[num_videos, 3]`` (t, h, w in
        patches, before the spatial merge), the rows of the whole batch concatenated in order;
        best on ``input_ids``' device. Pass ``video_grid_thw`` as the processor returns it
        (one row per video, ``t`` = temporal grids); ``qwen3_vl`` splits it per frame itself.
    attention_mask: ``[B, S]``; 1 = token, anything else = padding (left, right or anywhere).
    spatial_merge_size, image_token_id, video_token_id, vision_start_token_id: from the model
        config (``vision_config.spatial_merge_size``, ``image_token_id``, ...).
    variant: ``"qwen3_vl"`` (also Qwen3-VL-MoE), ``"qwen2_vl"`` or ``"qwen2_5_vl"``.
    second_per_grid_ts: ``[num_videos]`` seconds per temporal grid (``qwen2_5_vl`` only;
        default 1.0 per video, as transformers).
    tokens_per_second: ``vision_config.tokens_per_second`` (``qwen2_5_vl`` only; 2 in the
        released Qwen2.5-VL checkpoints).
    truncate_seconds: ``qwen2_5_vl`` only. True (default) reproduces transformers 4.5x-4.57,
        which cast each ``second_per_grid_t`` to int64 before scaling (0.5 s becomes 0, so every
        frame of such a video gets temporal index 0); False keeps it floating point, as
        transformers 4.49 and the upstream fix (transformers PR #48669) do.
    validate: check well-formedness on a GPU (one host read of one bool; see the module doc).
        Default: ``ROPE_BACKENDS_DEBUG=1``. CPU inputs are always checked (it costs no sync).

    Returns ``(position_ids [3, B, S], mrope_position_deltas [B, 1])`` on ``input_ids``' device:
    positions in ``input_ids``' dtype, deltas int64 (the text-only branch keeps transformers'
    dtypes too). Feed ``position_ids`` to ``rb.apply_cached(..., mrope=...)`` with the model's
    axis map from :mod:`rope_backends.mrope`.
    """
    call = _validate(
        input_ids, image_grid_thw, video_grid_thw, attention_mask, spatial_merge_size, image_token_id,
        video_token_id, vision_start_token_id, variant, second_per_grid_ts, tokens_per_second,
        truncate_seconds, validate,
    )
    if isinstance(call, tuple):  # text-only
        return call
    return _host(call) if call.ids.device.type == "cpu" else _device(call)


# ---------------------------------------------------------------------------------- arguments ---
def _need_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


def _need_grid(name: str, grid: object, device: torch.device) -> Tensor | None:
    if grid is None:
        return None
    if not isinstance(grid, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [num, 3] or None, got {type(grid).__name__}")
    if grid.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected an integer dtype, got {grid.dtype}")
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [num, 3] (t, h, w), got {tuple(grid.shape)}")
    return grid.to(device=device, dtype=torch.int64)


def _validate(
    input_ids, image_grid_thw, video_grid_thw, attention_mask, spatial_merge_size, image_token_id,
    video_token_id, vision_start_token_id, variant, second_per_grid_ts, tokens_per_second,
    truncate_seconds, validate,
) -> _Call | tuple[Tensor, Tensor]:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids: expected a torch.Tensor [B, S], got {type(input_ids).__name__}")
    if input_ids.dtype not in _INT_DTYPES:
        raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [B, S], got {tuple(input_ids.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    merge = _need_int("spatial_merge_size", spatial_merge_size)
    if merge < 1:
        raise ValueError(f"spatial_merge_size: expected an int >= 1, got {merge}")
    ids3 = tuple(_need_int(n, v) for n, v in (
        ("image_token_id", image_token_id), ("video_token_id", video_token_id),
        ("vision_start_token_id", vision_start_token_id),
    ))
    if isinstance(tokens_per_second, bool) or not isinstance(tokens_per_second, (int, float)):
        raise TypeError(f"tokens_per_second: expected a number, got {type(tokens_per_second).__name__}")
    if not isinstance(truncate_seconds, bool):
        raise TypeError(f"truncate_seconds: expected a bool, got {type(truncate_seconds).__name__}")
    if validate is not None and not isinstance(validate, bool):
        raise TypeError(f"validate: expected a bool or None, got {type(validate).__name__}")
    dev = input_ids.device
    b, s = input_ids.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"attention_mask: expected a torch.Tensor [B, S] or None, got {type(attention_mask).__name__}"
            )
        if tuple(attention_mask.shape) != (b, s):
            raise ValueError(
                f"attention_mask: expected shape {(b, s)} (that of input_ids), got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(dev)
    images = _need_grid("image_grid_thw", image_grid_thw, dev)
    videos = _need_grid("video_grid_thw", video_grid_thw, dev)
    if images is None and videos is None:
        return _text_only(input_ids, attention_mask)
    if second_per_grid_ts is not None and variant != "qwen2_5_vl":
        raise ValueError(f"second_per_grid_ts: only used by variant 'qwen2_5_vl', got variant {variant!r}")
    if images is None:
        images = torch.zeros((0, 3), dtype=torch.int64, device=dev)
    if videos is None:
        videos = torch.zeros((0, 3), dtype=torch.int64, device=dev)
    secs = None
    if variant == "qwen2_5_vl":
        n_vid = videos.shape[0]
        if second_per_grid_ts is None:
            secs = torch.ones(n_vid, dtype=torch.float32, device=dev)  # transformers' 1.0 default
        elif isinstance(second_per_grid_ts, Tensor):
            secs = second_per_grid_ts.to(dev)
        else:
            secs = torch.tensor([float(v) for v in second_per_grid_ts], dtype=torch.float32, device=dev)
        if secs.shape != (n_vid,):
            raise ValueError(
                f"second_per_grid_ts: expected shape ({n_vid},) (one per video), got {tuple(secs.shape)}"
            )
        if truncate_seconds or not secs.is_floating_point():
            secs = secs.long()  # transformers 4.5x-4.57: torch.as_tensor(..., dtype=int64)
    return _Call(
        input_ids, attention_mask, images, videos, secs, variant, merge, *ids3, tokens_per_second,
        bool(validate) if validate is not None else debug_checks(),
    )


def _text_only(input_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """transformers' branch for calls without grids (its dtypes and padding values)."""
    b, s = input_ids.shape
    if attention_mask is None:
        pos = torch.arange(s, device=input_ids.device).view(1, 1, s).expand(3, b, s).contiguous()
        return pos, torch.zeros((b, 1), device=input_ids.device, dtype=input_ids.dtype)
    pos = attention_mask.long().cumsum(-1) - 1
    pos.masked_fill_(attention_mask == 0, 1)
    deltas = pos.amax(-1, keepdim=True) + 1 - s
    return pos.unsqueeze(0).expand(3, b, s).contiguous(), deltas


# ------------------------------------------------------------------------------- grid tables ---
def _grid_table(call: _Call, xp):
    """Per grid (images first, then videos): t, hm, wm, tokens L, extent E (positions spanned:
    max index + 1) and the temporal scale (qwen2_5_vl; else None). ``xp`` is torch or numpy."""
    images, videos = call.images, call.videos
    if xp is np:
        images, videos = images.numpy(), videos.numpy()
        grids = np.concatenate((images, videos))
    else:
        grids = torch.cat((images, videos))
    n_img = images.shape[0]
    t, hm, wm = grids[:, 0], grids[:, 1] // call.merge, grids[:, 2] // call.merge
    if call.variant == "qwen3_vl":
        t = t.copy() if xp is np else t.clone()
        t[n_img:] = 1  # every frame is its own (1, h, w) group
    scale = None
    if call.secs is not None:
        secs = call.secs if xp is not np else call.secs.numpy()
        zeros = xp.zeros(n_img, dtype=secs.dtype) if xp is np else torch.zeros(n_img, dtype=secs.dtype, device=secs.device)
        scale = xp.concatenate((zeros, secs)) if xp is np else torch.cat((zeros, secs))
        t_last = _t_value(t - 1, scale, call.tokens_per_second, xp)
    else:
        t_last = t - 1
    extent = xp.maximum(xp.maximum(t_last, hm - 1), wm - 1) + 1
    return t, hm, wm, t * hm * wm, extent, scale


def _t_value(frame, scale, tokens_per_second, xp):
    """transformers' ``(frame * second_per_grid_t * tokens_per_second).long()``: all-integer
    stays exact; otherwise each product is rounded to the float dtype torch would pick (that of
    a float ``scale``, else float32), then truncated toward zero."""
    if xp is not np:
        return ((frame.to(scale.dtype) * scale) * tokens_per_second).long()
    prod = frame.astype(scale.dtype) * scale
    if prod.dtype.kind == "f" or isinstance(tokens_per_second, float):
        ftype = prod.dtype.type if prod.dtype.kind == "f" else np.float32
        prod = prod.astype(ftype) * ftype(tokens_per_second)
    else:
        prod = prod * tokens_per_second
    return prod.astype(np.int64)


def _bad_grids(call: _Call, n_frames_of_videos: object, starts_img: int, starts_vid: int) -> None:
    """Raise for the checks that need only per-grid data (host values already at hand)."""
    images, videos = call.images.tolist(), call.videos.tolist()
    for name, rows in (("image_grid_thw", images), ("video_grid_thw", videos)):
        for row in rows:
            if row[0] < 1 or row[1] < call.merge or row[2] < call.merge:
                raise ValueError(
                    f"{name}: expected t >= 1 and h, w >= spatial_merge_size={call.merge}, got {row}"
                )
    if call.secs is not None and any(v < 0 for v in call.secs.tolist()):
        raise ValueError(f"second_per_grid_ts: expected values >= 0, got {call.secs.tolist()}")
    if starts_img > len(images):
        raise ValueError(
            f"image_grid_thw: expected a row for each of the {starts_img} images in input_ids, got {len(images)}"
        )
    if starts_vid > n_frames_of_videos:  # type: ignore[operator]
        unit = "video frames (qwen3_vl: one group per frame)" if call.variant == "qwen3_vl" else "videos"
        raise ValueError(
            f"video_grid_thw: expected grids for the {starts_vid} {unit} in input_ids, got {n_frames_of_videos}"
        )


def _malformed(vision: int, grouped: int, wrong_kind: int, needed: int) -> ValueError:
    return ValueError(
        "input_ids: expected every image/video token to sit in a run of exactly t*(h//m)*(w//m) tokens of its "
        f"kind right after vision_start_token_id (as the Qwen processors emit), got {vision} vision tokens of "
        f"which {grouped} fall in groups, {wrong_kind} of the wrong kind, and groups needing {needed} tokens"
    )


# -------------------------------------------------------------------------- device (no sync) ---
def _device(call: _Call) -> tuple[Tensor, Tensor]:
    """Whole-batch tensor ops on ``ids.device``; every shape is known without reading data."""
    ids, dev = call.ids, call.ids.device
    b, s = ids.shape
    if s == 0:  # nothing to place (transformers' loop cannot even run on empty rows)
        return torch.empty((3, b, 0), dtype=ids.dtype, device=dev), torch.zeros((b, 1), dtype=torch.int64, device=dev)
    n_img, n_vid = call.images.shape[0], call.videos.shape[0]
    g_t, g_h, g_w, g_len, g_extent, g_scale = _grid_table(call, torch)
    if n_img + n_vid == 0:  # grids given but empty: no group can exist; keep lookups in bounds
        one = torch.zeros(1, dtype=torch.int64, device=dev)
        g_t, g_h, g_w, g_len, g_extent = one, one, one, one, one
        g_scale = None if g_scale is None else torch.zeros(1, dtype=g_scale.dtype, device=dev)

    valid = torch.ones_like(ids, dtype=torch.bool) if call.mask is None else call.mask == 1
    col = torch.arange(s, device=dev).expand(b, s)
    comp = valid.cumsum(1) - 1  # index among the row's unpadded tokens
    if call.mask is None:
        prev_is_start = torch.nn.functional.pad(ids[:, :-1] == call.start_id, (1, 0), value=False)
    else:  # previous *unpadded* token: the last valid column strictly before this one
        last_valid = torch.where(valid, col, -1).cummax(1).values
        prev_col = torch.nn.functional.pad(last_valid[:, :-1], (1, 0), value=-1)
        prev_is_start = (ids.gather(1, prev_col.clamp(min=0)) == call.start_id) & (prev_col >= 0)
    is_img, is_vid = ids == call.image_id, ids == call.video_id
    start_img = valid & is_img & prev_is_start
    start_vid = valid & is_vid & prev_is_start
    start = start_img | start_vid
    # global group number in batch order, as transformers' running image/video index
    img_no = start_img.flatten().cumsum(0).view(b, s) - 1
    vid_no = start_vid.flatten().cumsum(0).view(b, s) - 1
    if call.variant == "qwen3_vl":  # frame group j belongs to video searchsorted(cumsum(T), j, right)
        vid_no = torch.searchsorted(call.videos[:, 0].cumsum(0), vid_no.flatten(), right=True).view(b, s)
    code = torch.where(start_img, img_no, n_img + vid_no).clamp(0, max(n_img + n_vid, 1) - 1)

    # each token's latest group start in its row, that group's table row and the token's offset
    start_col = torch.where(start, col, -1).cummax(1).values
    sc = start_col.clamp(min=0)
    tok_code = code.gather(1, sc)
    offset = comp - comp.gather(1, sc)
    tok_len = g_len[tok_code]
    in_group = (start_col >= 0) & valid & (offset < tok_len)

    # positions: text = unpadded index + the (extent - length) of every group so far
    jump = torch.where(start, g_extent[code] - g_len[code], 0)
    shift = jump.cumsum(1)
    text_pos = comp + shift
    base = text_pos - offset - (g_extent[tok_code] - tok_len)
    hw = (g_h * g_w)[tok_code].clamp(min=1)
    wm = g_w[tok_code].clamp(min=1)
    frame = offset // hw
    rest = offset - frame * hw
    row = rest // wm
    t_idx = frame if g_scale is None else _t_value(frame, g_scale[tok_code], call.tokens_per_second, torch)
    vis_pos = torch.stack((base + t_idx, base + row, base + rest - row * wm))
    pos = torch.where(in_group, vis_pos, torch.where(valid, text_pos, 1))
    deltas = comp[:, -1:] + 1 + shift[:, -1:] - s

    if call.validate:
        kind_ok = torch.where(tok_code >= n_img, is_vid, is_img)
        vision = valid & (is_img | is_vid)
        n_frames = call.videos[:, 0].sum() if call.variant == "qwen3_vl" else n_vid
        bad = torch.stack((
            (call.images[:, 0] < 1).any() | (call.images[:, 1:] < call.merge).any(),
            (call.videos[:, 0] < 1).any() | (call.videos[:, 1:] < call.merge).any(),
            (call.secs < 0).any() if call.secs is not None else torch.zeros((), dtype=torch.bool, device=dev),
            start_img.sum() > n_img,
            start_vid.sum() > n_frames,
            (in_group & ~kind_ok).any(),
            (vision & ~in_group).any(),
            in_group.sum() != torch.where(start, g_len[code], 0).sum(),
        )).any()
        if bool(bad):  # the one host read
            _bad_grids(call, int(n_frames), int(start_img.sum()), int(start_vid.sum()))
            raise _malformed(
                int(vision.sum()), int(in_group.sum()), int((in_group & ~kind_ok).sum()),
                int(torch.where(start, g_len[code], 0).sum()),
            )
    return pos.to(ids.dtype), deltas


# ------------------------------------------------------------------------------- host (CPU) ---
def _host(call: _Call) -> tuple[Tensor, Tensor]:
    """NumPy on the CPU tensors' memory: per-token work is a handful of passes, per-group work is
    on arrays of one entry per group. Falls back to :func:`_device` (which handles any mask and
    explains malformed input) when padding interrupts a group or a run is malformed."""
    ids = call.ids.numpy() if call.ids.dtype == torch.int64 else call.ids.long().numpy()
    b, s = ids.shape
    flat_ids = ids.reshape(-1)
    valid = None if call.mask is None else call.mask.numpy() == 1
    flat_valid = None if valid is None else valid.reshape(-1)
    images, videos = call.images.numpy(), call.videos.numpy()
    n_img, n_vid = images.shape[0], videos.shape[0]
    grids = np.concatenate((images, videos))
    g_t, g_h, g_w = grids[:, 0], grids[:, 1] // call.merge, grids[:, 2] // call.merge
    n_frames = n_vid
    if call.variant == "qwen3_vl":
        n_frames = int(g_t[n_img:].sum())
        g_t = g_t.copy()
        g_t[n_img:] = 1  # every frame is its own (1, h, w) group
    secs = None if call.secs is None else call.secs.numpy()

    # groups: a vision token right after a vision_start, both unpadded, in one row
    at = np.flatnonzero(flat_ids == call.start_id) + 1  # flat index of the token after
    at = at[at % s != 0] if s else at
    if flat_valid is not None:
        at = at[flat_valid[at - 1]]
        if not flat_valid[at].all():
            return _device(_with_validation(call))  # padding between vision_start and its tokens
    nxt = flat_ids[at]
    kind_vid = nxt == call.video_id
    at = at[kind_vid | (nxt == call.image_id)]
    kind_vid = flat_ids[at] == call.video_id
    n_start_vid = int(np.count_nonzero(kind_vid))
    n_start_img = len(at) - n_start_vid
    if (
        n_start_img > n_img
        or n_start_vid > n_frames
        or (len(grids) and (grids[:, 0].min() < 1 or min(g_h.min(), g_w.min()) < 1))
        or (secs is not None and len(secs) and secs.min() < 0)
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
    if secs is not None:
        scale = np.concatenate((np.zeros(n_img, dtype=secs.dtype), secs))[code]
        t_last = _t_value(g_t - 1, scale, call.tokens_per_second, np)
    else:
        t_last = g_t - 1
    extent = np.maximum(np.maximum(t_last, g_h - 1), g_w - 1) + 1

    # text positions: unpadded index + the (extent - length) of every group so far
    jump = np.zeros(b * s, dtype=np.int64)
    jump[at] = extent - length
    text_pos = np.cumsum(jump.reshape(b, s), axis=1, out=jump.reshape(b, s))
    shift_last = text_pos[:, -1].copy() if s else np.zeros(b, dtype=np.int64)
    if valid is None:
        comp_last = s - 1
        text_pos += np.arange(s, dtype=np.int64)
    else:
        comp = np.cumsum(valid, axis=1, dtype=np.int64)
        comp_last = (comp[:, -1] if s else 0) - 1
        text_pos += comp
        text_pos -= 1
    pos = np.empty((3, b * s), dtype=np.int64)
    pos[:] = jump

    # vision tokens: each group's L tokens from its first column on, offset o = 0..L-1
    total = int(length.sum())
    gid = np.repeat(np.arange(len(at)), length)
    offset = np.arange(total, dtype=np.int64)
    offset -= (np.cumsum(length) - length)[gid]
    where = at[gid] + offset  # flat index of every vision token
    # a group must end inside its row and before the next group starts
    ends = at + length  # flat index one past each group
    if len(at) and (((ends - 1) // s != at // s).any() or (at[1:] < ends[:-1]).any()):
        return _device(_with_validation(call))
    if ((flat_ids[where] == call.video_id) != np.repeat(kind_vid, length)).any() or (
        flat_valid is not None and not flat_valid[where].all()
    ):
        return _device(_with_validation(call))  # padding inside a group, or a run of the wrong kind
    vision = (flat_ids == call.image_id) | (flat_ids == call.video_id)
    if flat_valid is not None:
        vision &= flat_valid
    n_vision = int(np.count_nonzero(vision))
    if n_vision != total or not vision[where].all():
        raise _malformed(n_vision, total, 0, total)
    base = jump[at] - (extent - length)
    hw, wm = (g_h * g_w)[gid], g_w[gid]
    frame = offset // hw
    rest = offset - frame * hw
    hrow = rest // wm
    b_tok = base[gid]
    pos[0, where] = b_tok + (frame if secs is None else _t_value(frame, scale[gid], call.tokens_per_second, np))
    pos[1, where] = b_tok + hrow
    rest -= hrow * wm
    pos[2, where] = b_tok + rest
    if flat_valid is not None:
        np.copyto(pos, 1, where=~flat_valid[None])
    deltas = comp_last + 1 + shift_last - s
    out = torch.from_numpy(pos).view(3, b, s)
    return (out if call.ids.dtype == torch.int64 else out.to(call.ids.dtype)), torch.from_numpy(deltas).view(b, 1)


def _with_validation(call: _Call) -> _Call:
    return _Call(**{**call.__dict__, "validate": True})
