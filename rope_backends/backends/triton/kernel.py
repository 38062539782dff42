"""The one Triton kernel family of the ``triton`` backend.

``rope_kernel`` rotates up to two tensors (q and k, one launch) whose geometry the host has
reduced to ``[L0, L1, L2, heads, head_dim]`` (launch.py collapses any leading dims into at most
three, jointly for every operand). A *unit* is one (token, head) row of ``head_dim`` elements;
each program rotates ``BLOCK_M`` consecutive units of q or of k. Constexprs select the variant:

    LAYOUT         0 = neox (pair i = (i, i + half)), 1 = interleaved (pair i = (2i, 2i + 1))
    CONJUGATE      rotate by -theta (the backward): bit-identical to reference.py's negated sin
    HAS_POSITIONS  cos/sin come from ``cache[position]``, gathered here (apply_cached)
    MROPE          pair i reads the position row ``axis_map[i]`` of ``positions[3, ...]``
    HAS_K          a second tensor (k) is served by the programs after the first ``q_programs``
    COPY_PASS      copy dims ``[ROT, HEAD_DIM)`` to the output (out of place, partial rotary_dim)
    INT64          index arithmetic in int64 (some operand spans 2**31 elements or more)

Numerics are reference.py's, step by step: operands converted to float32 (exact; a float64 cache
is rounded to nearest even like ``Tensor.float()``), four products each rounded to float32 (the
launch passes ``enable_fp_fusion=False`` so nothing contracts into an FMA), one add/sub, one
round-to-nearest-even to the output dtype. bfloat16 is rounded with explicit bit arithmetic
because the Triton interpreter's own float32 -> bfloat16 cast truncates; the same source is then
bit-exact under ``TRITON_INTERPRET=1`` and on the GPU.

This module holds kernels only: no torch, no host logic, no launch options (see launch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope_kernel"]


@triton.jit
def _f32(v):
    """Any float -> float32 (reference step 1): exact for fp16/bf16, round to nearest even from
    float64 (as ``Tensor.float()``)."""
    if v.dtype == tl.bfloat16:
        # by bits: the interpreter's bfloat16 -> float32 cast gets subnormals wrong
        bits = v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """float32 -> DTYPE, round to nearest even (reference step 4)."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        # add 0x7FFF plus the lowest kept bit: ties go to even, overflow carries into the
        # exponent (the largest finite floats become inf, as torch rounds them)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN must stay NaN: the addition could carry a NaN payload into inf; keep it quiet
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        top = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.float32:
        return v
    else:
        # float16: the GPU converts with cvt.rn, the interpreter with numpy's astype; both are
        # round-to-nearest-even (tests/test_triton_backend.py checks the interpreter on all bits)
        return v.to(DTYPE)


@triton.jit
def _rotate_units(
    # the tensor served by this program and its output (the same pointer when in place)
    x_ptr, o_ptr,
    first_unit, n_units, H, L1, L2,
    xs0, xs1, xs2, xsh, xsd,          # input strides: lead dims L0, L1, L2, heads, head_dim
    os0, os1, os2, osh, osd,          # output strides, likewise
    # explicit cos/sin (apply, apply_qk): half form, strides as broadcast to this tensor
    cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
    # positions into a cache (apply_cached)
    pos_ptr, ps0, ps1, ps2, psr,      # positions strides over L0, L1, L2; psr: the 3 MRoPE rows
    cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
    LAYOUT: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POSITIONS: tl.constexpr, MROPE: tl.constexpr,
    COPY_PASS: tl.constexpr,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # ---- which (token, head) rows: a [BLOCK_M] vector of units, decomposed into lead dims + head
    m = first_unit + tl.arange(0, BLOCK_M)
    unit_ok = m < n_units
    h = m % H
    r = m // H
    l2 = r % L2  # L1 and L2 are usually 1 after collapsing; Triton specialises 1, so this folds
    r = r // L2
    l1 = r % L1
    l0 = r // L1
    x_row = l0 * xs0 + l1 * xs1 + l2 * xs2 + h * xsh
    o_row = l0 * os0 + l1 * os1 + l2 * os2 + h * osh

    i = tl.arange(0, BLOCK_HALF)
    pair_ok = i < HALF
    mask = unit_ok[:, None] & pair_ok[None, :]

    # ---- cos/sin of every pair, float32 (reference step 1)
    if HAS_POSITIONS:
        p_row = l0 * ps0 + l1 * ps1 + l2 * ps2
        if MROPE:
            # the three position rows once per unit, then a select per pair: a gather of
            # positions[axis[i]] per element costs BLOCK_HALF loads per unit (the interleaved
            # map alternates rows pair by pair)
            axis = tl.load(axis_ptr + i, mask=pair_ok, other=0)[None, :]
            p_t = tl.load(pos_ptr + p_row, mask=unit_ok, other=0).to(tl.int64)[:, None]
            p_h = tl.load(pos_ptr + p_row + psr, mask=unit_ok, other=0).to(tl.int64)[:, None]
            p_w = tl.load(pos_ptr + p_row + 2 * psr, mask=unit_ok, other=0).to(tl.int64)[:, None]
            pos = tl.where(axis == 0, p_t, tl.where(axis == 1, p_h, p_w))
        else:
            pos = tl.load(pos_ptr + p_row, mask=unit_ok, other=0).to(tl.int64)[:, None]
        # an out-of-range position reads nothing (masked) and gives NaN, as reference.py does
        valid = (pos >= 0) & (pos < max_pos)
        safe = tl.where(valid, pos, 0)
        c_off = safe * cache_s0 + i[None, :] * cache_s1
        c = _f32(tl.load(cache_ptr + c_off, mask=mask & valid, other=0.0))
        s = _f32(tl.load(cache_ptr + c_off + HALF * cache_s1, mask=mask & valid, other=0.0))
        c = tl.where(valid, c, float("nan"))
        s = tl.where(valid, s, float("nan"))
    else:
        c_row = l0 * cs0 + l1 * cs1 + l2 * cs2 + h * csh
        c_off = c_row[:, None] + i[None, :] * csi
        c = _f32(tl.load(cos_ptr + c_off, mask=mask, other=0.0))
        s = _f32(tl.load(sin_ptr + c_off, mask=mask, other=0.0))

    # ---- the pairs (a, b)
    if LAYOUT == 0:
        a_off = i[None, :] * xsd
        b_off = (i[None, :] + HALF) * xsd
        a = _f32(tl.load(x_ptr + x_row[:, None] + a_off, mask=mask, other=0.0))
        b = _f32(tl.load(x_ptr + x_row[:, None] + b_off, mask=mask, other=0.0))
    else:
        # one contiguous load of the rotated part, split into even/odd elements in registers
        d = tl.arange(0, 2 * BLOCK_HALF)
        d_mask = unit_ok[:, None] & (d < ROT)[None, :]
        ab = _f32(tl.load(x_ptr + x_row[:, None] + d[None, :] * xsd, mask=d_mask, other=0.0))
        a, b = tl.split(tl.reshape(ab, (BLOCK_M, BLOCK_HALF, 2)))

    # ---- reference steps 2-3: four rounded products, then one sub / add (no FMA: see launch.py)
    ac = a * c
    bs = b * s
    bc = b * c
    as_ = a * s
    if CONJUGATE:
        # the reference negates s first; b * (-s) == -(b * s) exactly, and x - (-y) == x + y, so
        # swapping the signs of the add/sub is bit-identical. A unary minus is not: some Triton
        # versions lower it as 0.0 - s, which turns s = -0.0 into +0.0 (found on the H100 by the
        # long fuzz profile: a -0.0 gradient where the reference gives +0.0)
        a_new = _round_to(ac + bs, o_ptr.dtype.element_ty)
        b_new = _round_to(bc - as_, o_ptr.dtype.element_ty)
    else:
        a_new = _round_to(ac - bs, o_ptr.dtype.element_ty)
        b_new = _round_to(bc + as_, o_ptr.dtype.element_ty)

    if LAYOUT == 0:
        tl.store(o_ptr + o_row[:, None] + i[None, :] * osd, a_new, mask=mask)
        tl.store(o_ptr + o_row[:, None] + (i[None, :] + HALF) * osd, b_new, mask=mask)
    else:
        ab_new = tl.reshape(tl.join(a_new, b_new), (BLOCK_M, 2 * BLOCK_HALF))
        tl.store(o_ptr + o_row[:, None] + d[None, :] * osd, ab_new, mask=d_mask)

    # ---- reference step 5: the pass-through part, bit for bit (out of place only)
    if COPY_PASS:
        j = ROT + tl.arange(0, BLOCK_PASS)
        j_mask = unit_ok[:, None] & (j < HEAD_DIM)[None, :]
        keep = tl.load(x_ptr + x_row[:, None] + j[None, :] * xsd, mask=j_mask)
        tl.store(o_ptr + o_row[:, None] + j[None, :] * osd, keep, mask=j_mask)


@triton.jit
def rope_kernel(
    # pointers (unused ones are None: their constexpr branch is compiled out)
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, cache_ptr, axis_ptr,
    # shared geometry: inner lead sizes, programs serving q (the rest serve k)
    L1, L2, q_programs,
    # q: units (L0*L1*L2*Hq), heads, input strides, output strides
    q_units, q_heads, qs0, qs1, qs2, qsh, qsd, qos0, qos1, qos2, qosh, qosd,
    # k likewise (ignored unless HAS_K)
    k_units, k_heads, ks0, ks1, ks2, ksh, ksd, kos0, kos1, kos2, kosh, kosd,
    # cos/sin strides over L0, L1, L2, heads, pairs (sin has cos's strides: launch.py ensures it)
    cs0, cs1, cs2, csh, csi,
    # positions strides over L0, L1, L2 and between the 3 MRoPE rows; cache strides and rows
    ps0, ps1, ps2, psr, cache_s0, cache_s1, max_pos,
    LAYOUT: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POSITIONS: tl.constexpr, MROPE: tl.constexpr,
    HAS_K: tl.constexpr, COPY_PASS: tl.constexpr, INT64: tl.constexpr,
    HALF: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    # programs [0, q_programs) serve q, the rest serve k (q and k in one launch)
    if HAS_K:
        if pid >= q_programs:
            _rotate_units(
                k_ptr, ko_ptr, (pid - q_programs) * BLOCK_M, k_units, k_heads, L1, L2,
                ks0, ks1, ks2, ksh, ksd, kos0, kos1, kos2, kosh, kosd,
                cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
                pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
                LAYOUT, CONJUGATE, HAS_POSITIONS, MROPE, COPY_PASS, HALF, ROT, HEAD_DIM,
                BLOCK_M, BLOCK_HALF, BLOCK_PASS,
            )
        else:
            _rotate_units(
                q_ptr, qo_ptr, pid * BLOCK_M, q_units, q_heads, L1, L2,
                qs0, qs1, qs2, qsh, qsd, qos0, qos1, qos2, qosh, qosd,
                cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
                pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
                LAYOUT, CONJUGATE, HAS_POSITIONS, MROPE, COPY_PASS, HALF, ROT, HEAD_DIM,
                BLOCK_M, BLOCK_HALF, BLOCK_PASS,
            )
    else:
        _rotate_units(
            q_ptr, qo_ptr, pid * BLOCK_M, q_units, q_heads, L1, L2,
            qs0, qs1, qs2, qsh, qsd, qos0, qos1, qos2, qosh, qosd,
            cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
            pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
            LAYOUT, CONJUGATE, HAS_POSITIONS, MROPE, COPY_PASS, HALF, ROT, HEAD_DIM,
            BLOCK_M, BLOCK_HALF, BLOCK_PASS,
        )
