"""An SGLang-style model forward with rope_backends: the FlashInfer-style in-place call on the fused qkv, text and MRoPE.

    python examples/serving_sglang_style.py   # CPU in seconds; on a GPU machine it runs on "cuda"

Laid out as an SGLang decoder model: a ``ForwardBatch`` (``forward_mode`` extend or decode,
``positions``, per-request lengths, ``out_cache_loc`` slots in a token-level KV pool), ``qkv_proj``
then ``q, k, v = qkv.split(...)`` as views, and a rotary module whose forward calls the FlashInfer /
sgl-kernel style ``apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size,
cos_sin_cache, is_neox)`` -- given here as a three-line adapter over ``rb.apply_cached`` (q and k
``[T, H*D]``, rotated in place). The same model with SGLang's ``MRotaryEmbedding`` and Qwen3-VL's
interleaved sections takes ``positions [3, T]`` (``rb.mrope.rope_index``). Extend (prefill) of three
requests, then decode steps; every rotation is checked against the eager reference backend.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import rope_backends as rb


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache, is_neox=True, mrope=None):
    """The FlashInfer / sgl-kernel call, on rope_backends: query ``[T, Hq*D]``, key ``[T, Hk*D]``
    (views of the fused qkv), ``cos_sin_cache [max_position, rotary_dim]``, rotated in place."""
    rb.apply_cached(query, key, positions, cos_sin_cache, layout="neox" if is_neox else "interleaved",
                    mrope=mrope, head_dim=head_size)


@dataclass
class ForwardBatch:
    """What SGLang's scheduler hands the model for one step (the fields this example uses)."""

    forward_mode: str  # "extend" (prefill) or "decode"
    positions: torch.Tensor  # [T], or [3, T] for MRoPE
    seq_lens: list[int]  # new tokens per request in this batch
    out_cache_loc: torch.Tensor  # [T] KV-pool slot of every new token
    req_to_token: list[list[int]] = field(default_factory=list)  # every request's slots, oldest first


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, max_position: int, base: float, is_neox_style: bool = True,
                 mrope_section: list[int] | None = None, mrope_interleaved: bool = False):
        super().__init__()
        self.head_size, self.is_neox_style = head_size, is_neox_style
        self.register_buffer("cos_sin_cache", rb.cos_sin_cache(max_position, head_size, base), persistent=False)
        self.mrope = None
        if mrope_section is not None:  # SGLang's MRotaryEmbedding (Qwen2-VL chunked / Qwen3-VL interleaved)
            self.mrope = (rb.mrope.interleaved if mrope_interleaved else rb.mrope.chunked)(mrope_section)
        self.checked = []

    def forward(self, positions, query, key):
        want = rb.apply_cached(query.clone(), key.clone(), positions, self.cos_sin_cache, mrope=self.mrope,
                               layout="neox" if self.is_neox_style else "interleaved", head_dim=self.head_size,
                               backend="eager")
        apply_rope_with_cos_sin_cache_inplace(positions, query, key, self.head_size, self.cos_sin_cache,
                                              self.is_neox_style, self.mrope)
        self.checked.append(torch.equal(query, want[0]) and torch.equal(key, want[1]))
        return query, key


class RadixAttention(nn.Module):
    """Stores the new k/v at their slots of the token pool, then attends over each request's slots."""

    def __init__(self, heads, kv_heads, head_dim, pool_size, device, dtype):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.k_pool = torch.zeros(pool_size, kv_heads, head_dim, device=device, dtype=dtype)
        self.v_pool = torch.zeros_like(self.k_pool)

    def forward(self, q, k, v, batch: ForwardBatch):
        self.k_pool[batch.out_cache_loc] = k.view(-1, self.kv_heads, self.head_dim)
        self.v_pool[batch.out_cache_loc] = v.view(-1, self.kv_heads, self.head_dim)
        out, start, rep = [], 0, self.heads // self.kv_heads
        for n, slots in zip(batch.seq_lens, batch.req_to_token):
            idx = torch.tensor(slots, device=q.device)
            qi = q[start:start + n].view(n, self.heads, self.head_dim).transpose(0, 1)
            ki = self.k_pool[idx].transpose(0, 1).repeat_interleave(rep, 0)
            vi = self.v_pool[idx].transpose(0, 1).repeat_interleave(rep, 0)
            mask = torch.ones(n, len(slots), dtype=torch.bool, device=q.device).tril(len(slots) - n)
            out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1).reshape(n, -1))
            start += n
        return torch.cat(out)


class Attention(nn.Module):
    def __init__(self, hidden, heads, kv_heads, head_dim, rotary_emb, pool_size, device, dtype):
        super().__init__()
        self.q_size, self.kv_size = heads * head_dim, kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=False)
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(heads, kv_heads, head_dim, pool_size, device, dtype)

    def forward(self, positions, hidden_states, batch):
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, batch))


class Model(nn.Module):
    def __init__(self, rotary_emb, device, dtype, vocab=512, hidden=256, layers=2, heads=8, kv_heads=2, head_dim=32,
                 pool_size=512):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Attention(hidden, heads, kv_heads, head_dim, rotary_emb, pool_size, device, dtype)
                                    for _ in range(layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.to(device, dtype)

    def forward(self, input_ids, positions, batch: ForwardBatch):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = h + layer(positions, h, batch)
        return self.lm_head(h)


@torch.no_grad()
def run(model, prompts, positions_of, steps, device):
    """Extend every prompt in one batch, then ``steps`` decode batches, slots allocated in order."""
    free = iter(range(10_000))
    req_to_token = [[next(free) for _ in p] for p in prompts]
    batch = ForwardBatch("extend", positions_of(prompts, None), [len(p) for p in prompts],
                         torch.tensor([s for slots in req_to_token for s in slots], device=device), req_to_token)
    logits = model(torch.cat(prompts).to(device), batch.positions, batch)
    last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    tokens = logits[last.to(device)].argmax(-1)
    for _ in range(steps):
        lengths = [len(slots) for slots in req_to_token]
        new = [next(free) for _ in prompts]
        for slots, s in zip(req_to_token, new):
            slots.append(s)
        batch = ForwardBatch("decode", positions_of(prompts, lengths), [1] * len(prompts),
                             torch.tensor(new, device=device), req_to_token)
        tokens = model(tokens, batch.positions, batch).argmax(-1)
    return tokens


def main(device: str | None = None, dtype: torch.dtype = torch.bfloat16, steps: int = 4, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (n,), generator=g) for n in (23, 7, 41)]

    text_rope = RotaryEmbedding(32, 4096, 10000.0)

    def text_positions(prompts, lengths):
        if lengths is None:
            return torch.cat([torch.arange(len(p)) for p in prompts]).to(device)
        return torch.tensor(lengths, device=device)

    run(Model(text_rope, device, dtype), prompts, text_positions, steps, device)

    # Qwen3-VL style: interleaved MRoPE sections for head_dim 32, an image in the second prompt
    vision_start, image = 500, 501
    vl_rope = RotaryEmbedding(32, 4096, 5000000.0, mrope_section=[6, 5, 5], mrope_interleaved=True)
    vl_prompts = [prompts[0], torch.cat([prompts[1], torch.tensor([vision_start] + [image] * 4), prompts[2][:9]])]
    deltas = {}

    def vl_positions(prompts, lengths):
        if lengths is None:
            rows = []
            for i, p in enumerate(prompts):
                grid = torch.tensor([[1, 4, 4]], device=device) if image in p.tolist() else None
                pos, delta = rb.mrope.rope_index(p[None].to(device), grid, None, spatial_merge_size=2,
                                                 image_token_id=image, video_token_id=502,
                                                 vision_start_token_id=vision_start, variant="qwen3_vl")
                rows.append(pos[:, 0])
                deltas[i] = int(delta[0])
            return torch.cat(rows, dim=1)
        return torch.tensor([n + deltas[i] for i, n in enumerate(lengths)], device=device).expand(3, -1)

    run(Model(vl_rope, device, dtype), vl_prompts, vl_positions, steps, device)
    result = dict(device=device, text_calls=len(text_rope.checked), mrope_calls=len(vl_rope.checked),
                  bit_exact_vs_reference=all(text_rope.checked + vl_rope.checked))
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    main(args.device, steps=args.steps)
