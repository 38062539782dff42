"""ci/lanes.toml and ci/run_lane.sh: the lanes that self-hosted runners will run (the GPU ones
have run only by hand, through the team's lent H100)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lanes() -> dict:
    spec = importlib.util.spec_from_file_location("ci_lane", ROOT / "ci" / "lane.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.LANES


def test_gpu_lanes_run_the_interpreter_module_in_its_own_process():
    """On the H100 the whole suite in one process gave 91 errors: test_triton_backend.py runs the
    kernel under Triton's interpreter and refuses a process where it was compiled for the GPU.
    Every CUDA/ROCm lane (where the triton backend compiles for the GPU) that runs it must give it
    a process of its own; on CPU and NPU lanes nothing compiles Triton for a device."""
    module = "tests/test_triton_backend.py"
    for name, lane in _lanes().items():
        tests = lane.get("tests", ["tests"])
        runs_it = "tests" in tests or module in tests
        if lane["device"] == "cuda" and runs_it:
            assert module in lane.get("own_process", []), name


def test_lane_env_lists_own_process_files():
    out = subprocess.run([sys.executable, str(ROOT / "ci" / "lane.py"), "env", "cuda"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert "LANE_OWN_PROCESS=tests/test_triton_backend.py" in out
    out = subprocess.run([sys.executable, str(ROOT / "ci" / "lane.py"), "env", "cpu"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert "LANE_OWN_PROCESS=" in out


def test_run_lane_leaves_own_process_files_out_of_the_main_run(tmp_path):
    """run_lane.sh with python replaced by a recorder: the main pytest run ignores the file, then
    a pytest of its own runs it."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ "$1 $2" == "ci/lane.py env" ]]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "ci" / "run_lane.sh"), "cuda"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True)
    calls = log.read_text().splitlines()
    pytest_calls = [c for c in calls if c.startswith("-m pytest")]
    assert len(pytest_calls) == 2
    assert "--ignore=tests/test_triton_backend.py" in pytest_calls[0] and pytest_calls[0].endswith(" tests")
    assert pytest_calls[1].endswith(" tests/test_triton_backend.py")
    assert any(c.startswith("-m rope_backends check --device cuda --expect triton") for c in calls)
    assert any(c.startswith("-m rope_backends bench --device cuda --out bench/results") for c in calls)
