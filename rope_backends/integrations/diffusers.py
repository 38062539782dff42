"""Route a diffusers transformer's rotary embedding through rope_backends, per instance.

    from rope_backends.integrations.diffusers import patch
    with patch(pipe.transformer):           # or: handle = patch(model); ...; handle.undo()
        pipe(...)                           # every rotation runs through rb.apply

How: diffusers applies RoPE inside each attention module's *processor* (``attn.processor(attn,
...)``), calling a rotary function by name -- a module global (Flux, Helios, LTX), a name imported
inside ``__call__`` (HunyuanVideo, CogVideoX) or a function defined inside ``__call__`` (Wan,
SkyReels-V2, ChronoEdit, Wan-Animate, Mochi). ``patch`` gives each attention module of *this* model
a processor of a subclass of its own processor's class whose ``__call__`` is a copy of the
original in which that call goes to a rope_backends function of the same signature and results
(``_rewrite.py``). The processor's state is shared with the original; ``undo`` puts the original
processor object back. diffusers' modules and other models are not changed.

Each replacement is checked against the installed diffusers' function on float32 inputs, bit for
bit, before its first use. The tables must pair each value over its rotated pair (cos[2i] ==
cos[2i+1] for the interleaved form, cos[i] == cos[i + d/2] for the half-split form), as every
supported model's own rotary module builds them (``get_1d_rotary_pos_embed`` with
``repeat_interleave_real``, Wan's/Helios' tables): rope_backends reads one value per pair.

This module imports no diffusers code; it must not change a diffusers module's existing names (it
only adds private ``_rope_backends__*`` aliases), nor any model other than the one passed.
"""

from __future__ import annotations

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

_T = "diffusers.models.transformers."
_AP = "diffusers.models.attention_processor"


def _unchanged(*tables: Tensor) -> bool:
    """Whether to keep the library's own function for these tables: float64 tables make it compute
    in float64, and learned tables (Mochi's frequencies, in training) need a gradient, which
    rope_backends gives only to the rotated tensors."""
    return any(t.dtype == torch.float64 for t in tables) or (
        torch.is_grad_enabled() and any(t.requires_grad for t in tables))


# ------------------------------------------------------------------------------------------------
# the replacements


def _make_wan(original: Callable, contiguous: bool = True) -> Callable:
    def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
        """Wan's nested rotation: hidden_states ``[B, S, H, D]``, freqs ``[1, S, 1, D]`` (each
        value repeated over its pair); pair i = (2i, 2i+1) with cos[2i], sin[2i+1]."""
        if _unchanged(freqs_cos, freqs_sin) or hidden_states.dtype not in RB_DTYPES:
            return original(hidden_states, freqs_cos, freqs_sin)
        out = _rb.apply(hidden_states, freqs_cos[..., 0::2], freqs_sin[..., 1::2], layout="interleaved",
                        rotary_dim=hidden_states.shape[-1])
        if contiguous:
            contiguous_grads(out)
        return out

    return apply_rotary_emb


def _make_mochi(original: Callable, contiguous: bool = True) -> Callable:
    def apply_rotary_emb(x, freqs_cos, freqs_sin):
        """Mochi's nested rotation: x ``[B, S, H, D]``, freqs ``[S, H, D/2]`` (one value per pair),
        pairs (2i, 2i+1)."""
        if _unchanged(freqs_cos, freqs_sin) or x.dtype not in RB_DTYPES:
            return original(x, freqs_cos, freqs_sin)
        out = _rb.apply(x, freqs_cos, freqs_sin, layout="interleaved", rotary_dim=x.shape[-1])
        if contiguous:
            contiguous_grads(out)
        return out

    return apply_rotary_emb


def _make_helios(original: Callable, contiguous: bool = True) -> Callable:
    def apply_rotary_emb_transposed(hidden_states, freqs_cis):
        """Helios' rotation: hidden_states ``[B, S, H, D]``, freqs_cis ``[B, S, 2D]`` (cos | sin,
        each repeated over its pair); pair i = (2i, 2i+1) with cos[2i], sin[2i+1]."""
        if _unchanged(freqs_cis) or hidden_states.dtype not in RB_DTYPES:
            return original(hidden_states, freqs_cis)
        cos, sin = freqs_cis.unsqueeze(-2).chunk(2, dim=-1)
        out = _rb.apply(hidden_states, cos[..., 0::2], sin[..., 1::2], layout="interleaved",
                        rotary_dim=hidden_states.shape[-1])
        if contiguous:
            contiguous_grads(out)
        return out

    return apply_rotary_emb_transposed


def _make_embeddings(original: Callable, contiguous: bool = False) -> Callable:
    def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
        """``diffusers.models.embeddings.apply_rotary_emb``, real form: x ``[B, H, S, D]``
        (``sequence_dim=2``) or ``[B, S, H, D]`` (1), freqs_cis ``(cos, sin)`` each ``[S, D]``
        duplicated; ``use_real_unbind_dim=-1`` pairs (2i, 2i+1) (Flux, CogVideoX,
        HunyuanVideo), ``-2`` pairs (i, i + D/2). The complex form (``use_real=False``) and float64
        tables keep diffusers' own function."""
        if (use_real is not True or use_real_unbind_dim not in (-1, -2) or sequence_dim not in (1, 2)
                or not isinstance(freqs_cis, (tuple, list)) or len(freqs_cis) != 2 or x.dtype not in RB_DTYPES):
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = freqs_cis
        if _unchanged(cos, sin):
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = cos.to(x.device), sin.to(x.device)
        if sequence_dim == 2:
            cos, sin = cos[None, None], sin[None, None]
        else:
            cos, sin = cos[None, :, None], sin[None, :, None]
        d = x.shape[-1]
        if use_real_unbind_dim == -1:
            out = _rb.apply(x, cos[..., 0::2], sin[..., 0::2], layout="interleaved", rotary_dim=d)
        else:
            out = _rb.apply(x, cos[..., : d // 2], sin[..., : d // 2], layout="neox", rotary_dim=d)
        if contiguous:
            contiguous_grads(out)
        return out

    return apply_rotary_emb


def _make_ltx(original: Callable, contiguous: bool = False) -> Callable:
    def apply_rotary_emb(x, freqs):
        """LTX-Video's rotation on flattened heads: x ``[B, S, C]``, freqs ``(cos, sin)`` each
        ``[B, S, C]`` repeated over pairs (2i, 2i+1) of C."""
        cos, sin = freqs
        if _unchanged(cos, sin) or x.dtype not in RB_DTYPES or x.dim() != 3:
            return original(x, freqs)
        out = _rb.apply(x.unsqueeze(-2), cos[..., 0::2].unsqueeze(-2), sin[..., 0::2].unsqueeze(-2),
                        layout="interleaved", rotary_dim=x.shape[-1]).squeeze(-2)
        if contiguous:
            contiguous_grads(out)
        return out

    return apply_rotary_emb


def _probe_wan():
    g = torch.Generator().manual_seed(0)
    c, s = angles(1, 5, 1, 4, seed=1)
    return [((torch.randn(2, 5, 3, 8, generator=g), c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)), {})]


def _probe_mochi():
    g = torch.Generator().manual_seed(0)
    c, s = angles(5, 3, 4, seed=2)
    return [((torch.randn(2, 5, 3, 8, generator=g), c, s), {})]


def _probe_helios():
    g = torch.Generator().manual_seed(0)
    c, s = angles(2, 5, 4, seed=3)
    freqs = torch.cat((c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)), -1)
    return [((torch.randn(2, 5, 3, 8, generator=g), freqs), {})]


def _probe_embeddings():
    g = torch.Generator().manual_seed(0)
    c, s = angles(5, 4, seed=4)
    inter = (c.repeat_interleave(2, -1), s.repeat_interleave(2, -1))
    split = (torch.cat((c, c), -1), torch.cat((s, s), -1))
    return [((torch.randn(2, 3, 5, 8, generator=g), inter), {}),
            ((torch.randn(2, 5, 3, 8, generator=g), inter), {"sequence_dim": 1}),
            ((torch.randn(2, 3, 5, 8, generator=g), split), {"use_real_unbind_dim": -2})]


def _probe_ltx():
    g = torch.Generator().manual_seed(0)
    c, s = angles(2, 5, 6, seed=5)
    return [((torch.randn(2, 5, 12, generator=g), (c.repeat_interleave(2, -1), s.repeat_interleave(2, -1))), {})]


_WAN = Form("wan", ("hidden_states", "freqs_cos", "freqs_sin"), _make_wan, _probe_wan)
_MOCHI = Form("mochi", ("x", "freqs_cos", "freqs_sin"), _make_mochi, _probe_mochi)
_HELIOS = Form("helios", ("hidden_states", "freqs_cis"), _make_helios, _probe_helios)
_EMBEDDINGS = Form("embeddings", ("x", "freqs_cis", "use_real", "use_real_unbind_dim", "sequence_dim"),
                   _make_embeddings, _probe_embeddings)
_LTX = Form("ltx", ("x", "freqs"), _make_ltx, _probe_ltx)


def _nested(module: str, processor: str, name: str = "apply_rotary_emb") -> str:
    return f"{module}:{processor}.__call__.<locals>.{name}"


@dataclass(frozen=True)
class _Family:
    name: str
    title: str
    processors: tuple[str, ...]  # "module:qualname" of the processor classes it uses


# the function a processor calls ("module:qualname") -> form
_FORMS = {
    _nested(_T + "transformer_wan", "WanAttnProcessor"): _WAN,
    _nested(_T + "transformer_skyreels_v2", "SkyReelsV2AttnProcessor"): _WAN,
    _nested(_T + "transformer_chronoedit", "WanAttnProcessor"): _WAN,
    _nested(_T + "transformer_wan_animate", "WanAttnProcessor"): _WAN,
    _nested(_AP, "MochiAttnProcessor2_0"): _MOCHI,
    _T + "transformer_helios:apply_rotary_emb_transposed": _HELIOS,
    "diffusers.models.embeddings:apply_rotary_emb": _EMBEDDINGS,
    _T + "transformer_ltx:apply_rotary_emb": _LTX,
}

_FAMILY_LIST = (
    _Family("wan", "Wan 2.1 / 2.2 (WanTransformer3DModel, WanVACETransformer3DModel)",
            (_T + "transformer_wan:WanAttnProcessor",)),
    _Family("skyreels_v2", "SkyReels-V2 (SkyReelsV2Transformer3DModel)",
            (_T + "transformer_skyreels_v2:SkyReelsV2AttnProcessor",)),
    _Family("chronoedit", "ChronoEdit (ChronoEditTransformer3DModel)", (_T + "transformer_chronoedit:WanAttnProcessor",)),
    _Family("helios", "Helios (HeliosTransformer3DModel)", (_T + "transformer_helios:HeliosAttnProcessor",)),
    _Family("flux", "Flux.1 (FluxTransformer2DModel)", (_T + "transformer_flux:FluxAttnProcessor",)),
    _Family("hunyuan_video", "HunyuanVideo (HunyuanVideoTransformer3DModel)",
            (_T + "transformer_hunyuan_video:HunyuanVideoAttnProcessor2_0",)),
    _Family("cogvideox", "CogVideoX (CogVideoXTransformer3DModel)",
            (_AP + ":CogVideoXAttnProcessor2_0", _AP + ":FusedCogVideoXAttnProcessor2_0")),
    _Family("ltx", "LTX-Video (LTXVideoTransformer3DModel)", (_T + "transformer_ltx:LTXVideoAttnProcessor",)),
    _Family("mochi", "Mochi (MochiTransformer3DModel)", (_AP + ":MochiAttnProcessor2_0",)),
)
_BY_PROCESSOR = {p: f for f in _FAMILY_LIST for p in f.processors}

#: family -> description, for every supported family
SUPPORTED: dict[str, str] = {f.name: f.title for f in _FAMILY_LIST}


def supported_families() -> list[str]:
    """The family names :func:`patch` supports."""
    return list(SUPPORTED)


_REPLACEMENTS: dict[tuple, tuple[Callable, Callable]] = {}
_PROCESSOR_CLASSES: dict[tuple, type] = {}


def _site_key(site: _rewrite.Site) -> tuple:
    # nested functions are re-created per find_sites call: key them by their code object
    return (site.module, id(getattr(site.original, "__code__", site.original)))


def _replacement(site: _rewrite.Site, form: Form) -> Callable:
    key = _site_key(site)
    entry = _REPLACEMENTS.get(key)
    if entry is None:
        entry = _REPLACEMENTS[key] = (site.original, form.make(site.original))
    return entry[1]


def _patched_class(cls: type, call: Callable, plan: dict) -> type:
    """A subclass of the processor class ``cls`` whose ``__call__`` is the redirected copy (one per
    class and plan, so processors patched twice share their class)."""
    key = (cls, tuple(sorted(plan.items())))
    sub = _PROCESSOR_CLASSES.get(key)
    if sub is None:
        sub = type(f"RopeBackends{cls.__name__}", (cls,), {
            "__call__": _rewrite.redirect(call, plan), "__module__": __name__,
            "__doc__": f"{cls.__module__}.{cls.__qualname__} with its rotary call routed through rope_backends.",
            "_rope_backends_original_class": cls,
            # a pickle (torch.save of the whole model) stores the original processor; a deepcopy
            # stays patched, like a deepcopy of a patched transformers model (neither is tracked by
            # the handle)
            "__reduce_ex__": _reduce_to_original,
            "__deepcopy__": _deepcopy_patched})
        _PROCESSOR_CLASSES[key] = sub
    return sub


def _unpatched_processor(cls: type, state: dict) -> object:
    new = object.__new__(cls)
    new.__dict__.update(state)
    return new


def _reduce_to_original(self, protocol):
    return _unpatched_processor, (self._rope_backends_original_class, dict(vars(self)))


def _deepcopy_patched(self, memo):
    import copy

    new = object.__new__(type(self))
    memo[id(self)] = new
    new.__dict__.update(copy.deepcopy(vars(self), memo))
    return new


def _copy_processor(processor: object, sub: type) -> object:
    new = object.__new__(sub)
    new.__dict__.update(vars(processor))
    return new


def _unsupported(found: list[str]) -> ValueError:
    listed = ", ".join(f"{name} ({title})" for name, title in SUPPORTED.items())
    got = "; ".join(found) if found else "no rotary position embedding in its attention processors"
    return ValueError(f"model: expected a diffusers transformer of a supported family: {listed}; got {got}")


def patch(model: nn.Module) -> Patch:
    """Route ``model``'s rotary position embeddings through rope_backends.

    model   a diffusers transformer (e.g. ``pipe.transformer``) of a supported family
            (:data:`SUPPORTED`), or any ``nn.Module`` containing one

    Returns a :class:`~rope_backends.integrations.Patch`: ``.undo()``, or use it as a context
    manager. Results are bit-equal to the unpatched model in float32 (forward and gradients); in
    bf16/fp16 with the models' float32 tables they are too, since diffusers computes these
    rotations in float32 and rounds once, as rope_backends does (with tables cast to bf16, each
    rotation is rounded once instead of after every op). Only this model changes; patching it
    again shares the patch. Raises ``ValueError`` (nothing changed) for a model of an unsupported
    family, listing the supported ones.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a diffusers transformer), got {type(model).__name__}")
    edits: list[Edit] = []
    families: dict[str, None] = {}
    modules: list[str] = []
    unsupported: list[str] = []
    classes: dict[int, tuple[object, type, dict, list]] = {}
    copies: dict[int, object] = {}
    for where, module in model.named_modules():
        where = where or type(model).__name__
        processor = _processor_of(module)
        if processor is None:
            continue
        cls = type(processor)
        call = getattr(cls, "__call__", None)
        if not isinstance(getattr(call, "__code__", None), types.CodeType):
            continue
        names = _rewrite.rotary_names(call)
        if not names:
            continue
        qualified = f"{cls.__module__}:{cls.__qualname__}"
        family = _BY_PROCESSOR.get(qualified)
        if family is None or isinstance(processor, nn.Module):
            unsupported.append(f"{where} uses {qualified}")
            continue
        if id(processor) not in classes:
            plan, aliases = {}, []
            for site in _rewrite.find_sites(call, names):
                form = _FORMS.get(site.module)
                if form is None:
                    unsupported.append(f"{where} ({qualified}) calls {site.module}")
                    continue
                verify(site.original, form, where, "diffusers", key=_site_key(site))
                alias = f"_rope_backends__{site.name}__{form.name}"
                plan[(site.kind, site.name)] = alias
                aliases.append((site.namespace, alias, _replacement(site, form)))
            classes[id(processor)] = (processor, _patched_class(cls, call, plan) if plan else None, plan, aliases)
        _, sub, plan, aliases = classes[id(processor)]
        if sub is None:
            continue

        def make(processor=processor, sub=sub):  # one copy per processor object, however many modules share it
            if id(processor) not in copies:
                copies[id(processor)] = _copy_processor(processor, sub)
            return copies[id(processor)]

        edits.append(Edit(module, "processor", ("diffusers", tuple(sorted(plan.items()))), make,
                          tuple(aliases), f"{where}.processor"))
        families[family.name] = None
        modules.append(where)
    if unsupported:
        raise _unsupported(unsupported)
    if not edits:
        raise _unsupported([])
    return Patch("diffusers", tuple(families), tuple(modules), "model", apply_edits(edits))


def _processor_of(module: nn.Module) -> object:
    """The module's processor as before any patch (None when it has none)."""
    own = unpatched(module, "processor")
    if own is MISSING:
        own = getattr(type(module), "processor", None)
    return own if own is not None and callable(own) else None
