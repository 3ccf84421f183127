"""Pure-torch core of the REG node pack: the maths of Rectified Gradient Guidance (Gao et al., ICML 2025,
arXiv 2501.18865) at the top level (``rectify``, ``guidance``, ``schedules``, ``diagnostics``, the exact ``toy``
models, the ``sweep`` plan), and apart from it: ``plots`` (Pillow pictures), ``metrics`` (the CLIP score, which loads
transformers models from files) and ``demo`` (the command-line toy demo, ``python -m reg_core.demo``).

Nothing here imports ComfyUI.
"""
