"""rope_backends.positions.rope_index == a per-row, per-image loop written from transformers' 4.x
``get_rope_index`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), element for element, on synthetic batches
built the way the Qwen processors lay tokens out.

The loop (``rope_index_loop``) is the oracle and also the baseline the benchmark's rope_index group
times; ``make_batch`` builds the inputs for both. Both live in rope_backends.benchmark.rope_index (so
an installed wheel can run that group). When a transformers 4.x is importable, the oracle itself is
checked against transformers' own methods.
"""

from __future__ import annotations

import importlib.util
import os
import random
import zlib
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rope_backends as rb
from rope_backends import mrope, positions
from rope_backends.benchmark.rope_index import (  # noqa: F401  (the oracle, the batches, the setups)
    IDS, IMAGE, MERGE, PAD, SETUPS, VIDEO, VISION_START, Batch, installed_get_rope_index, make_batch, mm_types,
    rope_index_loop, v5_kwargs,
)

# the edge cases, next to the benchmark's setups (SETUPS)
EDGES = {
    "no_vision_grids_none_mask": dict(batch=3, seq=300, images=0, videos=0, padding="mixed", grids=False),
    "no_vision_grids_none_nomask": dict(batch=3, seq=300, images=0, videos=0, grids=False),
    "no_vision_empty_grids": dict(batch=3, seq=300, images=0, videos=0, padding="right"),
    "no_mask": dict(batch=3, seq=2048, images=5, videos=2, frames=3),
    "ragged_left": dict(batch=4, seq=2048, images=6, videos=3, frames=4, padding="left"),
    "ragged_right": dict(batch=4, seq=2048, images=6, videos=3, frames=4, padding="right"),
    "ragged_mixed": dict(batch=5, seq=2048, images=3, videos=4, frames=2, padding="mixed"),
    "some_rows_text_only": dict(batch=6, seq=1024, images=2, videos=1, frames=2, padding="mixed"),
    "images_only": dict(batch=2, seq=2048, images=6, videos=0, padding="left"),
    "videos_only": dict(batch=2, seq=2048, images=0, videos=3, frames=5, padding="right"),
}
VARIANTS = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")


def device_path(input_ids, **kw):
    """The sync-free torch path that serves GPU tensors, forced on CPU tensors (validating,
    unless told otherwise)."""
    return positions.rope_index(input_ids, **{"validate": True, **kw, "path": "device"})


def assert_same(got, want):
    for g, w, name in zip(got, want, ("position_ids", "mrope_position_deltas")):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        if not torch.equal(g, w):
            bad = (g != w).nonzero()[0].tolist()
            raise AssertionError(f"{name}: first difference at {bad}: {g[tuple(bad)]} != {w[tuple(bad)]}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(SETUPS) + list(EDGES))
def test_matches_loop(case, variant):
    spec = dict(SETUPS.get(case) or EDGES[case])
    if case in SETUPS:
        spec["padding"] = "mixed"  # the benchmark's setups, with ragged rows on top
    batch = make_batch(**spec, variant=variant, seed=zlib.crc32(case.encode()) % 1000)
    want = rope_index_loop(batch.input_ids, **batch.kwargs())
    assert_same(positions.rope_index(batch.input_ids, **batch.kwargs()), want)  # host (NumPy) path
    assert_same(device_path(batch.input_ids, **batch.kwargs()), want)  # the GPU path, run on CPU


def with_holes(batch: Batch, holes: int, seed: int) -> Batch:
    """Insert padded columns inside every row: right after a vision_start, inside a vision run,
    and at random places (transformers compacts rows through the mask, so positions must not
    change for the unpadded tokens)."""
    rng = random.Random(seed)
    rows, masks = [], []
    for row in batch.input_ids.tolist():
        starts = [i for i, tok in enumerate(row) if tok == VISION_START]
        cuts = [starts[0] + 1, starts[-1] + 3] if starts else []
        cuts += [rng.randrange(1, len(row)) for _ in range(holes - len(cuts))]
        new_row, mask = list(row), [1] * len(row)
        for cut in sorted(cuts, reverse=True):
            new_row.insert(cut, PAD)
            mask.insert(cut, 0)
        rows.append(new_row)
        masks.append(mask)
    return Batch(torch.tensor(rows), torch.tensor(masks), batch.image_grid_thw, batch.video_grid_thw,
                 batch.second_per_grid_ts, batch.variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_inside_rows(variant, monkeypatch):
    batch = with_holes(make_batch(3, 1500, 4, 3, frames=3, variant=variant, seed=9), holes=12, seed=9)
    want = rope_index_loop(batch.input_ids, **batch.kwargs())
    assert_same(device_path(batch.input_ids, **batch.kwargs()), want)
    fallbacks = []
    real = positions._device
    monkeypatch.setattr(positions, "_device", lambda call: fallbacks.append(1) or real(call))
    assert_same(positions.rope_index(batch.input_ids, **batch.kwargs()), want)
    assert fallbacks == [1]  # the host path handed the interrupted groups to the general path


@pytest.mark.parametrize("case", list(SETUPS))
def test_setups_without_mask(case):
    batch = make_batch(**SETUPS[case], seed=7)
    assert batch.attention_mask is None
    assert_same(positions.rope_index(batch.input_ids, **batch.kwargs()), rope_index_loop(batch.input_ids, **batch.kwargs()))


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("tokens_per_second", [2, 4, 2.0, 25])
def test_qwen2_5_seconds(truncate, tokens_per_second):
    batch = make_batch(3, 2048, 2, 5, frames=6, variant="qwen2_5_vl", padding="mixed", seed=3,
                       seconds=(0.5, 1 / 3, 1.5, 2.0, 0.083))
    kw = batch.kwargs(tokens_per_second=tokens_per_second, truncate_seconds=truncate)
    assert_same(positions.rope_index(batch.input_ids, **kw), rope_index_loop(batch.input_ids, **kw))
    kw["second_per_grid_ts"] = None  # transformers' default: 1.0 per video
    assert_same(positions.rope_index(batch.input_ids, **kw), rope_index_loop(batch.input_ids, **kw))
    kw["second_per_grid_ts"] = batch.second_per_grid_ts.double()
    assert_same(positions.rope_index(batch.input_ids, **kw), rope_index_loop(batch.input_ids, **kw))


@pytest.mark.parametrize("seed", range(24))
def test_random_small_batches(seed):
    """Many small random layouts: both paths == the loop, every variant and padding style."""
    rng = random.Random(seed)
    variant = VARIANTS[seed % 3]
    batch = make_batch(
        rng.randrange(1, 5), 400, rng.randrange(0, 6), rng.randrange(0, 4), frames=rng.randrange(1, 4),
        variant=variant, padding=rng.choice([None, "left", "right", "mixed"]), image_side=(2, 12),
        frame_side=(2, 10), image_t=(1, 2), seconds=(0.5, 2.0, 1 / 3, 0.0), seed=seed,
    )
    if rng.random() < 0.3 and batch.attention_mask is None:
        batch = with_holes(batch, holes=4, seed=seed)
    kw = batch.kwargs(truncate_seconds=rng.random() < 0.5) if variant == "qwen2_5_vl" else batch.kwargs()
    want = rope_index_loop(batch.input_ids, **kw)
    assert_same(positions.rope_index(batch.input_ids, **kw), want)
    assert_same(device_path(batch.input_ids, **kw), want)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (1, 1), (0, 0)])
def test_empty_shapes(shape):
    ids = torch.zeros(shape, dtype=torch.long)
    kw = dict(image_grid_thw=torch.zeros(0, 3, dtype=torch.long), attention_mask=torch.ones(shape), **IDS)
    for got in (positions.rope_index(ids, **kw), device_path(ids, **kw)):
        assert got[0].shape == (3, *shape) and got[1].shape == (shape[0], 1)


def test_fractional_seconds_change_positions():
    """The truncation flag is not a no-op: 0.5 s per grid truncates to 0 (all frames at t=0)."""
    batch = make_batch(1, 512, 0, 1, frames=4, variant="qwen2_5_vl", seconds=(0.5,))
    kw = batch.kwargs()
    trunc = positions.rope_index(batch.input_ids, **kw)[0]
    exact = positions.rope_index(batch.input_ids, **kw, truncate_seconds=False)[0]
    video = batch.input_ids[0] == VIDEO
    base = trunc[0, 0, video].min()
    assert set((trunc[0, 0, video] - base).tolist()) == {0}
    assert set((exact[0, 0, video] - base).tolist()) == {0, 1, 2, 3}


def test_int32_ids_and_bool_mask():
    batch = make_batch(3, 1024, 3, 2, frames=3, padding="mixed", seed=11)
    kw = batch.kwargs(attention_mask=batch.attention_mask.bool())
    got = positions.rope_index(batch.input_ids.to(torch.int32), **kw)
    # positions come in input_ids' dtype, as transformers declares (its own loop cannot write
    # int64 row positions into an int32 tensor, so compare against the int64 run)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64
    want = rope_index_loop(batch.input_ids, **kw)
    assert_same((got[0].long(), got[1]), want)


def test_exported_names():
    assert mrope.rope_index is positions.rope_index
    assert rb.positions.rope_index is positions.rope_index


# ------------------------------------------------------------------ no host reads ----------------
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave", "item"}


class _HostReads(TorchDispatchMode):
    """Counts the ops that read device memory on the host on a GPU (``.item()``, ``.tolist()``,
    boolean indexing, data-dependent output sizes)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
            if i is not None
        )
        if name in SYNCING_OPS or bool_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_host_reads(variant):
    batch = make_batch(3, 2048, 4, 2, frames=4, variant=variant, padding="mixed", seed=5)
    with _HostReads() as mode:  # the path GPU tensors take
        device_path(batch.input_ids, **batch.kwargs(validate=False))
    assert mode.reads == []
    with _HostReads() as mode:  # validation: exactly one read of one bool
        device_path(batch.input_ids, **batch.kwargs(validate=True))
    assert mode.reads == ["_local_scalar_dense"]
    with _HostReads() as mode:  # the oracle, for contrast: reads per row, image and frame
        rope_index_loop(batch.input_ids, **batch.kwargs())
    assert len(mode.reads) > 20


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_on_meta(variant):
    """Every shape is known without reading data: the whole computation runs on the meta device."""
    batch = make_batch(2, 512, 2, 1, frames=2, variant=variant, padding="left", seed=2).to("meta")
    pos, deltas = positions.rope_index(batch.input_ids, **batch.kwargs(validate=False))  # meta: the device path
    assert pos.shape == (3, 2, 512) and deltas.shape == (2, 1) and pos.device.type == "meta"


# ------------------------------------------------------------------ errors -----------------------
@pytest.mark.parametrize("path", ["host", "device"])
def test_errors(path, monkeypatch):
    batch = make_batch(2, 512, 2, 1, frames=2, padding="right", seed=4)
    ids, kw = batch.input_ids, batch.kwargs()
    if path == "device":
        monkeypatch.setattr(positions, "_host", lambda call: positions._device(positions._with_validation(call)))
    with pytest.raises(ValueError, match="image_grid_thw: expected a row for each of the 2 images"):
        positions.rope_index(ids, **{**kw, "image_grid_thw": batch.image_grid_thw[:1]})
    with pytest.raises(ValueError, match="video_grid_thw: expected grids for the 2 video frames"):
        positions.rope_index(ids, **{**kw, "video_grid_thw": batch.video_grid_thw * torch.tensor([0, 1, 1]) + torch.tensor([1, 0, 0])})
    with pytest.raises(ValueError, match="input_ids: expected every image/video token"):
        grid = batch.image_grid_thw.clone()
        grid[0, 1] += 2 * MERGE  # the grid now wants more tokens than the run has
        positions.rope_index(ids, **{**kw, "image_grid_thw": grid})
    stray = ids.clone()
    stray[0, (batch.attention_mask[0] == 1).nonzero()[-1]] = IMAGE  # an image token outside a group
    with pytest.raises(ValueError, match="input_ids: expected every image/video token"):
        positions.rope_index(stray, **kw)
    with pytest.raises(ValueError, match="spatial_merge_size=2"):
        positions.rope_index(ids, **{**kw, "image_grid_thw": batch.image_grid_thw * torch.tensor([1, 0, 1])})
    with pytest.raises(ValueError, match="variant: expected one of"):
        positions.rope_index(ids, **{**kw, "variant": "qwen4"})
    with pytest.raises(ValueError, match=r"input_ids: expected shape \[B, S\]"):
        positions.rope_index(ids[0], **kw)
    with pytest.raises(TypeError, match="input_ids: expected an integer dtype"):
        positions.rope_index(ids.float(), **kw)
    with pytest.raises(ValueError, match=r"image_grid_thw: expected shape \[num, 3\]"):
        positions.rope_index(ids, **{**kw, "image_grid_thw": batch.image_grid_thw[:, :2]})
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        positions.rope_index(ids, **{**kw, "attention_mask": batch.attention_mask[:, :-1]})
    with pytest.raises(ValueError, match="second_per_grid_ts: only used by variant 'qwen2_5_vl'"):
        positions.rope_index(ids, **{**kw, "second_per_grid_ts": torch.ones(1)})
    with pytest.raises(ValueError, match=r"second_per_grid_ts: expected shape \(1,\)"):
        positions.rope_index(ids, **{**kw, "variant": "qwen2_5_vl", "second_per_grid_ts": torch.ones(3)})
    with pytest.raises(TypeError, match="image_token_id: expected an int"):
        positions.rope_index(ids, **{**kw, "image_token_id": 1002.0})


# ------------------------------------------------------------------ the oracle vs transformers ---
def _transformers_4():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip(f"transformers {transformers.__version__}: the 5.x get_rope_index takes mm_token_type_ids")
    return transformers


@pytest.mark.parametrize("variant", VARIANTS)
def test_oracle_matches_installed_transformers(variant):
    """Optional: runs where a transformers 4.x is importable (checked with 4.57.6)."""
    _transformers_4()
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    model = {"qwen3_vl": Qwen3VLModel, "qwen2_vl": Qwen2VLModel, "qwen2_5_vl": Qwen2_5_VLModel}[variant]
    vision = SimpleNamespace(spatial_merge_size=MERGE, tokens_per_second=2)
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=vision, **IDS))
    for case, spec in list(EDGES.items())[2:] + [("mixed", SETUPS["mixed_B2_S4k_8img_2vid"])]:
        batch = make_batch(**spec, variant=variant, seed=1)
        kw = dict(image_grid_thw=batch.image_grid_thw, video_grid_thw=batch.video_grid_thw, attention_mask=batch.attention_mask)
        if variant == "qwen2_5_vl":
            kw["second_per_grid_ts"] = batch.second_per_grid_ts
        theirs = model.get_rope_index(fake, batch.input_ids.clone(), **{k: (v.clone() if v is not None else v) for k, v in kw.items()})
        assert_same(rope_index_loop(batch.input_ids, **batch.kwargs()), theirs)
        assert_same(positions.rope_index(batch.input_ids, **batch.kwargs()), theirs)


# ------------------------------------------------------------------ transformers 5.x convention --
def transformers_5_rope_index(variant: str, tokens_per_second=2):
    run = installed_get_rope_index(variant, tokens_per_second)
    if run is None:
        if os.environ.get("LANE_DEVICE") and importlib.util.find_spec("transformers") is None:
            raise ImportError("transformers: a CI lane installs the test extra (transformers 5.x)")
        pytest.skip("needs transformers 5.x (its get_rope_index takes mm_token_type_ids)")
    return run


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(SETUPS) + list(EDGES))
def test_v5_matches_installed_transformers(case, variant):
    theirs = transformers_5_rope_index(variant)
    spec = dict(SETUPS.get(case) or EDGES[case])
    if case in SETUPS:
        spec["padding"] = "mixed"
    batch = make_batch(**spec, variant=variant, seed=zlib.crc32(case.encode()) % 1000)
    want = theirs(batch, batch.second_per_grid_ts)
    kw = v5_kwargs(batch)
    assert_same(positions.rope_index(batch.input_ids, **kw), want)  # host (NumPy) path
    assert_same(device_path(batch.input_ids, **kw), want)  # the GPU path, run on CPU
    # types derived from the token ids, as the processors do
    derived = dict(kw, mm_token_type_ids=None, image_token_id=IMAGE, video_token_id=VIDEO, convention="v5")
    assert_same(positions.rope_index(batch.input_ids, **derived), want)
    assert_same(device_path(batch.input_ids, **derived), want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_v5_differs_from_v4_where_transformers_changed(variant):
    """The conventions are not the same function: 5.x pads with 0, subtracts the unpadded length
    and (Qwen2 variants) does not advance text past a video's frames."""
    batch = make_batch(3, 1024, 2, 2, frames=6, variant=variant, padding="mixed", seed=21, frame_side=(2, 4))
    v4 = positions.rope_index(batch.input_ids, **batch.kwargs())
    v5 = positions.rope_index(batch.input_ids, **v5_kwargs(batch))
    pad = batch.attention_mask == 0
    assert bool((v4[0][:, pad] == 1).all()) and bool((v5[0][:, pad] == 0).all())
    assert not torch.equal(v4[1], v5[1])
    if variant != "qwen3_vl":  # frames (6) outnumber the grid side (<= 2): 4.x advances by 6, 5.x by 2
        assert not torch.equal(v4[0][:, ~pad], v5[0][:, ~pad])


@pytest.mark.parametrize("variant", VARIANTS)
def test_v5_padding_inside_rows(variant):
    theirs = transformers_5_rope_index(variant)
    batch = with_holes(make_batch(3, 1500, 4, 3, frames=3, variant=variant, seed=9), holes=12, seed=9)
    want = theirs(batch, batch.second_per_grid_ts)
    assert_same(positions.rope_index(batch.input_ids, **v5_kwargs(batch)), want)
    assert_same(device_path(batch.input_ids, **v5_kwargs(batch)), want)
    # 5.x reads the mask as bool: any non-zero value is a token
    mask = batch.attention_mask * 3
    want = theirs(batch, batch.second_per_grid_ts, attention_mask=mask)
    assert_same(positions.rope_index(batch.input_ids, **v5_kwargs(batch, attention_mask=mask)), want)
    assert_same(device_path(batch.input_ids, **v5_kwargs(batch, attention_mask=mask)), want)


@pytest.mark.parametrize("tokens_per_second", [2, 25, 2.0, 4.5])
def test_v5_qwen2_5_seconds(tokens_per_second):
    theirs = transformers_5_rope_index("qwen2_5_vl", tokens_per_second)
    batch = make_batch(3, 2048, 2, 5, frames=6, variant="qwen2_5_vl", padding="mixed", seed=3,
                       seconds=(0.5, 1 / 3, 1.5, 2.0, 0.083))
    for secs in (batch.second_per_grid_ts, batch.second_per_grid_ts.double(), None,
                 batch.second_per_grid_ts.tolist()):
        want = theirs(batch, secs)
        kw = v5_kwargs(batch, second_per_grid_ts=secs, tokens_per_second=tokens_per_second)
        assert_same(positions.rope_index(batch.input_ids, **kw), want)
        assert_same(device_path(batch.input_ids, **kw), want)


@pytest.mark.parametrize("seed", range(18))
def test_v5_random_small_batches(seed):
    rng = random.Random(seed)
    variant = VARIANTS[seed % 3]
    theirs = transformers_5_rope_index(variant)
    batch = make_batch(
        rng.randrange(1, 5), 400, rng.randrange(0, 6), rng.randrange(0, 4), frames=rng.randrange(1, 4),
        variant=variant, padding=rng.choice([None, "left", "right", "mixed"]), image_side=(2, 12),
        frame_side=(2, 10), image_t=(1, 2), seconds=(0.5, 2.0, 1 / 3, 0.0), seed=seed,
    )
    if rng.random() < 0.3 and batch.attention_mask is None:
        batch = with_holes(batch, holes=4, seed=seed)
    if batch.image_grid_thw is None and batch.video_grid_thw is None:
        pytest.skip("text only: covered by the EDGES cases")
    want = theirs(batch, batch.second_per_grid_ts)
    assert_same(positions.rope_index(batch.input_ids, **v5_kwargs(batch)), want)
    assert_same(device_path(batch.input_ids, **v5_kwargs(batch)), want)


@pytest.mark.parametrize("path", ["host", "device"])
def test_v5_errors(path):
    batch = make_batch(2, 512, 2, 1, frames=2, padding="right", seed=4)
    ids, kw = batch.input_ids, v5_kwargs(batch, path=path, validate=True)
    types = kw["mm_token_type_ids"]
    with pytest.raises(ValueError, match="image_grid_thw: expected a row for each of the 2 images"):
        positions.rope_index(ids, **{**kw, "image_grid_thw": batch.image_grid_thw[:1]})
    grid = batch.image_grid_thw.clone()
    grid[0, 1] += 2 * MERGE  # the grid now wants more tokens than the run has
    with pytest.raises(ValueError, match="input_ids: expected every image/video token to sit in a run of equal mm_token_type_ids"):
        positions.rope_index(ids, **{**kw, "image_grid_thw": grid})
    bad = types.clone()
    bad[0, 0] = 3  # audio (Qwen-Omni): not a Qwen-VL type
    with pytest.raises(ValueError, match=r"mm_token_type_ids: expected 0 \(text\), 1 \(image\) or 2 \(video\)"):
        positions.rope_index(ids, **{**kw, "mm_token_type_ids": bad})
    with pytest.raises(ValueError, match="vision_start_token_id: only used by convention 'v4'"):
        positions.rope_index(ids, **{**kw, "vision_start_token_id": VISION_START})
    with pytest.raises(ValueError, match="mm_token_type_ids: only used by convention 'v5'"):
        positions.rope_index(ids, **{**kw, "convention": "v4"})
    with pytest.raises(TypeError, match="mm_token_type_ids: expected a tensor"):
        positions.rope_index(ids, **{**kw, "mm_token_type_ids": None, "convention": "v5"})
    with pytest.raises(ValueError, match="truncate_seconds: expected None or False"):
        positions.rope_index(ids, **{**kw, "truncate_seconds": True})
    with pytest.raises(ValueError, match=r"mm_token_type_ids: expected shape \(2, 512\)"):
        positions.rope_index(ids, **{**kw, "mm_token_type_ids": types[:, 1:]})
    with pytest.raises(ValueError, match="convention: expected one of"):
        positions.rope_index(ids, **{**kw, "convention": "v6"})
    with pytest.raises(ValueError, match="path: expected one of"):
        positions.rope_index(ids, **{**kw, "path": "gpu"})


@pytest.mark.parametrize("convention", ["v4", "v5"])
def test_paths_agree(convention):
    batch = make_batch(3, 2048, 4, 2, frames=3, variant="qwen2_5_vl", padding="mixed", seed=13)
    kw = batch.kwargs() if convention == "v4" else v5_kwargs(batch)
    results = [positions.rope_index(batch.input_ids, **kw, path=p) for p in ("auto", "host", "device")]
    for r in results[1:]:
        assert_same(r, results[0])


def test_v5_no_host_reads():
    batch = make_batch(3, 2048, 4, 2, frames=4, variant="qwen3_vl", padding="mixed", seed=5)
    with _HostReads() as mode:
        device_path(batch.input_ids, **v5_kwargs(batch, validate=False))
    assert mode.reads == []


@pytest.mark.parametrize("convention", ["v4", "v5"])
def test_gpu_inputs_host_path_round_trip(convention, monkeypatch):
    """The path small GPU inputs take: every tensor packed into one int64 transfer and unpacked
    exactly (bool masks, int32 ids, float32/float64 seconds), then the NumPy path. Forced here on
    CPU tensors by treating none of them as host-resident."""
    batch = make_batch(3, 1024, 3, 2, frames=3, variant="qwen2_5_vl", padding="mixed", seed=17)
    kw = batch.kwargs() if convention == "v4" else v5_kwargs(batch)
    want = positions.rope_index(batch.input_ids, **kw, path="host")
    monkeypatch.setattr(positions, "_resident", lambda t: False)
    seen = []
    real = positions._unpack
    monkeypatch.setattr(positions, "_unpack", lambda p, like: seen.append(len(like)) or real(p, like))
    for secs in (batch.second_per_grid_ts, batch.second_per_grid_ts.double() / 3):
        kw2 = dict(kw, second_per_grid_ts=secs, attention_mask=batch.attention_mask.bool())
        call = positions._validate(batch.input_ids.int(), kw2.pop("image_grid_thw"), kw2.pop("video_grid_thw"),
                                   kw2.pop("attention_mask"), kw2.pop("mm_token_type_ids", None),
                                   kw2.pop("spatial_merge_size"), kw2.pop("image_token_id", None),
                                   kw2.pop("video_token_id", None), kw2.pop("vision_start_token_id", None),
                                   kw2.pop("variant"), kw2.pop("convention", None), kw2.pop("second_per_grid_ts"),
                                   2, None, None, "host")
        got = positions._via_host(call)
        ref = positions._host(call)
        assert_same(got, ref)
        if secs is batch.second_per_grid_ts:
            assert_same((got[0].long(), got[1]), want)
    assert seen and all(n >= 5 for n in seen)  # ids, mask, grids, seconds (and types): one transfer
    parts = [torch.tensor([True, False]), torch.tensor([-3, 7], dtype=torch.int32),
             torch.tensor([0.1, 1 / 3], dtype=torch.float32), torch.tensor([1e-300, -2.5], dtype=torch.float64)]
    for a, b in zip(real(positions._pack(parts), parts), parts):
        assert a.dtype == b.dtype and torch.equal(a, b)


# ---- the axis map as a device tensor (mrope.axis_tensor) ---------------------------------------

def test_axis_tensor_is_made_once_per_map_device_and_dtype():
    m = mrope.interleaved([3, 3, 2]).axis_map
    first = mrope.axis_tensor(m, torch.device("cpu"))
    assert first.dtype == torch.int64 and first.tolist() == list(m)
    assert mrope.axis_tensor(list(m), torch.device("cpu")) is first  # any sequence of the same map
    narrow = mrope.axis_tensor(m, torch.device("cpu"), torch.int32)
    assert narrow is not first and narrow.dtype == torch.int32 and narrow.tolist() == list(m)


@pytest.mark.parametrize("axis_map", [(0,), (2,), (0, 0, 1, 1, 2), (2, 2, 0, 1, 0, 0), (1, 2) * 5 + (0,) * 3])
def test_axis_tensor_built_from_fills_equals_the_map(axis_map):
    """The form made during CUDA-graph capture (device ops only) holds the map's values."""
    for dtype in (torch.int32, torch.int64):
        got = mrope._filled(axis_map, torch.device("cpu"), dtype)
        assert got.dtype == dtype and got.tolist() == list(axis_map)
