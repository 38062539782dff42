"""The rope_backends benchmark: every implementation of a RoPE call, checked bit for bit, then timed.

``python -m rope_backends bench`` (the full suite, :mod:`.cli`) and ``python -m rope_backends
check --bench`` (:func:`run_short`) run it; it ships in the package so both work from an
installed wheel. One job per module:

    scenarios        the cases of every group and scale: shapes, input factories, expected outputs
    rope_index       the rope_index group: the transformers-style loop, synthetic batches, setups
    implementations  which implementations run a case: backends, the package's own code, peers, baselines
    peers            torch.compile, Liger-Kernel, flash-attn, FlashInfer (optional; absent: a Skip reason)
    baselines        what computes no rope: same-bytes copy, one torch op, empty launch, direct launch
    timing           Clock (do_bench, CUDA graphs, torch Timer, host loops), rotating input buffers
    machine          device info, versions, copy bandwidth
    engine           run a device: check, time, rows, checkpoints, time budget; run(), run_short()
    targets          the summary against the GPU targets
    report           the JSON (schema ``rope_backends.bench/1``), Markdown tables, the PNG plot
    cli              the command line

The benchmark contains no kernel and changes no backend; matplotlib, Liger-Kernel, flash-attn and
FlashInfer are optional. Importing this package imports no optional package and no Triton.
"""

from __future__ import annotations

from .engine import run, run_device, run_short
from .machine import copy_bandwidth, device_info, present_devices, versions
from .report import SCHEMA, default_out_dir, format_tables, load, markdown_report, write_json, write_plot
from .scenarios import BYTE_RULE, GROUPS
from .targets import summarize

__all__ = [
    "GROUPS",
    "SCHEMA",
    "BYTE_RULE",
    "run",
    "run_device",
    "run_short",
    "format_tables",
    "markdown_report",
    "write_json",
    "write_plot",
    "load",
    "summarize",
    "default_out_dir",
    "present_devices",
    "device_info",
    "copy_bandwidth",
    "versions",
]
