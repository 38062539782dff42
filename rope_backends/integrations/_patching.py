"""The patch handle and the bookkeeping that makes patches stack and undo exactly.

A patch is a list of :class:`Edit` s, each replacing one attribute of one object (an attention
module's ``forward``, a rotary module's ``forward``, a diffusers attention module's ``processor``)
and binding the alias globals its new value reads (``_rewrite.Aliases``). Edits are counted per
(object, attribute): patching a model twice shares the edit, and the object gets its original
attribute back -- present or absent, the same object -- when the last patch holding it is undone,
in any order. Two patches that would set different values on the same attribute conflict: the
second raises before changing anything.

This module knows no model library; it must not import transformers or diffusers.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from ._rewrite import Aliases

__all__ = ["Edit", "Patch", "ALIASES", "MISSING", "apply_edits", "unpatched", "patched_value"]

ALIASES = Aliases()
_LOCK = threading.RLock()
_MISSING = MISSING = object()


@dataclass
class _Record:
    """The live state of one patched attribute."""

    original: object  # the value in the object's __dict__ before the first patch, or _MISSING
    value: object
    key: Hashable
    what: str
    count: int = 0


# object -> {attribute: record}; weak, so a patched model that is dropped takes its records along
_RECORDS: "weakref.WeakKeyDictionary[object, dict[str, _Record]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Edit:
    """Set ``obj.<attr> = make()`` while patched.

    key      what this edit means (equal keys: the same patch, shared; different keys on one
             attribute: a conflict)
    make     builds the new value (called only when the attribute is not patched yet)
    aliases  ``(namespace, alias, value)`` bindings the new value reads, bound before it is set
    what     for messages: e.g. ``"model.layers.0.self_attn.forward"``
    """

    obj: object
    attr: str
    key: Hashable
    make: Callable[[], object]
    aliases: tuple[tuple[dict, str, Callable], ...] = ()
    what: str = ""


def _own(obj: object, attr: str) -> object:
    return vars(obj).get(attr, _MISSING)


def apply_edits(edits: Sequence[Edit]) -> list[tuple[weakref.ref, str]]:
    """Apply ``edits`` (all or none): returns the (object, attribute) pairs now held."""
    with _LOCK:
        for e in edits:  # first every check, so a conflict changes nothing
            rec = _RECORDS.get(e.obj, {}).get(e.attr)
            if rec is not None and rec.key != e.key:
                raise ValueError(
                    f"model: {e.what or e.attr} is already patched differently ({rec.key!r}, asked {e.key!r}); "
                    f"undo that patch first")
        done: list[tuple[object, str]] = []
        try:
            for e in edits:
                records = _RECORDS.setdefault(e.obj, {})
                rec = records.get(e.attr)
                if rec is None:
                    value = e.make()
                    for namespace, alias, target in e.aliases:
                        ALIASES.bind(namespace, alias, target)
                    original = _own(e.obj, e.attr)
                    setattr(e.obj, e.attr, value)
                    rec = records[e.attr] = _Record(original, value, e.key, e.what)
                rec.count += 1
                done.append((e.obj, e.attr))
        except BaseException:
            for obj, attr in reversed(done):
                _release(obj, attr)
            raise
        return [(weakref.ref(obj), attr) for obj, attr in done]


def _release(obj: object, attr: str) -> None:
    records = _RECORDS.get(obj)
    rec = records.get(attr) if records else None
    if rec is None:
        return
    rec.count -= 1
    if rec.count > 0:
        return
    del records[attr]
    if not records:
        del _RECORDS[obj]
    if rec.original is _MISSING:
        if _own(obj, attr) is rec.value:
            delattr(obj, attr)
    else:
        setattr(obj, attr, rec.original)


def unpatched(obj: object, attr: str) -> object:
    """``obj``'s own ``attr`` as it was before any patch (``MISSING`` when the object had none of
    its own, i.e. its class's applies)."""
    with _LOCK:
        rec = _RECORDS.get(obj, {}).get(attr)
        return _own(obj, attr) if rec is None else rec.original


def patched_value(obj: object, attr: str) -> tuple[object, int] | None:
    """(the patched value, how many patches hold it), or None when ``obj.attr`` is not patched."""
    with _LOCK:
        rec = _RECORDS.get(obj, {}).get(attr)
        return None if rec is None else (rec.value, rec.count)


@dataclass(eq=False)
class Patch:
    """What one ``patch(model)`` call changed. ``undo()`` gives it back (a second ``undo`` does
    nothing); ``with patch(model):`` undoes on exit.

    library    ``"transformers"`` or ``"diffusers"``
    families   the model families routed through rope_backends, e.g. ``("llama",)``
    modules    qualified names of the submodules whose rotary call was redirected
    tables     ``"model"`` (the model's own cos/sin) or ``"rb"`` (rope_backends' tables)
    """

    library: str
    families: tuple[str, ...]
    modules: tuple[str, ...]
    tables: str = "model"
    _held: list = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        """True until :meth:`undo`."""
        return bool(self._held)

    def undo(self) -> None:
        """Give back what this patch holds: each attribute returns to its original once no other
        patch holds it. Safe to call twice."""
        with _LOCK:
            held, self._held = self._held, []
            for ref, attr in reversed(held):
                obj = ref()
                if obj is not None:
                    _release(obj, attr)

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return (f"Patch({self.library}: {', '.join(self.families)}; {len(self.modules)} modules; "
                f"tables={self.tables!r}; {state})")
