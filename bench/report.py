"""Turn a bench JSON into the README's results section (Markdown) and its PNG plot.

    python bench/report.py bench/results/<device>-<date>.json [--out bench/results/README-table.md]

Writes the Markdown (tables per group, the targets, the environment line and the byte
counting rule) to ``bench/results/README-table.md`` by default, and ``<json stem>.png`` next to
the JSON when matplotlib is installed (referenced from the Markdown). Reads only the JSON: nothing
is re-measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rope_backends import benchmarking as bm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a results file written by python -m bench")
    parser.add_argument("--out", default=None, help="Markdown output (default: README-table.md beside the JSON)")
    parser.add_argument("--no-plot", action="store_true", help="do not (re)write the PNG")
    args = parser.parse_args(argv)
    src = Path(args.json)
    doc = json.loads(src.read_text())
    if doc.get("schema") != bm.SCHEMA:
        parser.error(f"json: expected a file with schema {bm.SCHEMA!r}, got {doc.get('schema')!r}")
    out = Path(args.out) if args.out else src.parent / "README-table.md"
    png = None if args.no_plot else bm.write_plot(doc, src.with_suffix(".png"))
    if png is None and src.with_suffix(".png").is_file():
        png = src.with_suffix(".png")  # an earlier plot (matplotlib absent here)
    rel = None
    if png is not None:
        rel = os.path.relpath(png, ROOT).replace(os.sep, "/")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(bm.markdown_report(doc, rel))
    print(f"wrote {out}" + (f" and {png}" if png is not None and not args.no_plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
