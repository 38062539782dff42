"""One model's rope configuration, parsed strictly, and the tables it defines.

:func:`rope_config` turns a transformers config object (any ``PretrainedConfig``, 4.x or 5.x,
read by attribute), a ``rope_parameters`` / ``rope_scaling`` dict, or plain arguments into a
frozen :class:`RopeConfig`. Every key is checked against the keys its ``rope_type`` reads; a key
rope_backends does not implement is a ``ValueError`` naming it -- nothing is ignored.

The inverse frequencies and attention factor follow transformers' ``ROPE_INIT_FUNCTIONS``
(``modeling_rope_utils.py``) key for key and default for default, but are evaluated in float64;
tables (cos/sin, caches) are computed in float64 and rounded once to float32, so they are the
same bits on every device. ``docs/rope_types.md`` lists the types, keys and model families.

This module must not import transformers (config objects are read by attribute only) and must
not touch a device other than to place finished tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["RopeConfig", "rope_config", "ROPE_TYPES", "LONGROPE_MODES"]

#: rope types rope_backends computes (transformers' ``ROPE_INIT_FUNCTIONS`` plus ``default``, plus
#: ``ntk``: fixed NTK-aware base stretch, an rb extension).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional", "ntk")
#: legacy names transformers maps to a supported type (Qwen2-VL's ``mrope`` is the default
#: frequencies plus ``mrope_section``; ``su`` is Phi-3's first name for longrope)
_ALIASES = {"mrope": "default", "su": "longrope"}
#: what cos_sin_cache does for longrope (see RopeConfig.cos_sin_cache)
LONGROPE_MODES = ("by_length", "short", "long", "stacked")

# keys every type may carry: they describe the table, not the scaling
_COMMON = frozenset({
    "rope_type", "type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved",
    "interleaved", "max_position_embeddings",
})
_ORIGINAL = "original_max_position_embeddings"
# per type: (required keys, optional keys) -- transformers' _validate_*_rope_parameters sets
_KEYS: dict[str, tuple[frozenset, frozenset]] = {
    "default": (frozenset(), frozenset()),
    "linear": (frozenset({"factor"}), frozenset()),
    # rb also reads the dict's original_max_position_embeddings (transformers reads the config's
    # max_position_embeddings; both must agree when both are given)
    "dynamic": (frozenset({"factor"}), frozenset({_ORIGINAL})),
    "ntk": (frozenset({"factor"}), frozenset()),
    "yarn": (
        frozenset({"factor", _ORIGINAL}),
        frozenset({"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    ),
    "longrope": (frozenset({"short_factor", "long_factor", _ORIGINAL}), frozenset({"attention_factor", "factor"})),
    "llama3": (frozenset({"factor", "low_freq_factor", "high_freq_factor", _ORIGINAL}), frozenset()),
    "proportional": (frozenset(), frozenset({"factor"})),
}
# keys transformers fills from max_position_embeddings when missing (standardize_rope_params)
_ORIGINAL_FROM_MAX = ("yarn", "longrope", "llama3")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


@dataclass(frozen=True)
class RopeConfig:
    """A validated rope configuration (build it with :func:`rope_config`).

    rope_type: one of :data:`ROPE_TYPES` (aliases resolved: ``mrope`` -> ``default``,
        ``su`` -> ``longrope``).
    base: ``rope_theta``.
    rotary_dim: rotated width of each head (even); the tables are ``[..., rotary_dim // 2]``
        (half form) or ``[max_position, rotary_dim]`` (cache). For ``proportional`` it is
        ``head_dim``: the pairs past the rotated proportion have inverse frequency 0.
    head_dim: the attention head size, or None when neither given nor derivable.
    params: the scaling keys as validated (read-only; lists become tuples), including
        ``original_max_position_embeddings`` where transformers fills it from
        ``max_position_embeddings``. Defaults (``beta_fast`` = 32, ...) are applied when
        computing, not stored.
    max_position_embeddings: the model's context length (default table length), or None.
    mrope_section: the ``mrope_section`` of multimodal (MRoPE) configs, else None;
        ``mrope_interleaved``: Qwen3-VL style interleaving (``mrope_interleaved`` key).
    partial_rotary_factor: as given (1.0 when absent).
    layer_type: the per-layer-type entry this was read from (Gemma-3 style), or None.
    """

    rope_type: str
    base: float
    rotary_dim: int
    head_dim: int | None = None
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    max_position_embeddings: int | None = None
    mrope_section: tuple[int, ...] | None = None
    mrope_interleaved: bool = False
    partial_rotary_factor: float = 1.0
    layer_type: str | None = None

    # ------------------------------------------------------------------------- numbers ---
    @property
    def original_max_position_embeddings(self) -> int | None:
        """The pre-extension length the scaling refers to (yarn, longrope, llama3: the key;
        dynamic: the key or ``max_position_embeddings``), else None."""
        if self.rope_type == "dynamic":
            return self.params.get(_ORIGINAL, self.max_position_embeddings)
        return self.params.get(_ORIGINAL)

    def inv_freq(self, seq_len: int | None = None) -> Tensor:
        """float64 inverse frequencies ``[rotary_dim // 2]`` on the CPU.

        seq_len: the longest sequence served (``max(position) + 1``). Only ``dynamic`` (the
        base grows past the original length) and ``longrope`` (long factors when
        ``seq_len > original_max_position_embeddings``, short ones otherwise or when None)
        depend on it, as in transformers' ``dynamic_rope_update``.
        """
        _check_seq_len(seq_len)
        d, p, kind = self.rotary_dim, self.params, self.rope_type
        exponents = torch.arange(0, d, 2, dtype=torch.float64) / d
        if kind == "proportional":
            # rotated pairs use exponents over head_dim; the rest get frequency 0 (no rotation)
            rotated = int(self.partial_rotary_factor * d // 2)
            freqs = torch.zeros(d // 2, dtype=torch.float64)
            freqs[:rotated] = 1.0 / (self.base ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float64) / d))
            return freqs / float(p.get("factor", 1.0))
        if kind in ("dynamic", "ntk"):
            factor, stretch = float(p["factor"]), d / (d - 2)
            if kind == "ntk":
                base = self.base * factor**stretch
            else:
                old = float(self.original_max_position_embeddings)
                seq = max(float(seq_len) if seq_len is not None else old, old)
                base = self.base * ((factor * seq / old) - (factor - 1)) ** stretch
            return 1.0 / (base**exponents)
        if kind == "longrope":
            long = seq_len is not None and seq_len > p[_ORIGINAL]
            ext = torch.tensor(p["long_factor" if long else "short_factor"], dtype=torch.float64)
            return 1.0 / (ext * self.base**exponents)
        freqs = 1.0 / (self.base**exponents)
        if kind == "linear":
            return freqs / float(p["factor"])
        if kind == "llama3":
            factor, old = float(p["factor"]), float(p[_ORIGINAL])
            low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
            wavelen = 2 * math.pi / freqs
            scaled = torch.where(wavelen > old / low, freqs / factor, freqs)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old / high) & ~(wavelen > old / low)
            return torch.where(medium, smoothed, scaled)
        if kind == "yarn":
            factor, old = float(p["factor"]), float(p[_ORIGINAL])
            beta_fast, beta_slow = float(p.get("beta_fast", 32)), float(p.get("beta_slow", 1))

            def correction(rotations: float) -> float:
                return (d * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(self.base))

            low, high = correction(beta_fast), correction(beta_slow)
            if p.get("truncate", True):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, d - 1)
            if low == high:
                high += 0.001  # transformers' guard against a zero-width ramp
            ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
            pos = self.base**exponents
            extrapolation = 1 - ramp
            return (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
        return freqs

    def attention_factor(self, seq_len: int | None = None) -> float:
        """The factor transformers multiplies cos and sin by (``attention_scaling``): YaRN's
        ``attention_factor`` or its mscale rule, LongRoPE's ``attention_factor`` or
        ``sqrt(1 + ln(factor) / ln(original))``; 1.0 for every other type. ``seq_len`` is
        accepted for symmetry with :meth:`inv_freq`; no type depends on it."""
        _check_seq_len(seq_len)
        p = self.params
        if self.rope_type == "yarn":
            return _yarn_attention(p)
        if self.rope_type == "longrope":
            return _longrope_attention(p, self.max_position_embeddings)
        return 1.0

    # -------------------------------------------------------------------------- tables ---
    def cos_sin(self, positions: Tensor, *, longrope: str = "by_length") -> tuple[Tensor, Tensor]:
        """float32 ``cos, sin [*positions.shape, rotary_dim // 2]`` (half form, what
        ``rb.apply`` takes) on positions' device, times the attention factor.

        ``seq_len`` is ``max(positions) + 1`` (transformers' rule), read on the host: one
        transfer when positions live on a GPU. longrope: ``"by_length"`` (long factors for
        every position iff ``max(positions) + 1 > original_max_position_embeddings``, as
        transformers), ``"short"`` or ``"long"`` (force one set).
        """
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions: expected a torch.Tensor, got {type(positions).__name__}")
        if positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions: expected an integer or float dtype, got {positions.dtype}")
        mode = self._longrope_mode(longrope, allow_stacked=False)
        host = positions.detach().to("cpu", torch.float64)
        seq_len = int(host.max()) + 1 if host.numel() else None
        freqs = self._freqs_for(mode, seq_len)
        return _tables(host.unsqueeze(-1) * freqs, self.attention_factor(), positions.device, torch.float32)

    def cos_sin_cache(
        self,
        max_position: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        longrope: str = "by_length",
    ) -> Tensor:
        """``[max_position, rotary_dim]``: cos of positions ``0..max_position-1`` in the first
        half of the columns, sin in the second (the vLLM/FlashInfer layout
        ``rb.apply_cached`` reads), times the attention factor; computed in float64, rounded
        once to float32 (then to ``dtype``).

        max_position: default ``max_position_embeddings``. ``dynamic`` uses it as ``seq_len``.
        longrope:

        * ``"by_length"`` (default): the whole table uses the long factors iff
          ``max_position > original_max_position_embeddings`` -- transformers' choice for a
          sequence of that length, and vLLM's for ``max_model_len = max_position``;
        * ``"short"`` / ``"long"``: one factor set for every row;
        * ``"stacked"``: vLLM's ``long_short_cos_sin_cache`` layout, ``original + max_position``
          rows: rows ``[0, original)`` the short table, then ``max_position`` rows of the long
          table. Index it with ``positions + original`` for long-context requests and with
          ``positions`` for short ones (the caller picks per request or per deployment).
        """
        if max_position is None:
            if self.max_position_embeddings is None:
                raise ValueError("max_position: expected a positive int (the config has no max_position_embeddings), got None")
            max_position = self.max_position_embeddings
        if isinstance(max_position, bool) or not isinstance(max_position, int) or max_position < 1:
            raise ValueError(f"max_position: expected a positive int, got {max_position!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype: expected a floating dtype, got {dtype}")
        mode = self._longrope_mode(longrope, allow_stacked=True)
        attention = self.attention_factor()
        if mode == "stacked":
            old = self.params[_ORIGINAL]
            parts = [
                _cache_rows(old, self._freqs_for("short", None), attention),
                _cache_rows(max_position, self._freqs_for("long", None), attention),
            ]
            return torch.cat(parts).to(dtype).to(device)
        return _cache_rows(max_position, self._freqs_for(mode, max_position), attention).to(dtype).to(device)

    def mrope(self):
        """The MRoPE axis map this config's ``mrope_section`` defines: ``rb.mrope.interleaved``
        when ``mrope_interleaved`` (Qwen3-VL), else ``rb.mrope.chunked`` (Qwen2-VL /
        Qwen2.5-VL). Ernie4.5-VL's layout is not read from configs: use ``rb.mrope.ernie``."""
        if self.mrope_section is None:
            raise ValueError("mrope_section: expected the config to carry one (an MRoPE model), got None")
        from . import mrope as _mrope

        return (_mrope.interleaved if self.mrope_interleaved else _mrope.chunked)(list(self.mrope_section))

    # ------------------------------------------------------------------------- helpers ---
    def _longrope_mode(self, longrope: object, allow_stacked: bool) -> str:
        modes = LONGROPE_MODES if allow_stacked else LONGROPE_MODES[:3]
        if longrope not in modes:
            raise ValueError(f"longrope: expected one of {modes}, got {longrope!r}")
        if longrope != "by_length" and self.rope_type != "longrope":
            raise ValueError(f"longrope: only used by rope_type 'longrope', got {longrope!r} for rope_type {self.rope_type!r}")
        return longrope  # type: ignore[return-value]

    def _freqs_for(self, mode: str, seq_len: int | None) -> Tensor:
        if mode == "short":
            return self.inv_freq(None)
        if mode == "long":
            return self.inv_freq(self.params[_ORIGINAL] + 1)
        return self.inv_freq(seq_len)


def _check_seq_len(seq_len: object) -> None:
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len: expected a positive int or None, got {seq_len!r}")


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention(p: Mapping[str, Any]) -> float:
    factor = float(p["factor"])
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if mscale and mscale_all_dim:  # DeepSeek-V2/V3, Kimi-K2: the ratio (1.0 when they are equal)
        derived = float(_get_mscale(factor, mscale) / _get_mscale(factor, mscale_all_dim))
    else:
        derived = _get_mscale(factor)
    return float(p["attention_factor"]) if "attention_factor" in p else derived


def _longrope_attention(p: Mapping[str, Any], max_position_embeddings: int | None) -> float:
    if "attention_factor" in p:
        return float(p["attention_factor"])
    factor = p.get("factor")
    if factor is None:  # Phi-3: the ratio of the extended to the original length
        factor = max_position_embeddings / p[_ORIGINAL]
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(p[_ORIGINAL]))


def _tables(angles: Tensor, attention: float, device: torch.device | str | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    cos, sin = torch.cos(angles), torch.sin(angles)
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(dtype).to(device), sin.to(dtype).to(device)


def _cache_rows(n: int, freqs: Tensor, attention: float) -> Tensor:
    angles = torch.arange(n, dtype=torch.float64).unsqueeze(-1) * freqs
    cos, sin = _tables(angles, attention, None, torch.float32)
    return torch.cat((cos, sin), dim=-1)


# ---------------------------------------------------------------------------- parsing ---
def _attr(obj: object, name: str) -> Any:
    """getattr that treats 'not available here' (AttributeError, or transformers' per-layer
    configs raising on ambiguous globals) as absent."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 -- heterogeneous configs raise RuntimeError subclasses
        return None


def _canonical(kind: object, where: str) -> str:
    if not isinstance(kind, str):
        raise ValueError(f"{where}['rope_type']: expected a string, got {kind!r}")
    kind = _ALIASES.get(kind, kind)
    if kind not in ROPE_TYPES:
        extra = ""
        if kind == "axial":
            extra = (" ('axial' is the 2-D rope of vision towers, defined per model; build its table with "
                     "rb.cos_sin per axis or rb.cos_sin_3d)")
        raise ValueError(f"{where}['rope_type']: expected one of {ROPE_TYPES} (or {tuple(_ALIASES)}), got {kind!r}{extra}")
    return kind


def _is_nested(d: Mapping[str, Any], labels: Sequence[str] | None) -> bool:
    if labels:
        return any(k in labels for k in d)
    return bool(d) and not ({"rope_type", "type", "rope_theta"} & set(d)) and all(
        v is None or isinstance(v, Mapping) for v in d.values()
    )


def _pick_layer(d: Mapping[str, Any], where: str, layer_type: str | None, labels: Sequence[str] | None):
    """Resolve Gemma-3 style nesting; return (flat dict or None, where, layer_type)."""
    if _is_nested(d, labels):
        keys = [k for k in d if (k in labels if labels else True)]
        if layer_type is None:
            raise ValueError(f"layer_type: expected one of {keys} ({where} has one entry per layer type), got None")
        if layer_type not in keys:
            raise ValueError(f"layer_type: expected one of {keys}, got {layer_type!r}")
        sub = d[layer_type]
        if sub is None:
            raise ValueError(f"layer_type: {where}[{layer_type!r}] is None (a layer without rope), expected a rope layer type")
        return sub, f"{where}[{layer_type!r}]", layer_type
    if layer_type is not None and not (labels and layer_type in labels):
        raise ValueError(
            f"layer_type: expected None ({where} is one dict for every layer"
            f"{'' if not labels else ', layer types ' + str(list(labels))}), got {layer_type!r}"
        )
    return d, where, layer_type


def _merge(name: str, explicit: object, derived: object, derived_from: str, equal=None) -> Any:
    """An explicit argument must agree with what the config says."""
    if explicit is None:
        return derived
    if derived is None:
        return explicit
    same = equal(explicit, derived) if equal else explicit == derived
    if not same:
        raise ValueError(f"{name}: expected {derived!r} ({derived_from}) or no {name} argument, got {explicit!r}")
    return explicit


def _number(where: str, key: str, v: object, *, positive: bool = True) -> float:
    if not _is_number(v) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{where}['{key}']: expected a {'positive ' if positive else ''}finite number, got {v!r}")
    return float(v)


def _validated_params(kind: str, raw: Mapping[str, Any], where: str, rotary_dim: int, max_pos: int | None) -> dict:
    """The scaling keys of ``raw`` for ``kind``, checked and normalised."""
    required, optional = _KEYS[kind]
    given = {k: v for k, v in raw.items() if k not in _COMMON}
    # transformers treats an optional key set to None as absent (``.get(key) or default``)
    given = {k: v for k, v in given.items() if not (v is None and k in optional)}
    unknown = sorted(set(given) - required - optional)
    if unknown:
        raise ValueError(
            f"{where}: expected only keys {sorted(required | optional | _COMMON)} for rope_type {kind!r}, "
            f"got {unknown} (rope_backends does not implement {'them' if len(unknown) > 1 else 'it'})"
        )
    if _ORIGINAL in given and not _is_int(given[_ORIGINAL]):
        raise ValueError(f"{where}['{_ORIGINAL}']: expected a positive int, got {given[_ORIGINAL]!r}")
    if kind in _ORIGINAL_FROM_MAX and given.get(_ORIGINAL) is None:
        if max_pos is None:
            raise ValueError(
                f"{where}['{_ORIGINAL}']: expected a positive int for rope_type {kind!r} (transformers defaults it "
                f"to max_position_embeddings, which is not known here), got none"
            )
        given[_ORIGINAL] = max_pos
    missing = sorted(k for k in required if given.get(k) is None)
    if missing:
        raise ValueError(f"{where}: expected keys {missing} for rope_type {kind!r}, got keys {sorted(raw)}")
    out: dict[str, Any] = {}
    for key, v in given.items():
        if key == _ORIGINAL:
            if not _is_int(v) or v < 1:
                raise ValueError(f"{where}['{key}']: expected a positive int, got {v!r}")
            out[key] = int(v)
        elif key in ("short_factor", "long_factor"):
            if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != rotary_dim // 2:
                raise ValueError(
                    f"{where}['{key}']: expected {rotary_dim // 2} numbers (rotary_dim // 2), got "
                    f"{len(v) if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) else type(v).__name__}"
                )
            if not all(_is_number(x) and math.isfinite(x) and x > 0 for x in v):
                raise ValueError(f"{where}['{key}']: expected positive finite numbers, got {list(v)!r}")
            out[key] = tuple(float(x) for x in v)
        elif key == "truncate":
            if not isinstance(v, bool):
                raise ValueError(f"{where}['truncate']: expected a bool, got {v!r}")
            out[key] = v
        elif key in ("mscale", "mscale_all_dim"):
            out[key] = _number(where, key, v, positive=False)
        else:
            out[key] = _number(where, key, v)
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ValueError(
            f"{where}['high_freq_factor']: expected more than low_freq_factor={out['low_freq_factor']}, "
            f"got {out['high_freq_factor']}"
        )
    if kind == "yarn":
        ms, msa = out.get("mscale"), out.get("mscale_all_dim")
        if bool(ms) != bool(msa):
            # transformers then ignores the one given; DeepSeek's reference code does not
            raise ValueError(
                f"{where}: expected both 'mscale' and 'mscale_all_dim' (or neither; transformers uses them only as "
                f"a pair), got mscale={ms!r}, mscale_all_dim={msa!r}"
            )
        if "attention_factor" in out and ms and msa:
            derived = _yarn_attention({k: v for k, v in out.items() if k != "attention_factor"})
            if not math.isclose(out["attention_factor"], derived, rel_tol=1e-12):
                raise ValueError(
                    f"{where}['attention_factor']: expected {derived!r} (what mscale={ms} / mscale_all_dim={msa} "
                    f"give) or no attention_factor, got {out['attention_factor']!r}"
                )
    if kind == "longrope" and "factor" not in out and "attention_factor" not in out and max_pos is None:
        raise ValueError(
            f"{where}: expected 'factor' or 'attention_factor' for rope_type 'longrope' (else transformers divides "
            f"max_position_embeddings, not known here, by {_ORIGINAL}), got keys {sorted(raw)}"
        )
    return out


@dataclass
class _Sources:
    """What a config object (or a dict) says, before it is checked."""

    raw: Mapping[str, Any] | None = None
    where: str = "config"
    labels: Sequence[str] | None = None
    obj: Any = None
    head_dim: Any = None
    prf: Any = None
    theta: Any = None
    max_pos: Any = None
    original: Any = None


def _object_sources(config: Any, layer_type: str | None) -> _Sources:
    """Read a transformers config object by attribute (5.x or 4.x, text sub-config first)."""
    obj = config
    getter = _attr(config, "get_text_config")
    if callable(getter):
        try:
            obj = getter()
        except Exception:  # noqa: BLE001 -- some configs refuse; read the object itself
            obj = config
    sub = obj  # per-layer values (Gemma-4: head_dim differs by layer type)
    per_layer = _attr(obj, "per_layer_config")
    if layer_type is not None and per_layer is not None:
        try:
            sub = per_layer[layer_type]
        except Exception:  # noqa: BLE001 -- not heterogeneous for this key
            sub = obj
    raw, where = _attr(obj, "rope_parameters"), "config.rope_parameters"
    if not raw:  # transformers 4.x
        raw, where = _attr(obj, "rope_scaling"), "config.rope_scaling"
    if raw is not None and not isinstance(raw, Mapping):
        raise TypeError(f"{where}: expected a dict or None, got {type(raw).__name__}")
    names = ("rope_parameters", "rope_scaling", "rope_theta", "head_dim", "hidden_size", "max_position_embeddings")
    if raw is None and all(_attr(obj, n) is None for n in names):
        raise TypeError(
            f"config: expected a transformers config object, a rope_parameters / rope_scaling dict or None, "
            f"got {type(config).__name__} (it has none of {list(names)})"
        )
    head = _attr(sub, "head_dim")
    if not head:
        hidden, heads = _attr(sub, "hidden_size"), _attr(sub, "num_attention_heads")
        head = hidden // heads if _is_int(hidden) and _is_int(heads) and heads else None
    theta = _attr(obj, "rope_theta")
    if theta is None:
        theta = _attr(type(obj), "default_theta")
    return _Sources(
        raw=raw, where=where, labels=_attr(obj, "_rope_type_labels") or _attr(obj, "layer_types") or None, obj=obj,
        head_dim=head, prf=_attr(obj, "partial_rotary_factor"), theta=theta,
        max_pos=_attr(sub, "max_position_embeddings"), original=_attr(obj, _ORIGINAL),
    )


def rope_config(
    config: Any = None,
    *,
    layer_type: str | None = None,
    head_dim: int | None = None,
    rotary_dim: int | None = None,
    base: float | None = None,
    scaling: float | Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
) -> RopeConfig:
    """Parse one model's rope configuration strictly; see :class:`RopeConfig`.

    config: a transformers config object (read by attribute: 5.x ``rope_parameters``,
        including per-layer-type nesting; 4.x ``rope_scaling`` + ``rope_theta``; ``head_dim``
        or ``hidden_size // num_attention_heads``; ``partial_rotary_factor``;
        ``max_position_embeddings``; multimodal configs through ``get_text_config()``), a
        ``rope_parameters`` / ``rope_scaling`` dict, or None (plain arguments).
    layer_type: which entry of a per-layer-type ``rope_parameters``
        (``{"full_attention": {...}, "sliding_attention": {...}}``) to read; required when
        the parameters are nested.
    head_dim, rotary_dim, base, max_position_embeddings: plain values, or checks: an argument
        that disagrees with the config is a ``ValueError`` naming both. ``rotary_dim`` is
        derived as ``int(head_dim * partial_rotary_factor)`` (transformers' rule; an odd result
        is an error), ``base`` from ``rope_theta`` (default 10000).
    scaling: a ``rope_scaling`` / ``rope_parameters`` dict (or a float: linear factor) for
        plain arguments, or added to a config object whose own rope type is ``default``
        (e.g. YaRN for Qwen2.5, which ships without it).
    """
    if config is None or isinstance(config, Mapping):
        src = _Sources(raw=config, where="config")
    else:
        src = _object_sources(config, layer_type)
    raw, where, labels, cfg_obj = src.raw, src.where, src.labels, src.obj
    cfg_head, cfg_prf, cfg_theta, cfg_max, original_attr = src.head_dim, src.prf, src.theta, src.max_pos, src.original
    if isinstance(scaling, RopeConfig):
        raise TypeError("scaling: expected None, a float (linear factor) or a rope_scaling dict, got RopeConfig")
    if scaling is not None:
        if _is_number(scaling):
            scaling = {"rope_type": "linear", "factor": float(scaling)}
        elif not isinstance(scaling, Mapping):
            raise TypeError(
                f"scaling: expected None, a float (linear factor) or a rope_scaling dict, got {type(scaling).__name__}"
            )
        if isinstance(config, Mapping):
            raise ValueError("scaling: expected None when config is a dict (pass the rope parameters once), got a dict")

    # transformers 4.x Gemma-3 style: one flat rope_scaling for the global layers, and
    # rope_local_base_freq (default rope) for the sliding ones
    local_base = _attr(cfg_obj, "rope_local_base_freq") if cfg_obj is not None else None
    if local_base is not None and not (raw and _is_nested(raw, labels)):
        if layer_type not in ("full_attention", "sliding_attention"):
            raise ValueError(
                "layer_type: expected 'full_attention' or 'sliding_attention' (the config sets rope_local_base_freq "
                f"for its sliding layers), got {layer_type!r}"
            )
        if layer_type == "sliding_attention":
            raw, where = {"rope_type": "default", "rope_theta": local_base}, "config.rope_local_base_freq"
            cfg_theta = local_base
    # the flat rope dict this layer reads
    flat: dict[str, Any] = {}
    if raw:
        picked, where, layer_type = _pick_layer(raw, where, layer_type, labels)
        flat = dict(picked)
    elif layer_type is not None and not (labels and layer_type in labels):
        raise ValueError(f"layer_type: expected None (no per-layer-type rope parameters), got {layer_type!r}")
    if scaling is not None:
        s_where = "scaling"
        own = _canonical(flat.get("rope_type", flat.get("type", "default")), where) if flat else "default"
        if own != "default":
            raise ValueError(
                f"scaling: expected None ({where} already has rope_type {own!r}), got a {scaling.get('rope_type', scaling.get('type'))!r} dict"
            )
        theta = flat.get("rope_theta")
        merged = {k: v for k, v in flat.items() if k in _COMMON and k not in ("rope_type", "type")}
        for k, v in scaling.items():
            if k in merged and merged[k] is not None and v != merged[k]:
                raise ValueError(f"scaling['{k}']: expected {merged[k]!r} ({where}['{k}']) or no such key, got {v!r}")
        merged.update(scaling)
        if theta is not None:
            merged.setdefault("rope_theta", theta)
        flat, where = merged, s_where if not raw else f"scaling (added to {where})"

    # rope type: from a config object transformers has already standardised (rope_type wins over
    # the legacy 'type'); in a plain dict the two must agree
    if "rope_type" in flat and "type" in flat and cfg_obj is None:
        a, b = _canonical(flat["rope_type"], where), _canonical(flat["type"], where)
        if a != b:
            raise ValueError(f"{where}['type']: expected {flat['rope_type']!r} (its 'rope_type') or no 'type', got {flat['type']!r}")
    kind = _canonical(flat.get("rope_type", flat.get("type", "default")), where)

    # partial rotary, head_dim, rotary_dim
    prf = flat.get("partial_rotary_factor")
    if prf is None:
        prf = cfg_prf
    prf = 1.0 if prf is None else prf
    if not _is_number(prf) or not 0 < prf <= 1:
        raise ValueError(f"{where}['partial_rotary_factor']: expected a number in (0, 1], got {prf!r}")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2):
        raise ValueError(f"head_dim: expected an int >= 2, got {head_dim!r}")
    if rotary_dim is not None and (isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2):
        raise ValueError(f"rotary_dim: expected an even int >= 2, got {rotary_dim!r}")
    head = _merge("head_dim", head_dim, int(cfg_head) if cfg_head else None, "the config's head_dim")
    if kind == "proportional":  # the table spans the whole head; rotated share set by prf
        derived_rot = head
        head = _merge("head_dim", head, rotary_dim, "rotary_dim (proportional rope spans the head)")
    else:
        derived_rot = int(head * prf) if head is not None else None
        if derived_rot is not None and derived_rot % 2:
            raise ValueError(
                f"{where}['partial_rotary_factor']: expected head_dim * partial_rotary_factor to be even, got "
                f"int({head} * {prf}) = {derived_rot} (transformers would build {derived_rot + 1} columns with "
                f"exponents over {derived_rot}; rope_backends does not)"
            )
    rot = _merge("rotary_dim", rotary_dim, derived_rot, f"int(head_dim * partial_rotary_factor) = int({head} * {prf})")
    if rot is None:
        raise ValueError("rotary_dim: expected an even int >= 2 (or head_dim / a config to derive it from), got None")
    if rot < 2 or rot % 2:
        raise ValueError(f"rotary_dim: expected an even int >= 2, got {rot!r}")
    if head is None and prf == 1.0:
        head = rot
    if kind in ("dynamic", "ntk") and rot < 4:
        raise ValueError(f"rotary_dim: expected >= 4 for rope_type {kind!r} (its exponent is d / (d - 2)), got {rot}")

    # base
    theta = flat.get("rope_theta")
    if theta is None:
        theta = cfg_theta
    if theta is not None and (not _is_number(theta) or not math.isfinite(theta) or theta <= 0):
        raise ValueError(f"{where}['rope_theta']: expected a positive number, got {theta!r}")
    if base is not None and (not _is_number(base) or not math.isfinite(base) or base <= 0):
        raise ValueError(f"base: expected a positive number, got {base!r}")
    b = _merge("base", base, float(theta) if theta is not None else None, f"{where}['rope_theta']",
               equal=lambda x, y: float(x) == float(y))
    b = 10000.0 if b is None else float(b)

    # max_position_embeddings (config attribute, or a Ministral-style key inside the dict)
    if max_position_embeddings is not None and (not _is_int(max_position_embeddings) or max_position_embeddings < 1):
        raise ValueError(f"max_position_embeddings: expected a positive int, got {max_position_embeddings!r}")
    in_dict = flat.get("max_position_embeddings")
    if in_dict is not None and (not _is_int(in_dict) or in_dict < 1):
        raise ValueError(f"{where}['max_position_embeddings']: expected a positive int, got {in_dict!r}")
    mpe = _merge("max_position_embeddings", int(in_dict) if in_dict is not None else None,
                 int(cfg_max) if _is_int(cfg_max) else None, "the config's max_position_embeddings")
    mpe = _merge("max_position_embeddings", max_position_embeddings, mpe, "the config")
    mpe = int(mpe) if mpe is not None else None

    # Phi-3 keeps original_max_position_embeddings next to rope_scaling; transformers moves it in
    if original_attr is not None and kind in _ORIGINAL_FROM_MAX and flat.get(_ORIGINAL) is None:
        flat[_ORIGINAL] = original_attr
    params = _validated_params(kind, flat, where, rot, mpe)
    if kind == "dynamic" and _ORIGINAL in params and mpe is not None and params[_ORIGINAL] != mpe:
        raise ValueError(
            f"{where}['{_ORIGINAL}']: expected {mpe} (max_position_embeddings, which transformers' dynamic "
            f"rope reads) or no such key, got {params[_ORIGINAL]}"
        )
    if kind == "dynamic" and _ORIGINAL not in params and mpe is None:
        raise ValueError(
            f"{where}['{_ORIGINAL}']: expected the model's max_position_embeddings for rope_type 'dynamic' "
            f"(as a key or max_position_embeddings=), got none"
        )

    # multimodal sections
    section = flat.get("mrope_section")
    if section is not None:
        if (isinstance(section, (str, bytes)) or not isinstance(section, Sequence) or len(section) != 3
                or any(not _is_int(s) or s < 0 for s in section)):
            raise ValueError(f"{where}['mrope_section']: expected 3 non-negative ints, got {section!r}")
        section = tuple(int(s) for s in section)
        if sum(section) != rot // 2:
            raise ValueError(f"{where}['mrope_section']: expected sections summing to rotary_dim // 2 = {rot // 2}, got {list(section)}")
    interleaved = None
    for key in ("mrope_interleaved", "interleaved"):
        v = flat.get(key)
        if v is None:
            continue
        if not isinstance(v, bool):
            raise ValueError(f"{where}['{key}']: expected a bool, got {v!r}")
        if interleaved is not None and v != interleaved:
            raise ValueError(f"{where}['{key}']: expected {interleaved} (as 'mrope_interleaved'), got {v}")
        interleaved = v
    if interleaved and section is None:
        raise ValueError(f"{where}['mrope_interleaved']: expected an 'mrope_section' with it, got none")

    return RopeConfig(
        rope_type=kind,
        base=b,
        rotary_dim=rot,
        head_dim=head,
        params=MappingProxyType(params),
        max_position_embeddings=mpe,
        mrope_section=section,
        mrope_interleaved=bool(interleaved),
        partial_rotary_factor=float(prf),
        layer_type=layer_type,
    )
