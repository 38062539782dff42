"""Drop-in rope_backends for a Hugging Face model: one ``patch`` call for training and generate.

    python examples/patch_transformers.py     # CPU in seconds; on a GPU machine it runs on "cuda"

``rope_backends.integrations.transformers.patch(model)`` routes every q/k rotation of this model
instance through ``rb.apply_qk`` (one fused launch on a GPU, forward and backward) and gives the
original code back on ``undo`` / leaving the ``with``. A tiny randomly initialised Llama (nothing
downloaded) takes a training step and generates, with and without the patch: in float32 the loss,
every gradient and the generated tokens are bit-identical.

``patch(model, tables="rb")`` also replaces the model's own cos/sin with rope_backends' float32
table for its config -- the one a serving engine builds with ``rb.rope_config(config)
.cos_sin_cache()`` -- so the keys the patched model writes to its KV cache equal, bit for bit and
in bf16, what ``rb.apply_cached`` (the serving call) makes of the same tokens: the trainer and the
server give the same bits.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rope_backends as rb
from rope_backends.integrations.transformers import patch


def tiny_llama(device: str, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).to(device, dtype)


def train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def generate(model, ids):
    model.eval()
    return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


@torch.no_grad()
def same_bits_as_serving(model, ids) -> bool:
    """The keys of every layer in the patched model's KV cache vs ``rb.apply_cached`` on the same
    pre-rotation keys with the server's cache: a flat token stream, positions 0..S-1 per row."""
    pre = []  # each layer's k before the rotation: the k_proj output
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: pre.append(out))
             for layer in model.model.layers]
    out = model(input_ids=ids, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # the model's own KV cache (5.24 renamed it)
    for h in hooks:
        h.remove()
    server_cache = rb.rope_config(model.config).cos_sin_cache(device=ids.device)  # float32, built once
    b, s = ids.shape
    positions = torch.arange(s, device=ids.device).repeat(b)  # [B*S]
    same = []
    for layer, k in zip(cache.layers, pre):
        k_serving = k.reshape(b * s, -1).clone()  # [T, Hk*D], as a server holds it
        rb.apply_cached(k_serving.clone(), k_serving, positions, server_cache, head_dim=model.config.head_dim)
        rotated = layer.keys.transpose(1, 2).reshape(b * s, -1)  # HF's [B, Hk, S, D] -> [T, Hk*D]
        same.append(torch.equal(rotated, k_serving))
    return all(same)


def main(device: str | None = None, verbose: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    model = tiny_llama(device)
    want_step, want_tokens = train_step(model, ids), generate(model, ids)
    with patch(model) as handle:
        got_step, got_tokens = train_step(model, ids), generate(model, ids)
    result = dict(device=device, patched=handle.modules,
                  grads_bit_exact_vs_unpatched=all(torch.equal(a, b) for a, b in zip(got_step, want_step)),
                  bit_exact_tokens_vs_unpatched=bool(torch.equal(got_tokens, want_tokens)))
    if hasattr(rb, "rope_config"):
        bf16 = tiny_llama(device, torch.bfloat16)
        with patch(bf16, tables="rb"):
            result["bit_exact_kv_cache_vs_serving_bf16"] = same_bits_as_serving(bf16, ids)
    if verbose:
        print(result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    main(args.device)
