"""Image-quality metrics reported next to REG (not part of the guidance maths): the CLIP score."""
