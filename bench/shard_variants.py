"""How many Triton kernel variants each `check --full --shard K/N` process compiles (CPU only).

The exhaustive tier on a GPU is bound by compiling kernel variants, not by running them. This
script counts, for every case of the tier, the variants its launches would compile -- the
constexprs, Triton's specialisation of the integer arguments (== 1, divisible by 16), the
pointers' 16-byte alignment and dtypes -- by running each case with the launch stubbed out under
the Triton interpreter, then compares shardings: every N-th case, contiguous slices, and the
grouping `check --shard` uses (whole `RopeCase.kernel_group`s). Approximate: launch planning on
CPU sees no SM count, so block sizes may differ from a GPU's.

    python bench/shard_variants.py [--shards 12] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import rope_backends  # noqa: E402,F401  (registers the backends)
from rope_backends.__main__ import _shard_cases  # noqa: E402
from rope_backends.backends.triton import launch  # noqa: E402
from rope_backends.testing import cases as case_data  # noqa: E402
from rope_backends.testing import runner  # noqa: E402


class _Stub(Exception):
    pass


def variants_per_case(cases) -> list[set]:
    current: set = set()

    def record(plan, ptrs):
        # Triton specialises ints on == 1 and on divisibility by 16, pointers on alignment and dtype
        spec = tuple((v == 1, v % 16 == 0) if type(v) is int else v for v in plan.values.values())
        align = tuple(t is None or t.data_ptr() % 16 == 0 for t in ptrs)
        dtypes = tuple(None if t is None else t.dtype for t in ptrs)
        current.add((spec, plan.num_warps, align, dtypes))
        raise _Stub

    real, launch._launch = launch._launch, record
    out = []
    try:
        for case in cases:
            current = set()
            try:
                runner.check_case(case, "triton", "cpu")
            except Exception:  # the stub ends every case at its first launch; the variants are in
                pass
            out.append(current)
    finally:
        launch._launch = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    tier = case_data.cases_for("triton", "cuda", True)
    seen = variants_per_case(tier)
    index = {c.name: i for i, c in enumerate(tier)}
    n = a.shards
    size = len(tier)
    shardings = {
        "every_nth": [list(range(k, size, n)) for k in range(n)],
        "contiguous": [list(range(k * size // n, (k + 1) * size // n)) for k in range(n)],
        "kernel_groups": [[index[c.name] for c in _shard_cases(tier, k, n)] for k in range(n)],
    }
    result = {"cases": size, "shards": n, "variants": len(set().union(*seen)), "sharding": {}}
    for name, shards in shardings.items():
        per = [len(set().union(*(seen[i] for i in s))) for s in shards]
        result["sharding"][name] = {"variants_per_shard": per, "max": max(per), "compiles": sum(per),
                                    "cases_per_shard": [len(s) for s in shards]}
        print(f"{name:14s} compiles {sum(per):5d}  busiest shard {max(per):4d} variants")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out) / "shard-variants-cpu-sim.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{result['variants']} variants over {size} cases; wrote {out}")


if __name__ == "__main__":
    main()
