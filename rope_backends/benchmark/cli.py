"""Run the rope_backends benchmark suite.

    python -m rope_backends bench                                # every group on the best device here
    python -m rope_backends bench --device cuda --out DIR        # the full GPU bench (< 10 min on an H100)
    python -m rope_backends bench --groups diffusion,llm --device cpu --quick
    python -m rope_backends bench --skip torch.compile           # leave out an implementation

Groups: diffusion, qk, llm, mrope, backward, rope_index, dispatch (rope_backends/benchmark/scenarios.py).
Prints a progress line on stderr, the tables on stdout, and writes
``<out>/<device>-<date>[-quick].json`` plus a PNG plot when matplotlib is installed
(``python bench/report.py <json>`` turns a JSON into the README's results section).
This module only parses arguments: the engine is rope_backends.benchmark.engine.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from . import engine, machine, report
from .scenarios import GROUPS

__all__ = ["main", "GPU_BUDGET_S"]

GPU_BUDGET_S = 540.0  # the GPU machine's commands are killed at 600 s: stop early, keep the results


def _list(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def default_device() -> str:
    devices = machine.present_devices()
    return "cuda" if "cuda" in devices else ("npu" if "npu" in devices else "cpu")


def main(argv: Sequence[str] | None = None, prog: str = "python -m rope_backends bench") -> int:
    """The command line; ``prog`` is also how the JSON's ``command`` names it."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma list from {','.join(GROUPS)} (default: all)")
    parser.add_argument("--device", default=None,
                        help="comma list of device types: cpu, cuda, npu (default: cuda if present, else npu, else cpu)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs (same cases)")
    parser.add_argument("--out", default=str(report.default_out_dir()), help="directory for the JSON and PNG")
    parser.add_argument("--impls", default=None, help="comma list: run only these implementations")
    parser.add_argument("--skip", default=None, help="comma list: leave out these implementations (e.g. torch.compile)")
    parser.add_argument("--scale", default=None, choices=("gpu", "cpu", "tiny"),
                        help="shape set (default: gpu shapes on cuda, cpu shapes elsewhere; tiny: for tests)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 measures steadily on a busy machine)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="per device: after this many seconds skip the remaining cases (listed in the JSON) "
                             f"so a run under a wall-clock limit still writes its results (default: {GPU_BUDGET_S:.0f} "
                             "on cuda, none elsewhere; 'inf' for none)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    groups = _list(args.groups)
    for g in groups:
        if g not in GROUPS:
            parser.error(f"--groups: expected names from {','.join(GROUPS)}, got {g!r}")
    devices = _list(args.device) or [default_device()]
    for d in devices:
        if d.split(":")[0] == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device: expected a device present here ({','.join(machine.present_devices())}), got {d!r}")
    budget = args.budget
    if budget is None and any(d.split(":")[0] == "cuda" for d in devices):
        budget = GPU_BUDGET_S
    if budget is not None and budget == float("inf"):
        budget = None
    command = f"{prog} " + " ".join(argv)
    engine.run(devices, groups, quick=args.quick, out_dir=args.out, scale=args.scale, impls=_list(args.impls),
               skip=_list(args.skip), command=command.strip(), plot=not args.no_plot, budget_s=budget,
               threads=args.threads)
    return 0
