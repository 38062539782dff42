"""What ``rope_backends.integrations.transformers.patch`` changes for a real-size model: one training
step and one ``generate`` of a Llama-style ~1B model with random weights, with and without the patch.

    python bench/studies/integration_llama.py [--out DIR] [--device cuda] [--tiny] [--repeats 3]

The model is ``LlamaForCausalLM`` built from a ``LlamaConfig`` shaped like Llama-3.2-1B (hidden 2048,
16 layers, 32 query / 8 key-value heads of 64, llama3 rope scaling: CONFIG), random weights (nothing downloaded), bf16,
transformers' default (sdpa) attention. Variants: ``hf`` (unpatched), ``rb`` (``patch(model)``: the
model's own cos/sin, every q/k rotation through rope_backends) and, where ``rb.rope_config`` exists,
``rb-tables`` (``patch(model, tables="rb")``: rope_backends' float32 tables too).

Per variant: a training step (forward + backward + AdamW step, batch x seq tokens) and a generate
(greedy, exactly ``new_tokens`` new tokens after a prompt), each timed as the median of ``--repeats``
runs after one warm-up, the variants interleaved (A B A B ...) so drift hits all alike; peak memory
(``torch.cuda.max_memory_allocated``) of each. Then, on a small input in float32 (the same weights,
converted exactly), whether the logits and every gradient are bit-equal with and without the patch;
and in bf16 with ``tables="rb"``, whether every layer's rotated q/k equal ``rb.apply_cached`` with
``rb.rope_config(config).cos_sin_cache()`` on the same tokens (the trainer/server claim).

Writes ``integration-llama.json`` to ``--out``; prints a Markdown table. ``--tiny`` runs a two-layer
model on the CPU in seconds (what the test does). Needs transformers (5.x), not diffusers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import rope_backends as rb  # noqa: E402
from rope_backends.integrations.transformers import patch  # noqa: E402

# Llama-3.2-1B's shape (hidden, layers, heads, kv heads, intermediate, vocabulary, theta, llama3 scaling)
CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=128, max_position_embeddings=512,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            bos_token_id=1, eos_token_id=2)
WORK = dict(batch=4, seq=2048, prompt=512, new_tokens=128, check_batch=2, check_seq=128)
TINY_WORK = dict(batch=2, seq=32, prompt=8, new_tokens=8, check_batch=2, check_seq=16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _variants() -> list[str]:
    return ["hf", "rb"] + (["rb-tables"] if hasattr(rb, "rope_config") else [])


def _patched(model, variant: str):
    if variant == "hf":
        return _Nothing()
    return patch(model, tables="rb" if variant == "rb-tables" else None)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _timed(fn, device: torch.device) -> tuple[float, float | None]:
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start, _peak_gib(device)


def run(device: torch.device, tiny: bool, repeats: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import transformers

    work = TINY_WORK if tiny else WORK
    config = LlamaConfig(**(TINY if tiny else CONFIG))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    train_ids = torch.randint(3, config.vocab_size, (work["batch"], work["seq"]), generator=g).to(device)
    prompt = torch.randint(3, config.vocab_size, (1, work["prompt"]), generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step():
        model.train()
        loss = model(input_ids=train_ids, labels=train_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    generated: dict[str, torch.Tensor] = {}

    def generate(variant):
        model.eval()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=work["new_tokens"], min_new_tokens=work["new_tokens"],
                                 do_sample=False, pad_token_id=0)
        generated[variant] = out[0, work["prompt"]:].cpu()

    variants = _variants()
    times: dict[str, dict[str, list]] = {v: {"train": [], "generate": [], "train_peak": [], "generate_peak": []}
                                         for v in variants}
    calls = {}
    for rep in range(repeats + 1):  # round 0 warms up every variant (compilation, allocator, caches)
        for variant in variants:
            with _patched(model, variant) as handle:
                if variant != "hf":
                    calls[variant] = len(handle.modules)
                t, peak = _timed(train_step, device)
                if rep:
                    times[variant]["train"].append(t)
                    times[variant]["train_peak"].append(peak)
                t, peak = _timed(lambda: generate(variant), device)
                if rep:
                    times[variant]["generate"].append(t)
                    times[variant]["generate_peak"].append(peak)
    rows = []
    for variant in variants:
        t = times[variant]
        train_s, gen_s = statistics.median(t["train"]), statistics.median(t["generate"])
        rows.append(dict(
            variant=variant, patched_modules=calls.get(variant, 0),
            train_step_ms=train_s * 1e3, train_step_ms_min=min(t["train"]) * 1e3,
            train_tokens_per_s=work["batch"] * work["seq"] / train_s,
            train_peak_gib=max(t["train_peak"]) if t["train_peak"][0] is not None else None,
            generate_s=gen_s, generate_s_min=min(t["generate"]), generate_tokens_per_s=work["new_tokens"] / gen_s,
            generate_peak_gib=max(t["generate_peak"]) if t["generate_peak"][0] is not None else None,
            same_tokens_as_hf=bool(torch.equal(generated[variant], generated["hf"]))))
    opt.state.clear()  # the optimizer states are not needed by the checks below
    serving = _serving_check(model, config, work, device) if "rb-tables" in variants else None
    fp32 = _fp32_check(model, config, work, device)
    return dict(
        study="integration_llama", tiny=tiny, device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, transformers=transformers.__version__,
        triton=_version("triton"), rope_backends=rb.__version__, backend=_backend_for(device),
        config={k: v for k, v in (TINY if tiny else CONFIG).items()}, work=work, repeats=repeats,
        rows=rows, fp32=fp32, tables_rb_vs_apply_cached=serving)


def _serving_check(model, config, work, device) -> dict:
    """bf16, ``patch(model, tables="rb")``: every layer's rotated q/k vs ``rb.apply_cached`` of the
    same pre-rotation q/k with ``rb.rope_config(config).cos_sin_cache()``, as a flat token stream."""
    model.eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.vocab_size, (work["check_batch"], work["check_seq"]), generator=g).to(device)
    recorded, real = [], rb.apply_qk

    def apply_qk(q, k, cos, sin, **kw):
        out = real(q, k, cos, sin, **kw)
        recorded.append((q.clone(), k.clone(), out))
        return out

    with patch(model, tables="rb"), torch.no_grad():
        rb.apply_qk = apply_qk
        try:
            model(input_ids=ids)
        finally:
            rb.apply_qk = real
    cache = rb.rope_config(config).cos_sin_cache(device=device)
    b, s = ids.shape
    positions = torch.arange(s, device=device).repeat(b)
    same = []
    for q, k, (q_out, k_out) in recorded:  # q [B, H, S, D]
        flat = [t.transpose(1, 2).reshape(b * s, -1).clone() for t in (q, k)]
        rb.apply_cached(flat[0], flat[1], positions, cache, head_dim=q.shape[-1])
        same.append(all(torch.equal(a, o.transpose(1, 2).reshape(b * s, -1)) for a, o in zip(flat, (q_out, k_out))))
    return dict(layers=len(recorded), tokens=b * s, bit_equal=bool(same) and all(same))


def _fp32_check(model, config, work, device) -> dict:
    """Logits and gradients in float32 (the bf16 weights converted exactly), with and without the patch."""
    model.float()
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (work["check_batch"], work["check_seq"]), generator=g).to(device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return out.logits.detach(), [p.grad.detach().clone() for p in model.parameters()]

    want = step()
    with patch(model):
        got = step()
    model.zero_grad(set_to_none=True)
    model.to(torch.bfloat16)
    logits_equal = bool(torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)))
    grads_equal = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(got[1], want[1]))
    return dict(tokens=work["check_batch"] * work["check_seq"], logits_bit_equal=logits_equal,
                grads_bit_equal=grads_equal, logits_max_abs_diff=float((got[0] - want[0]).abs().max()))


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


def _backend_for(device: torch.device) -> str:
    serving = [b for b in rb.list_backends() if b.available and (device.type in b.device_types or "*" in b.device_types)]
    return max(serving, key=lambda b: b.priority).name if serving else "none"


def markdown(doc: dict) -> str:
    w = doc["work"]
    lines = [
        f"Llama-style {'tiny' if doc['tiny'] else '~1.2B'} model, bf16, random weights, {doc['device_name']} "
        f"(torch {doc['torch']}, transformers {doc['transformers']}, triton {doc['triton']}, backend "
        f"{doc['backend']}); median of {doc['repeats']}:",
        "",
        f"| variant | train step, {w['batch']}x{w['seq']} tokens (ms) | train peak (GiB) | "
        f"generate {w['new_tokens']} tokens after {w['prompt']} (s) | tokens/s | generate peak (GiB) | "
        f"same tokens as hf |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def gib(v):
        return "-" if v is None else f"{v:.2f}"

    for r in doc["rows"]:
        lines.append(f"| {r['variant']} | {r['train_step_ms']:.1f} | {gib(r['train_peak_gib'])} | {r['generate_s']:.3f} | "
                     f"{r['generate_tokens_per_s']:.1f} | {gib(r['generate_peak_gib'])} | {r['same_tokens_as_hf']} |")
    f = doc["fp32"]
    lines += ["", f"float32, {f['tokens']} tokens: logits bit-equal with and without the patch: {f['logits_bit_equal']}; "
                  f"every gradient bit-equal: {f['grads_bit_equal']}"]
    t = doc.get("tables_rb_vs_apply_cached")
    if t:
        lines.append(f"bf16, tables='rb', {t['tokens']} tokens: the rotated q/k of all {t['layers']} layers bit-equal to "
                     f"rb.apply_cached with rb.rope_config(config).cos_sin_cache(): {t['bit_equal']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for integration-llama.json")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--tiny", action="store_true", help="a two-layer model (CPU, seconds)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    doc = run(device, args.tiny, args.repeats)
    print(markdown(doc), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "integration-llama.json").write_text(json.dumps(doc, indent=1))
    ok = doc["fp32"]["logits_bit_equal"] and doc["fp32"]["grads_bit_equal"]
    ok = ok and (doc["tables_rb_vs_apply_cached"] is None or doc["tables_rb_vs_apply_cached"]["bit_equal"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
