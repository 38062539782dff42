"""Result documents in and out: the JSON file, the terminal / README tables, the PNG plot.

A result document (schema :data:`SCHEMA`) is what :func:`.engine.run_device` returns and what
``<device>-<date>[-quick|-short].json`` holds. :func:`load` reads one (any run written under this
schema, before or after the engine was split into modules), :func:`format_tables` prints it,
:func:`markdown_report` writes the README results section (``bench/report.py`` is its command
line), :func:`write_plot` draws GB/s per implementation when matplotlib is installed.

This module reads and writes documents only: it measures nothing and never changes a row's
values or names (a renamed implementation keeps its old name in old files; see
:data:`.implementations.ALIASES` to match them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .scenarios import GROUPS

__all__ = ["SCHEMA", "load", "format_tables", "compact_table", "targets_table", "markdown_report", "write_json",
           "write_study", "write_plot", "render", "default_out_dir"]

SCHEMA = "rope_backends.bench/1"
_CHECKOUT = Path(__file__).resolve().parents[2]   # the repository root when run from a checkout


def default_out_dir() -> Path:
    """bench/results of the checkout this package runs from, else ./bench-results."""
    if (_CHECKOUT / "bench").is_dir():
        return _CHECKOUT / "bench" / "results"
    return Path.cwd() / "bench-results"


def load(path: str | Path) -> dict:
    """A result document from its JSON file; ``ValueError`` naming the file unless it has :data:`SCHEMA`."""
    doc = json.loads(Path(path).read_text())
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path}: expected a bench result with schema {SCHEMA!r}, got {schema!r}")
    return doc


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _extra(r: dict) -> str:
    """The last column of a row: overheads of the dispatch group, host syncs of rope_index."""
    extra = ""
    if "overhead_over_launch_us" in r:
        extra = f"+{r['overhead_over_launch_us']:.2f} µs over launch"
        if "overhead_over_launch_us_min" in r:
            extra += f" (min {r['overhead_over_launch_us_min']:+.2f})"
    if "overhead_over_forward_us" in r:
        extra = (extra + "; " if extra else "") + f"+{r['overhead_over_forward_us']:.2f} µs over forward"
        if "overhead_over_forward_us_min" in r:
            extra += f" (min {r['overhead_over_forward_us_min']:+.2f})"
    if "host_syncs" in r:
        extra = f"host syncs {r['host_syncs']}"
    return extra


def format_tables(doc: dict) -> str:
    """Markdown tables (readable on a terminal): one per group, then the targets."""
    out = []
    copy = doc["copy_bandwidth"]
    dev = doc["device"]
    extra = ""
    if dev["type"] == "cpu":
        extra = f" ({dev.get('threads')} threads, load average {dev.get('load_average_1min') or 0:.1f})"
    out.append(f"device: {dev['name']}{extra}   copy bandwidth: {copy['gbps']:.1f} GB/s (read + write)   "
               f"torch {doc['versions']['torch']}, triton {doc['versions']['triton']}   default backend: "
               f"{doc.get('default_backend')}")
    for group in GROUPS:
        rows = [r for r in doc["rows"] if r["group"] == group]
        if not rows:
            continue
        notes: dict[str, str] = {}
        table = []
        for r in rows:
            name = r["implementation"]
            if r.get("note"):
                notes.setdefault(name, r["note"])
            table.append([r["scenario"], r["op"], r["shape"], r["dtype"], name, r["timing"], _fmt(r["us"], 2),
                          _fmt(r["gbps"]), _fmt(r["pct_copy"]), _fmt(r["bit_exact"]), _extra(r)])
        out.append("")
        out.append(f"### {group}")
        out.append(_md_table(["scenario", "op", "shape", "dtype", "implementation", "timing", "µs", "GB/s",
                              "% copy", "bit-exact", ""], table, {6, 7, 8}))
        for name, note in notes.items():
            out.append(f"- {name}: {note}")
    skipped = doc.get("skipped") or []
    if skipped:
        out.append("")
        out.append("not run:")
        seen = set()
        for s in skipped:
            text = f"  {s.get('implementation', s.get('group', ''))}: {s['reason']}"
            if text not in seen:
                seen.add(text)
                out.append(text)
    summary = doc.get("summary") or []
    if doc.get("short") and doc["device"]["type"] != "cuda":
        summary = []  # GPU targets: noise in a newcomer's short CPU table (still in the JSON)
    if summary:
        out.append("")
        out.append("### targets (defined for the GPU; see docs/benchmarks.md)")
        out.append(_md_table(["target", "value", "limit", "met", "detail"],
                             [[s["target"], _fmt(s["value"], 2), _fmt(s["limit"], 2),
                               "-" if s["met"] is None else ("yes" if s["met"] else "NO"), s["detail"]]
                              for s in summary], {1, 2}))
    return "\n".join(out)


_PEERS = ("flash-attn", "liger-kernel", "flashinfer", "torch.compile")


def compact_table(doc: dict) -> str:
    """One row per case of the diffusion, qk, llm and mrope groups for the device's default backend
    (the README's per-device results): its time, the device kernels' own time (in brackets, where
    the run has ``kernels`` rows), % of the copy bandwidth, % of a copy of as many bytes, and the
    peers' times likewise (bit-exact or not, as measured)."""
    best = doc.get("default_backend")
    rows = doc["rows"]
    timing = "do_bench" if doc["device"]["type"] == "cuda" else "torch_timer"
    out = []
    for r in rows:
        if r["group"] not in ("diffusion", "qk", "llm", "mrope") or r["implementation"] != best or r["timing"] != timing:
            continue
        if r["group"] == "llm" and r["tokens"] < 4096:
            continue
        same = [o for o in rows if (o["group"], o["scenario"], o["op"], o["implementation"], o["timing"]) ==
                (r["group"], r["scenario"], r["op"], "copy-same-bytes", timing)]
        def kernels_of(name):
            k = [o for o in rows if (o["group"], o["scenario"], o["op"], o["implementation"], o["timing"]) ==
                 (r["group"], r["scenario"], r["op"], name, "kernels")]
            return k[0]["us"] if k else None

        peers = []
        for name in _PEERS:
            p = [o for o in rows if (o["group"], o["scenario"], o["op"], o["implementation"], o["timing"]) ==
                 (r["group"], r["scenario"], r["op"], name, timing)]
            if p:
                mark = "" if p[0]["bit_exact"] else " (not exact)"
                k = kernels_of(name)
                device = f" [{_fmt(k)}]" if k is not None else ""
                peers.append(f"{name} {_fmt(p[0]['us'])}{device}{mark}")
        pct_same = f"{100 * same[0]['us'] / r['us']:.0f} %" if same else "-"
        op = r["op"] + (" in place" if r["group"] in ("qk", "llm") and r["op"] != "apply" else "")
        mine = kernels_of(best)
        out.append([f"{r['group']} {r['scenario']}", op, r["shape"], r["layout"], _fmt(r["us"]),
                    _fmt(mine) if mine is not None else "-", f"{_fmt(r['pct_copy'])} %", pct_same,
                    "; ".join(peers) or "-"])
    return _md_table(["case", "op", "shape", "layout", f"{best} µs", "[kernels µs]", "% of copy",
                      "% of same-bytes copy", "peers, µs [kernels µs]"], out, {4, 5, 6, 7})


def targets_table(doc: dict) -> str:
    """The targets that have a limit (docs/benchmarks.md's per-device list): target, value, limit,
    met or missed, detail; from the document's summary (older documents: judged again)."""
    from . import targets

    def num(v) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| target | value | limit | | detail |", "| --- | ---: | ---: | --- | --- |"]
    for s in doc.get("summary") or targets.summarize(doc):
        if s.get("limit") is None or s.get("met") is None:
            continue
        lines.append(f"| {s['target']} | {num(s['value'])} | {num(s['limit'])} | "
                     f"{'met' if s['met'] else '**missed**'} | {s['detail']} |")
    return "\n".join(lines)


def markdown_report(doc: dict, plot: str | None = None) -> str:
    """The README results section: environment, the tables, the plot, how to regenerate."""
    v = doc["versions"]
    copy = doc["copy_bandwidth"]
    lines = [
        f"Measured {doc['date']} on **{doc['device']['name']}** (torch {v['torch']}, triton {v['triton']}; "
        f"default backend `{doc.get('default_backend')}`), command `{doc['command']}`.",
        f"Copy bandwidth {copy['gbps']:.0f} GB/s ({copy['method']}). {doc['byte_counting']}",
        "`bit-exact`: the implementation's output equals `rope_backends.reference` bit for bit on that case.",
        "",
    ]
    tables = format_tables(doc)
    body = tables.split("\n", 1)[1] if "\n" in tables else ""
    lines.append(body.strip("\n"))
    if plot:
        lines += ["", f"![GB/s per implementation]({plot})"]
    return "\n".join(lines) + "\n"


def write_json(doc: dict, out_dir: str | Path, suffix: str = "") -> Path:
    """``<out_dir>/<device_label>-<date><suffix>.json``; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{doc['device_label']}-{doc['date']}{suffix}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def write_study(doc: dict, out_dir: str | Path, name: str) -> Path:
    """A one-off study's results (bench/studies/): ``<out_dir>/<name>``, headed by the current CUDA
    device's name (without a GPU: the CPU's) and the torch and triton versions. Returns its path."""
    import torch

    from .machine import cpu_name, versions

    device = torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else cpu_name()
    head = {"device": device, "torch": torch.__version__, "triton": versions().get("triton")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps({**head, **doc}, indent=1) + "\n")
    return path


def write_plot(doc: dict, path: str | Path) -> Path | None:
    """GB/s per implementation: bars per shape for diffusion, lines over tokens for llm. Returns
    None (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in doc["rows"] if r.get("gbps") and r["timing"] in ("do_bench", "torch_timer", "host_loop")]
    diff = [r for r in rows if r["group"] == "diffusion"]
    llm_ops = [op for op in ("apply_qk", "apply_cached") if any(r["group"] == "llm" and r["op"] == op for r in rows)]
    panels = (1 if diff else 0) + len(llm_ops)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    axes = list(axes[0])
    copy = doc["copy_bandwidth"]["gbps"]
    if diff:
        ax = axes.pop(0)
        shapes = list(dict.fromkeys(r["shape"] for r in diff))
        names = list(dict.fromkeys(r["implementation"] for r in diff))
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            vals = [next((r["gbps"] for r in diff if r["shape"] == s and r["implementation"] == name), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], vals, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=20, fontsize=7)
        ax.axhline(copy, ls="--", c="k", lw=1, label="copy")
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title("diffusion: apply, bf16, interleaved")
        ax.legend(fontsize=7)
    for op in llm_ops:
        ax = axes.pop(0)
        sel = [r for r in rows if r["group"] == "llm" and r["op"] == op]
        for name in dict.fromkeys(r["implementation"] for r in sel):
            pts = sorted((r["tokens"], r["gbps"]) for r in sel if r["implementation"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(copy, ls="--", c="k", lw=1, label="copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title(f"llm: {op}, q 32 / k 8 heads, D=128, neox, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(f"rope_backends bench: {doc['device']['name']} ({doc['date']})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(src: str | Path, out: str | Path | None = None, plot: bool = True,
           link_root: str | Path | None = None) -> tuple[Path, Path | None]:
    """The README results section of one JSON: Markdown to ``out`` (default: README-table.md beside
    the JSON) and, with ``plot``, ``<json stem>.png`` beside the JSON (an existing PNG is linked
    when matplotlib is absent). Image links are relative to ``link_root`` (default: the checkout).
    Returns (Markdown path, PNG path or None)."""
    src = Path(src)
    doc = load(src)
    out = Path(out) if out is not None else src.parent / "README-table.md"
    png = write_plot(doc, src.with_suffix(".png")) if plot else None
    if png is None and src.with_suffix(".png").is_file():
        png = src.with_suffix(".png")  # an earlier plot (matplotlib absent here)
    rel = None
    if png is not None:
        rel = os.path.relpath(png, link_root if link_root is not None else _CHECKOUT).replace(os.sep, "/")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_report(doc, rel))
    return out, png
