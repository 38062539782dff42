"""The benchmark's checkout side: results, the report command, studies (run from the repository root).

The engine is :mod:`rope_backends.benchmark` (shipped in the package; ``python -m rope_backends
bench``, of which ``python -m bench`` is an alias). This folder holds the report writer
(``python bench/report.py``), the GPU session scripts (``gpu_session.sh``,
``gpu_conformance.sh``), the one-off studies under ``bench/studies/`` and the committed results
under ``bench/results/``. It holds no kernel code and no engine code.
"""
