"""Deprecated alias of :mod:`rope_backends.benchmark` (the engine is now a subpackage of small modules).

Importing it warns ``DeprecationWarning``; it will be removed in the release after next. It
re-exports the old module's public names from their new homes and holds no code of its own;
its private helpers (``_impls``, ``_run_case``, ...) are gone.
"""

from __future__ import annotations

import warnings

from .benchmark import *  # noqa: F401,F403
from .benchmark import __all__ as _new_all
from .benchmark.baselines import SAME_BYTES_COPY, TORCH_AUTOGRAD_OP, TORCH_OP  # noqa: F401
from .benchmark.engine import Progress  # noqa: F401
from .benchmark.implementations import Options  # noqa: F401
from .benchmark.machine import device_label  # noqa: F401
from .benchmark.scenarios import (  # noqa: F401
    BACKWARD_SHAPES, DECODE_GRAPH_MAX_T, DIFFUSION_NAMES, DIFFUSION_SHAPES, LLM_HEADS, LLM_TOKENS, MROPE_TOKENS,
    QK_SHAPES, Case, Impl, Skip,
)
from .benchmark.targets import (  # noqa: F401
    CACHED_SAME_BYTES_TARGET, DIFFUSION_LARGE_TARGET, HOST_TARGETS, SAME_BYTES_TARGET,
)
from .benchmark.timing import Clock  # noqa: F401

__all__ = list(_new_all)

warnings.warn("rope_backends.benchmarking moved to rope_backends.benchmark (python -m rope_backends bench); "
              "the old name will be removed in the release after next", DeprecationWarning, stacklevel=2)
