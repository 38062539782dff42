"""``triton``: one Triton kernel family for CUDA and ROCm GPUs (both are torch device type "cuda").

Registers the backend; the kernel is in kernel.py, the host side (geometry, heuristics, launch)
in launch.py. Nothing here imports triton: the probe asks :mod:`rope_backends.environment`, and
launch.py imports the kernel at the first call, so ``import rope_backends`` works without triton
(the backend is then listed as unavailable, with the reason).

Under ``TRITON_INTERPRET=1`` the same kernels run through Triton's CPU interpreter and the
backend also serves "cpu" tensors when named explicitly (``backend="triton"``), which is how CI
checks the kernel source bit for bit without a GPU.
"""

from __future__ import annotations

from ... import environment
from ...registry import Backend, register_backend
from .launch import forward, prepare  # launch.py imports triton only at the first call

__all__ = ["forward", "probe"]

NOT_INSTALLED = "triton is not installed or does not import (pip install rope-backends[triton])"
NO_GPU = "no CUDA or ROCm GPU visible to torch (set TRITON_INTERPRET=1 to run the kernels on CPU)"


def probe() -> str | None:
    """None when the kernels can run here (a GPU, or the interpreter), else the reason."""
    if environment.triton_version() is None:
        return NOT_INSTALLED
    if environment.triton_interpret() or environment.gpu_vendor() is not None:
        return None
    return NO_GPU


def _explicit_device_types() -> tuple[str, ...]:
    return ("cpu",) if environment.triton_interpret() else ()


register_backend(
    Backend(
        name="triton",
        device_types=("cuda",),
        priority=100,
        forward=forward,
        prepare=prepare,
        probe=probe,
        explicit_device_types=_explicit_device_types,
        description="one Triton kernel family (q+k, positions, MRoPE, backward in one launch); CUDA and ROCm",
    )
)
