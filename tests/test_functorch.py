"""Forward-mode AD and functorch transforms on every backend: ``torch.autograd.forward_ad`` (dual
tensors, in place and out of place), ``torch.func.jvp``, ``vmap`` of ``apply`` / ``apply_qk`` /
``apply_cached`` (batched x, batched cos/sin, other in_dims, unbatched k, nested), ``jacrev``,
``jacfwd`` and ``vmap`` of ``grad`` -- every result bit-exact against the reference applied per
sample (or per basis vector for Jacobians). A backend only ever sees plain tensors: the Triton
kernels run here through the interpreter (``TRITON_INTERPRET=1 ... --backend triton``).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jacfwd, jacrev, jvp, vmap

import rope_backends as rb
from rope_backends import reference
from rope_backends.testing import assert_bitwise_equal

NEOX, INTER = rb.Layout.NEOX, rb.Layout.INTERLEAVED


def _ref(x, cos, sin, layout=NEOX, conjugate=False, rotary_dim=None):
    return reference.rotate(x, cos, sin, layout, rotary_dim or x.shape[-1], conjugate)


def _tables(n=3, d=16, generator=None):
    cos, sin = rb.cos_sin(torch.arange(1, n + 1) * 3, d)
    return cos[:, None], sin[:, None]


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_ad_tangent_is_the_same_rotation(target, dtype):
    dev, b = target.device, target.backend
    c, s = (t.to(dev) for t in _tables())
    x, t = _randn(3, 2, 16, seed=1, dtype=dtype).to(dev), _randn(3, 2, 16, seed=2, dtype=dtype).to(dev)
    k, tk = _randn(3, 1, 16, seed=3, dtype=dtype).to(dev), _randn(3, 1, 16, seed=4, dtype=dtype).to(dev)
    for layout in (NEOX, INTER):
        for _ in range(2):  # the second call of a signature: no prepared runner may drop the tangent
            with fwAD.dual_level():
                out = rb.apply(fwAD.make_dual(x, t), c, s, layout=layout, backend=b)
                primal, tangent = fwAD.unpack_dual(out)
                assert tangent is not None, "the tangent was dropped"
                assert_bitwise_equal(primal, _ref(x, c, s, layout), name="primal")
                assert_bitwise_equal(tangent, _ref(t, c, s, layout), name="tangent")
                qo, ko = rb.apply_qk(fwAD.make_dual(x, t), fwAD.make_dual(k, tk), c, s, layout=layout, backend=b)
                assert_bitwise_equal(fwAD.unpack_dual(qo).tangent, _ref(t, c, s, layout), name="q tangent")
                assert_bitwise_equal(fwAD.unpack_dual(ko).tangent, _ref(tk, c, s, layout), name="k tangent")
                # in place: the primal and the tangent of the target are both rotated
                d = fwAD.make_dual(x.clone(), t.clone())
                assert rb.apply(d, c, s, layout=layout, inplace=True, backend=b) is d
                primal, tangent = fwAD.unpack_dual(d)
                assert_bitwise_equal(primal, _ref(x, c, s, layout), name="in-place primal")
                assert_bitwise_equal(tangent, _ref(t, c, s, layout), name="in-place tangent")


def test_forward_ad_through_a_cache(target):
    dev, b = target.device, target.backend
    cache = rb.cos_sin_cache(16, 16, device=dev)
    pos = torch.tensor([3, 0, 9], device=dev)
    c, s = reference.cos_sin_from_cache(pos, cache, None)
    c, s = c[:, None], s[:, None]
    q, t = _randn(3, 2 * 16, seed=5).to(dev), _randn(3, 2 * 16, seed=6).to(dev)
    want, want_t = _ref(q.view(3, 2, 16), c, s), _ref(t.view(3, 2, 16), c, s)
    with fwAD.dual_level():
        out, none = rb.apply_cached(fwAD.make_dual(q, t), None, pos, cache, head_dim=16, inplace=False, backend=b)
        assert none is None
        assert_bitwise_equal(fwAD.unpack_dual(out).primal.view(3, 2, 16), want, name="primal")
        assert_bitwise_equal(fwAD.unpack_dual(out).tangent.view(3, 2, 16), want_t, name="tangent")
        d = fwAD.make_dual(q.clone(), t.clone())
        rb.apply_cached(d, None, pos, cache, head_dim=16, backend=b)  # in place (the default)
        assert_bitwise_equal(fwAD.unpack_dual(d).tangent.view(3, 2, 16), want_t, name="in-place tangent")
    primal, tangent = jvp(lambda a: rb.apply_cached(a, None, pos, cache, head_dim=16, inplace=False, backend=b)[0],
                          (q,), (t,))
    assert_bitwise_equal(tangent.view(3, 2, 16), want_t, name="torch.func.jvp tangent")


def test_func_jvp(target):
    dev, b = target.device, target.backend
    c, s = (t.to(dev) for t in _tables())
    x, t = _randn(3, 2, 16, seed=7).to(dev), _randn(3, 2, 16, seed=8).to(dev)
    k, tk = _randn(3, 1, 16, seed=9).to(dev), _randn(3, 1, 16, seed=10).to(dev)
    out, tangent = jvp(lambda a: rb.apply(a, c, s, layout="interleaved", backend=b), (x,), (t,))
    assert_bitwise_equal(out, _ref(x, c, s, INTER), name="primal")
    assert_bitwise_equal(tangent, _ref(t, c, s, INTER), name="tangent")
    (qo, ko), (tq, tk_out) = jvp(lambda a, kk: rb.apply_qk(a, kk, c, s, backend=b), (x, k), (t, tk))
    assert_bitwise_equal(tq, _ref(t, c, s), name="q tangent")
    assert_bitwise_equal(tk_out, _ref(tk, c, s), name="k tangent")


def test_vmap_apply(target):
    dev, b = target.device, target.backend
    c, s = (t.to(dev) for t in _tables())
    X = _randn(4, 3, 2, 16, seed=11).to(dev)
    want = _ref(X, c, s)  # the reference broadcasts over the leading batch dim: per sample
    assert_bitwise_equal(vmap(lambda a: rb.apply(a, c, s, backend=b))(X), want, name="vmap(apply)")
    assert_bitwise_equal(vmap(lambda a: rb.apply(a, c, s, backend=b), in_dims=1)(X.movedim(0, 1).contiguous()),
                         want, name="vmap(apply), in_dims=1")
    # batched tables, unbatched x; both batched; batch dim in the middle of cos
    C, S = _randn(4, 3, 1, 8, seed=12).to(dev), _randn(4, 3, 1, 8, seed=13).to(dev)
    x = X[0]
    per_sample = torch.stack([_ref(x, C[i], S[i]) for i in range(4)])
    assert_bitwise_equal(vmap(lambda cc, ss: rb.apply(x, cc, ss, backend=b))(C, S), per_sample, name="batched cos/sin")
    per_sample = torch.stack([_ref(X[i], C[i], S[i]) for i in range(4)])
    assert_bitwise_equal(vmap(lambda a, cc, ss: rb.apply(a, cc, ss, backend=b), in_dims=(0, 1, 1))(
        X, C.movedim(0, 1), S.movedim(0, 1)), per_sample, name="x and cos/sin batched")
    per_sample = torch.stack([_ref(X[i], C[i], s) for i in range(4)])
    assert_bitwise_equal(vmap(lambda a, cc: rb.apply(a, cc, s, backend=b))(X, C), per_sample, name="cos batched, sin not")
    # nested, in place, and a per-sample rank smaller than the table's broadcast partner
    XX = _randn(2, 4, 3, 2, 16, seed=14).to(dev)
    assert_bitwise_equal(vmap(vmap(lambda a: rb.apply(a, c, s, backend=b)))(XX), _ref(XX, c, s), name="vmap(vmap)")
    assert_bitwise_equal(vmap(lambda a: rb.apply(a, c, s, inplace=True, backend=b))(X.clone()), want,
                         name="vmap(apply, inplace=True)")


def test_vmap_apply_qk_and_cached(target):
    dev, b = target.device, target.backend
    c, s = (t.to(dev) for t in _tables())
    Q, K = _randn(4, 3, 4, 16, seed=15).to(dev), _randn(4, 3, 2, 16, seed=16).to(dev)
    qo, ko = vmap(lambda q, k: rb.apply_qk(q, k, c, s, backend=b))(Q, K)
    assert_bitwise_equal(qo, _ref(Q, c, s), name="q")
    assert_bitwise_equal(ko, _ref(K, c, s), name="k")
    k1 = K[0]
    qo, ko = vmap(lambda q, k: rb.apply_qk(q, k, c, s, layout="interleaved", backend=b), in_dims=(0, None))(Q, k1)
    assert_bitwise_equal(qo, _ref(Q, c, s, INTER), name="q, k unbatched")
    assert_bitwise_equal(ko, torch.stack([_ref(k1, c, s, INTER)] * 4), name="k unbatched")
    Qi, Ki = Q.clone(), K.clone()
    vmap(lambda q, k: rb.apply_qk(q, k, c, s, inplace=True, backend=b))(Qi, Ki)
    assert_bitwise_equal(Qi, _ref(Q, c, s), name="q in place")
    assert_bitwise_equal(Ki, _ref(K, c, s), name="k in place")
    cache = rb.cos_sin_cache(16, 16, device=dev)
    pos = torch.tensor([[3, 0, 9], [1, 1, 15], [0, 2, 4], [7, 7, 7]], device=dev)
    qo, ko = vmap(lambda q, k, p: rb.apply_cached(q, k, p, cache, inplace=False, backend=b))(Q, K, pos)
    for i in range(4):
        ci, si = reference.cos_sin_from_cache(pos[i], cache, None)
        assert_bitwise_equal(qo[i], _ref(Q[i], ci[:, None], si[:, None]), name=f"cached q[{i}]")
        assert_bitwise_equal(ko[i], _ref(K[i], ci[:, None], si[:, None]), name=f"cached k[{i}]")


def test_vmap_positions_are_range_checked_on_cpu(target):
    if torch.device(target.device).type != "cpu":
        pytest.skip("positions are range-checked on CPU tensors (elsewhere under ROPE_BACKENDS_DEBUG=1)")
    cache = rb.cos_sin_cache(16, 16)
    pos = torch.tensor([[3, 0, 9], [1, 1, 16]])
    Q = _randn(2, 3, 2, 16, seed=17)
    with pytest.raises(ValueError, match="^positions: expected values in"):
        vmap(lambda q, p: rb.apply_cached(q, None, p, cache, inplace=False, backend=target.backend))(Q, pos)


def _basis(shape, dev):
    n = 1
    for d in shape:
        n *= d
    return torch.eye(n, device=dev).reshape(n, *shape)


def test_jacobians(target):
    """jacrev (vmap of the backward) and jacfwd (vmap of jvp): row i of d(out)/d(x) is the rotation
    by -theta of the basis vector e_i; column j is the rotation by +theta of e_j."""
    dev, b = target.device, target.backend
    c, s = (t[:1].to(dev) for t in _tables())
    shape = (1, 2, 8)
    c, s = c[..., :4], s[..., :4]
    x = _randn(*shape, seed=18).to(dev)
    e = _basis(shape, dev)
    for layout in (NEOX, INTER):
        f = (lambda a, layout=layout: rb.apply(a, c, s, layout=layout, backend=b))
        rows = _ref(e, c, s, layout, conjugate=True)  # [n_out, *in]
        assert_bitwise_equal(jacrev(f)(x), rows.reshape(*shape, *shape), name=f"jacrev {layout.value}")
        cols = _ref(e, c, s, layout)  # [n_in, *out]
        assert_bitwise_equal(jacfwd(f)(x), cols.reshape(-1, *shape).movedim(0, -1).reshape(*shape, *shape),
                             name=f"jacfwd {layout.value}")
    q, k = x, _randn(1, 1, 8, seed=19).to(dev)
    jq, jk = jacrev(lambda a, kk: rb.apply_qk(a, kk, c, s, backend=b)[1], argnums=(0, 1))(q, k)
    assert not jq.any()  # k's output does not depend on q
    assert_bitwise_equal(jk, _ref(_basis((1, 1, 8), dev), c, s, NEOX, conjugate=True).reshape(1, 1, 8, 1, 1, 8),
                         name="jacrev apply_qk (k)")


def test_vmap_of_grad(target):
    dev, b = target.device, target.backend
    c, s = (t.to(dev) for t in _tables())
    X, G = _randn(4, 3, 2, 16, seed=20).to(dev), _randn(4, 3, 2, 16, seed=21).to(dev)
    got = vmap(grad(lambda a, g: (rb.apply(a, c, s, backend=b) * g).sum()))(X, G)
    assert_bitwise_equal(got, _ref(G, c, s, conjugate=True), name="vmap(grad)")


def test_tangents_on_tables_are_refused(target):
    """A tangent on cos/sin (or the cache) would be dropped: refused naming the argument the
    caller passed, on every backend."""
    dev, b = target.device, target.backend
    c, s = (t.to(dev) for t in _tables())
    x = _randn(3, 2, 16, seed=22).to(dev)
    with pytest.raises(ValueError, match="^cos: expected cos/sin without a forward-mode tangent"):
        jvp(lambda cc: rb.apply(x, cc, s, backend=b), (c,), (torch.ones_like(c),))
    cache = rb.cos_sin_cache(16, 16, device=dev)
    pos = torch.arange(3, device=dev)
    with pytest.raises(ValueError, match="^cos_sin_cache: expected cos_sin_cache without a forward-mode tangent"):
        jvp(lambda cc: rb.apply_cached(x, None, pos, cc, inplace=False, backend=b)[0], (cache,), (torch.ones_like(cache),))
