"""The one Triton kernel family of the ``triton`` backend.

``rope_kernel`` rotates up to two tensors (q and k, one launch) whose geometry the host has
reduced to ``[L0, L1, L2, heads, head_dim]`` (launch.py collapses any leading dims into at most
three, jointly for every operand). A *row* is one index into ``[L0, L1, L2]`` (a token); each
program rotates a tile of ``BLOCK_T`` rows x ``BLOCK_H`` heads of q or of k. Its cos/sin (or its
positions and their cache rows) are loaded once per row and shared by the tile's heads, unless
they differ per head (``COS_PER_HEAD``). Constexprs select the variant:

    INTERLEAVED    pair i is (2i, 2i + 1) (GPT-J, complex form); else (i, i + ROT / 2) (neox)
    CONJUGATE      rotate by -theta (the backward): bit-identical to reference.py's negated sin
    HAS_POSITIONS  cos/sin come from ``cache[position]``, gathered here (apply_cached)
    MROPE          pair i reads the position row ``axis_map[i]`` of ``positions[3, ...]``
    HAS_K          a second tensor (k) is served by the programs after the first ``q_programs``
    QK_BY_ROW      with HAS_K: program ids run row block by row block, each row block's q head
                   blocks then its k head blocks, so q and k of one token are in flight together
    COPY_PASS      copy dims ``[ROT, HEAD_DIM)`` to the output (out of place, partial rotary_dim)
    COS_PER_HEAD   cos/sin vary along the heads (else they broadcast over them)
    INT64          index arithmetic in int64 (some operand spans 2**31 elements or more)
    EXACT_CASTS    convert bfloat16 by bit arithmetic (the Triton interpreter; see below)
    KEEP_TABLES    load cos/sin (or the cache rows) ``evict_last``: they are re-read by every head
                   block and batch of a token, and small enough that keeping them costs the stream
                   little (tuning.keep_tables decides from their bytes and the device's L2)
    ROT, HEAD_DIM  rotated width and head_dim (constexpr: masks along them are then known to be
                   uniform over whole vectors, so loads and stores are 16 bytes wide)
    BLOCK_T, BLOCK_H  the tile

Numerics are reference.py's, step by step: operands converted to float32 (exact; a float64 cache
is rounded to nearest even like ``Tensor.float()``), four products each rounded to float32 (the
launch passes ``enable_fp_fusion=False`` so nothing contracts into an FMA), one add/sub, one
round-to-nearest-even to the output dtype. On a GPU the hardware conversions already round to
nearest even (``cvt.rn``); the Triton interpreter's float32 -> bfloat16 cast truncates and its
bfloat16 -> float32 cast gets subnormals wrong, so under the interpreter (``EXACT_CASTS``)
bfloat16 goes through explicit bit arithmetic instead. The same source is bit-exact both ways.

The argument list below is the one place that defines the kernel's interface: launch.py builds
every launch from ``rope_kernel.arg_names`` and the values its plan holds by name.

This module holds kernels only: no torch, no host logic, no launch options (see launch.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["rope_kernel"]


@triton.jit
def _f32(v, EXACT_CASTS: tl.constexpr):
    """Any float -> float32 (reference step 1): exact for fp16/bf16, round to nearest even from
    float64 (as ``Tensor.float()``)."""
    if EXACT_CASTS and v.dtype == tl.bfloat16:
        # by bits: the interpreter's bfloat16 -> float32 cast gets subnormals wrong
        bits = v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr, EXACT_CASTS: tl.constexpr):
    """float32 -> DTYPE, round to nearest even (reference step 4)."""
    if DTYPE == tl.float32:
        return v
    elif EXACT_CASTS and DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        # add 0x7FFF plus the lowest kept bit: ties go to even, overflow carries into the
        # exponent (the largest finite floats become inf, as torch rounds them)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN must stay NaN: the addition could carry a NaN payload into inf; keep it quiet
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        top = tl.where(is_nan, (bits >> 16) | 0x40, rounded)
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        # the GPU converts with cvt.rn (round to nearest even); the interpreter converts fp16 with
        # numpy's astype, also RNE (tests/test_triton_backend.py checks it on all bit patterns)
        return v.to(DTYPE, fp_downcast_rounding="rtne")


@triton.jit
def _load_table(ptr, mask, KEEP_TABLES: tl.constexpr):
    """A load of cos/sin or cache values (0 where masked), ``evict_last`` with ``KEEP_TABLES``."""
    if KEEP_TABLES:
        v = tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_last")
    else:
        v = tl.load(ptr, mask=mask, other=0.0)
    return v


@triton.jit
def _cache_rows(pos_ptr, p_off, cache_ptr, cache_s0, cache_s1, max_pos, row_ok, pair_ok, i,
                HALF: tl.constexpr, EXACT_CASTS: tl.constexpr, KEEP_TABLES: tl.constexpr):
    """cos, sin ``[BLOCK_T, BLOCK_HALF]`` float32 of each row's position (``pos_ptr + p_off``).
    An out-of-range position reads nothing (masked) and gives NaN, as reference.py does."""
    pos = tl.load(pos_ptr + p_off, mask=row_ok, other=0).to(tl.int64)[:, None]
    valid = (pos >= 0) & (pos < max_pos)
    c_off = tl.where(valid, pos, 0) * cache_s0 + i[None, :] * cache_s1
    c_mask = row_ok[:, None] & pair_ok[None, :] & valid
    c = _f32(_load_table(cache_ptr + c_off, c_mask, KEEP_TABLES), EXACT_CASTS)
    s = _f32(_load_table(cache_ptr + c_off + HALF * cache_s1, c_mask, KEEP_TABLES), EXACT_CASTS)
    return tl.where(valid, c, float("nan")), tl.where(valid, s, float("nan"))


@triton.jit
def _rows(row_block, rows, L1, L2, BLOCK_T: tl.constexpr):
    """The tile's rows ``[BLOCK_T]`` as indices into the lead dims ``[L0, L1, L2]``, and which exist."""
    r = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
    l2 = r % L2  # L1 and L2 are usually 1 after collapsing; Triton specialises 1, so this folds
    t = r // L2
    return t // L1, t % L1, l2, r < rows


@triton.jit
def _units(l0, l1, l2, row_ok, head_block, heads, xs0, xs1, xs2, xsh, os0, os1, os2, osh,
           BLOCK_H: tl.constexpr):
    """The tile's heads ``[BLOCK_H]``; input and output offsets of each (row, head) ``[T, H]``
    (int64 when ``head_block`` is: the kernel widens the program id under ``INT64``)."""
    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    unit_ok = row_ok[:, None] & (h < heads)[None, :]
    x_unit = (l0 * xs0 + l1 * xs1 + l2 * xs2)[:, None] + h[None, :] * xsh
    o_unit = (l0 * os0 + l1 * os1 + l2 * os2)[:, None] + h[None, :] * osh
    return h, unit_ok, x_unit, o_unit


@triton.jit
def _cos_sin(l0, l1, l2, row_ok, h, unit_ok,
             cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
             pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
             HAS_POSITIONS: tl.constexpr, MROPE: tl.constexpr, COS_PER_HEAD: tl.constexpr,
             EXACT_CASTS: tl.constexpr, KEEP_TABLES: tl.constexpr, ROT: tl.constexpr):
    """cos, sin float32 of every pair (reference step 1), ``[T, 1, pairs]`` (shared by the heads)
    or ``[T, H, pairs]`` (``COS_PER_HEAD``: heads ``h``, those in ``unit_ok [T, H]``)."""
    HALF: tl.constexpr = ROT // 2
    i = tl.arange(0, triton.next_power_of_2(HALF))
    pair_ok = i < HALF
    if HAS_POSITIONS:
        p_row = l0 * ps0 + l1 * ps1 + l2 * ps2
        if MROPE:
            # the three position rows once per row, their three cache rows loaded whole (contiguous,
            # 16-byte loads, from L2), then a select per pair by the axis map: a gather of
            # cache[positions[axis[i]], i] per element is one scalar load per pair
            axis = tl.load(axis_ptr + i, mask=pair_ok, other=0)[None, :]
            c, s = _cache_rows(pos_ptr, p_row, cache_ptr, cache_s0, cache_s1, max_pos, row_ok, pair_ok, i,
                               HALF, EXACT_CASTS, KEEP_TABLES)
            c_h, s_h = _cache_rows(pos_ptr, p_row + psr, cache_ptr, cache_s0, cache_s1, max_pos, row_ok, pair_ok,
                                   i, HALF, EXACT_CASTS, KEEP_TABLES)
            c_w, s_w = _cache_rows(pos_ptr, p_row + 2 * psr, cache_ptr, cache_s0, cache_s1, max_pos, row_ok,
                                   pair_ok, i, HALF, EXACT_CASTS, KEEP_TABLES)
            c = tl.where(axis == 0, c, tl.where(axis == 1, c_h, c_w))[:, None, :]
            s = tl.where(axis == 0, s, tl.where(axis == 1, s_h, s_w))[:, None, :]
        else:
            c, s = _cache_rows(pos_ptr, p_row, cache_ptr, cache_s0, cache_s1, max_pos, row_ok, pair_ok, i,
                               HALF, EXACT_CASTS, KEEP_TABLES)
            c = c[:, None, :]
            s = s[:, None, :]
    else:
        c_row = l0 * cs0 + l1 * cs1 + l2 * cs2
        if COS_PER_HEAD:
            c_off = (c_row[:, None] + h[None, :] * csh)[:, :, None] + i[None, None, :] * csi
            mask = unit_ok[:, :, None] & pair_ok[None, None, :]
            c = _f32(tl.load(cos_ptr + c_off, mask=mask, other=0.0), EXACT_CASTS)
            s = _f32(tl.load(sin_ptr + c_off, mask=mask, other=0.0), EXACT_CASTS)
        else:
            c_off = c_row[:, None] + i[None, :] * csi
            c_mask = row_ok[:, None] & pair_ok[None, :]
            c = _f32(_load_table(cos_ptr + c_off, c_mask, KEEP_TABLES), EXACT_CASTS)[:, None, :]
            s = _f32(_load_table(sin_ptr + c_off, c_mask, KEEP_TABLES), EXACT_CASTS)[:, None, :]
    return c, s


@triton.jit
def _load_pairs(x_ptr, x_unit, unit_ok, xsd, INTERLEAVED: tl.constexpr, EXACT_CASTS: tl.constexpr,
                ROT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """The pairs (a, b) of the tile, float32 ``[T, H, pairs]`` each. They are read once: .cg keeps
    them out of L1, while the cos/sin rows that every head block and batch of a token re-reads may
    be loaded evict_last (``KEEP_TABLES``), so the stream does not push them out of L2."""
    HALF: tl.constexpr = ROT // 2
    BLOCK_HALF: tl.constexpr = triton.next_power_of_2(HALF)
    if INTERLEAVED:
        # one contiguous load of the rotated part, split into even/odd elements in registers
        d = tl.arange(0, 2 * BLOCK_HALF)
        d_mask = unit_ok[:, :, None] & (d < ROT)[None, None, :]
        x_off = x_unit[:, :, None] + d[None, None, :] * xsd
        ab = _f32(tl.load(x_ptr + x_off, mask=d_mask, other=0.0, cache_modifier=".cg"), EXACT_CASTS)
        a, b = tl.split(tl.reshape(ab, (BLOCK_T, BLOCK_H, BLOCK_HALF, 2)))
    else:
        i = tl.arange(0, BLOCK_HALF)
        mask = unit_ok[:, :, None] & (i < HALF)[None, None, :]
        x_off = x_unit[:, :, None] + i[None, None, :] * xsd
        a = _f32(tl.load(x_ptr + x_off, mask=mask, other=0.0, cache_modifier=".cg"), EXACT_CASTS)
        b = _f32(tl.load(x_ptr + x_off + HALF * xsd, mask=mask, other=0.0, cache_modifier=".cg"), EXACT_CASTS)
    return a, b


@triton.jit
def _rotate_store(a, b, c, s, x_ptr, o_ptr, x_unit, o_unit, unit_ok, xsd, osd,
                  INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_PASS: tl.constexpr,
                  EXACT_CASTS: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Reference steps 2-5 on the tile: four rounded products, one sub / add (no FMA: see
    launch.py), the round to the output dtype, the store; then the pass-through part."""
    HALF: tl.constexpr = ROT // 2
    BLOCK_HALF: tl.constexpr = triton.next_power_of_2(HALF)
    ac = a * c
    bs = b * s
    bc = b * c
    as_ = a * s
    if CONJUGATE:
        # the reference negates s first; b * (-s) == -(b * s) exactly, and x - (-y) == x + y, so
        # swapping the signs of the add/sub is bit-identical. A unary minus is not: some Triton
        # versions lower it as 0.0 - s, which turns s = -0.0 into +0.0 (found on the H100 by the
        # long fuzz profile: a -0.0 gradient where the reference gives +0.0)
        a_new = _round_to(ac + bs, o_ptr.dtype.element_ty, EXACT_CASTS)
        b_new = _round_to(bc - as_, o_ptr.dtype.element_ty, EXACT_CASTS)
    else:
        a_new = _round_to(ac - bs, o_ptr.dtype.element_ty, EXACT_CASTS)
        b_new = _round_to(bc + as_, o_ptr.dtype.element_ty, EXACT_CASTS)

    if INTERLEAVED:
        d = tl.arange(0, 2 * BLOCK_HALF)
        d_mask = unit_ok[:, :, None] & (d < ROT)[None, None, :]
        ab_new = tl.reshape(tl.join(a_new, b_new), (BLOCK_T, BLOCK_H, 2 * BLOCK_HALF))
        tl.store(o_ptr + o_unit[:, :, None] + d[None, None, :] * osd, ab_new, mask=d_mask)
    else:
        i = tl.arange(0, BLOCK_HALF)
        mask = unit_ok[:, :, None] & (i < HALF)[None, None, :]
        o_off = o_unit[:, :, None] + i[None, None, :] * osd
        tl.store(o_ptr + o_off, a_new, mask=mask)
        tl.store(o_ptr + o_off + HALF * osd, b_new, mask=mask)

    # reference step 5: the pass-through part, bit for bit (out of place only)
    if COPY_PASS:
        BLOCK_PASS: tl.constexpr = triton.next_power_of_2(HEAD_DIM - ROT)
        j = ROT + tl.arange(0, BLOCK_PASS)
        j_mask = unit_ok[:, :, None] & (j < HEAD_DIM)[None, None, :]
        keep = tl.load(x_ptr + x_unit[:, :, None] + j[None, None, :] * xsd, mask=j_mask)
        tl.store(o_ptr + o_unit[:, :, None] + j[None, None, :] * osd, keep, mask=j_mask)


@triton.jit
def _rotate_tile(
    # the tensor this program serves and its output (the same pointer when in place)
    x_ptr, o_ptr, row_block, head_block, rows, L1, L2, heads,
    xs0, xs1, xs2, xsh, xsd,          # input strides: lead dims L0, L1, L2, heads, head_dim
    os0, os1, os2, osh, osd,          # output strides, likewise
    # explicit cos/sin (apply, apply_qk): half form, strides as broadcast to this tensor
    cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
    # positions into a cache (apply_cached)
    pos_ptr, ps0, ps1, ps2, psr,      # positions strides over L0, L1, L2; psr: the 3 MRoPE rows
    cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POSITIONS: tl.constexpr,
    MROPE: tl.constexpr, COPY_PASS: tl.constexpr, COS_PER_HEAD: tl.constexpr, EXACT_CASTS: tl.constexpr,
    KEEP_TABLES: tl.constexpr, ROT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One tile: ``BLOCK_T`` rows x ``BLOCK_H`` heads of one tensor."""
    l0, l1, l2, row_ok = _rows(row_block, rows, L1, L2, BLOCK_T)
    h, unit_ok, x_unit, o_unit = _units(l0, l1, l2, row_ok, head_block, heads, xs0, xs1, xs2, xsh,
                                        os0, os1, os2, osh, BLOCK_H)
    # the pairs first: they do not wait for the position -> cache chain
    a, b = _load_pairs(x_ptr, x_unit, unit_ok, xsd, INTERLEAVED, EXACT_CASTS, ROT, BLOCK_T, BLOCK_H)
    c, s = _cos_sin(l0, l1, l2, row_ok, h, unit_ok, cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
                    pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
                    HAS_POSITIONS, MROPE, COS_PER_HEAD, EXACT_CASTS, KEEP_TABLES, ROT)
    _rotate_store(a, b, c, s, x_ptr, o_ptr, x_unit, o_unit, unit_ok, xsd, osd,
                  INTERLEAVED, CONJUGATE, COPY_PASS, EXACT_CASTS, ROT, HEAD_DIM, BLOCK_T, BLOCK_H)


@triton.jit
def rope_kernel(
    # pointers (unused ones are None: their constexpr branch is compiled out)
    q_ptr, qo_ptr, k_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, cache_ptr, axis_ptr,
    # rows: the collapsed lead dims [L0, L1, L2] (rows = L0 * L1 * L2), shared by q and k
    rows, L1, L2,
    # programs [0, q_programs) serve q's tiles, head blocks fastest; the rest serve k's
    q_programs, q_head_blocks, k_head_blocks,
    # q: heads, input strides (L0, L1, L2, heads, head_dim), output strides likewise
    q_heads, qs0, qs1, qs2, qsh, qsd, qos0, qos1, qos2, qosh, qosd,
    # k likewise (ignored unless HAS_K)
    k_heads, ks0, ks1, ks2, ksh, ksd, kos0, kos1, kos2, kosh, kosd,
    # cos/sin strides over L0, L1, L2, heads, pairs (sin has cos's strides: launch.py ensures it)
    cs0, cs1, cs2, csh, csi,
    # positions strides over L0, L1, L2 and between the 3 MRoPE rows; cache strides and rows
    ps0, ps1, ps2, psr, cache_s0, cache_s1, max_pos,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, HAS_POSITIONS: tl.constexpr, MROPE: tl.constexpr,
    HAS_K: tl.constexpr, QK_BY_ROW: tl.constexpr, COPY_PASS: tl.constexpr, COS_PER_HEAD: tl.constexpr,
    INT64: tl.constexpr, EXACT_CASTS: tl.constexpr, KEEP_TABLES: tl.constexpr, ROT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    if HAS_K:
        if QK_BY_ROW:
            # the same tiles in another order: map this program to the id it has when all of q's
            # tiles come first (the order below is written once, for that numbering)
            per_row = q_head_blocks + k_head_blocks
            row_block = pid // per_row
            j = pid % per_row
            pid = tl.where(j < q_head_blocks, row_block * q_head_blocks + j,
                           q_programs + row_block * k_head_blocks + (j - q_head_blocks))
        if pid >= q_programs:
            tile = pid - q_programs
            _rotate_tile(
                k_ptr, ko_ptr, tile // k_head_blocks, tile % k_head_blocks, rows, L1, L2, k_heads,
                ks0, ks1, ks2, ksh, ksd, kos0, kos1, kos2, kosh, kosd,
                cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
                pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
                INTERLEAVED, CONJUGATE, HAS_POSITIONS, MROPE, COPY_PASS, COS_PER_HEAD, EXACT_CASTS,
                KEEP_TABLES, ROT, HEAD_DIM, BLOCK_T, BLOCK_H,
            )
        else:
            _rotate_tile(
                q_ptr, qo_ptr, pid // q_head_blocks, pid % q_head_blocks, rows, L1, L2, q_heads,
                qs0, qs1, qs2, qsh, qsd, qos0, qos1, qos2, qosh, qosd,
                cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
                pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
                INTERLEAVED, CONJUGATE, HAS_POSITIONS, MROPE, COPY_PASS, COS_PER_HEAD, EXACT_CASTS,
                KEEP_TABLES, ROT, HEAD_DIM, BLOCK_T, BLOCK_H,
            )
    else:
        _rotate_tile(
            q_ptr, qo_ptr, pid // q_head_blocks, pid % q_head_blocks, rows, L1, L2, q_heads,
            qs0, qs1, qs2, qsh, qsd, qos0, qos1, qos2, qosh, qosd,
            cos_ptr, sin_ptr, cs0, cs1, cs2, csh, csi,
            pos_ptr, ps0, ps1, ps2, psr, cache_ptr, cache_s0, cache_s1, max_pos, axis_ptr,
            INTERLEAVED, CONJUGATE, HAS_POSITIONS, MROPE, COPY_PASS, COS_PER_HEAD, EXACT_CASTS,
            KEEP_TABLES, ROT, HEAD_DIM, BLOCK_T, BLOCK_H,
        )
