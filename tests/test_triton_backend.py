"""The ``triton`` backend's own tests, run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Self-contained (no conftest fixtures): a module-scoped fixture turns the interpreter on for these
tests only and restores the environment afterwards. The kernel module is imported while it is on,
so the same kernel source that runs on the GPU runs here, and every result is compared bit for bit
with ``rope_backends.reference`` (through ``rb.apply(..., backend="triton")`` and the shipped
``check_case``, which also checks canaries around in-place writes and untouched inputs).

What is covered here and not by the shared suite: the conversions the kernel does by hand
(fp32 -> bf16 rounding, bf16 -> fp32, fp16 and fp64 casts) over many bit patterns; out-of-range
positions (NaN, no out-of-bounds read: CPU validation rejects them before a backend sees them, so
the kernel is called directly); the geometry (collapsing leading dims, the split fallback, int64
offsets decided by extent, launch heuristics and their cache); import hygiene and the probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")  # backend availability: no triton, nothing to test here
import triton.language as tl  # noqa: E402

import rope_backends as rb  # noqa: E402
from rope_backends import environment, mrope, reference  # noqa: E402
from rope_backends.backends import triton as triton_backend  # noqa: E402
from rope_backends.backends.triton import launch, tuning  # noqa: E402
from rope_backends.contract import Layout, MRope, RopeArgs  # noqa: E402
from rope_backends.testing import assert_bitwise_equal, check_case  # noqa: E402
from rope_backends.testing.cases import RopeCase  # noqa: E402
from rope_backends.testing.make import special_values  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """TRITON_INTERPRET=1 for this module (the kernel module is imported under it)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    kernel_mod = sys.modules.get("rope_backends.backends.triton.kernel")
    if kernel_mod is not None and not _interpreted(kernel_mod.rope_kernel):
        raise RuntimeError("the triton kernel was already compiled for a GPU in this process; "
                           "run these tests in a process without GPU triton calls")
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


# --------------------------------------------------------------------------------------------
# bit-exact against the reference, a small but feature-complete grid

C = RopeCase
CASES = [
    # both layouts x every dtype, full rotary, head_dim 64
    *[C("apply", (3, 2, 64), dt, lay) for dt in ("float32", "float16", "bfloat16") for lay in ("neox", "interleaved")],
    # non power-of-two head dims, partial rotary (pass-through copied out of place, kept in place)
    C("apply", (3, 2, 80), "bfloat16", "neox", rotary_dim=40),
    C("apply", (3, 2, 96), "float16", "interleaved", rotary_dim=32),
    C("apply", (2, 3, 96), "float32", "neox"),
    C("apply", (2, 2, 80), "bfloat16", "interleaved"),
    C("apply", (4, 2, 80), "float16", "neox", rotary_dim=24, storage="padded_rows", inplace=True),
    # strided views: q/k of one fused qkv buffer, [B, H, S, D], permuted, strided head_dim, offset
    C("apply_qk", (2, 3, 4, 32), "bfloat16", "interleaved", k_heads=2, storage="fused_qkv", inplace=True),
    C("apply_qk", (2, 3, 4, 32), "float16", "neox", k_heads=2, storage="fused_qkv"),
    C("apply", (2, 3, 5, 32), "bfloat16", "neox", heads_axis=-3, storage="transposed", inplace=True),
    C("apply_qk", (2, 4, 3, 16), "float32", "interleaved", k_heads=2, heads_axis=-3),
    C("apply", (2, 5, 3, 32), "float16", "interleaved", storage="permuted"),
    C("apply", (3, 2, 32), "bfloat16", "neox", storage="strided_last", inplace=True),
    C("apply", (3, 2, 32), "float32", "interleaved", storage="offset", rotary_dim=16),
    C("apply", (3, 2, 2, 32), "float16", "neox", storage="expanded"),
    # cos/sin: duplicated form, broadcast shapes, expanded/strided/transposed tables, dtypes
    C("apply", (2, 4, 2, 32), "bfloat16", "neox", cos_form="dup", cos_bcast="batch"),
    C("apply", (2, 4, 2, 32), "float32", "interleaved", cos_form="dup", cos_dtype="float64"),
    C("apply", (2, 4, 3, 32), "float16", "neox", cos_bcast="head"),
    C("apply", (2, 4, 3, 32), "bfloat16", "interleaved", cos_bcast="full", cos_dtype="bfloat16"),
    C("apply", (2, 4, 3, 32), "float32", "neox", cos_bcast="expanded", cos_dtype="float16"),
    C("apply", (4, 3, 32), "float16", "interleaved", cos_bcast="strided", cos_form="dup"),
    C("apply", (4, 3, 32), "bfloat16", "neox", cos_bcast="transposed"),
    C("apply", (3, 32), "float32", "neox", cos_bcast="scalar"),
    C("apply", (32,), "bfloat16", "interleaved", cos_bcast="scalar"),
    C("apply", (2, 2, 3, 2, 32), "float16", "neox", cos_bcast="token"),
    # apply_qk: GQA / MQA / more k heads, in and out of place
    C("apply_qk", (4, 8, 32), "bfloat16", "neox", k_heads=2),
    C("apply_qk", (4, 4, 32), "float16", "interleaved", k_heads=1, inplace=True),
    C("apply_qk", (4, 1, 32), "float32", "neox", k_heads=4, rotary_dim=16),
    # apply_cached: positions gathered in the kernel, vLLM [T, H*D], k=None, cache dtypes
    C("apply_cached", (6, 4, 32), "bfloat16", "neox", k_heads=2),
    C("apply_cached", (6, 4 * 32), "float16", "interleaved", head_dim=32, k_heads=1, inplace=False),
    C("apply_cached", (2, 3, 2, 32), "float32", "neox", k_heads=0, rotary_dim=16, inplace=False),
    C("apply_cached", (5, 2, 32), "bfloat16", "interleaved", k_heads=1, cos_dtype="float64", positions_dtype="int32"),
    C("apply_cached", (5, 2, 32), "float16", "neox", k_heads=1, cos_dtype="bfloat16"),
    C("apply_cached", (8, 6 * 32), "bfloat16", "neox", head_dim=32, k_heads=2, storage="fused_qkv"),
    # MRoPE: the three axis maps, 3-row positions and text-only (1 row)
    C("apply_cached", (6, 2, 16), "bfloat16", "neox", k_heads=1, mrope=("chunked", (2, 3, 3))),
    C("apply_cached", (6, 2, 64), "float16", "neox", k_heads=1, mrope=("chunked", (8, 12, 12)), inplace=False),
    C("apply_cached", (6, 2, 64), "bfloat16", "interleaved", k_heads=1, mrope=("interleaved", (12, 10, 10))),
    C("apply_cached", (6, 2, 64), "float32", "neox", k_heads=2, mrope=("ernie", (11, 11, 10))),
    C("apply_cached", (6, 2, 80), "bfloat16", "neox", k_heads=1, rotary_dim=64, mrope=("interleaved", (12, 10, 10)),
      inplace=False),
    C("apply_cached", (6, 2, 64), "float16", "neox", k_heads=1, mrope=("chunked", (8, 12, 12)), mrope_rows=1),
    # empty tensors: no launch, right shapes back
    C("apply", (0, 3, 32), "float16", "neox"),
    C("apply_qk", (0, 3, 32), "bfloat16", "interleaved", k_heads=1, inplace=True),
    C("apply_cached", (0, 2, 32), "float32", "neox", k_heads=1, mrope=("chunked", (4, 6, 6))),
    # special values in x and in cos/sin / the cache: +-0, subnormals, +-inf, NaN, largest finite
    *[C("apply", (8, 3, 32), dt, lay, values="special") for dt in ("float32", "float16", "bfloat16")
      for lay in ("neox", "interleaved")],
    *[C("apply_qk", (8, 3, 32), dt, "neox", k_heads=1, values="special_cos") for dt in ("float32", "float16", "bfloat16")],
    C("apply_cached", (8, 3, 32), "bfloat16", "interleaved", k_heads=1, values="special_cos", cos_dtype="float64"),
    C("apply_cached", (8, 3, 32), "float16", "neox", k_heads=1, values="special", inplace=True),
    # backward (autograd: the rotation by -theta, the kernel's CONJUGATE)
    C("apply", (3, 2, 32), "bfloat16", "interleaved", backward=True),
    C("apply", (3, 2, 80), "float16", "neox", rotary_dim=48, backward=True),
    C("apply_qk", (3, 4, 32), "float32", "neox", k_heads=1, backward=True, cos_form="dup"),
    C("apply_qk", (2, 5, 4, 64), "bfloat16", "interleaved", k_heads=2, storage="fused_qkv", backward=True),
    C("apply_cached", (4, 2, 32), "float16", "neox", k_heads=1, backward=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bit_exact(case):
    check_case(case, "triton", "cpu")


def test_grid_covers_the_features():
    names = {c.name for c in CASES}
    assert len(names) == len(CASES)
    have = lambda pred: any(pred(c) for c in CASES)  # noqa: E731
    assert all(have(lambda c, d=d: c.dtype == d) for d in ("float32", "float16", "bfloat16"))
    assert all(have(lambda c, lay=lay: c.layout == lay) for lay in ("neox", "interleaved"))
    assert have(lambda c: c.d == 80) and have(lambda c: c.d == 96) and have(lambda c: c.rd < c.d)
    assert have(lambda c: c.storage == "fused_qkv") and have(lambda c: c.heads_axis == -3)
    assert have(lambda c: c.cos_form == "dup") and have(lambda c: c.cos_bcast == "expanded")
    assert have(lambda c: c.op == "apply_qk" and c.k_heads not in (None, c.heads))
    assert all(have(lambda c, k=k: c.mrope is not None and c.mrope[0] == k) for k in ("chunked", "interleaved", "ernie"))
    assert have(lambda c: c.inplace) and have(lambda c: 0 in c.shape)
    assert have(lambda c: c.values == "special") and have(lambda c: c.values == "special_cos")
    assert all(have(lambda c, o=o: c.backward and c.op == o) for o in ("apply", "apply_qk", "apply_cached"))


def test_mrope_maps_from_the_builders():
    """rb.mrope.chunked([2, 3, 3]) & co. as users pass them, with 3-row positions."""
    g = torch.Generator().manual_seed(3)
    cache = rb.cos_sin_cache(40, 16)
    for m in (mrope.chunked([2, 3, 3]), mrope.interleaved([2, 3, 3]), mrope.ernie([3, 3, 2])):
        q = torch.randn(5, 4, 16, generator=g).bfloat16()
        k = torch.randn(5, 2, 16, generator=g).bfloat16()
        pos = torch.randint(0, 40, (3, 5), generator=g)
        q_out, k_out = rb.apply_cached(q, k, pos, cache, mrope=m, inplace=False, backend="triton")
        args = RopeArgs((q, k), False, Layout.NEOX, 16, positions=pos, cache=cache, mrope=m)
        want_q, want_k = reference.run(args)
        assert_bitwise_equal(q_out, want_q, name=f"{m.name} q")
        assert_bitwise_equal(k_out, want_k, name=f"{m.name} k")


# --------------------------------------------------------------------------------------------
# out-of-range positions: NaN in the rotated part, nothing read out of bounds

@pytest.mark.parametrize("axis_map", [None, mrope.chunked([2, 3, 3]).axis_map], ids=["plain", "mrope"])
@pytest.mark.parametrize("inplace", [False, True])
def test_out_of_range_positions_give_nan(axis_map, inplace):
    """CPU validation rejects such positions before a backend runs, so call the backend with a
    RopeArgs directly (as a GPU call without debug checks reaches it). The cache sits inside a
    NaN-free buffer whose neighbours are huge values: an out-of-bounds read would show."""
    g = torch.Generator().manual_seed(7)
    backing = torch.full((3, 12, 20), 1e30)  # rows before/after the cache: 1e30, never NaN
    cache = backing[1, 2:10, 2:18]  # [8, 16], strided
    cache.copy_(rb.cos_sin_cache(8, 16))
    q = torch.randn(6, 2, 20, generator=g).half()
    k = torch.randn(6, 1, 20, generator=g).half()
    if axis_map is None:
        pos = torch.tensor([0, 8, -1, 7, 1 << 40, 3])
        args = RopeArgs((q.clone(), k.clone()), inplace, Layout.NEOX, 16, positions=pos, cache=cache)
    else:
        pos = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 8, 2, 3, 4, -5], [2, 2, 9, 3, 4, 5]])
        args = RopeArgs((q.clone(), k.clone()), inplace, Layout.NEOX, 16, positions=pos, cache=cache,
                        mrope=MRope(axis_map))
    want = reference.run(RopeArgs((q.clone(), k.clone()), False, Layout.NEOX, 16, positions=pos, cache=cache,
                                  mrope=args.mrope))
    got = triton_backend.forward(args)
    for g_, w in zip(got, want):
        assert_bitwise_equal(g_, w)
    bad_tokens = [1, 2, 4] if axis_map is None else [1, 2, 5]
    assert bool(torch.isnan(got[0][bad_tokens, :, :16]).any(dim=-1).all())
    assert not bool(torch.isnan(got[0][[0, 3]]).any())
    assert_bitwise_equal(got[0][..., 16:], q[..., 16:])  # pass-through untouched by NaN


# --------------------------------------------------------------------------------------------
# the conversions the kernel does by hand, over many bit patterns

_K = None  # rope_backends.backends.triton.kernel, imported under the interpreter
_CONVERT = []


def _convert(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    v = _K._f32(tl.load(x_ptr + i), True)  # EXACT_CASTS: what the interpreter runs
    tl.store(y_ptr + i, _K._round_to(v, y_ptr.dtype.element_ty, True))


def _run_convert(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x -> float32 -> out_dtype through the kernel's own helpers (``_f32``, ``_round_to``)."""
    global _K
    if not _CONVERT:
        from rope_backends.backends.triton import kernel

        _K = kernel
        _CONVERT.append(triton.jit(_convert))  # decorated now, under the interpreter
    n = x.numel()
    y = torch.empty(n, dtype=out_dtype)
    _CONVERT[0][(1,)](x, y, N=n)
    return y


def _random_bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = special_values(torch.float32).float().view(torch.int32)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7F_FFFF, 0x7F7F_8000,
                         0x0000_8000, 0x0001_8000, 0x0000_7FFF, 0x7F80_0001, 0x7FFF_FFFF], dtype=torch.int64)
    ties = ties.to(torch.int32)
    fixed = torch.cat((specials, ties, ties | (-(2**31))))
    r[: fixed.numel()] = fixed
    return r.view(torch.float32)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_rounding_matches_torch(out_dtype):
    x = _random_bits(1 << 16, seed=11)
    assert_bitwise_equal(_run_convert(x, out_dtype), x.to(out_dtype))


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_converts_exactly(in_dtype):
    """bf16/fp16 -> fp32 for all 65,536 patterns (the interpreter's own bf16 cast gets
    subnormals wrong; the kernel converts by bits)."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(in_dtype)
    assert_bitwise_equal(_run_convert(x, torch.float32), x.float())


def test_float64_rounds_like_tensor_float():
    g = torch.Generator().manual_seed(5)
    n = 1 << 14
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-160, 140, (n,), generator=g).double())
    x[:19] = special_values(torch.float64)
    assert_bitwise_equal(_run_convert(x, torch.float32), x.float())


# --------------------------------------------------------------------------------------------
# geometry, tiles and the launch

def _args(x, cos, sin, *, inplace=False, layout=Layout.NEOX, rotary_dim=None):
    return RopeArgs((x,), inplace, layout, rotary_dim or x.shape[-1], cos=cos, sin=sin)


def _lead_sizes(plan):
    return plan.values["L1"], plan.values["L2"]  # L0 is implied by the row count


def test_collapse_contiguous_tokens_to_one_lead_dim():
    x = torch.empty(2, 7, 3, 32)
    cos = torch.empty(2, 7, 1, 16)  # per (batch, token): mergeable with x
    plan = launch.plan_for(_args(x, cos, cos))
    assert _lead_sizes(plan) == (1, 1)
    assert (plan.values["rows"], plan.values["q_heads"]) == (2 * 7, 3)
    assert not plan.values["COS_PER_HEAD"]


def test_bshd_with_token_cos_keeps_two_lead_dims():
    x = torch.empty(2, 7, 3, 32)
    cos = torch.empty(7, 1, 16)  # broadcast over the batch: the batch dim cannot merge
    plan = launch.plan_for(_args(x, cos, cos))
    assert _lead_sizes(plan) == (7, 1)


def test_cos_per_head_is_a_constexpr():
    x = torch.empty(4, 3, 32)
    assert launch.plan_for(_args(x, torch.empty(4, 3, 16), torch.empty(4, 3, 16))).values["COS_PER_HEAD"]
    assert not launch.plan_for(_args(x, torch.empty(4, 1, 16), torch.empty(4, 1, 16))).values["COS_PER_HEAD"]


def test_more_than_three_lead_dims_split_and_stay_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 3, 2, 16, generator=g).bfloat16()
    cos = torch.rand(2, 1, 2, 1, 1, 8, generator=g)  # alternating broadcast: nothing merges
    sin = torch.rand(2, 1, 2, 1, 1, 8, generator=g)
    assert launch.plan_for(_args(x, cos, sin)) is None  # the split fallback
    got = rb.apply(x, cos, sin, backend="triton")
    assert_bitwise_equal(got, reference.run(_args(x, cos, sin))[0])
    xi = x.clone()
    rb.apply(xi, cos, sin, layout="interleaved", inplace=True, backend="triton")
    assert_bitwise_equal(xi, reference.run(_args(x, cos, sin, layout=Layout.INTERLEAVED))[0])


def test_sin_with_other_strides_than_cos():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, 32, generator=g)
    cos = torch.rand(5, 1, 16, generator=g)
    sin = torch.rand(16, 5, generator=g).t().unsqueeze(1)  # same shape, transposed storage
    assert launch.plan_for(_args(x, cos, sin)).contiguous_cos
    assert_bitwise_equal(rb.apply(x, cos, sin, backend="triton"), reference.run(_args(x, cos, sin))[0])


def test_int64_offsets_decided_by_extent():
    """Meta tensors: shapes and strides without memory."""
    small = torch.empty(1 << 10, 8, 128, device="meta", dtype=torch.bfloat16)
    big = torch.empty((1 << 21) + 1, 8, 128, device="meta", dtype=torch.bfloat16)  # > 2**31 elements
    cos = torch.empty(1, 1, 64, device="meta")
    assert not launch.plan_for(_args(small, cos, cos)).values["INT64"]
    assert launch.plan_for(_args(big, cos, cos)).values["INT64"]
    # offsets count from the view's first element: far into a big storage is still int32 ...
    far = torch.empty(1 << 32, device="meta").as_strided((4, 8, 128), (1024, 128, 1), 3 << 30)
    assert not launch.plan_for(_args(far, cos, cos)).values["INT64"]
    # ... but a few elements 2**30 apart span more than 2**31
    spread = torch.empty(1 << 32, device="meta").as_strided((4, 8, 128), (1 << 30, 128, 1))
    assert launch.plan_for(_args(spread, cos, cos)).values["INT64"]


def test_fp_fusion_is_off_and_plans_are_cached(monkeypatch):
    x = torch.randn(4, 2, 32)
    cos = torch.rand(4, 1, 16)
    built = []
    real = launch._build
    monkeypatch.setattr(launch, "_build", lambda *a: built.append(1) or real(*a))
    launch._PLANS.clear()
    for _ in range(3):
        rb.apply(x, cos, cos, backend="triton")
    assert len(built) == 1
    plan = launch.plan_for(_args(x, cos, cos))
    assert plan.options()["enable_fp_fusion"] is False
    assert plan.values["EXACT_CASTS"] is True  # the interpreter's casts are not trusted


def test_plan_values_are_the_kernels_parameters():
    """The plan holds every non-pointer parameter of rope_kernel by name; ``tail`` is them in the
    kernel's order, after its nine pointers (the one place the order is written is the kernel)."""
    from rope_backends.backends.triton import kernel

    x = torch.randn(6, 4, 32)
    cos = torch.rand(6, 1, 16)
    plan = launch.plan_for(_args(x, cos, cos))
    names = kernel.rope_kernel.arg_names
    pointers = [n for n in names if n.endswith("_ptr")]
    assert names[:len(pointers)] == pointers and len(pointers) == 9
    assert list(names[len(pointers):]) == list(plan.values) or set(names[len(pointers):]) == set(plan.values)
    assert plan.tail == tuple(plan.values[n] for n in names[len(pointers):])
    assert plan.launchers == {}  # the interpreter always goes through run()


# the tile: what tuning.concrete makes of tile parameters on a 132-SM GPU

_H200_SMS = 132


def _shape(rows, heads, *, rot=128, head_dim=128, kind="table", interleaved=False, elem_bytes=2):
    return tuning.Shape(kind, interleaved, elem_bytes, rot, head_dim, False, rows, tuple(heads))


def test_tiles_are_powers_of_two_and_divide_the_heads():
    """num_warps, BLOCK_T and BLOCK_H are powers of two (Triton needs it; the long fuzz profile once
    found num_warps=3 for head_dim 388), BLOCK_H divides every head count (no masked heads), and
    each thread moves at most vec_bytes per access, for every class's rule and extreme params."""
    for heads in ((1,), (3,), (24, 8), (32, 8), (28, 4), (12,), (64, 64), (5, 1)):
        for rows in (1, 7, 64, 4096, 115200):
            for rot, head_dim in ((2, 2), (32, 64), (64, 64), (128, 128), (130, 388), (256, 256)):
                for interleaved in (False, True):
                    shape = _shape(rows, heads, rot=rot, head_dim=head_dim, interleaved=interleaved)
                    for params in (tuning.rule(shape.shape_class()), tuning.TileParams(64, 32, 8),
                                   tuning.TileParams(1, 1, 32)):
                        tile = tuning.concrete(shape, params, _H200_SMS)
                        for v in tile:
                            assert v >= 1 and v & (v - 1) == 0, (shape, params, tile)
                        assert 1 <= tile.num_warps <= 8
                        assert all(h % tile.block_h == 0 for h in heads), (heads, tile)


def test_tiles_fill_the_gpu_and_share_cos_over_heads():
    rule = lambda shape: tuning.concrete(shape, tuning.rule(shape.shape_class()), _H200_SMS)  # noqa: E731
    big = _shape(115200, (24,), interleaved=True)
    tile = rule(big)
    assert tile.block_h == 8 and tile.block_t * tile.block_h >= 8  # cos/sin loaded once for 8 heads
    mid = _shape(4096, (32, 8), kind="cached")
    tile = rule(mid)
    programs = -(-4096 // tile.block_t) * (-(-32 // tile.block_h) + -(-8 // tile.block_h))
    assert programs >= 2 * _H200_SMS
    decode = rule(_shape(1, (32, 8), kind="cached"))
    assert decode.block_t == 1
    rocm = tuning.concrete(big, tuning.rule(big.shape_class()), _H200_SMS, rocm=True)
    assert rocm.num_warps == max(1, tile.num_warps // 2) or rocm.num_warps <= tuning.concrete(
        big, tuning.rule(big.shape_class()), _H200_SMS).num_warps


def test_shape_classes():
    assert _shape(1, (32, 8), kind="cached").shape_class().size == "decode"
    assert _shape(64, (32, 8)).shape_class().size == "decode"
    assert _shape(4096, (32, 8)).shape_class().size == "medium"
    assert _shape(115200, (24,)).shape_class().size == "large"
    assert _shape(512, (2,), rot=64, head_dim=64).shape_class() == tuning.ShapeClass("table", False, 2, 32, "small")
    assert len(set(tuning.classes())) == 3 * 2 * 2 * 3 * 4


def test_forced_tile_applies_and_restores():
    x = torch.randn(6, 4, 32)
    cos = torch.rand(6, 1, 16)
    try:
        launch.set_config(2, 2, 1)
        plan = launch.plan_for(_args(x, cos, cos))
        assert plan.tile == tuning.Tile(2, 2, 1) and plan.grid == (3 * 2, 1, 1)
        assert_bitwise_equal(rb.apply(x, cos, cos, backend="triton"), reference.run(_args(x, cos, cos))[0])
    finally:
        launch.set_config(None)
    assert launch.plan_for(_args(x, cos, cos)).tile != tuning.Tile(2, 2, 1)


@pytest.mark.parametrize("qk_by_row", [False, True])
@pytest.mark.parametrize("kind", ["table", "cached", "mrope"])
@pytest.mark.parametrize("layout", [Layout.NEOX, Layout.INTERLEAVED])
@pytest.mark.parametrize("heads", [(6, 2), (6,)], ids=["q+k", "q"])
def test_program_orders(qk_by_row, kind, layout, heads):
    """Both q+k program orders (kernel.py's QK_BY_ROW) serve every tile of q and of k exactly once:
    several row blocks with a ragged last one, q and k with different head-block counts, a ragged
    last head block, partial rotary out of place (the pass-through copy)."""
    g = torch.Generator().manual_seed(7)
    xs = tuple(torch.randn(7, h, 40, generator=g).to(torch.bfloat16) for h in heads)
    if kind == "table":
        cos, sin = torch.rand(7, 1, 16, generator=g), torch.rand(7, 1, 16, generator=g)
        args = RopeArgs(xs, False, layout, 32, cos=cos, sin=sin)
    else:
        cache = rb.cos_sin_cache(64, 32)
        m = mrope.chunked([6, 5, 5]) if kind == "mrope" else None
        pos = torch.randint(0, 64, (3, 7) if m else (7,), generator=g)
        args = RopeArgs(xs, False, layout, 32, positions=pos, cache=cache, mrope=m)
    try:
        launch.set_config(2, 4, 1, qk_by_row=qk_by_row)
        plan = launch.plan_for(args)
        assert plan.values["QK_BY_ROW"] is (qk_by_row and len(xs) == 2)
        assert plan.grid == (4 * sum(-(-h // 4) for h in heads), 1, 1)
        got = launch.forward(args)
    finally:
        launch.set_config(None)
    for g_, w in zip(got, reference.run(args)):
        assert_bitwise_equal(g_, w)


def test_qk_program_order_default():
    """Row block by row block for tables, q's tiles first with positions (launch._qk_by_row)."""
    q, k = torch.randn(5, 4, 32), torch.randn(5, 2, 32)
    cos = torch.rand(5, 1, 16)
    assert launch.plan_for(RopeArgs((q, k), False, Layout.NEOX, 32, cos=cos, sin=cos)).values["QK_BY_ROW"] is True
    assert launch.plan_for(RopeArgs((q,), False, Layout.NEOX, 32, cos=cos, sin=cos)).values["QK_BY_ROW"] is False
    cached = RopeArgs((q, k), False, Layout.NEOX, 32, positions=torch.arange(5), cache=rb.cos_sin_cache(8, 32))
    assert launch.plan_for(cached).values["QK_BY_ROW"] is False


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("kind", ["table", "cached", "mrope"])
@pytest.mark.parametrize("layout", [Layout.NEOX, Layout.INTERLEAVED])
def test_kept_tables_either_way(keep, kind, layout):
    """The tables' loads with and without evict_last (kernel.py's KEEP_TABLES) give the same bits:
    q+k with cos/sin, positions into a cache, MRoPE's three rows."""
    g = torch.Generator().manual_seed(3)
    xs = tuple(torch.randn(5, h, 32, generator=g).to(torch.bfloat16) for h in (4, 2))
    if kind == "table":
        cos, sin = torch.rand(5, 1, 16, generator=g), torch.rand(5, 1, 16, generator=g)
        args = RopeArgs(xs, False, layout, 32, cos=cos, sin=sin)
    else:
        m = mrope.chunked([6, 5, 5]) if kind == "mrope" else None
        pos = torch.randint(0, 64, (3, 5) if m else (5,), generator=g)
        args = RopeArgs(xs, False, layout, 32, positions=pos, cache=rb.cos_sin_cache(64, 32), mrope=m)
    try:
        launch.set_config(None, keep_tables=keep)
        assert launch.plan_for(args).values["KEEP_TABLES"] is keep
        got = launch.forward(args)
    finally:
        launch.set_config(None)
    for g_, w in zip(got, reference.run(args)):
        assert_bitwise_equal(g_, w)


def test_keep_tables_rule(monkeypatch):
    """Tables are kept (evict_last) while they take at most a share of the GPU's L2; never on the
    interpreter, off the GPU or where the L2 size is unknown. The plan hands the rule the bytes
    the call's cos/sin span (a broadcast counted once), or one cache row per token."""
    class Props:
        name, major, minor, multi_processor_count, L2_cache_size = "NVIDIA Test GPU", 9, 0, 132, 60 << 20

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "_device_props", lambda index: Props())
    monkeypatch.setattr(environment, "triton_interpret", lambda: False)
    tuning.reload()
    try:
        share = (60 << 20) // tuning.KEEP_TABLES_SHARE
        assert tuning.keep_tables(2 << 20, gpu) and tuning.keep_tables(share, gpu)
        assert not tuning.keep_tables(share + 1, gpu) and not tuning.keep_tables(59 << 20, gpu)
        assert not tuning.keep_tables(2 << 20, torch.device("cpu"))
        Props.L2_cache_size = 0
        tuning.reload()
        assert not tuning.keep_tables(1, gpu)
    finally:
        tuning.reload()
    monkeypatch.setattr(environment, "triton_interpret", lambda: True)
    assert not tuning.keep_tables(1, gpu)
    monkeypatch.undo()

    seen = []
    monkeypatch.setattr(tuning, "keep_tables", lambda nbytes, device: seen.append(nbytes) or False)
    launch._PLANS.clear()
    x = torch.randn(2, 6, 3, 32)
    cos = torch.rand(6, 1, 16)  # broadcast over the batch: its 6 x 16 values once
    launch.plan_for(RopeArgs((x,), False, Layout.NEOX, 32, cos=cos, sin=cos.double()))
    q = torch.randn(7, 4, 32)
    launch.plan_for(RopeArgs((q,), False, Layout.NEOX, 24, positions=torch.arange(7),
                             cache=rb.cos_sin_cache(16, 24)))
    launch._PLANS.clear()
    assert seen == [6 * 16 * 4 + 6 * 16 * 8, 7 * 24 * 4]


def test_tile_table_lookup(monkeypatch, tmp_path):
    """A user file (written by ``tune``) beats the shipped table, which beats the rule; a class the
    table lacks takes the nearest measured one of the same kind, layout and size; a file for another
    kernel's tile format is ignored with a warning."""
    class Props:
        name, major, minor, multi_processor_count, L2_cache_size = "NVIDIA Test GPU", 9, 0, 132, 60 << 20

    monkeypatch.setattr(tuning, "_device_props", lambda index: Props())
    monkeypatch.setenv("ROPE_BACKENDS_CACHE_DIR", str(tmp_path))
    key = tuning.device_key(props=Props())
    assert key == "nvidia-test-gpu-sm90-132sm-60mb"
    tuning.reload()
    assert tuning.table_for(0).source == "rule"
    cls = tuning.ShapeClass("table", True, 2, 64, "large")
    doc = {"schema": tuning.SCHEMA, "tile_format": tuning.TILE_FORMAT,
           "entries": [tuning.entry_doc(cls, tuning.TileParams(32, 4, 32))]}
    path = tuning.user_table_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    tuning.reload()
    table = tuning.table_for(0)
    assert table.source == "user file" and table.params(cls) == tuning.TileParams(32, 4, 32)
    near = tuning.ShapeClass("table", True, 2, 32, "large")
    assert table.params(near) == tuning.TileParams(32, 4, 32)
    other = tuning.ShapeClass("cached", False, 2, 64, "decode")
    assert table.params(other) == tuning.rule(other)
    path.write_text(json.dumps(dict(doc, tile_format=tuning.TILE_FORMAT + 1)))
    tuning.reload()
    assert tuning.table_for(0).source == "rule"
    tuning.reload()


def test_tile_table_errors_name_the_entry():
    with pytest.raises(ValueError, match="schema"):
        tuning.parse_table({"schema": "other"}, "f.json")
    bad = {"schema": tuning.SCHEMA, "tile_format": tuning.TILE_FORMAT,
           "entries": [{"class": {"kind": "table", "interleaved": True, "elem_bytes": 2, "width": 64,
                                  "size": "huge"}, "params": {"units": 8, "block_h": 8, "vec_bytes": 16}}]}
    with pytest.raises(ValueError, match="entry 0"):
        tuning.parse_table(bad, "f.json")
    with pytest.raises(ValueError, match="units"):
        tuning.TileParams(6, 1, 16)


def test_shipped_tables_parse():
    for path in sorted(tuning._SHIPPED.glob("*.json")):
        entries = tuning.parse_table(json.loads(path.read_text()), str(path))
        assert entries, path


def test_direct_launch_path(monkeypatch):
    """The GPU's launch path, with stand-ins for Triton's objects: the first call of a (plan,
    pointer alignment) goes through run() and keeps a launcher made from what run returns; later
    calls hand that launcher the pointers' addresses (ints); another alignment compiles again.
    With Triton 3.6's NVIDIA launcher (``CudaLauncher``, C format ``iiiKKppOOOOOO``) and nothing that
    needs its Python wrapper, the C ``launch`` function is called bare with the plan's fixed tail."""
    calls = []

    class CLaunch:
        __name__ = "launch"

        def __call__(self, *args):
            calls.append(("raw", args))

    class FakeCudaLauncher:
        global_scratch_size = profile_scratch_size = 0
        launch_cooperative_grid = launch_pdl = False
        num_ctas = 1
        launch = CLaunch()

    class Compiled:
        function, packed_metadata = 1234, (4, 1, 0)
        run = FakeCudaLauncher()

        def __getitem__(self, grid):
            def runner(*args, stream=None):
                calls.append(("runner", tuple(grid), args, stream))
            return runner

    class Kernel:
        def run(self, *args, grid, warmup, **meta):
            calls.append(("run", grid, args))
            return Compiled()

    monkeypatch.setattr(launch, "_KERNEL", Kernel())
    monkeypatch.setattr(launch, "_PLANS", {})
    monkeypatch.setattr(launch, "_raw_stream", lambda device: 77)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(environment, "triton_interpret", lambda: False)
    x = torch.randn(4, 2, 32)
    cos = torch.rand(4, 1, 16)
    plan = launch.plan_for(_args(x, cos, cos))
    out = torch.empty_like(x)
    ptrs = (x, out, None, None, cos, cos, None, None, None)
    addresses = (x.data_ptr(), out.data_ptr(), None, None, cos.data_ptr(), cos.data_ptr(), None, None, None)

    monkeypatch.setattr(launch, "_RAW", [False])  # an unknown Triton: CompiledKernel[grid]
    launch._launch(plan, ptrs)
    launch._launch(plan, ptrs)
    assert [c[0] for c in calls] == ["run", "runner"]
    assert calls[1][2] == addresses + plan.tail and calls[1][3] == 77
    misaligned = torch.empty(4 * 2 * 32 + 1)[1:].view(4, 2, 32)  # 4 bytes off a 16-byte boundary
    launch._launch(plan, (misaligned,) + ptrs[1:])
    assert calls[-1][0] == "run" and len(plan.launchers) == 2

    calls.clear()
    plan.launchers.clear()
    monkeypatch.setattr(launch, "_RAW", [FakeCudaLauncher])  # Triton 3.6's NVIDIA launcher
    monkeypatch.setattr(launch, "_LIBCUDA", [False])  # no libcuda here: its C launch function
    launch._launch(plan, ptrs)
    launch._launch(plan, ptrs)
    assert [c[0] for c in calls] == ["run", "raw"]
    gx, gy, gz = plan.grid
    assert calls[1][1] == (gx, gy, gz, 77, 1234, False, False, None, None, (4, 1, 0), None, None, None,
                           *addresses, *plan.tail)

    calls.clear()
    plan.launchers.clear()
    # with libcuda (ctypes): cuLaunchKernel with the parameter block built once, pointers written
    # per call; the block holds every non-constexpr parameter in order, then two scratch pointers
    import ctypes

    names = launch._ARG_NAMES
    values = dict(zip(names, addresses + plan.tail))
    signature = {n: ("constexpr" if v is None or type(v) is bool or v == 1 or n.isupper() else
                     "*fp32" if n.endswith("_ptr") else "i64" if n == "qs0" else "i32") for n, v in values.items()}
    Compiled.src = type("Src", (), {"signature": signature})()
    Compiled.metadata = type("Meta", (), {"num_warps": plan.num_warps, "shared": 0})()
    launched = []

    def cu_launch(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        n = len(Compiled.src.signature) + 2
        block = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p * n)).contents
        packed = [n_ for n_, t in signature.items() if t != "constexpr"]
        got = {}
        for j, name in enumerate(packed):
            kind = ctypes.c_int64 if signature[name] in ("i64",) or signature[name].startswith("*") else ctypes.c_int32
            got[name] = ctypes.cast(block[j], ctypes.POINTER(kind)).contents.value
        # the parameter block is written and launched under the plan's lock (threads share it)
        assert all(lk.locked() for lk in locks)
        # the C call's argument types, as the real cuLaunchKernel (no argtypes) receives them
        assert isinstance(function, ctypes.c_void_p) and isinstance(stream, ctypes.c_void_p)
        assert all(type(v) is int for v in (gx, gy, gz, bx, by, bz, shared)) and extra is None
        launched.append(((function.value, gx, gy, gz, bx, shared, stream.value), got))
        return 0

    locks = []
    monkeypatch.setattr(launch, "_LIBCUDA", [cu_launch])
    launch._launch(plan, ptrs)
    locks.extend(f.block_lock for f in plan.launchers.values())
    assert locks and not any(lk.locked() for lk in locks)
    launch._launch(plan, ptrs)
    assert [c[0] for c in calls] == ["run"] and len(launched) == 1
    (function, gx_, gy_, gz_, threads, shared, stream), got = launched[0]
    assert (function, gx_, gy_, gz_, threads, stream) == (1234, *plan.grid, 32 * plan.num_warps, 77)
    assert got == {n: values[n] for n, t in signature.items() if t != "constexpr"}
    monkeypatch.setattr(launch, "_LIBCUDA", [lambda *a: 999])  # a launch error: Triton's launcher instead
    plan.launchers.clear()
    launch._launch(plan, ptrs)
    launch._launch(plan, ptrs)
    assert [c[0] for c in calls] == ["run", "run", "runner"] and launch._LIBCUDA == [False]
    del Compiled.src, Compiled.metadata

    calls.clear()
    plan.launchers.clear()
    FakeCudaLauncher.global_scratch_size = 64  # scratch memory: the Python wrapper is needed
    try:
        launch._launch(plan, ptrs)
        launch._launch(plan, ptrs)
    finally:
        FakeCudaLauncher.global_scratch_size = 0
    assert [c[0] for c in calls] == ["run", "runner"]


def test_interpreter_uses_few_programs():
    x = torch.empty(6, 4, 32)
    cos = torch.empty(6, 1, 16)
    plan = launch.plan_for(_args(x, cos, cos))
    assert plan.grid == (1, 1, 1)


def test_cache_hint_study_variants_still_apply(tmp_path, monkeypatch):
    """bench/studies/cache_hints.py patches kernel.py's loads and stores by their text: every
    variant must still apply to the shipped kernel (no hint left behind in its bare form) and stay
    bit-exact, on q+k with tables and on positions into a cache."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "studies" / "cache_hints.py"
    spec = importlib.util.spec_from_file_location("_study_cache_hints", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    bare = study._bare(study.KERNEL.read_text())
    assert 'cache_modifier=".cg")' not in bare and 'eviction_policy="evict_last")' not in bare
    variants = study._load_variants(tmp_path)
    assert list(variants) == list(study.VARIANTS)
    monkeypatch.setattr(launch, "_KERNEL", launch._kernel())
    q, k = torch.randn(5, 3, 32).to(torch.bfloat16), torch.randn(5, 1, 32).to(torch.bfloat16)
    cos, sin = rb.cos_sin(torch.arange(5), 32)
    cache = rb.cos_sin_cache(64, 32)
    pos = torch.tensor([3, 60, 0, 7, 7])
    want_qk = reference.run(RopeArgs((q, k), False, Layout.NEOX, 32, cos=cos[:, None], sin=sin[:, None]))
    want_cached = reference.run(RopeArgs((q, k), False, Layout.INTERLEAVED, 32, positions=pos, cache=cache))
    try:
        for name, kernel in variants.items():
            study._use(kernel)
            got = rb.apply_qk(q, k, cos[:, None], sin[:, None], backend="triton")
            for g, w in zip(got, want_qk):
                assert_bitwise_equal(g, w)
            qc, kc = q.clone(), k.clone()
            rb.apply_cached(qc, kc, pos, cache, layout="interleaved", backend="triton")
            for g, w in zip((qc, kc), want_cached):
                assert_bitwise_equal(g, w)
    finally:
        launch._PLANS.clear()
        rb.registry.invalidate()


def test_interpreter_launches_from_two_threads():
    """The interpreter patches triton.language while it runs a kernel: launches from two threads
    at once raised InterpreterError. They take turns (launch._INTERPRETER_LOCK)."""
    import concurrent.futures

    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(3, 2, 32, generator=g) for _ in range(8)]
    cos, sin = torch.rand(3, 1, 16, generator=g), torch.rand(3, 1, 16, generator=g)
    want = [reference.run(_args(x, cos, sin))[0] for x in xs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: rb.apply(x, cos, sin, backend="triton"), xs))
    for g_, w in zip(got, want):
        assert_bitwise_equal(g_, w)


# --------------------------------------------------------------------------------------------
# registration, import hygiene, probe

def test_registered_for_cuda_and_cpu_under_the_interpreter():
    b = rb.registry.get("triton")
    assert b.device_types == ("cuda",) and b.priority == 100
    assert b.explicit_device_types() == ("cpu",)
    assert b.probe() is None


def test_probe_reasons(monkeypatch):
    monkeypatch.setattr(environment, "triton_version", lambda: None)
    assert "not installed" in triton_backend.probe()
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(environment, "gpu_vendor", lambda: None)
    assert "no CUDA or ROCm GPU" in triton_backend.probe()
    assert triton_backend._explicit_device_types() == ()
    monkeypatch.setattr(environment, "gpu_vendor", lambda: "rocm")
    assert triton_backend.probe() is None


def test_importing_rope_backends_does_not_import_triton():
    """Only the probe imports triton, and only a call imports the kernel module."""
    code = ("import sys, rope_backends as rb; a = 'triton' in sys.modules; rb.list_backends(); "
            "print(a, 'rope_backends.backends.triton.kernel' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False False"


def test_repeated_calls_run_the_prepared_runner_bit_exact():
    """The second call of a signature runs the runner launch.prepare made (no validation, no
    plan lookup); its results equal the first call's, for duplicated cos/sin forms (the runner
    gets the caller's tensors, not the half-form views), q+k, and apply_cached in place on
    [T, H*D] and with MRoPE; launch.set_config drops the runners with the plans."""
    from rope_backends import dispatch

    T, D = 5, 32
    cache = rb.cos_sin_cache(16, D)
    cos, sin = rb.cos_sin(torch.arange(T), D)
    dup_neox = (torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None])
    dup_inter = (cos.repeat_interleave(2, -1)[:, None], sin.repeat_interleave(2, -1)[:, None])
    pos3 = torch.randint(0, 16, (3, T))
    calls = [
        lambda q, k: (rb.apply(q, *dup_neox, backend="triton"),),
        lambda q, k: (rb.apply(q, *dup_inter, layout="interleaved", backend="triton"),),
        lambda q, k: rb.apply_qk(q, k, cos[:, None], sin[:, None], backend="triton"),
        lambda q, k: rb.apply_cached(q.view(T, -1), k.view(T, -1), torch.arange(T), cache, head_dim=D, backend="triton"),
        lambda q, k: rb.apply_cached(q, k, pos3, cache, mrope=mrope.interleaved([6, 5, 5]), inplace=False,
                                     backend="triton"),
    ]
    q0, k0 = torch.randn(T, 4, D), torch.randn(T, 2, D)
    for n, call in enumerate(calls):
        dispatch._RUNNERS.clear()
        first = [t.clone() for t in call(q0.clone(), k0.clone()) if t is not None]
        assert len(dispatch._RUNNERS) == 1, n
        run = next(iter(dispatch._RUNNERS.values()))
        again = [t.clone() for t in call(q0.clone(), k0.clone()) if t is not None]
        assert next(iter(dispatch._RUNNERS.values())) is run
        for a, b in zip(first, again):
            assert_bitwise_equal(b, a)
    key = next(iter(dispatch._RUNNERS))
    assert dispatch._runner(key) is not None
    launch.set_config(None)
    assert dispatch._runner(key) is None  # stale after a planning change


def test_kernel_source_has_no_unary_minus_on_values():
    """Triton before 3.9 lowers a float negation as ``0.0 - x`` (it maps -0.0 to +0.0): the backward
    once gave -0.0 where the reference has +0.0, on the H100 only (CI's interpreter runs Triton 3.9,
    which negates exactly). The kernels must negate nothing but literals; sign flips are written
    into the add/sub instead."""
    import ast
    import inspect

    from rope_backends.backends.triton import kernel

    tree = ast.parse(inspect.getsource(kernel))
    bad = [f"line {n.lineno}" for n in ast.walk(tree)
           if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and not isinstance(n.operand, ast.Constant)]
    assert not bad, f"unary minus on a value in kernel.py at {bad}"


def test_tuner_end_to_end_with_stand_in_timing(monkeypatch, tmp_path):
    """``python -m rope_backends tune``'s logic on tiny workloads under the interpreter: every
    candidate is checked bit-exact before it is timed, the chosen params per class are the ones
    with the least slowdown over the class's workloads, and the document it writes is a table the
    lookup accepts. The GPU timing is a stand-in (here: fewer programs are faster)."""
    from rope_backends.backends.triton import tune

    class Props:
        name, major, minor, multi_processor_count, L2_cache_size = "NVIDIA Stand-in", 9, 0, 4, 1 << 20

    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props())
    monkeypatch.setattr(tune, "_sets", lambda w, device: 1)
    timed = []

    def fake_time(fns, nbytes):
        tile = launch._FORCED
        timed.append(tile)
        return 10.0 / (tile.block_t * tile.block_h) + 0.01 * tile.num_warps

    monkeypatch.setattr(tune, "_time_us", fake_time)
    monkeypatch.setattr(tune, "WORKLOADS", (
        tune.Workload("tiny interleaved", "apply", (1, 80, 4, 32), layout="interleaved"),
        tune.Workload("tiny q+k", "apply_qk", (80, 4, 32), 2, inplace=True),
        tune.Workload("tiny decode", "apply_cached", (2, 4, 32), 2, inplace=True),
        tune.Workload("tiny mrope", "apply_cached", (24, 2, 32), 1, inplace=True, mrope=(6, 5, 5)),
    ))
    doc = tune.tune(torch.device("cpu"), jobs=1, log=lambda *a: None)
    assert timed and launch._FORCED is None
    assert {r["workload"] for r in doc["workloads"]} == {"tiny interleaved", "tiny q+k", "tiny decode", "tiny mrope"}
    for r in doc["workloads"]:
        assert all(t[-1] is not None for t in r["tried"]), r  # every tile bit-exact
        assert r["best_us"] <= r["rule_us"]
    entries = tuning.parse_table(json.loads(json.dumps(doc)), "tuned")
    assert {c.size for c in entries} == {"small", "decode"} and len(entries) == 4
    assert {c.kind for c in entries} == {"table", "cached", "mrope"}
    assert "| tiny q+k |" in tune.table_markdown(doc)


def test_q_and_k_with_different_leading_dims_get_a_prepared_runner():
    """transformers' [B, H, S, D] with GQA puts the heads in the leading dims (dim -2 is S), so q and k
    need separate launches; a repeated call must still take a prepared runner (without one, every
    decode step of a patched model took the full path: validation, selection and planning)."""
    from rope_backends import dispatch

    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 3, 16, generator=g)
    cos, sin = rb.cos_sin(torch.arange(3), 16)
    c, s = cos[None, None], sin[None, None]  # [1, 1, S, r/2]
    assert launch.plan_for(_args(q, c, s)) is not None
    dispatch._RUNNERS.clear()
    dispatch._RECENT_QK.clear()
    first = rb.apply_qk(q, k, c, s, backend="triton")
    assert len(dispatch._RUNNERS) == 1
    again = rb.apply_qk(q.clone(), k.clone(), c, s, backend="triton")
    for got, want in zip(again, first):
        assert_bitwise_equal(got, want)
    args = RopeArgs((q, k), False, Layout.NEOX, 16, cos=c, sin=s)
    for got, want in zip(first, reference.run(args)):
        assert_bitwise_equal(got, want)
