"""Turn a bench JSON into the README's results section (Markdown) and its PNG plot.

    python bench/report.py bench/results/<device>-<date>.json [--out bench/results/README-table.md]
    python bench/report.py --compact FILE    # the README's per-device table
    python bench/report.py --targets FILE    # the targets with a limit, met or missed

Writes the Markdown (tables per group, the targets, the environment line and the byte
counting rule) to ``README-table.md`` beside the JSON by default, and ``<json stem>.png`` next to
the JSON when matplotlib is installed (referenced from the Markdown). Reads only the JSON: nothing
is re-measured. The work is :func:`rope_backends.benchmark.report.render`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: prefer this checkout's package
    sys.path.insert(0, str(ROOT))

from rope_backends.benchmark import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a results file written by python -m rope_backends bench")
    parser.add_argument("--out", default=None, help="Markdown output (default: README-table.md beside the JSON)")
    parser.add_argument("--no-plot", action="store_true", help="do not (re)write the PNG")
    table = parser.add_mutually_exclusive_group()
    table.add_argument("--compact", action="store_true", help="print the README's compact per-device table")
    table.add_argument("--targets", action="store_true", help="print the targets that have a limit, met or missed")
    args = parser.parse_args(argv)
    try:
        if args.compact or args.targets:
            doc = report.load(args.json)
            print(report.compact_table(doc) if args.compact else report.targets_table(doc))
            return 0
        out, png = report.render(args.json, args.out, plot=not args.no_plot, link_root=ROOT)
    except (OSError, ValueError) as exc:  # a missing file, not JSON, not a bench result
        parser.error(f"json: {exc}")
    print(f"wrote {out}" + (f" and {png}" if png is not None and not args.no_plot else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
