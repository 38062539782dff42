"""The machine a run measured: device description, file label, versions, copy bandwidth.

:func:`copy_bandwidth` is the yardstick every GB/s is set against (bytes read + written by one
large copy, over its median time); :func:`device_info` and :func:`versions` go into every result
document so a number is never read without the hardware and software that made it.

This module only reads the machine: it changes no setting (it never sets the torch thread count)
and imports no optional package (versions are read from the installed distributions).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform as _pyplatform
import re
from pathlib import Path

import torch

from .. import __version__, environment
from .timing import Clock, cache_bytes

__all__ = ["copy_bandwidth", "device_info", "device_label", "versions", "present_devices"]


def copy_bandwidth(device: torch.device, quick: bool = False) -> dict:
    """A large copy: bytes read + written over the median time, in GB/s (1e9 bytes)."""
    clock = Clock(device, quick)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = int(min(2**30, free // 8))
    else:
        nbytes = (64 if quick else 256) * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    us = clock.time(lambda: dst.copy_(src))
    method = {"cuda": "device-to-device Tensor.copy_ timed with triton.testing.do_bench (median)",
              "cpu": f"Tensor.copy_ (memcpy) on {torch.get_num_threads()} thread(s), torch.utils.benchmark median"}
    del src, dst
    return {"gbps": 2 * nbytes / us / 1e3, "bytes_per_copy": nbytes, "us": us,
            "method": method.get(device.type, "Tensor.copy_, host loop with a device sync")}


def cpu_name() -> str:
    name = _pyplatform.processor()
    if not name or name in ("x86_64", "aarch64", "arm64", "i386"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except Exception:
            pass
    return name or _pyplatform.machine() or "cpu"


def device_info(device: torch.device) -> dict:
    """The ``device`` entry of a result document."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "vendor": environment.gpu_vendor(),
                "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
                "l2_bytes": getattr(props, "L2_cache_size", None)}
    if device.type == "cpu":
        return {"type": "cpu", "name": f"{cpu_name()} ({os.cpu_count()} cores)", "cores": os.cpu_count(),
                "threads": torch.get_num_threads(), "llc_bytes": cache_bytes(device),
                # other work on the machine slows torch's threaded kernels a lot: keep it with the numbers
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    return {"type": device.type, "name": device.type}


def device_label(info: dict) -> str:
    """The file name stem of a device's results (``nvidia-h100-80gb-hbm3``, ``cpu-...-2c``)."""
    if info["type"] == "cuda":
        base = info["name"]
    elif info["type"] == "cpu":
        base = f"cpu-{cpu_name()}-{info['cores']}c"
    else:
        base = info["type"]
    return re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except Exception:
        return None


def versions() -> dict:
    return {"rope_backends": __version__, "torch": torch.__version__, "triton": environment.triton_version(),
            "python": _pyplatform.python_version(), "cuda": torch.version.cuda,
            "hip": getattr(torch.version, "hip", None), "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
            "flashinfer": _version("flashinfer-python") or _version("flashinfer"),
            "matplotlib": _version("matplotlib")}


def present_devices() -> list[str]:
    """Device types this machine can benchmark: cpu, then cuda and npu where present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if environment.npu_available():
        devices.append("npu")
    return devices
