"""``rope_backends.integrations.transformers.patch`` on the installed transformers' real model code.

Every supported family is built from its real config class, tiny and randomly initialised (two
layers, hidden 64; the VL families with a two-block vision tower and one image per row), nothing
downloaded. What is proven, per family:

- float32 forward outputs and every parameter gradient are bit-equal with and without the patch
  (``assert_bitwise_equal``), and the patch is *used*: a counting backend sees one forward and one
  backward rotation per patched attention module; after ``undo`` it sees none;
- bf16 / fp16: every rotation the model performs, given the model's own inputs to it, is at least
  as close to the float64 rotation (transformers' own function evaluated in float64) as
  transformers' bf16 / fp16 result, in max and in mean absolute error (vision towers: equal bits);
- ``generate``, gradient checkpointing and ``torch.compile(fullgraph=True)`` (aot_eager: bit-equal
  to eager; the graph holds one rope_backends op per layer and no break);
- patching twice, undo in any order, two models of one family, accelerate-style hooks, and the
  refusals (unsupported family, changed transformers function, bad arguments), each leaving the
  model and the transformers modules exactly as they were;
- ``tables="rb"``: the rotated q/k equal a serving-style ``rb.apply_cached`` with
  ``rb.rope_config(config).cos_sin_cache()`` bit for bit, bf16, on every backend (eager, the
  simulated NPU, the Triton interpreter in a subprocess).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

tf = pytest.importorskip("transformers")

import rope_backends as rb  # noqa: E402
from rope_backends import reference  # noqa: E402
from rope_backends.integrations import transformers as rbt  # noqa: E402
from rope_backends.integrations import _patching, _rewrite  # noqa: E402
from rope_backends.registry import Backend  # noqa: E402
from rope_backends.testing import assert_bitwise_equal  # noqa: E402

V = 128  # vocabulary of every tiny model
IMG, VS, VE = 5, 3, 4  # image, vision_start, vision_end token ids, inside the vocabulary


def _text(**kw) -> dict:
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


def _ids(b: int = 2, s: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(6, V, (b, s), generator=g)


def _vl_inputs(grid=(1, 4, 4), merge=2, patch_dim=24, seed=0) -> dict:
    """Two rows of text around one image (16 patches -> 4 merged tokens), the second row shifted."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n = t * h * w // (merge * merge)
    text = torch.randint(6, V, (10,), generator=g)
    row = torch.cat([text[:4], torch.tensor([VS]), torch.full((n,), IMG), torch.tensor([VE]), text[4:]])
    ids = torch.stack([row, row.roll(2)])
    return dict(input_ids=ids, pixel_values=torch.randn(2 * t * h * w, patch_dim, generator=g),
                image_grid_thw=torch.tensor([list(grid)] * 2), mm_token_type_ids=(ids == IMG).long())


_VL_IDS = dict(image_token_id=IMG, vision_start_token_id=VS, vision_end_token_id=VE, video_token_id=2)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen2_vl():
    text = _text(head_dim=16, rope_parameters=dict(_MROPE))
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    return tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vision, **_VL_IDS))


def _qwen2_5_vl():
    text = _text(head_dim=16, rope_parameters=dict(_MROPE))
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1], in_channels=3)
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_VL_IDS))


def _qwen3_vl():
    text = _text(head_dim=16, rope_parameters=dict(_MROPE, mrope_interleaved=True))
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=2, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0], in_channels=3)
    return tf.Qwen3VLForConditionalGeneration(tf.Qwen3VLConfig(text_config=text, vision_config=vision, **_VL_IDS))


# family -> (model factory, inputs factory, patched attention modules, rotary calls per forward)
FAMILIES = {
    "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_text())), lambda: dict(input_ids=_ids()), 2, 2),
    "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**_text())), lambda: dict(input_ids=_ids()), 2, 2),
    "mixtral": (lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_text(num_local_experts=2, num_experts_per_tok=1))),
                lambda: dict(input_ids=_ids()), 2, 2),
    "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_text())), lambda: dict(input_ids=_ids()), 2, 2),
    "qwen2_moe": (lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**_text(
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32))),
        lambda: dict(input_ids=_ids()), 2, 2),
    "qwen3_moe": (lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_text(
        head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32))),
        lambda: dict(input_ids=_ids()), 2, 2),
    "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_text(head_dim=16))), lambda: dict(input_ids=_ids()), 2, 2),
    "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_text(partial_rotary_factor=0.5))),
             lambda: dict(input_ids=_ids()), 2, 2),
    "granite": (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**_text())), lambda: dict(input_ids=_ids()), 2, 2),
    "starcoder2": (lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**_text())),
                   lambda: dict(input_ids=_ids()), 2, 2),
    "smollm3": (lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**_text())), lambda: dict(input_ids=_ids()), 2, 2),
    "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**_text(head_dim=24))), lambda: dict(input_ids=_ids()), 2, 2),
    "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_text(head_dim=16, sliding_window=8))),
               lambda: dict(input_ids=_ids()), 2, 2),
    "gemma3": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_text(
        head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]))),
        lambda: dict(input_ids=_ids()), 2, 2),
    "gptj": (lambda: tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                      n_positions=256, bos_token_id=1, eos_token_id=2)),
             lambda: dict(input_ids=_ids()), 2, 4),
    "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        rotary_pct=0.25, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)),
        lambda: dict(input_ids=_ids()), 2, 2),
    "qwen2_vl": (_qwen2_vl, _vl_inputs, 4, 4),
    "qwen2_5_vl": (_qwen2_5_vl, _vl_inputs, 4, 4),
    "qwen3_vl": (_qwen3_vl, _vl_inputs, 4, 4),
}


def build(family: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    make, inputs = FAMILIES[family][:2]
    torch.manual_seed(0)
    model = make().to(device, dtype)
    model.config.use_cache = False
    inp = inputs()
    if "mm_token_type_ids" in inp and "mm_token_type_ids" not in inspect.signature(type(model).forward).parameters:
        del inp["mm_token_type_ids"]  # transformers before 5.x's processor-provided token types
    if "pixel_values" in inp:
        inp["pixel_values"] = inp["pixel_values"].to(dtype)
    return model, {k: v.to(device) for k, v in inp.items()}


def test_every_supported_family_is_tested():
    assert sorted(FAMILIES) == sorted(rbt.SUPPORTED) == sorted(rbt.supported_families())


class Counting:
    """A backend that counts forward and backward rotations and computes them with the reference."""

    def __init__(self):
        self.calls: Counter[str] = Counter()

    def forward(self, args):
        self.calls["backward" if args.conjugate else "forward"] += 1
        return reference.run(args)


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.delenv("ROPE_BACKEND", raising=False)
    c = Counting()
    rb.register_backend(Backend(name="counting", device_types=("cpu",), priority=-100, forward=c.forward))
    yield c
    rb.unregister_backend("counting")


def _step(model, inp, run=None):
    """One training step's forward (through ``run``, default the model) and backward: the logits
    and every parameter gradient."""
    model.zero_grad(set_to_none=True)
    logits = (model if run is None else run)(**inp).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(got, want):
    assert_bitwise_equal(got[0], want[0], name="logits")
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert_bitwise_equal(got[1][name], want[1][name], name=f"grad {name}")


# ------------------------------------------------------------------------------------------------
# float32: bit-equal forward and gradients, and the patch is what runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_forward_and_gradients_bit_equal(family, counting):
    model, inp = build(family)
    model.train()
    modules, expected = FAMILIES[family][2:]
    want = _step(model, inp)
    with rb.use_backend("counting"):
        with rbt.patch(model) as handle:
            assert handle.families == (family,) and len(handle.modules) == modules
            got = _step(model, inp)
        assert counting.calls == {"forward": expected, "backward": expected}
        after = _step(model, inp)  # undone: transformers' own code again, rope_backends not called
    assert counting.calls == {"forward": expected, "backward": expected}
    _assert_same_step(got, want)
    _assert_same_step(after, want)


def _fp32_step_on(family: str, backend: str, device: str = "cpu") -> None:
    model, inp = build(family, device=device)
    model.train()
    want = _step(model, inp)
    with rb.use_backend(backend), rbt.patch(model):
        got = _step(model, inp)
    _assert_same_step(got, want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_bit_equal_on_the_npu_backend(family):
    """The NPU backend returns contiguous results where the reference keeps q's strides: same bits."""
    _fp32_step_on(family, "npu")


def test_fp32_bit_equal_on_the_triton_interpreter():
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); import test_integrations_transformers as t\n"
            "for f in ('llama', 'qwen3', 'gptj', 'qwen2_vl'):\n    t._fp32_step_on(f, 'triton')\nprint('ok')\n" % tests)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"), cwd=os.path.dirname(tests))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gptj", "gpt_neox", "qwen2_vl", "qwen3_vl"])
def test_cuda_fp32_bit_equal(family):
    """On a GPU (the triton backend where it is installed): the same float32 bits as transformers'."""
    _fp32_step_on(family, _cuda_backend(), "cuda")


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_vl"])
def test_cuda_tables_rb_rotations_equal_serving_bf16(family):
    assert _serving_check(family, _cuda_backend(), "cuda") == 4


def _cuda_backend() -> str:
    serving = [b for b in rb.list_backends() if b.available and ("cuda" in b.device_types or "*" in b.device_types)]
    return max(serving, key=lambda b: b.priority).name


# ------------------------------------------------------------------------------------------------
# bf16 / fp16: each rotation at least as close to float64 as transformers' own


def _record_native_calls(monkeypatch, model):
    """Wrap the transformers functions the model's attention calls (the module globals), so an
    unpatched forward records each call's arguments and transformers' result."""
    calls = []
    for where, module in model.named_modules():
        fwd = type(module).forward
        for site in _rewrite.find_sites(fwd, _rewrite.rotary_names(fwd)):
            original = site.original
            if getattr(site.namespace.get(site.name), "_recording", False):
                continue

            def recording(*args, _original=original, _name=site.name, **kwargs):
                kept = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                out = _original(*args, **kwargs)
                calls.append((_original, _name, kept, kwargs, out))
                return out

            recording._recording = True
            monkeypatch.setitem(site.namespace, site.name, recording)
    return calls


def _errors(got, exact):
    got = got if isinstance(got, tuple) else (got,)
    exact = exact if isinstance(exact, tuple) else (exact,)
    diff = torch.cat([(g.double() - e.double()).abs().reshape(-1) for g, e in zip(got, exact)])
    return diff.max().item(), diff.mean().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_low_precision_rotations_closer_to_float64(family, dtype, monkeypatch):
    model, inp = build(family, dtype)
    calls = _record_native_calls(monkeypatch, model)
    with torch.no_grad():
        model(**inp)
    assert calls, "the model made no rotary call"
    compared = 0
    for original, name, args, kwargs, hf in calls:
        form = rbt._FORMS_BY_FAMILY.get(original.__module__.split(".")[2], rbt._FORMS)[name]
        ours = rbt._replacement(original, form, promote=True)(*args, **kwargs)
        exact = original(*(a.double() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
        if name == "apply_rotary_pos_emb_vision":
            # transformers computes the vision rotation in float32 and rounds once: rope_backends' contract
            for o, h in zip(ours, hf):
                assert_bitwise_equal(o, h, name=f"{family} vision rotation")
            continue
        ours_max, ours_mean = _errors(ours, exact)
        hf_max, hf_mean = _errors(hf, exact)
        assert ours_max <= hf_max and ours_mean <= hf_mean, (name, ours_max, hf_max, ours_mean, hf_mean)
        compared += 1
    assert compared >= 2


# ------------------------------------------------------------------------------------------------
# generate, gradient checkpointing, torch.compile


@pytest.mark.parametrize("family", ["llama", "gptj", "gemma3", "qwen2_vl"])
def test_generate_same_tokens(family, counting):
    model, inp = build(family)
    model.eval()
    model.config.use_cache = True
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = model.generate(**inp, **kw)
    with rb.use_backend("counting"), rbt.patch(model):
        got = model.generate(**inp, **kw)
    assert torch.equal(got, want)
    text_calls = FAMILIES[family][3] // (2 if "vl" in family else 1)
    assert counting.calls["forward"] >= 5 * text_calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])
def test_gradient_checkpointing(family, counting):
    model, inp = build(family)
    model.train()
    # transformers 5.24 renamed it; older 5.x only have gradient_checkpointing_enable
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    want = _step(model, inp)
    with rb.use_backend("counting"), rbt.patch(model):
        got = _step(model, inp)
    _assert_same_step(got, want)
    n = FAMILIES[family][3]
    assert counting.calls == {"forward": 2 * n, "backward": n}  # the checkpoint recomputes each forward


def test_torch_compile_fullgraph():
    model, inp = build("llama")
    model.train()
    with rbt.patch(model):
        want = _step(model, inp)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(**inp)
        assert explained.graph_break_count == 0
        ops = [n for g in explained.graphs for n in g.graph.nodes if "rope_backends" in str(n.target)]
        assert len(ops) == FAMILIES["llama"][2]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = _step(model, inp, compiled)
    torch._dynamo.reset()
    _assert_same_step(got, want)


# ------------------------------------------------------------------------------------------------
# patch / undo bookkeeping


def _state(model):
    """Everything a patch may touch: each module's own attributes, and the families' module globals."""
    modules = {name: dict(vars(m)) for name, m in model.named_modules()}
    globals_ = {f.module: dict(vars(sys.modules[f.module])) for f in rbt._FAMILY_LIST if f.module in sys.modules}
    return modules, globals_


def _library_names(namespace: dict) -> set:
    """A module's names but the private aliases patches bind and keep (``_rewrite.Aliases``)."""
    return {k for k in namespace if not k.startswith("_rope_backends__")}


def _assert_restored(model, before):
    modules, globals_ = _state(model)
    assert modules.keys() == before[0].keys()
    for name in modules:
        assert modules[name].keys() == before[0][name].keys(), name
        for key, value in modules[name].items():
            if not isinstance(value, torch.Tensor):  # a forward may cache tensors (Qwen2-VL's rope_deltas)
                assert value is before[0][name][key], (name, key)
    for name in globals_:
        assert _library_names(globals_[name]) == _library_names(before[1][name]), name
        assert all(globals_[name][k] is before[1][name][k] for k in _library_names(globals_[name])), name


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_patch_twice_then_undo_restores_exactly(order, counting):
    model, inp = build("qwen2_vl")
    before = _state(model)
    want = _step(model, inp)
    first, second = rbt.patch(model), rbt.patch(model)
    attn = model.model.language_model.layers[0].self_attn
    assert _patching.patched_value(attn, "forward")[1] == 2
    with rb.use_backend("counting"):
        _assert_same_step(_step(model, inp), want)
    assert counting.calls["forward"] == 4  # the second patch shares the first: not applied twice
    (second if order == "lifo" else first).undo()
    assert first.active != second.active
    with rb.use_backend("counting"):
        _assert_same_step(_step(model, inp), want)
    assert counting.calls["forward"] == 8
    (first if order == "lifo" else second).undo()
    first.undo()  # a second undo does nothing
    _assert_restored(model, before)
    with rb.use_backend("counting"):
        _assert_same_step(_step(model, inp), want)
    assert counting.calls["forward"] == 8


def test_two_models_of_one_family_are_independent(counting):
    a, inp = build("llama")
    b, _ = build("llama")
    with rb.use_backend("counting"):
        with rbt.patch(a):
            b(**inp)
            assert counting.calls["forward"] == 0
            assert "forward" not in vars(b.model.layers[0].self_attn)
            a(**inp)
            assert counting.calls["forward"] == 2


def test_accelerate_style_hook_is_kept(counting):
    """accelerate's device-map hooks set ``module.forward`` to a wrapper calling ``module._old_forward``:
    the patch replaces ``_old_forward`` and keeps the hook."""
    model, inp = build("llama")
    want = _step(model, inp)
    hooked = []
    for m in model.modules():
        if isinstance(m, tf.models.llama.modeling_llama.LlamaAttention):
            m._old_forward = m.forward

            def new_forward(module, *args, **kwargs):
                hooked.append(1)
                return module._old_forward(*args, **kwargs)

            m.forward = functools.update_wrapper(functools.partial(new_forward, m), m._old_forward)
    before = _state(model)
    with rb.use_backend("counting"), rbt.patch(model):
        got = _step(model, inp)
    _assert_same_step(got, want)
    assert counting.calls["forward"] == 2 and len(hooked) == 2
    _assert_restored(model, before)


def test_copy_and_pickle_of_a_patched_model(counting):
    """A deepcopy keeps the patch (untracked by the handle); a pickle stores transformers' code."""
    import io

    model, inp = build("llama")
    want = model(**inp).logits
    with rbt.patch(model):
        copied = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with rb.use_backend("counting"):
        assert_bitwise_equal(loaded(**inp).logits, want)
        assert counting.calls["forward"] == 0
        assert_bitwise_equal(copied(**inp).logits, want)  # the patch it was copied with is undone by now
        assert counting.calls["forward"] == 2
        with rbt.patch(loaded):  # unpickling bound transformers' forward to each module: patchable
            assert_bitwise_equal(loaded(**inp).logits, want)
        assert counting.calls["forward"] == 4


def test_unsupported_models_are_refused_unchanged():
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"model: expected a model of a supported family: llama .*qwen3_vl.*"
                                         r"got GPT2LMHeadModel"):
        rbt.patch(gpt2)
    cohere = tf.CohereForCausalLM(tf.CohereConfig(**_text()))  # interleaved rotate_half: not supported
    before = _state(cohere)
    with pytest.raises(ValueError, match=r"cohere\.modeling_cohere:apply_rotary_pos_emb"):
        rbt.patch(cohere)
    _assert_restored(cohere, before)


def test_bad_arguments():
    model, _ = build("llama")
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module .* got str"):
        rbt.patch("llama")
    with pytest.raises(ValueError, match=r"tables: expected None, 'model' or 'rb', got 'hf'"):
        rbt.patch(model, tables="hf")
    before = _state(model)
    own = model.model.layers[0].self_attn
    own.forward = functools.partial(type(own).forward, own)  # an instance forward nobody we know set
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn already has its own forward"):
        rbt.patch(model)
    del own.forward
    _assert_restored(model, before)


def test_changed_transformers_function_is_refused(monkeypatch):
    """A transformers version whose function differs from what rope_backends reproduces: refused."""
    ml = tf.models.llama.modeling_llama
    original = ml.apply_rotary_pos_emb

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # sin with the other sign
        return original(q, k, cos, -sin, unsqueeze_dim)

    apply_rotary_pos_emb.__module__, apply_rotary_pos_emb.__qualname__ = ml.__name__, "apply_rotary_pos_emb"
    monkeypatch.setattr(ml, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    model, _ = build("llama")
    before = _state(model)
    with pytest.raises(ValueError, match=r"modeling_llama.apply_rotary_pos_emb, which this transformers version "
                                         r"changed \(its results differ"):
        rbt.patch(model)
    _assert_restored(model, before)


# ------------------------------------------------------------------------------------------------
# tables="rb": the trainer's rotated q/k are the server's


def _serving_config(model, layer: int):
    """What a server builds from the model's config for ``layer``: the cache and the MRoPE axis map."""
    cfg = model.config.get_text_config()
    if model.config.model_type == "gptj":  # GPT-J: theta 10000 on config.rotary_dim dims
        rc = rb.rope_config(None, rotary_dim=cfg.rotary_dim, base=10000.0, max_position_embeddings=cfg.n_positions)
    else:  # Gemma 3: one table per layer type
        kinds = getattr(cfg, "layer_types", None)
        nested = kinds and set(kinds) <= set(getattr(cfg, "rope_parameters", None) or {})
        rc = rb.rope_config(cfg, layer_type=kinds[layer] if nested else None)
    return rc.cos_sin_cache(device=model.device), (rc.mrope() if rc.mrope_section is not None else None), rc.rotary_dim


def _serving_check(family: str, backend: str, device: str = "cpu") -> int:
    """Run the bf16 model patched with tables="rb" on ``backend``; every text rotation's output
    must equal ``rb.apply_cached`` (on the same backend) of its input with the server's cache and
    the positions the model used, as a flat token stream. Returns the number of rotations checked."""
    model, inp = build(family, torch.bfloat16, device)
    recorded, positions = [], []
    real_qk, real_apply = rb.apply_qk, rb.apply

    def apply_qk(q, k, cos, sin, **kw):
        out = real_qk(q, k, cos, sin, **kw)
        recorded.append(((q.clone(), k.clone()), out))
        return out

    def apply(x, cos, sin, **kw):
        out = real_apply(x, cos, sin, **kw)
        recorded.append(((x.clone(),), (out,)))
        return out

    with rbt.patch(model, tables="rb"):
        hooks = [m.register_forward_pre_hook(
            lambda mod, args, kw: positions.append(args[1] if len(args) > 1 else kw["position_ids"]), with_kwargs=True)
            for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding") and "Vision" not in type(m).__name__]
        rb.apply_qk, rb.apply = apply_qk, apply
        try:
            with torch.no_grad(), rb.use_backend(backend):
                model(**inp)
        finally:
            rb.apply_qk, rb.apply = real_qk, real_apply
            for h in hooks:
                h.remove()
    checked = 0
    text = [r for r in recorded if r[0][0].dim() == 4]  # not a vision tower's [S, H, D]: its own tables
    gptj = family == "gptj"  # per tensor, [B, S, H, r] slices of q/k, not [B, H, S, D]
    for call, (ins, outs) in enumerate(text):
        cache, mrope, rotary_dim = _serving_config(model, call // 2 if gptj else call)
        b = ins[0].shape[0]
        s = ins[0].shape[1] if gptj else ins[0].shape[2]
        pos = positions[0]
        pos = pos.expand(*pos.shape[:-2], b, s) if mrope is None else pos.expand(3, b, s)
        pos = pos.reshape(b * s) if mrope is None else pos.reshape(3, b * s)

        def flat(t):  # [B, H, S, D] (or GPT-J's [B, S, H, r]) -> a server's [T, H*D]
            return (t if gptj else t.transpose(1, 2)).reshape(b * s, -1).clone()

        served = [flat(t) for t in ins]
        head_dim = ins[0].shape[-1]
        rb.apply_cached(served[0], served[1] if len(served) > 1 else None, pos, cache, rotary_dim=rotary_dim,
                        mrope=mrope, head_dim=head_dim, backend=backend, layout="interleaved" if gptj else "neox")
        for got, want in zip(served, outs):
            assert_bitwise_equal(flat(want), got, name=f"{family} on {backend}: rotated q/k vs apply_cached")
            checked += 1
    return checked


SERVING_FAMILIES = ["llama", "qwen3", "qwen2_vl"]


@pytest.mark.parametrize("backend", ["eager", "npu"])
@pytest.mark.parametrize("family", SERVING_FAMILIES)
def test_tables_rb_rotations_equal_serving_bf16(family, backend):
    assert _serving_check(family, backend) == 4  # 2 layers x (q, k)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "gemma3", "gemma2", "gpt_neox", "phi3", "mistral"])
def test_tables_rb_rotations_equal_serving_more_families(family):
    assert _serving_check(family, "eager") == 4


def test_tables_rb_gptj():
    if not any(n == "GPTJRotaryEmbedding" for n in dir(tf.models.gptj.modeling_gptj)):
        with pytest.raises(ValueError, match=r"tables: 'rb' replaces the model's rotary-embedding module"):
            rbt.patch(build("gptj")[0], tables="rb")  # earlier 5.x: GPT-J computes its table inside attention
        return
    assert _serving_check("gptj", "eager") == 4  # per tensor: 2 layers x (q, k)


def test_tables_rb_rotations_equal_serving_triton_interpreter():
    """The same check with the Triton kernels, through the interpreter, in a process of its own."""
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); import test_integrations_transformers as t\n"
            "print([t._serving_check(f, 'triton') for f in t.SERVING_FAMILIES])\n" % tests)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=os.path.dirname(tests))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[4, 4, 4]", done.stdout


def test_tables_rb_refusals():
    model, inp = build("llama")
    before = _state(model)
    with rbt.patch(model):
        with pytest.raises(ValueError, match=r"already patched differently .*undo that patch first"):
            rbt.patch(model, tables="rb")
    _assert_restored(model, before)
    dynamic = tf.LlamaForCausalLM(tf.LlamaConfig(**_text(rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})))
    with pytest.raises(ValueError, match=r"rope_type 'dynamic' changes with the sequence length"):
        rbt.patch(dynamic, tables="rb")
    assert "forward" not in vars(dynamic.model.layers[0].self_attn)
    with rbt.patch(model, tables="rb"):  # max_position_embeddings = 256 rows
        model(**inp)
        with pytest.raises(ValueError, match=r"positions: expected values in \[0, 256\)"):
            model(input_ids=inp["input_ids"], position_ids=torch.arange(250, 262)[None])


def test_integration_study_runs_tiny(tmp_path, capsys):
    """bench/studies/integration_llama.py --tiny: the GPU study's code path on the CPU."""
    import importlib.util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "studies",
                        "integration_llama.py")
    spec = importlib.util.spec_from_file_location("_integration_llama", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main(["--tiny", "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "integration-llama.json").read_text())
    assert doc["fp32"]["logits_bit_equal"] is True and doc["fp32"]["grads_bit_equal"] is True
    assert doc["tables_rb_vs_apply_cached"] == {"layers": 2, "tokens": 32, "bit_equal": True}
    assert [r["variant"] for r in doc["rows"]][:2] == ["hf", "rb"]
    assert all(r["patched_modules"] == (0 if r["variant"] == "hf" else 2) for r in doc["rows"])
    assert "| variant | train step" in capsys.readouterr().out


def test_importing_rope_backends_imports_no_model_library():
    code = ("import sys, rope_backends, rope_backends.integrations, rope_backends.integrations.transformers, "
            "rope_backends.integrations.diffusers\n"
            "bad = [m for m in ('transformers', 'diffusers') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "import rope_backends.integrations as i; assert 'rope_backends.integrations' in sys.modules\n")
    plain = "import sys, rope_backends; assert 'rope_backends.integrations' not in sys.modules\n"
    for src in (code, plain):
        done = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert done.returncode == 0, done.stderr[-2000:]
