"""Backend overrides, strongest first: the ``backend=`` argument, ``use_backend(...)`` (a
ContextVar, so each thread and asyncio task has its own), the ``ROPE_BACKEND`` environment
variable. All three take the same strings: one name (every device) or ``device:name`` pairs
(``"cuda:eager,npu:npu"``). A device not named falls through to the next level, then to
automatic selection.

A string that cannot be what its writer meant is a ``ValueError`` naming where it came from
(``backend``, ``use_backend``, ``ROPE_BACKEND``): a string that names nothing (``""``, ``" , "``),
a pair without a device or a name (``"cuda:"``), a device type that no
registered backend declares and that is not one of cpu/cuda/npu (``gpu:triton``, ``CPU:npu``), a
device type named twice (``cpu:eager,cpu:npu``). An unset or empty ``ROPE_BACKEND`` means no
override. Whether the named backend exists and serves the device is checked at selection
(registry.py, which asks :func:`requested` here), where the candidates are listed.

This module imports no other rope_backends module: the registry tells it which device types the
registered backends declare (:func:`declare_device_types`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterable, Iterator, Mapping

__all__ = ["use_backend", "requested", "parse", "raw_env", "known_device_types", "check_argument",
           "declare_device_types"]

ENV = "ROPE_BACKEND"
_ALL = "*"
_context: contextvars.ContextVar["_Overrides | None"] = contextvars.ContextVar("rope_backend", default=None)
_env_cache: tuple[object, Mapping[str, str] | None] = (None, None)  # (stored value, parsed)


BASE_DEVICE_TYPES = ("cpu", "cuda", "npu")

# The device types the registered backends declare, as registry.py last reported them, and a
# counter bumped with every report: a string parsed before a report is parsed again after it.
_declared: frozenset[str] = frozenset()
_DECLARED_VERSION = [0]


def declare_device_types(device_types: Iterable[str]) -> None:
    """What the registered backends declare in ``device_types`` (registry.py calls this whenever
    the registry changes)."""
    global _declared
    _declared = frozenset(device_types) - {_ALL}
    _DECLARED_VERSION[0] += 1


def known_device_types() -> tuple[str, ...]:
    """Device types an override may name: cpu, cuda, npu and every type a registered backend
    declares in ``device_types``."""
    return tuple(sorted(_declared | set(BASE_DEVICE_TYPES)))


def parse(spec: str | Mapping[str, str], source: str = "backend") -> Mapping[str, str]:
    """``"triton"`` -> ``{"*": "triton"}``; ``"cuda:eager,npu:npu"`` -> per device type.
    ValueError (naming ``source``) for a string naming nothing, a pair missing a side, an unknown or
    repeated device type. Empty entries (a trailing comma) are skipped."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
        for device, name in items:
            if not isinstance(device, str) or not isinstance(name, str) or not device or not name:
                raise ValueError(f"{source}: expected a mapping of device type to backend name, got {dict(spec)!r}")
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue  # "cuda:triton," -- a trailing comma names nothing
            device, sep, name = part.partition(":")
            device, name = device.strip(), name.strip()
            if sep and (not device or not name):
                raise ValueError(f"{source}: expected 'name' or 'device:name' pairs, got the entry {part!r} in {spec!r}")
            items.append((device, name) if sep else (_ALL, device))
        if not items:
            raise ValueError(f"{source}: expected a backend name or 'device:name' pairs, got {spec!r}")
    else:
        raise TypeError(f"{source}: expected a str or a mapping of device type to name, got {type(spec).__name__}")
    known = known_device_types()
    seen: set[str] = set()
    for device, _ in items:
        if device != _ALL and device not in known:
            raise ValueError(f"{source}: expected device types among {', '.join(known)}, got {device!r} in {spec!r}")
        if device in seen:
            what = "one backend name for every device" if device == _ALL else f"device type {device!r}"
            raise ValueError(f"{source}: expected each device type at most once, got {what} twice in {spec!r}")
        seen.add(device)
    return dict(items)


_ARGUMENTS: dict[str, Mapping[str, str]] = {}  # backend= strings with pairs, parsed (per declared version)
_ARGUMENTS_VERSION = [-1]


def check_argument(argument: object) -> None:
    """TypeError/ValueError unless ``argument`` is None or a valid override string (the
    ``backend=`` argument; the device types it names are checked)."""
    if argument is None:
        return
    if not isinstance(argument, str):
        raise TypeError(f"backend: expected a backend name (str) or None, got {type(argument).__name__}")
    _argument(argument)


def _argument(argument: str) -> Mapping[str, str]:
    if _ARGUMENTS_VERSION[0] != _DECLARED_VERSION[0]:
        _ARGUMENTS.clear()
        _ARGUMENTS_VERSION[0] = _DECLARED_VERSION[0]
    parsed = _ARGUMENTS.get(argument)
    if parsed is None:
        if ":" not in argument and "," not in argument and argument.strip() == argument and argument:
            parsed = {_ALL: argument}
        else:
            parsed = parse(argument, "backend")
        if len(_ARGUMENTS) < 256:
            _ARGUMENTS[argument] = parsed
    return parsed


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
    """ROPE_BACKEND parsed, re-parsed only when its stored value (or the device types it may
    name) changes. Unset or empty: None."""
    global _env_cache
    raw = (_env_raw(), _DECLARED_VERSION[0])
    if raw != _env_cache[0]:
        text = os.environ.get(ENV)
        _env_cache = (raw, parse(text, ENV) if text else None)
    return _env_cache[1]


def requested(device_type: str, argument: str | None) -> tuple[str | None, str]:
    """The backend name asked for on this device, and where the request came from."""
    if argument is not None:
        if not isinstance(argument, str):
            raise TypeError(f"backend: expected a backend name (str) or None, got {type(argument).__name__}")
        parsed = _argument(argument)
        name = parsed.get(device_type) or parsed.get(_ALL)
        if name is not None:
            return name, "backend"
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
