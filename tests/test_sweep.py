"""Unit tests of :mod:`reg_core.sweep`: cfg parsing, run planning, the score plot and the labelled grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reg_core import plots, sweep
from reg_core.plots import sweep as sweep_plots


def test_parse_cfg_values_accepts_common_separators_and_sorts():
    assert sweep.parse_cfg_values("2, 4, 6, 8") == [2.0, 4.0, 6.0, 8.0]
    assert sweep.parse_cfg_values(" 7.5;3 1.0\n4,") == [1.0, 3.0, 4.0, 7.5]
    assert sweep.parse_cfg_values("4, 4.0, 2, 4") == [2.0, 4.0]  # duplicates dropped
    assert sweep.parse_cfg_values("0, 100, 1e1") == [0.0, 10.0, 100.0]  # KSampler's whole range


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"cfg_values is empty: enter the cfg scales .* e\.g\. \"2, 4, 6, 8\""),
        (" , ;", r"cfg_values is empty"),
        ("2, four, 6", r"cfg_values: 'four' is not a number\. Enter cfg scales separated by commas"),
        ("2, 4..5", r"'4\.\.5' is not a number"),
        ("nan", r"'nan' is not a finite number"),
        ("3, inf", r"'inf' is not a finite number"),
        ("-1, 2", r"-1 is outside KSampler's cfg range \[0, 100\]"),
        ("150", r"150 is outside"),
    ],
)
def test_parse_cfg_values_errors_name_the_input_and_the_fix(text, message):
    with pytest.raises(sweep.SweepConfigError, match=message):
        sweep.parse_cfg_values(text)


def test_parse_cfg_values_caps_the_count_and_rejects_non_text():
    many = ", ".join(str(v) for v in range(sweep.MAX_RUNS + 1))
    with pytest.raises(sweep.SweepConfigError, match=rf"has {sweep.MAX_RUNS + 1} distinct values; at most 64"):
        sweep.parse_cfg_values(many)
    assert len(sweep.parse_cfg_values(", ".join(str(v) for v in range(sweep.MAX_RUNS)))) == sweep.MAX_RUNS
    with pytest.raises(sweep.SweepConfigError, match="must be text"):
        sweep.parse_cfg_values(4.0)  # type: ignore[arg-type]


def test_plan_runs_orders_methods_and_cfgs():
    runs = sweep.plan_runs(["reg", "cfg"], [6.0, 2.0])
    assert [(r.method, r.cfg, r.row, r.col) for r in runs] == [
        ("cfg", 2.0, 0, 0),
        ("cfg", 6.0, 0, 1),
        ("reg", 2.0, 1, 0),
        ("reg", 6.0, 1, 1),
    ]
    assert [r.label for r in runs[::2]] == ["CFG", "CFG + REG"]
    everything = sweep.plan_runs(list(sweep.METHODS), [1.0])
    assert [r.method for r in everything] == ["cfg", "reg", "apg_reg", "pag_reg"]


def test_plan_runs_errors():
    with pytest.raises(sweep.SweepConfigError, match=r"no method selected: switch on at least one"):
        sweep.plan_runs([], [2.0])
    with pytest.raises(sweep.SweepConfigError, match=r"unknown method"):
        sweep.plan_runs(["cfg", "sag"], [2.0])
    with pytest.raises(sweep.SweepConfigError, match=r"cfg_values is empty"):
        sweep.plan_runs(["cfg"], [])
    cfgs = [float(v) for v in range(17)]
    with pytest.raises(sweep.SweepConfigError, match=r"4 methods × 17 cfg values = 68 sampling runs, over the limit"):
        sweep.plan_runs(list(sweep.METHODS), cfgs)
    assert len(sweep.plan_runs(list(sweep.METHODS), cfgs[:16])) == 64


def test_score_series_and_summary_table():
    runs = sweep.plan_runs(["cfg", "reg"], [2.0, 4.5])
    scores = [10.0, 12.5, 11.0, 9.0]
    assert sweep.score_series(runs, scores) == [
        ("CFG", [2.0, 4.5], [10.0, 12.5]),
        ("CFG + REG", [2.0, 4.5], [11.0, 9.0]),
    ]
    table = sweep.summary_table(runs, scores, "metric")
    lines = table.splitlines()
    assert lines[0] == "metric"
    assert lines[1].split() == ["cfg", "2", "4.5", "best", "cfg"]
    assert lines[2].split() == ["CFG", "10.0000", "12.5000", "4.5"]
    assert lines[3].split() == ["CFG", "+", "REG", "11.0000", "9.0000", "2"]
    with pytest.raises(ValueError, match="4 runs but 3 scores"):
        sweep.score_series(runs, scores[:3])


def _colour_pixels(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image == np.array(colour), axis=-1).sum())


def test_score_plot_draws_one_curve_per_method():
    runs = sweep.plan_runs(["cfg", "reg", "pag_reg"], [2.0, 4.0, 6.0])
    scores = [20.0, 24.0, 22.0, 21.0, 25.0, 26.0, 19.0, 18.0, 23.0]
    image = np.asarray(
        sweep_plots.score_plot(runs, scores, metric="CLIP score (torchmetrics, ×100)", subtitle="m, n = 2")
    )
    assert image.shape == (440, 720, 3)
    for colour in plots.PALETTE[:3]:
        assert _colour_pixels(image, colour) > 100  # each method's line and markers are drawn
    assert _colour_pixels(image, plots.PALETTE[3]) == 0


def test_tile_shape():
    assert [sweep_plots.tile_shape(n) for n in (1, 2, 3, 4, 5, 9, 10)] == [
        (1, 1),
        (1, 2),
        (2, 2),
        (2, 2),
        (2, 3),
        (3, 3),
        (3, 4),
    ]
    with pytest.raises(ValueError):
        sweep_plots.tile_shape(0)


def _cells(rows: int, cols: int, batch: int, height: int, width: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8) for _ in range(cols)] for _ in range(rows)]


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 32, 32), (3, 24, 40), (4, 64, 48)])
def test_grid_places_every_image_unchanged(batch, height, width):
    cells = _cells(2, 3, batch, height, width)
    grid, layout = sweep_plots.compose_grid(
        cells,
        row_labels=["CFG", "CFG + REG"],
        col_labels=["cfg 2", "cfg 4", "cfg 6"],
        captions=[["12.34", "23.45", "-3.21"], ["1.00", "2.00", "3.00"]],
        title="CLIP score (torchmetrics, ×100) · seed 1",
    )
    assert grid.dtype == np.uint8 and grid.shape == (layout.height, layout.width, 3)
    assert (layout.image_height, layout.image_width) == (height, width)
    boxes = []
    for r in range(2):
        for c in range(3):
            for i in range(batch):
                left, top, right, bottom = layout.image_box(r, c, i)
                assert np.array_equal(grid[top:bottom, left:right], cells[r][c][i])
                boxes.append((left, top, right, bottom))
    for a, (l1, t1, r1, b1) in enumerate(boxes):  # no two images overlap
        for l2, t2, r2, b2 in boxes[a + 1 :]:
            assert r1 <= l2 or r2 <= l1 or b1 <= t2 or b2 <= t1
    # Rows go down, columns go right, and the labels have room: the first image starts right of the row labels.
    assert layout.row_tops[0] < layout.row_tops[1] and layout.column_lefts[0] < layout.column_lefts[1]
    label_width = plots.font(sweep_plots.LABEL_FONT).getbbox("CFG + REG")[2]
    assert layout.column_lefts[0] > label_width
    # Text is drawn: dark pixels outside every image box.
    mask = np.ones(grid.shape[:2], bool)
    for left, top, right, bottom in boxes:
        mask[top:bottom, left:right] = False
    assert (grid[mask].max(axis=-1) < 80).sum() > 200


def test_grid_columns_are_wide_enough_for_their_text():
    cells = _cells(1, 2, 1, 8, 8)
    caption = "a very long caption for an eight pixel image"
    _, layout = sweep_plots.compose_grid(
        cells, row_labels=["CFG"], col_labels=["cfg 2", "cfg 4"], captions=[[caption, "1"]]
    )
    widths = [plots.font(sweep_plots.CAPTION_FONT).getbbox(text)[2] for text in (caption, "1")]
    centres = [left + layout.image_width / 2 for left in layout.column_lefts]
    assert centres[1] - centres[0] > (widths[0] + widths[1]) / 2  # centred captions do not overlap
    assert centres[0] - widths[0] / 2 > plots.font(sweep_plots.LABEL_FONT).getbbox("CFG")[2]  # nor the row label
    assert layout.width > centres[1] + widths[1] / 2


def test_grid_downscales_to_max_side():
    cells = _cells(2, 4, 2, 300, 200)
    grid, layout = sweep_plots.compose_grid(
        cells,
        row_labels=["CFG", "CFG + REG"],
        col_labels=[f"cfg {c}" for c in range(4)],
        captions=[["1"] * 4, ["2"] * 4],
        max_side=1000,
    )
    assert max(grid.shape[:2]) <= 1000
    assert layout.image_width < 200 and layout.image_height < 300
    assert math.isclose(layout.image_width / layout.image_height, 200 / 300, rel_tol=0.05)
    _, _, right, bottom = layout.image_box(1, 3, 1)
    assert 0 < right <= grid.shape[1] and 0 < bottom <= grid.shape[0]


def test_grid_input_errors():
    with pytest.raises(ValueError, match="one shape"):
        sweep_plots.compose_grid(
            [[np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 9, 3), np.uint8)]],
            row_labels=["a"],
            col_labels=["1", "2"],
            captions=[["", ""]],
        )
    with pytest.raises(ValueError, match="uint8 RGB"):
        sweep_plots.compose_grid([[np.zeros((1, 8, 8, 3))]], row_labels=["a"], col_labels=["1"], captions=[[""]])
    with pytest.raises(ValueError, match="match the grid"):
        sweep_plots.compose_grid(_cells(1, 1, 1, 4, 4), row_labels=["a", "b"], col_labels=["1"], captions=[[""]])


def test_module_is_pure():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['comfy'] = None; sys.modules['transformers'] = None; import reg_core.sweep; "
        "print(__import__('json').dumps(sorted(m for m in sys.modules if m.startswith(('comfy', 'folder_paths')))))"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["comfy"]  # only the blocker placed above


def test_drawable_replaces_only_missing_glyphs():
    assert (
        sweep_plots.drawable("CLIP score (torchmetrics, ×100) · seed 1") == "CLIP score (torchmetrics, x100) · seed 1"
    )
    assert sweep_plots.drawable("−3 → 2 ≤ \u2603") == "-3 -> 2 <= ?"
    assert sweep_plots.drawable("plain ascii, 12.5") == "plain ascii, 12.5"


def test_every_curve_is_at_the_same_guidance_weight():
    """x = cfg means w = cfg − 1 for every method: APG (cond-anchored scale) runs at w, the others at cfg."""
    runs = sweep.plan_runs(["cfg", "reg", "apg_reg", "pag_reg"], [1.0, 4.5])
    assert {r.method: r.sampler_cfg for r in runs if r.cfg == 4.5} == {
        "cfg": 4.5,
        "reg": 4.5,
        "apg_reg": 3.5,
        "pag_reg": 4.5,
    }
    assert all(r.weight == r.cfg - 1 for r in runs)
    assert [r.sampler_cfg for r in runs if r.method == "apg_reg"] == [0.0, 3.5]  # APG scale 0 = no guidance
