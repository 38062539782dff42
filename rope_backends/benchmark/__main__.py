"""``python -m rope_backends.benchmark``: the same as ``python -m rope_backends bench``."""

from .cli import main

raise SystemExit(main(prog="python -m rope_backends.benchmark"))
