"""HF-style training with rope_backends: ``rb.apply_qk`` inside an attention block, loss.backward().

    python examples/training_hf.py            # CPU in a second; on a GPU machine it runs on "cuda"

The block is the Llama layout: q/k/v projections to ``[B, S, H, D]``, RoPE on q and k (NeoX
rotate-half pairing), grouped-query SDPA, output projection. ``rb.apply_qk`` is differentiable
(its backward is the rotation by -theta, one fused launch on GPU) and compiles under
``torch.compile``. The first step is also run with Hugging Face's ``rotate_half`` formula; in
float32 the loss and every gradient are bit-identical.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rope_backends as rb


class Attention(nn.Module):
    def __init__(self, hidden: int = 256, heads: int = 8, kv_heads: int = 2, head_dim: int = 32):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope=None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim)
        # cos/sin [S, D/2] -> [S, 1, D/2]: broadcast over batch and heads of [B, S, H, D]
        q, k = (rope or rb.apply_qk)(q, k, cos[:, None], sin[:, None])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants [B, H, S, D]
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


def hf_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (rotate_half) on the duplicated tables."""
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def main(device: str | None = None, steps: int = 5, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch, seq, hidden = 2, 64, 256
    model = Attention(hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # tables from positions (float64 on the host, rounded once: the same bits on every device)
    cos, sin = rb.cos_sin(torch.arange(seq, device=device), model.head_dim)
    x = torch.randn(batch, seq, hidden, device=device)
    target = torch.randn(batch, seq, hidden, device=device)

    # one step both ways: the rope_backends block and the same block with HF's formula
    grads = []
    for rope in (None, hf_rope):
        model.zero_grad()
        loss = F.mse_loss(model(x, cos, sin, rope=rope), target)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [loss.detach()])
    same_as_hf = all(torch.equal(a, b) for a, b in zip(*grads))

    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x, cos, sin), target)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 5))
    result = dict(device=device, losses=losses, grads_bit_exact_vs_hf=same_as_hf)
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    main(args.device, args.steps)
