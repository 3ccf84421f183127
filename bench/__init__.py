"""Benchmarks of the REG pack: ``bench_reg.py`` (cost inside ComfyUI, or of the pure-torch core) and ``quality.py``
(how far the cheap estimators are from exact REG). Shared helpers live in ``benchlib.py``."""
