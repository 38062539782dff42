"""``eager``: the reference itself, on any device. The CPU default and the universal fallback
of automatic selection; calls :mod:`rope_backends.reference`, never copies it."""

from __future__ import annotations

from .. import reference
from ..registry import ANY_DEVICE, Backend, prepare_forward, register_backend

register_backend(
    Backend(
        name="eager",
        device_types=(ANY_DEVICE,),
        priority=0,
        forward=reference.run,
        prepare=prepare_forward(reference.run),
        description="eager torch reference (fp32 math, no FMA); any device",
    )
)
