"""The conformance suite, shipped inside the package so any machine and any plug-in backend runs
the same checks: ``python -m rope_backends check`` or the repository's pytest suite.

    from rope_backends.testing import sample_cases, check_case
    for case in sample_cases():
        check_case(case, "mybackend", "cuda")      # raises AssertionError on any bit difference

- :mod:`.cases`   the cases as data (``sample_cases``, ``interp_cases``, ``reference_cases``,
                  ``error_cases``)
- :mod:`.make`    tensor factories (canary-padded buffers, strided views, fused qkv, special values)
- :mod:`.check`   ``assert_bitwise_equal``: raw bits, all NaNs equal, first differing element
- :mod:`.runner`  targets (backend x device here), ``check_case``, ``check_error_case``, ``run_target``

Nothing here may change what a backend computes, skip a case for a backend, or compare with a
tolerance.
"""

from .cases import (
    ErrorCase,
    RopeCase,
    cases_for,
    error_cases,
    interp_cases,
    reference_cases,
    sample_cases,
)
from .check import assert_bitwise_equal, bits
from .runner import Target, check_case, check_error_case, run_target, targets

__all__ = [
    "RopeCase",
    "ErrorCase",
    "sample_cases",
    "interp_cases",
    "reference_cases",
    "error_cases",
    "cases_for",
    "assert_bitwise_equal",
    "bits",
    "Target",
    "targets",
    "check_case",
    "check_error_case",
    "run_target",
]
