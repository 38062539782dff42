"""Video diffusion with rope_backends: a Wan-style self-attention block with 3-D RoPE.

    python examples/diffusion_video.py        # CPU in a second; on a GPU machine it runs on "cuda"

A latent video ``[B, C, F, H, W]`` is patchified (1x2x2, as Wan 2.x) into ``F*H*W`` tokens,
flattened frame-major. ``rb.cos_sin_3d`` builds one table for the whole grid: head_dim is split
over (frames, height, width) by ``rb.wan_dims`` -- (44, 42, 42) for head_dim 128, Wan 2.1/2.2's
and Helios' split -- and ``rb.apply(..., layout="interleaved")`` rotates q and k of shape
``[B, F*H*W, heads, D]`` (pairs (2i, 2i+1): Wan's complex form). The rotation is checked against
diffusers' Wan formula ``x1*cos - x2*sin`` on its repeat-interleaved tables: bit-identical.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rope_backends as rb


class VideoSelfAttention(nn.Module):
    def __init__(self, channels: int = 16, dim: int = 512, heads: int = 4):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.patch = nn.Conv3d(channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm_q, self.norm_k = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, latents: torch.Tensor):
        tokens = self.patch(latents)  # [B, dim, F, H/2, W/2]
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, F*H*W, dim], frame-major
        b, s, _ = tokens.shape
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        q = self.norm_q(q).view(b, s, self.heads, self.head_dim)
        k = self.norm_k(k).view(b, s, self.heads, self.head_dim)
        v = v.view(b, s, self.heads, self.head_dim)
        cos, sin = rb.cos_sin_3d(grid, rb.wan_dims(self.head_dim), device=latents.device)  # [S, D/2]
        q = rb.apply(q, cos[:, None], sin[:, None], layout="interleaved")
        k = rb.apply(k, cos[:, None], sin[:, None], layout="interleaved")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(out.transpose(1, 2).reshape(b, s, -1)), (q, k, cos, sin, grid)


def diffusers_wan_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' WanAttnProcessor rotation on repeat-interleaved tables ``[S, 1, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def main(device: str | None = None, frames: int = 5, height: int = 16, width: int = 24, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    block = VideoSelfAttention().to(device)
    latents = torch.randn(1, 16, frames, height, width, device=device)
    with torch.no_grad():
        out, (q, k, cos, sin, grid) = block(latents)
        # the same q before RoPE, rotated with diffusers' formula
        tokens = block.patch(latents).flatten(2).transpose(1, 2)
        b, s, _ = tokens.shape
        q_raw = block.norm_q(block.qkv(tokens).chunk(3, dim=-1)[0]).view(b, s, block.heads, block.head_dim)
        q_diffusers = diffusers_wan_rotation(q_raw, cos.repeat_interleave(2, -1)[:, None], sin.repeat_interleave(2, -1)[:, None])
    result = dict(
        device=device,
        grid=grid,
        tokens=s,
        split=rb.wan_dims(block.head_dim),
        output_shape=tuple(out.shape),
        bit_exact_vs_diffusers=torch.equal(q, q_diffusers),
    )
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--frames", type=int, default=5)
    args = parser.parse_args()
    main(args.device, frames=args.frames)
