"""The bad-input catalogue (docs/contract.md, "Errors"; ``rope_backends.testing.error_cases()``): each bad
call raises its documented type with a message that starts with the argument's name and says what
was expected and what came; the same message whichever backend would have run; and no input
(in-place target included) is changed by a failing call.
"""

from __future__ import annotations

import pytest
import torch

import rope_backends as rb
from rope_backends.testing import check_error_case, error_cases
from rope_backends.testing.cases import ErrorCase


def test_error_case(target, error_case):
    check_error_case(error_case, target.backend, target.device)


@pytest.mark.parametrize("error_case", error_cases(), ids=lambda e: e.name)
def test_same_error_whichever_backend(error_case: ErrorCase, runnable_targets):
    """Validation comes before backend selection: every runnable backend gives the same message."""
    by_device: dict[str, dict[str, str]] = {}
    for t in runnable_targets:
        kind = torch.device(t.device).type
        if error_case.device_types is not None and kind not in error_case.device_types:
            continue
        by_device.setdefault(t.device, {})[t.backend] = check_error_case(error_case, t.backend, t.device)
    for device, messages in by_device.items():
        assert len(set(messages.values())) == 1, f"{error_case.name} on {device}: messages differ {messages}"
    # and with automatic selection (no backend named)
    if "cpu" in by_device and not error_case.name.startswith(("backend_", "use_backend", "env_")):
        assert check_error_case(error_case, None, "cpu") == next(iter(by_device["cpu"].values()))


def test_catalogue_covers_spec_section_5():
    names = {e.name for e in error_cases()}
    required = {
        "rotary_dim_odd", "rotary_dim_oversized", "rotary_dim_zero", "rotary_dim_float",
        "k_dtype_mismatch", "sin_dtype_mismatch", "k_other_device", "cos_other_device",
        "cos_not_broadcastable", "cos_wrong_last_dim", "positions_float", "positions_out_of_range",
        "positions_out_of_range_debug", "positions_wrong_shape", "positions_3_rows_without_mrope",
        "mrope_length_mismatch", "x_float64", "x_int", "q_2d_without_head_dim", "backend_unknown",
        "backend_wrong_device", "env_bad_string", "layout_unknown", "inplace_expanded_view",
        "inplace_requires_grad", "q_is_k",
    }
    assert required <= names, sorted(required - names)
    assert len(names) >= 60


def test_failed_inplace_call_leaves_inputs_untouched():
    """A bad call caught after some arguments were looked at writes nothing (explicitly, on the
    inputs that would have been rotated)."""
    q = torch.randn(6, 4, 16)
    k = torch.randn(6, 2, 16)
    q0, k0 = q.clone(), k.clone()
    cache = rb.cos_sin_cache(16, 16)
    bad_positions = torch.tensor([0, 1, 2, 3, 4, 16])
    with pytest.raises(ValueError, match="^positions:"):
        rb.apply_cached(q, k, bad_positions, cache)
    assert torch.equal(q.view(torch.int32), q0.view(torch.int32))
    assert torch.equal(k.view(torch.int32), k0.view(torch.int32))


def test_out_of_range_positions_without_debug_give_nan_on_device():
    """Documented behaviour where the range check would cost a sync (non-CPU tensors without
    ROPE_BACKENDS_DEBUG): the rotated part of that token is NaN, the rest is exact. Shown through
    the reference's gather on CPU tensors, which is what every backend must match."""
    from rope_backends.reference import cos_sin_from_cache

    cache = rb.cos_sin_cache(8, 16)
    cos, sin = cos_sin_from_cache(torch.tensor([0, 7, 8, -1]), cache, None)
    assert not torch.isnan(cos[:2]).any() and torch.isnan(cos[2:]).all() and torch.isnan(sin[2:]).all()


def test_inplace_write_is_seen_by_autograd(target):
    """An in-place call bumps the tensor's version counter on every backend, so autograd refuses a
    backward that needs the value it overwrote instead of returning a wrong gradient."""
    dev = target.device
    w = torch.randn(4, 2, 16, device=dev, requires_grad=True)
    cache = rb.cos_sin_cache(8, 16, device=dev)
    cos, sin = cache[:4, :8][:, None], cache[:4, 8:][:, None]
    calls = {
        "apply": lambda q, k: rb.apply(q, cos, sin, inplace=True, backend=target.backend),
        "apply_qk": lambda q, k: rb.apply_qk(q, k, cos, sin, inplace=True, backend=target.backend),
        "apply_cached": lambda q, k: rb.apply_cached(q, k, torch.arange(4, device=dev), cache, backend=target.backend),
    }
    for name, call in calls.items():
        for _ in range(2):  # the second call of a signature takes the dispatcher's cached path
            q = torch.randn(4, 2, 16, device=dev)
            k = torch.randn(4, 1, 16, device=dev)
            y = (w * q).sum() + (w[:, :1] * k).sum()  # saves q and k for the backward
            versions = (q._version, k._version)
            with torch.no_grad():
                call(q, k)
            assert q._version > versions[0], name
            if name != "apply":
                assert k._version > versions[1], name
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.backward()


def test_negative_bit_views_are_read_as_their_values(target):
    """torch's lazily negated views (``.conj().imag`` of a complex tensor, ``torch._neg_view``)
    hold the negation in a bit, not in memory: every backend must read their values, as the
    reference does through torch ops -- for the rotated tensors out of place and for cos/sin,
    positions and the cache -- on the first call of a signature and on the repeated one."""
    from rope_backends import reference
    from rope_backends.testing import assert_bitwise_equal

    dev, b = target.device, target.backend
    g = torch.Generator().manual_seed(11)

    def neg_view(t):  # same values, carried as -(-t) with the negative bit set
        v = torch._neg_view(-t)
        assert v.is_neg() and torch.equal(v, t)
        return v

    x = torch.randn(4, 2, 16, generator=g).to(dev)
    k = torch.randn(4, 1, 16, generator=g).to(dev)
    cache = rb.cos_sin_cache(8, 16, device=dev)
    pos = torch.tensor([3, 0, 7, 5], device=dev)
    cos, sin = reference.cos_sin_from_cache(pos, cache, None)
    cos, sin = cos[:, None], sin[:, None]
    want = rb.apply(x, cos, sin, backend="eager")
    want_qk = rb.apply_qk(x, k, cos, sin, backend="eager")
    for _ in range(2):  # the second call of each signature takes the dispatcher's prepared runner
        assert_bitwise_equal(rb.apply(neg_view(x), cos, sin, backend=b), want, name="apply, x negated view")
        assert_bitwise_equal(rb.apply(x, neg_view(cos), neg_view(sin), backend=b), want, name="apply, cos/sin")
        for got, w in zip(rb.apply_qk(x, neg_view(k), cos, sin, backend=b), want_qk):
            assert_bitwise_equal(got, w, name="apply_qk, k negated view")
        got = rb.apply_cached(x, k, neg_view(pos), neg_view(cache), inplace=False, backend=b)
        for out, w in zip(got, want_qk):
            assert_bitwise_equal(out, w, name="apply_cached, positions/cache negated views")
        got = rb.apply_cached(neg_view(x), None, pos, cache, inplace=False, backend=b)
        assert_bitwise_equal(got[0], want, name="apply_cached, q negated view")


def test_negated_view_upstream_gradient_is_read_as_values(target):
    """grad_outputs reach a backward as the caller gave them: a lazily negated view there must
    give the gradient of its values on every backend (eager path and the custom op's backward)."""
    from rope_backends.testing import assert_bitwise_equal

    dev, b = target.device, target.backend
    g0 = torch.Generator().manual_seed(12)
    x = torch.randn(4, 2, 16, generator=g0).to(dev)
    k = torch.randn(4, 1, 16, generator=g0).to(dev)
    g = torch.randn(4, 2, 16, generator=g0).to(dev)
    gk = torch.randn(4, 1, 16, generator=g0).to(dev)
    cos, sin = rb.cos_sin(torch.arange(4, device=dev), 16)
    cos, sin = cos[:, None], sin[:, None]
    xe = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(rb.apply(xe, cos, sin, backend="eager"), xe, g)
    for call in (lambda t: rb.apply(t, cos, sin, backend=b),
                 lambda t: torch.ops.rope_backends.rope(t, cos, sin, "neox", 16, False, b)):
        for _ in range(2):
            xg = x.clone().requires_grad_()
            (got,) = torch.autograd.grad(call(xg), xg, torch._neg_view(-g))
            assert_bitwise_equal(got, want, name="grad through a negated-view grad_outputs")
    qg, kg = x.clone().requires_grad_(), k.clone().requires_grad_()
    qe, ke = x.clone().requires_grad_(), k.clone().requires_grad_()
    want_qk = torch.autograd.grad(rb.apply_qk(qe, ke, cos, sin, backend="eager"), (qe, ke), (g, gk))
    got_qk = torch.autograd.grad(rb.apply_qk(qg, kg, cos, sin, backend=b), (qg, kg),
                                 (torch._neg_view(-g), torch._neg_view(-gk)))
    for got, w in zip(got_qk, want_qk):
        assert_bitwise_equal(got, w, name="apply_qk grad through negated-view grad_outputs")


def test_errors_doc_is_generated_from_the_cases():
    """docs/errors.md is what rope_backends.testing.catalogue renders from error_cases(): the
    refusal table (one row per rule) and the catalogue (one row per case, its message)."""
    from pathlib import Path

    from rope_backends.testing import catalogue

    doc = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
    text = catalogue.render()
    assert doc.read_text(encoding="utf-8") == text, (
        "docs/errors.md is stale: run `python -m rope_backends.testing.catalogue docs/errors.md`")
    for case in error_cases():
        assert f"`{case.name}`" in text and case.why in text.replace("\\|", "|"), case.name
