"""The reference itself, checked against the model code it claims to match, bit for bit in fp32.

The eager backend *is* the reference, so the conformance suite cannot catch a wrong reference.
Here the formulas of the public model code are written out (not imported) and fed the same
inputs: Hugging Face ``rotate_half`` / ``apply_rotary_pos_emb`` (Llama; partial rotary as in
GPT-NeoX/Phi), GPT-J ``rotate_every_two``, vLLM ``forward_native`` (neox and GPT-J style, on
``[T, H*D]`` through a cos/sin cache), diffusers' Wan-style interleaved rotation, and the three
MRoPE section layouts (Qwen2-VL ``apply_multimodal_rotary_pos_emb``, Qwen3-VL
``apply_interleaved_mrope``, vLLM's Ernie4.5-VL). In float32 each equals rope_backends exactly,
including autograd's gradient of the HF formula. A perturbed reference fails these checks.
"""

from __future__ import annotations

import pytest
import torch

import rope_backends as rb
from rope_backends import reference
from rope_backends.testing import assert_bitwise_equal, make
from rope_backends.testing.check import bitwise_mismatches

torch.manual_seed(0)


def _x(*shape, special=False, seed=0):
    t = torch.empty(shape)
    make.fill(t, "special" if special else "normal", torch.Generator().manual_seed(seed))
    return t


def _tables(positions, dim, base=10000.0):
    """HF-style float32 tables: inv_freq, freqs = pos * inv_freq, emb = cat(freqs, freqs)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin(), freqs.cos(), freqs.sin()


# ---- Hugging Face rotate_half (Llama) -----------------------------------------------------

def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (hf_rotate_half(q) * sin)
    k_embed = (k * cos) + (hf_rotate_half(k) * sin)
    return q_embed, k_embed


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("head_dim", [2, 64, 80, 128, 256])
def test_hf_rotate_half(head_dim, special):
    B, H, Hk, S = 2, 4, 2, 9
    q = _x(B, H, S, head_dim, special=special, seed=1)  # HF layout [B, H, S, D]
    k = _x(B, Hk, S, head_dim, special=special, seed=2)
    pos = torch.randint(0, 4096, (B, S))
    cos, sin, cos_h, sin_h = _tables(pos, head_dim)  # [B, S, D], [B, S, D/2]
    want_q, want_k = hf_apply_rotary_pos_emb(q, k, cos, sin)
    # duplicated form as HF passes it, and the half form; [B, H, S, D] via a [B, 1, S, r] broadcast
    for c, s in ((cos, sin), (cos_h, sin_h)):
        got_q, got_k = rb.apply_qk(q, k, c[:, None], s[:, None])
        assert_bitwise_equal(got_q, want_q, name="q")
        assert_bitwise_equal(got_k, want_k, name="k")
    # the same tensors as [B, S, H, D] (transposed views)
    got = rb.apply(q.transpose(1, 2), cos_h[:, :, None], sin_h[:, :, None])
    assert_bitwise_equal(got, want_q.transpose(1, 2))


def test_hf_rotate_half_backward():
    """Autograd through the HF formula in fp32 gives exactly rope_backends' backward."""
    q = _x(3, 4, 7, 64, seed=3).requires_grad_()
    q2 = q.detach().clone().requires_grad_()
    cos, sin, cos_h, sin_h = _tables(torch.randint(0, 512, (3, 7)), 64)
    g = _x(3, 4, 7, 64, seed=4)
    want, _ = hf_apply_rotary_pos_emb(q, q, cos, sin)
    want.backward(g)
    got = rb.apply(q2, cos_h[:, None], sin_h[:, None])
    got.backward(g)
    assert_bitwise_equal(got, want.detach())
    assert_bitwise_equal(q2.grad, q.grad, name="grad")


@pytest.mark.parametrize("rotary_dim,head_dim", [(16, 64), (32, 128), (64, 80), (2, 8)])
def test_hf_partial_rotary(rotary_dim, head_dim):
    """GPT-NeoX / Phi: rotate the first rotary_dim, pass the rest through."""
    q = _x(2, 3, 6, head_dim, seed=5)
    cos, sin, cos_h, sin_h = _tables(torch.randint(0, 2048, (2, 6)), rotary_dim)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    want = torch.cat((hf_apply_rotary_pos_emb(q_rot, q_rot, cos, sin)[0], q_pass), dim=-1)
    assert_bitwise_equal(rb.apply(q, cos[:, None], sin[:, None], rotary_dim=rotary_dim), want)
    assert_bitwise_equal(rb.apply(q, cos_h[:, None], sin_h[:, None], rotary_dim=rotary_dim), want)


# ---- GPT-J rotate_every_two -----------------------------------------------------------------

def gptj_rotate_every_two(x):
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    x = torch.stack((-x2, x1), dim=-1)
    return x.flatten(-2)


def gptj_apply_rotary_pos_emb(tensor, sin, cos):
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return (tensor * cos) + (gptj_rotate_every_two(tensor) * sin)


@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("rotary_dim,head_dim", [(64, 256), (256, 256), (32, 96), (2, 2)])
def test_gptj_rotate_every_two(rotary_dim, head_dim, special):
    k = _x(2, 11, 4, head_dim, special=special, seed=6)  # [B, S, H, D]
    pos = torch.randint(0, 2048, (2, 11))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    sinusoid = torch.einsum("bi,j->bij", pos.float(), inv_freq).float()
    sin, cos = torch.sin(sinusoid), torch.cos(sinusoid)  # [B, S, r/2]
    k_rot, k_pass = k[:, :, :, :rotary_dim], k[:, :, :, rotary_dim:]
    want = torch.cat([gptj_apply_rotary_pos_emb(k_rot, sin, cos), k_pass], dim=-1)
    got = rb.apply(k, cos[:, :, None], sin[:, :, None], layout="interleaved", rotary_dim=rotary_dim)
    assert_bitwise_equal(got, want)
    dup_c, dup_s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    got = rb.apply(k, dup_c[:, :, None], dup_s[:, :, None], layout="interleaved", rotary_dim=rotary_dim)
    assert_bitwise_equal(got, want)


# ---- vLLM forward_native (cache, [T, H*D]) ---------------------------------------------------

def vllm_apply_rotary_emb_torch(x, cos, sin, is_neox_style):
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    if is_neox_style:
        x1, x2 = torch.chunk(x, 2, dim=-1)
    else:
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def vllm_forward_native(positions, query, key, cache, head_size, rotary_dim, is_neox_style):
    num_tokens = positions.shape[0]
    cos_sin = cache.index_select(0, positions)
    cos, sin = cos_sin.chunk(2, dim=-1)
    outs = []
    for x in (query, key):
        shape = x.shape
        x = x.view(num_tokens, -1, head_size)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x_rot = vllm_apply_rotary_emb_torch(x_rot, cos, sin, is_neox_style)
        outs.append(torch.cat((x_rot, x_pass), dim=-1).reshape(shape))
    return outs


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
@pytest.mark.parametrize("rotary_dim,head_dim", [(128, 128), (64, 128), (80, 80)])
def test_vllm_forward_native(layout, rotary_dim, head_dim):
    T = 13
    qkv = _x(T, (8 + 2 + 2) * head_dim, seed=7)
    q, k = qkv[:, : 8 * head_dim], qkv[:, 8 * head_dim : 10 * head_dim]
    cache = rb.cos_sin_cache(4096, rotary_dim)
    pos = torch.randint(0, 4096, (T,))
    want_q, want_k = vllm_forward_native(pos, q, k, cache, head_dim, rotary_dim, layout == "neox")
    got_q, got_k = rb.apply_cached(q, k, pos, cache, layout=layout, head_dim=head_dim, inplace=False)
    assert_bitwise_equal(got_q, want_q, name="q")
    assert_bitwise_equal(got_k, want_k, name="k")
    rb.apply_cached(q, k, pos, cache, layout=layout, head_dim=head_dim)  # in place, in the qkv buffer
    assert_bitwise_equal(qkv[:, : 8 * head_dim], want_q)
    assert_bitwise_equal(qkv[:, 8 * head_dim : 10 * head_dim], want_k)


# ---- diffusers' Wan-style interleaved rotation ---------------------------------------------

def diffusers_interleaved(hidden_states, freqs_cos, freqs_sin):
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def test_wan_style_3d_rope():
    grid, head_dim = (3, 4, 5), 128
    cos, sin = rb.cos_sin_3d(grid, rb.wan_dims(head_dim))  # [F*H*W, 64]
    x = _x(2, 3 * 4 * 5, 6, head_dim, seed=8)  # [B, S, H, D]
    dup_c, dup_s = cos.repeat_interleave(2, -1)[None, :, None], sin.repeat_interleave(2, -1)[None, :, None]
    want = diffusers_interleaved(x, dup_c, dup_s)
    assert_bitwise_equal(rb.apply(x, cos[:, None], sin[:, None], layout="interleaved"), want)


# ---- MRoPE section layouts --------------------------------------------------------------------

def qwen2vl_apply_multimodal_rotary_pos_emb(q, cos, sin, mrope_section, unsqueeze_dim=1):
    """transformers Qwen2-VL: cos/sin [3, B, S, D] (duplicated), sections doubled."""
    mrope_section = mrope_section * 2
    cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(mrope_section, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)
    sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(mrope_section, dim=-1))], dim=-1).unsqueeze(unsqueeze_dim)
    return (q * cos) + (hf_rotate_half(q) * sin)


def qwen3vl_apply_interleaved_mrope(freqs, mrope_section):
    """transformers Qwen3-VL: freqs [3, B, S, D/2] -> [B, S, D/2], [THWTHW...TT]."""
    freqs_t = freqs[0].clone()
    for dim, offset in enumerate((1, 2), start=1):
        length = mrope_section[dim] * 3
        idx = slice(offset, length, 3)
        freqs_t[..., idx] = freqs[dim, ..., idx]
    return freqs_t


def vllm_ernie_cos(cos, section):
    """vLLM Ernie4.5-VL: cos [3, T, D/2] half form, section [h, w, t] -> [T, D/2]."""
    h, w, t = section
    cos_t = cos[..., -t:][0]
    cos_h = cos[..., : h + w : 2][1]
    cos_w = cos[..., 1 : h + w : 2][2]
    cos_hw = torch.stack([cos_h, cos_w], dim=-1).reshape(cos_h.shape[:-1] + (cos_h.shape[-1] * 2,))
    return torch.cat([cos_hw, cos_t], dim=-1)


def _mrope_positions(T, seed=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (3, T), generator=g)


def test_qwen2vl_chunked():
    T, H, D, section = 11, 4, 128, [16, 24, 24]
    pos = _mrope_positions(T)
    q = _x(1, H, T, D, seed=10)
    cos, sin, _, _ = _tables(pos[:, None], D)  # [3, 1, T, D] duplicated
    want = qwen2vl_apply_multimodal_rotary_pos_emb(q, cos, sin, section)  # [1, H, T, D]
    _, _, cos_all, sin_all = _tables(torch.arange(2048), D)  # the same float32 table as a cache
    cache = torch.cat((cos_all, sin_all), dim=-1)
    got, _ = rb.apply_cached(q[0].transpose(0, 1), None, pos, cache, mrope=rb.mrope.chunked(section), inplace=False)
    assert_bitwise_equal(got, want[0].transpose(0, 1))


def test_qwen3vl_interleaved():
    T, H, D, section = 11, 4, 128, [24, 20, 20]
    pos = _mrope_positions(T)
    q = _x(1, H, T, D, seed=11)
    inv_freq = 1.0 / (5e6 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = pos[:, None].float()[..., None] * inv_freq  # [3, 1, T, D/2]
    freqs = qwen3vl_apply_interleaved_mrope(freqs, section)
    emb = torch.cat((freqs, freqs), dim=-1)
    want, _ = hf_apply_rotary_pos_emb(q, q, emb.cos(), emb.sin())
    # the same float32 table, as a cache [max_pos, D]: cos | sin of pos * inv_freq
    all_pos = torch.arange(2048).float()[:, None] * inv_freq
    cache = torch.cat((all_pos.cos(), all_pos.sin()), dim=-1)
    got, _ = rb.apply_cached(q[0].transpose(0, 1), None, pos, cache, mrope=rb.mrope.interleaved(section), inplace=False)
    assert_bitwise_equal(got, want[0].transpose(0, 1))


def test_ernie45vl():
    T, H, D, section = 11, 4, 128, [22, 22, 20]
    pos = _mrope_positions(T)
    cache = rb.cos_sin_cache(2048, D)
    q = _x(T, H * D, seed=12)
    cos_sin = cache[pos]  # [3, T, D]
    cos, sin = cos_sin.chunk(2, dim=-1)
    cos, sin = vllm_ernie_cos(cos, section), vllm_ernie_cos(sin, section)
    want = vllm_apply_rotary_emb_torch(q.view(T, H, D), cos, sin, True).reshape(T, H * D)
    got, _ = rb.apply_cached(q, None, pos, cache, mrope=rb.mrope.ernie(section), head_dim=D, inplace=False)
    assert_bitwise_equal(got, want)


def test_text_only_mrope_equals_plain_rope():
    T, D = 9, 64
    cache = rb.cos_sin_cache(512, D)
    pos = torch.randint(0, 512, (T,))
    q = _x(T, 2, D, seed=13)
    plain, _ = rb.apply_cached(q, None, pos, cache, inplace=False)
    for m in (rb.mrope.chunked([8, 12, 12]), rb.mrope.interleaved([12, 10, 10]), rb.mrope.ernie([11, 11, 10])):
        one_row, _ = rb.apply_cached(q, None, pos, cache, mrope=m, inplace=False)
        three_equal_rows, _ = rb.apply_cached(q, None, pos.expand(3, T), cache, mrope=m, inplace=False)
        assert_bitwise_equal(one_row, plain)
        assert_bitwise_equal(three_equal_rows, plain)


# ---- these checks can fail ----------------------------------------------------------------------

def test_a_perturbed_reference_fails_fidelity(monkeypatch):
    real = reference.rotate_pairs

    def perturbed(a, b, cos, sin, conjugate):
        a2, b2 = real(a, b, cos, sin, conjugate)
        return a2, torch.nextafter(b2, torch.full_like(b2, float("inf")))

    monkeypatch.setattr(reference, "rotate_pairs", perturbed)
    q = _x(1, 2, 5, 64, seed=14)
    cos, sin, _, _ = _tables(torch.arange(5)[None], 64)
    want, _ = hf_apply_rotary_pos_emb(q, q, cos, sin)
    with pytest.raises(AssertionError, match="differ"):
        assert_bitwise_equal(rb.apply(q, cos[:, None], sin[:, None]), want)


def test_the_sample_tier_catches_a_conjugate_lowered_as_zero_minus_sin(monkeypatch):
    """Triton before 3.9 lowers a unary minus on floats as ``0.0 - x``, which maps -0.0 to +0.0;
    a backward written with ``s = -s`` then gave a -0.0 gradient where the reference has +0.0
    (H100, long fuzz). The sample tier must contain cases that see that difference."""
    from rope_backends.testing.cases import sample_cases
    from rope_backends.testing.runner import build, reference_outputs

    cases = [c for c in sample_cases() if c.backward and c.values == "special_cos"]
    assert cases
    real = reference.rotate_pairs

    def zero_minus_sin(a, b, cos, sin, conjugate):
        return real(a, b, cos, (0.0 - sin.float()) if conjugate else sin, False)

    caught = set()
    for case in cases:
        inp = build(case, torch.device("cpu"))
        upstream = [torch.randn(t.shape, generator=torch.Generator().manual_seed(3)).to(t.dtype) for t in inp.rotated()]
        want = reference_outputs(case, inp, upstream, conjugate=True)
        with monkeypatch.context() as m:
            m.setattr(reference, "rotate_pairs", zero_minus_sin)
            wrong = reference_outputs(case, inp, upstream, conjugate=True)
        if any(bool(bitwise_mismatches(w, g).any()) for w, g in zip(want, wrong)):
            caught.add((case.layout, case.dtype))
    # every layout and dtype of those cases sees it
    assert caught == {(c.layout, c.dtype) for c in cases}
