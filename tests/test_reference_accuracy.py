"""How far the reference's fp16/bf16 (and fp32) outputs are from the exact result, and what is
guaranteed. Run with ``-s`` to see the figures.

What the contract guarantees (docs/contract.md, "Numerics"), and what this file asserts:

1. The output is the fp32 result rounded once: ``out == RN_dtype(y)`` with
   ``y = RN32(RN32(a*c) - RN32(b*s))`` -- checked exactly against an fp32 computation written
   here.
2. Hence a rigorous bound: ``|y - r| <= E = 2**-24 (|ac| + |bs|) + 2**-23 |y| (+ underflow)``
   where ``r = a*c - b*s`` exactly, so ``RN(r - E) <= out <= RN(r + E)``.
3. Hence correct rounding wherever that window cannot straddle a rounding boundary of the output
   dtype: where ``RN(r - E) == RN(r + E)``, ``out == RN(r)``.

What it does NOT guarantee: correct rounding of the exact result everywhere. Near a rounding
boundary of fp16/bf16 (double rounding fp32 -> dtype) or under cancellation (``|r| << |ac|``) the
output can differ from ``RN(r)``; the share and the worst case in ulps are measured and printed.
The exact result is computed in float64 as ``hi + lo`` (products of fp32 values are exact in
float64; TwoSum gives the exact difference), and rounded to the dtype by integer arithmetic, not by
a library cast (which may round twice).
"""

from __future__ import annotations

import math

import pytest
import torch

import rope_backends as rb
from rope_backends.testing import assert_bitwise_equal

P = {torch.float16: (11, -14, 65504.0), torch.bfloat16: (8, -126, 3.3895313892515355e38),
     torch.float32: (24, -126, 3.4028234663852886e38)}  # precision, min exponent, max finite
N = 1 << 20
FIGURES: dict[str, dict[str, float]] = {}


def round_to(v: torch.Tensor, dtype: torch.dtype, lo: torch.Tensor | None = None) -> torch.Tensor:
    """RN-even of ``v + lo`` (float64, ``|lo|`` below half an ulp of ``v`` in float64) to
    ``dtype``'s grid, as float64 (inf on overflow). Exact: scaling by powers of two, floor,
    and the sign of ``lo`` to break an exact tie."""
    p, emin, fmax = P[dtype]
    if lo is None:
        lo = torch.zeros_like(v)
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** (emin - 1)))).clamp_min(emin)
    # log2 of a value just below a power of two may round up: re-check the binade exactly
    e = torch.where(v.abs() < torch.exp2(e), e - 1, e).clamp_min(emin)
    ulp = torch.exp2(e - (p - 1))
    q = v / ulp  # exact
    f = torch.floor(q)
    frac = q - f  # exact
    up = (frac > 0.5) | ((frac == 0.5) & ((lo > 0) | ((lo == 0) & (torch.remainder(f, 2) == 1))))
    up = up & ~((frac == 0.5) & (lo < 0))
    r = torch.where(up, f + 1, f) * ulp
    # a lo that pushes an exact grid value (frac == 0) below it does not change RN: |lo| < ulp / 2
    return torch.where(r.abs() > fmax, torch.copysign(torch.full_like(r, math.inf), r), r)


def ulp_of(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    p, emin, _ = P[dtype]
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** (emin - 1)))).clamp_min(emin)
    e = torch.where(v.abs() < torch.exp2(e), e - 1, e).clamp_min(emin)
    return torch.exp2(e - (p - 1))


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N // 32, 1, 64, generator=g) * 3).to(dtype)  # [T, 1, D]: 2**19 pairs
    pos = torch.randint(0, 1 << 17, (N // 32,), generator=g)
    cos, sin = rb.cos_sin(pos, 64)  # float32 [T, 32], the realistic table
    return x, cos[:, None], sin[:, None]


def _measure(dtype, seed=0):
    x, cos, sin = _inputs(dtype, seed)
    out = rb.apply(x, cos, sin)  # neox: pairs (i, i + 32)
    a, b = x[..., :32].float(), x[..., 32:].float()
    c, s = cos.float(), sin.float()
    o1, o2 = out[..., :32], out[..., 32:]
    results = []
    for o, (u, v, w, z, sign) in ((o1, (a, c, b, s, -1.0)), (o2, (b, c, a, s, 1.0))):
        # r = u*v + sign * w*z exactly: hi + lo in float64
        p1, p2 = u.double() * v.double(), sign * (w.double() * z.double())  # exact products
        hi = p1 + p2
        bb = hi - p1
        lo = (p1 - (hi - bb)) + (p2 - bb)  # TwoSum: hi + lo == p1 + p2 exactly
        y = (u * v) + (sign * (w * z)) if sign > 0 else (u * v) - (w * z)  # fp32, each op rounded
        results.append((o, hi, lo, y, p1, p2))
    return results


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_accuracy_contract(dtype):
    total = not_cr = ambiguous = 0
    max_ulps = 0.0
    for o, hi, lo, y, p1, p2 in _measure(dtype):
        out = o.double()
        # 1. one rounding of the fp32 result
        assert_bitwise_equal(o, y.to(dtype), name="output vs RN(fp32 result)")
        # 2. the rigorous window, inflated by a margin for float64's own roundings of the bound
        err = (2.0 ** -24 * (p1.abs() + p2.abs()) + 2.0 ** -23 * y.double().abs() + 3 * 2.0 ** -150) * (1 + 2.0 ** -20)
        lo_end, hi_end = round_to(hi - err, dtype), round_to(hi + err, dtype)
        assert bool(((lo_end <= out) & (out <= hi_end)).all())
        # 3. correctly rounded wherever the window lies between two rounding boundaries
        cr = round_to(hi, dtype, lo)
        sure = lo_end == hi_end
        assert torch.equal(out[sure], cr[sure])
        total += out.numel()
        not_cr += int((out != cr).sum())
        ambiguous += int((~sure).sum())
        exact_err = ((out - hi) - lo).abs() / ulp_of(hi, dtype)
        max_ulps = max(max_ulps, float(exact_err.max()))
    FIGURES[str(dtype)] = {"elements": total, "not_correctly_rounded": not_cr, "share_pct": 100 * not_cr / total,
                           "max_ulps": max_ulps, "window_straddles_boundary": ambiguous}
    print(f"\n[accuracy] {dtype}: {total} rotated elements; not correctly rounded {not_cr} "
          f"({100 * not_cr / total:.4f}%); max error {max_ulps:.3f} ulp; "
          f"elements where the fp32 error window straddles a {dtype} rounding boundary: {ambiguous}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_compared_with_rounding_after_every_op(dtype):
    """For context: the same formula with every op rounded to the dtype (what eager bf16/fp16
    HF code does) is further from the exact result."""
    ours_not_cr = naive_not_cr = total = 0
    ours_max = naive_max = 0.0
    x, cos, sin = _inputs(dtype, seed=1)
    out = rb.apply(x, cos, sin)
    a, b = x[..., :32], x[..., 32:]
    c, s = cos, sin
    naive1 = (a * c).to(dtype) - (b * s).to(dtype)
    naive2 = (b * c).to(dtype) + (a * s).to(dtype)
    for o, n, (u, v, w, z, sign) in ((out[..., :32], naive1, (a, c, b, s, -1.0)), (out[..., 32:], naive2, (b, c, a, s, 1.0))):
        p1, p2 = u.double() * v.double(), sign * (w.double() * z.double())
        hi = p1 + p2
        bb = hi - p1
        lo = (p1 - (hi - bb)) + (p2 - bb)
        cr = round_to(hi, dtype, lo)
        ulp = ulp_of(hi, dtype)
        total += hi.numel()
        ours_not_cr += int((o.double() != cr).sum())
        naive_not_cr += int((n.double() != cr).sum())
        ours_max = max(ours_max, float((((o.double() - hi) - lo).abs() / ulp).max()))
        naive_max = max(naive_max, float((((n.double() - hi) - lo).abs() / ulp).max()))
    print(f"\n[accuracy] {dtype}: rope_backends {100 * ours_not_cr / total:.4f}% not correctly rounded, "
          f"max {ours_max:.3f} ulp; rounding after every op {100 * naive_not_cr / total:.4f}%, max {naive_max:.3f} ulp")
    assert ours_not_cr < naive_not_cr


def test_round_to_is_exact():
    """The dtype rounding used above agrees with torch's fp32 -> fp16/bf16 casts (one rounding
    from float32, which are exact in float64) on every kind of value, ties included."""
    g = torch.Generator().manual_seed(5)
    v = torch.randn(1 << 16, generator=g) * torch.exp2(torch.randint(-30, 30, (1 << 16,), generator=g).float())
    ties = torch.tensor([1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65519.0, 65520.0, 2.0 ** -25, 3 * 2.0 ** -25,
                         1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 0.0, -0.0, 2.0 ** -24, 6.0e-8], dtype=torch.float32)
    v = torch.cat((v, ties, -ties))
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(round_to(v.double(), dtype), v.to(dtype).double())
    # a tie broken by the sign of lo
    one = torch.tensor([1 + 2.0 ** -11], dtype=torch.float64)
    assert round_to(one, torch.float16, torch.tensor([1e-30], dtype=torch.float64)).item() == 1 + 2.0 ** -10
    assert round_to(one, torch.float16, torch.tensor([-1e-30], dtype=torch.float64)).item() == 1.0
