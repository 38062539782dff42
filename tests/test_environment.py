"""Environment detection (rope_backends.environment) by simulation: GPU vendor (CUDA vs ROCm, both
torch device type "cuda"), Ascend through a fake torch_npu, the interpreter and simulated-NPU
flags, and the deprecated ``rope_backends.platform`` alias."""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

import pytest
import torch

from rope_backends import environment


def test_detect_nvidia(monkeypatch, fake_gpus):
    fake_gpus(2, "NVIDIA H100")
    monkeypatch.setattr(torch.version, "hip", None)
    p = environment.detect()
    assert p.gpu_vendor == "nvidia" and environment.gpu_vendor() == "nvidia"
    assert p.gpu_count == 2 and p.gpu_names == ("NVIDIA H100 0", "NVIDIA H100 1")
    assert p.device_types()[:2] == ("cpu", "cuda")


def test_detect_rocm(monkeypatch, fake_gpus):
    fake_gpus(1, "AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    p = environment.detect()
    assert p.gpu_vendor == "rocm" and "cuda" in p.device_types()


def test_detect_no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert environment.gpu_vendor() is None and environment.detect().gpu_count == 0


def test_detect_ascend(monkeypatch):
    fake = types.ModuleType("torch_npu")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    fake.__version__ = "2.5.1.post1"
    npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 8)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    assert environment.torch_npu_version() == "2.5.1.post1"
    assert environment.npu_available()
    p = environment.detect()
    assert p.npu_count == 8 and "npu" in p.device_types()


def test_detect_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu fails
    assert environment.torch_npu_version() is None and not environment.npu_available()


def test_interpreter_and_simulation_flags(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "0")
    assert environment.triton_interpret() and not environment.simulated_npu()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("ROPE_BACKENDS_SIMULATE_NPU", "1")
    assert not environment.triton_interpret() and environment.simulated_npu()



def test_platform_is_a_deprecated_alias_of_environment(monkeypatch):
    """``rope_backends.platform`` (it shadowed the standard library's name) warns when imported and
    is the environment module itself, so a monkeypatch through either name reaches both."""
    monkeypatch.delitem(sys.modules, "rope_backends.platform", raising=False)
    with pytest.warns(DeprecationWarning, match="rope_backends.platform is deprecated.*rope_backends.environment"):
        alias = importlib.import_module("rope_backends.platform")
    assert alias is environment
    monkeypatch.setattr(alias, "triton_interpret", lambda: "patched")
    assert environment.triton_interpret() == "patched"
    monkeypatch.delitem(sys.modules, "rope_backends.platform")
    import platform as stdlib_platform

    assert stdlib_platform.system() and not hasattr(stdlib_platform, "detect")
