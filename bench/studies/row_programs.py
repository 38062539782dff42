"""One-off study: one program per row block over every head (kernel.py's ``ROW_PROGRAMS``), on a GPU.

    python bench/studies/row_programs.py [--out DIR] [--rounds N] [--cases group:scenario,...]

By default a program rotates one tile of ``BLOCK_T`` rows x ``BLOCK_H`` heads of q or of k and
loads the tile's cos/sin (or its position -> cache rows) itself, so a token's table row is loaded
once per head block. With ``ROW_PROGRAMS`` a program takes ``BLOCK_T`` rows, loads their table
rows once and loops over every head of q and of k, ``BLOCK_H`` at a time: Liger-Kernel's one
program per token, with any tile. For the benchmark's own cases (``python -m rope_backends
bench``: the q+k shapes, serving, MRoPE, the diffusion shapes) this times the shipped plan, the
same tile with ``ROW_PROGRAMS``, a few other row-program tiles and, for q+k, Liger-Kernel (when
importable), each checked bit for bit against the reference first, in alternating rounds: do_bench
(the benchmark's figure) and the device kernels' time after the same L2 flush. Writes
``row-programs-study.json``. Two variants drop the kernel's ``.cg`` load hint (Liger's loads have
none): the shipped tile, and a row program of 32 heads (Liger's own shape for q 24 / k 8 heads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rope_backends import registry  # noqa: E402
from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.benchmark import baselines, implementations, report, scenarios  # noqa: E402
from rope_backends.benchmark.timing import Clock, buffers, rotating  # noqa: E402
from rope_backends.testing.check import bitwise_mismatches  # noqa: E402

CASES = {("qk", "q+k 4096x24/8"), ("qk", "q+k 32760x12/4"), ("qk", "q+k 115200x24/8"),
         ("llm", "T=4096"), ("llm", "T=16384"),
         ("mrope", "plain"), ("mrope", "qwen3-vl interleaved[24,20,20]"),
         ("diffusion", "batch2-4k"), ("diffusion", "video-33k")}
TILES = ((1, 8, 4), (2, 8, 4), (1, 16, 4), (1, 32, 2), (1, 32, 4), (1, 32, 8), (2, 32, 8))
KERNEL = ROOT / "rope_backends" / "backends" / "triton" / "kernel.py"


def _without_cg():
    """kernel.py with its loads' .cg hint removed (Liger-Kernel's loads have none), from a temp file."""
    import importlib.util
    import tempfile

    path = Path(tempfile.mkdtemp()) / "rope_kernel_without_cg.py"
    path.write_text(KERNEL.read_text().replace(', cache_modifier=".cg"', ""))
    spec = importlib.util.spec_from_file_location("rope_kernel_without_cg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.rope_kernel


def _variants(default_tile) -> dict:
    """label -> (tile, row_programs, without .cg) for set_config (None: the shipped plan)."""
    out = {"shipped": None, f"rows {tuple(default_tile)}": (tuple(default_tile), True, False)}
    for tile in TILES:
        out.setdefault(f"rows {tile}", (tile, True, False))
    out["shipped, no .cg"] = (tuple(default_tile), False, True)
    out["rows (1, 32, 4), no .cg"] = ((1, 32, 4), True, True)
    return out


_KERNELS: dict = {}


def _configure(cfg) -> None:
    if not _KERNELS:
        _KERNELS[False] = launch._kernel()
        _KERNELS[True] = _without_cg()
    launch._KERNEL = _KERNELS[bool(cfg and cfg[2])]
    if cfg is None:
        launch.set_config(None)
    else:
        launch.set_config(*cfg[0], row_programs=cfg[1])
    registry.invalidate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=None, help="comma list of group:scenario (default: CASES)")
    a = ap.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    clock = Clock(device, quick=False)
    cases = set(tuple(c.split(":", 1)) for c in a.cases.split(",")) if a.cases else CASES
    rows = []
    for group in ("qk", "llm", "mrope", "diffusion"):
        for case in scenarios.cases(group, "gpu", device):
            if (case.group, case.scenario) not in cases:
                continue
            if group == "llm" and case.op == "apply_qk" and case.scenario != "T=16":
                continue
            impls = {i.name: i for i in implementations.for_case(case, device, ["triton"],
                                                                  implementations.Options(progress=False))}
            if case.op == "apply_qk" and "liger-kernel" not in impls:
                print("  (Liger-Kernel not importable: no peer row)")
            triton_impl = impls["triton"]
            peer = impls.get("liger-kernel") if case.op == "apply_qk" else None
            copy = baselines.same_bytes_copy(case.nbytes, device)
            sets = [case.make(s) for s in range(buffers(case.nbytes, device))]
            pristine = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sets[0].items()}

            def fresh(pristine=pristine):  # in-place calls rotate the sets while timed: check pristine copies
                return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in pristine.items()}
            want = case.reference(fresh(), case.layout)
            _configure(None)
            first = fresh()
            triton_impl.prepare(first)()
            plan = next(p for p in launch._PLANS.values() if isinstance(p, launch.Plan))
            variants = _variants(plan.tile)
            res: dict = {}
            exact: dict = {}
            copy_fn = rotating([copy.prepare(s) for s in sets])
            for rnd in range(a.rounds):
                for vname, cfg in variants.items():
                    _configure(cfg)
                    if rnd == 0:
                        outs = triton_impl.prepare(fresh())()
                        exact[vname] = not any(bool(bitwise_mismatches(o, w).any()) for o, w in zip(outs, want))
                        if not exact[vname]:
                            print(f"  {vname}: NOT bit-exact", flush=True)
                    if not exact[vname]:
                        continue
                    fn = rotating([triton_impl.prepare(s) for s in sets])
                    fn()
                    r = res.setdefault(vname, {"do_bench": [], "kernels": []})
                    r["do_bench"].append(clock.time(fn))
                    r["kernels"].append(clock.kernels(fn))
                _configure(None)
                extra = {"copy-same-bytes": copy_fn}
                if peer is not None:
                    extra[peer.name] = rotating([peer.prepare(s) for s in sets])
                for name, fn in extra.items():
                    fn()
                    r = res.setdefault(name, {"do_bench": [], "kernels": []})
                    r["do_bench"].append(clock.time(fn))
                    r["kernels"].append(clock.kernels(fn))
            print(f"{case.group} {case.scenario} {case.op} {case.shape} (shipped tile {tuple(plan.tile)}): "
                  f"median of {a.rounds} rounds, µs")
            base = statistics.median(res["shipped"]["kernels"])
            for vname, r in res.items():
                k = statistics.median(r["kernels"])
                print(f"  {vname:24s} do_bench {statistics.median(r['do_bench']):8.2f}  kernels {k:8.2f} "
                      f"({100 * (k / base - 1):+5.1f} %)  bit-exact {exact.get(vname, '-')}", flush=True)
            rows.append({"group": case.group, "scenario": case.scenario, "op": case.op, "shape": case.shape,
                         "bytes": case.nbytes, "shipped_tile": list(plan.tile),
                         "variants": {k: (None if v is None else {"tile": list(v[0]), "row_programs": v[1],
                                                                  "without_cg": v[2]})
                                      for k, v in variants.items()},
                         "results": res, "bit_exact": exact})
            del sets, pristine
            torch.cuda.empty_cache()
    _configure(None)
    report.write_study({"rows": rows}, a.out, "row-programs-study.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
