"""3-D video RoPE: ``rb.cos_sin_3d`` + ``rb.apply(..., layout="interleaved")`` against the rotary
formulas of Wan 2.1/2.2 (Wan-Video ``wan/modules/model.py``), diffusers ``WanRotaryPosEmbed`` /
``WanAttnProcessor`` and Helios (diffusers ``HeliosRotaryPosEmbed`` /
``apply_rotary_emb_transposed``), each written here from the model code's definition.

What is bit-for-bit and what is not (the tests below pin each statement):

* Tables. Wan builds a complex128 table (float64 angles, ``torch.polar``); rounded to float32 it
  equals ``cos_sin_3d(grid, wan_dims(d))`` bit for bit. diffusers' Wan table (float64 angles,
  ``.float()`` after repeat_interleave) is the same table in duplicated form. Helios computes
  inverse frequencies, angles and cos/sin in float32 on the model's device: same split and
  frequencies, different last bits (bounded below).
* Rotation. diffusers (Wan and Helios) rotate with real float32 arithmetic ``x1*cos - x2*sin`` on
  float32 tables, every product rounded: ``rb.apply`` reproduces it bit for bit given the same
  tables, in float32 and -- because bf16/fp16 inputs promote against the float32 table -- in
  bf16/fp16 too. Original Wan multiplies in complex128 and rounds once to float32: the exact
  products are not rounded to float32 first, so about a quarter of the outputs differ from the
  float32 contract in the last bits; the difference is bounded by the products' rounding.
"""

from __future__ import annotations

import pytest
import torch

import rope_backends as rb

THETA = 10000.0


# ------------------------------------------------------------------ the models' formulas ---------
def wan_rope_params(max_seq_len: int, dim: int, theta: float = THETA) -> torch.Tensor:
    """Wan ``rope_params``: complex128 ``[max_seq_len, dim // 2]`` of unit modulus."""
    inv = 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim))
    angles = torch.outer(torch.arange(max_seq_len), inv)
    return torch.polar(torch.ones_like(angles), angles)


def wan_freqs(head_dim: int) -> torch.Tensor:
    """``WanModel.freqs``: the three axis tables side by side, widths d-4(d//6), 2(d//6), 2(d//6)."""
    d = head_dim
    return torch.cat(
        [wan_rope_params(1024, d - 4 * (d // 6)), wan_rope_params(1024, 2 * (d // 6)), wan_rope_params(1024, 2 * (d // 6))],
        dim=1,
    )


def wan_grid_freqs(freqs: torch.Tensor, head_dim: int, grid) -> torch.Tensor:
    """The complex multiplier of every token of an (f, h, w) grid, as ``rope_apply`` builds it."""
    f, h, w = grid
    c = head_dim // 2
    t_part, h_part, w_part = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    return torch.cat(
        [
            t_part[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            h_part[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            w_part[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)


def wan_rope_apply(x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """Wan ``rope_apply`` for one sample ``x [S, heads, d]``: complex128 multiply, then float32."""
    s, n = x.shape[:2]
    xc = torch.view_as_complex(x.to(torch.float64).reshape(s, n, -1, 2))
    return torch.view_as_real(xc * multiplier).flatten(2).float()


def diffusers_wan_tables(head_dim: int, grid, max_seq_len: int = 1024):
    """diffusers ``WanRotaryPosEmbed``: float64 angles -> cos/sin repeat-interleaved -> float32,
    split in ``forward`` at ``[d - 2*(d//3), d//3, d//3]`` columns. Returns ``[S, d]`` each."""
    d = head_dim
    h_dim = w_dim = 2 * (d // 6)
    t_dim = d - h_dim - w_dim
    cos_parts, sin_parts = [], []
    for dim in (t_dim, h_dim, w_dim):
        inv = 1.0 / (THETA ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
        angles = torch.outer(torch.arange(max_seq_len), inv)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1).float())
    table_cos, table_sin = torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)
    f, h, w = grid
    split = [d - 2 * (d // 3), d // 3, d // 3]
    out = []
    for table in (table_cos, table_sin):
        tp, hp, wp = table.split(split, dim=1)
        out.append(
            torch.cat(
                [
                    tp[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                    hp[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                    wp[:w].view(1, 1, w, -1).expand(f, h, w, -1),
                ],
                dim=-1,
            ).reshape(f * h * w, -1)
        )
    return out[0], out[1]


def diffusers_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers ``WanAttnProcessor.apply_rotary_emb`` on ``x [B, S, H, D]`` with duplicated
    ``cos, sin [S, 1, D]`` (Helios' ``apply_rotary_emb_transposed`` is the same arithmetic)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def helios_tables(rope_dim, frame_indices: torch.Tensor, height: int, width: int, theta: float = THETA):
    """Helios ``HeliosRotaryPosEmbed.forward`` for one batch row: float32 inverse frequencies,
    float32 angles (einsum) and cos/sin, repeat-interleaved. Returns ``[F*H*W, d]`` cos, sin."""
    frames = frame_indices.to(torch.float32)
    n = frames.shape[0]
    gy, gx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    grids = (frames[:, None, None].expand(n, height, width), gy.expand(n, -1, -1), gx.expand(n, -1, -1))
    cos_parts, sin_parts = [], []
    for dim, pos in zip(rope_dim, grids):
        base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
        angles = torch.einsum("d,thw->dthw", base, pos).repeat_interleave(2, dim=0)
        cos_parts.append(angles.cos())
        sin_parts.append(angles.sin())
    flat = lambda parts: torch.cat(parts, dim=0).flatten(1).transpose(0, 1)  # noqa: E731  [F*H*W, d]
    return flat(cos_parts), flat(sin_parts)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = bits(got) != bits(want)
    if differ.any():
        first = differ.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(differ.sum())} of {differ.numel()} elements differ; first at {first}: "
            f"{got[tuple(first)].item()!r} != {want[tuple(first)].item()!r}"
        )


GRIDS = [(1, 1, 1), (3, 4, 5), (21, 6, 10), (7, 30, 52)]


# ------------------------------------------------------------------ split rule -------------------
@pytest.mark.parametrize("d", [6, 8, 12, 64, 80, 96, 112, 128, 192, 256])
def test_wan_split_rule(d):
    t, h, w = rb.wan_dims(d)
    assert t + h + w == d and t % 2 == h % 2 == w % 2 == 0 and h == w
    c = d // 2  # Wan's rope_apply splits the complex columns as [c - 2(c//3), c//3, c//3]
    assert (t // 2, h // 2, w // 2) == (c - 2 * (c // 3), c // 3, c // 3)
    if d == 128:
        assert (t, h, w) == (44, 42, 42)  # Wan 2.1/2.2 (all released sizes) and Helios' rope_dim


# ------------------------------------------------------------------ tables -----------------------
@pytest.mark.parametrize("d", [128, 64, 96])
@pytest.mark.parametrize("grid", GRIDS)
def test_table_equals_wan_complex128_rounded(d, grid):
    cos, sin = rb.cos_sin_3d(grid, rb.wan_dims(d))
    multiplier = wan_grid_freqs(wan_freqs(d), d, grid)[:, 0]
    assert_bits_equal(cos, multiplier.real.float())
    assert_bits_equal(sin, multiplier.imag.float())


def test_table_equals_wan_over_its_whole_range():
    """Every one of Wan's 1024 positions on every axis (d = 128)."""
    freqs = wan_freqs(128)
    t, h, w = rb.wan_dims(128)
    for axis, grid in enumerate([(1024, 1, 1), (1, 1024, 1), (1, 1, 1024)]):
        cos, sin = rb.cos_sin_3d(grid, (t, h, w))
        want = wan_grid_freqs(freqs, 128, grid)[:, 0]
        assert_bits_equal(cos, want.real.float())
        assert_bits_equal(sin, want.imag.float())


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("d", [128, 96])
def test_table_equals_diffusers_wan(grid, d):
    cos, sin = rb.cos_sin_3d(grid, rb.wan_dims(d))
    dcos, dsin = diffusers_wan_tables(d, grid)
    assert_bits_equal(cos.repeat_interleave(2, dim=-1), dcos)
    assert_bits_equal(sin.repeat_interleave(2, dim=-1), dsin)


@pytest.mark.parametrize("d", [64, 112, 256])
def test_diffusers_wan_resplit_differs_when_d_mod_6_is_4(d):
    """diffusers builds (d-4(d//6), 2(d//6), 2(d//6)) but re-splits at (d-2(d//3), d//3, d//3):
    for d % 6 == 4 the pieces shift (a pair even gets cos from one axis, sin from another).
    Wan's own code does not; cos_sin_3d follows Wan. (Every released Wan uses d = 128.)"""
    grid = (3, 4, 5)
    cos, _ = rb.cos_sin_3d(grid, rb.wan_dims(d))
    dcos, _ = diffusers_wan_tables(d, grid)
    assert 2 * (d // 6) != d // 3
    assert not torch.equal(cos.repeat_interleave(2, dim=-1), dcos)


def test_helios_tables_match_only_to_float32_rounding():
    """Helios computes in float32 on the device: not bit-identical, but within the float32
    rounding of its angles (|angle error| <= ~2^-22 |angle|) plus cos/sin rounding."""
    for start, frames in [(0, 9), (0, 33), (100, 9), (600, 9)]:
        idx = torch.arange(start, start + frames)
        hcos, hsin = helios_tables((44, 42, 42), idx, 30, 52)
        cos, sin = rb.cos_sin_3d((frames, 30, 52), (44, 42, 42), frame_indices=idx)
        max_angle = float(max(start + frames, 52))
        bound = 2.0**-21 * max_angle + 2.0**-22
        for ours, theirs in ((cos, hcos[:, 0::2]), (sin, hsin[:, 1::2])):
            diff = (ours - theirs).abs().max().item()
            assert 0 < diff <= bound, (start, frames, diff, bound)


# ------------------------------------------------------------------ rotation ---------------------
def _video(grid, heads=4, d=128, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = grid[0] * grid[1] * grid[2]
    return torch.randn(batch, s, heads, d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", GRIDS[1:])
def test_rotation_equals_diffusers_wan(dtype, grid):
    x = _video(grid, dtype=dtype)
    cos, sin = rb.cos_sin_3d(grid, rb.wan_dims(128))
    dcos, dsin = diffusers_wan_tables(128, grid)
    want = diffusers_apply(x, dcos[:, None], dsin[:, None])
    assert_bits_equal(rb.apply(x, cos[:, None], sin[:, None], layout="interleaved"), want)
    # diffusers' own duplicated tables go straight in as well (pair i reads column 2i)
    assert_bits_equal(rb.apply(x, dcos[:, None], dsin[:, None], layout="interleaved"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_equals_helios_given_its_tables(dtype):
    grid, idx = (5, 8, 12), torch.tensor([0, 1, 2, 7, 8])  # Helios allows any frame indices
    x = _video(grid, dtype=dtype, seed=3)
    hcos, hsin = helios_tables((44, 42, 42), idx, grid[1], grid[2])
    want = diffusers_apply(x, hcos[:, None], hsin[:, None])
    assert_bits_equal(rb.apply(x, hcos[:, None], hsin[:, None], layout="interleaved"), want)
    # Helios' compressed history averages its tables (avg_pool3d): not cos/sin of any angle,
    # still rotated exactly as Helios does
    table = torch.cat((hcos, hsin), dim=-1).T.reshape(1, -1, *grid)
    pooled = torch.nn.functional.avg_pool3d(table[:, :, :4], (2, 2, 2), stride=(2, 2, 2)).flatten(2)[0].T
    pcos, psin = pooled.chunk(2, dim=-1)
    xs = x[:, : pooled.shape[0]]
    assert_bits_equal(
        rb.apply(xs, pcos[:, None], psin[:, None], layout="interleaved"), diffusers_apply(xs, pcos[:, None], psin[:, None])
    )


def test_rotation_vs_wan_complex128():
    """Wan rounds once from float64; the contract rounds every product to float32 first. Not
    bit-identical (about a quarter of the elements differ), and never further apart than those
    roundings: |ours - wan| <= ulp(a*c) + ulp(b*s) + ulp(result) per element (+ the float32
    rounding of Wan's float64 cos/sin, covered by a factor 2)."""
    grid, d = (5, 12, 16), 128
    x = _video(grid, d=d, batch=1)[0]
    cos, sin = rb.cos_sin_3d(grid, rb.wan_dims(d))
    ours = rb.apply(x, cos[:, None], sin[:, None], layout="interleaved")
    wan = wan_rope_apply(x, wan_grid_freqs(wan_freqs(d), d, grid))
    assert ours.dtype == wan.dtype == torch.float32
    differ = ours != wan
    assert 0.05 < differ.float().mean().item() < 0.5

    def ulp(v):
        v = v.abs()
        return torch.nextafter(v, torch.full_like(v, float("inf"))) - v

    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    bound_a = 2 * (ulp(a * c) + ulp(b * s)) + ulp(torch.maximum(ours[..., 0::2].abs(), wan[..., 0::2].abs()))
    bound_b = 2 * (ulp(b * c) + ulp(a * s)) + ulp(torch.maximum(ours[..., 1::2].abs(), wan[..., 1::2].abs()))
    assert ((ours[..., 0::2] - wan[..., 0::2]).abs() <= bound_a).all()
    assert ((ours[..., 1::2] - wan[..., 1::2]).abs() <= bound_b).all()


# ------------------------------------------------------------------ frame indices ----------------
def test_frame_indices():
    grid, dims = (4, 3, 5), (44, 42, 42)
    shifted = rb.cos_sin_3d(grid, dims, offsets=(9, 0, 0))
    explicit = rb.cos_sin_3d(grid, dims, frame_indices=torch.arange(9, 13))
    for a, b in zip(shifted, explicit):
        assert_bits_equal(a, b)
    gaps = rb.cos_sin_3d(grid, dims, frame_indices=[0, 1, 5, 6])
    one = rb.cos_sin_3d((1, 3, 5), dims, offsets=(5, 0, 0))
    assert_bits_equal(gaps[0][2 * 15 : 3 * 15], one[0])
    with pytest.raises(ValueError, match="frame_indices: expected 4 real numbers"):
        rb.cos_sin_3d(grid, dims, frame_indices=[0, 1, 2])
    with pytest.raises(ValueError, match="offsets: expected 0 for frames"):
        rb.cos_sin_3d(grid, dims, offsets=(1, 0, 0), frame_indices=[0, 1, 2, 3])
