"""rope_backends: rotary position embeddings through one call, bit-identical on every device.

    import rope_backends as rb
    out  = rb.apply(x, cos, sin, layout="neox")
    q, k = rb.apply_qk(q, k, cos, sin)
    q, k = rb.apply_cached(q, k, positions, cache, head_dim=128)       # serving, in place

See README.md for backends, overrides and the numerical contract.
"""

from __future__ import annotations

from . import backends  # registers the built-in backends and plug-ins; callable as the deprecated rb.backends()
from . import mrope
from .contract import Layout, MRope, RopeArgs
from .dispatch import apply, apply_cached, apply_qk
from .freqs import cos_sin, cos_sin_3d, cos_sin_cache, wan_dims
from .override import use_backend
from .rope_config import RopeConfig, rope_config
from .registry import Backend, BackendInfo, list_backends, register_backend, unregister_backend

__version__ = "0.1.0"

__all__ = [
    "apply",
    "apply_qk",
    "apply_cached",
    "cos_sin",
    "cos_sin_cache",
    "cos_sin_3d",
    "wan_dims",
    "rope_config",
    "RopeConfig",
    "Layout",
    "MRope",
    "mrope",
    "use_backend",
    "list_backends",
    "register_backend",
    "unregister_backend",
    "Backend",
    "BackendInfo",
    "RopeArgs",
]
