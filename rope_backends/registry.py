"""The backend registry and selection. Names no backend.

A backend is a :class:`Backend` record registered with :func:`register_backend`. :func:`resolve`
is the whole choice for one call, strongest first: the ``backend=`` argument, ``use_backend``,
``ROPE_BACKEND`` (override.py parses those), then priority. :func:`select` filters by the
tensors' device type, availability and ``supports``, sorts by priority, and caches the result
per (device type, requested name, feature key), so dispatch is a dict lookup. An explicit
request that cannot be honoured raises and lists every candidate with its reason: there is
never a silent fallback.

Run-time changes (:func:`register_backend`, :func:`unregister_backend`, :func:`invalidate`) bump
``_GENERATION``. Every cache here and in dispatch.py reads the generation *before* the work it
caches (probing, selecting, preparing, running) and keeps the result only under that generation,
so a result computed while the registry changed -- in another thread, or from inside a
backend's own forward -- is never used after the change. The caches are plain dicts without a
lock: a selection stored just as the registry changes is taken out again by its writer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from . import override
from .contract import RopeArgs

__all__ = ["Backend", "BackendInfo", "register_backend", "unregister_backend", "resolve", "select",
           "list_backends", "get", "invalidate", "prepare_forward"]

log = logging.getLogger("rope_backends")

ANY_DEVICE = "*"


def _always() -> str | None:
    return None


def _supports_all(args: RopeArgs) -> str | None:
    return None


def _no_extra_devices() -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Backend:
    """One implementation of the rope_backends contract.

    name            unique, used by ``backend=``, ``use_backend`` and ``ROPE_BACKEND``
    device_types    torch device types served when auto-selecting (``"*"``: every device)
    priority        higher wins among available backends serving a device
    forward         ``forward(args: RopeArgs) -> tuple[Tensor, ...]``: one result per
                    ``args.tensors``; written into them when ``args.inplace``
    probe           ``probe() -> None`` when usable here, else the reason it is not
    supports        ``supports(args) -> None`` or the reason this call is out of reach; its
                    answer may depend only on ``args.feature_key`` (it is cached by it)
    explicit_device_types
                    ``() -> tuple`` of extra device types served only when the backend is named
                    (the Triton interpreter and the simulated NPU serve "cpu" that way)
    prepare         optional ``prepare(args) -> runner | None``: a function that runs every later
                    call with ``args``' signature (shapes, strides, dtypes, devices, options) as
                    ``runner(tensors, a, b) -> outputs``, where ``a, b`` are the call's cos, sin
                    (as passed: a duplicated form shares its half form's first element) or its
                    positions, cos_sin_cache, and ``tensors`` start where ``args.tensors`` do (in
                    place: any view of them; out of place: exactly their shapes). The dispatcher
                    caches it per signature, so a repeated call skips validation, selection and
                    the backend's own planning. None: this signature takes the full path.
    """

    name: str
    device_types: tuple[str, ...]
    priority: int
    forward: Callable[[RopeArgs], tuple[Tensor, ...]]
    probe: Callable[[], str | None] = _always
    supports: Callable[[RopeArgs], str | None] = _supports_all
    explicit_device_types: Callable[[], tuple[str, ...]] = _no_extra_devices
    description: str = ""
    prepare: Callable[[RopeArgs], Callable | None] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or ":" in self.name or "," in self.name:
            raise ValueError(f"name: expected a non-empty str without ':' or ',', got {self.name!r}")
        if isinstance(self.device_types, str) or not all(isinstance(d, str) for d in self.device_types):
            raise TypeError(f"device_types: expected a tuple of device type strings, got {self.device_types!r}")
        object.__setattr__(self, "device_types", tuple(self.device_types))
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"priority: expected an int, got {type(self.priority).__name__}")
        if self.prepare is not None and not callable(self.prepare):
            raise TypeError(f"prepare: expected a callable or None, got {type(self.prepare).__name__}")
        for attr in ("forward", "probe", "supports", "explicit_device_types"):
            if not callable(getattr(self, attr)):
                raise TypeError(f"{attr}: expected a callable, got {type(getattr(self, attr)).__name__}")

    def serves(self, device_type: str, explicit: bool) -> bool:
        if ANY_DEVICE in self.device_types or device_type in self.device_types:
            return True
        return explicit and device_type in self.explicit_device_types()


@dataclass(frozen=True)
class BackendInfo:
    """What ``rb.list_backends()`` reports for one backend."""

    name: str
    device_types: tuple[str, ...]
    explicit_device_types: tuple[str, ...]
    priority: int
    available: bool
    reason: str | None = None
    description: str = field(default="", repr=False)


_REGISTRY: dict[str, Backend] = {}
_SELECTED: dict[tuple, Backend] = {}
_SKIP_LOGGED: set[tuple] = set()
_GENERATION = [0]  # bumped by invalidate(): a selection begun before is not cached; runners keyed before are dropped


def prepare_forward(forward: Callable[[RopeArgs], tuple[Tensor, ...]]) -> Callable[[RopeArgs], Callable]:
    """A ``Backend.prepare`` for a backend whose ``forward(args)`` does all its work per call (the
    torch-level backends): the runner rebinds the validated args to the new call's tensors
    (:meth:`RopeArgs.for_call`), skipping validation and selection."""
    def prepare(args: RopeArgs) -> Callable:
        def run(tensors, a, b):
            return forward(args.for_call(tensors, a, b))
        return run
    return prepare


def invalidate() -> None:
    """Drop every cached selection and, through the generation number, every prepared runner;
    tell override.py which device types the registered backends now declare."""
    _GENERATION[0] += 1
    _SELECTED.clear()
    override.declare_device_types({d for b in _REGISTRY.values() for d in b.device_types if d != ANY_DEVICE})


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend (built-in, plug-in or test double). Clears the selection cache."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a rope_backends.Backend, got {type(backend).__name__}")
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"backend: expected a new name, got {backend.name!r} which is registered (pass replace=True)")
    _REGISTRY[backend.name] = backend
    invalidate()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend by name (tests and plug-in reloads). Clears the selection cache."""
    if name not in _REGISTRY:
        raise ValueError(f"name: expected a registered backend {sorted(_REGISTRY)}, got {name!r}")
    del _REGISTRY[name]
    invalidate()


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend: expected one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def _probe(backend: Backend) -> str | None:
    try:
        return backend.probe()
    except Exception as exc:  # a broken probe makes the backend unavailable, with the reason
        return f"probe raised {type(exc).__name__}: {exc}"


def list_backends() -> list[BackendInfo]:
    """Every registered backend with its availability here, highest priority first."""
    infos = []
    for b in sorted(_REGISTRY.values(), key=lambda b: (-b.priority, b.name)):
        reason = _probe(b)
        infos.append(
            BackendInfo(b.name, b.device_types, tuple(b.explicit_device_types()), b.priority,
                        reason is None, reason, b.description)
        )
    return infos


def _why_not(b: Backend, device_type: str, args: RopeArgs | None, explicit: bool) -> str | None:
    if not b.serves(device_type, explicit):
        extra = tuple(b.explicit_device_types())
        served = b.device_types + tuple(f"{d} (explicit only)" for d in extra)
        return f"does not serve device type {device_type!r} (serves {', '.join(served) or 'nothing'})"
    reason = _probe(b)
    if reason is not None:
        return f"unavailable: {reason}"
    if args is not None:
        reason = b.supports(args)
        if reason is not None:
            return f"does not support this call: {reason}"
    return None


def _candidates_report(device_type: str, args: RopeArgs | None) -> str:
    lines = []
    for b in sorted(_REGISTRY.values(), key=lambda b: (-b.priority, b.name)):
        lines.append(f"  {b.name}: {_why_not(b, device_type, args, explicit=True) or 'ok'}")
    return "\n".join(lines)


def resolve(args: RopeArgs, backend: str | None) -> Backend:
    """The backend for this call: the ``backend=`` argument > ``use_backend`` > ``ROPE_BACKEND`` >
    priority, on the device type of ``args.tensors[0]``."""
    device_type = args.tensors[0].device.type
    name, source = override.requested(device_type, backend or None)
    return select(device_type, args, name, source)


def select(device_type: str, args: RopeArgs | None, requested: str | None = None, source: str = "backend") -> Backend:
    """The backend that runs ``args`` on ``device_type``: ``requested`` if given (or raise),
    else the highest-priority one that serves, is available and supports the call."""
    key = (device_type, requested, args.feature_key if args is not None else None)
    hit = _SELECTED.get(key)
    if hit is not None:
        return hit
    generation = _GENERATION[0]
    if requested is not None:
        b = _REGISTRY.get(requested)
        if b is None:
            raise ValueError(
                f"{source}: expected a registered backend name, got {requested!r}; candidates for "
                f"device type {device_type!r}:\n{_candidates_report(device_type, args)}"
            )
        reason = _why_not(b, device_type, args, explicit=True)
        if reason is not None:
            raise ValueError(
                f"{source}: expected a backend that can run this call, got {requested!r}: {reason}; "
                f"candidates for device type {device_type!r}:\n{_candidates_report(device_type, args)}"
            )
        _store(key, b, generation)
        return b
    chosen = None
    for b in sorted(_REGISTRY.values(), key=lambda b: (-b.priority, b.name)):
        reason = _why_not(b, device_type, args, explicit=False)
        if reason is None:
            chosen = b
            break
        if b.serves(device_type, False) and (b.name, device_type) not in _SKIP_LOGGED:
            _SKIP_LOGGED.add((b.name, device_type))
            log.info("rope_backends: skipping backend %r for %s: %s", b.name, device_type, reason)
    if chosen is None:
        raise ValueError(
            f"{source}: expected a backend that can run this call on device type {device_type!r}, got none; "
            f"candidates:\n{_candidates_report(device_type, args)}"
        )
    _store(key, chosen, generation)
    return chosen


def _store(key: tuple, backend: Backend, generation: int) -> None:
    """Cache a selection made under ``generation``. Stored first, then the generation read again:
    if the registry changed meanwhile (another thread's invalidate() bumps the generation, then
    clears), the entry is taken out here or by that clear, so none made before a change survives it."""
    if _GENERATION[0] != generation:
        return
    _SELECTED[key] = backend
    if _GENERATION[0] != generation:
        _SELECTED.pop(key, None)
