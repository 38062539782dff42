"""The torch.library facade (rope_backends/ops.py): ``opcheck`` on every custom op (schema,
autograd registration, fake tensors, AOT dispatch), and ``torch.compile(fullgraph=True)`` of
functions calling ``rb.apply``, ``rb.apply_qk`` and ``rb.apply_cached`` (in place and out of
place) and a backward through a compiled function -- all bit-equal to eager.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import rope_backends as rb
from rope_backends.testing import assert_bitwise_equal

OPS = torch.ops.rope_backends


def _inputs(dtype=torch.float32, T=5, H=3, Hk=2, D=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, D, generator=g).to(dtype)
    k = torch.randn(T, Hk, D, generator=g).to(dtype)
    cos, sin = rb.cos_sin(torch.randint(0, 100, (T,), generator=g), D)
    return x, k, cos[:, None], sin[:, None]


def _opcheck_cases():
    x, k, c, s = _inputs()
    cache = rb.cos_sin_cache(32, 16)
    pos = torch.tensor([3, 0, 31, 7, 7])
    pos3 = torch.stack((pos, pos.flip(0), pos % 5))
    mrope = list(rb.mrope.chunked([2, 3, 3]).axis_map)
    half = c[..., :4], s[..., :4]
    return [
        ("rope", OPS.rope.default, (x.clone().requires_grad_(), c, s, "neox", 16, False, "")),
        ("rope_conjugate_partial", OPS.rope.default, (x.clone().requires_grad_(), *half, "interleaved", 8, True, "eager")),
        ("rope_", OPS.rope_.default, (x.clone(), c, s, "neox", 16, False, "")),
        ("rope_qk", OPS.rope_qk.default, (x.clone().requires_grad_(), k.clone().requires_grad_(), c, s, "neox", 16, False, "")),
        ("rope_qk_partial", OPS.rope_qk.default, (x.clone().requires_grad_(), k.clone().requires_grad_(), *half, "interleaved", 8, False, "")),
        ("rope_qk_", OPS.rope_qk_.default, (x.clone(), k.clone(), c, s, "interleaved", 16, True, "")),
        ("rope_cached", OPS.rope_cached.default, (x.clone(), k.clone(), pos, cache, None, "neox", 16, "")),
        ("rope_cached_k_none_mrope", OPS.rope_cached.default, (x.clone(), None, pos3, cache, mrope, "interleaved", 16, "")),
        ("rope_cached_", OPS.rope_cached_.default, (x.clone(), k.clone(), pos, cache, None, "neox", 16, "")),
        ("rope_cached_mrope_", OPS.rope_cached_.default, (x.clone(), k.clone(), pos3, cache, mrope, "neox", 16, "")),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, op, args):
    opcheck(op, args)


def test_every_custom_op_is_opchecked():
    ops_here = {n for n in dir(OPS) if not n.startswith("_") and n not in ("name",)}
    checked = {c[1].name().split("::")[1].split(".")[0] for c in _opcheck_cases()}
    assert {"rope", "rope_", "rope_qk", "rope_qk_", "rope_cached", "rope_cached_"} <= checked
    assert checked >= {n for n in ops_here if n.startswith("rope")}, ops_here - checked


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compile_apply(dtype):
    x, k, c, s = _inputs(dtype)

    def f(x, c, s):
        return rb.apply(x, c, s, layout="interleaved")

    assert_bitwise_equal(_compiled(f)(x, c, s), f(x, c, s))


def test_compile_apply_qk_inplace_and_out():
    x, k, c, s = _inputs(torch.float16)

    def out_of_place(q, k, c, s):
        return rb.apply_qk(q, k, c, s, rotary_dim=8)

    def in_place(q, k, c, s):
        rb.apply_qk(q, k, c, s, inplace=True)
        return q * 1, k * 1

    want = out_of_place(x, k, c[..., :4], s[..., :4])
    got = _compiled(out_of_place)(x, k, c[..., :4], s[..., :4])
    assert_bitwise_equal(got[0], want[0])
    assert_bitwise_equal(got[1], want[1])
    q1, k1, q2, k2 = x.clone(), k.clone(), x.clone(), k.clone()
    in_place(q1, k1, c, s)
    _compiled(in_place)(q2, k2, c, s)
    assert_bitwise_equal(q2, q1)
    assert_bitwise_equal(k2, k1)


@pytest.mark.parametrize("inplace", [True, False])
def test_compile_apply_cached(inplace):
    T, D = 6, 32
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(T, (4 + 2 + 2) * D, generator=g).to(torch.bfloat16)
    cache = rb.cos_sin_cache(64, D)
    pos = torch.randint(0, 64, (3, T), generator=g)
    mrope = rb.mrope.interleaved([6, 5, 5])

    def f(qkv, pos, cache):
        q, k = qkv[:, : 4 * D], qkv[:, 4 * D : 6 * D]
        q2, k2 = rb.apply_cached(q, k, pos, cache, head_dim=D, mrope=mrope, inplace=inplace)
        return q2 * 1, k2 * 1

    a, b = qkv.clone(), qkv.clone()
    want = f(a, pos, cache)
    got = _compiled(f)(b, pos, cache)
    assert_bitwise_equal(got[0], want[0])
    assert_bitwise_equal(got[1], want[1])
    assert_bitwise_equal(b, a)  # the fused buffer: rotated in place, or untouched


def test_compile_backward():
    x, k, c, s = _inputs()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    def loss(x, k, c, s):
        q2, k2 = rb.apply_qk(x, k, c, s)
        return (q2 * w).sum() + k2.sum()

    x1, k1 = x.clone().requires_grad_(), k.clone().requires_grad_()
    x2, k2 = x.clone().requires_grad_(), k.clone().requires_grad_()
    loss(x1, k1, c, s).backward()
    _compiled(loss)(x2, k2, c, s).backward()
    assert_bitwise_equal(x2.grad, x1.grad)
    assert_bitwise_equal(k2.grad, k1.grad)


def test_compile_inductor_one_graph():
    """With the default backend (Inductor): no graph break, and the op stays one opaque node,
    so Inductor cannot re-derive (and FMA-contract) the math: still bit-equal to eager."""
    x, k, c, s = _inputs(torch.bfloat16, T=64, H=4, D=128)
    c, s = rb.cos_sin(torch.arange(64), 128)
    c, s = c[:, None], s[:, None]

    def f(x, c, s):
        return rb.apply(x * 2, c, s) + 1

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(x, c, s)
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, c, s)
    assert_bitwise_equal(got, f(x, c, s))


def test_compiled_graph_follows_use_backend():
    """The backend is resolved when the op runs: a compiled graph obeys the context it runs in."""
    from rope_backends import reference
    from rope_backends.registry import Backend

    calls = []

    def fwd(args):
        calls.append(1)
        return reference.run(args)

    rb.register_backend(Backend(name="rb_compile_probe", device_types=("cpu",), priority=-50, forward=fwd))
    try:
        x, k, c, s = _inputs()
        g = _compiled(lambda x, c, s: rb.apply(x, c, s))
        g(x, c, s)
        before = len(calls)
        with rb.use_backend("rb_compile_probe"):
            out = g(x, c, s)
        assert len(calls) == before + 1
        assert_bitwise_equal(out, rb.apply(x, c, s))
    finally:
        rb.unregister_backend("rb_compile_probe")


# --------------------------------------------------------------------------------------------
# eager autograd: a plain autograd.Function (autograd._EagerRotation) instead of the custom ops


def _reference_rotation(t, cos, sin, layout, conjugate=False):
    from rope_backends import reference
    from rope_backends.contract import Layout, RopeArgs
    return reference.run(RopeArgs((t,), False, Layout(layout), t.shape[-1], conjugate, cos=cos, sin=sin))[0]


@pytest.mark.parametrize("layout", ["neox", "interleaved"])
def test_eager_grad_call_records_the_eager_rotation_and_torch_func_grad_works(layout):
    """A gradient call records the eager rotation (visible on its grad_fn), and torch.func.grad
    works through it (the custom ops' generated autograd.Function refuses functorch transforms);
    both give the reference's gradient bit for bit."""
    x, _, c, s = _inputs()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xg = x.clone().requires_grad_()
    y = rb.apply(xg, c, s, layout=layout)
    assert type(y.grad_fn).__name__ == "_EagerRotationBackward"
    (eager_grad,) = torch.autograd.grad(y, xg, g)
    func_grad = torch.func.grad(lambda t: (rb.apply(t, c, s, layout=layout) * g).sum())(x.clone())
    want = _reference_rotation(g, c, s, layout, conjugate=True)
    assert_bitwise_equal(eager_grad, want, name="eager autograd")
    assert_bitwise_equal(func_grad, want, name="torch.func.grad")


def test_eager_double_backward_is_the_forward_rotation():
    """create_graph=True: the gradient is itself differentiable; the gradient of the gradient
    w.r.t. the upstream gradient is the rotation by +theta again (the op is linear)."""
    x, k, c, s = _inputs()
    qg, kg = x.clone().requires_grad_(), k.clone().requires_grad_()
    gq = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).requires_grad_()
    gk = torch.randn(k.shape, generator=torch.Generator().manual_seed(5)).requires_grad_()
    q_out, k_out = rb.apply_qk(qg, kg, c, s)
    dq, dk = torch.autograd.grad((q_out, k_out), (qg, kg), (gq, gk), create_graph=True)
    assert_bitwise_equal(dq.detach(), _reference_rotation(gq.detach(), c, s, "neox", True), name="dq")
    vq, vk = torch.randn_like(x), torch.randn_like(k)
    ddq, ddk = torch.autograd.grad((dq, dk), (gq, gk), (vq, vk))
    assert_bitwise_equal(ddq, _reference_rotation(vq, c, s, "neox"), name="d(dq)/d(gq)")
    assert_bitwise_equal(ddk, _reference_rotation(vk, c, s, "neox"), name="d(dk)/d(gk)")


def test_eager_grad_of_a_parameter_and_of_an_unused_output():
    """nn.Parameter inputs take the eager path too; an output that does not reach the loss
    contributes a zero gradient."""
    x, k, c, s = _inputs()
    p = torch.nn.Parameter(x.clone())
    kg = k.clone().requires_grad_()
    q_out, _ = rb.apply_qk(p, kg, c, s)
    q_out.sum().backward()
    assert_bitwise_equal(p.grad, _reference_rotation(torch.ones_like(x), c, s, "neox", True), name="grad")
    assert kg.grad is not None and not kg.grad.any()


def test_repeated_grad_calls_reuse_one_rotation_and_keep_bits():
    """The second call of a signature runs the kept runner; both calls' outputs and gradients
    are the same bits, and the backward keeps one backend runner per gradient signature."""
    from rope_backends import dispatch
    x, _, c, s = _inputs(torch.bfloat16)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    results = []
    for _ in range(3):
        xg = x.clone().requires_grad_()
        y = rb.apply(xg, c, s, layout="interleaved")
        results.append((y.detach(), torch.autograd.grad(y, xg, g)[0]))
    assert any(k[0] == "apply" and k[6] is True for k in dispatch._RUNNERS), "no runner kept for the grad call"
    for y, gx in results[1:]:
        assert_bitwise_equal(y, results[0][0], name="output")
        assert_bitwise_equal(gx, results[0][1], name="grad")
    assert_bitwise_equal(results[0][1], _reference_rotation(g, c, s, "interleaved", True), name="grad vs reference")


def test_eager_grad_under_activation_checkpointing():
    """torch.utils.checkpoint (both modes) re-runs the forward in the backward: the gradients
    are the plain call's, bit for bit."""
    from torch.utils.checkpoint import checkpoint
    x, k, c, s = _inputs(torch.bfloat16)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).bfloat16()

    def block(t):
        return rb.apply(t * 2, c, s, layout="interleaved") * 3

    xg = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(block(xg), xg, g)
    for reentrant in (False, True):  # the reentrant form only supports .backward()
        xg = x.clone().requires_grad_()
        checkpoint(block, xg, use_reentrant=reentrant).backward(g)
        assert_bitwise_equal(xg.grad, plain, name=f"checkpoint(use_reentrant={reentrant})")


def test_make_fx_and_fake_tensors_see_one_custom_op_per_call():
    """Under make_fx (a proxy dispatch mode) every public call is recorded as its custom op (a
    kernel launched by a prepared runner would be invisible to the trace), and the traced graph
    computes the same bits; FakeTensorMode gets outputs of the right shapes from the fake impls."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, k, c, s = _inputs()
    cache = rb.cos_sin_cache(32, 16)
    pos = torch.tensor([3, 0, 31, 7, 7])

    def f(x, k, c, s, pos, cache):
        a = rb.apply(x, c, s)
        q2, k2 = rb.apply_qk(x, k, c, s, layout="interleaved")
        q3, k3 = rb.apply_cached(x.clone(), k.clone(), pos, cache, inplace=False)
        return a, q2, k2, q3, k3

    for _ in range(2):  # the second time the signatures have prepared runners
        want = f(x, k, c, s, pos, cache)
    gm = make_fx(f)(x, k, c, s, pos, cache)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("rope_backends.rope.") for t in targets) == 1, targets
    assert sum(t.startswith("rope_backends.rope_qk.") for t in targets) == 1, targets
    assert sum(t.startswith("rope_backends.rope_cached.") for t in targets) == 1, targets
    for got, w in zip(gm(x, k, c, s, pos, cache), want):
        assert_bitwise_equal(got, w, name="make_fx graph")
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) for t in (x, k, c, s, pos, cache)]
        outs = f(*fakes)
    assert [tuple(o.shape) for o in outs] == [tuple(w.shape) for w in want]


# --------------------------------------------------------------------------------------------
# checks validation cannot make on fake tensors, made by the ops on the real ones


@pytest.mark.parametrize("inplace", [True, False])
def test_cpu_positions_are_range_checked_under_compile_and_tracing(inplace):
    """CPU positions are range-checked always: under torch.compile and make_fx validation sees
    fake tensors, so the custom op checks when it runs. Nothing is written by a refused call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    cache = rb.cos_sin_cache(16, 16)

    def f(q, pos, cache):
        out, _ = rb.apply_cached(q, None, pos, cache, inplace=inplace)
        return out * 1

    good, bad = torch.tensor([0, 3, 15]), torch.tensor([0, 3, 16])
    q = torch.randn(3, 2, 16)
    want = f(q.clone(), good, cache)
    runs = (("torch.compile", _compiled(f)), ("a graph make_fx traced on fakes", make_fx(f, tracing_mode="fake")(
        q.clone(), good, cache)))
    for name, run in runs:
        assert_bitwise_equal(run(q.clone(), good, cache), want, name=name)
        for positions in (bad, torch.tensor([-1, 0, 0])):
            qq = q.clone()
            with pytest.raises(ValueError, match="^positions: expected values in"):
                run(qq, positions, cache)
            assert_bitwise_equal(qq, q, name=f"{name}: nothing written")
    with pytest.raises(ValueError, match="^positions: expected values in"):
        make_fx(f)(q.clone(), bad, cache)  # real tensors: the op checks while it is traced


def test_a_cache_requiring_grad_works_under_no_grad(target):
    """A cache that requires grad (an nn.Parameter) is refused with grad enabled (error cases);
    under torch.no_grad it is only read, on every backend alike."""
    from rope_backends import reference

    dev, b = target.device, target.backend
    cache = torch.nn.Parameter(rb.cos_sin_cache(16, 16, device=dev))
    pos = torch.tensor([1, 5, 9], device=dev)
    q = torch.randn(3, 2, 16).to(dev)
    c, s = reference.cos_sin_from_cache(pos, cache.detach(), None)
    with torch.no_grad():
        for inplace in (False, True):
            qq = q.clone()
            out, _ = rb.apply_cached(qq, None, pos, cache, inplace=inplace, backend=b)
            assert not out.requires_grad
            assert_bitwise_equal(out, reference.rotate(q, c[:, None], s[:, None], rb.Layout.NEOX, 16))


def test_training_calls_skip_torchs_per_call_signature_binding(monkeypatch):
    """torch's Function.apply binds arguments through inspect.signature on every call when
    setup_context is defined (~20 us per training call); outside functorch transforms the eager
    autograd path calls the C++ apply directly. Gradients stay those of the reference."""
    import inspect

    from rope_backends import autograd, reference
    from rope_backends.contract import Layout, RopeArgs

    if autograd._c_apply is None:
        pytest.skip("this torch's Function has no C++ apply to call directly")
    x = torch.randn(3, 2, 16, requires_grad=True)
    cos, sin = rb.cos_sin(torch.arange(3), 16)
    warm = rb.apply(x, cos[:, None], sin[:, None])  # the runner is kept
    torch.autograd.grad(warm, x, torch.ones_like(warm))  # (a first grad imports what torch needs: sympy)
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(1) or real(*a, **k))
    y = rb.apply(x, cos[:, None], sin[:, None])
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert calls == []
    want = reference.run(RopeArgs((g,), False, Layout.NEOX, 16, conjugate=True, cos=cos[:, None], sin=sin[:, None]))[0]
    assert torch.equal(gx, want)
