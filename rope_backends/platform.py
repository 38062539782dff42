"""Deprecated alias of :mod:`rope_backends.environment` (the name shadowed the standard
library's ``platform``), kept for one release.

Importing it warns (DeprecationWarning) and makes ``rope_backends.platform`` the very module
``rope_backends.environment``: every name, and every ``monkeypatch`` of one, is shared. Nothing
inside rope_backends imports it.
"""

from __future__ import annotations

import sys
import warnings

from . import environment

warnings.warn("rope_backends.platform is deprecated and will be removed in the next release: "
              "import rope_backends.environment (the same functions)", DeprecationWarning, stacklevel=2)

sys.modules[__name__] = environment
