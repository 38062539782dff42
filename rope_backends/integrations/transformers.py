"""Route a Hugging Face transformers model's rotary embedding through rope_backends, per instance.

    from rope_backends.integrations.transformers import patch
    with patch(model):                      # or: handle = patch(model); ...; handle.undo()
        model.generate(...)                 # every q/k rotation runs through rb.apply_qk / rb.apply

How: transformers 5.x attention modules call a module global of their ``modeling_*.py``
(``apply_rotary_pos_emb``, ``apply_rotary_pos_emb_vision``, earlier Qwen2-VL's
``apply_multimodal_rotary_pos_emb``; GPT-J's per-tensor ``apply_rotary_pos_emb``). ``patch`` gives
each attention module of *this* model its own copy of
its class's ``forward`` in which that call goes to a rope_backends function of the same signature
and the same results (``_rewrite.py``); the ``modeling_*.py`` module keeps its function, so other
models of the same family -- patched or not -- are unaffected, and ``torch.compile``, gradient
checkpointing, ``generate`` and autograd see an ordinary module. Before the first patch of a
function, its replacement is checked against the installed transformers' own function on small
CPU inputs (float32, bf16 q/k with float32 tables, a partial rotation where the function takes
one), bits and dtypes; a mismatch (a transformers version that changed the formula) refuses the
patch. Gradients reach q/k contiguous, as transformers' own do (see ``_forms.contiguous_grads``).

``tables="rb"`` also replaces the model's rotary-embedding module (which computes cos/sin from
``inv_freq`` and casts them to the activation dtype) with a lookup in ``rb.rope_config(config)
.cos_sin_cache()`` kept in float32 -- the table a server builds -- so the rotated q/k equal those of
a serving-style ``rb.apply_cached`` on the same tokens bit for bit, in bf16 too.

This module imports no transformers code: it recognises the families by the module names of the
functions a model calls. It must not change a transformers module's existing names (it only adds
private ``_rope_backends__*`` aliases), nor any model other than the one passed.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import rope_backends as _rb

from . import _rewrite
from ._forms import RB_DTYPES, Form, angles, contiguous_grads, verify
from ._patching import MISSING, Edit, Patch, apply_edits, unpatched

__all__ = ["patch", "SUPPORTED", "supported_families"]

_PREFIX = "transformers.models."


@dataclass(frozen=True)
class _Family:
    name: str          # modeling module suffix: transformers.models.<name>.modeling_<name>
    title: str         # for docs and errors
    mrope: str | None = None   # "chunked" (Qwen2-VL, Qwen2.5-VL) / "interleaved" (Qwen3-VL)
    tables_form: str = "neox"  # what the rotary module returns: duplicated cos, sin / GPT-J (sin, cos) halves

    @property
    def module(self) -> str:
        return f"{_PREFIX}{self.name}.modeling_{self.name}"


_FAMILY_LIST = (
    _Family("llama", "Llama"),
    _Family("mistral", "Mistral"),
    _Family("mixtral", "Mixtral"),
    _Family("qwen2", "Qwen2"),
    _Family("qwen2_moe", "Qwen2-MoE"),
    _Family("qwen3", "Qwen3"),
    _Family("qwen3_moe", "Qwen3-MoE"),
    _Family("gemma", "Gemma"),
    _Family("gemma2", "Gemma 2"),
    _Family("gemma3", "Gemma 3"),
    _Family("phi3", "Phi-3 (partial rotary)"),
    _Family("granite", "Granite"),
    _Family("starcoder2", "StarCoder2"),
    _Family("smollm3", "SmolLM3"),
    _Family("gptj", "GPT-J (interleaved, partial rotary)", tables_form="gptj"),
    _Family("gpt_neox", "GPT-NeoX (partial rotary)"),
    _Family("qwen2_vl", "Qwen2-VL (MRoPE, chunked)", mrope="chunked"),
    _Family("qwen2_5_vl", "Qwen2.5-VL (MRoPE, chunked)", mrope="chunked"),
    _Family("qwen3_vl", "Qwen3-VL (MRoPE, interleaved)", mrope="interleaved"),
)
_FAMILIES = {f.module: f for f in _FAMILY_LIST}

#: model_type (``transformers.models.<name>``) -> description, for every supported family
SUPPORTED: dict[str, str] = {f.name: f.title for f in _FAMILY_LIST}

_TABLES = ("model", "rb")


def supported_families() -> list[str]:
    """The ``transformers.models.<name>`` names :func:`patch` supports."""
    return list(SUPPORTED)


# ------------------------------------------------------------------------------------------------
# the replacements: same signature and results as transformers' functions, through rope_backends

def _result_dtype(x: Tensor, cos: Tensor, sin: Tensor) -> torch.dtype:
    """The dtype transformers' ``x * cos + rotate(x) * sin`` yields (type promotion)."""
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


def _rotate_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, rotary_dim: int) -> tuple[Tensor, Tensor]:
    if q.dtype == k.dtype:
        q, k = _rb.apply_qk(q, k, cos, sin, layout=layout, rotary_dim=rotary_dim)
    else:
        q = _rb.apply(q, cos, sin, layout=layout, rotary_dim=rotary_dim)
        k = _rb.apply(k, cos, sin, layout=layout, rotary_dim=rotary_dim)
    contiguous_grads(q, k)
    return q, k


def _make_neox_qk(original: Callable, promote: bool) -> Callable:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        """transformers' ``apply_rotary_pos_emb`` through ``rb.apply_qk``: q ``[B, Hq, S, D]``,
        k ``[B, Hk, S, D]`` (``[B, S, H, D]`` with ``unsqueeze_dim=2``), cos/sin ``[B, S, r]``
        duplicated (rotate_half) form; the first r of D rotate, the rest pass through."""
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        if promote:  # transformers' result dtype (autocast: bf16 q with fp32 cos gives fp32)
            q_dtype, k_dtype = _result_dtype(q, cos, sin), _result_dtype(k, cos, sin)
            if q_dtype not in RB_DTYPES or k_dtype not in RB_DTYPES:
                return original(q, k, cos.squeeze(unsqueeze_dim), sin.squeeze(unsqueeze_dim), unsqueeze_dim)
            q, k = q.to(q_dtype), k.to(k_dtype)
        return _rotate_qk(q, k, cos, sin, "neox", cos.shape[-1])

    return apply_rotary_pos_emb


def _merge_sections(t: Tensor, section) -> Tensor:
    """Per-axis duplicated tables ``[3, ..., r]`` -> ``[..., r]``: the column blocks of
    ``section`` (t, h, w widths), laid out twice over the duplicated halves, come from rows 0, 1,
    2 in turn (Qwen2-VL's chunked MRoPE). Pure indexing: no value changes."""
    parts, start = [], 0
    for i, width in enumerate(list(section) * 2):
        parts.append(t[i % 3, ..., start:start + width])
        start += width
    return torch.cat(parts, dim=-1)


def _make_multimodal_qk(original: Callable, promote: bool) -> Callable:
    def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        """transformers' (5.0-5.x) Qwen2-VL / Qwen2.5-VL ``apply_multimodal_rotary_pos_emb``:
        cos/sin ``[3, B, S, r]`` per (t, h, w) row, merged by ``mrope_section``, then the
        ``apply_rotary_pos_emb`` rotation through ``rb.apply_qk``."""
        if 2 * sum(mrope_section) != cos.shape[-1]:
            return original(q, k, cos, sin, mrope_section, unsqueeze_dim)
        merged = (_merge_sections(cos, mrope_section).unsqueeze(unsqueeze_dim),
                  _merge_sections(sin, mrope_section).unsqueeze(unsqueeze_dim))
        if promote:
            q_dtype, k_dtype = _result_dtype(q, *merged), _result_dtype(k, *merged)
            if q_dtype not in RB_DTYPES or k_dtype not in RB_DTYPES:
                return original(q, k, cos, sin, mrope_section, unsqueeze_dim)
            q, k = q.to(q_dtype), k.to(k_dtype)
        return _rotate_qk(q, k, *merged, "neox", merged[0].shape[-1])

    return apply_multimodal_rotary_pos_emb


def _make_vision_qk(original: Callable, promote: bool) -> Callable:
    def apply_rotary_pos_emb_vision(q, k, cos, sin):
        """transformers' ``apply_rotary_pos_emb_vision`` (computes in float32, returns q/k's
        dtypes) through ``rb.apply_qk``, which does the same: q, k ``[S, H, D]``, cos/sin
        ``[S, D]`` duplicated form."""
        if q.dtype not in RB_DTYPES or k.dtype not in RB_DTYPES:
            return original(q, k, cos, sin)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return _rotate_qk(q, k, cos, sin, "neox", cos.shape[-1])

    return apply_rotary_pos_emb_vision


def _make_gptj(original: Callable, promote: bool) -> Callable:
    def apply_rotary_pos_emb(tensor, sin, cos):
        """GPT-J's ``apply_rotary_pos_emb`` (rotate_every_two) through ``rb.apply``: tensor
        ``[B, S, H, r]``, sin/cos ``[B, S, r/2]`` (one value per pair)."""
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        if promote:
            dtype = _result_dtype(tensor, cos, sin)
            if dtype not in RB_DTYPES:
                return original(tensor, sin[:, :, 0, :], cos[:, :, 0, :])
            tensor = tensor.to(dtype)
        out = _rb.apply(tensor, cos, sin, layout="interleaved", rotary_dim=2 * cos.shape[-1])
        contiguous_grads(out)
        return out

    return apply_rotary_pos_emb


def _probe_neox_qk() -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    c, s = angles(2, 5, 4, seed=1)
    cos, sin = torch.cat((c, c), -1), torch.cat((s, s), -1)
    bhsd = (torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g), cos, sin)
    bshd = (torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 5, 1, 8, generator=g), cos, sin)
    # bf16 q/k with float32 tables (autocast): transformers promotes and computes in float32
    mixed = (bhsd[0].bfloat16(), bhsd[1].bfloat16(), cos, sin)
    # a partial rotation (GPT-NeoX, Phi-3): cos/sin narrower than head_dim; functions that rotate
    # the whole head_dim cannot take it, and are then never called so
    pc, ps = angles(2, 5, 2, seed=5)
    partial = (bhsd[0], bhsd[1], torch.cat((pc, pc), -1), torch.cat((ps, ps), -1))
    return [(bhsd, {}), (bshd, {"unsqueeze_dim": 2}), (mixed, {}), (partial, {}, "optional")]


def _probe_multimodal_qk() -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    c, s = angles(3, 2, 5, 4, seed=4)
    cos, sin = torch.cat((c, c), -1), torch.cat((s, s), -1)
    q, k = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 8, generator=g)
    return [((q, k, cos, sin, [1, 1, 2]), {}), ((q.bfloat16(), k.bfloat16(), cos, sin, [2, 1, 1]), {})]


def _probe_vision_qk() -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    c, s = angles(5, 4, seed=2)
    return [((torch.randn(5, 3, 8, generator=g), torch.randn(5, 3, 8, generator=g),
              torch.cat((c, c), -1), torch.cat((s, s), -1)), {})]


def _probe_gptj() -> list[tuple[tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    c, s = angles(2, 5, 4, seed=3)
    return [((torch.randn(2, 5, 3, 8, generator=g), s, c), {})]


_NEOX_QK = Form("neox_qk", ("q", "k", "cos", "sin", "unsqueeze_dim"), _make_neox_qk, _probe_neox_qk)
_VISION_QK = Form("vision_qk", ("q", "k", "cos", "sin"), _make_vision_qk, _probe_vision_qk)
_MULTIMODAL_QK = Form("multimodal_qk", ("q", "k", "cos", "sin", "mrope_section", "unsqueeze_dim"),
                      _make_multimodal_qk, _probe_multimodal_qk)
_GPTJ = Form("gptj", ("tensor", "sin", "cos"), _make_gptj, _probe_gptj)

# function name in a supported family's modeling module -> form
_FORMS = {
    "apply_rotary_pos_emb": _NEOX_QK,
    "apply_rotary_pos_emb_vision": _VISION_QK,
    "apply_multimodal_rotary_pos_emb": _MULTIMODAL_QK,  # Qwen2-VL / Qwen2.5-VL before transformers merged it
}
_FORMS_BY_FAMILY = {"gptj": {"apply_rotary_pos_emb": _GPTJ}}

_REPLACEMENTS: dict[tuple[int, bool], tuple[Callable, Callable]] = {}  # (id(original), promote) -> (original, fn)


def _replacement(original: Callable, form: Form, promote: bool) -> Callable:
    """The replacement for ``original`` (one object per function and variant, so the alias a
    patch binds is the same for every patch of it)."""
    key = (id(original), promote)
    entry = _REPLACEMENTS.get(key)
    if entry is None or entry[0] is not original:
        entry = _REPLACEMENTS[key] = (original, form.make(original, promote=promote))
    return entry[1]


# ------------------------------------------------------------------------------------------------
# tables="rb": the rotary-embedding module returns rope_backends' float32 tables


class _Tables:
    """A rotary-embedding module's replacement ``forward``: looks positions up in a float32
    ``cos_sin_cache`` (the one ``rb.rope_config(config).cos_sin_cache()`` builds, per layer type)
    exactly as ``rb.apply_cached`` does, and returns cos/sin in the form the model's attention reads:

    ``"neox"``      duplicated ``cos, sin [..., S, rotary_dim]``
    ``"mrope"``     the same, each frequency from its MRoPE row (t, h, w) of ``position_ids [3, B, S]``
    ``"per_axis"``  ``[3, B, S, rotary_dim]``, one table per row (earlier Qwen2-VL code merges them)
    ``"gptj"``      GPT-J's ``sin, cos [B, S, rotary_dim / 2]``
    """

    def __init__(self, caches: dict, form: str, mrope: "_rb.MRope | None" = None) -> None:
        self.caches = caches  # layer_type (None: the only one) -> float32 [max_position, rotary_dim] on CPU
        self.on_device: dict = {}
        self.form = form
        self.axis_map = None if mrope is None else mrope.axis_map

    def cache(self, layer_type: object, device: torch.device) -> Tensor:
        if layer_type not in self.caches:
            if len(self.caches) != 1:
                raise ValueError(f"layer_type: expected one of {sorted(map(str, self.caches))}, got {layer_type!r}")
            layer_type = next(iter(self.caches))
        key = (layer_type, device)
        found = self.on_device.get(key)
        if found is None:
            found = self.on_device[key] = self.caches[layer_type].to(device)
        return found

    def forward(self, x: Tensor, position_ids: Tensor, layer_type: object = None) -> tuple[Tensor, Tensor]:
        from rope_backends.reference import cos_sin_from_cache
        from rope_backends.validation import check_position_range

        cache = self.cache(layer_type, x.device)
        if self.form in ("mrope", "per_axis"):
            position_ids = position_ids.expand(3, -1, -1)  # text-only input: one row for t, h, w
        if position_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            check_position_range(position_ids, cache)  # as apply_cached: never a silent NaN on CPU
        cos, sin = cos_sin_from_cache(position_ids, cache, self.axis_map)
        if self.form == "gptj":
            return sin, cos
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def _text_config(config: object) -> object:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _takes_layer_type(fwd: Callable) -> bool:
    try:
        return "layer_type" in inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        return False


_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check_against_model(rc, module: nn.Module, kind: object, where: str) -> None:
    """The model's own inverse frequencies (its ``inv_freq`` buffer) must be what ``rope_config``
    read from the config, to the buffer's precision: a config read differently from the model is
    refused, not silently given other tables."""
    buffer = getattr(module, f"{kind}_inv_freq" if kind is not None else "inv_freq", None)
    if not isinstance(buffer, Tensor):
        return
    ours = rc.inv_freq().to(torch.float64)
    theirs = buffer.detach().to("cpu", torch.float64).reshape(-1)
    if theirs.shape != ours.shape:
        raise ValueError(f"tables: 'rb' read rotary_dim {rc.rotary_dim} from the config, but {where} rotates "
                         f"{2 * theirs.numel()} dims; not patching")
    if rc.rope_type in ("longrope", "dynamic"):
        return  # the model picks its frequencies by sequence length at run time
    rel = ((ours - theirs).abs() / theirs.abs().clamp_min(1e-30)).max().item() if ours.numel() else 0.0
    if rel > _TOLERANCE.get(buffer.dtype, 1e-5):
        raise ValueError(f"tables: 'rb' read inverse frequencies from the config that differ from {where}'s own "
                         f"(max relative difference {rel:.3g}); not patching")


def _tables_for(family: _Family, module: nn.Module, model: nn.Module, where: str, per_axis: bool) -> _Tables:
    config = getattr(module, "config", None) or _text_config(getattr(model, "config", None))
    if family.tables_form == "gptj":
        # GPT-J fixes theta = 10000 and rotates config.rotary_dim (or head_dim) dims: its module says which
        dim, rows = getattr(module, "pos_embd_dim", None), getattr(module, "max_positions", None)
        if not isinstance(dim, int) or not isinstance(rows, int):
            raise ValueError(f"tables: 'rb' expected GPT-J's pos_embd_dim and max_positions on {where}")
        configs = {None: _rb.rope_config(None, rotary_dim=dim, base=10000.0, max_position_embeddings=rows)}
    else:
        if config is None:
            raise ValueError(f"tables: 'rb' needs the model's config; {where} has none")
        kinds = [None]
        if _takes_layer_type(type(module).forward):
            kinds = sorted(set(getattr(config, "layer_types", None) or ()))
            if not kinds:
                raise ValueError(f"tables: 'rb' needs config.layer_types for {where}, got none")
        configs = {kind: _rb.rope_config(config, layer_type=kind) for kind in kinds}
    caches, mrope = {}, None
    for kind, rc in configs.items():
        if rc.rope_type == "dynamic":
            raise ValueError(
                f"tables: 'rb' builds one table per model, but rope_type 'dynamic' changes with the sequence "
                f"length ({where}); use tables='model'")
        _check_against_model(rc, module, kind, where)
        caches[kind] = rc.cos_sin_cache(dtype=torch.float32).cpu()
    form = family.tables_form
    if family.mrope is not None:
        # the sections the model's rotary module applies (transformers defaults them when the
        # config has none); a config that names other ones is refused
        section = list(getattr(module, "mrope_section", None) or next(iter(configs.values())).mrope_section or ())
        named = next(iter(configs.values())).mrope_section
        if len(section) != 3 or (named is not None and list(named) != section):
            raise ValueError(f"tables: 'rb' expected the MRoPE sections of {where}, got {section!r} (config {named!r})")
        if per_axis:
            form = "per_axis"
        else:
            form = "mrope"
            mrope = (_rb.mrope.interleaved if family.mrope == "interleaved" else _rb.mrope.chunked)(section)
    lookup = _Tables(caches, form, mrope)
    buffer = next(iter(module.buffers()), None)
    if buffer is not None and buffer.device.type != "cpu":
        for kind in caches:  # the model's device now: the first call needs no copy
            lookup.cache(kind, buffer.device)
    return lookup


# ------------------------------------------------------------------------------------------------
# finding what to patch


def _forward_of(module: nn.Module, where: str) -> tuple[str, Callable]:
    """Which attribute to replace and the function it runs (as before any patch): the class's
    ``forward`` normally; accelerate's hooked ``_old_forward`` when a device-map hook wraps the
    module (its ``forward`` then calls ``_old_forward``)."""
    own = unpatched(module, "forward")
    cls_forward = type(module).forward
    if own is MISSING or (getattr(own, "__func__", None) is cls_forward and getattr(own, "__self__", None) is module):
        return "forward", cls_forward  # (the second: the class's own forward bound, e.g. by unpickling a patched model)
    old = unpatched(module, "_old_forward")
    if old is not MISSING and getattr(old, "__func__", None) is not None:
        return "_old_forward", old.__func__
    raise ValueError(
        f"model: {where} already has its own forward (set on the instance, not by accelerate's hooks); patch the "
        f"model before wrapping its modules")


def _unsupported(found: list[str]) -> ValueError:
    listed = ", ".join(f"{name} ({title})" for name, title in SUPPORTED.items())
    got = "; ".join(found) if found else "no rotary position embedding call"
    return ValueError(f"model: expected a model of a supported family: {listed}; got {got}")


def patch(model: nn.Module, *, tables: str | None = None) -> Patch:
    """Route ``model``'s rotary position embeddings through rope_backends.

    model   a transformers model (``PreTrainedModel`` or any ``nn.Module`` containing one) of a
            supported family (:data:`SUPPORTED`); the VL families' vision towers are routed too
    tables  ``None`` / ``"model"``: keep the model's own cos/sin (results bit-equal to the
            unpatched model in float32; in bf16/fp16 each rotation is rounded once instead of
            after every op). ``"rb"``: also replace the model's cos/sin with
            ``rb.rope_config(config).cos_sin_cache()`` looked up by position, in float32 -- the
            rotated q/k then equal a serving engine's ``rb.apply_cached`` with that cache, bit for bit.

    Returns a :class:`~rope_backends.integrations.Patch`: ``.undo()``, or use it as a context
    manager. Only this model changes; patching it again shares the patch (each handle undoes its
    share), a different ``tables`` on a patched model is a ``ValueError``. Raises ``ValueError``
    (nothing changed) for a model of an unsupported family, listing the supported ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if tables is None:
        tables = "model"
    if tables not in _TABLES:
        raise ValueError(f"tables: expected None, 'model' or 'rb', got {tables!r}")
    rb_tables = tables == "rb"
    edits: list[Edit] = []
    families: dict[str, None] = {}
    modules: list[str] = []
    unsupported: list[str] = []
    attention_families: dict[str, _Family] = {}
    forms_used: set = set()
    for where, module in model.named_modules():
        where = where or type(model).__name__
        attr, fwd = _forward_of(module, where)
        names = _rewrite.rotary_names(fwd)
        if not names:
            continue
        sites = _rewrite.find_sites(fwd, names)
        plan, aliases = {}, []
        for site in sites:
            family = _FAMILIES.get(getattr(site.original, "__module__", ""))
            form = None
            if family is not None:
                form = _FORMS_BY_FAMILY.get(family.name, _FORMS).get(getattr(site.original, "__name__", ""))
            if family is None or form is None:
                if site.name != "rotate_half":  # a helper of a rotary function, called on its own by no family
                    unsupported.append(f"{where} ({type(module).__name__}) calls {site.module}")
                continue
            verify(site.original, form, where, "transformers", promote=True)
            forms_used.add(form)
            replacement = _replacement(site.original, form, promote=not rb_tables)
            alias = f"_rope_backends__{site.name}__{'rb_tables' if rb_tables else 'model_tables'}"
            plan[(site.kind, site.name)] = alias
            aliases.append((site.namespace, alias, replacement))
            families[family.name] = None
            attention_families[where] = family
        if not plan:
            continue
        modules.append(where)
        fn = fwd

        def make(fn=fn, plan=dict(plan), module=module):
            return types.MethodType(_rewrite.redirect(fn, plan), module)

        edits.append(Edit(module, attr, ("transformers", tables, tuple(sorted(plan.items()))), make,
                          tuple(aliases), f"{where}.{attr}"))
    if unsupported:
        raise _unsupported(unsupported)
    if not edits:
        raise _unsupported([f"{type(model).__name__}: {_describe(model)}"])
    if rb_tables:
        edits += _table_edits(model, set(families), per_axis=_MULTIMODAL_QK in forms_used)
    held = apply_edits(edits)
    return Patch("transformers", tuple(families), tuple(modules), tables, held)


def _describe(model: nn.Module) -> str:
    kinds = sorted({type(m).__module__ for m in model.modules() if type(m).__module__.startswith(_PREFIX)})
    return ("modules from " + ", ".join(k[len(_PREFIX):].split(".")[0] for k in kinds)) if kinds else \
        "no transformers modules"


def _table_edits(model: nn.Module, families: set[str], per_axis: bool) -> list[Edit]:
    edits = []
    for where, module in model.named_modules():
        cls = type(module)
        family = _FAMILIES.get(cls.__module__)
        if family is None or family.name not in families:
            continue
        if not cls.__name__.endswith("RotaryEmbedding") or "Vision" in cls.__name__:
            continue
        if unpatched(module, "forward") is not MISSING:
            raise ValueError(f"model: {where} already has its own forward; patch the model before wrapping its modules")
        lookup = _tables_for(family, module, model, where, per_axis)
        edits.append(Edit(module, "forward", ("transformers", "rb"), lambda lookup=lookup: lookup.forward, (),
                          f"{where}.forward"))
    if not edits:
        raise ValueError(
            f"tables: 'rb' replaces the model's rotary-embedding module, but {type(model).__name__} has none this "
            f"transformers version builds (families {sorted(families)}); use tables='model'")
    return edits
