"""A serving-style video diffusion step with rope_backends: Wan's 3-D RoPE as ``apply_cached`` in place on the fused qkv.

    python examples/serving_diffusion_step.py # CPU in seconds; on a GPU machine it runs on "cuda"

A serving engine runs a DiT the way it runs an LLM: q, k, v as views of one fused projection,
RoPE in place through a cos/sin cache built once. Wan 2.x's 3-D RoPE fits that call exactly: pair
j of head_dim rotates by the frame, row or column index of its token (split ``rb.wan_dims(D)``),
with that axis' own frequencies. So the cache's column j holds pair j's frequency of its axis
(rows = index 0..max_len-1, made from ``rb.cos_sin_3d``'s own tables), ``positions [3, T]`` hold
each token's (frame, row, column), and ``mrope=rb.MRope(axis map)`` says which row each pair reads:
one ``rb.apply_cached(..., layout="interleaved")`` launch for q and k. A flow-matching sampler
runs a few Euler steps of a two-block DiT; every rotation is checked bit for bit against
``rb.apply`` with ``rb.cos_sin_3d`` (the training form) and against the eager reference.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rope_backends as rb


def video_rope_cache(head_dim: int, max_len: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, rb.MRope]:
    """``cos_sin_cache [max_len, head_dim]`` and the axis map for Wan's 3-D RoPE: pair j reads row
    ``axis[j]`` (0 frame, 1 height, 2 width) of ``positions [3, T]``."""
    dims = rb.wan_dims(head_dim)
    t, h = dims[0] // 2, dims[1] // 2
    # rb.cos_sin_3d's own tables along one axis at a time: the other two indices are 0
    along = [rb.cos_sin_3d(grid, dims=dims, base=base) for grid in ((max_len, 1, 1), (1, max_len, 1), (1, 1, max_len))]
    cols = [slice(0, t), slice(t, t + h), slice(t + h, head_dim // 2)]
    cos = torch.cat([tab[0][:, c] for tab, c in zip(along, cols)], dim=-1)
    sin = torch.cat([tab[1][:, c] for tab, c in zip(along, cols)], dim=-1)
    axes = (0,) * t + (1,) * h + (2,) * (head_dim // 2 - t - h)
    return torch.cat((cos, sin), dim=-1).to(device), rb.MRope(axes, name="wan3d")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, cache: torch.Tensor, axes: rb.MRope, checks: list):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.cache, self.axes, self.checks = cache, axes, checks

    def forward(self, x: torch.Tensor, positions: torch.Tensor, tables) -> torch.Tensor:
        b, s, c = x.shape
        qkv = self.qkv(x)  # [B, S, 3C]
        q = qkv[..., :c].view(b, s, self.heads, self.head_dim)  # views into qkv
        k = qkv[..., c:2 * c].view(b, s, self.heads, self.head_dim)
        v = qkv[..., 2 * c:].view(b, s, self.heads, self.head_dim)
        training_form = rb.apply_qk(q, k, *tables, layout="interleaved")  # cos_sin_3d tables, out of place
        reference = rb.apply_qk(q, k, *tables, layout="interleaved", backend="eager")
        rb.apply_cached(q, k, positions, self.cache, layout="interleaved", mrope=self.axes)  # in place in qkv
        self.checks.append(all(torch.equal(a, b_) for a, b_ in zip((q, k), training_form))
                           and all(torch.equal(a, b_) for a, b_ in zip((q, k), reference)))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.out(o.transpose(1, 2).reshape(b, s, c))
        return x + self.mlp(x)


class DiT(nn.Module):
    def __init__(self, channels=8, dim=256, heads=2, layers=2, max_len=32, device=None, checks=None):
        super().__init__()
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        cache, axes = video_rope_cache(dim // heads, max_len, device=device)
        self.blocks = nn.ModuleList(Block(dim, heads, cache, axes, checks) for _ in range(layers))
        self.time = nn.Linear(1, dim)
        self.unpatch = nn.Linear(dim, channels * 4)
        self.head_dim = dim // heads

    def forward(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, ch, f, hh, ww = latents.shape
        x = self.patch(latents)  # [B, dim, F, H/2, W/2]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2) + self.time(t.view(b, 1, 1).to(x.dtype))  # [B, F*H*W, dim], frame-major
        # each token's (frame, row, column): the [3, T] positions, shared by the batch
        idx = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")).reshape(3, 1, -1)
        positions = idx.expand(3, b, -1).to(latents.device)
        tables = [t_[:, None] for t_ in rb.cos_sin_3d(grid, dims=rb.wan_dims(self.head_dim), device=latents.device)]
        for block in self.blocks:
            x = block(x, positions, tables)
        x = self.unpatch(x).view(b, *grid, ch, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, ch, f, hh, ww)


@torch.no_grad()  # sampling is inference: q/k are rotated in place
def sample(model: DiT, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """Flow matching, Euler: x <- x + (t_next - t) * v(x, t), t from 1 to 0."""
    ts = torch.linspace(1.0, 0.0, steps + 1, device=latents.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        latents = latents + (t_next - t) * model(latents, t.expand(latents.shape[0]))
    return latents


def main(device: str | None = None, dtype: torch.dtype = torch.bfloat16, steps: int = 3, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    checks: list[bool] = []
    model = DiT(device=device, checks=checks).to(device, dtype)
    latents = torch.randn(2, 8, 3, 8, 12, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    out = sample(model, latents, steps)
    result = dict(device=device, head_dim=model.head_dim, split=rb.wan_dims(model.head_dim), rotations=len(checks),
                  finite=bool(torch.isfinite(out).all()), bit_exact_vs_training_form_and_reference=all(checks))
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    main(args.device, steps=args.steps)
