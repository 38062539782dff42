"""pytest wiring: backends x cases from the shipped suite (rope_backends.testing).

Every registered backend becomes a parameter on every device type it can serve here
(``runner.targets()``); one that cannot run here is still listed, as a parameter skipped by its
availability mark with the reason -- that is the backend-availability parameter, not a skip in a
test. Which cases a target runs is data (``cases.cases_for``: targets named in ``cases.REDUCED_TIERS`` get the
reduced ``interp_cases()`` tier, ``--full`` gives ``reference_cases()``).

Options: ``--backend NAME`` (repeatable: only these backends), ``--device TYPE`` (only this
device type), ``--full`` (the exhaustive tier). Device-bound cases carry the ``gpu``/``multigpu``
marks and run only where such devices exist.

The NPU backend's code runs on CPU tensors here: ``ROPE_BACKENDS_SIMULATE_NPU=1`` is set before
rope_backends is imported (an explicit value in the environment wins).
"""

from __future__ import annotations

import os

os.environ.setdefault("ROPE_BACKENDS_SIMULATE_NPU", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rope_backends  # noqa: E402,F401  (registers the backends after the environment is set)
from rope_backends.testing import cases as _cases  # noqa: E402
from rope_backends.testing import runner  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("rope_backends")
    group.addoption("--backend", action="append", default=None, metavar="NAME",
                    help="run the backend-parametrised tests for this backend only (repeatable)")
    group.addoption("--device", default=None, metavar="TYPE", help="only targets on this device type (cpu, cuda, npu)")
    group.addoption("--full", action="store_true", default=False, help="the exhaustive tier: reference_cases()")


def pytest_configure(config):
    for line in ("gpu: needs a CUDA/ROCm device", "multigpu: needs two GPUs",
                 "large: more than 2**31 elements (needs tens of GB of device memory)"):
        config.addinivalue_line("markers", line)
    # the Triton interpreter evaluates kernels with numpy, which warns on the inf/NaN arithmetic
    # the special-value cases do on purpose (results are compared bit for bit regardless)
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


def _targets(config) -> list[runner.Target]:
    try:
        return runner.targets(config.getoption("--backend"), config.getoption("--device"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def _target_marks(t: runner.Target) -> list:
    return [pytest.mark.skipif(not t.runnable, reason=t.reason or "")]


def _case_marks(case: _cases.RopeCase, t: runner.Target) -> list:
    marks = [getattr(pytest.mark, m) for m in case.marks]
    if t.runnable:
        dev, why = runner.case_device(case, t.device)
        if dev is None:
            marks.append(pytest.mark.skipif(True, reason=why))
    return marks


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "target" not in names:
        return
    config = metafunc.config
    tgts = _targets(config)
    if "case" in names:
        params = []
        for t in tgts:
            for case in _cases.cases_for(t.backend, torch.device(t.device).type, config.getoption("--full")):
                params.append(pytest.param(t, case, id=f"{t.id}-{case.name}", marks=_target_marks(t) + _case_marks(case, t)))
        metafunc.parametrize(("target", "case"), params)
    elif "error_case" in names:
        params = []
        for t in tgts:
            for ec in _cases.error_cases():
                marks = _target_marks(t)
                kind = torch.device(t.device).type
                if ec.device_types is not None and kind not in ec.device_types:
                    marks.append(pytest.mark.skipif(True, reason=f"{ec.name} applies on {ec.device_types} only"))
                params.append(pytest.param(t, ec, id=f"{t.id}-{ec.name}", marks=marks))
        metafunc.parametrize(("target", "error_case"), params)
    else:
        metafunc.parametrize("target", [pytest.param(t, id=t.id, marks=_target_marks(t)) for t in tgts])


@pytest.fixture
def runnable_targets(request) -> list[runner.Target]:
    """Every target that can run here (after --backend/--device)."""
    return [t for t in _targets(request.config) if t.runnable]
