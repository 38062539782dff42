"""``rope_backends.integrations.diffusers.patch`` on the installed diffusers' real model code.

Every supported family's transformer is built from its real class, tiny (one or two blocks, two
heads) and randomly initialised, nothing downloaded. What is proven, per family:

- float32 forward outputs and every parameter gradient are bit-equal with and without the patch,
  and the patch is used: a counting backend sees one rotation per patched call site and tensor
  (Mochi's learned frequencies need their gradient in training, so its training rotations stay
  diffusers' own: counted under ``no_grad`` only); after ``undo`` it sees none;
- bf16 as diffusers loads a model (its ``_keep_in_fp32_modules`` in float32): bit-equal output with
  and without the patch wherever the tables reaching the rotation are float32 (diffusers then
  computes in float32 and rounds once, as rope_backends does); and every rotation, given the
  model's own inputs, is either bit-equal to diffusers' or at least as close to the float64
  rotation in max and mean absolute error (tables cast to bf16: ChronoEdit, or ``model.to(bf16)``);
- every form's gradient reaches its input with the library's own strides and bits, for an
  upstream gradient of reversed layout;
- patching twice and undo in any order restore the processors and diffusers' modules exactly;
  unsupported models are refused unchanged; ``torch.compile(fullgraph=True)`` (aot_eager) of a
  patched Wan is bit-equal to eager.
"""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import rope_backends as rb  # noqa: E402
from rope_backends import reference  # noqa: E402
from rope_backends.integrations import _forms, _patching, _rewrite  # noqa: E402
from rope_backends.integrations import diffusers as rbd  # noqa: E402
from rope_backends.registry import Backend  # noqa: E402
from rope_backends.testing import assert_bitwise_equal  # noqa: E402
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")  # Mochi's own autocast(float32) on CPU


def _cls(name: str):
    """A model class of the installed diffusers; a family that version does not have is not tested
    there (availability, like a backend's)."""
    found = getattr(diffusers, name, None) if hasattr(diffusers, name) else None
    if found is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return found


def _r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _wan_like(cls, **extra):
    model = cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, **extra)
    return model, dict(hidden_states=_r(2, 4, 2, 4, 4), timestep=torch.tensor([3, 700]),
                       encoder_hidden_states=_r(2, 6, 16, seed=1))


def _wan_vace():
    model, inp = _wan_like(_cls("WanVACETransformer3DModel"), vace_layers=[0], vace_in_channels=4)
    inp["control_hidden_states"] = _r(2, 4, 2, 4, 4, seed=2)
    return model, inp


def _helios():
    model = _cls("HeliosTransformer3DModel")(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, rope_dim=(4, 4, 4))
    return model, dict(hidden_states=_r(2, 4, 2, 4, 4), timestep=torch.tensor([3, 700]),
                       encoder_hidden_states=_r(2, 6, 16, seed=1))


def _flux():
    model = _cls("FluxTransformer2DModel")(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return model, dict(hidden_states=_r(2, 16, 4), encoder_hidden_states=_r(2, 5, 32, seed=1),
                       pooled_projections=_r(2, 32, seed=2), timestep=torch.tensor([0.3, 0.7]),
                       img_ids=torch.stack(grid, -1).reshape(-1, 3), txt_ids=torch.zeros(5, 3))


def _hunyuan_video():
    model = _cls("HunyuanVideoTransformer3DModel")(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4))
    return model, dict(hidden_states=_r(2, 4, 2, 4, 4), timestep=torch.tensor([3, 700]),
                       encoder_hidden_states=_r(2, 5, 16, seed=1), encoder_attention_mask=torch.ones(2, 5),
                       pooled_projections=_r(2, 8, seed=2), guidance=torch.tensor([3000.0, 3000.0]))


def _cogvideox():
    model = _cls("CogVideoXTransformer3DModel")(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=5, use_rotary_positional_embeddings=True)
    # what CogVideoXPipeline._prepare_rotary_positional_embeddings passes: float32 (cos, sin) [T*H*W, D]
    tables = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=3)
    return model, dict(hidden_states=_r(2, 3, 4, 8, 8), encoder_hidden_states=_r(2, 5, 16, seed=1),
                       timestep=torch.tensor([3, 700]), image_rotary_emb=tuple(tables))


def _ltx():
    model = _cls("LTXVideoTransformer3DModel")(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, caption_channels=16)
    return model, dict(hidden_states=_r(2, 2 * 4 * 4, 8), encoder_hidden_states=_r(2, 5, 16, seed=1),
                       timestep=torch.tensor([3, 700]), encoder_attention_mask=torch.ones(2, 5), num_frames=2,
                       height=4, width=4)


def _mochi():
    model = _cls("MochiTransformer3DModel")(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4)
    return model, dict(hidden_states=_r(2, 4, 2, 4, 4), encoder_hidden_states=_r(2, 5, 16, seed=1),
                       timestep=torch.tensor([3, 700]), encoder_attention_mask=torch.ones(2, 5))


# case -> (family, factory, patched attention modules, rotations per forward, the tables reaching the
# rotations are float32 when the model is loaded as diffusers (0.42) loads it in bf16)
MODELS = {
    "wan": ("wan", lambda: _wan_like(_cls("WanTransformer3DModel")), 4, 4, True),
    "wan_vace": ("wan", _wan_vace, 6, 6, True),
    "skyreels_v2": ("skyreels_v2", lambda: _wan_like(_cls("SkyReelsV2Transformer3DModel")), 4, 4, True),
    "chronoedit": ("chronoedit", lambda: _wan_like(_cls("ChronoEditTransformer3DModel")), 4, 4, False),
    "helios": ("helios", _helios, 4, 4, True),
    "flux": ("flux", _flux, 2, 4, True),
    "hunyuan_video": ("hunyuan_video", _hunyuan_video, 2, 4, True),
    "cogvideox": ("cogvideox", _cogvideox, 2, 4, True),
    "ltx": ("ltx", _ltx, 4, 4, True),
    "mochi": ("mochi", _mochi, 2, 4, True),
}


def build(case: str):
    torch.manual_seed(0)
    return MODELS[case][1]()


def as_loaded(model, inp, dtype):
    """``model`` in ``dtype`` the way ``from_pretrained(torch_dtype=dtype)`` leaves it: the classes'
    ``_keep_in_fp32_modules`` stay float32. Float inputs other than tables and timesteps follow."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep & set(name.split(".")):
            t.data = t.data.to(dtype)
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep" else v
            for k, v in inp.items()}


def test_every_supported_family_is_tested():
    assert sorted({m[0] for m in MODELS.values()}) == sorted(rbd.SUPPORTED) == sorted(rbd.supported_families())


class Counting:
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


def _step(model, inp):
    model.zero_grad(set_to_none=True)
    out = model(**inp, return_dict=False)[0]
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(got, want):
    assert_bitwise_equal(got[0], want[0], name="output")
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert_bitwise_equal(got[1][name], want[1][name], name=f"grad {name}")


@pytest.mark.parametrize("case", sorted(MODELS))
def test_fp32_forward_and_gradients_bit_equal(case, counting):
    family, _, modules, calls, _ = MODELS[case]
    model, inp = build(case)
    model.train()
    want = _step(model, inp)
    with rb.use_backend("counting"):
        with rbd.patch(model) as handle:
            assert handle.families == (family,) and len(handle.modules) == modules
            got = _step(model, inp)
            learned = family == "mochi"  # learned frequencies: training keeps diffusers' rotation
            assert counting.calls == ({} if learned else {"forward": calls, "backward": calls})
            with torch.no_grad():
                model(**inp)
            assert counting.calls["forward"] == calls * (1 if learned else 2)
        before = Counter(counting.calls)
        after = _step(model, inp)
    assert counting.calls == before
    _assert_same_step(got, want)
    _assert_same_step(after, want)


def _fp32_step_on(case: str, backend: str) -> None:
    model, inp = build(case)
    model.train()
    want = _step(model, inp)
    with rb.use_backend(backend), rbd.patch(model):
        got = _step(model, inp)
    _assert_same_step(got, want)


@pytest.mark.parametrize("case", sorted(MODELS))
def test_fp32_bit_equal_on_the_npu_backend(case):
    _fp32_step_on(case, "npu")


def test_fp32_bit_equal_on_the_triton_interpreter():
    pytest.importorskip("triton")
    import os
    import subprocess

    tests = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, %r); import test_integrations_diffusers as t\n"
            "for c in ('wan', 'helios', 'flux', 'ltx'):\n    t._fp32_step_on(c, 'triton')\nprint('ok')\n" % tests)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1"), cwd=os.path.dirname(tests))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _tables_reaching_rotations(model, inp, monkeypatch) -> set:
    """The dtypes of the tables every rotation of one forward receives (a recording pass)."""
    calls = _record(monkeypatch)
    with torch.no_grad(), rbd.patch(model):
        model(**inp, return_dict=False)
    monkeypatch.undo()
    dtypes = set()
    for _, _, args, _, _ in calls:
        for a in args[1:]:
            dtypes |= {t.dtype for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)}
    return dtypes


@pytest.mark.parametrize("case", sorted(MODELS))
def test_bf16_as_loaded_bit_equal_where_tables_are_float32(case, monkeypatch):
    """Where diffusers hands the rotation float32 tables it computes in float32 and rounds once, as
    rope_backends does: the bf16 output is the same bits (tables kept as buffers are float32 where the
    model lists its rope in _keep_in_fp32_modules; ChronoEdit does not, so its tables are bf16 and
    its rotations are compared one by one in the test below)."""
    model, inp = build(case)
    inp = as_loaded(model, inp, torch.bfloat16)
    fp32_tables = _tables_reaching_rotations(model, inp, monkeypatch) == {torch.float32}
    assert fp32_tables == MODELS[case][4], (case, fp32_tables)
    with torch.no_grad():
        want = model(**inp, return_dict=False)[0]
        with rbd.patch(model):
            got = model(**inp, return_dict=False)[0]
    if fp32_tables:
        assert_bitwise_equal(got, want, name=f"{case} bf16 output")


def _record(monkeypatch):
    """Swap every form for one that records the native call and returns diffusers' own result."""
    calls = []
    monkeypatch.setattr(rbd, "_REPLACEMENTS", {})
    monkeypatch.setattr(rbd, "_PROCESSOR_CLASSES", {})
    for key, form in list(rbd._FORMS.items()):
        def make(original, _form=form, **_):
            def recording(*args, **kwargs):
                kept = _clone(args)  # before the processor writes the result into its input (CogVideoX)
                out = original(*args, **kwargs)
                calls.append((original, _form, kept, kwargs, out.clone()))
                return out
            return recording

        monkeypatch.setitem(rbd._FORMS, key, _forms.Form(f"recording_{form.name}", form.params, make, form.probe))
    return calls


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else _clone(a) if isinstance(a, tuple) else a for a in args)


def _errors(got, exact):
    diff = (got.double() - exact.double()).abs()
    return diff.max().item(), diff.mean().item()


@pytest.mark.parametrize("loading", ["as_loaded", "all_bf16"])
@pytest.mark.parametrize("case", sorted(MODELS))
def test_bf16_rotations_equal_or_closer_to_float64(case, loading, monkeypatch):
    model, inp = build(case)
    if loading == "as_loaded":
        inp = as_loaded(model, inp, torch.bfloat16)
    else:  # every buffer in bf16, tables included (what model.to(torch.bfloat16) gives)
        model.to(torch.bfloat16)
        inp = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep"
               else v for k, v in inp.items()}
    calls = _record(monkeypatch)
    with torch.no_grad(), rbd.patch(model):
        model(**inp)
    assert calls
    monkeypatch.undo()
    for original, form, args, kwargs, theirs in calls:
        ours = form.make(original)(*args, **kwargs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        if torch.equal(ours.view(torch.int16), theirs.view(torch.int16)):
            continue
        exact = original(*(a.double() if isinstance(a, torch.Tensor) else
                           tuple(t.double() for t in a) if isinstance(a, tuple) else a for a in args), **kwargs)
        ours_max, ours_mean = _errors(ours, exact)
        their_max, their_mean = _errors(theirs, exact)
        assert ours_max <= their_max and ours_mean <= their_mean, (form.name, ours_max, their_max, ours_mean, their_mean)


# ------------------------------------------------------------------------------------------------
# each form, in isolation: gradient layout and bits as the library's


def _form_cases():
    import importlib

    def module(name):
        try:
            return importlib.import_module(f"diffusers.models.{name}")
        except ImportError:
            pytest.skip(f"diffusers {diffusers.__version__} has no {name}")

    def nested(cls):
        return [s for s in _rewrite.find_sites(cls.__call__, {"apply_rotary_emb"}) if s.kind == "nested"][0].original

    return {"wan": lambda: (nested(module("transformers.transformer_wan").WanAttnProcessor), rbd._WAN),
            "mochi": lambda: (nested(module("attention_processor").MochiAttnProcessor2_0), rbd._MOCHI),
            "helios": lambda: (module("transformers.transformer_helios").apply_rotary_emb_transposed, rbd._HELIOS),
            "embeddings": lambda: (module("embeddings").apply_rotary_emb, rbd._EMBEDDINGS),
            "ltx": lambda: (module("transformers.transformer_ltx").apply_rotary_emb, rbd._LTX)}


def _grad_of_input(fn, args, kwargs):
    """Output and the gradient reaching args[0] (bits and strides) for a reversed-layout upstream
    gradient."""
    seen = []
    leaf = args[0].detach().requires_grad_()
    x = leaf * 1
    x.register_hook(lambda g: seen.append(g))
    out = fn(x, *args[1:], **kwargs)
    gen = torch.Generator().manual_seed(7)
    upstream = torch.randn(out.shape[::-1], generator=gen).permute(*reversed(range(out.dim())))
    out.backward(upstream)
    return out, seen[0]


@pytest.mark.parametrize("name", ["wan", "mochi", "helios", "embeddings", "ltx"])
def test_form_gradient_layout_matches_library(name):
    original, form = _form_cases()[name]()
    ours = form.make(original)
    for args, kwargs in form.probe():
        want_out, want = _grad_of_input(original, args, kwargs)
        got_out, got = _grad_of_input(ours, args, kwargs)
        assert got_out.stride() == want_out.stride()
        assert got.stride() == want.stride(), (name, got.stride(), want.stride())
        assert_bitwise_equal(got, want, name=f"{name} input gradient")


# ------------------------------------------------------------------------------------------------
# bookkeeping, refusals, compile


def _state(model):
    modules = {n: dict(vars(m)) for n, m in model.named_modules()}
    names = [n for n in sys.modules if n.startswith("diffusers.models")]
    return modules, {n: dict(vars(sys.modules[n])) for n in names}


def _library_names(namespace: dict) -> set:
    """A module's names but the private aliases patches bind and keep (``_rewrite.Aliases``)."""
    return {k for k in namespace if not k.startswith("_rope_backends__")}


def _assert_restored(model, before):
    modules, globals_ = _state(model)
    for name in before[0]:
        assert modules[name].keys() == before[0][name].keys(), name
        for key, value in modules[name].items():
            if not isinstance(value, torch.Tensor):
                assert value is before[0][name][key], (name, key)
    for name in before[1]:
        assert _library_names(globals_[name]) == _library_names(before[1][name]), name


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_patch_twice_then_undo_restores_exactly(order, counting):
    model, inp = build("hunyuan_video")
    model.eval()
    before = _state(model)
    with torch.no_grad():
        want = model(**inp, return_dict=False)[0]
    processors = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    first, second = rbd.patch(model), rbd.patch(model)
    patched = [m for m in model.modules() if hasattr(m, "processor") and type(m.processor).__name__.startswith("RopeBackends")]
    assert patched and all(_patching.patched_value(m, "processor")[1] == 2 for m in patched)
    with torch.no_grad(), rb.use_backend("counting"):
        assert_bitwise_equal(model(**inp, return_dict=False)[0], want)
    assert counting.calls["forward"] == 4
    (second if order == "lifo" else first).undo()
    with torch.no_grad(), rb.use_backend("counting"):
        assert_bitwise_equal(model(**inp, return_dict=False)[0], want)
    assert counting.calls["forward"] == 8
    (first if order == "lifo" else second).undo()
    second.undo()
    _assert_restored(model, before)
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == processors
    assert all(p is processors[n] for n, p in ((n, m.processor) for n, m in model.named_modules()
                                               if hasattr(m, "processor")))


def test_shared_processor_object_stays_shared():
    model, inp = build("wan")
    shared = diffusers.models.transformers.transformer_wan.WanAttnProcessor()
    model.set_attn_processor(shared)
    with rbd.patch(model):
        copies = {id(m.processor) for m in model.modules() if isinstance(m, diffusers.models.transformers.
                                                                         transformer_wan.WanAttention)}
        assert len(copies) == 1
    assert all(m.processor is shared for m in model.modules()
               if isinstance(m, diffusers.models.transformers.transformer_wan.WanAttention))


def test_copy_and_pickle_of_a_patched_model(counting):
    """A deepcopy keeps the patch (untracked by the handle); a pickle stores diffusers' processors."""
    import copy
    import io

    model, inp = build("wan")
    model.eval()
    with torch.no_grad():
        want = model(**inp, return_dict=False)[0]
        with rbd.patch(model):
            copied = copy.deepcopy(model)
            buf = io.BytesIO()
            torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert type(loaded.blocks[0].attn1.processor) is diffusers.models.transformers.transformer_wan.WanAttnProcessor
        with rb.use_backend("counting"):
            assert_bitwise_equal(loaded(**inp, return_dict=False)[0], want)
            assert counting.calls["forward"] == 0
            assert_bitwise_equal(copied(**inp, return_dict=False)[0], want)
            assert counting.calls["forward"] == 4


def test_unsupported_models_are_refused_unchanged():
    lumina = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, cap_feat_dim=16, axes_dim_rope=(4, 6, 6),
        axes_lens=(32, 32, 32))
    before = _state(lumina)
    with pytest.raises(ValueError, match=r"model: expected a diffusers transformer of a supported family: wan .*"
                                         r"got .*Lumina2AttnProcessor"):
        rbd.patch(lumina)
    _assert_restored(lumina, before)
    with pytest.raises(ValueError, match=r"got no rotary position embedding"):
        rbd.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module .* got NoneType"):
        rbd.patch(None)


def test_torch_compile_fullgraph_bit_equal():
    model, inp = build("wan")
    model.eval()
    with torch.no_grad(), rbd.patch(model):
        want = model(**inp, return_dict=False)[0]
        torch._dynamo.reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**inp, return_dict=False)[0]
    torch._dynamo.reset()
    assert_bitwise_equal(got, want)
