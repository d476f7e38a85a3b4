"""The retrieval grid: which queries it shows, how results are marked, the PNG's size."""

import numpy as np
import pytest

from kdml.evaluation.plots import (MATCH_COLOUR, MISMATCH_COLOUR, _BORDER, _HEADER, _LABEL_WIDTH,
                                   _PAD, first_positive_rank, grid_size, retrieval_grid,
                                   select_grid_rows)


def test_first_positive_rank_by_hand():
    query_labels = np.array([0, 1, 2, 3])
    neighbour_labels = np.array([[0, 5, 0], [5, 5, 1], [5, 5, 5], [5, 3, 3]])
    assert first_positive_rank(query_labels, neighbour_labels).tolist() == [1, 3, 4, 2]


def test_worst_rows_are_the_latest_first_positives_and_the_sample_is_seeded():
    query_labels = np.arange(10)
    # query q's first match at rank r[q] (r = 4: none of the 3 results)
    ranks = np.array([1, 4, 2, 3, 1, 4, 2, 1, 3, 1])
    neighbour_labels = np.full((10, 3), -1)
    for q, r in enumerate(ranks):
        if r <= 3:
            neighbour_labels[q, r - 1] = q
    sampled, worst = select_grid_rows(query_labels, neighbour_labels, num_sampled=3,
                                      num_worst=4, seed=7)
    assert worst.tolist() == [1, 5, 3, 8]  # no match (1, 5), then rank 3, ties by index
    rest = np.setdiff1d(np.arange(10), worst)
    want = np.sort(np.random.default_rng(7).choice(rest, size=3, replace=False))
    assert sampled.tolist() == want.tolist() and not set(sampled) & set(worst)
    again, _ = select_grid_rows(query_labels, neighbour_labels, num_sampled=3, num_worst=4, seed=7)
    assert again.tolist() == sampled.tolist()


def test_grid_png_size_and_frame_colours(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(12, 20, 24, 3), dtype=np.uint8)
    query_labels = np.array([0, 1, 2, 0])
    gallery_labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    neighbours = np.array([[0, 2, 4], [7, 3, 0], [0, 1, 5], [2, 3, 4]])  # q3: no match
    path = str(tmp_path / "grid.png")
    thumb = 32
    info = retrieval_grid(query_labels, neighbours, gallery_labels,
                          lambda rows: list(images[rows]), lambda rows: list(images[rows]),
                          path, num_sampled=2, num_worst=2, seed=0, thumb=thumb)
    assert info["worst"] == [3, 2] and info["worst_ranks"] == [4, 3]
    assert info["sampled"] == [0, 1]
    with Image.open(path) as png:
        assert png.size == grid_size(4, 3, thumb)
        pixels = np.asarray(png.convert("RGB"))
    cell = thumb + 2 * (_BORDER + _PAD)
    shown = info["sampled"] + info["worst"]
    for row, q in enumerate(shown):
        for j in range(3):
            top = _HEADER + row * cell + _PAD
            left = _LABEL_WIDTH + (j + 1) * cell + cell // 2 + _PAD
            colour = pixels[top + 1, left + 1]  # inside the frame, outside the thumbnail
            same = gallery_labels[neighbours[q, j]] == query_labels[q]
            assert tuple(colour) == (MATCH_COLOUR if same else MISMATCH_COLOUR), (row, j)
            inside = pixels[top + _BORDER + thumb // 2, left + _BORDER + thumb // 2]
            thumb_image = images[neighbours[q, j]]
            # nearest-neighbour thumbnail of the centred square of the 20 x 24 image
            pick = np.arange(thumb) * 20 // thumb
            assert tuple(inside) == tuple(thumb_image[pick[thumb // 2], 2 + pick[thumb // 2]])


def test_grid_rejects_mismatched_rows(tmp_path):
    from kdml.evaluation.plots import plot_retrieval_grid

    with pytest.raises(ValueError, match="Expected 2 query images"):
        plot_retrieval_grid([np.zeros((4, 4, 3))], [[np.zeros((4, 4, 3))]] * 2,
                            np.ones((2, 1), bool), str(tmp_path / "x.png"))


def _colour_word(rgb) -> str:
    """The everyday name of an RGB colour, from its hue (HSV): red below 15 degrees (or
    from 345), orange 15-45, yellow 45-75, green 75-175, blue 175-260, purple beyond."""
    import colorsys

    hue = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360
    for word, upper in (("red", 15), ("orange", 45), ("yellow", 75), ("green", 175),
                        ("blue", 260), ("purple", 345), ("red", 361)):
        if hue < upper:
            return word


def test_legend_names_the_colours_the_frames_are_drawn_in(tmp_path, monkeypatch):
    """The header's words ("green: same class, orange: other") against the frames' pixels."""
    import re

    import matplotlib.figure
    from PIL import Image

    from kdml.evaluation.plots import plot_retrieval_grid

    texts = []
    save = matplotlib.figure.Figure.savefig

    def savefig(figure, *args, **kwargs):
        texts.extend(t.get_text() for ax in figure.axes for t in ax.texts)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    thumb, images = 16, np.full((2, 8, 8, 3), 128, np.uint8)
    path = plot_retrieval_grid([images[0]], [[images[0], images[1]]], np.array([[True, False]]),
                               str(tmp_path / "grid.png"), thumb=thumb)
    (legend,) = [t for t in texts if "same class" in t]
    words = dict(reversed(pair) for pair in re.findall(r"(\w+): (same class|other)", legend))
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    cell = thumb + 2 * (_BORDER + _PAD)
    drawn = {}
    for j, meaning in ((0, "same class"), (1, "other")):
        left = _LABEL_WIDTH + (j + 1) * cell + cell // 2 + _PAD
        drawn[meaning] = _colour_word(pixels[_HEADER + _PAD + 1, left + 1])
    assert words == drawn == {"same class": "green", "other": "orange"}, (legend, drawn)
    assert _colour_word((255, 0, 0)) == "red" and _colour_word((255, 165, 0)) == "orange"


def capture_grid_texts(monkeypatch) -> list:
    """Patches Figure.savefig to record every text of a saved figure: a list of
    `(text, (x, y) in canvas pixels, RGB colour 0-255)`, filled as figures are saved."""
    import matplotlib.colors
    import matplotlib.figure

    texts = []
    save = matplotlib.figure.Figure.savefig

    def savefig(figure, *args, **kwargs):
        texts.extend((t.get_text(), t.get_position(),
                      tuple(round(255 * c) for c in matplotlib.colors.to_rgb(t.get_color())))
                     for ax in figure.axes for t in ax.texts)
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return texts


def test_no_match_caption_shows_digits_until_the_numbers_differ():
    from kdml.evaluation.plots import no_match_caption

    assert no_match_caption(0.41, 0.52) == "no match (best 0.41 < threshold 0.52)"
    assert no_match_caption(0.5199, 0.52) == "no match (best 0.5199 < threshold 0.5200)"
    assert no_match_caption(-0.1234567, 0.9) == "no match (best -0.12 < threshold 0.90)"


def test_no_match_rows_are_captioned_and_faded(tmp_path, monkeypatch):
    """Queries whose best similarity is below the threshold: a blue caption across their
    results, the results faded toward white, frames unchanged; other rows untouched."""
    import colorsys

    from PIL import Image

    from kdml.evaluation.plots import (NO_MATCH_COLOUR, NO_MATCH_FADE, NO_MATCH_LEGEND,
                                       _thumbnail)

    texts = capture_grid_texts(monkeypatch)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, size=(12, 20, 20, 1), dtype=np.uint8)
    images = np.repeat(grey, 3, axis=3)  # grey thumbnails: any blue pixel is the caption's
    query_labels = np.array([0, 1, 2, 0])
    gallery_labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    neighbours = np.array([[0, 2, 4], [7, 3, 0], [0, 1, 5], [2, 3, 4]])
    best = np.array([0.9, 0.41, 0.7, 0.5199], np.float32)
    thumb, path = 32, str(tmp_path / "grid.png")
    info = retrieval_grid(query_labels, neighbours, gallery_labels,
                          lambda rows: list(images[rows]), lambda rows: list(images[rows]),
                          path, num_sampled=4, num_worst=0, seed=0, thumb=thumb,
                          best_similarities=best, threshold=0.52)
    assert info["sampled"] == [0, 1, 2, 3] and info["no_match"] == [1, 3]
    cell = thumb + 2 * (_BORDER + _PAD)
    captions = {t: (pos, colour) for t, pos, colour in texts if t.startswith("no match (")}
    want = {1: "no match (best 0.41 < threshold 0.52)",
            3: "no match (best 0.5199 < threshold 0.5200)"}
    assert set(captions) == set(want.values())
    for row, caption in want.items():
        (x, y), colour = captions[caption]
        assert colour == NO_MATCH_COLOUR
        assert _HEADER + row * cell < y < _HEADER + (row + 1) * cell  # on its row
        assert x > _LABEL_WIDTH + 1.5 * cell  # over the results, not the query
    (legend,) = [t for t, _, _ in texts if t.startswith("top 3 (")]
    assert legend.endswith(f"; {NO_MATCH_LEGEND})")
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    for row in range(4):
        top = _HEADER + row * cell + _PAD
        band = pixels[top:top + cell - 2 * _PAD, _LABEL_WIDTH + cell:]
        hsv = np.array([colorsys.rgb_to_hsv(*(p / 255)) for p in band.reshape(-1, 3)])
        blue = ((hsv[:, 0] * 360 > 175) & (hsv[:, 0] * 360 < 260) & (hsv[:, 1] > 0.3)).sum()
        assert (blue > 20) == (row in want), (row, blue)  # the caption's text is drawn
        for j in range(3):
            left = _LABEL_WIDTH + (j + 1) * cell + cell // 2 + _PAD
            same = gallery_labels[neighbours[row, j]] == query_labels[row]
            assert tuple(pixels[top + 1, left + 1]) == (MATCH_COLOUR if same else MISMATCH_COLOUR)
            # the thumbnail's first two lines (above the caption's box)
            drawn = pixels[top + _BORDER:top + _BORDER + 2, left + _BORDER:left + _BORDER + thumb]
            plain = _thumbnail(images[neighbours[row, j]], thumb)[:2].astype(int)
            expected = np.round(255 - NO_MATCH_FADE * (255 - plain)) if row in want else plain
            np.testing.assert_array_equal(drawn, expected)


def test_no_match_needs_both_similarities_and_threshold(tmp_path):
    with pytest.raises(ValueError, match="best_similarities and threshold together"):
        retrieval_grid(np.zeros(1), np.zeros((1, 1), int), np.zeros(1), list, list,
                       str(tmp_path / "x.png"), threshold=0.5)
