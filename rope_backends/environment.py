"""What hardware and software this process can see.

The ONLY module that asks ``torch.version.hip``, imports ``torch_npu`` or reads
``TRITON_INTERPRET``. Everything here is evaluated at call time (not at import), so tests can
simulate a ROCm, Ascend or interpreter machine with ``monkeypatch``. It decides nothing about
dispatch (the backends' probes ask it) and imports no other rope_backends module.

Named ``environment`` so that it does not shadow the standard library's ``platform``;
``rope_backends.platform`` remains a deprecated alias of this module for one release.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

__all__ = [
    "Platform",
    "detect",
    "gpu_vendor",
    "triton_interpret",
    "triton_version",
    "torch_npu_version",
    "npu_available",
    "simulated_npu",
]


def triton_interpret() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def simulated_npu() -> bool:
    """True when ``ROPE_BACKENDS_SIMULATE_NPU=1``: the NPU backend's code serves CPU tensors
    (explicit selection only), so CI runs it through the conformance suite without Ascend."""
    return os.environ.get("ROPE_BACKENDS_SIMULATE_NPU", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_version() -> str | None:
    """The installed Triton's version, or None when it cannot be imported."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        import triton
    except Exception:  # a broken install is reported as absent, with the reason in backends()
        return None
    return str(triton.__version__)


def torch_npu_version() -> str | None:
    """The installed torch_npu's version, or None (importing it registers the ``npu`` device)."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    try:
        import torch_npu  # noqa: F401  (side effect: registers torch.npu / PrivateUse1)
    except Exception:
        return None
    return str(getattr(torch_npu, "__version__", "unknown"))


def npu_available() -> bool:
    """True when torch_npu is importable and reports at least one Ascend device."""
    if torch_npu_version() is None:
        return False
    npu = getattr(torch, "npu", None)
    try:
        return bool(npu is not None and npu.is_available() and npu.device_count() > 0)
    except Exception:
        return False


def gpu_vendor() -> str | None:
    """``"rocm"`` or ``"nvidia"`` for the GPU torch was built for (both are device type "cuda"),
    None when torch has no GPU build or sees no GPU."""
    if not torch.cuda.is_available():
        return None
    return "rocm" if getattr(torch.version, "hip", None) else "nvidia"


@dataclass(frozen=True)
class Platform:
    torch: str
    triton: str | None
    torch_npu: str | None
    gpu_vendor: str | None
    gpu_count: int
    gpu_names: tuple[str, ...]
    npu_count: int
    triton_interpret: bool
    simulated_npu: bool

    def device_types(self) -> tuple[str, ...]:
        """Device types with at least one device here, CPU first."""
        kinds = ["cpu"]
        if self.gpu_count:
            kinds.append("cuda")
        if self.npu_count:
            kinds.append("npu")
        return tuple(kinds)


def detect() -> Platform:
    """A snapshot of the environment (what ``python -m rope_backends info`` prints)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    npus = 0
    if npu_available():
        npus = int(torch.npu.device_count())  # type: ignore[attr-defined]
    return Platform(
        torch=torch.__version__,
        triton=triton_version(),
        torch_npu=torch_npu_version(),
        gpu_vendor=gpu_vendor(),
        gpu_count=gpus,
        gpu_names=tuple(torch.cuda.get_device_name(i) for i in range(gpus)),
        npu_count=npus,
        triton_interpret=triton_interpret(),
        simulated_npu=simulated_npu(),
    )
