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

Shared fixtures: ``fakes`` (counting backends registered for a test and removed after it) and
``fake_gpus`` (torch.cuda pretending to see GPUs). Markers and warning filters are declared once,
in pyproject.toml ([tool.pytest.ini_options]).
"""

from __future__ import annotations

import os
from collections import Counter

os.environ.setdefault("ROPE_BACKENDS_SIMULATE_NPU", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rope_backends  # noqa: E402  (registers the backends after the environment is set)
from rope_backends import reference  # noqa: E402
from rope_backends.registry import Backend  # noqa: E402
from rope_backends.testing import cases as _cases  # noqa: E402
from rope_backends.testing import runner  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("rope_backends")
    group.addoption("--backend", action="append", default=None, metavar="NAME",
                    help="run the backend-parametrised tests for this backend only (repeatable)")
    group.addoption("--device", default=None, metavar="TYPE", help="only targets on this device type (cpu, cuda, npu)")
    group.addoption("--full", action="store_true", default=False, help="the exhaustive tier: reference_cases()")


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


class Fakes:
    """Registers counting backends (forward = the reference) and removes them afterwards."""

    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.names: list[str] = []

    def add(self, name, device_types=("cpu",), priority=50, **kw):
        def forward(args, _name=name):
            self.calls[_name] += 1
            return reference.run(args)

        rope_backends.register_backend(Backend(name=name, device_types=tuple(device_types), priority=priority, forward=forward, **kw))
        self.names.append(name)
        return name

    def remove(self, name):
        rope_backends.unregister_backend(name)
        self.names.remove(name)

    def cleanup(self):
        for n in list(self.names):
            self.remove(n)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.delenv("ROPE_BACKEND", raising=False)
    f = Fakes()
    yield f
    f.cleanup()


@pytest.fixture
def fake_gpus(monkeypatch):
    """``fake_gpus(n=2, name="Fake GPU")``: torch.cuda reports ``n`` devices named ``"{name} {i}"``."""
    def install(n=2, name="Fake GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"{name} {i}")
    return install
