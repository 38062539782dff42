"""A vLLM-style model forward with rope_backends: ``apply_cached`` in place on the fused qkv, text and MRoPE.

    python examples/serving_vllm_style.py     # CPU in seconds; on a GPU machine it runs on "cuda"

Laid out as a vLLM decoder model: one flat token batch for all requests (``positions [T]``,
``hidden_states [T, hidden]``), ``qkv_proj`` writing q, k, v side by side, ``q, k, v =
qkv.split(...)`` as views, and a rotary module built once per model holding ``cos_sin_cache
[max_position, rotary_dim]`` whose ``forward(positions, query, key)`` rotates q and k in place (as
vLLM's ``RotaryEmbedding`` does). Here that forward is one ``rb.apply_cached`` call. The same
model with ``MRotaryEmbedding`` (Qwen2-VL's ``mrope_section``, or Qwen3-VL's interleaved one) takes
``positions [3, T]`` from ``rb.mrope.rope_index``. Prefill of three requests, then decode steps
with a per-request KV cache; every rotation is checked against the eager reference backend, which
every backend matches bit for bit.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rope_backends as rb


class RotaryEmbedding(nn.Module):
    """vLLM's ``RotaryEmbedding``: a cos/sin cache built once, q/k rotated in place by position."""

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float, is_neox_style: bool = True):
        super().__init__()
        self.head_size, self.rotary_dim = head_size, rotary_dim
        self.layout = "neox" if is_neox_style else "interleaved"
        self.register_buffer("cos_sin_cache", rb.cos_sin_cache(max_position, rotary_dim, base), persistent=False)
        self.checked = []  # (bit-exact vs the eager reference) per call, for this example

    def mrope(self):
        return None

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """positions ``[T]`` (or ``[3, T]`` for MRoPE); query ``[T, Hq*D]``, key ``[T, Hk*D]``: views, rotated in place."""
        want = rb.apply_cached(query.clone(), key.clone(), positions, self.cos_sin_cache, layout=self.layout,
                               rotary_dim=self.rotary_dim, mrope=self.mrope(), head_dim=self.head_size,
                               backend="eager")
        rb.apply_cached(query, key, positions, self.cos_sin_cache, layout=self.layout, rotary_dim=self.rotary_dim,
                        mrope=self.mrope(), head_dim=self.head_size)
        self.checked.append(torch.equal(query, want[0]) and torch.equal(key, want[1]))
        return query, key


class MRotaryEmbedding(RotaryEmbedding):
    """vLLM's ``MRotaryEmbedding``: positions ``[3, T]`` (t, h, w); each frequency follows one row."""

    def __init__(self, *args, mrope_section: list[int], mrope_interleaved: bool = False, **kw):
        super().__init__(*args, **kw)
        self.axis_map = (rb.mrope.interleaved if mrope_interleaved else rb.mrope.chunked)(mrope_section)

    def mrope(self):
        return self.axis_map


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.rotary_emb = rotary_emb

    def forward(self, positions, hidden_states, kv_cache, seq_lens):
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)  # views into qkv
        q, k = self.rotary_emb(positions, q, k)  # in place: qkv now holds the rotated q and k
        out, start = [], 0
        for req, n in enumerate(seq_lens):  # a paged-attention kernel's job, per request here
            qi = q[start:start + n].view(n, self.heads, self.head_dim).transpose(0, 1)
            ki = k[start:start + n].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            vi = v[start:start + n].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            past_k, past_v = kv_cache.get(req, (ki[:, :0], vi[:, :0]))
            ki, vi = torch.cat([past_k, ki], 1), torch.cat([past_v, vi], 1)
            kv_cache[req] = (ki, vi)
            rep = self.heads // self.kv_heads
            # causal within the new tokens, full over the cached ones
            mask = torch.ones(n, ki.shape[1], dtype=torch.bool, device=q.device).tril(ki.shape[1] - n)
            o = F.scaled_dot_product_attention(qi, ki.repeat_interleave(rep, 0), vi.repeat_interleave(rep, 0),
                                               attn_mask=mask)
            out.append(o.transpose(0, 1).reshape(n, self.q_size))
            start += n
        return self.o_proj(torch.cat(out))


class DecoderModel(nn.Module):
    def __init__(self, rotary_emb: RotaryEmbedding, vocab=512, hidden=256, layers=2, heads=8, kv_heads=2, head_dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Attention(hidden, heads, kv_heads, head_dim, rotary_emb) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden) if hasattr(nn, "RMSNorm") else nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, positions, kv_caches, seq_lens):
        h = self.embed(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            h = h + layer(positions, h, cache, seq_lens)
        return self.lm_head(self.norm(h))


@torch.no_grad()  # serving is inference: in-place rotation of tensors autograd does not track
def serve(model, prompts, positions_of, steps, device):
    """Prefill every prompt in one flat batch, then ``steps`` greedy decode steps."""
    kv = [dict() for _ in model.layers]
    ids = torch.cat(prompts).to(device)
    pos = positions_of(prompts, None)
    logits = model(ids, pos, kv, [len(p) for p in prompts])
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    tokens = logits[ends.to(device)].argmax(-1)
    lengths = [len(p) for p in prompts]
    for _ in range(steps):
        pos = positions_of(prompts, lengths)
        tokens = model(tokens, pos, kv, [1] * len(prompts)).argmax(-1)
        lengths = [n + 1 for n in lengths]
    return tokens


def main(device: str | None = None, dtype: torch.dtype = torch.bfloat16, steps: int = 4, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    # 1. a Llama-style text model: positions [T]
    rope = RotaryEmbedding(32, 32, 4096, 500000.0)
    text = DecoderModel(rope).to(device, dtype)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (37, 5, 60)]

    def text_positions(prompts, lengths):
        if lengths is None:  # prefill: 0..len-1 per request
            return torch.cat([torch.arange(len(p)) for p in prompts]).to(device)
        return torch.tensor(lengths, device=device)  # decode: one token per request

    serve(text, prompts, text_positions, steps, device)

    # 2. the same model with MRoPE (Qwen2-VL sections for head_dim 32): an image in the first prompt
    vision_start, image, merge = 500, 501, 2
    mrope = MRotaryEmbedding(32, 32, 4096, 1000000.0, mrope_section=[4, 6, 6])
    vl = DecoderModel(mrope).to(device, dtype)
    vl_prompts = [torch.cat([prompts[0][:5], torch.tensor([vision_start] + [image] * 6), prompts[0][5:20]]),
                  prompts[1]]
    grids = torch.tensor([[1, 4, 6]])  # t, h, w patches -> 1 * 2 * 3 = 6 merged image tokens

    def vl_positions(prompts, lengths, _deltas={}):
        if lengths is None:  # prefill: rope_index per request (one row each), then flattened
            rows = []
            for i, p in enumerate(prompts):
                pos, delta = rb.mrope.rope_index(
                    p[None].to(device), grids.to(device) if image in p.tolist() else None, None,
                    spatial_merge_size=merge, image_token_id=image, video_token_id=502,
                    vision_start_token_id=vision_start, variant="qwen2_vl")
                rows.append(pos[:, 0])
                _deltas[i] = int(delta[0])
            return torch.cat(rows, dim=1)  # [3, T]
        # decode: text positions continue at length + delta on all three rows
        return torch.tensor([n + _deltas[i] for i, n in enumerate(lengths)], device=device).expand(3, -1)

    serve(vl, vl_prompts, vl_positions, steps, device)
    result = dict(device=device, backend=_backend_for(device), text_calls=len(rope.checked),
                  mrope_calls=len(mrope.checked), bit_exact_vs_reference=all(rope.checked + mrope.checked))
    if verbose:
        print(result)
    return result


def _backend_for(device: str) -> str:
    kind = torch.device(device).type
    serving = [b for b in rb.list_backends() if b.available and (kind in b.device_types or "*" in b.device_types)]
    return max(serving, key=lambda b: b.priority).name if serving else "none"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    main(args.device, steps=args.steps)
