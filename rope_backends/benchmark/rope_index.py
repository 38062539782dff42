"""The rope_index group: ``positions.rope_index`` against transformers' per-row, per-image loop.

Holds the loop written from transformers 4.x's ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL; :func:`rope_index_loop`, the oracle of tests/test_positions.py and the baseline timed
here), synthetic batches laid out the way the Qwen processors lay tokens out
(:func:`make_batch`), the benchmark's three setups (:data:`SETUPS`), the installed
transformers 5.x's own method as the ``v5`` baseline (:func:`installed_get_rope_index`), and one
timed comparison (:func:`bench_one`: equality of every path with the loop, time of each, host
syncs of one call). :func:`rows` turns the setups into rows of a result document;
bench/studies/rope_index.py is the stand-alone study with every variant and convention.

It lives in the package so an installed wheel can run the group. It must not import
transformers at import time (only :func:`installed_get_rope_index` does), and it contains no
implementation of rope_index: the function measured is :func:`rope_backends.positions.rope_index`.
"""

from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass
from types import MethodType, SimpleNamespace
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import positions

__all__ = ["SETUPS", "Batch", "make_batch", "rope_index_loop", "installed_get_rope_index", "v5_kwargs",
           "mm_types", "bench_one", "rows"]

VISION_START, IMAGE, VIDEO, VISION_END, PAD = 1001, 1002, 1003, 1004, 0
IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START)
MERGE = 2

# the benchmark's setups (also tests/test_positions.py's); "tiny" is for the bench's own tests
SETUPS = {
    "mixed_B2_S4k_8img_2vid": dict(batch=2, seq=4096, images=8, videos=2, frames=8),
    "batch_B4_S8k_16img_4vid": dict(batch=4, seq=8192, images=16, videos=4, frames=8),
    "video_B1_S16k_8vid_T16": dict(batch=1, seq=16384, images=0, videos=8, frames=16, frame_side=(12, 20)),
}
SETUPS_BY_SCALE = {"tiny": {"tiny_B2_S512_2img_1vid": dict(batch=2, seq=512, images=2, videos=1, frames=2)}}


# ------------------------------------------------------------------ the oracle (loop) -----------
def rope_index_loop(
    input_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    *,
    spatial_merge_size=MERGE,
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VISION_START,
    variant="qwen3_vl",
    second_per_grid_ts=None,
    tokens_per_second=2,
    truncate_seconds=True,
):
    """One row, one image, one frame at a time, as transformers 4.x does it (host reads included).
    ``input_ids [B, S]``; returns ``position_ids [3, B, S]`` and ``deltas [B, 1]``."""
    batch, seq = input_ids.shape
    dev = input_ids.device
    if image_grid_thw is None and video_grid_thw is None:
        if attention_mask is None:
            pos = torch.arange(seq, device=dev).view(1, 1, -1).expand(3, batch, -1)
            return pos, torch.zeros((batch, 1), device=dev, dtype=input_ids.dtype)
        pos = attention_mask.long().cumsum(-1) - 1
        pos.masked_fill_(attention_mask == 0, 1)
        pos = pos.unsqueeze(0).expand(3, -1, -1)
        return pos, pos.max(0)[0].max(-1, keepdim=True)[0] + 1 - seq
    if video_grid_thw is not None and variant == "qwen3_vl":
        # a video of T frames is T (1, h, w) grids: timestamps separate the frames in the text
        video_grid_thw = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
        video_grid_thw[:, 0] = 1
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = torch.ones(3, batch, seq, dtype=input_ids.dtype, device=dev)
    next_image, next_video = 0, 0
    deltas = []
    for row in range(batch):
        keep = attention_mask[row] == 1
        tokens_t = input_ids[row][keep]
        after_start = tokens_t[torch.argwhere(tokens_t == vision_start_token_id).squeeze(1) + 1]
        n_images = int((after_start == image_token_id).sum())
        n_videos = int((after_start == video_token_id).sum())
        tokens = tokens_t.tolist()
        pieces = []
        cursor = 0
        images_left, videos_left = n_images, n_videos
        for _ in range(n_images + n_videos):
            at_image = tokens.index(image_token_id, cursor) if image_token_id in tokens and images_left > 0 else len(tokens) + 1
            at_video = tokens.index(video_token_id, cursor) if video_token_id in tokens and videos_left > 0 else len(tokens) + 1
            if at_image < at_video:
                t, h, w = image_grid_thw[next_image]
                seconds = 0
                next_image += 1
                images_left -= 1
                at = at_image
            else:
                t, h, w = video_grid_thw[next_video]
                seconds = second_per_grid_ts[next_video] if second_per_grid_ts is not None else 1.0
                next_video += 1
                videos_left -= 1
                at = at_video
            gt, gh, gw = t.item(), h.item() // spatial_merge_size, w.item() // spatial_merge_size
            text_len = at - cursor
            first = pieces[-1].max() + 1 if pieces else 0
            pieces.append(torch.arange(text_len).view(1, -1).expand(3, -1) + first)
            frame = torch.arange(gt).view(-1, 1).expand(-1, gh * gw)
            if variant == "qwen2_5_vl":
                if truncate_seconds:  # transformers 4.5x-4.57 normalise to int64 on the host
                    seconds = torch.as_tensor(seconds, dtype=frame.dtype, device=frame.device)
                elif isinstance(seconds, torch.Tensor):
                    seconds = seconds.to(frame.device)
                t_index = (frame * seconds * tokens_per_second).long().flatten()
            else:
                t_index = frame.flatten()
            h_index = torch.arange(gh).view(1, -1, 1).expand(gt, -1, gw).flatten()
            w_index = torch.arange(gw).view(1, 1, -1).expand(gt, gh, -1).flatten()
            pieces.append(torch.stack([t_index, h_index, w_index]) + text_len + first)
            cursor = at + gt * gh * gw
        if cursor < len(tokens):
            first = pieces[-1].max() + 1 if pieces else 0
            pieces.append(torch.arange(len(tokens) - cursor).view(1, -1).expand(3, -1) + first)
        row_pos = torch.cat(pieces, dim=1).reshape(3, -1)
        position_ids[..., row, keep] = row_pos.to(dev)
        deltas.append(row_pos.max() + 1 - len(input_ids[row]))
    return position_ids, torch.tensor(deltas, device=dev).unsqueeze(1)


# ------------------------------------------------------------------ synthetic batches ------------
@dataclass
class Batch:
    """One synthetic batch: ``input_ids [B, S]``, ``attention_mask [B, S]`` or None, grids
    ``[num, 3]`` or None, ``second_per_grid_ts [videos]`` (qwen2_5_vl) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    video_grid_thw: torch.Tensor | None
    second_per_grid_ts: torch.Tensor | None
    variant: str

    def kwargs(self, **extra):
        """The keyword arguments of a 4.x-convention ``rope_index`` / loop call on this batch."""
        out = dict(
            image_grid_thw=self.image_grid_thw,
            video_grid_thw=self.video_grid_thw,
            attention_mask=self.attention_mask,
            variant=self.variant,
            spatial_merge_size=MERGE,
            **IDS,
        )
        if self.variant == "qwen2_5_vl":
            out["second_per_grid_ts"] = self.second_per_grid_ts
        out.update(extra)
        return out

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.attention_mask), move(self.image_grid_thw),
            move(self.video_grid_thw), move(self.second_per_grid_ts), self.variant,
        )


def make_batch(
    batch: int,
    seq: int,
    images: int,
    videos: int,
    frames: int = 8,
    *,
    variant: str = "qwen3_vl",
    padding: str | None = None,  # None (full rows, no mask), "left", "right", "mixed"
    image_side=(4, 28),  # h, w in patches (multiples of MERGE are drawn from this range)
    frame_side=(8, 16),
    seconds=(0.5, 1.0, 2.0, 1.5, 1 / 3),
    image_t=(1,),  # temporal grids of an image (drawn from these; the processors use 1)
    seed: int = 0,
    grids: bool = True,
) -> Batch:
    """``images``/``videos`` are totals over the batch, dealt round-robin to the rows. Qwen3-VL
    videos get timestamp text + vision_start + one frame's tokens + vision_end per frame; the
    Qwen2 variants one vision_start + all frames. Rows are filled with random text to their
    length (``seq`` or, with padding, a ragged shorter length); pad tokens fill the rest."""
    rng = random.Random(seed)
    text = lambda n: [rng.randrange(10, 1000) for _ in range(n)]  # noqa: E731
    side = lambda lo_hi: MERGE * rng.randrange(lo_hi[0] // MERGE, lo_hi[1] // MERGE + 1)  # noqa: E731
    image_rows, video_rows, secs = [], [], []
    rows_ = []
    for b in range(batch):
        length = seq if padding is None or b == 0 else seq - rng.randrange(1, seq // 4)
        items = ["image"] * len(range(b, images, batch)) + ["video"] * len(range(b, videos, batch))
        rng.shuffle(items)
        chunks = []
        for kind in items:
            if kind == "image":
                h, w, t = side(image_side), side(image_side), rng.choice(image_t)
                image_rows.append((t, h, w))
                chunks.append([VISION_START] + [IMAGE] * (t * (h // MERGE) * (w // MERGE)) + [VISION_END])
            else:
                h, w = side(frame_side), side(frame_side)
                video_rows.append((frames, h, w))
                secs.append(seconds[len(secs) % len(seconds)])
                per_frame = (h // MERGE) * (w // MERGE)
                if variant == "qwen3_vl":
                    chunk = []
                    for _ in range(frames):  # "<12.5 seconds>" as text, then the frame
                        chunk += text(rng.randrange(3, 7)) + [VISION_START] + [VIDEO] * per_frame + [VISION_END]
                else:
                    chunk = [VISION_START] + [VIDEO] * (frames * per_frame) + [VISION_END]
                chunks.append(chunk)
        used = sum(len(c) for c in chunks)
        if used > length:
            raise ValueError(f"make_batch: row {b} needs {used} tokens, has {length}")
        cuts = sorted(rng.randrange(0, length - used + 1) for _ in range(len(chunks)))
        gaps = [hi - lo for lo, hi in zip([0] + cuts, cuts + [length - used])]
        row = []
        for gap, chunk in zip(gaps, chunks):
            row += text(gap) + chunk
        row += text(gaps[-1])
        rows_.append(row)
    ids = torch.full((batch, seq), PAD, dtype=torch.int64)
    mask = torch.zeros((batch, seq), dtype=torch.int64)
    for b, row in enumerate(rows_):
        left = padding == "left" or (padding == "mixed" and b % 2)
        lo = seq - len(row) if left else 0
        ids[b, lo : lo + len(row)] = torch.tensor(row)
        mask[b, lo : lo + len(row)] = 1
    as_grid = lambda r: torch.tensor(r, dtype=torch.int64).view(-1, 3)  # noqa: E731
    return Batch(
        ids,
        None if padding is None else mask,
        as_grid(image_rows) if grids and (images or not videos) else None,
        as_grid(video_rows) if grids and videos else None,
        torch.tensor(secs, dtype=torch.float32) if videos and variant == "qwen2_5_vl" else None,
        variant,
    )


# ------------------------------------------------------------------ transformers 5.x convention --
def mm_types(batch: Batch) -> torch.Tensor:
    """mm_token_type_ids as the 5.x processors build it: 1 for image tokens, 2 for video tokens."""
    return (batch.input_ids == IMAGE).long() + 2 * (batch.input_ids == VIDEO).long()


def v5_kwargs(batch: Batch, **extra):
    """The keyword arguments of a 5.x-convention ``rope_index`` call on this batch."""
    kw = batch.kwargs(**extra)
    for key in ("image_token_id", "video_token_id", "vision_start_token_id"):
        kw.pop(key)
    kw["mm_token_type_ids"] = mm_types(batch)
    return kw


def installed_get_rope_index(variant: str, tokens_per_second=2) -> Callable | None:
    """The installed transformers' own ``get_rope_index`` (5.x), called unbound on the two
    attributes it reads (``config.vision_config`` and ``get_vision_position_ids``), as
    ``run(batch, second_per_grid_ts=None, attention_mask="batch")``; None without a transformers
    5.x."""
    try:
        import transformers
    except ImportError:
        return None
    if int(transformers.__version__.split(".")[0]) < 5:
        return None
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    model = {"qwen3_vl": Qwen3VLModel, "qwen2_vl": Qwen2VLModel, "qwen2_5_vl": Qwen2_5_VLModel}[variant]
    vision = SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=tokens_per_second)
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=vision))
    fake.get_vision_position_ids = MethodType(model.get_vision_position_ids, fake)

    def run(batch: Batch, second_per_grid_ts=None, attention_mask="batch"):
        clone = lambda t: None if t is None else t.clone()  # noqa: E731  (video grids are edited in place)
        kw = dict(image_grid_thw=clone(batch.image_grid_thw), video_grid_thw=clone(batch.video_grid_thw),
                  attention_mask=clone(batch.attention_mask if attention_mask == "batch" else attention_mask))
        if variant == "qwen2_5_vl":
            kw["second_per_grid_ts"] = second_per_grid_ts
        return model.get_rope_index(fake, batch.input_ids.clone(), mm_types(batch), **kw)

    return run


# ------------------------------------------------------------------ measuring --------------------
_READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in _READ_OPS:
            self.count += 1
        elif name == "index" and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(fn) -> int:
    """CPU: host reads the code makes (what would be syncs on a GPU)."""
    real_tolist = torch.Tensor.tolist
    calls = [0]

    def tolist(self):
        calls[0] += 1
        return real_tolist(self)

    torch.Tensor.tolist = tolist
    try:
        with _HostReads() as mode:
            fn()
    finally:
        torch.Tensor.tolist = real_tolist
    return mode.count + calls[0]


def count_cuda_syncs(fn) -> int:
    """CUDA: the synchronisations one call makes (``torch.cuda.set_sync_debug_mode("warn")``)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def time_ms(fn, device: str, iters: int, repeats: int) -> float:
    """Best over ``repeats`` of the mean time of ``iters`` back-to-back calls (the minimum is the
    sample least disturbed by other work on the machine, as timeit advises)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / iters * 1e3)
    return min(samples)


def _loop_for(batch: Batch, convention: str):
    """The baseline: the 4.x loop oracle, or the installed transformers 5.x method (None: absent)."""
    if convention == "v4":
        return lambda: rope_index_loop(batch.input_ids, **batch.kwargs())
    run = installed_get_rope_index(batch.variant)
    if run is None:
        return None
    return lambda: run(batch, batch.second_per_grid_ts)


def bench_one(name, spec, variant, device, quick, *, convention="v4", paths=("auto", "device", "host")):
    """One setup: a result row (None when the v5 baseline is unavailable). ``vectorised_ms`` /
    ``syncs_vectorised`` repeat the first path's figures (what the engine's rows read)."""
    batch = make_batch(**spec, variant=variant, padding="mixed", seed=1).to(device)
    loop = _loop_for(batch, convention)
    if loop is None:
        return None
    kw = batch.kwargs() if convention == "v4" else v5_kwargs(batch)
    want = loop()
    loop_iters, vec_iters, repeats = (2, 20, 3) if quick else (3, 50, 9)
    row = dict(
        setup=name, variant=variant, convention=convention, device=device, batch=spec["batch"], seq=spec["seq"],
        tokens=spec["batch"] * spec["seq"], images=spec["images"], videos=spec["videos"], frames=spec.get("frames"),
        vision_tokens=int(((batch.input_ids == IMAGE) | (batch.input_ids == VIDEO)).sum()),
        host_path_max_tokens=positions.HOST_PATH_MAX_TOKENS,
        # what path="auto" does here (CPU inputs: always the NumPy path)
        auto_takes="host" if device == "cpu" or spec["batch"] * spec["seq"] <= positions.HOST_PATH_MAX_TOKENS else "device",
        loop_ms=time_ms(loop, device, loop_iters, repeats),
    )
    count = count_cuda_syncs if device == "cuda" else count_host_reads
    row["syncs_loop"] = count(loop)
    equal = True
    for path in paths:
        fn = lambda: positions.rope_index(batch.input_ids, **kw, path=path)  # noqa: E731
        got = fn()
        equal = equal and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(want, got))
        row[f"{path}_ms"] = time_ms(fn, device, vec_iters, repeats)
        row[f"{path}_speedup"] = row["loop_ms"] / row[f"{path}_ms"]
        row[f"syncs_{path}"] = count(fn)
    row["equal"] = bool(equal)
    row["vectorised_ms"], row["syncs_vectorised"] = row[f"{paths[0]}_ms"], row[f"syncs_{paths[0]}"]
    row["speedup"] = row["loop_ms"] / row["vectorised_ms"]
    return row


def rows(device: torch.device, scale: str, skipped: list, show: Callable[[str], None]) -> list[dict]:
    """The group's rows of a result document (quick mode of :func:`bench_one`, qwen3_vl, v4):
    per setup the loop and ``rope_index``; a setup that fails is listed in ``skipped``."""
    out = []
    for name, setup in SETUPS_BY_SCALE.get(scale, SETUPS).items():
        show(f"rope_index {name}")
        try:
            # its quick mode: the full rope_index study is bench/studies/rope_index.py
            r = bench_one(name, setup, "qwen3_vl", device.type, True)
        except Exception as exc:
            skipped.append({"group": "rope_index", "scenario": name, "reason": f"failed: {type(exc).__name__}: {exc}"})
            continue
        shape = f"B={r['batch']} S={r['seq']} img={r['images']} vid={r['videos']}"
        common = {"group": "rope_index", "scenario": name, "op": "rope_index", "shape": shape, "dtype": "int64",
                  "layout": "-", "tokens": r["batch"] * r["seq"], "timing": "perf_counter", "gbps": None,
                  "pct_copy": None, "bytes": None, "buffers": 1}
        out.append(dict(common, implementation="loop (transformers 4.x style)", kind="peer",
                        us=r["loop_ms"] * 1e3, bit_exact=True, host_syncs=r["syncs_loop"],
                        note="the oracle of tests/test_positions.py"))
        out.append(dict(common, implementation="rope_backends.positions.rope_index", kind="backend",
                        us=r["vectorised_ms"] * 1e3, bit_exact=bool(r["equal"]), host_syncs=r["syncs_vectorised"],
                        note="equal to the loop (bit_exact column); host syncs of one call (CUDA: sync debug warnings; CPU: the host reads a GPU would wait for)"))
    return out
