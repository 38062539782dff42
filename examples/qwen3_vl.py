"""Qwen3-VL with rope_backends: MRoPE position ids from ``rope_index``, then ``apply_cached``.

    python examples/qwen3_vl.py               # CPU in a second; on a GPU machine it runs on "cuda"

A batch of two prompts laid out as the Qwen3-VL processor does -- text, an image
(``<vision_start> <image_pad>*N <vision_end>``), a 3-frame video with a timestamp before every
frame -- one of them left-padded. ``rb.mrope.rope_index`` computes the ``[3, B, S]`` (t, h, w)
position ids and per-row deltas exactly as transformers' ``get_rope_index``, without a single
host-device sync on a GPU. ``rb.apply_cached`` then rotates q and k in place through one cos/sin
cache with Qwen3-VL's interleaved axis map (``mrope_section = [24, 20, 20]``). Decoding continues
with text positions ``cache_position + delta``. Every step is checked against the eager reference.
"""

from __future__ import annotations

import argparse

import torch

import rope_backends as rb

# Qwen3-VL token ids and rope settings (config.json of the released checkpoints)
VISION_START, VISION_END, IMAGE, VIDEO = 151652, 151653, 151655, 151656
HEAD_DIM, THETA, SECTION, MERGE = 128, 5_000_000.0, [24, 20, 20], 2


def build_prompts(device):
    """Two prompts, their image/video grids (t, h, w in patches) and the attention mask."""
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 150000, (n,), generator=g).tolist()  # noqa: E731

    def image(h, w):
        return [VISION_START] + [IMAGE] * ((h // MERGE) * (w // MERGE)) + [VISION_END]

    def video(frames, h, w):  # Qwen3-VL: "<t seconds>" text, then one frame, per frame
        out = []
        for _ in range(frames):
            out += text(4) + [VISION_START] + [VIDEO] * ((h // MERGE) * (w // MERGE)) + [VISION_END]
        return out

    row0 = text(12) + image(16, 24) + text(7) + video(3, 12, 16) + text(9)
    row1 = text(5) + image(8, 8) + text(20)
    seq = max(len(row0), len(row1))
    ids = torch.zeros(2, seq, dtype=torch.long)
    mask = torch.zeros(2, seq, dtype=torch.long)
    for b, row in enumerate((row0, row1)):  # left padding, as for generation
        ids[b, seq - len(row) :] = torch.tensor(row)
        mask[b, seq - len(row) :] = 1
    images = torch.tensor([[1, 16, 24], [1, 8, 8]])  # in batch order: row 0's image, then row 1's
    videos = torch.tensor([[3, 12, 16]])
    return ids.to(device), mask.to(device), images.to(device), videos.to(device)


def main(device: str | None = None, decode_steps: int = 4, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids, mask, images, videos = build_prompts(device)
    positions, deltas = rb.mrope.rope_index(
        ids, images, videos, mask,
        spatial_merge_size=MERGE, image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        variant="qwen3_vl",
    )  # [3, B, S], [B, 1]
    layout = rb.mrope.interleaved(SECTION)  # frequency j follows t, h or w: [T H W T H W ... T T]
    cache = rb.cos_sin_cache(32768, HEAD_DIM, base=THETA, device=device)

    b, s = ids.shape
    heads, kv_heads = 4, 2
    g = torch.Generator().manual_seed(1)
    same = []

    def rotate(q, k, pos):
        q_ref, k_ref = rb.apply_cached(q.clone(), k.clone(), pos, cache, mrope=layout, backend="eager")
        rb.apply_cached(q, k, pos, cache, mrope=layout)  # in place, one launch for q and k on GPU
        same.append(torch.equal(q, q_ref) and torch.equal(k, k_ref))

    # prefill: q, k [B, S, H, D] with [3, B, S] positions
    q = torch.randn(b, s, heads, HEAD_DIM, generator=g).to(device, torch.bfloat16)
    k = torch.randn(b, s, kv_heads, HEAD_DIM, generator=g).to(device, torch.bfloat16)
    rotate(q, k, positions)
    # decode: text only, position = cache_position + delta, the same on all three rows
    for step in range(decode_steps):
        pos = (s + step + deltas).expand(3, b, 1).contiguous()  # [3, B, 1]
        q = torch.randn(b, 1, heads, HEAD_DIM, generator=g).to(device, torch.bfloat16)
        k = torch.randn(b, 1, kv_heads, HEAD_DIM, generator=g).to(device, torch.bfloat16)
        rotate(q, k, pos)
    result = dict(
        device=device,
        seq=s,
        max_position=positions.amax(dim=(0, 2)).tolist(),
        deltas=deltas.flatten().tolist(),
        first_image_hw=positions[1:, 0, (ids[0] == IMAGE)][:, :3].tolist(),
        bit_exact_vs_reference=all(same),
    )
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--decode-steps", type=int, default=4)
    args = parser.parse_args()
    main(args.device, args.decode_steps)
