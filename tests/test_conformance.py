"""Every runnable backend x every case: forward (and backward where the case asks) equal to the
reference bit for bit, in-place calls touch nothing outside their views, out-of-place calls leave
their inputs untouched (rope_backends.testing.runner.check_case says exactly what is checked).

Also shows that the comparison can fail: one flipped bit in a reference output, a backend off by
one ulp, and a perturbed reference function are each caught. No tolerance, no skip, no xfail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rope_backends as rb
from rope_backends import reference
from rope_backends.registry import Backend
from rope_backends.testing import assert_bitwise_equal, check_case, runner, sample_cases
from rope_backends.testing.cases import RopeCase, interp_cases, reference_cases


def test_case(target, case):
    dev, _ = runner.case_device(case, target.device)
    check_case(case, target.backend, dev)


# ---- the suite itself ---------------------------------------------------------------------

def test_sample_tier_size_and_coverage():
    """The fast tier: >= 300 distinct cases covering every feature docs/contract.md ("Conformance") lists."""
    cases = sample_cases()
    names = [c.name for c in cases]
    assert len(names) == len(set(names)) and len(set(cases)) == len(cases)
    cpu = [c for c in cases if c.device is None]
    assert len(cpu) >= 300
    _assert_feature_complete(cpu, head_dims={2, 64, 80, 96, 112, 128, 192, 256})


def test_interp_tier_is_feature_complete():
    cases = interp_cases()
    assert 30 <= len(cases) <= 50
    _assert_feature_complete(cases, head_dims=set())


def test_reference_tier_is_a_superset():
    full = {c.name for c in reference_cases()}
    assert {c.name for c in sample_cases()} <= full and len(full) > 2000


def _assert_feature_complete(cases: list[RopeCase], head_dims: set[int]) -> None:
    def have(pred) -> bool:
        return any(pred(c) for c in cases)

    need = {
        "every dtype": all(have(lambda c, d=d: c.dtype == d) for d in ("float32", "float16", "bfloat16")),
        "every layout": all(have(lambda c, l=l: c.layout == l) for l in ("neox", "interleaved")),
        "every op": all(have(lambda c, o=o: c.op == o) for o in ("apply", "apply_qk", "apply_cached")),
        "every mrope map, 3-row and text-only": all(
            have(lambda c, k=k, r=r: c.mrope is not None and c.mrope[0] == k and c.mrope_rows == r)
            for k in ("chunked", "interleaved", "ernie") for r in (3,)
        ) and have(lambda c: c.mrope is not None and c.mrope_rows == 1),
        "partial rotary": have(lambda c: c.rotary_dim is not None and c.rotary_dim < c.d),
        "GQA/MQA": have(lambda c: c.op == "apply_qk" and c.k_heads not in (None, c.heads)),
        "k=None": have(lambda c: c.k_heads == 0),
        "2-D q with head_dim": have(lambda c: c.flat),
        "[B,H,S,D]": have(lambda c: c.heads_axis == -3),
        "duplicated cos": have(lambda c: c.cos_form == "dup"),
        "fp64 and bf16 cos": have(lambda c: c.cos_dtype == "float64") and have(lambda c: c.cos_dtype == "bfloat16"),
        "fused qkv": have(lambda c: c.storage == "fused_qkv"),
        "transposed": have(lambda c: c.storage == "transposed"),
        "strided head_dim": have(lambda c: c.storage == "strided_last"),
        "expanded input": have(lambda c: c.storage == "expanded"),
        "strided cos": have(lambda c: c.cos_bcast in ("strided", "transposed", "expanded")),
        "in place": have(lambda c: c.inplace) and have(lambda c: not c.inplace),
        "empty": have(lambda c: 0 in c.shape),
        "special x": have(lambda c: c.values == "special"),
        "special cos": have(lambda c: c.values == "special_cos"),
        "backward": all(have(lambda c, o=o: c.backward and c.op == o) for o in ("apply", "apply_qk", "apply_cached")),
        "head dims": head_dims <= {c.d for c in cases},
    }
    missing = [k for k, ok in need.items() if not ok]
    assert not missing, f"cases do not cover: {missing}"


def test_gpu_cases_are_data():
    gpu = [c for c in sample_cases() if c.device is not None]
    large = [c for c in gpu if "large" in c.marks]
    assert large and all(torch.Size(c.shape).numel() > 2**31 for c in large)
    assert any(c.device == "cuda:1" and "multigpu" in c.marks for c in gpu)


# ---- the comparison can fail ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_flipped_bit_is_caught(dtype):
    case = RopeCase("apply", (4, 3, 32), {torch.float32: "float32", torch.float16: "float16",
                                           torch.bfloat16: "bfloat16"}[dtype], "neox")
    inp = runner.build(case, "cpu")
    (want,) = runner.reference_outputs(case, inp)
    assert_bitwise_equal(want.clone(), want)
    for index in [(0, 0, 0), (3, 2, 31), (1, 1, 17)]:
        off = want.clone()
        int_view = off.view(torch.int16 if dtype != torch.float32 else torch.int32)
        int_view[index] ^= 1  # one ulp
        with pytest.raises(AssertionError, match=r"1 of 384 elements differ.*first at index \[" + ", ".join(map(str, index))):
            assert_bitwise_equal(off, want)


def test_zero_sign_and_nan_rules():
    z = torch.tensor([0.0, 1.0, float("nan")])
    with pytest.raises(AssertionError, match="differ"):
        assert_bitwise_equal(torch.tensor([-0.0, 1.0, float("nan")]), z)
    other_nan = torch.tensor([0.0, 1.0, 0.0]).view(torch.int32)
    other_nan[2] = 0x7FC00001
    assert_bitwise_equal(other_nan.view(torch.float32), z)  # all NaNs equal
    with pytest.raises(AssertionError, match="differ"):
        assert_bitwise_equal(other_nan.view(torch.float32), z, nans_equal=False)
    with pytest.raises(AssertionError, match="dtype"):
        assert_bitwise_equal(z.half(), z)
    with pytest.raises(AssertionError, match="shape"):
        assert_bitwise_equal(z[:2], z)


def _off_by_one_ulp(args):
    outs = reference.run(dataclasses.replace(args, inplace=False))
    bad = []
    for o in outs:
        o = o.contiguous().clone()
        if o.numel():
            flat = o.view(-1).view(torch.int16 if o.element_size() == 2 else torch.int32)
            flat[flat.numel() // 2] ^= 1
        bad.append(o)
    if args.inplace:
        for t, o in zip(args.tensors, bad):
            t.copy_(o)
        return args.tensors
    return tuple(bad)


def _writes_canary(args):
    outs = reference.run(args)
    if args.inplace and args.tensors[0].numel():
        t = args.tensors[0]
        # one element past the end of the view: inside the canary padding
        t.as_strided((1,), (1,), t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1).zero_()
    return outs


def _touches_input(args):
    outs = reference.run(args)
    if not args.inplace and args.tensors[0].numel():
        args.tensors[0].view(-1)[0] = 0 if args.tensors[0].is_contiguous() else args.tensors[0].view(-1)[0]
    return outs


@pytest.fixture
def bad_backend():
    """Register a test backend whose forward is given by the test; unregister afterwards."""
    names = []

    def register(name, forward):
        rb.register_backend(Backend(name=name, device_types=("cpu",), priority=-100, forward=forward))
        names.append(name)
        return name

    yield register
    for n in names:
        rb.unregister_backend(n)


@pytest.mark.parametrize("case", [c for c in sample_cases() if c.device is None and 0 not in c.shape][::25],
                         ids=lambda c: c.name)
def test_backend_off_by_one_ulp_fails(bad_backend, case):
    name = bad_backend("rb_test_ulp", _off_by_one_ulp)
    with pytest.raises(AssertionError, match="differ"):
        check_case(case, name, "cpu")


def test_canary_write_fails(bad_backend):
    name = bad_backend("rb_test_canary", _writes_canary)
    case = RopeCase("apply", (4, 3, 32), "float16", "neox", inplace=True)
    with pytest.raises(AssertionError, match="outside the written view"):
        check_case(case, name, "cpu")


def test_modified_input_fails(bad_backend):
    name = bad_backend("rb_test_input", _touches_input)
    case = RopeCase("apply", (4, 3, 32), "float32", "neox")
    with pytest.raises(AssertionError, match="input of an out-of-place call"):
        check_case(case, name, "cpu")


def test_out_of_place_returning_input_fails(bad_backend):
    def aliasing(args):
        out = reference.run(args)
        for t, o in zip(args.tensors, out):
            t.copy_(o)
        return args.tensors

    name = bad_backend("rb_test_alias", aliasing)
    with pytest.raises(AssertionError, match="sharing the input's memory"):
        check_case(RopeCase("apply", (4, 3, 32), "float32", "neox"), name, "cpu")


def test_wrong_backward_fails(bad_backend):
    """A backend whose backward rotates by +theta (forgets to conjugate) is caught."""
    def no_conjugate(args):
        return reference.run(dataclasses.replace(args, conjugate=False))

    name = bad_backend("rb_test_bwd", no_conjugate)
    with pytest.raises(AssertionError, match="grad of q"):
        check_case(RopeCase("apply", (4, 3, 32), "float32", "neox", backward=True), name, "cpu")


def _independent_forward(args):
    """A backend written without reference.py: HF rotate_half / GPT-J rotate_every_two in fp32."""
    from rope_backends.reference import cos_sin_from_cache
    if args.cache is not None:
        cos, sin = cos_sin_from_cache(args.positions, args.cache, args.position_axis_map)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    else:
        cos, sin = args.cos, args.sin
    c, s = cos.float(), (-sin.float() if args.conjugate else sin.float())
    r, h = args.rotary_dim, args.rotary_dim // 2
    outs = []
    for t in args.tensors:
        x = t[..., :r].float()
        if args.layout is rb.Layout.NEOX:
            rot = torch.cat((-x[..., h:], x[..., :h]), -1)
            cc, ss = torch.cat((c, c), -1), torch.cat((s, s), -1)
        else:
            rot = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
            cc, ss = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        y = (x * cc + rot * ss).to(t.dtype)
        outs.append(torch.cat((y, t[..., r:]), -1))
    if args.inplace:
        for t, o in zip(args.tensors, outs):
            t.copy_(o)
        return args.tensors
    return tuple(outs)


def test_perturbed_reference_is_caught(bad_backend, monkeypatch):
    """The conformance check compares against reference.py: an independent backend passes while
    the reference is right, and fails once the reference is off by one ulp."""
    name = bad_backend("rb_test_independent", _independent_forward)
    cases = [RopeCase("apply", (4, 3, 32), "float32", "neox"),
             RopeCase("apply_qk", (4, 3, 32), "float32", "interleaved", k_heads=1, rotary_dim=16),
             RopeCase("apply_cached", (4, 3, 32), "float32", "neox", k_heads=1, mrope=("chunked", (4, 6, 6)))]
    for case in cases:
        check_case(case, name, "cpu")

    real = reference.rotate_pairs

    def perturbed(a, b, cos, sin, conjugate):
        a2, b2 = real(a, b, cos, sin, conjugate)
        return torch.nextafter(a2, torch.full_like(a2, float("inf"))), b2

    monkeypatch.setattr(reference, "rotate_pairs", perturbed)
    for case in cases:
        with pytest.raises(AssertionError, match="differ"):
            check_case(case, name, "cpu")


# ---- the device-bound code paths, exercised on CPU -----------------------------------------

@pytest.mark.parametrize("case", [
    RopeCase("apply", (300_000, 1, 4), "bfloat16", "interleaved", marks=("large",)),
    RopeCase("apply_cached", (300_000, 1, 4), "float16", "neox", k_heads=0, inplace=True, max_position=4096,
             marks=("large",)),
], ids=lambda c: c.name)
def test_large_case_path_on_cpu(case, bad_backend):
    """The >2**31-element cases compare in slices of 2**18 tokens on the device; the same code
    on a small CPU tensor spanning two slices: passes on eager, catches a one-ulp error in the
    second slice and a write into the canary."""
    check_case(case, "eager", "cpu")

    def late_ulp(args):
        outs = _off_by_one_ulp(args)  # flips the middle element: token 150000, in slice 0
        for o in outs:
            o.view(-1).view(torch.int16)[-1] ^= 1  # and the last one: slice 1
        return outs

    name = bad_backend("rb_test_large", late_ulp)
    with pytest.raises(AssertionError, match=r"output q\[262144:524288\]|output q\[0:262144\]"):
        check_case(case, name, "cpu")
    if case.inplace:
        name = bad_backend("rb_test_large_canary", _writes_canary)
        with pytest.raises(AssertionError, match="outside the written view"):
            check_case(case, name, "cpu")


def test_device_bound_cases_need_their_device(monkeypatch):
    big = next(c for c in sample_cases() if "large" in c.marks)
    second = next(c for c in sample_cases() if c.device == "cuda:1")
    assert runner.case_device(big, "cpu")[0] is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dev, why = runner.case_device(second, "cuda")
    assert dev is None and "1 CUDA device(s) here" in why
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runner.case_device(second, "cuda") == ("cuda:1", None)
    assert runner.case_device(big, "cuda") == ("cuda", None)
