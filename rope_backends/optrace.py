"""Deprecated alias of :mod:`rope_backends.testing.optrace` (the op recorder is a test tool).

Importing it warns ``DeprecationWarning``; it will be removed in the release after next. It
re-exports the public names only and holds no code of its own.
"""

from __future__ import annotations

import warnings

from .testing.optrace import *  # noqa: F401,F403
from .testing.optrace import __all__  # noqa: F401

warnings.warn("rope_backends.optrace moved to rope_backends.testing.optrace; the old name will be removed "
              "in the release after next", DeprecationWarning, stacklevel=2)
