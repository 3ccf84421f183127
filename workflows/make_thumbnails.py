"""Draw the template browser's thumbnails: ``workflows/<template>.jpg`` next to each ``workflows/<template>.json``.

ComfyUI's frontend (1.27 and 1.49) lists a custom node pack's templates by file name only: the card's title is the
file name and its picture is ``<file name>.jpg`` from the same folder. So the file name carries the title, and the
picture carries the one-line description and a diagram of what the template compares (the REG 7 card shows the
diagnostics figure of the exact 2-D toy, web/docs/toy_diagnostics.png). Drawn with the pack's own Pillow helpers
(reg_core.render); run it with the project interpreter after adding or renaming a template::

    .venv/bin/python workflows/make_thumbnails.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from reg_core.render import BLACK, GREY, PALETTE, WHITE, font  # noqa: E402

SIZE = (480, 360)
BLUE, RED = PALETTE[0], PALETTE[1]

# template file name → (one-line description, the branches it compares: label, whether REG is on)
CARDS: dict[str, tuple[str, list[tuple[str, bool]]]] = {
    "REG 1 - CFG vs CFG + REG (SD1.5)": (
        "Same seed and prompt: KSampler with CFG, then with REG Guidance added.",
        [("CFG 7.5", False), ("CFG 7.5 + REG", True)],
    ),
    "REG 2 - Interval guidance schedule + REG (SD1.5)": (
        "Constant CFG, the paper's interval schedule, and the schedule with REG.",
        [("constant CFG", False), ("interval CFG", False), ("interval CFG + REG", True)],
    ),
    "REG 3 - APG vs APG + REG (SD1.5)": (
        "ComfyUI's Adaptive Projected Guidance with and without REG.",
        [("APG", False), ("APG + REG", True)],
    ),
    "REG 4 - PAG vs PAG + REG (SD1.5)": (
        "Perturbed-Attention Guidance on top of CFG, with and without REG.",
        [("CFG + PAG", False), ("CFG + PAG + REG", True)],
    ),
    "REG 5 - REG Guider with SamplerCustomAdvanced (SD1.5)": (
        "One GUIDER node: base guidance, schedule and REG (strength 0 vs 1).",
        [("REG Guider, strength 0", False), ("REG Guider, strength 1", True)],
    ),
    "REG 6 - CFG vs CFG + REG (SD3.5 Medium)": (
        "A flow model: SD3.5 Medium with CFG, then with REG Guidance added.",
        [("CFG 4.5", False), ("CFG 4.5 + REG", True)],
    ),
    "REG 7 - Diagnostics, where REG acts (SD1.5)": (
        "M per step and M heatmaps of the last run, next to the image.",
        [],
    ),
    "REG 8 - Sweep, CLIP score vs cfg (SD1.5)": (
        "The paper's trade-off on your prompt: CLIP score against cfg, and the grid.",
        [],
    ),
}


def wrap(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font(size)) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line]


def box(draw: ImageDraw.ImageDraw, xy: tuple[int, int, int, int], label: str, colour, size: int = 15) -> None:
    draw.rounded_rectangle(xy, radius=8, outline=colour, width=3, fill=WHITE)
    x0, y0, x1, y1 = xy
    w = draw.textlength(label, font=font(size))
    draw.text(((x0 + x1 - w) / 2, (y0 + y1 - size) / 2 - 1), label, fill=BLACK, font=font(size))


def branches(draw: ImageDraw.ImageDraw, lanes: list[tuple[str, bool]], top: int, bottom: int) -> None:
    """seed + prompt → one sampler per branch → one image per branch; REG branches in red."""
    box(draw, (16, (top + bottom) // 2 - 34, 116, (top + bottom) // 2 + 34), "seed +", GREY)
    draw.text((42, (top + bottom) // 2 + 4), "prompt", fill=BLACK, font=font(15))
    step = (bottom - top) // len(lanes)
    for i, (label, reg) in enumerate(lanes):
        cy = top + step * i + step // 2
        colour = RED if reg else BLUE
        draw.line((116, (top + bottom) // 2, 150, cy), fill=GREY, width=2)
        box(draw, (150, cy - 22, 360, cy + 22), label, colour, 14)
        draw.line((360, cy, 384, cy), fill=GREY, width=2)
        draw.rectangle((384, cy - 24, 460, cy + 24), fill=(235, 235, 235), outline=colour, width=3)
        draw.text((398, cy - 8), "image", fill=GREY, font=font(14))


def sweep_grid(draw: ImageDraw.ImageDraw, top: int, bottom: int) -> None:
    """The CLIP-score-vs-cfg axes (one curve per method) and the methods × cfg grid of the sweep's outputs."""
    x0, x1, y0, y1 = 40, 220, top + 10, bottom - 24
    draw.line((x0, y1, x1, y1), fill=BLACK, width=2)
    draw.line((x0, y0, x0, y1), fill=BLACK, width=2)
    draw.text((x1 - 24, y1 + 4), "cfg", fill=BLACK, font=font(13))
    draw.text((x0 + 6, y0 - 4), "CLIP score", fill=BLACK, font=font(13))
    for i in range(4):  # the cfg values; the curves are what the sweep measures, so none is drawn here
        draw.line((x0 + 30 + 45 * i, y1 - 4, x0 + 30 + 45 * i, y1 + 4), fill=BLACK, width=2)
    for row, (colour, label) in enumerate(((BLUE, "CFG"), (RED, "CFG + REG"))):
        draw.line((x0 + 20, y0 + 30 + 20 * row, x0 + 50, y0 + 30 + 20 * row), fill=colour, width=3)
        draw.text((x0 + 56, y0 + 22 + 20 * row), label, fill=colour, font=font(13))
    gx, gy, cell = 260, top + 20, 44
    for row, (colour, label) in enumerate(((BLUE, "CFG"), (RED, "REG"))):
        for col in range(4):
            x, y = gx + col * (cell + 6), gy + row * (cell + 8)
            draw.rectangle((x, y, x + cell, y + cell), fill=(235, 235, 235), outline=colour, width=3)
        draw.text((gx, gy + 2 * (cell + 8) + row * 16), f"row {row + 1}: {label}", fill=colour, font=font(13))


def card(name: str, description: str, lanes: list[tuple[str, bool]]) -> Image.Image:
    image = Image.new("RGB", SIZE, WHITE)
    draw = ImageDraw.Draw(image)
    title = name.split(" - ", 1)[1]
    draw.text((16, 12), title, fill=BLACK, font=font(20))
    text_lines = wrap(draw, description, SIZE[0] - 32, 16)
    top, bottom = 48, SIZE[1] - 12 - 20 * len(text_lines)
    if lanes:
        branches(draw, lanes, top, bottom)
    elif name.startswith("REG 7"):
        figure = Image.open(HERE.parent / "web" / "docs" / "toy_diagnostics.png").convert("RGB")
        figure.thumbnail((SIZE[0] - 32, bottom - top))
        image.paste(figure, ((SIZE[0] - figure.width) // 2, top))
    else:
        sweep_grid(draw, top, bottom)
    for i, line in enumerate(text_lines):
        draw.text((16, bottom + 6 + 20 * i), line, fill=GREY, font=font(16))
    return image


def main() -> None:
    templates = sorted(p.stem for p in HERE.glob("*.json"))
    missing = sorted(set(templates) ^ set(CARDS))
    if missing:
        raise SystemExit(f"templates and CARDS differ: {missing}")
    for name, (description, lanes) in CARDS.items():
        card(name, description, lanes).save(HERE / f"{name}.jpg", quality=85, optimize=True)


if __name__ == "__main__":
    main()
