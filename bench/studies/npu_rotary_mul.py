"""On a real Ascend machine: is ``torch_npu.npu_rotary_mul`` bit-exact against the rope_backends
reference, and how fast is it next to the ``npu`` backend?

    python bench/studies/npu_rotary_mul.py [--out [DIR]] [--strict] [--quick] [--device npu:0]
    python bench/studies/npu_rotary_mul.py --simulate-cpu      # the script's logic, on CPU, with the
                                                       # op's documented formula standing in

Four parts, each reported and written to ``bench/results/npu_rotary_mul-<device>-<date>.json``:

1. binding  -- the rope_backends custom ops have a PrivateUse1 kernel (the key torch_npu
   registers for "npu"), automatic dispatch picks the ``npu`` backend for npu tensors, and a
   forward + backward through autograd on npu tensors equals the CPU reference bit for bit.
2. backend conformance on the device -- the ``npu`` backend on npu tensors (both layouts,
   fp32/fp16/bf16, partial rotary, positions + cache, special values) against the reference
   computed on CPU from the same inputs. This is what proves the NPU's own mul/sub/cast kernels
   round as the contract says (IEEE products, round-to-nearest-even casts, subnormals kept).
   The full suite is ``python -m rope_backends check --backend npu``; this is its short form.
3. npu_rotary_mul conformance -- signature (torch_npu >= 2.1 docs):
       torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor
   ``input`` 4-D (BNSD / BSND / SBND), ``r1``/``r2`` = cos/sin in the *duplicated* full-width
   form broadcast as 11SD / 1S1D / S11D, fp16/bf16/fp32; ``rotary_mode`` "half" (rotate_half,
   our neox) or "interleave" (our interleaved; newer releases only). It computes
   ``r1 * x + r2 * rotate(x)`` over the whole last dim (no partial rotary), so it is compared on
   full-rotary cases with cos/sin given in the input dtype (the values both sides see), for
   every dtype x mode x layout, forward and (through autograd) backward. Any differing bit
   disqualifies it.
4. timing -- ``npu_rotary_mul`` vs ``rb.apply(..., backend="npu")`` vs the eager reference on
   the diffusion anchor ``(1, 4096, 24, 128)`` bf16 interleaved and an LLM ``(1, 4096, 32, 128)``
   bf16 neox (BSND), synchronising the device around each timed block.

Policy: ``npu_rotary_mul`` becomes a rope_backends backend only if part 3 finds it bit-exact for
every dtype and mode it would serve (see docs/npu.md). Without torch_npu (or without an NPU) the
script says so and exits 0 (``--strict``: exits 2, for a CI lane that must not pass vacuously).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform as _platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import rope_backends as rb  # noqa: E402
from rope_backends import environment, freqs, mrope, reference, registry  # noqa: E402
from rope_backends.testing.optrace import record  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = {"half": "neox", "interleave": "interleaved"}


# --------------------------------------------------------------------------------------------
# the device under test


class Device:
    """The NPU (torch_npu), or a CPU stand-in for ``--simulate-cpu``."""

    def __init__(self, name: str, rotary_mul: Callable | None, synchronize: Callable[[], None], simulated: bool):
        self.name, self.rotary_mul, self.synchronize, self.simulated = name, rotary_mul, synchronize, simulated


def _documented_formula(x: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half") -> Tensor:
    """What the torch_npu docs say npu_rotary_mul computes, in eager torch (x's dtype)."""
    if rotary_mode == "half":
        x1, x2 = torch.chunk(x, 2, -1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return r1 * x + r2 * rotated


def open_device(opts) -> Device | str:
    if opts.simulate_cpu:
        os.environ["ROPE_BACKENDS_SIMULATE_NPU"] = "1"
        return Device("cpu", _documented_formula, lambda: None, True)
    version = environment.torch_npu_version()
    if version is None:
        return "torch_npu is not installed (pip install rope-backends[npu]); nothing to measure here"
    if not environment.npu_available():
        return f"torch_npu {version} imported but no NPU device is visible; nothing to measure here"
    import torch_npu  # noqa: F401  (rope_backends.environment has imported it already; the op lives on this module)

    fn = getattr(torch_npu, "npu_rotary_mul", None)
    return Device(opts.device, fn, torch.npu.synchronize, False)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# comparison helpers


def _ulps(a: Tensor, e: Tensor) -> int:
    """Largest distance in units in the last place between finite elements (bits as ints)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    finite = torch.isfinite(a) & torch.isfinite(e)
    if not bool(finite.any()):
        return 0

    def ordered(t):  # sign-magnitude bits -> a monotone integer line
        i = t.contiguous().view(ints).to(torch.int64)
        top = 1 << (8 * t.element_size() - 1)
        return torch.where(i < 0, -(i + top), i)

    return int((ordered(a) - ordered(e)).abs()[finite].max())


def compare(actual: Tensor, expected: Tensor) -> dict:
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return {"exact": False, "error": f"shape/dtype {tuple(actual.shape)} {actual.dtype} != "
                                          f"{tuple(expected.shape)} {expected.dtype}"}
    diff = bitwise_mismatches(actual, expected)
    n = int(diff.sum())
    out = {"exact": n == 0, "mismatches": n, "elements": actual.numel()}
    if n:
        idx = int(diff.reshape(-1).nonzero()[0, 0])
        out.update(first_index=idx, got=float(actual.reshape(-1)[idx]), want=float(expected.reshape(-1)[idx]),
                   max_ulps=_ulps(actual, expected))
    return out


def _randn(shape, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _angles(shape, seed):
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(shape, generator=g, dtype=torch.float64) * 200 - 100
    return theta.cos(), theta.sin()


# --------------------------------------------------------------------------------------------
# 1. binding


def check_binding(dev: Device) -> dict:
    ops = ["rope", "rope_", "rope_qk", "rope_qk_", "rope_cached", "rope_cached_"]
    out: dict = {"privateuse1_kernel": {
        op: bool(torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"rope_backends::{op}", "PrivateUse1"))
        for op in ops
    }}
    if dev.simulated:
        out["auto_selected_for_npu"] = "(simulated: no npu device type)"
    else:
        registry._SELECTED.clear()
        out["auto_selected_for_npu"] = registry.select("npu", None).name
    x_cpu = _randn((3, 5, 4, 64), torch.bfloat16, 1)
    c, s = _angles((5, 1, 32), 2)
    cos, sin = c.float(), s.float()
    grad_cpu = _randn((3, 5, 4, 64), torch.bfloat16, 3)
    x = x_cpu.to(dev.name, copy=True).requires_grad_(True)
    y = rb.apply(x, cos.to(dev.name), sin.to(dev.name), layout="interleaved",
                 backend="npu" if dev.simulated else None)
    y.backward(grad_cpu.to(dev.name))
    xr = x_cpu.clone().requires_grad_(True)
    yr = rb.apply(xr, cos, sin, layout="interleaved", backend="eager")
    yr.backward(grad_cpu)
    out["autograd_forward"] = compare(y, yr)
    out["autograd_backward"] = compare(x.grad, xr.grad)
    out["ok"] = (all(out["privateuse1_kernel"].values()) and out["autograd_forward"]["exact"]
                 and out["autograd_backward"]["exact"]
                 and out["auto_selected_for_npu"] in ("npu", "(simulated: no npu device type)"))
    return out


# --------------------------------------------------------------------------------------------
# 2. the npu backend on the device


def check_backend(dev: Device) -> list[dict]:
    rows = []
    be = "npu" if dev.simulated else None  # on a real NPU, automatic dispatch must pick npu itself
    for (dname, dtype), layout, rd, values in (
        (d, l, r, v) for d in DTYPES.items() for l in ("neox", "interleaved") for r in (128, 64)
        for v in ("normal", "special")
    ):
        x = _randn((2, 33, 8, 128), dtype, 5)
        if values == "special":  # +-0, subnormals, +-inf, NaN, largest finite mixed in
            fi = torch.finfo(dtype)
            specials = torch.tensor([0.0, -0.0, fi.tiny * fi.eps, fi.tiny, fi.max, -fi.max, float("inf"),
                                     float("-inf"), float("nan")], dtype=torch.float64).to(dtype)
            g = torch.Generator().manual_seed(6)
            pick = torch.randint(0, len(specials), x.shape, generator=g)
            x = torch.where(torch.rand(x.shape, generator=g) < 0.3, specials[pick], x)
        c, s = _angles((33, 1, rd // 2), 7)
        cos, sin = c.float(), s.float()
        got = rb.apply(x.to(dev.name), cos.to(dev.name), sin.to(dev.name), layout=layout, rotary_dim=rd, backend=be)
        want = rb.apply(x, cos, sin, layout=layout, rotary_dim=rd, backend="eager")
        rows.append({"what": "apply", "dtype": dname, "layout": layout, "rotary_dim": rd, "values": values,
                     **compare(got, want)})
    for (dname, dtype), layout, m in ((d, l, m) for d in DTYPES.items() for l in ("neox", "interleaved")
                                      for m in (None, mrope.interleaved([24, 20, 20]))):
        t, d = 65, 128
        q, k = _randn((t, 16 * d), dtype, 8), _randn((t, 2 * d), dtype, 9)
        pos = torch.randint(0, 4096, (3, t) if m else (t,), generator=torch.Generator().manual_seed(10))
        cache = freqs.cos_sin_cache(4096, d)
        gq, gk = rb.apply_cached(q.to(dev.name, copy=True), k.to(dev.name, copy=True), pos.to(dev.name), cache.to(dev.name), layout=layout,
                                 mrope=m, head_dim=d, inplace=True, backend=be)
        wq, wk = rb.apply_cached(q.clone(), k.clone(), pos, cache, layout=layout, mrope=m, head_dim=d, backend="eager")
        rows.append({"what": "apply_cached" + ("+mrope" if m else ""), "dtype": dname, "layout": layout,
                     "q": compare(gq, wq), "k": compare(gk, wk),
                     "exact": compare(gq, wq)["exact"] and compare(gk, wk)["exact"]})
    # the op trace on the device itself: still no strided write
    xd = _randn((2, 33, 8, 128), torch.bfloat16, 11).to(dev.name)
    c, s = _angles((33, 1, 48), 12)
    _, trace = record(lambda: rb.apply(xd, c.float().to(dev.name), s.float().to(dev.name), layout="interleaved",
                                       rotary_dim=96, backend=be), inputs={"x": xd})
    rows.append({"what": "optrace", "exact": not trace.violations, "strided_writes": trace.strided_writes,
                 "violations": trace.violations, "by_op": dict(trace.counts())})
    return rows


# --------------------------------------------------------------------------------------------
# 3. npu_rotary_mul against the reference


LAYOUTS_4D = {
    # name: (permutation from [B, S, N, D], the broadcast shape of r1/r2 in that layout)
    "BSND": ((0, 1, 2, 3), lambda b, s, n, d: (1, s, 1, d)),
    "BNSD": ((0, 2, 1, 3), lambda b, s, n, d: (1, 1, s, d)),
    "SBND": ((1, 0, 2, 3), lambda b, s, n, d: (s, 1, 1, d)),
}


def _full_form(half: Tensor, mode: str) -> Tensor:
    """Our half form [..., D/2] -> the op's duplicated form [..., D] for ``mode``."""
    return torch.cat((half, half), -1) if mode == "half" else half.repeat_interleave(2, -1)


def _call_rotary_mul(dev: Device, x: Tensor, r1: Tensor, r2: Tensor, mode: str) -> Tensor:
    try:
        return dev.rotary_mul(x, r1, r2, rotary_mode=mode)
    except TypeError:
        if mode != "half":
            raise  # an older torch_npu without rotary_mode: interleave is not offered
        return dev.rotary_mul(x, r1, r2)


def check_rotary_mul(dev: Device, quick: bool) -> list[dict]:
    rows = []
    if dev.rotary_mul is None:
        return [{"error": "torch_npu has no npu_rotary_mul"}]
    b, s, n, d = (2, 64, 8, 128) if not quick else (1, 16, 4, 128)
    for (dname, dtype), mode, (lname, (perm, rshape)), values, direction in (
        (dt, m, l, v, w) for dt in DTYPES.items() for m in MODES for l in LAYOUTS_4D.items()
        for v in ("normal", "special") for w in ("forward", "backward")
    ):
        row = {"dtype": dname, "mode": mode, "layout": lname, "values": values, "direction": direction}
        layout = MODES[mode]
        x_bsnd = _randn((b, s, n, d), dtype, 20)
        if values == "special":
            fi = torch.finfo(dtype)
            specials = torch.tensor([0.0, -0.0, fi.tiny * fi.eps, fi.tiny, fi.max, -fi.max, float("inf"),
                                     float("-inf"), float("nan")], dtype=torch.float64).to(dtype)
            g = torch.Generator().manual_seed(21)
            x_bsnd = torch.where(torch.rand(x_bsnd.shape, generator=g) < 0.3,
                                 specials[torch.randint(0, len(specials), x_bsnd.shape, generator=g)], x_bsnd)
        c, sn = _angles((s, d // 2), 22)
        # cos/sin in the input dtype: the op takes them so, and the reference reads the same values
        c, sn = c.to(dtype), sn.to(dtype)
        x = x_bsnd.permute(perm).contiguous()
        r1 = _full_form(c, mode).reshape(rshape(b, s, n, d))
        r2 = _full_form(sn, mode).reshape(rshape(b, s, n, d))
        # the reference, in the same layout: cos/sin [.., D/2] broadcast like r1
        half_shape = rshape(b, s, n, d)[:-1] + (d // 2,)
        ch, sh = c.reshape(half_shape), sn.reshape(half_shape)
        grad = _randn(x.shape, dtype, 23)
        try:
            xd = x.to(dev.name, copy=True).requires_grad_(direction == "backward")
            got = _call_rotary_mul(dev, xd, r1.to(dev.name), r2.to(dev.name), mode)
            if direction == "backward":
                got.backward(grad.to(dev.name))
                got = xd.grad
            if direction == "forward":
                want = rb.apply(x, ch, sh, layout=layout, backend="eager")
            else:  # the gradient is the rotation by -theta of the incoming gradient
                xr = x.clone().requires_grad_(True)
                rb.apply(xr, ch, sh, layout=layout, backend="eager").backward(grad)
                want = xr.grad
            row.update(compare(got, want))
        except Exception as exc:  # an unsupported combination is a finding, not a crash
            row.update(exact=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# 4. timing


def _time(dev: Device, fn: Callable[[], object], repeats: int = 7, target_s: float = 0.2) -> dict:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.1:  # warm-up: first-call costs, caches, clocks
        fn()
        dev.synchronize()
    n, elapsed = 1, 0.0
    while True:  # calls per block so that a block lasts about target_s / repeats
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dev.synchronize()
        elapsed = time.perf_counter() - t0
        if elapsed * repeats >= target_s or n >= 1 << 16:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dev.synchronize()
        samples.append((time.perf_counter() - t0) / n)
    return {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3, "calls_per_block": n}


def bench(dev: Device, quick: bool) -> list[dict]:
    rows = []
    shapes = {
        "diffusion": ((1, 4096, 24, 128), "interleave"),
        "llm": ((1, 4096, 32, 128), "half"),
    }
    if quick:
        shapes = {k: ((1, 256, 4, 128), m) for k, (_, m) in shapes.items()}
    for name, (shape, mode) in shapes.items():
        b, s, n, d = shape
        layout = MODES[mode]
        x = _randn(shape, torch.bfloat16, 30).to(dev.name)
        c, sn = _angles((s, d // 2), 31)
        cos, sin = c.float().reshape(1, s, 1, d // 2).to(dev.name), sn.float().reshape(1, s, 1, d // 2).to(dev.name)
        r1 = _full_form(c.to(torch.bfloat16), mode).reshape(1, s, 1, d).to(dev.name)
        r2 = _full_form(sn.to(torch.bfloat16), mode).reshape(1, s, 1, d).to(dev.name)
        nbytes = 2 * x.numel() * x.element_size()
        be = "npu" if dev.simulated else None
        cands = {
            "rb npu backend": lambda: rb.apply(x, cos, sin, layout=layout, backend=be),
            "rb eager reference": lambda: rb.apply(x, cos, sin, layout=layout, backend="eager"),
        }
        if dev.rotary_mul is not None:
            label = "npu_rotary_mul formula (eager, simulated)" if dev.simulated else "torch_npu.npu_rotary_mul"
            cands[label] = lambda: _call_rotary_mul(dev, x, r1, r2, mode)
        for impl, fn in cands.items():
            try:
                t = _time(dev, fn)
                rows.append({"shape": name, "dims": list(shape), "mode": mode, "impl": impl, **t,
                             "GBps": nbytes / (t["median_ms"] / 1e3) / 1e9})
            except Exception as exc:
                rows.append({"shape": name, "impl": impl, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", nargs="?", const=str(ROOT / "bench" / "results"), default=None,
                   help="write npu_rotary_mul-<device>-<date>.json into this directory (default bench/results)")
    p.add_argument("--device", default="npu:0")
    p.add_argument("--strict", action="store_true", help="exit 2 (not 0) when there is no NPU to measure")
    p.add_argument("--quick", action="store_true", help="small shapes")
    p.add_argument("--simulate-cpu", action="store_true",
                   help="run on CPU with the documented formula of npu_rotary_mul standing in (tests the script)")
    opts = p.parse_args(argv)
    dev = open_device(opts)
    if isinstance(dev, str):
        print(f"npu_rotary_mul bench: {dev}")
        return 2 if opts.strict else 0

    result = {
        "bench": "npu_rotary_mul",
        "device": "cpu-simulated" if dev.simulated else "npu",
        "device_name": ("CPU, documented formula" if dev.simulated
                        else torch.npu.get_device_name(torch.device(opts.device).index or 0)),  # type: ignore[attr-defined]
        "torch": torch.__version__,
        "torch_npu": environment.torch_npu_version(),
        "cann": os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH"),
        "python": _platform.python_version(),
        "date": _dt.date.today().isoformat(),
    }
    result["binding"] = check_binding(dev)
    print(f"1. binding: {'ok' if result['binding']['ok'] else 'FAILED'} -- {json.dumps(result['binding'])}")
    result["backend_conformance"] = check_backend(dev)
    bad = [r for r in result["backend_conformance"] if not r["exact"]]
    print(f"2. npu backend on the device: {len(result['backend_conformance']) - len(bad)}/"
          f"{len(result['backend_conformance'])} bit-exact")
    for r in bad:
        print("   DIFFERS:", json.dumps(r)[:400])
    result["rotary_mul_conformance"] = check_rotary_mul(dev, opts.quick)
    rows = result["rotary_mul_conformance"]
    verdict = {}
    for r in rows:
        key = f"{r.get('dtype')}/{r.get('mode')}"
        verdict[key] = verdict.get(key, True) and bool(r.get("exact"))
    result["rotary_mul_bit_exact"] = verdict
    result["rotary_mul_qualifies_as_backend"] = bool(verdict) and all(verdict.values())
    print("3. npu_rotary_mul bit-exact per dtype/mode:", json.dumps(verdict))
    differing = [r for r in rows if not r.get("exact")]
    for r in differing[:12]:
        print("   ", json.dumps(r)[:300])
    if len(differing) > 12:
        print(f"    ... and {len(differing) - 12} more differing cases (all in the JSON)")
    print("   becomes a backend:", "yes" if result["rotary_mul_qualifies_as_backend"] else "no (not bit-exact everywhere)")
    result["timing"] = bench(dev, opts.quick)
    print("4. timing (bf16):")
    print("| shape | mode | impl | median ms | min ms | GB/s |\n|---|---|---|---|---|---|")
    for r in result["timing"]:
        if "error" in r:
            print(f"| {r['shape']} | | {r['impl']} | error: {r['error'][:80]} | | |")
        else:
            print(f"| {r['shape']} {tuple(r['dims'])} | {r['mode']} | {r['impl']} | {r['median_ms']:.3f} | "
                  f"{r['min_ms']:.3f} | {r['GBps']:.1f} |")
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"npu_rotary_mul-{result['device']}-{result['date']}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0 if result["binding"]["ok"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
