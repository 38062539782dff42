"""The validated-signature cache in spec.args_for_tables: a hit must mean "same metadata", so it
can never let a bad call through, and it must stay bounded."""

import pytest
import torch

import rope_backends as rb
from rope_backends import spec


def _inputs():
    x = torch.randn(3, 4, 16)
    cos, sin = rb.cos_sin(torch.arange(3), 16)
    return x, cos[:, None], sin[:, None]


def test_hit_reuses_checks_and_gives_identical_results():
    x, cos, sin = _inputs()
    spec._TABLE_SIGNATURES.clear()
    first = rb.apply(x, cos, sin)
    assert len(spec._TABLE_SIGNATURES) == 1
    second = rb.apply(x, cos, sin)
    assert len(spec._TABLE_SIGNATURES) == 1
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
    monkeypatch.setattr(spec, "_MAX_SIGNATURES", 4)
    spec._TABLE_SIGNATURES.clear()
    for t in range(1, 10):
        x = torch.randn(t, 2, 8)
        cos, sin = rb.cos_sin(torch.arange(t), 8)
        rb.apply(x, cos[:, None], sin[:, None])
    assert len(spec._TABLE_SIGNATURES) <= 4
