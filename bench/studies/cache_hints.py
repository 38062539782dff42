"""One-off study: cache hints on the kernel's loads and stores, on a GPU.

    python bench/studies/cache_hints.py [--out DIR]

Run before the hints went into kernel.py (2026-12-02, H200): the shipped kernel then had none;
it then took ``x .cg + tables evict_last`` for every call (results:
``bench/results/cache-hints-study-h200-2026-12-02.json``). Run again once the benchmark's clock reset
the persisting L2 lines before every flush (2026-12-03, ``cache-hints-study-h200-2026-12-03.json``):
kept tables paid only while small, so the shipped kernel now keeps them by their size
(``tuning.keep_tables``; the variants' "tables evict_last" keeps them always).

The rotated tensors are streamed (each element read once and written once) while cos/sin or the
cache rows are re-read by every head and batch of a token. Variants of ``kernel.py`` with Triton's
cache hints (``eviction_policy`` on the streamed loads and stores, ``evict_last`` on the tables,
``.cg`` loads that skip L1) are written to a temporary module, swapped in for the shipped kernel
(``launch._KERNEL``; plans and prepared runners dropped), checked bit for bit against the reference
on the benchmark's own cases and timed in alternating rounds: do_bench (the benchmark's figure)
and the device kernels' time after the same L2 flush. Writes ``cache-hints-study.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rope_backends import registry  # noqa: E402
from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.benchmark import baselines, implementations, report, scenarios  # noqa: E402
from rope_backends.benchmark.timing import Clock, buffers, rotating  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402

KERNEL = ROOT / "rope_backends" / "backends" / "triton" / "kernel.py"
X_LOADS = ("tl.load(x_ptr + x_off, mask=d_mask, other=0.0)", "tl.load(x_ptr + x_off, mask=mask, other=0.0)",
           "tl.load(x_ptr + x_off + HALF * xsd, mask=mask, other=0.0)")
STORES = ("tl.store(o_ptr + o_unit[:, :, None] + d[None, None, :] * osd, ab_new, mask=d_mask)",
          "tl.store(o_ptr + o_off, a_new, mask=mask)", "tl.store(o_ptr + o_off + HALF * osd, b_new, mask=mask)")
# every cos/sin and cache-row load goes through kernel._load_table (both of its branches once bare)
TABLE_LOADS = ("tl.load(ptr, mask=mask, other=0.0)",)


def _hint(text: str, calls: tuple[str, ...], extra: str) -> str:
    for call in calls:
        assert call in text, call
        text = text.replace(call, call[:-1] + f", {extra})")
    return text


EVICT_FIRST, EVICT_LAST, CG = 'eviction_policy="evict_first"', 'eviction_policy="evict_last"', 'cache_modifier=".cg"'
VARIANTS = {
    "shipped": None,                 # kernel.py as it is
    "no hints": lambda t: t,
    "x evict_first": lambda t: _hint(t, X_LOADS, EVICT_FIRST),
    "x+store evict_first": lambda t: _hint(_hint(t, X_LOADS, EVICT_FIRST), STORES, EVICT_FIRST),
    "tables evict_last": lambda t: _hint(t, TABLE_LOADS, EVICT_LAST),
    "x evict_first + tables evict_last": lambda t: _hint(_hint(t, X_LOADS, EVICT_FIRST), TABLE_LOADS, EVICT_LAST),
    "x .cg": lambda t: _hint(t, X_LOADS, CG),
    "x .cg + tables evict_last": lambda t: _hint(_hint(t, X_LOADS, CG), TABLE_LOADS, EVICT_LAST),
    "x .cg + tables evict_last + store .cs": lambda t: _hint(_hint(_hint(t, X_LOADS, CG), TABLE_LOADS, EVICT_LAST),
                                                             STORES, 'cache_modifier=".cs"'),
}


def _bare(text: str) -> str:
    """kernel.py without any of the hints this study tries (the variants start from it)."""
    for hint in (EVICT_FIRST, EVICT_LAST, CG, 'cache_modifier=".cs"'):
        text = text.replace(f", {hint}", "")
    return text


def _load_variants(tmp: Path) -> dict:
    shipped = KERNEL.read_text()
    source = _bare(shipped)
    kernels = {}
    for i, (name, patch) in enumerate(VARIANTS.items()):
        path = tmp / f"rope_kernel_variant_{i}.py"
        path.write_text(shipped if name == "shipped" else patch(source))
        spec = importlib.util.spec_from_file_location(f"rope_kernel_variant_{i}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        kernels[name] = mod.rope_kernel
    return kernels


def _use(kernel) -> None:
    launch._kernel()
    launch._KERNEL = kernel
    launch._PLANS.clear()
    registry.invalidate()


CASES = {("diffusion", "video-115k"), ("diffusion", "video-115k neox"), ("diffusion", "video-33k"),
         ("diffusion", "batch2-4k"), ("diffusion", "3d-[S,H,D]"), ("diffusion", "d64-4k"),
         ("qk", "q+k 4096x24/8"), ("qk", "q+k 32760x12/4"), ("llm", "T=4096"), ("llm", "T=16384"),
         ("mrope", "qwen3-vl interleaved[24,20,20]")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    ap.add_argument("--cases", default=None, help="comma list of group:scenario (default: CASES)")
    a = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(device, quick=False)
    tmp = Path(tempfile.mkdtemp())
    kernels = _load_variants(tmp)
    if a.variants:
        keep = ["shipped"] + [v for v in a.variants.split(",") if v != "shipped"]
        kernels = {k: kernels[k] for k in dict.fromkeys(keep)}
    cases = set(tuple(c.split(":", 1)) for c in a.cases.split(",")) if a.cases else CASES
    names = ["triton"]
    rows = []
    for group in ("diffusion", "qk", "llm", "mrope"):
        for case in scenarios.cases(group, "gpu", device):
            if (case.group, case.scenario) not in cases or (group == "llm" and case.op != "apply_cached"):
                continue
            impl = [i for i in implementations.for_case(case, device, names, implementations.Options(progress=False))
                    if i.name == "triton"][0]
            copy = baselines.same_bytes_copy(case.nbytes, device)
            sets = [case.make(s) for s in range(buffers(case.nbytes, device))]
            pristine = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sets[0].items()}

            def fresh(pristine=pristine):  # in-place calls rotate the sets while they are timed: check on pristine copies
                return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in pristine.items()}
            want = case.reference(fresh(), case.layout)
            res: dict = {}
            exact: dict = {}
            copy_fn = rotating([copy.prepare(s) for s in sets])
            for rnd in range(a.rounds):
                for vname, kernel in kernels.items():
                    _use(kernel)
                    if rnd == 0:
                        outs = impl.prepare(fresh())()
                        exact[vname] = not any(bool(bitwise_mismatches(o, w).any()) for o, w in zip(outs, want))
                    fn = rotating([impl.prepare(s) for s in sets])
                    fn()
                    r = res.setdefault(vname, {"do_bench": [], "kernels": []})
                    r["do_bench"].append(clock.time(fn))
                    r["kernels"].append(clock.kernels(fn))
                r = res.setdefault("copy-same-bytes", {"do_bench": [], "kernels": []})
                r["do_bench"].append(clock.time(copy_fn))
                r["kernels"].append(clock.kernels(copy_fn))
            _use(kernels["shipped"])
            print(f"{case.group} {case.scenario} {case.op} {case.shape}: median of {a.rounds} rounds, µs")
            base = statistics.median(res["shipped"]["kernels"])
            for vname, r in res.items():
                k = statistics.median(r["kernels"])
                print(f"  {vname:36s} do_bench {statistics.median(r['do_bench']):8.2f}  kernels {k:8.2f} "
                      f"({100 * (k / base - 1):+5.1f} %)  bit-exact {exact.get(vname, '-')}", flush=True)
            rows.append({"group": case.group, "scenario": case.scenario, "op": case.op, "shape": case.shape,
                         "bytes": case.nbytes, "results": res, "bit_exact": exact})
            del sets, pristine
            torch.cuda.empty_cache()
    report.write_study({"variants": list(kernels), "rows": rows}, a.out, "cache-hints-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
