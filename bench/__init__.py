"""The rope_backends benchmark suite (``python -m bench`` from the repository root).

The engine is :mod:`rope_backends.benchmarking` (shipped in the package, so ``python -m
rope_backends check --bench`` works from a wheel); this folder holds the command line
(:mod:`bench.run`), the report writer (:mod:`bench.report`), the stand-alone rope_index and GPU
reliability benches, and the committed results under ``bench/results/``. It holds no kernel code.
"""
