"""Pure-torch core of the REG node pack: the maths of Rectified Gradient Guidance (Gao et al., ICML 2025,
arXiv 2501.18865), the guidance combiners it rectifies, the paper's schedules and exact toy models.

Nothing here imports ComfyUI.
"""
