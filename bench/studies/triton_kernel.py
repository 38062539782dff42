"""One-off study of the triton backend on a GPU: what the kernel's casts and the launch paths cost.

    python bench/studies/triton_kernel.py [--out DIR]

1. casts: the same plan with ``EXACT_CASTS`` on (bf16 by bit arithmetic, what the interpreter
   needs) and off (the GPU's own cvt.rn), on the largest diffusion shape in both layouts and on
   serving prefill -- bit-exact both ways, then timed (do_bench median);
2. host cost per call, back-to-back calls and one sync at the end (best of 5 rounds): one torch op
   (``x.add_(0)``), ``rb.apply`` / ``rb.apply_cached`` (T = 1, in place), the plan's kept launch
   function alone, Triton's ``CompiledKernel[grid]`` runner with tensors and with addresses, and
   ``JITFunction.run``.
Writes ``triton-kernel-study.json`` to ``--out``; prints a table. Not part of ``python -m bench``:
its questions are answered once per kernel change, not per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import rope_backends as rb  # noqa: E402
from rope_backends import reference  # noqa: E402
from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.spec import args_for_cached, args_for_tables  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402

DEV = "cuda"


def host_us(fn, rounds=5, seconds=0.05) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(100):
                fn()
            n += 100
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def with_exact_casts(args, exact: bool):
    plan = launch.plan_for(args)
    plan.values["EXACT_CASTS"] = exact
    plan.tail = tuple(plan.values[n] for n in launch._ARG_NAMES[9:])
    plan.launchers.clear()
    return plan


def casts() -> list[dict]:
    rows = []
    table = rb.cos_sin(torch.arange(115200), 128)
    cos, sin = table[0].to(DEV)[:, None], table[1].to(DEV)[:, None]
    cache = rb.cos_sin_cache(32768, 128, device=DEV)
    x = torch.randn(1, 115200, 24, 128, device=DEV).bfloat16()
    qkv = torch.randn(4096, 48 * 128, device=DEV).bfloat16()
    pos = torch.randint(0, 32768, (4096,), device=DEV)
    calls = {
        "apply (1,115200,24,128) interleaved": args_for_tables((("x", x),), cos, sin, "interleaved", None, False),
        "apply (1,115200,24,128) neox": args_for_tables((("x", x),), cos, sin, "neox", None, False),
        "apply_cached T=4096 32/8 heads": args_for_cached(qkv[:, :4096], qkv[:, 4096:5120], pos, cache, "neox",
                                                          None, None, False, 128)[0],
    }
    for name, args in calls.items():
        want = reference.run(args)
        row = {"call": name}
        for exact in (True, False):
            with_exact_casts(args, exact)
            got = launch.forward(args)
            row[f"exact_casts={exact} bit_exact"] = not any(bool(bitwise_mismatches(g, w).any())
                                                            for g, w in zip(got, want))
            row[f"exact_casts={exact} us"] = 1e3 * do_bench(lambda: launch.forward(args), warmup=10, rep=50,
                                                            return_mode="median")
        launch._PLANS.clear()
        rows.append(row)
        print(row, flush=True)
    return rows


def host() -> dict:
    out = {}
    y = torch.zeros(64, device=DEV)
    out["torch x.add_(0)"] = host_us(lambda: y.add_(0))
    qkv = torch.randn(1, 48 * 128, device=DEV).bfloat16()
    q, k = qkv[:, :4096], qkv[:, 4096:5120]
    pos = torch.tensor([17], device=DEV)
    cache = rb.cos_sin_cache(4096, 128, device=DEV)
    out["rb.apply_cached T=1 in place"] = host_us(lambda: rb.apply_cached(q, k, pos, cache, head_dim=128))
    x = torch.randn(1, 8, 128, device=DEV).bfloat16()
    cos, sin = rb.cos_sin(torch.tensor([5], device=DEV), 128)
    c1, s1 = cos[:, None], sin[:, None]
    out["rb.apply (1,8,128) out of place"] = host_us(lambda: rb.apply(x, c1, s1))
    args, _ = args_for_cached(q, k, pos, cache, "neox", None, None, True, 128)
    floor = launch.launch_floor(args)
    out["launch_floor apply_cached (kept launch function)"] = host_us(floor)
    plan = launch.plan_for(args)
    kernel = launch._kernel()
    ptrs = launch._ORDER["cached"]((args.tensors[0], args.tensors[0], args.tensors[1], args.tensors[1], pos, cache,
                                    None, None))
    compiled = kernel.run(*ptrs, grid=plan.grid, warmup=False, **plan.options(), **plan.values)
    runner = compiled[plan.grid]
    stream = torch.cuda.current_stream().cuda_stream
    out["CompiledKernel[grid] runner, tensors"] = host_us(lambda: runner(*ptrs, *plan.tail, stream=stream))
    addresses = launch._addresses(ptrs)
    out["CompiledKernel[grid] runner, addresses"] = host_us(lambda: runner(*addresses, *plan.tail, stream=stream))
    out["JITFunction.run"] = host_us(lambda: kernel.run(*ptrs, grid=plan.grid, warmup=False, **plan.options(),
                                                        **plan.values), rounds=3)
    out["raw C launch in use"] = bool(launch._RAW[0])
    for k_, v in out.items():
        print(f"{k_:55s} {v if isinstance(v, bool) else f'{v:8.2f} us'}", flush=True)
    return out


def breakdown() -> dict:
    """The pieces of a repeated rb.apply_cached (T = 1, in place) on this host, each alone."""
    from rope_backends import dispatch

    out = {}
    qkv = torch.randn(1, 48 * 128, device=DEV).bfloat16()
    q, k = qkv[:, :4096], qkv[:, 4096:5120]
    pos = torch.tensor([17], device=DEV)
    cache = rb.cos_sin_cache(4096, 128, device=DEV)
    rb.apply_cached(q, k, pos, cache, head_dim=128)
    key = next(kk for kk in dispatch._RUNNERS if kk[0] == "apply_cached")
    run = dispatch._RUNNERS[key][1]  # (generation, runner, memory guard)
    out["runner(tensors) alone"] = host_us(lambda: run((q, k), pos, cache))
    opts = dispatch._cached_opts("neox", None, None, True, 128, None, False)
    guards = dispatch._RECENT_CACHED[0][1]
    out["recent-signature check (opts + TensorGuards)"] = host_us(
        lambda: (dispatch._cached_opts("neox", None, None, True, 128, None, False) == opts
                 and guards.check(q, k, pos, cache)))
    out["dispatch._runner(key)"] = host_us(lambda: dispatch._runner(key))
    out["dispatch._negated x4"] = host_us(lambda: dispatch._negated(q, k, pos, cache))
    out["dispatch._may_take_runner"] = host_us(lambda: dispatch._may_take_runner(True, False))
    out["is_compiling"] = host_us(torch.compiler.is_compiling)
    out["q.shape + q.stride() + q.dtype + q.device"] = host_us(lambda: (q.shape, q.stride(), q.dtype, q.device))
    out["q.device"] = host_us(lambda: q.device)
    out["q.data_ptr()"] = host_us(q.data_ptr)
    out["torch._C._cuda_getDevice()"] = host_us(torch._C._cuda_getDevice)
    out["increment_version((q, k))"] = host_us(lambda: torch._C._increment_version((q, k)))
    out["empty_like(q)"] = host_us(lambda: torch.empty_like(q))
    for k_, v in out.items():
        print(f"{k_:55s} {v:8.3f} us", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--only", default="host,breakdown,casts", help="comma list of sections")
    args = parser.parse_args()
    only = args.only.split(",")
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    doc["triton"] = triton.__version__
    if "host" in only:
        doc["host"] = host()
    if "breakdown" in only:
        doc["breakdown"] = breakdown()
    if "casts" in only:
        doc["casts"] = casts()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "triton-kernel-study.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
