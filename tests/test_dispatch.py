"""Dispatch: precedence (argument > use_backend > ROPE_BACKEND > priority), ROPE_BACKEND parsing,
per-tensor-device selection, the selection cache across run-time registration, error messages
listing candidates, entry-point plug-ins, use_backend contexts in concurrent threads and asyncio
tasks, prepared runners, the routing of each kind of call and the inline signature keys. Fake
backends (the ``fakes`` fixture, conftest.py) count their calls to prove which path ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.machinery
import threading
import types
from collections import Counter

import pytest
import torch

import rope_backends as rb
from rope_backends import override, reference, registry
from rope_backends.registry import Backend
from rope_backends.testing import assert_bitwise_equal

backends_module = importlib.import_module("rope_backends.backends")




def _xcs(device="cpu"):
    x = torch.randn(4, 2, 16, device=device)
    cos, sin = rb.cos_sin(torch.arange(4), 16)
    return x, cos[:, None].to(device), sin[:, None].to(device)


def _which(fakes, fn):
    before = fakes.calls.copy()
    fn()
    diff = fakes.calls - before
    return next(iter(diff)) if diff else "eager"


# ---- precedence ----------------------------------------------------------------------------

def test_precedence(fakes, monkeypatch):
    for n, p in (("rb_a", 10), ("rb_b", 5), ("rb_c", 7), ("rb_d", 1)):
        fakes.add(n, priority=p)
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_a"  # priority
    monkeypatch.setenv("ROPE_BACKEND", "rb_b")
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_b"  # env beats priority
    with rb.use_backend("rb_c"):
        assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_c"  # context beats env
        assert _which(fakes, lambda: rb.apply(x, c, s, backend="rb_d")) == "rb_d"  # argument beats all
        assert _which(fakes, lambda: rb.apply(x, c, s, backend="eager")) == "eager"
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_b"  # context restored
    monkeypatch.delenv("ROPE_BACKEND")
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_a"


def test_precedence_for_every_entry_point(fakes):
    fakes.add("rb_a", priority=10)
    fakes.add("rb_b", priority=5)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cos, sin = rb.cos_sin(torch.arange(5), 16)
    cache = rb.cos_sin_cache(8, 16)
    pos = torch.arange(5)
    assert _which(fakes, lambda: rb.apply_qk(q, k, cos[:, None], sin[:, None])) == "rb_a"
    assert _which(fakes, lambda: rb.apply_cached(q, k, pos, cache)) == "rb_a"
    with rb.use_backend("rb_b"):
        assert _which(fakes, lambda: rb.apply_qk(q, k, cos[:, None], sin[:, None])) == "rb_b"
        assert _which(fakes, lambda: rb.apply_cached(q, k, pos, cache)) == "rb_b"


def test_autograd_and_forward_backward_on_the_same_backend(fakes):
    fakes.add("rb_a", priority=10)
    x, c, s = _xcs()
    x.requires_grad_()
    with rb.use_backend("rb_a"):
        out = rb.apply(x, c, s)
    assert fakes.calls["rb_a"] == 1
    out.sum().backward()  # outside the context: the backward still runs where the forward did
    assert fakes.calls["rb_a"] == 2


def test_per_device_overrides(fakes, monkeypatch):
    fakes.add("rb_a", priority=10)
    fakes.add("rb_b", priority=5)
    x, c, s = _xcs()
    monkeypatch.setenv("ROPE_BACKEND", "cuda:eager,npu:npu")
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_a"  # cpu not named: automatic
    monkeypatch.setenv("ROPE_BACKEND", "cuda:eager, cpu:rb_b")
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_b"
    with rb.use_backend({"cuda": "eager"}):  # cpu not named in the context: falls to env
        assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_b"
    with rb.use_backend("cpu:eager,cuda:rb_a"):
        assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"


def test_env_parsing():
    assert override.parse("eager") == {"*": "eager"}
    assert override.parse("cuda:eager,npu:npu") == {"cuda": "eager", "npu": "npu"}
    assert override.parse(" cuda : triton , cpu:eager ,") == {"cuda": "triton", "cpu": "eager"}
    assert override.parse({"cuda": "triton"}) == {"cuda": "triton"}
    for bad in ("", ",", "cuda:", ":eager", "cuda:eager,:x"):
        with pytest.raises(ValueError, match="^ROPE_BACKEND:"):
            override.parse(bad, "ROPE_BACKEND")
    with pytest.raises(TypeError, match="^use_backend:"):
        override.parse(3, "use_backend")


# ---- per-tensor device, cache, errors ------------------------------------------------------------

def test_cpu_tensors_go_to_eager_despite_a_higher_priority_gpu_backend(fakes):
    fakes.add("rb_fake_cuda", device_types=("cuda",), priority=1000)
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"
    assert registry.select("cuda", None).name == "rb_fake_cuda"
    assert registry.select("cpu", None).name != "rb_fake_cuda"


def test_dispatch_follows_the_tensors_device(fakes):
    """Meta tensors stand in for a second device type: each call goes by its own tensors."""
    fakes.add("rb_fake_meta", device_types=("meta",), priority=1000)
    x, c, s = _xcs()
    xm, cm, sm = _xcs("meta")
    assert _which(fakes, lambda: rb.apply(xm, cm, sm)) == "rb_fake_meta"
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"
    assert _which(fakes, lambda: rb.apply(xm, cm, sm)) == "rb_fake_meta"


def test_selection_cache_follows_registration(fakes):
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s, backend=None)) == "eager"
    fakes.add("rb_late", priority=10_000)
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_late"
    fakes.remove("rb_late")
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"
    fakes.add("rb_late", priority=10_000)
    rb.register_backend(Backend(name="rb_late", device_types=("cuda",), priority=10_000,
                                forward=reference.run), replace=True)
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"


def test_supports_is_honoured_and_cached_by_feature(fakes):
    fakes.add("rb_fp32_only", priority=10_000,
              supports=lambda args: None if args.tensors[0].dtype == torch.float32 else "fp32 only")
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_fp32_only"
    assert _which(fakes, lambda: rb.apply(x.half(), c, s)) == "eager"
    with pytest.raises(ValueError, match="^backend: expected a backend that can run this call.*fp32 only"):
        rb.apply(x.half(), c, s, backend="rb_fp32_only")


def test_errors_list_the_candidates(fakes):
    fakes.add("rb_broken", priority=1, probe=lambda: "needs the moon")
    fakes.add("rb_raising", priority=2, probe=lambda: 1 / 0)
    x, c, s = _xcs()
    with pytest.raises(ValueError) as info:
        rb.apply(x, c, s, backend="rb_nope")
    msg = str(info.value)
    assert msg.startswith("backend: expected a registered backend name, got 'rb_nope'")
    for b in rb.list_backends():
        assert f"  {b.name}: " in msg
    assert "needs the moon" in msg and "ZeroDivisionError" in msg
    with pytest.raises(ValueError, match="rb_broken.*unavailable: needs the moon"):
        rb.apply(x, c, s, backend="rb_broken")
    infos = {b.name: b for b in rb.list_backends()}
    assert infos["rb_broken"].available is False and infos["rb_broken"].reason == "needs the moon"
    assert infos["eager"].available and infos["eager"].device_types == ("*",)


def test_no_backend_for_a_device_type(fakes, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_SELECTED", {})
    with pytest.raises(ValueError, match="^backend: expected a backend that can run this call on device type 'cpu', got none"):
        registry.select("cpu", None)


def test_register_backend_validation():
    with pytest.raises(TypeError, match="^backend:"):
        rb.register_backend("eager")
    with pytest.raises(ValueError, match="^backend: expected a new name"):
        rb.register_backend(Backend(name="eager", device_types=("*",), priority=0, forward=reference.run))
    with pytest.raises(ValueError, match="^name:"):
        Backend(name="a:b", device_types=("cpu",), priority=0, forward=reference.run)
    with pytest.raises(TypeError, match="^device_types:"):
        Backend(name="a", device_types="cpu", priority=0, forward=reference.run)
    with pytest.raises(TypeError, match="^priority:"):
        Backend(name="a", device_types=("cpu",), priority=1.5, forward=reference.run)
    with pytest.raises(TypeError, match="^forward:"):
        Backend(name="a", device_types=("cpu",), priority=1, forward=None)
    with pytest.raises(ValueError, match="^name:"):
        rb.unregister_backend("rb_never_registered")


def test_explicit_device_types_serve_only_when_named(fakes):
    fakes.add("rb_explicit_cpu", device_types=("cuda",), priority=10_000, explicit_device_types=lambda: ("cpu",))
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"
    assert _which(fakes, lambda: rb.apply(x, c, s, backend="rb_explicit_cpu")) == "rb_explicit_cpu"


def test_backends_is_the_subpackage_and_a_deprecated_alias_of_list_backends(fakes):
    """``rb.backends`` is the subpackage ``rope_backends.backends`` (not shadowed by a function);
    calling it, the listing function's old name, warns and returns ``rb.list_backends()``."""
    fakes.add("rb_listed")
    assert rb.backends is backends_module and callable(rb.backends)
    assert backends_module.load_plugins and isinstance(backends_module.plugin_errors, dict)
    with pytest.warns(DeprecationWarning, match=r"rope_backends.backends\(\) is deprecated.*list_backends"):
        old = rb.backends()
    assert old == rb.list_backends() and "rb_listed" in {b.name for b in old}


# ---- entry-point plug-ins --------------------------------------------------------------------

class _EntryPoint:
    def __init__(self, name, target):
        self.name, self._target = name, target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_point_plugins(monkeypatch, fakes):
    module = types.ModuleType("rb_plugin_module")

    def register_fn():
        fakes.add("rb_plugin_fn", priority=-5)

    eps = [
        _EntryPoint("fn", register_fn),  # a callable: called
        _EntryPoint("module", module),  # a module: imported for its side effect, not called
        _EntryPoint("broken", ImportError("no such module rb_missing")),
    ]
    seen_groups = []

    def fake_entry_points(group):
        seen_groups.append(group)
        return eps

    monkeypatch.setattr(backends_module, "entry_points", fake_entry_points)
    monkeypatch.setattr(backends_module, "plugin_errors", {})
    backends_module.load_plugins()
    assert seen_groups == ["rope_backends.backends"]
    assert "rb_plugin_fn" in {b.name for b in rb.list_backends()}
    assert backends_module.plugin_errors == {"broken": "ImportError: no such module rb_missing"}
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s, backend="rb_plugin_fn")) == "rb_plugin_fn"


# ---- concurrency ---------------------------------------------------------------------------

def test_threads_each_get_their_own_backend(fakes):
    names = [fakes.add(f"rb_thread_{i}", priority=-10 - i) for i in range(4)]
    per_thread: dict[str, Counter] = {}
    barrier = threading.Barrier(len(names))
    errors = []
    lock = threading.Lock()

    def forward_for(name):
        def fwd(args):
            with lock:
                per_thread.setdefault(threading.current_thread().name, Counter())[name] += 1
            return reference.run(args)
        return fwd

    for n in names:
        rb.register_backend(Backend(name=n, device_types=("cpu",), priority=-10, forward=forward_for(n)), replace=True)

    def work(name):
        try:
            x, c, s = _xcs()
            with rb.use_backend(name):
                barrier.wait()
                for _ in range(50):
                    rb.apply(x, c, s)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert per_thread == {n: Counter({n: 50}) for n in names}


def test_asyncio_tasks_each_get_their_own_backend(fakes):
    names = [fakes.add(f"rb_task_{i}", priority=-10 - i) for i in range(3)]
    log: list[tuple[str, str]] = []

    def forward_for(name):
        def fwd(args):
            log.append((asyncio.current_task().get_name(), name))
            return reference.run(args)
        return fwd

    for n in names:
        rb.register_backend(Backend(name=n, device_types=("cpu",), priority=-10, forward=forward_for(n)), replace=True)

    async def task(name):
        x, c, s = _xcs()
        with rb.use_backend(name):
            for _ in range(20):
                rb.apply(x, c, s)
                await asyncio.sleep(0)  # interleave with the other tasks inside the context

    async def main():
        await asyncio.gather(*(asyncio.create_task(task(n), name=n) for n in names))

    asyncio.run(main())
    assert len(log) == 60 and all(task_name == backend for task_name, backend in log)
    # the interleaving really happened
    assert len({log[i][1] for i in range(len(names))}) == len(names)


def test_registration_while_threads_dispatch(fakes):
    """Run-time (un)registration from one thread while others dispatch: every call succeeds and
    goes to a backend that was registered at that moment."""
    x, c, s = _xcs()
    stop = threading.Event()
    errors = []

    def caller():
        try:
            while not stop.is_set():
                rb.apply(x, c, s)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(50):
        fakes.add("rb_churn", priority=10_000)
        fakes.remove("rb_churn")
    stop.set()
    for t in threads:
        t.join()
    assert not errors


def test_cache_not_poisoned_by_a_concurrent_unregistration(fakes):
    """Another thread unregisters a backend while this one is selecting it (simulated
    deterministically from inside the probe): the stale choice must not stay cached."""
    state = {"first": True}

    def probe():
        if state["first"]:
            state["first"] = False
            fakes.remove("rb_vanishing")
        return None

    fakes.add("rb_vanishing", priority=10_000, probe=probe)
    x, c, s = _xcs()
    rb.apply(x, c, s)  # began while it was registered: may still run there
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "eager"
    assert registry.select("cpu", None).name != "rb_vanishing"


# ---- prepared runners: the repeated call -------------------------------------------------------

class Prepared:
    """A backend whose prepare() hands back a runner (the reference on the new call's tensors);
    counts forward calls, prepare calls and runner calls."""

    def __init__(self, fakes, name="rb_prep", priority=60, device_types=("cpu",)):
        self.forward = self.prepare = self.runs = 0
        self.name = name

        def forward(args):
            self.forward += 1
            return reference.run(args)

        def prepare(args):
            self.prepare += 1

            def run(tensors, a, b):
                self.runs += 1
                tensors = tuple(t.view(like.shape) for t, like in zip(tensors, args.tensors))  # [T, H*D] in place
                if args.cache is None:
                    new = dataclasses.replace(args, tensors=tuple(tensors), cos=a, sin=b)
                else:
                    new = dataclasses.replace(args, tensors=tuple(tensors), positions=a, cache=b)
                return reference.run(new)
            return run

        rb.register_backend(Backend(name=name, device_types=device_types, priority=priority, forward=forward,
                                    prepare=prepare))
        fakes.names.append(name)

    def counts(self):
        return (self.forward, self.prepare, self.runs)


def test_repeated_signature_takes_the_prepared_runner(fakes):
    p = Prepared(fakes)
    x, c, s = _xcs()
    want = reference.rotate(x, c, s, rb.Layout.NEOX, 16)
    assert_bitwise_equal(rb.apply(x, c, s), want)
    assert p.counts() == (1, 1, 0)
    for _ in range(3):
        assert_bitwise_equal(rb.apply(x.clone(), c, s), want)
    assert p.counts() == (1, 1, 3)
    rb.apply(x[:2], c[:2], s[:2])  # another signature: the full path once more
    assert p.counts() == (2, 2, 3)


def test_prepared_runners_follow_overrides_and_registry(fakes, monkeypatch):
    p = Prepared(fakes)
    x, c, s = _xcs()
    rb.apply(x, c, s)
    rb.apply(x, c, s)
    assert p.counts() == (1, 1, 1)
    fakes.add("rb_other", priority=10)
    with rb.use_backend("rb_other"):  # the context is part of the key
        assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_other"
        assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_other"
    monkeypatch.setenv("ROPE_BACKEND", "rb_other")  # and the environment
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_other"
    monkeypatch.delenv("ROPE_BACKEND")
    assert _which(fakes, lambda: rb.apply(x, c, s, backend="rb_other")) == "rb_other"  # and the argument
    before = p.counts()
    rb.apply(x, c, s)
    assert p.counts()[0] == before[0] + 1  # adding rb_other dropped every runner: full path once
    fakes.add("rb_top", priority=1000)  # a backend registered at run time wins at once
    assert _which(fakes, lambda: rb.apply(x, c, s)) == "rb_top"


def test_prepared_runner_is_not_used_where_a_call_needs_more(fakes):
    p = Prepared(fakes)
    x, c, s = _xcs()
    for _ in range(2):
        rb.apply(x, c, s)
    xg = x.clone().requires_grad_()
    rb.apply(xg, c, s).sum().backward()  # needs autograd: the custom op, not the runner
    assert xg.grad is not None
    q, k = x.clone(), torch.randn(4, 1, 16)
    for _ in range(2):
        rb.apply_qk(q, k, c, s)
    with pytest.raises(ValueError, match="^k: expected a tensor distinct from q"):
        rb.apply_qk(q, q.view(4, 2, 16)[:, :1], c, s)  # same signature as (q, k), same address
    # CPU positions are range-checked on every call, cached signature or not
    cache = rb.cos_sin_cache(8, 16)
    pos = torch.arange(4)
    for _ in range(3):
        rb.apply_cached(x.clone(), None, pos, cache)
    with pytest.raises(ValueError, match="^positions: expected values in"):
        rb.apply_cached(x.clone(), None, torch.tensor([0, 1, 2, 8]), cache)


def test_prepared_runner_for_cached_calls(fakes):
    """An apply_cached runner is handed the caller's 2-D [T, H*D] tensor in place (CPU positions:
    it checks their range first, on every call)."""
    p = Prepared(fakes)
    x = torch.randn(4, 2 * 16)
    cache = rb.cos_sin_cache(8, 16)
    pos = torch.arange(4)
    want = reference.rotate(x.view(4, 2, 16), cache[:4, :8][:, None], cache[:4, 8:][:, None], rb.Layout.NEOX, 16)
    rb.apply_cached(x.clone(), None, pos, cache, head_dim=16)
    y = x.clone()
    out, none = rb.apply_cached(y, None, pos, cache, head_dim=16)
    assert out is y and none is None and p.counts() == (1, 1, 1)
    assert_bitwise_equal(y.view(4, 2, 16), want)
    with pytest.raises(ValueError, match="^positions: expected values in"):
        rb.apply_cached(y, None, pos + 5, cache, head_dim=16)
    assert p.counts() == (1, 1, 1)


def test_equal_use_backend_blocks_share_prepared_runners(fakes):
    """A loop that enters ``use_backend("x")`` around every call keeps one runner per signature."""
    p = Prepared(fakes, priority=-5)
    x, c, s = _xcs()
    for _ in range(4):
        with rb.use_backend("rb_prep"):
            rb.apply(x, c, s)
    assert p.counts() == (1, 1, 3)


def test_tensor_subclasses_and_odd_option_types_never_take_a_runner(fakes):
    p = Prepared(fakes)
    x, c, s = _xcs()
    px = torch.nn.Parameter(x.clone(), requires_grad=False)
    for _ in range(2):
        rb.apply(px, c, s)
    assert p.counts() == (2, 0, 0)
    rb.apply(x, c, s, rotary_dim=16)
    with pytest.raises(TypeError, match="^rotary_dim"):
        rb.apply(x, c, s, rotary_dim=16.0)  # equal and same hash as 16, but not an int


# ---- registry changes during a call (the generation is read before the call runs) -----------

def _counting_backend(name, calls, tag, on_call=None, priority=10_000):
    def forward(args):
        calls[tag] += 1
        if on_call is not None:
            on_call(calls[tag])
        return reference.run(args)

    return Backend(name=name, device_types=("cpu",), priority=priority, forward=forward,
                   prepare=registry.prepare_forward(forward))


def _drop(name):
    if name in registry._REGISTRY:
        rb.unregister_backend(name)


def test_backend_replaced_from_inside_its_own_forward(fakes):
    """The old backend's runner, prepared while the registry changed under it, is never used: the
    next calls of the signature run the replacement."""
    calls = Counter()

    def replace(n):
        if n == 1:
            rb.register_backend(_counting_backend("rb_self", calls, "new"), replace=True)

    rb.register_backend(_counting_backend("rb_self", calls, "old", on_call=replace))
    try:
        x, c, s = _xcs()
        for _ in range(3):
            assert_bitwise_equal(rb.apply(x, c, s), reference.rotate(x, c, s, rb.Layout.NEOX, 16))
        assert calls == Counter(old=1, new=2)
    finally:
        _drop("rb_self")


def test_backend_unregistered_from_inside_its_own_forward(fakes):
    calls = Counter()
    rb.register_backend(_counting_backend("rb_gone", calls, "gone", on_call=lambda n: rb.unregister_backend("rb_gone")))
    try:
        x, c, s = _xcs()
        for _ in range(3):
            rb.apply(x, c, s)
            rb.apply_cached(x.clone(), None, torch.arange(4), rb.cos_sin_cache(8, 16))
        assert calls["gone"] == 1  # the first call only: it began while the backend was registered
        assert "rb_gone" not in {b.name for b in rb.list_backends()}
    finally:
        _drop("rb_gone")


def test_backend_replaced_by_another_thread_mid_call(fakes):
    """Thread A is inside the backend's forward when the main thread replaces it: A's call ends on
    the old backend, every later call runs the new one."""
    calls = Counter()
    inside, go = threading.Event(), threading.Event()

    def wait_inside(n):
        if n == 1:
            inside.set()
            assert go.wait(30)

    rb.register_backend(_counting_backend("rb_raced", calls, "old", on_call=wait_inside))
    errors = []
    try:
        x, c, s = _xcs()

        def first_call():
            try:
                rb.apply(x, c, s)
            except Exception as exc:  # reported below
                errors.append(exc)

        t = threading.Thread(target=first_call)
        t.start()
        assert inside.wait(30)
        rb.register_backend(_counting_backend("rb_raced", calls, "new"), replace=True)
        go.set()
        t.join()
        assert not errors
        for _ in range(3):
            rb.apply(x, c, s)
        assert calls == Counter(old=1, new=3)
    finally:
        go.set()
        _drop("rb_raced")


def test_a_selection_stored_as_the_registry_changes_does_not_survive(fakes, monkeypatch):
    """Another thread's invalidate() landing between the generation check and the store of a
    selection (simulated: the store itself triggers it) must not leave the stale choice cached."""

    class Racing(dict):
        def __setitem__(self, key, value):
            registry.invalidate()  # the other thread, just before this store lands
            super().__setitem__(key, value)

    monkeypatch.setattr(registry, "_SELECTED", Racing())
    registry.select("cpu", None)
    assert not registry._SELECTED


# ---- override strings: typos are errors, never a silent fallback ---------------------------------

def test_override_strings_name_known_device_types(fakes, monkeypatch):
    for bad, why in (("gpu:triton", "device types among"), ("CPU:npu", "device types among"),
                     ("cpu:eager,cpu:npu", "at most once"), ("eager,npu", "at most once"), ("", "got ''"),
                     ("cuda:", "pairs")):
        with pytest.raises(ValueError, match=f"^ROPE_BACKEND: expected .*{why}"):
            override.parse(bad, "ROPE_BACKEND")
    with pytest.raises(ValueError, match="^use_backend: expected device types among cpu, cuda, npu, got 'gpu'"):
        with rb.use_backend({"gpu": "eager"}):
            pass
    assert "rb_fake_dev" not in override.known_device_types()
    with pytest.raises(ValueError, match="rb_fake_dev"):
        override.parse("rb_fake_dev:eager")
    fakes.add("rb_on_fake_dev", device_types=("rb_fake_dev",))  # a backend declaring a device type makes it known
    assert override.parse("rb_fake_dev:eager") == {"rb_fake_dev": "eager"}
    assert override.parse("cuda:triton,") == {"cuda": "triton"}  # a trailing comma names nothing
    monkeypatch.setenv("ROPE_BACKEND", "")  # set but empty: no override
    x, c, s = _xcs()
    rb.apply(x, c, s)


def test_backend_argument_takes_the_same_strings(fakes, monkeypatch):
    fakes.add("rb_a", priority=10)
    fakes.add("rb_b", priority=5)
    x, c, s = _xcs()
    assert _which(fakes, lambda: rb.apply(x, c, s, backend="cpu:rb_b")) == "rb_b"
    assert _which(fakes, lambda: rb.apply(x, c, s, backend="cuda:eager, cpu:rb_b")) == "rb_b"
    # a device the argument does not name falls through to use_backend, ROPE_BACKEND, priority
    assert _which(fakes, lambda: rb.apply(x, c, s, backend="cuda:eager")) == "rb_a"
    with rb.use_backend("rb_b"):
        assert _which(fakes, lambda: rb.apply(x, c, s, backend="npu:npu")) == "rb_b"
    for bad in ("", "gpu:rb_a", "cpu:rb_a,cpu:rb_b"):
        for _ in range(2):  # a bad string never reaches a prepared runner
            with pytest.raises(ValueError, match="^backend: expected"):
                rb.apply(x, c, s, backend=bad)


# ---- the routing: which path a call takes, and the inline signature keys -----------------------

def _count_facade(monkeypatch) -> Counter:
    """Count calls into ``torch.ops.rope_backends`` (the compile facade) and into the op bodies."""
    from rope_backends import ops

    calls: Counter = Counter()

    class Counting:  # the op packet, counting its calls (torch looks up .default and the rest on it)
        def __init__(self, name, packet):
            self._name, self._packet = name, packet

        def __call__(self, *args, **kwargs):
            calls[self._name] += 1
            return self._packet(*args, **kwargs)

        def __getattr__(self, attr):
            return getattr(self._packet, attr)

    lib = torch.ops.rope_backends
    for name in ("rope", "rope_", "rope_qk", "rope_qk_", "rope_cached", "rope_cached_"):
        monkeypatch.setattr(lib, name, Counting(name, getattr(lib, name)))
    real_run = ops.run
    monkeypatch.setattr(ops, "run", lambda *a, **k: calls.update(["op body"]) or real_run(*a, **k))
    return calls


def test_first_eager_calls_do_not_pass_through_the_compile_facade(fakes, monkeypatch):
    """The first call of every signature in eager mode, without a gradient (in place or not) and
    with one (the eager autograd Function), runs the backend without touching the custom ops; a
    dispatch mode watching (which must see one op) does go through them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = _count_facade(monkeypatch)
    p = Prepared(fakes)  # registering it retires every kept runner: each call below is a first one
    x, c, s = _xcs()
    k = torch.randn(4, 1, 16)
    cache, pos = rb.cos_sin_cache(8, 16), torch.arange(4)
    rb.apply(x, c, s)
    rb.apply(x.clone(), c, s, inplace=True)
    rb.apply_qk(x, k, c, s)
    rb.apply_qk(x.clone(), k.clone(), c, s, inplace=True)
    rb.apply_cached(x.clone(), k.clone(), pos, cache)
    rb.apply_cached(x, None, pos, cache, inplace=False)
    xg = x.clone().requires_grad_()
    rb.apply(xg, c, s).sum().backward()
    rb.apply_cached(xg, None, pos, cache, inplace=False)[0].sum().backward()
    assert calls == Counter(), calls
    assert p.forward == 10  # eight calls and two backwards, each a first one

    class Watching(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watching():
        rb.apply(x, c, s)
        rb.apply_cached(x.clone(), k.clone(), pos, cache)
    assert calls == Counter({"rope": 1, "rope_cached_": 1, "op body": 2}), calls


def test_training_through_a_cache_validates_once_and_keeps_its_runner(fakes, monkeypatch):
    """apply_cached with a gradient (out of place) runs the table path on the gathered cos/sin:
    validated once as a cached call (never again as a table call), its runner kept behind the
    gather for the caller's [T, H*D] tensors; CPU positions are range-checked on every call, and
    outputs and gradients are the reference's bit for bit."""
    from rope_backends import dispatch

    p = Prepared(fakes)
    counted = Counter()
    for name in ("args_for_cached", "args_for_tables"):
        real = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _real=real, _name=name, **kw: counted.update([_name]) or _real(*a, **kw))
    cache = rb.cos_sin_cache(8, 16)
    pos = torch.tensor([3, 0, 7, 5])
    cos, sin = reference.cos_sin_from_cache(pos, cache, None)
    q0, k0 = torch.randn(4, 2 * 16), torch.randn(4, 16)
    gq, gk = torch.randn(4, 2 * 16), torch.randn(4, 16)
    for _ in range(3):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        q_out, k_out = rb.apply_cached(q, k, pos, cache, head_dim=16, inplace=False)
        assert q_out.shape == q.shape and k_out.shape == k.shape
        torch.autograd.backward((q_out, k_out), (gq, gk))
        for got, t, name in ((q_out, q0, "q"), (k_out, k0, "k")):
            want = reference.rotate(t.view(4, -1, 16), cos[:, None], sin[:, None], rb.Layout.NEOX, 16)
            assert_bitwise_equal(got.detach(), want.view(t.shape), name=name)
        for got, g, name in ((q.grad, gq, "grad q"), (k.grad, gk, "grad k")):
            want = reference.rotate(g.view(4, -1, 16), cos[:, None], sin[:, None], rb.Layout.NEOX, 16, conjugate=True)
            assert_bitwise_equal(got, want.view(g.shape), name=name)
    assert counted == Counter(args_for_cached=1), counted
    assert p.forward == 2  # forward and backward planned once each; the kept runners ran the rest
    with pytest.raises(ValueError, match="^positions: expected values in"):
        rb.apply_cached(q0.clone().requires_grad_(), k0.clone().requires_grad_(), pos + 4, cache, head_dim=16,
                        inplace=False)


# The fields of the three inline signature keys (apply, apply_qk, apply_cached in dispatch.py): a
# tensor contributes the same six fields wherever it appears (positions, an integer tensor, no
# grad flag), the options their values (rotary_dim and head_dim also their type: 1 == True), and
# every key the same call state. The recent-signature options (_apply_opts, _cached_opts) are the
# keys' option and state fields.
_TENSOR_FIELDS = ("__class__", "shape", "stride()", "dtype", "device", "requires_grad")
_STATE_FIELDS = ("_grad_enabled()", "_override_context.get()", "_env_raw()", "_debug_raw()")
_TABLE_OPTIONS = ("layout", "rotary_dim.__class__", "rotary_dim", "inplace", "backend")
_CACHED_OPTIONS = ("layout", "rotary_dim.__class__", "rotary_dim", "mrope", "inplace", "head_dim.__class__",
                   "head_dim", "backend")


def _fields(name, grad=True):
    return tuple(f"{name}.{f}" for f in _TENSOR_FIELDS if grad or f != "requires_grad")


_KEY_FIELDS = {
    "apply": ("'apply'", *_fields("x"), *_fields("cos"), *_fields("sin"), *_TABLE_OPTIONS, *_STATE_FIELDS),
    "apply_qk": ("'apply_qk'", *_fields("q"), *_fields("k"), *_fields("cos"), *_fields("sin"), *_TABLE_OPTIONS,
                 *_STATE_FIELDS),
    "apply_cached": ("'apply_cached'", *_fields("q"), *_fields("positions", grad=False), *_fields("cos_sin_cache"),
                     *_CACHED_OPTIONS, *_STATE_FIELDS, *_fields("k")),
}


def _inline_keys():
    """Per function of dispatch.py: the source of every element of its ``key = (...)`` and
    ``key += (...)`` tuples, in order, and of the tuples it returns."""
    import ast
    import inspect

    from rope_backends import dispatch

    tree = ast.parse(inspect.getsource(dispatch))
    keys, returns = {}, {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple) and any(
                    isinstance(t, ast.Name) and t.id == "key" for t in node.targets):
                keys.setdefault(fn.name, []).extend(ast.unparse(e) for e in node.value.elts)
            elif (isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == "key"
                  and isinstance(node.value, ast.Tuple)):
                keys.setdefault(fn.name, []).extend(ast.unparse(e) for e in node.value.elts)
            elif isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple):
                returns.setdefault(fn.name, [ast.unparse(e) for e in node.value.elts])
    return keys, returns


def test_the_three_inline_signature_keys_carry_the_same_fields():
    import inspect

    keys, returns = _inline_keys()
    for name, want in _KEY_FIELDS.items():
        assert tuple(keys[name]) == want, (name, keys[name])
        # every parameter of the public call is in its key (a new option must be keyed)
        params = inspect.signature(getattr(rb, name)).parameters
        assert all(any(f == p or f.startswith(p + ".") for f in want) for p in params), (name, list(params))
    assert tuple(returns["_apply_opts"]) == _TABLE_OPTIONS + _STATE_FIELDS
    assert tuple(returns["_cached_opts"]) == _CACHED_OPTIONS + _STATE_FIELDS + ("no_k",)
