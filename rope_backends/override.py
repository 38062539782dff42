"""Backend overrides, strongest first: the ``backend=`` argument, ``use_backend(...)`` (a
ContextVar, so each thread and asyncio task has its own), the ``ROPE_BACKEND`` environment
variable. Each override is either one name (every device) or ``device:name`` pairs
(``"cuda:eager,npu:npu"``). A device not named falls through to the next level, then to
automatic selection.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator, Mapping

__all__ = ["use_backend", "requested", "parse", "raw_env"]

ENV = "ROPE_BACKEND"
_ALL = "*"
_context: contextvars.ContextVar["_Overrides | None"] = contextvars.ContextVar("rope_backend", default=None)
_env_cache: tuple[object, Mapping[str, str] | None] = (None, None)  # (stored value, parsed)


def parse(spec: str | Mapping[str, str], source: str = "backend") -> Mapping[str, str]:
    """``"triton"`` -> ``{"*": "triton"}``; ``"cuda:eager,npu:npu"`` -> per device type."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            device, sep, name = part.partition(":")
            items.append((device.strip(), name.strip()) if sep else (_ALL, device))
        if not items:
            raise ValueError(f"{source}: expected a backend name or 'device:name,...' pairs, got {spec!r}")
    else:
        raise TypeError(f"{source}: expected a str or a mapping of device type to name, got {type(spec).__name__}")
    for device, name in items:
        if not isinstance(device, str) or not isinstance(name, str) or not device or not name:
            raise ValueError(f"{source}: expected 'name' or 'device:name' pairs, got {spec!r}")
    return dict(items)


class _Overrides(dict):
    """One ``use_backend`` request: a dict that is never changed after it is made, hashed by its
    content once, so it can key the dispatcher's cache (equal requests share entries)."""

    def __init__(self, items: Mapping[str, str]) -> None:
        super().__init__(items)
        self._hash = hash(frozenset(self.items()))

    def __hash__(self) -> int:  # type: ignore[override]
        return self._hash


@contextlib.contextmanager
def use_backend(spec: str | Mapping[str, str]) -> Iterator[None]:
    """Within the block (this thread / task only), run calls on the named backend(s).

    >>> with rb.use_backend("eager"): ...                # every device
    >>> with rb.use_backend("cuda:triton,cpu:eager"): ...
    """
    token = _context.set(_Overrides(parse(spec, "use_backend")))
    try:
        yield
    finally:
        _context.reset(token)


def raw_env(name: str):
    """``() -> value`` of one environment variable in its stored form (bytes on POSIX), for cache
    keys: the key encoded once, no decoding (a dispatch key needs equality, not the text)."""
    data = getattr(os.environ, "_data", None)
    encode = getattr(os.environ, "encodekey", None)
    if not isinstance(data, dict) or encode is None:
        return lambda: os.environ.get(name)
    return functools.partial(data.get, encode(name))


_env_raw = raw_env(ENV)


def _env() -> Mapping[str, str] | None:
    """ROPE_BACKEND parsed, re-parsed only when its stored value changes."""
    global _env_cache
    raw = _env_raw()
    if raw != _env_cache[0]:
        text = os.environ.get(ENV)
        _env_cache = (raw, parse(text, ENV) if text else None)
    return _env_cache[1]


def requested(device_type: str, argument: str | None) -> tuple[str | None, str]:
    """The backend name asked for on this device, and where the request came from."""
    if argument is not None:
        if not isinstance(argument, str):
            raise TypeError(f"backend: expected a backend name (str) or None, got {type(argument).__name__}")
        return argument, "backend"
    ctx = _context.get()
    if ctx is not None:
        name = ctx.get(device_type) or ctx.get(_ALL)
        if name is not None:
            return name, "use_backend"
    env = _env()
    if env is not None:
        name = env.get(device_type) or env.get(_ALL)
        if name is not None:
            return name, ENV
    return None, "backend"
