"""The declared support floors (pyproject.toml) are the ones tested.

- Python: every module of the package, its tests and benchmarks parses as the declared oldest
  Python (``ast.parse(..., feature_version=...)``); CI runs 3.11, the GPU machine 3.12.
- Packages: the ``floors`` CI lane (ci/lanes.toml) installs exactly the declared floor of every
  package the CPU tests use and runs the suites that use them; this test keeps the lane's pins and
  pyproject's floors the same numbers. torch's floor (2.11) is what the GPU machine runs: PyPI has no
  CPU wheel of it for a CPU lane.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the floor lane's Python is 3.11 too
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor(requirement: str) -> tuple[str, str] | None:
    m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", requirement)
    return (m.group(1).lower().replace("_", "-"), m.group(2)) if m else None


def test_every_module_parses_as_the_oldest_declared_python():
    spec = _pyproject()["project"]["requires-python"]
    major, minor = (int(v) for v in re.match(r"^>=\s*(\d+)\.(\d+)$", spec).groups())
    files = [p for d in ("rope_backends", "tests", "bench", "ci", "examples") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    bad = []
    for path in files:
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(major, minor))
        except SyntaxError as exc:
            bad.append(f"{path.relative_to(ROOT)}:{exc.lineno}: {exc.msg}")
    assert not bad, f"syntax newer than Python {major}.{minor}: {bad}"


def test_the_floors_lane_pins_the_declared_floors():
    project = _pyproject()["project"]
    declared = dict(f for f in map(_floor, project["dependencies"] + project["optional-dependencies"]["test"]) if f)
    lanes = tomllib.loads((ROOT / "ci" / "lanes.toml").read_text())["lanes"]
    pins = dict(p.lower().split("==") for p in lanes["floors"]["pins"])
    for name, version in pins.items():
        assert declared.get(name) is not None, f"the floors lane pins {name}, which pyproject.toml does not declare"
        floor = tuple(int(v) for v in declared[name].split("."))
        pinned = tuple(int(v) for v in version.split("."))
        assert pinned[:len(floor)] == floor, f"{name}: the lane pins {version}, pyproject.toml declares >= {declared[name]}"
    untested = set(declared) - set(pins) - {"torch"}  # torch: the GPU machine runs the floor
    assert not untested, f"declared floors no lane installs: {sorted(untested)}"
