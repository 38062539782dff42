"""The examples under examples/ run on CPU in seconds and check what they claim.

Each example's ``main()`` is imported by path and run on the CPU with its defaults (what
``python examples/<name>.py`` does on a machine without a GPU); the scripts are also run as
``__main__`` in one fresh interpreter, so their command-line entry works. The drop-in examples need
their model library (transformers, diffusers: the ``test`` extra); where it is missing they are
skipped, by that availability alone.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["serving_llm", "training_hf", "diffusion_video", "qwen3_vl", "serving_vllm_style", "serving_sglang_style",
         "serving_diffusion_step", "patch_transformers", "patch_diffusers"]
NEEDS = {"patch_transformers": "transformers", "patch_diffusers": "diffusers"}  # example -> library it patches
RUNNABLE = [n for n in NAMES if n not in NEEDS or importlib.util.find_spec(NEEDS[n]) is not None]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_example_main(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    module = _load(name)
    start = time.perf_counter()
    result = module.main(device="cpu", verbose=False)
    elapsed = time.perf_counter() - start
    assert result["device"] == "cpu"
    checks = [key for key in result if key.startswith(("bit_exact", "grads_bit_exact"))]
    assert checks and all(result[key] is True for key in checks), result
    assert elapsed < 10, f"{name} took {elapsed:.1f} s on CPU"


def test_example_results():
    assert _load("diffusion_video").main(device="cpu", verbose=False)["split"] == (44, 42, 42)
    vl = _load("qwen3_vl").main(device="cpu", verbose=False, decode_steps=1)
    assert vl["first_image_hw"] == [[13, 13, 13], [13, 14, 15]]  # 12 text tokens + vision_start
    assert vl["deltas"][0] == vl["max_position"][0] + 1 - vl["seq"]
    losses = _load("training_hf").main(device="cpu", verbose=False, steps=3)["losses"]
    assert losses[-1] < losses[0]
    for name in ("serving_vllm_style", "serving_sglang_style"):  # 2 layers x (prefill + 4 decode steps)
        served = _load(name).main(device="cpu", verbose=False)
        assert served["text_calls"] == served["mrope_calls"] == 10, served
    step = _load("serving_diffusion_step").main(device="cpu", verbose=False)
    assert step["split"] == (44, 42, 42) and step["rotations"] == 6 and step["finite"]


def test_drop_in_example_results():
    pytest.importorskip("transformers")
    result = _load("patch_transformers").main(device="cpu", verbose=False)
    assert result["patched"] == ("model.layers.0.self_attn", "model.layers.1.self_attn")
    import rope_backends as rb

    assert ("bit_exact_kv_cache_vs_serving_bf16" in result) == hasattr(rb, "rope_config")


def test_examples_run_as_scripts():
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(EXAMPLES.parent)!r})\n"  # this checkout's rope_backends, not an installed one
        f"for name in {RUNNABLE!r}:\n"
        f"    sys.argv = [name, '--device', 'cpu']\n"
        f"    runpy.run_path({str(EXAMPLES)!r} + '/' + name + '.py', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(RUNNABLE) and all("True" in line for line in lines), done.stdout
