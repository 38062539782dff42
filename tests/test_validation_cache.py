"""The validated-signature cache of validation.args_for_tables (signatures.py): a hit must mean "same metadata", so it
can never let a bad call through, and it must stay bounded."""

import pytest
import torch

import rope_backends as rb
from rope_backends import modes, signatures, validation


def _inputs():
    x = torch.randn(3, 4, 16)
    cos, sin = rb.cos_sin(torch.arange(3), 16)
    return x, cos[:, None], sin[:, None]


def test_hit_reuses_checks_and_gives_identical_results():
    x, cos, sin = _inputs()
    signatures._TABLE_SIGNATURES.clear()
    first = rb.apply(x, cos, sin)
    assert len(signatures._TABLE_SIGNATURES) == 1
    second = rb.apply(x, cos, sin)
    assert len(signatures._TABLE_SIGNATURES) == 1
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda x, c, s: dict(x=x, cos=c, sin=s, inplace=1), TypeError),  # 1 == True as a dict key
        (lambda x, c, s: dict(x=x.double(), cos=c, sin=s), TypeError),
        (lambda x, c, s: dict(x=x, cos=c[..., :4], sin=s[..., :4]), ValueError),
        (lambda x, c, s: dict(x=x, cos=c, sin=s, rotary_dim=15), ValueError),
        (lambda x, c, s: dict(x=x, cos=c, sin=s, rotary_dim=True), TypeError),
        (lambda x, c, s: dict(x=x.expand(2, 3, 4, 16), cos=c, sin=s, inplace=True), ValueError),
    ],
)
def test_a_cached_signature_never_hides_an_error(mutate, error):
    x, cos, sin = _inputs()
    rb.apply(x, cos, sin)  # a valid signature is now cached
    kwargs = mutate(x, cos, sin)
    with pytest.raises(error):
        rb.apply(kwargs.pop("x"), kwargs.pop("cos"), kwargs.pop("sin"), **kwargs)


def test_q_is_k_is_checked_on_every_hit():
    q = torch.randn(3, 4, 16)
    k = torch.randn(3, 4, 16)
    _, cos, sin = _inputs()
    rb.apply_qk(q, k, cos, sin)  # same metadata as (q, q): the signature is cached
    with pytest.raises(ValueError, match="k"):
        rb.apply_qk(q, q, cos, sin)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(signatures, "_MAX_SIGNATURES", 4)
    signatures._TABLE_SIGNATURES.clear()
    for t in range(1, 10):
        x = torch.randn(t, 2, 8)
        cos, sin = rb.cos_sin(torch.arange(t), 8)
        rb.apply(x, cos[:, None], sin[:, None])
    assert len(signatures._TABLE_SIGNATURES) <= 4


# ---- the partial-rotary table check (validation.check_partial_rotary) --------------------------------

def _half(n, d):
    cos, sin = rb.cos_sin(torch.arange(1, n + 1), d)
    return cos[:, None], sin[:, None]


def _dup(n, rot, layout):
    cos, sin = rb.cos_sin(torch.arange(1, n + 1), rot)
    if layout == "neox":
        return torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    return cos.repeat_interleave(2, -1)[:, None], sin.repeat_interleave(2, -1)[:, None]


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_partial_rotary_table(target, layout):
    """head_dim 16, width 8 without rotary_dim=: the half form of a full rotation passes (first and
    repeated calls); the duplicated form of rotary_dim 8 is refused, also on a signature whose
    runner is kept; rotary_dim= decides either reading; a table that rotates nothing passes."""
    from rope_backends import reference
    from rope_backends.testing import assert_bitwise_equal

    dev, b = target.device, target.backend
    lay = rb.Layout(layout)
    x = torch.randn(4, 2, 16).to(dev)
    half_c, half_s = (t.to(dev) for t in _half(4, 16))  # [4, 1, 8]: one value per pair of 16 dims
    dup_c, dup_s = (t.to(dev) for t in _dup(4, 8, layout))  # [4, 1, 8]: rotary_dim 8, duplicated
    for _ in range(3):
        assert_bitwise_equal(rb.apply(x, half_c, half_s, layout=layout, backend=b),
                             reference.rotate(x, half_c, half_s, lay, 16), name="half form, full rotation")
    for _ in range(2):  # the signature of the call above: its runner must check these values too
        with pytest.raises(ValueError, match="^cos: expected rotary_dim= for cos/sin of width head_dim//2=8"):
            rb.apply(x, dup_c, dup_s, layout=layout, backend=b)
        with pytest.raises(ValueError, match="^cos: expected rotary_dim="):
            rb.apply_qk(x, x.clone(), dup_c, dup_s, layout=layout, backend=b)
    hc, hs = (dup_c[..., :4], dup_s[..., :4]) if layout == "neox" else (dup_c[..., ::2], dup_s[..., ::2])
    assert_bitwise_equal(rb.apply(x, dup_c, dup_s, layout=layout, rotary_dim=8, backend=b),
                         reference.rotate(x, hc, hs, lay, 8), name="rotary_dim=8: the duplicated form")
    assert_bitwise_equal(rb.apply(x, dup_c, dup_s, layout=layout, rotary_dim=16, backend=b),
                         reference.rotate(x, dup_c, dup_s, lay, 16), name="rotary_dim=16: the half form")
    full_c, full_s = (t.to(dev) for t in _dup(4, 16, layout))  # the duplicated form of a full rotation: width 16
    for _ in range(3):
        assert_bitwise_equal(rb.apply(x, full_c, full_s, layout=layout, backend=b),
                             reference.rotate(x, half_c, half_s, lay, 16), name="duplicated form, full rotation")
    ones, zeros = torch.ones(4, 1, 8, device=dev), torch.zeros(4, 1, 8, device=dev)
    assert_bitwise_equal(rb.apply(x, ones, zeros, layout=layout, backend=b), x, name="cos 1, sin 0")


def test_partial_rotary_values_are_read_only_where_that_costs_no_sync(monkeypatch):
    monkeypatch.delenv("ROPE_BACKENDS_DEBUG", raising=False)
    assert modes.values_readable(torch.zeros(2))
    assert not modes.values_readable(torch.zeros(2, device="meta"))
    from unittest import mock
    device_tensor = mock.Mock(device=torch.device("cuda"))
    with mock.patch.object(modes, "plain", lambda t: t):
        assert not modes.values_readable(device_tensor)
        monkeypatch.setenv("ROPE_BACKENDS_DEBUG", "1")
        assert modes.values_readable(device_tensor)


# ---- the C++-guarded recent-signature path of the dispatcher ---------------------------------

class _CountingDict(dict):
    """The dispatcher's runner table, counting lookups: a hit on the recent-signature path makes
    none."""

    gets = 0

    def get(self, key, default=None):
        type(self).gets += 1
        return super().get(key, default)


def _fast_path_available():
    from rope_backends import dispatch

    return dispatch._TensorGuards is not None


def test_recent_signatures_skip_the_signature_lookup(monkeypatch):
    from rope_backends import dispatch

    if not _fast_path_available():
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards: the signature path alone")
    monkeypatch.setattr(dispatch, "_RUNNERS", _CountingDict())
    monkeypatch.setattr(dispatch, "_RECENT_APPLY", [])
    monkeypatch.setattr(dispatch, "_RECENT_CACHED", [])
    x, cos, sin = _inputs()
    first = rb.apply(x, cos, sin, rotary_dim=16)
    _CountingDict.gets = 0
    for _ in range(3):
        again = rb.apply(x.clone(), cos.clone(), sin.clone(), rotary_dim=16)  # other tensors, same metadata
    assert _CountingDict.gets == 0 and torch.equal(again, first)
    q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
    cache, pos = rb.cos_sin_cache(8, 16), torch.arange(5)
    rb.apply_cached(q.clone(), k.clone(), pos, cache, head_dim=16)
    _CountingDict.gets = 0
    rb.apply_cached(q.clone(), k.clone(), pos, cache, head_dim=16)
    assert _CountingDict.gets == 0


@pytest.mark.parametrize("change", ["negative view", "dtype", "strides", "grad", "option", "registry"])
def test_recent_signatures_never_serve_another_call(change, monkeypatch):
    """What the C++ guard or the options tuple must tell apart from the recorded call: each change
    takes the full path (the lookup runs) and gives the reference's result."""
    from rope_backends import dispatch, reference
    from rope_backends.contract import Layout, RopeArgs

    if not _fast_path_available():
        pytest.skip("this torch has no torch._C._dynamo.guards.TensorGuards: the signature path alone")
    monkeypatch.setattr(dispatch, "_RUNNERS", _CountingDict())
    monkeypatch.setattr(dispatch, "_RECENT_APPLY", [])
    x, cos, sin = _inputs()
    rb.apply(x, cos, sin, rotary_dim=16)
    _CountingDict.gets = 0
    kw = {"rotary_dim": 16}
    if change == "negative view":
        x = torch._neg_view(x.clone())
    elif change == "dtype":
        x = x.double().float().half()
    elif change == "strides":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif change == "grad":
        x = x.clone().requires_grad_()
    elif change == "option":
        kw["layout"] = "interleaved"
    else:
        rb.registry.invalidate()
    got = rb.apply(x, cos, sin, **kw)
    assert _CountingDict.gets >= 1, "the recent-signature path served a call it must not"
    lay = Layout(kw.get("layout", "neox"))
    want = reference.run(RopeArgs((x.detach().resolve_neg(),), False, lay, 16, cos=cos, sin=sin))[0]
    assert torch.equal(got.detach(), want)


def test_debug_mode_is_part_of_the_validated_signature(monkeypatch):
    """On a GPU the partial-rotary value check runs only with ROPE_BACKENDS_DEBUG=1. A signature
    validated without it must not let the same signature through unchecked once it is set (found on
    the H200: the eager backend on CUDA passed a duplicated-form table in debug mode)."""
    from rope_backends import dispatch

    # pretend these CPU tensors are a GPU's: values readable only in debug mode
    monkeypatch.setattr(validation, "values_readable", lambda t: modes.debug_checks())
    monkeypatch.setattr(dispatch, "_RECENT_APPLY", [])
    signatures._TABLE_SIGNATURES.clear()
    dispatch._RUNNERS.clear()
    x = torch.randn(4, 2, 16)
    half = torch.rand(4, 1, 4)
    cos, sin = torch.cat((half, half), -1), torch.cat((half, half), -1)  # duplicated form of rotary_dim 8
    monkeypatch.delenv("ROPE_BACKENDS_DEBUG", raising=False)
    rb.apply(x, cos, sin)  # not checked: values not readable
    monkeypatch.setenv("ROPE_BACKENDS_DEBUG", "1")
    with pytest.raises(ValueError, match="cos"):
        rb.apply(x, cos, sin)


def test_spec_re_exports_the_split_modules():
    """``rope_backends.spec`` (the module before the split) still gives every public name, as the
    very objects of the modules that now hold them."""
    from rope_backends import contract, memory, spec

    for name in spec.__all__:
        home = next(m for m in (contract, validation, memory, modes) if name in m.__all__)
        assert getattr(spec, name) is getattr(home, name), name
    assert {"Layout", "MRope", "RopeArgs", "args_for_tables", "args_for_cached", "debug_checks"} <= set(spec.__all__)
