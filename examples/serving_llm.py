"""LLM serving with rope_backends: a cos/sin cache, a fused qkv buffer, prefill then a decode loop.

    python examples/serving_llm.py            # CPU in a second; on a GPU machine it runs on "cuda"

Like vLLM/SGLang: the projection writes q, k, v side by side into one ``[tokens, (Hq+2*Hk)*D]``
buffer; ``rb.apply_cached`` rotates the q and k *views* of it in place (no copies), looking each
token's cos/sin up by position in a ``[max_position, head_dim]`` cache built once. Grouped-query
attention: Hq query heads, Hk key heads. Each step is checked against the eager reference
backend, which every backend matches bit for bit.
"""

from __future__ import annotations

import argparse

import torch

import rope_backends as rb


def main(device: str | None = None, dtype: torch.dtype = torch.bfloat16, steps: int = 8, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    head_dim, q_heads, kv_heads = 128, 8, 2  # GQA 4:1
    prompt_lens = [37, 5, 120]  # three requests batched into one flat token stream
    hidden = 256
    g = torch.Generator().manual_seed(0)
    w_qkv = (torch.randn(hidden, (q_heads + 2 * kv_heads) * head_dim, generator=g) / hidden**0.5).to(device, dtype)

    # built once per model: cos in columns [:64], sin in [64:] (Llama-3 style theta)
    cache = rb.cos_sin_cache(4096, head_dim, base=500000.0, device=device)

    def rotate(tokens: torch.Tensor, positions: torch.Tensor) -> bool:
        qkv = tokens @ w_qkv  # [T, (Hq + 2 Hk) * D]
        q = qkv[:, : q_heads * head_dim]  # views into the fused buffer
        k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim]
        q_ref, k_ref = rb.apply_cached(q.clone(), k.clone(), positions, cache, head_dim=head_dim, backend="eager")
        rb.apply_cached(q, k, positions, cache, head_dim=head_dim)  # in place, dispatched by device
        return torch.equal(q, q_ref) and torch.equal(k, k_ref)

    # prefill: every request's prompt, positions 0..len-1 each
    positions = torch.cat([torch.arange(n) for n in prompt_lens]).to(device)
    tokens = torch.randn(len(positions), hidden, generator=g).to(device, dtype)
    same = [rotate(tokens, positions)]
    # decode: one new token per request per step, at position = its current length
    lengths = torch.tensor(prompt_lens, device=device)
    for _ in range(steps):
        same.append(rotate(torch.randn(len(prompt_lens), hidden, generator=g).to(device, dtype), lengths))
        lengths = lengths + 1
    result = dict(
        device=device,
        backend=_backend_for(device),
        tokens_prefill=int(positions.numel()),
        decode_steps=steps,
        bit_exact_vs_reference=all(same),
    )
    if verbose:
        print(result)
    return result


def _backend_for(device: str) -> str:
    """The available backend of highest priority serving ``device`` per ``rb.list_backends()`` (what
    dispatch picks unless ``backend=``, ``rb.use_backend`` or ``ROPE_BACKEND`` say otherwise)."""
    kind = torch.device(device).type
    serving = [b for b in rb.list_backends() if b.available and (kind in b.device_types or "*" in b.device_types)]
    return max(serving, key=lambda b: b.priority).name if serving else "none"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    main(args.device, steps=args.steps)
