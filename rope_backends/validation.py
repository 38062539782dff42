"""Input validation: every public call's arguments checked and turned into one ``RopeArgs``.

Every entry point validates here, so every backend receives inputs that are already checked and
normalised: ``cos``/``sin`` in *half form* (one value per rotated pair), q/k as
``[..., heads, head_dim]``. Bad input raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(wrong value) naming the argument, what was expected and what came (docs/errors.md), before
anything is written. Validation never synchronises with a device: checks that would read device
memory (position ranges, the partial-rotary table check) run only where modes.py says values are
readable (CPU tensors, or ``ROPE_BACKENDS_DEBUG=1``). The memory rules (which tensors may share
elements) are memory.py's; the cache of signatures that passed is signatures.py's.

This module imports no backend and runs nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import signatures
from .contract import COS_DTYPES, INT_DTYPES, X_DTYPES, Layout, MRope, RopeArgs, half_view
from .memory import check_memory, need_apart, need_distinct, need_writable
from .modes import plain, position_range_checked, traced, values_readable

__all__ = ["args_for_tables", "args_for_cached", "check_partial_rotary", "check_position_range"]


# --------------------------------------------------------------------------------------------
# checks, each naming the argument, the expectation and what came


def _need_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.layout is not torch.strided or value.is_nested:
        what = "a nested tensor" if value.is_nested else f"layout {value.layout}"
        raise TypeError(f"{name}: expected a dense (strided) tensor, got {what}; pass {name}.to_dense() or a padded tensor")
    return value


def _need_x_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in X_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}")


def _need_same_device(name: str, t: Tensor, device: torch.device, ref_name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of {ref_name}), got {t.device}")


def _no_grad_inplace(name: str, t: Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}: expected a tensor that does not require grad for inplace=True (not differentiable), "
            f"got one that requires grad; use inplace=False (or torch.no_grad() for inference)"
        )


def _rotary_dim(rotary_dim: object, head_dim: int, name: str = "rotary_dim") -> int:
    if rotary_dim is None:
        rotary_dim = head_dim
    elif isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int or None, got {type(rotary_dim).__name__}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"{name}: expected an even value in [2, head_dim={head_dim}], got {rotary_dim}"
        )
    return int(rotary_dim)

def _half_form(cos: Tensor, sin: Tensor, layout: Layout, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin as one value per pair. The duplicated form (last dim ``rotary_dim``, as HF and
    diffusers build it) is read at index i (neox) or 2i (interleaved), by a view: no copy."""
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in COS_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype (float32/16, bfloat16, float64), got {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"{name}: expected at least 1 dimension, got a 0-d tensor")
    if cos.dtype != sin.dtype:
        raise TypeError(f"sin: expected the dtype of cos ({cos.dtype}), got {sin.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    half = rotary_dim // 2
    last = cos.shape[-1]
    if last == half or last == rotary_dim:
        return half_view(cos, sin, layout, rotary_dim)
    raise ValueError(
        f"cos: expected last dim rotary_dim//2={half} (one value per pair) or rotary_dim={rotary_dim} "
        f"(duplicated form), got {last} (shape {tuple(cos.shape)})"
    )


def _need_broadcast(name: str, small: Sequence[int], target: Sequence[int], target_name: str) -> None:
    ok = len(small) <= len(target) and all(
        s == t or s == 1 for s, t in zip(reversed(small), reversed(target))
    )
    if not ok:
        raise ValueError(
            f"{name}: expected a shape broadcastable to {tuple(target)} ({target_name}.shape[:-1] + "
            f"(rotary_dim//2,)), got {tuple(small)}"
        )


# --------------------------------------------------------------------------------------------
# one builder per public entry point


def args_for_tables(
    tensors: tuple[tuple[str, object], ...],
    cos: object,
    sin: object,
    layout: Layout | str,
    rotary_dim: int | None,
    inplace: bool,
) -> RopeArgs:
    """Validate ``apply`` (one tensor) or ``apply_qk`` (q, k) with explicit cos/sin."""
    key = signatures.table_signature(tensors, cos, sin, layout, rotary_dim, inplace)
    known = signatures.known(key)
    if known is not None:
        layout, rotary_dim, value_checks = known
        checked = tuple(t for _, t in tensors)
        check_memory(tensors, (("cos", cos), ("sin", sin)), inplace)  # addresses are not in the signature
        if value_checks and values_readable(cos):  # values are not in the signature either
            check_partial_rotary(cos, sin, layout, checked[0].shape[-1])
        cos, sin = half_view(cos, sin, layout, rotary_dim)
        return RopeArgs(checked, inplace, layout, rotary_dim, cos=cos, sin=sin, value_checks=value_checks)
    args = _check_tables(tensors, cos, sin, layout, rotary_dim, inplace)
    signatures.remember(key, args.layout, args.rotary_dim, args.value_checks)
    return args


def _check_tables(tensors: tuple[tuple[str, object], ...], cos: object, sin: object, layout: Layout | str,
                  rotary_dim: int | None, inplace: bool) -> RopeArgs:
    """Every check of :func:`args_for_tables`, raising the precise error."""
    layout = Layout.parse(layout)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    checked = []
    first_name = tensors[0][0]
    for name, t in tensors:
        t = _need_tensor(name, t)
        _need_x_dtype(name, t)
        if t.dim() < 1:
            raise ValueError(f"{name}: expected at least 1 dimension [..., head_dim], got a 0-d tensor")
        checked.append(t)
    x0 = checked[0]
    head_dim = x0.shape[-1]
    for (name, _), t in zip(tensors[1:], checked[1:]):
        if t.dtype != x0.dtype:
            raise TypeError(f"{name}: expected the dtype of {first_name} ({x0.dtype}), got {t.dtype}")
        _need_same_device(name, t, x0.device, first_name)
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name}: expected head_dim {head_dim} (that of {first_name}), got {t.shape[-1]}")
    named = tuple((name, t) for (name, _), t in zip(tensors, checked))
    need_distinct(named)
    asked_rotary_dim = rotary_dim
    rotary_dim = _rotary_dim(rotary_dim, head_dim)
    cos = _need_tensor("cos", cos)
    sin = _need_tensor("sin", sin)
    _need_same_device("cos", cos, x0.device, first_name)
    _need_same_device("sin", sin, x0.device, first_name)
    passed = (("cos", cos), ("sin", sin))
    cos, sin = _half_form(cos, sin, layout, rotary_dim)
    for (name, _), t in zip(tensors, checked):
        _need_broadcast("cos", cos.shape, (*t.shape[:-1], rotary_dim // 2), name)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError(
            "cos: expected cos/sin that do not require grad (gradients flow to the rotated tensors only), "
            "got cos/sin that require grad; pass cos.detach(), sin.detach()"
        )
    # a width that reads two ways (docs/errors.md, "partial rotary"): checked by value where reading costs no sync
    # (the width as passed: a duplicated full-rotation table is head_dim wide and reads one way only)
    value_checks = (asked_rotary_dim is None and head_dim % 4 == 0 and passed[0][1].shape[-1] == head_dim // 2
                    and values_readable(cos))
    if value_checks:
        check_partial_rotary(cos, sin, layout, head_dim)
    if inplace:
        for name, t in named:
            _no_grad_inplace(name, t)
            need_writable(name, t)
        need_apart(named, passed)
    return RopeArgs(tuple(checked), inplace, layout, rotary_dim, cos=cos, sin=sin, value_checks=value_checks)


def _pair_halves(t: Tensor, layout: Layout, w: int) -> tuple[Tensor, Tensor]:
    """The halves (neox) or the even and odd columns (interleaved) of the last dim, by views."""
    if layout is Layout.NEOX:
        return t.chunk(2, -1)
    return t.unflatten(-1, (w // 2, 2)).unbind(-1)


def check_partial_rotary(cos: Tensor, sin: Tensor, layout: Layout, head_dim: int) -> None:
    """cos/sin (half form as passed) of width ``head_dim // 2`` for a call without ``rotary_dim=``
    read as the half form of a full rotation; they may be meant as the duplicated form of
    ``rotary_dim = head_dim // 2`` (GLM-style partial rotary), which metadata cannot tell apart.
    A table whose halves (neox) or even/odd columns (interleaved) are equal, for cos and sin, and
    that rotates something (some sin != 0; cos = 1, sin = 0 gives the same result either way) is
    the duplicated form: ValueError naming cos. Reads the values (callers check values_readable)."""
    c, s = plain(cos), plain(sin)
    w = c.shape[-1]
    # it runs on every CPU call of this width: as few ops as possible, cos first (a half-form
    # table's halves differ there, which settles it)
    if not torch.equal(*_pair_halves(c, layout, w)):
        return
    if not torch.equal(*_pair_halves(s, layout, w)) or not bool(s.ne(0).any()):
        return
    pairs = "halves" if layout is Layout.NEOX else "even and odd columns"
    raise ValueError(
        f"cos: expected rotary_dim= for cos/sin of width head_dim//2={w} whose {pairs} are equal, got "
        f"rotary_dim=None; such a table is the duplicated form of a partial rotation (GLM-style), but without "
        f"rotary_dim it reads as the half form of a full one: pass rotary_dim={w} (rotate the first {w} dims) "
        f"or rotary_dim={head_dim} (a full rotation with this half-form table)"
    )


def check_position_range(positions: Tensor, cache: Tensor) -> None:
    """ValueError unless every position indexes a row of ``cache`` (reads the values: a sync on a
    device). Under vmap the check covers every sample."""
    positions = plain(positions)
    if positions.numel():
        lo, hi = (int(v) for v in torch.aminmax(positions))  # one pass (CPU: ~1 us less than min + max)
        if lo < 0 or hi >= cache.shape[0]:
            raise ValueError(
                f"positions: expected values in [0, {cache.shape[0]}) (cos_sin_cache rows), got min {lo}, max {hi}"
            )


def args_for_cached(
    q: object,
    k: object,
    positions: object,
    cos_sin_cache: object,
    layout: Layout | str,
    rotary_dim: int | None,
    mrope: MRope | Sequence[int] | None,
    inplace: bool,
    head_dim: int | None,
) -> tuple[RopeArgs, tuple[Tensor, ...]]:
    """Validate ``apply_cached``. Returns the args (q/k as ``[..., heads, head_dim]`` views) and
    the caller's original tensors, which are what the user gets back."""
    layout = Layout.parse(layout)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    q = _need_tensor("q", q)
    originals = [q]
    named = [("q", q)]
    if k is not None:
        k = _need_tensor("k", k)
        originals.append(k)
        named.append(("k", k))
    views = []
    for name, t in named:
        _need_x_dtype(name, t)
        if name == "k":
            if t.dtype != q.dtype:
                raise TypeError(f"k: expected the dtype of q ({q.dtype}), got {t.dtype}")
            _need_same_device("k", t, q.device, "q")
        if t.dim() == 2:  # vLLM style [T, heads * head_dim]
            if head_dim is None:
                raise ValueError(
                    f"head_dim: expected an int when {name} is 2-D [tokens, heads*head_dim], got None"
                )
            if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
                raise ValueError(f"head_dim: expected a positive int, got {head_dim!r}")
            if t.shape[1] % head_dim:
                raise ValueError(
                    f"{name}: expected last dim divisible by head_dim={head_dim}, got {t.shape[1]}"
                )
            t = t.view(t.shape[0], t.shape[1] // head_dim, head_dim)
        elif t.dim() < 3:
            raise ValueError(
                f"{name}: expected [tokens, heads*head_dim] or [..., tokens, heads, head_dim], got shape {tuple(t.shape)}"
            )
        elif head_dim is not None and t.shape[-1] != head_dim:
            raise ValueError(f"head_dim: expected {t.shape[-1]} (the last dim of {name}), got {head_dim}")
        views.append(t)
    if len(views) == 2:
        if views[1].shape[-1] != views[0].shape[-1]:
            raise ValueError(f"k: expected head_dim {views[0].shape[-1]} (that of q), got {views[1].shape[-1]}")
        if views[1].shape[:-2] != views[0].shape[:-2]:
            raise ValueError(
                f"k: expected leading dims {tuple(views[0].shape[:-2])} (those of q), got {tuple(views[1].shape[:-2])}"
            )
        need_distinct((("q", views[0]), ("k", views[1])))
    lead = tuple(views[0].shape[:-2])
    cache = _need_tensor("cos_sin_cache", cos_sin_cache)
    if cache.dtype not in COS_DTYPES:
        raise TypeError(f"cos_sin_cache: expected a floating dtype, got {cache.dtype}")
    if cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected shape [max_position, rotary_dim], got {tuple(cache.shape)}")
    _need_same_device("cos_sin_cache", cache, q.device, "q")
    if torch.is_grad_enabled() and cache.requires_grad:
        raise ValueError(
            "cos_sin_cache: expected a cache that does not require grad (gradients flow to q and k only), got "
            "one that requires grad (e.g. an nn.Parameter); pass cos_sin_cache.detach() or call under torch.no_grad()"
        )
    if rotary_dim is not None and rotary_dim != cache.shape[1]:
        raise ValueError(
            f"rotary_dim: expected cos_sin_cache.shape[1]={cache.shape[1]} (or None), got {rotary_dim}"
        )
    rotary_dim = _rotary_dim(cache.shape[1], views[0].shape[-1], "cos_sin_cache.shape[1] (rotary_dim)")
    mrope = MRope.parse(mrope)
    if mrope is not None and len(mrope.axis_map) != rotary_dim // 2:
        raise ValueError(
            f"mrope: expected an axis map of length rotary_dim//2={rotary_dim // 2}, got {len(mrope.axis_map)}"
        )
    positions = _need_tensor("positions", positions)
    if positions.dtype not in INT_DTYPES:
        raise TypeError(f"positions: expected an integer dtype (int64/int32/...), got {positions.dtype}")
    _need_same_device("positions", positions, q.device, "q")
    if tuple(positions.shape) == lead:
        pass  # one position per token (with mrope: text-only input, all rows equal)
    elif mrope is not None and tuple(positions.shape) == (3, *lead):
        pass
    else:
        want = f"{lead}" + (f" or {(3, *lead)}" if mrope is not None else "")
        hint = "" if mrope is not None or positions.shape[:1] != (3,) else " (3-row positions need mrope=)"
        raise ValueError(f"positions: expected shape {want}, got {tuple(positions.shape)}{hint}")
    # a data-dependent check cannot be traced: under torch.compile, make_fx or fake tensors the
    # custom op makes it when it runs on real tensors (ops.py)
    if position_range_checked(positions) and not torch.compiler.is_compiling() and not traced():
        check_position_range(positions, cache)
    if inplace:
        named_views = tuple((name, t) for (name, _), t in zip(named, views))
        for name, t in named_views:
            _no_grad_inplace(name, t)
            need_writable(name, t)
        need_apart(named_views, (("positions", positions), ("cos_sin_cache", cache)))
    args = RopeArgs(
        tuple(views), inplace, layout, rotary_dim,
        positions=positions, cache=cache, mrope=mrope,
    )
    return args, tuple(originals)
