"""Frequency tables (rope_backends.freqs): shapes, dtypes, one answer wherever the positions live,
and the scaling variants against float64 formulas of the Hugging Face ``rope_scaling``
definitions written out here (default, linear, dynamic NTK, llama3, yarn) plus the fixed
NTK-aware base. Tables are float64 rounded once to float32, so equality is bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

import rope_backends as rb
from rope_backends.testing import assert_bitwise_equal

F64 = torch.float64


# ---- HF definitions in float64 (written from transformers' modeling_rope_utils) -------------

def hf_default(dim, base):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(F64) / dim))


def hf_linear(dim, base, factor):
    return hf_default(dim, base) / factor


def hf_dynamic(dim, base, factor, max_position_embeddings, seq_len):
    seq_len = max(seq_len, max_position_embeddings)
    base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return hf_default(dim, base)


def hf_llama3(dim, base, factor, low_freq_factor, high_freq_factor, old_context_len):
    inv_freq = hf_default(dim, base)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def hf_yarn(dim, base, factor, original_max_position_embeddings, beta_fast=32, beta_slow=1):
    def find_correction_dim(num_rotations):
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(find_correction_dim(beta_fast)), 0)
    high = min(math.ceil(find_correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=F64) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=F64) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention_factor


def table(positions, inv_freq, attention=1.0):
    """HF's forward: angles = positions x inv_freq, then cos/sin (* attention), in float64."""
    angles = positions.to(F64)[..., None] * inv_freq
    return (angles.cos() * attention).float(), (angles.sin() * attention).float()


POS = torch.arange(0, 40000, 7)


@pytest.mark.parametrize("dim", [2, 64, 128])
@pytest.mark.parametrize("base", [10000.0, 500000.0, 1e6])
def test_default(dim, base):
    cos, sin = rb.cos_sin(POS, dim, base)
    want_cos, want_sin = table(POS, hf_default(dim, base))
    assert_bitwise_equal(cos, want_cos)
    assert_bitwise_equal(sin, want_sin)


def test_linear():
    """HF divides inv_freq by the factor, and so does rope_backends (in float64): the tables
    are the correctly rounded values of HF's formula for every factor."""
    for factor in (2.0, 3.0, 4.0, 8.0, 2.5):
        cos, sin = rb.cos_sin(POS, 128, scaling={"rope_type": "linear", "factor": factor})
        want_cos, want_sin = table(POS, hf_linear(128, 10000.0, factor))
        assert_bitwise_equal(cos, want_cos)
        assert_bitwise_equal(sin, want_sin)
    assert_bitwise_equal(rb.cos_sin(POS, 64, scaling=2.0)[0], table(POS, hf_linear(64, 10000.0, 2.0))[0])
    cos, _ = rb.cos_sin(POS, 128, scaling={"type": "linear", "factor": 3.0})
    assert_bitwise_equal(cos, table(POS, hf_linear(128, 10000.0, 3.0))[0])
    far = torch.arange(0, 200000, 3)  # where dividing the position instead differs (1 in ~1e5 entries)
    for factor, dim, base in ((1.5, 128, 1e4), (2.5, 96, 5e5)):
        got = rb.cos_sin(far, dim, base, {"rope_type": "linear", "factor": factor})
        want = table(far, hf_linear(dim, base, factor))
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])


@pytest.mark.parametrize("seq_len", [100, 4096, 40000])
def test_dynamic_ntk(seq_len):
    scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096}
    pos = torch.arange(seq_len)
    cos, sin = rb.cos_sin(pos, 128, 10000.0, scaling)  # seq_len = max(position) + 1, as HF
    want_cos, want_sin = table(pos, hf_dynamic(128, 10000.0, 2.0, 4096, seq_len))
    assert_bitwise_equal(cos, want_cos)
    assert_bitwise_equal(sin, want_sin)
    cache = rb.cos_sin_cache(seq_len, 128, 10000.0, scaling)  # the table's length is its seq_len
    assert_bitwise_equal(cache, torch.cat(table(pos, hf_dynamic(128, 10000.0, 2.0, 4096, seq_len)), -1))
    if seq_len <= 4096:  # unchanged up to the original length
        assert_bitwise_equal(cos, rb.cos_sin(pos, 128)[0])


def test_fixed_ntk():
    cos, _ = rb.cos_sin(POS, 128, scaling={"rope_type": "ntk", "factor": 4.0})
    assert_bitwise_equal(cos, table(POS, hf_default(128, 10000.0 * 4.0 ** (128 / 126)))[0])


def test_llama3():
    p = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    cos, sin = rb.cos_sin(POS, 128, 500000.0, p)
    want_cos, want_sin = table(POS, hf_llama3(128, 500000.0, 8.0, 1.0, 4.0, 8192))
    assert_bitwise_equal(cos, want_cos)
    assert_bitwise_equal(sin, want_sin)


def test_yarn():
    """HF's formula (interpolated frequency 1 / (factor * base**e)) evaluated in float64:
    the tables are its correctly rounded values, bit for bit."""
    for factor, old in ((4.0, 4096), (2.0, 32768), (40.0, 4096)):
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": old}
        cos, sin = rb.cos_sin(POS, 128, 10000.0, scaling)
        inv, attention = hf_yarn(128, 10000.0, factor, old)
        want_cos, want_sin = table(POS, inv, attention)
        assert_bitwise_equal(cos, want_cos)
        assert_bitwise_equal(sin, want_sin)
    far = torch.arange(0, 200000, 3)
    scaling = {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 4096}
    inv, attention = hf_yarn(96, 5e5, 2.5, 4096)
    assert_bitwise_equal(rb.cos_sin(far, 96, 5e5, scaling)[0], table(far, inv, attention)[0])


def test_shapes_dtypes_devices():
    pos = torch.randint(0, 1000, (2, 5))
    cos, sin = rb.cos_sin(pos, 64)
    assert cos.shape == sin.shape == (2, 5, 32) and cos.dtype == torch.float32 and cos.device == pos.device
    for p in (pos.int(), pos.short(), pos.double(), pos.float()):  # one answer for every dtype
        assert_bitwise_equal(rb.cos_sin(p, 64)[0], cos)
    assert_bitwise_equal(rb.cos_sin(pos.t().contiguous().t(), 64)[0], cos)  # strided positions
    cache = rb.cos_sin_cache(1000, 64)
    assert cache.shape == (1000, 64) and cache.dtype == torch.float32
    assert_bitwise_equal(cache[pos], torch.cat((cos, sin), -1))  # the cache rows are cos_sin rows
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        c = rb.cos_sin_cache(100, 32, dtype=dt)
        assert c.dtype == dt
        assert_bitwise_equal(c, rb.cos_sin_cache(100, 32).to(dt))  # rounded once from float32
    empty_cos, _ = rb.cos_sin(torch.zeros(0, dtype=torch.int64), 16)
    assert empty_cos.shape == (0, 8)


def test_cos_sin_3d_matches_per_axis_tables():
    grid, dims = (3, 4, 5), rb.wan_dims(128)
    cos, sin = rb.cos_sin_3d(grid, dims)
    assert cos.shape == sin.shape == (60, 64) and cos.dtype == torch.float32
    f, h, w = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(5), indexing="ij")
    parts = [rb.cos_sin(idx.reshape(-1), d) for idx, d in zip((f, h, w), dims)]
    assert_bitwise_equal(cos, torch.cat([p[0] for p in parts], -1))
    assert_bitwise_equal(sin, torch.cat([p[1] for p in parts], -1))
    assert rb.wan_dims(128) == (44, 42, 42)


@pytest.mark.parametrize("call,error,arg", [
    (lambda: rb.cos_sin(torch.arange(4), 7), ValueError, "rotary_dim"),
    (lambda: rb.cos_sin(torch.arange(4), 0), ValueError, "rotary_dim"),
    (lambda: rb.cos_sin(torch.arange(4), 8.0), ValueError, "rotary_dim"),
    (lambda: rb.cos_sin([0, 1], 8), TypeError, "positions"),
    (lambda: rb.cos_sin(torch.ones(2, dtype=torch.bool), 8), TypeError, "positions"),
    (lambda: rb.cos_sin(torch.arange(4), 8, base=0.0), ValueError, "base"),
    (lambda: rb.cos_sin(torch.arange(4), 8, base="1e4"), ValueError, "base"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling={"rope_type": "longrope", "factor": 2.0}), ValueError, "scaling"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling={"rope_type": "axial"}), ValueError, "scaling"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}), ValueError, "scaling"),
    (lambda: rb.cos_sin(torch.arange(4), 8, base=1e4, scaling={"rope_theta": 1e6}), ValueError, "base"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling=rb.rope_config(rotary_dim=8)), TypeError, "scaling"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling={"rope_type": "yarn"}), ValueError, "scaling"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError, "scaling"),
    (lambda: rb.cos_sin(torch.arange(4), 8, scaling="linear"), TypeError, "scaling"),
    (lambda: rb.cos_sin_cache(0, 8), ValueError, "max_position"),
    (lambda: rb.cos_sin_cache(True, 8), ValueError, "max_position"),
    (lambda: rb.cos_sin_cache(16, 8, dtype=torch.int32), TypeError, "dtype"),
    (lambda: rb.cos_sin_3d((2, 3), (4, 4, 4)), ValueError, "grid"),
    (lambda: rb.cos_sin_3d((2, 3, 4), (4, 4, 3)), ValueError, "dims"),
    (lambda: rb.cos_sin_3d((2, 3, 4), (4, 4, 4), offsets=(0, 0)), ValueError, "offsets"),
    (lambda: rb.wan_dims(7), ValueError, "head_dim"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_argument_errors(call, error, arg):
    with pytest.raises(error, match=rf"^{arg}(\['\w+'\])?: expected"):
        call()
