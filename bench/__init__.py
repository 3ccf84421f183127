"""Benchmarks of the REG pack: ``cost.py`` (REG's cost next to CFG's inside ComfyUI), ``gpu_check.py`` (the same as one
command for a bare GPU machine) and ``trained.py`` (REG on a network trained at run time, ``digits.py``)."""
