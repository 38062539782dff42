"""Built-in backends, then plug-ins from the ``rope_backends.backends`` entry-point group.

Each built-in module ends with one ``register_backend(Backend(...))`` call. A plug-in's entry
point names a module (or a callable) that does the same. A plug-in that fails to load is
recorded in ``plugin_errors`` and logged; it never breaks ``import rope_backends``.
"""

from __future__ import annotations

import importlib
import logging
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
