"""``python -m bench``: an alias of ``python -m rope_backends bench`` (same options), kept for old commands."""

from rope_backends.benchmark.cli import main

raise SystemExit(main(prog="python -m bench"))
