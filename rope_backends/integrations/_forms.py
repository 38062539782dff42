"""What every replacement of a library's rotary function shares: the self-check against the
original, and the gradient layout.

A *form* is one signature of a library's rotary function and the rope_backends function that
computes the same thing. Before a form replaces a function, :func:`verify` runs both on small
float32 CPU inputs and compares the bits (and the result dtypes), once per function object: a
library version that changed its formula is refused instead of silently computing something else.

Must not import a model library.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

import rope_backends as _rb

__all__ = ["RB_DTYPES", "Form", "verify", "contiguous_grads", "angles"]

#: the dtypes rope_backends rotates (anything else goes back to the library's own function)
RB_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Form:
    """One library rotary-function signature and its rope_backends replacement.

    params  the original's parameter names, checked before patching
    make    ``make(original, **options) -> replacement`` with the original's signature
    probe   ``probe() -> [(args, kwargs), ...]``: CPU inputs on which the replacement must give
            the original's results and dtypes bit for bit (float32; mixed bf16 inputs with float32
            tables, where the library computes in float32 too). A probe entry ``(args, kwargs,
            "optional")`` is skipped when the original cannot take it (e.g. a partial rotation for a
            function that rotates all of head_dim)
    """

    name: str
    params: tuple[str, ...]
    make: Callable[..., Callable]
    probe: Callable[[], list]


_VERIFIED: dict[tuple, tuple[Callable, Optional[str]]] = {}
_LOCK = threading.Lock()


_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(_INT[t.dtype]) if t.dtype in _INT else t


def _why_not(original: Callable, form: Form, options: dict) -> Optional[str]:
    try:
        params = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        params = ()
    if params != form.params:
        return f"its parameters are {params}, rope_backends replaces {form.params}"
    fn = form.make(original, **options)
    with _rb.use_backend("eager"):  # the reference: a registered backend must not see the check
        for args, kwargs, *optional in form.probe():
            try:
                want = original(*args, **kwargs)
            except (RuntimeError, ValueError, TypeError, IndexError):
                if optional:
                    continue
                return "it fails on a probe input rope_backends takes"
            got = fn(*args, **kwargs)
            want = want if isinstance(want, tuple) else (want,)
            got = got if isinstance(got, tuple) else (got,)
            if len(want) != len(got) or not all(
                    w.dtype == g.dtype and w.shape == g.shape and torch.equal(_bits(w), _bits(g))
                    for w, g in zip(want, got)):
                return "its results differ from rope_backends' on a probe input"
    return None


def verify(original: Callable, form: Form, where: str, library: str, key: object = None, **options) -> None:
    """Raise ``ValueError`` unless ``form`` reproduces ``original`` (checked once per function;
    ``key`` identifies functions re-created per call, e.g. nested ones, by their code)."""
    key = (key if key is not None else id(original), form.name)
    with _LOCK:
        entry = _VERIFIED.get(key)
    if entry is None or (key[0] == id(original) and entry[0] is not original):
        entry = (original, _why_not(original, form, options))
        with _LOCK:
            _VERIFIED[key] = entry
    if entry[1] is not None:
        name = f"{getattr(original, '__module__', '?')}.{getattr(original, '__qualname__', '?')}"
        raise ValueError(f"model: {where} calls {name}, which this {library} version changed ({entry[1]}); "
                         f"rope_backends does not patch it")


def _contiguous(grad: Tensor) -> Tensor:
    return grad.contiguous()


def contiguous_grads(*outs: Tensor) -> None:
    """Make the gradients that reach a rotation's inputs contiguous, as the library's own are where
    its rotate-half / pair split backpropagates through slices or unbind (zeros of the input's
    shape accumulated in place, or a stack), whereas rope_backends' backward keeps the upstream
    gradient's strides. Same values; but a later reduction (e.g. a q_norm weight gradient) sums
    in memory order, so the layout decides its last bits. Eager only: under torch.compile the
    compiler picks layouts anyway."""
    if torch.compiler.is_compiling():
        return
    for out in outs:
        if out.requires_grad:
            out.register_hook(_contiguous)


def angles(*shape: int, seed: int) -> tuple[Tensor, Tensor]:
    """cos, sin of random angles (probe inputs)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*shape, generator=g) * 3
    return a.cos(), a.sin()
