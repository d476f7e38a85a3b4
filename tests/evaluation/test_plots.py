"""The similarity histograms and the 2-D map, read from their pixels and drawn text."""

import matplotlib
import numpy as np
import pytest

from kdml.evaluation.plots import (MAP_OTHERS_COLOUR, highlighted_classes, histogram_range,
                                   plot_embedding_map, plot_similarity_histograms)


def _capture(monkeypatch) -> list:
    """Patches Figure.savefig to record each saved figure (before it is closed)."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig

    def savefig(figure, *args, **kwargs):
        result = save(figure, *args, **kwargs)
        figures.append(figure)
        return result

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def _pixels(path):
    from PIL import Image

    with Image.open(path) as png:
        return np.asarray(png.convert("RGB")).astype(int)


def _to_pixel(ax, x, y):
    """Data coordinates -> (column, row) of the saved PNG (origin top-left)."""
    px, py = ax.transData.transform((x, y))
    return int(round(px)), int(round(ax.figure.bbox.height - py))


def test_histograms_span_the_data_and_draw_the_threshold(tmp_path, monkeypatch):
    """Pairs in [0.9, 1.0] (issue 33's glyph model): the axis spans them, not [-1, 1],
    so the bars fill the width; the threshold is a dashed black line at its value."""
    figures = _capture(monkeypatch)
    rng = np.random.default_rng(0)
    positive = rng.uniform(0.95, 1.0, 500).astype(np.float32)
    negative = rng.uniform(0.90, 0.97, 5000).astype(np.float32)
    path = plot_similarity_histograms(positive, negative, str(tmp_path / "h.png"),
                                      threshold=0.9996)
    (figure,) = figures
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    span = 1.0 - 0.9
    assert low <= negative.min() and high >= 0.9996  # all data and the threshold shown
    assert negative.min() - low <= 0.06 * span and high - positive.max() <= 0.06 * span
    assert (low, high) == histogram_range(positive, negative, threshold=0.9996)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["negative pairs (5,000)", "positive pairs (500)", "threshold 0.9996"]
    pixels = _pixels(path)
    top, bottom = _to_pixel(ax, low, ax.get_ylim()[1])[1], _to_pixel(ax, low, 0)[1]
    left, right = _to_pixel(ax, low, 0)[0], _to_pixel(ax, high, 0)[0]
    # bars (the default blue and orange, blended): columns holding coloured pixels
    plot = pixels[top + 2:bottom - 2, left + 2:right - 2]
    saturation = plot.max(axis=2) - plot.min(axis=2)
    filled = (saturation > 60).any(axis=0).mean()
    assert filled > 0.6, filled  # on a [-1, 1] axis these pairs fill 5 % of the width
    column = _to_pixel(ax, 0.9996, 0)[0]
    line = pixels[top + 2:bottom - 2, column - 1:column + 2].max(axis=2).min(axis=1)
    assert (line < 60).mean() > 0.3  # dark dashes along the threshold's column
    elsewhere = pixels[top + 2:bottom - 2, left + 5:left + 8].max(axis=2).min(axis=1)
    assert (elsewhere < 60).mean() < 0.05


def test_histogram_range_without_data_or_with_a_wide_spread():
    assert histogram_range([], []) == (-1.0, 1.0)
    assert histogram_range(np.array([-0.99, 0.99]), np.array([0.0])) == (-1.0, 1.0)
    low, high = histogram_range(np.array([0.5]), np.array([0.5]))
    assert (low, high) == pytest.approx((0.499, 0.501))


def test_map_colours_ten_classes_with_a_legend_and_greys_the_rest(tmp_path, monkeypatch):
    """30 classes: the 10 largest in 10 colours named in the legend, the rest grey; the
    title says so. Each class sits at its own spot, so its pixel shows its colour."""
    figures = _capture(monkeypatch)
    sizes = np.arange(30) % 7 + 2
    sizes[[3, 17]] = 40  # two clearly largest classes
    labels = np.repeat(np.arange(30), sizes)
    spots = np.stack([np.arange(30) % 6, np.arange(30) // 6], axis=1).astype(float) * 10
    coordinates = spots[labels]
    names = [f"alphabet/character{c:02d}" for c in range(30)]
    path = plot_embedding_map(coordinates, labels, str(tmp_path / "m.png"), "glyphs",
                              class_names=names)
    (figure,) = figures
    ax = figure.axes[0]
    shown = highlighted_classes(labels)
    assert len(shown) == 10 and {3, 17} <= set(shown.tolist())
    assert set(sizes[shown]) >= set(np.sort(sizes)[-10:])  # the largest classes
    assert ax.get_title() == "glyphs\n10 of 30 classes coloured, the rest grey"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["other 20 classes"] + [f"{names[c]} ({sizes[c]})" for c in shown]
    pixels = _pixels(path)
    palette = [tuple(round(255 * v) for v in rgb) for rgb in matplotlib.colormaps["tab10"].colors]
    grey = tuple(round(255 * v) for v in MAP_OTHERS_COLOUR)
    for c in range(30):
        column, row = _to_pixel(ax, *spots[c])
        drawn = tuple(pixels[row, column])
        want = palette[list(shown).index(c)] if c in shown else grey
        assert drawn == want, (c, drawn, want)
    assert len(set(palette)) == 10


def test_map_of_few_classes_colours_all(tmp_path, monkeypatch):
    figures = _capture(monkeypatch)
    labels = np.repeat(np.arange(4), 3)
    plot_embedding_map(np.random.default_rng(0).normal(size=(12, 2)), labels,
                       str(tmp_path / "m.png"))
    assert figures[0].axes[0].get_title().endswith("\nall 4 classes coloured")
