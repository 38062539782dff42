"""Per-instance redirection of one named call inside a model's function, by rewriting a copy of it.

A model library calls its rotary function by name from inside a method: transformers'
``LlamaAttention.forward`` calls the module global ``apply_rotary_pos_emb``; diffusers' processors
call a module global, a name imported inside ``__call__`` (``from ..embeddings import
apply_rotary_emb``) or a function defined inside ``__call__`` (Wan). :func:`redirect` returns a
*copy* of such a method in which those references lead to a replacement instead:

    LOAD_GLOBAL name          -> LOAD_GLOBAL alias    (alias: a new global of the method's module)
    from M import name        -> from M import alias  (alias: a new attribute of module M)
    def name(...) nested      -> def name(*a, **kw): return alias(*a, **kw)   (alias: a new global)

The model's module keeps its own ``name``: every other caller -- other instances, other models of
the same family, other libraries -- still gets the original. Only the patched instances hold the
copy (see ``_patching.py``). The aliases are plain module attributes, so ``torch.compile`` guards
them like any global and the copy compiles like the original.

This module must not modify a function, a code object or an existing module attribute, and must
not guess: a reference it cannot redirect unambiguously raises :class:`RewriteError`.
"""

from __future__ import annotations

import dis
import importlib.util
import re
import sys
import threading
import types
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

__all__ = ["RewriteError", "Site", "rotary_names", "find_sites", "redirect", "Aliases"]

_GLOBAL_OPS = frozenset({"LOAD_GLOBAL"})
_IMPORT_OPS = frozenset({"IMPORT_FROM"})
_NAME_OPCODES = frozenset(dis.hasname)  # opcodes whose argument indexes co_names


class RewriteError(ValueError):
    """A function whose rotary call cannot be redirected without guessing."""


@dataclass(frozen=True)
class Site:
    """One way a function reaches a rotary function by name.

    kind       ``"global"`` (module global), ``"import"`` (``from M import name`` inside the body)
               or ``"nested"`` (``def name`` inside the body)
    name       the name the code uses
    original   the function that name resolves to today
    namespace  the dict the alias goes into: the function's module globals (global, nested) or
               the imported module's ``__dict__`` (import)
    """

    kind: str
    name: str
    original: Callable
    namespace: dict

    @property
    def module(self) -> str:
        """``module:qualname`` of the original, as its library defines it."""
        return f"{getattr(self.original, '__module__', '?')}:{getattr(self.original, '__qualname__', self.name)}"


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and every code object nested in it (inner defs, lambdas, comprehensions)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _innermost(fn: Callable) -> Callable:
    """The function that ``functools.wraps`` decorators wrap (itself when undecorated)."""
    seen = set()
    while hasattr(fn, "__wrapped__") and id(fn) not in seen:
        seen.add(id(fn))
        fn = fn.__wrapped__
    return fn


def _plain(fn: object, what: str) -> types.FunctionType:
    fn = getattr(fn, "__func__", fn)  # a bound or class-level method: its function
    if not isinstance(fn, types.FunctionType):
        raise RewriteError(f"{what}: expected a Python function, got {type(fn).__name__}")
    return fn


def _import_source(code: types.CodeType, index: int, package: str | None) -> str | None:
    """The absolute module name of the ``IMPORT_NAME`` that feeds the ``IMPORT_FROM`` at
    instruction ``index`` (``from ..embeddings import x`` -> ``diffusers.models.embeddings``)."""
    ins = list(dis.get_instructions(code))
    for j in range(index - 1, -1, -1):
        if ins[j].opname == "IMPORT_NAME":
            consts = [i.argval for i in ins[max(0, j - 2):j] if i.opname == "LOAD_CONST"]
            level = consts[0] if len(consts) == 2 and isinstance(consts[0], int) else 0
            name = ins[j].argval
            if level:
                if not package:
                    return None
                return importlib.util.resolve_name("." * level + name, package)
            return name
    return None


# a name part "rotary", "rope" or "rotate": apply_rotary_pos_emb, apply_rotary_emb, rotate_half, rope_apply
_ROTARY_NAME = re.compile(r"(^|_)(rotary|rope|rotate)(_|$)")


def rotary_names(fn: Callable) -> set[str]:
    """Names of rotary-looking functions ``fn``'s code reaches by name (a global, an import
    inside the body, a nested def), through its ``functools.wraps`` chain. Attribute names
    (``self.rotary_emb``) are not names a code object *calls by name*, so they are not listed."""
    target = _innermost(getattr(fn, "__func__", fn))
    code = getattr(target, "__code__", None)
    names: set[str] = set()
    if code is None:
        return names
    for c in _codes(code):
        for inst in dis.get_instructions(c):
            if inst.opname in _GLOBAL_OPS | _IMPORT_OPS and isinstance(inst.argval, str) \
                    and _ROTARY_NAME.search(inst.argval.lower()):
                names.add(inst.argval)
        for const in c.co_consts:
            if isinstance(const, types.CodeType) and _ROTARY_NAME.search(const.co_name.lower()):
                names.add(const.co_name)
    return names


def find_sites(fn: Callable, names: set[str] | frozenset[str]) -> list[Site]:
    """Where ``fn`` (through its ``functools.wraps`` chain and nested code) reaches one of
    ``names``. Empty when it reaches none. Raises :class:`RewriteError` when a name is used in a
    way this module cannot redirect (e.g. also as an attribute name in the same code object)."""
    sites: dict[tuple[str, str], Site] = {}
    target = _plain(_innermost(_plain(fn, "fn")), "fn")
    g = target.__globals__
    for code in _codes(target.__code__):
        ins = list(dis.get_instructions(code))
        for i, inst in enumerate(ins):
            if inst.opname in _GLOBAL_OPS and inst.argval in names:
                original = g.get(inst.argval)
                if not callable(original):
                    continue  # not bound in the module: nothing of a known library to replace
                sites[("global", inst.argval)] = Site("global", inst.argval, original, g)
            elif inst.opname in _IMPORT_OPS and inst.argval in names:
                source = _import_source(code, i, g.get("__package__"))
                module = sys.modules.get(source) if source else None
                if module is None or not callable(getattr(module, inst.argval, None)):
                    raise RewriteError(f"{target.__qualname__}: cannot resolve 'from ... import {inst.argval}'")
                sites[("import", inst.argval)] = Site("import", inst.argval, getattr(module, inst.argval),
                                                      module.__dict__)
        for const in code.co_consts:
            if isinstance(const, types.CodeType) and const.co_name in names:
                if const.co_freevars:
                    raise RewriteError(f"{target.__qualname__}: nested {const.co_name} is a closure")
                original = types.FunctionType(const, g, const.co_name)
                sites[("nested", const.co_name)] = Site("nested", const.co_name, original, g)
    found = {}
    for s in sites.values():
        if s.kind in ("global", "import"):
            if found.setdefault(s.name, s.kind) != s.kind:
                raise RewriteError(f"{target.__qualname__}: {s.name!r} is both a global and an import")
    for code in _codes(target.__code__):
        for inst in dis.get_instructions(code):
            # co_names is shared by globals, attributes and imports: renaming one renames all
            if inst.opcode in _NAME_OPCODES and inst.argval in found and inst.opname not in _GLOBAL_OPS | _IMPORT_OPS:
                raise RewriteError(f"{target.__qualname__}: {inst.argval!r} is also used by {inst.opname}")
    return list(sites.values())


def _trampoline(alias: str, like: types.CodeType) -> types.CodeType:
    """Code for ``def <like.co_name>(*args, **kwargs): return <alias>(*args, **kwargs)``."""
    def _proxy(*args, **kwargs):
        return _ROPE_BACKENDS_ALIAS(*args, **kwargs)  # noqa: F821  (renamed below)

    code = _proxy.__code__
    names = tuple(alias if n == "_ROPE_BACKENDS_ALIAS" else n for n in code.co_names)
    fields = dict(co_names=names, co_name=like.co_name, co_filename=like.co_filename,
                  co_firstlineno=like.co_firstlineno)
    if hasattr(code, "co_qualname"):
        fields["co_qualname"] = like.co_qualname
    return code.replace(**fields)


def _rewrite_code(code: types.CodeType, renames: Mapping[str, str], nested: Mapping[str, str]) -> types.CodeType:
    names = tuple(renames.get(n, n) for n in code.co_names)
    consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            const = _trampoline(nested[const.co_name], const) if const.co_name in nested else \
                _rewrite_code(const, renames, nested)
        consts.append(const)
    return code.replace(co_names=names, co_consts=tuple(consts))


def _copy(fn: types.FunctionType, code: types.CodeType, closure: tuple | None) -> types.FunctionType:
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new.__annotations__ = dict(getattr(fn, "__annotations__", {}) or {})
    return new


def _cell_value(cell: object) -> object:
    try:
        return cell.cell_contents  # type: ignore[attr-defined]
    except ValueError:  # an empty cell
        return None


def redirect(fn: Callable, aliases: Mapping[tuple[str, str], str]) -> types.FunctionType:
    """A copy of ``fn`` whose sites ``(kind, name)`` use the alias names given (see
    :func:`find_sites`). Decorators made with ``functools.wraps`` are copied too, each holding
    the copied function it wraps, so they keep doing what they did. The aliases must already be
    bound (:class:`Aliases`) before the copy runs."""
    fn = _plain(fn, "fn")
    renames = {name: alias for (kind, name), alias in aliases.items() if kind in ("global", "import")}
    nested = {name: alias for (kind, name), alias in aliases.items() if kind == "nested"}
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return _copy(fn, _rewrite_code(fn.__code__, renames, nested), fn.__closure__)
    inner = _plain(inner, f"{fn.__qualname__}.__wrapped__")
    cells = fn.__closure__ or ()
    holding = [i for i, c in enumerate(cells) if _cell_value(c) is inner]
    if len(holding) != 1:
        raise RewriteError(
            f"{fn.__qualname__}: a decorator that does not hold the function it wraps in one closure cell; "
            f"cannot copy it")
    new_inner = redirect(inner, aliases)
    closure = tuple(types.CellType(new_inner) if i == holding[0] else c for i, c in enumerate(cells))
    new = _copy(fn, fn.__code__, closure)
    new.__wrapped__ = new_inner
    return new


class Aliases:
    """The alias attributes that redirected copies read: bound on first use and kept. They are
    private names (``_rope_backends__...``) that no code of the library reads, holding stateless
    replacements; keeping them means a copy of a patched model (``copy.deepcopy``) still runs
    after the patch itself is undone. Everything a patch set on the *model* is given back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def bind(self, namespace: dict, alias: str, value: Callable) -> None:
        if not alias.startswith("_rope_backends__"):
            raise RewriteError(f"{alias}: expected a private _rope_backends__ name")
        with self._lock:
            if namespace.get(alias) is not value:
                namespace[alias] = value  # a newer replacement of the same function: equivalent
