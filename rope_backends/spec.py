"""Compatibility: the names ``rope_backends.spec`` held before it was split, re-exported.

``spec`` used to hold the contract types, the validation, the memory rules, the validated-signature
cache and the mode probes in one file. They now live in modules with one job each:

    contract.py    Layout, MRope, RopeArgs, the dtype sets, half_view
    validation.py  args_for_tables, args_for_cached, check_partial_rotary, check_position_range
    memory.py      self_overlap, shared_memory, check_memory, memory_guard, extent
    signatures.py  the cache of validated table-call signatures
    modes.py       debug_checks, traced, values_readable, plain, ... (what a call runs under)

This module stays as a plain re-export of their public names (no warning): plug-ins and scripts
import ``Layout``, ``RopeArgs`` and the ``args_for_*`` builders from it. New code imports from
the modules above. It defines nothing and must not grow.
"""

from __future__ import annotations

from .contract import COS_DTYPES, INT_DTYPES, X_DTYPES, Layout, MRope, RopeArgs, half_view
from .memory import check_memory, extent, memory_guard, self_overlap, shared_memory
from .modes import (debug_checks, dispatch_modes, functorch_transform, jit_trace_state, plain,
                    position_range_checked, traced, values_readable)
from .validation import args_for_cached, args_for_tables, check_partial_rotary, check_position_range

__all__ = [
    "Layout", "MRope", "RopeArgs", "X_DTYPES", "COS_DTYPES", "INT_DTYPES", "half_view",
    "args_for_tables", "args_for_cached", "check_partial_rotary", "check_position_range",
    "check_memory", "memory_guard", "extent", "self_overlap", "shared_memory",
    "debug_checks", "dispatch_modes", "functorch_transform", "jit_trace_state", "plain",
    "position_range_checked", "traced", "values_readable",
]
