"""rb.rope_config against the installed transformers, on the rope sections of published configs.

Each model below is a real transformers config class built with the rope section of a published
``config.json`` (written inline, no download; the comment names the model and where the values
were read). For every one, rope_backends' float64 inverse frequencies must be within 8 float32
ulp of the model's own rotary embedding (``<Model>RotaryEmbedding``, i.e. transformers'
``ROPE_INIT_FUNCTIONS`` or the model's ``compute_default_rope_parameters``), with the same count
and zeros where transformers has zeros; the attention factor must equal transformers' to 1e-12
relative; and the cached cos/sin must be the correctly rounded float64 values. The remaining
tests pin the strict parsing: every key is read or rejected, conflicts are errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace

import pytest
import torch

# a CI lane (ci/run_lane.sh exports LANE_DEVICE) installs the test extra: there a missing
# transformers is a failure, not a skip
transformers = __import__("transformers") if os.environ.get("LANE_DEVICE") else pytest.importorskip("transformers")

import rope_backends as rb  # noqa: E402
from rope_backends.rope_config import ROPE_TYPES  # noqa: E402
from rope_backends.testing import assert_bitwise_equal  # noqa: E402

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters  # noqa: E402

transformers.logging.set_verbosity_error()  # config validation warns about published configs

# ---- published rope sections ------------------------------------------------------------------
# DeepSeek-V3 config.json (as published with the model and in a DeepSeek-V3 reference port's constants:
# max_position_embeddings 163840, rope_theta 10000, qk_rope_head_dim 64)
DEEPSEEK_V3 = dict(
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
    rope_theta=10000, max_position_embeddings=163840, qk_rope_head_dim=64,
)
# moonshotai/Kimi-K2-Instruct-0905 config.json (a model-inspector report of the repository;
# the DeepseekV3 architecture, qk_rope_head_dim 64, 262144-token context)
KIMI_K2 = dict(
    rope_scaling={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
    rope_theta=50000.0, max_position_embeddings=262144, qk_rope_head_dim=64,
)
# microsoft/Phi-3.5-mini-instruct config.json (copied in an ONNX-export recipe that links it).
# Phi-3-mini-128k-instruct is the same Phi3 architecture and head size; its own factor lists
# were not found in the stored sources, so this Phi-3 long-context config stands in for it.
PHI35_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
PHI35_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
PHI35_MINI = dict(
    hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
    original_max_position_embeddings=4096, rope_theta=10000.0,
    rope_scaling={"long_factor": PHI35_LONG, "short_factor": PHI35_SHORT, "type": "longrope"},
)
# microsoft/Phi-4-mini-instruct config.json (pinned-revision values in a model-boundary test):
# head_dim 128, partial_rotary_factor 0.75 -> 96 rotated dims, 48 factors each
PHI4_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23,
    32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]
PHI4_MINI = dict(
    hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, partial_rotary_factor=0.75,
    max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
    rope_scaling={"long_factor": PHI4_LONG, "short_factor": [1.0] * 48, "type": "longrope"},
)
# meta-llama/Meta-Llama-3.1-8B-Instruct config.json (a printed LlamaConfig of the checkpoint)
LLAMA31_8B = dict(
    hidden_size=4096, num_attention_heads=32, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
# meta-llama/Llama-3.2-1B config.json (head_dim 64, factor 32)
LLAMA32_1B = dict(
    hidden_size=2048, num_attention_heads=32, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
)
# Qwen/Qwen2.5-7B-Instruct: config.json has no rope_scaling; its model card's "processing long
# texts" section adds this YaRN section (quoted in verl's RoPE-scaling docs)
QWEN25_YARN = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
QWEN25_7B = dict(hidden_size=3584, num_attention_heads=28, max_position_embeddings=32768, rope_theta=1000000.0)
# Qwen/Qwen3-8B config.json (hidden 4096, 32 heads, head_dim 128, rope_theta 1e6, 40960 positions)
QWEN3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rope_theta=1000000.0)
# openai/gpt-oss-20b config.json (a transformers-fixture entry named gpt-oss-yarn32)
GPT_OSS_20B = dict(
    head_dim=64, rope_theta=150000.0, max_position_embeddings=131072,
    rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                  "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
)
# google/gemma-3-4b-it text config (a config-parsing test of the checkpoint): global layers
# rope_theta 1e6 with linear x8, sliding layers rope_local_base_freq 1e4
GEMMA3_4B = dict(
    head_dim=256, hidden_size=2560, num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
    rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"factor": 8.0, "rope_type": "linear"},
    max_position_embeddings=32768,
)
# google/gemma-4 text config (transformers 5.9 fixture): full attention proportional rope over
# global_head_dim 512 with partial_rotary_factor 0.25, sliding attention default over 256
GEMMA4 = dict(
    head_dim=256, global_head_dim=512, rope_parameters={
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
)
# mistralai/Mistral-Nemo (NeMo's MistralNeMoConfig12B: hidden 5120, kv_channels 128, 32 heads,
# rotary_base 1e6, max_position_embeddings 1024000): head_dim != hidden_size // heads
MISTRAL_NEMO = dict(hidden_size=5120, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    rope_theta=1000000.0, max_position_embeddings=1024000)
# Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen3-VL text configs (MRoPE; sections as in docs/multimodal.md)
QWEN2_VL_TEXT = dict(hidden_size=3584, num_attention_heads=28, rope_theta=1000000.0,
                     rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
QWEN3_VL_TEXT = dict(head_dim=128, hidden_size=4096, num_attention_heads=32, rope_theta=5000000.0,
                     rope_scaling={"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"})
# synthetic (no published model of the installed transformers uses it): dynamic NTK on Llama
DYNAMIC = dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
               rope_scaling={"rope_type": "dynamic", "factor": 2.0})


def _mod(name):
    import importlib

    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


# name -> (config class, kwargs, rotary class (module, name), layer types, seq_lens to probe)
MODELS = {
    "deepseek_v3": ("DeepseekV3Config", DEEPSEEK_V3, ("deepseek_v3", "DeepseekV3RotaryEmbedding"), [None], []),
    "kimi_k2": ("DeepseekV3Config", KIMI_K2, ("deepseek_v3", "DeepseekV3RotaryEmbedding"), [None], []),
    "phi3_5_mini_longrope": ("Phi3Config", PHI35_MINI, ("phi3", "Phi3RotaryEmbedding"), [None], [4096, 4097, 70000]),
    "phi4_mini_longrope": ("Phi3Config", PHI4_MINI, ("phi3", "Phi3RotaryEmbedding"), [None], [100, 4097]),
    "llama3_1_8b": ("LlamaConfig", LLAMA31_8B, ("llama", "LlamaRotaryEmbedding"), [None], []),
    "llama3_2_1b": ("LlamaConfig", LLAMA32_1B, ("llama", "LlamaRotaryEmbedding"), [None], []),
    "qwen2_5_7b_yarn": ("Qwen2Config", dict(QWEN25_7B, rope_scaling=QWEN25_YARN), ("qwen2", "Qwen2RotaryEmbedding"),
                        [None], []),
    "qwen3_8b": ("Qwen3Config", QWEN3_8B, ("qwen3", "Qwen3RotaryEmbedding"), [None], []),
    "gpt_oss_20b": ("GptOssConfig", GPT_OSS_20B, ("gpt_oss", "GptOssRotaryEmbedding"), [None], []),
    "gemma3_4b": ("Gemma3TextConfig", GEMMA3_4B, ("gemma3", "Gemma3RotaryEmbedding"),
                  ["full_attention", "sliding_attention"], []),
    "gemma4_proportional": ("Gemma4TextConfig", GEMMA4, ("gemma4", "Gemma4TextRotaryEmbedding"),
                            ["full_attention", "sliding_attention"], []),
    "mistral_nemo": ("MistralConfig", MISTRAL_NEMO, ("mistral", "MistralRotaryEmbedding"), [None], []),
    "qwen2_vl_text": ("Qwen2VLTextConfig", QWEN2_VL_TEXT, ("qwen2_vl", "Qwen2VLRotaryEmbedding"), [None], []),
    "qwen3_vl_text": ("Qwen3VLTextConfig", QWEN3_VL_TEXT, ("qwen3_vl", "Qwen3VLTextRotaryEmbedding"), [None], []),
    "llama_dynamic": ("LlamaConfig", DYNAMIC, ("llama", "LlamaRotaryEmbedding"), [None], [100, 4096, 4097, 20000]),
}
CASES = [(m, lt) for m, spec in MODELS.items() for lt in spec[3]]


def build(model: str):
    cls_name, kwargs, (module, rotary), _, _ = MODELS[model]
    import copy

    config = getattr(transformers, cls_name)(**copy.deepcopy(kwargs))
    return config, getattr(_mod(module), rotary)(config)


def hf_state(emb, layer_type):
    if layer_type is None:
        return emb.inv_freq, emb.attention_scaling
    return getattr(emb, f"{layer_type}_inv_freq"), getattr(emb, f"{layer_type}_attention_scaling")


def assert_close_freqs(ours: torch.Tensor, theirs: torch.Tensor, max_ulp: int = 8) -> int:
    """Same count, zeros exactly where transformers has zeros, every other value within
    ``max_ulp`` float32 ulp of transformers' float32 value (both positive: the int32 view
    difference counts ulps)."""
    assert ours.dtype == torch.float64 and theirs.dtype == torch.float32
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    ours32 = ours.float()
    assert torch.equal(ours32 == 0, theirs == 0)
    assert bool((theirs >= 0).all()) and bool((ours32 >= 0).all())
    ulp = int((ours32.view(torch.int32).long() - theirs.view(torch.int32).long()).abs().max()) if theirs.numel() else 0
    assert ulp <= max_ulp, f"{ulp} float32 ulp from transformers"
    return ulp


@pytest.mark.parametrize("model,layer_type", CASES, ids=[f"{m}-{lt}" if lt else m for m, lt in CASES])
def test_matches_model_rotary_embedding(model, layer_type):
    config, emb = build(model)
    cfg = rb.rope_config(config, layer_type=layer_type)
    inv, attention = hf_state(emb, layer_type)
    assert_close_freqs(cfg.inv_freq(), inv)
    assert math.isclose(cfg.attention_factor(), attention, rel_tol=1e-12)
    assert cfg.rotary_dim == 2 * inv.numel()
    for seq_len in MODELS[model][4]:  # transformers' dynamic_rope_update recomputes in forward
        config, emb = build(model)
        kwargs = {"layer_type": layer_type} if layer_type else {}
        emb(torch.zeros(1), torch.arange(seq_len)[None], **kwargs)
        inv, attention = hf_state(emb, layer_type)
        assert_close_freqs(cfg.inv_freq(seq_len), inv)
        assert math.isclose(cfg.attention_factor(seq_len), attention, rel_tol=1e-12)


@pytest.mark.parametrize("model,layer_type", CASES, ids=[f"{m}-{lt}" if lt else m for m, lt in CASES])
def test_matches_rope_init_functions(model, layer_type):
    """transformers' functions called directly on the config: the ROPE_INIT_FUNCTIONS entry of
    every non-default type, the model's compute_default_rope_parameters for ``default``."""
    config, emb = build(model)
    cfg = rb.rope_config(config, layer_type=layer_type)
    sub = config.per_layer_config[layer_type] if model.startswith("gemma4") else config
    kwargs = {"layer_type": layer_type} if layer_type else {}
    for seq_len in [None] + MODELS[model][4]:
        if cfg.rope_type == "default":  # signatures differ by model: config plus keywords
            inv, attention = type(emb).compute_default_rope_parameters(sub, **kwargs)
        else:
            inv, attention = ROPE_INIT_FUNCTIONS[cfg.rope_type](sub, None, seq_len=seq_len, **kwargs)
        assert_close_freqs(cfg.inv_freq(seq_len), inv)
        assert math.isclose(cfg.attention_factor(seq_len), attention, rel_tol=1e-12)


@pytest.mark.parametrize("model,layer_type", CASES, ids=[f"{m}-{lt}" if lt else m for m, lt in CASES])
def test_tables_are_correctly_rounded_float64(model, layer_type):
    config, _ = build(model)
    cfg = rb.rope_config(config, layer_type=layer_type)
    n = 5000
    freqs, attention = cfg.inv_freq(n), cfg.attention_factor(n)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * freqs
    want = torch.cat(((angles.cos() * attention).float(), (angles.sin() * attention).float()), -1)
    cache = cfg.cos_sin_cache(n)
    assert cache.shape == (n, cfg.rotary_dim) and cache.dtype == torch.float32
    assert_bitwise_equal(cache, want)
    cos, sin = cfg.cos_sin(torch.arange(n))  # the same rows, half form
    assert_bitwise_equal(torch.cat((cos, sin), -1), want)


def test_deepseek_attention_factor_is_mscale_ratio():
    """DeepSeek-V3 / Kimi-K2 yarn: transformers' attention factor is mscale(f, mscale) /
    mscale(f, mscale_all_dim) = 1.0; the factor-only rule 0.1 ln(40) + 1 = 1.369 would scale
    every attention logit by 1.87."""
    scaling = DEEPSEEK_V3["rope_scaling"]
    cos, sin = rb.cos_sin(torch.tensor([0, 1]), 64, 10000.0, scaling)
    assert float(cos[0, 0]) == 1.0 and float(sin[0, 0]) == 0.0
    assert rb.rope_config(scaling=scaling, rotary_dim=64).attention_factor() == 1.0
    no_pair = {k: v for k, v in scaling.items() if k not in ("mscale", "mscale_all_dim")}
    assert rb.rope_config(scaling=no_pair, rotary_dim=64).attention_factor() == 0.1 * math.log(40) + 1.0
    v2 = dict(scaling, mscale=0.707, mscale_all_dim=0.707)  # DeepSeek-V2 style equal pair
    assert rb.rope_config(scaling=v2, rotary_dim=64).attention_factor() == 1.0


def test_installed_transformers_types_and_keys_are_all_handled():
    """A rope type or key added by a newer transformers makes this fail, instead of being missed."""
    assert set(ROPE_INIT_FUNCTIONS) | {"default"} <= set(ROPE_TYPES)
    handled = {
        "attention_factor", "beta_fast", "beta_slow", "factor", "high_freq_factor", "long_factor", "low_freq_factor",
        "mrope_section", "mscale", "mscale_all_dim", "original_max_position_embeddings", "partial_rotary_factor",
        "rope_theta", "rope_type", "short_factor", "truncate",
    }
    assert set(RopeParameters.__annotations__) <= handled


# ---- longrope: short/long choice and cache layouts --------------------------------------------
def test_longrope_choice_and_cache_modes():
    config, emb = build("phi3_5_mini_longrope")
    cfg = rb.rope_config(config)
    short, long = cfg.inv_freq(None), cfg.inv_freq(4097)
    assert torch.equal(cfg.inv_freq(4096), short) and not torch.equal(short, long)
    att = cfg.attention_factor()
    assert att == math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    by_len = cfg.cos_sin_cache(4096)
    assert_bitwise_equal(by_len, cfg.cos_sin_cache(4096, longrope="short"))
    assert_bitwise_equal(cfg.cos_sin_cache(4097), cfg.cos_sin_cache(4097, longrope="long"))
    stacked = cfg.cos_sin_cache(8192, longrope="stacked")  # vLLM's long_short_cos_sin_cache
    assert stacked.shape == (4096 + 8192, 96)
    assert_bitwise_equal(stacked[:4096], cfg.cos_sin_cache(4096, longrope="short"))
    assert_bitwise_equal(stacked[4096:], cfg.cos_sin_cache(8192, longrope="long"))
    # cos_sin follows transformers: one factor set for the whole call, chosen by max(positions) + 1
    pos = torch.tensor([0, 5, 4095])
    assert_bitwise_equal(cfg.cos_sin(pos)[0], cfg.cos_sin_cache(4096, longrope="short")[pos, :48])
    pos = torch.tensor([0, 5, 4096])
    assert_bitwise_equal(cfg.cos_sin(pos)[0], cfg.cos_sin_cache(4097, longrope="long")[pos, :48])
    assert_bitwise_equal(cfg.cos_sin(pos, longrope="short")[0], cfg.cos_sin_cache(4097, longrope="short")[pos, :48])
    # and the model's forward switches its buffer the same way
    emb(torch.zeros(1), pos[None])
    assert_close_freqs(cfg.inv_freq(4097), emb.inv_freq)
    with pytest.raises(ValueError, match="^longrope: expected one of"):
        cfg.cos_sin(pos, longrope="stacked")
    with pytest.raises(ValueError, match="^longrope: only used by rope_type 'longrope'"):
        rb.rope_config(rotary_dim=8).cos_sin_cache(16, longrope="long")


# ---- parsing: sources ---------------------------------------------------------------------------
def test_plain_dict_config_object_and_4x_object_agree():
    config, _ = build("llama3_1_8b")
    from_object = rb.rope_config(config)
    from_dict = rb.rope_config(LLAMA31_8B["rope_scaling"], head_dim=128, base=500000.0, max_position_embeddings=131072)
    from_scaling = rb.rope_config(scaling=LLAMA31_8B["rope_scaling"], rotary_dim=128, base=500000.0)
    legacy = SimpleNamespace(  # a transformers 4.x config: rope_scaling + rope_theta attributes
        hidden_size=4096, num_attention_heads=32, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=dict(LLAMA31_8B["rope_scaling"]),
    )
    from_legacy = rb.rope_config(legacy)
    gemma3_4x = SimpleNamespace(  # transformers 4.x Gemma-3: sliding layers read rope_local_base_freq
        head_dim=256, rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=32768,
        rope_scaling={"factor": 8.0, "rope_type": "linear"}, layer_types=["sliding_attention", "full_attention"],
    )
    five = build("gemma3_4b")[0]
    for lt in ("full_attention", "sliding_attention"):
        assert rb.rope_config(gemma3_4x, layer_type=lt) == rb.rope_config(five, layer_type=lt)
    with pytest.raises(ValueError, match="^layer_type: expected 'full_attention' or 'sliding_attention'"):
        rb.rope_config(gemma3_4x)
    for other in (from_dict, from_scaling, from_legacy):
        assert torch.equal(other.inv_freq(), from_object.inv_freq())
        assert other.rotary_dim == 128 and other.base == 500000.0 and other.rope_type == "llama3"
    assert from_object == from_dict == from_legacy
    assert hash(from_object) == hash(from_dict)
    with pytest.raises(Exception):  # frozen
        from_object.base = 1.0


def test_scaling_added_to_a_config_without_one():
    plain = transformers.Qwen2Config(**QWEN25_7B)
    added = rb.rope_config(plain, scaling=QWEN25_YARN)
    shipped = rb.rope_config(build("qwen2_5_7b_yarn")[0])
    assert added == shipped and added.rope_type == "yarn" and added.base == 1e6
    with pytest.raises(ValueError, match=r"^scaling: expected None \(config.rope_parameters already has rope_type 'llama3'\)"):
        rb.rope_config(build("llama3_1_8b")[0], scaling=QWEN25_YARN)
    with pytest.raises(ValueError, match=r"^scaling\['rope_theta'\]: expected 1000000.0"):
        rb.rope_config(plain, scaling=dict(QWEN25_YARN, rope_theta=1e4))
    with pytest.raises(ValueError, match="^scaling: expected None when config is a dict"):
        rb.rope_config({"rope_type": "default"}, scaling=QWEN25_YARN)


def test_partial_rotary_and_head_dim_derivation():
    config, _ = build("phi4_mini_longrope")
    cfg = rb.rope_config(config)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.partial_rotary_factor) == (128, 96, 0.75)  # 3072 // 24, int(128 * .75)
    nemo = rb.rope_config(build("mistral_nemo")[0])
    assert (nemo.head_dim, nemo.rotary_dim) == (128, 128)  # head_dim wins over 5120 // 32
    dsv3 = rb.rope_config(build("deepseek_v3")[0])
    assert (dsv3.head_dim, dsv3.rotary_dim) == (64, 64)  # qk_rope_head_dim
    assert rb.rope_config({"rope_type": "default", "partial_rotary_factor": 0.5}, head_dim=80).rotary_dim == 40
    with pytest.raises(ValueError, match=r"partial_rotary_factor'\]: expected head_dim \* partial_rotary_factor to be even"):
        rb.rope_config({"rope_type": "default", "partial_rotary_factor": 0.3}, head_dim=50)
    g4 = rb.rope_config(build("gemma4_proportional")[0], layer_type="full_attention")
    assert (g4.head_dim, g4.rotary_dim, g4.rope_type) == (512, 512, "proportional")
    freqs = g4.inv_freq()
    assert int((freqs > 0).sum()) == 64 and int((freqs == 0).sum()) == 192  # 0.25 * 512 / 2 rotated pairs


def test_layer_types():
    config, _ = build("gemma3_4b")
    full, sliding = (rb.rope_config(config, layer_type=t) for t in ("full_attention", "sliding_attention"))
    assert (full.rope_type, full.base, full.params["factor"]) == ("linear", 1e6, 8.0)
    assert (sliding.rope_type, sliding.base, sliding.layer_type) == ("default", 1e4, "sliding_attention")
    with pytest.raises(ValueError, match=r"^layer_type: expected one of \['sliding_attention', 'full_attention'\]"):
        rb.rope_config(config)
    with pytest.raises(ValueError, match="^layer_type: expected one of"):
        rb.rope_config(config, layer_type="linear_attention")
    nested = {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": None}
    assert rb.rope_config(nested, layer_type="full_attention", head_dim=64).base == 1e6
    with pytest.raises(ValueError, match="is None"):
        rb.rope_config(nested, layer_type="sliding_attention", head_dim=64)
    flat = transformers.Qwen3Config(**QWEN3_8B, num_hidden_layers=36, layer_types=["full_attention"] * 36)
    per_layer = rb.rope_config(flat, layer_type="full_attention")  # one dict for all layers
    assert dataclasses.replace(per_layer, layer_type=None) == rb.rope_config(flat)
    with pytest.raises(ValueError, match="^layer_type: expected None"):
        rb.rope_config({"rope_type": "default"}, layer_type="full_attention", head_dim=64)


def test_mrope_sections():
    q2 = rb.rope_config(build("qwen2_vl_text")[0])
    assert (q2.rope_type, q2.mrope_section, q2.mrope_interleaved) == ("default", (16, 24, 24), False)
    assert q2.mrope() == rb.mrope.chunked([16, 24, 24])
    q3 = rb.rope_config(build("qwen3_vl_text")[0])
    assert (q3.mrope_section, q3.mrope_interleaved, q3.base) == ((24, 20, 20), True, 5e6)
    assert q3.mrope() == rb.mrope.interleaved([24, 20, 20])
    top = transformers.Qwen3VLConfig(text_config=dict(QWEN3_VL_TEXT))  # read through get_text_config()
    assert rb.rope_config(top) == q3
    with pytest.raises(ValueError, match="^mrope_section: expected"):
        rb.rope_config(rotary_dim=8).mrope()
    with pytest.raises(ValueError, match=r"mrope_section'\]: expected sections summing to rotary_dim // 2 = 64"):
        rb.rope_config({"rope_type": "default", "mrope_section": [16, 24, 16]}, head_dim=128)


# ---- parsing: errors ----------------------------------------------------------------------------
MINISTRAL3 = {  # mistralai Ministral-3 style rope_parameters: a query-scaling key rb does not apply
    "type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16384,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1,
}


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(config=MINISTRAL3, head_dim=128), ValueError, r"^config: expected only keys .* got \['llama_4_scaling_beta'\]"),
    (dict(scaling={"rope_type": "axial"}, rotary_dim=8), ValueError, r"^scaling\['rope_type'\]: expected one of .*'axial' is the 2-D"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0}, rotary_dim=8), ValueError,
     r"^scaling\['original_max_position_embeddings'\]: expected a positive int"),
    (dict(scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, rotary_dim=8),
     ValueError, r"^scaling: expected keys \['high_freq_factor', 'low_freq_factor'\]"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707},
          rotary_dim=8), ValueError, r"^scaling: expected both 'mscale' and 'mscale_all_dim'"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                   "mscale_all_dim": 0.5, "attention_factor": 1.0}, rotary_dim=8), ValueError,
     r"^scaling\['attention_factor'\]: expected 1.0"),
    (dict(scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": 0},
          rotary_dim=8), ValueError, r"^scaling\['truncate'\]: expected a bool"),
    (dict(scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4,
                   "original_max_position_embeddings": 64, "factor": 2.0}, rotary_dim=8), ValueError,
     r"^scaling\['short_factor'\]: expected 4 numbers"),
    (dict(scaling={"rope_type": "linear", "factor": -2.0}, rotary_dim=8), ValueError, r"^scaling\['factor'\]: expected a positive"),
    (dict(scaling={"rope_type": "linear", "factor": True}, rotary_dim=8), ValueError, r"^scaling\['factor'\]"),
    (dict(scaling={"rope_type": "linear", "type": "dynamic", "factor": 2.0}, rotary_dim=8), ValueError,
     r"^scaling\['type'\]: expected 'linear'"),
    (dict(scaling={"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}, rotary_dim=8,
          max_position_embeddings=128), ValueError, r"^scaling\['original_max_position_embeddings'\]: expected 128"),
    (dict(config=transformers.LlamaConfig(**LLAMA31_8B), head_dim=64), ValueError, r"^head_dim: expected 128"),
    (dict(config=transformers.LlamaConfig(**LLAMA31_8B), rotary_dim=64), ValueError, r"^rotary_dim: expected 128"),
    (dict(config=transformers.LlamaConfig(**LLAMA31_8B), base=10000.0), ValueError,
     r"^base: expected 500000.0 \(config.rope_parameters\['rope_theta'\]\)"),
    (dict(config=transformers.LlamaConfig(**LLAMA31_8B), max_position_embeddings=8192), ValueError,
     r"^max_position_embeddings: expected 131072"),
    (dict(), ValueError, r"^rotary_dim: expected an even int >= 2 \(or head_dim"),
    (dict(rotary_dim=7), ValueError, r"^rotary_dim: expected an even int"),
    (dict(rotary_dim=8, base=-1.0), ValueError, r"^base: expected a positive number"),
    (dict(rotary_dim=8, scaling="yarn"), TypeError, r"^scaling: expected None, a float"),
    (dict(config="Qwen/Qwen3-8B", rotary_dim=8), TypeError, r"^config: expected a transformers config object"),
    (dict(config={"rope_type": "default", "rope_theta": "1e4"}, rotary_dim=8), ValueError, r"^config\['rope_theta'\]"),
    (dict(config={"rope_type": "default", "partial_rotary_factor": 1.5}, rotary_dim=8), ValueError,
     r"^config\['partial_rotary_factor'\]: expected a number in \(0, 1\]"),
    (dict(scaling={"rope_type": "ntk", "factor": 2.0}, rotary_dim=2), ValueError, r"^rotary_dim: expected >= 4"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("^") else "")
def test_errors_name_the_key(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        rb.rope_config(**kwargs)


def test_method_argument_errors():
    cfg = rb.rope_config(rotary_dim=8)
    with pytest.raises(ValueError, match="^seq_len: expected a positive int or None"):
        cfg.inv_freq(0)
    with pytest.raises(ValueError, match="^max_position: expected a positive int"):
        cfg.cos_sin_cache()  # no max_position_embeddings known
    with pytest.raises(TypeError, match="^positions: expected a torch.Tensor"):
        cfg.cos_sin([0, 1])
    with pytest.raises(TypeError, match="^dtype: expected a floating dtype"):
        cfg.cos_sin_cache(4, dtype=torch.int32)
