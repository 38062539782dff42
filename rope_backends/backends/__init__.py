"""Built-in backends, then plug-ins from the ``rope_backends.backends`` entry-point group.

Each built-in module ends with one ``register_backend(Backend(...))`` call. A plug-in's entry
point names a module (or a callable) that does the same. A plug-in that fails to load is
recorded in ``plugin_errors`` and logged; it never breaks ``import rope_backends``.

This module is also callable, for one release: ``rope_backends.backends()`` was the listing
function before :func:`rope_backends.list_backends`, and its name is this subpackage's. Calling
the module warns (DeprecationWarning) and returns ``list_backends()``.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
import warnings
from importlib.metadata import entry_points

from . import eager  # noqa: F401  (registers "eager")
from . import npu  # noqa: F401  (registers "npu"; torch_npu is imported only by its probe)
from . import triton  # noqa: F401  (registers "triton"; triton is imported only by its probe)

log = logging.getLogger("rope_backends")

GROUP = "rope_backends.backends"
plugin_errors: dict[str, str] = {}


def load_plugins() -> None:
    for ep in entry_points(group=GROUP):
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type(importlib)):
                loaded()
        except Exception as exc:  # reported by rb.backends() users via plugin_errors and the log
            plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning("rope_backends: plug-in %r failed to load: %s", ep.name, exc)


load_plugins()


class _CallableModule(types.ModuleType):
    """This subpackage, callable as the deprecated ``rope_backends.backends()``."""

    def __call__(self):
        warnings.warn("rope_backends.backends() is deprecated and will be removed in the next release: "
                      "call rope_backends.list_backends() (the same list)", DeprecationWarning, stacklevel=2)
        from ..registry import list_backends

        return list_backends()


sys.modules[__name__].__class__ = _CallableModule
