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
                          path, num_sampled=1, num_worst=2, seed=0, thumb=thumb)
    assert info["worst"] == [3, 2] and info["worst_ranks"] == [4, 3]
    want = np.random.default_rng(0).choice([0, 1], size=1, replace=False).tolist()
    assert info["sampled"] == want
    with Image.open(path) as png:
        assert png.size == grid_size(3, 3, thumb)
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
    # the int8 duplicate of issue 33: rounding to 2 or 3 digits would print 1.00 / 1.000
    assert no_match_caption(0.9987, 0.9996) == "no match (best 0.9987 < threshold 0.9996)"
    # a threshold below 1 never reads as 1
    assert no_match_caption(0.998, 0.99999) == "no match (best 0.99800 < threshold 0.99999)"
    assert no_match_caption(0.99, 1.0) == "no match (best 0.99 < threshold 1.00)"
    assert no_match_caption(float(np.float32(0.99987)), 0.99996) == \
        "no match (best 0.99987 < threshold 0.99996)"
    # every caption: the printed numbers differ and keep their order, whatever the gap
    rng = np.random.default_rng(0)
    for _ in range(500):
        threshold = float(rng.uniform(-1, 1))
        best = float(np.float32(threshold - 10.0 ** rng.uniform(-7, 0)))
        if best >= threshold:  # float32 rounding reached the threshold
            continue
        text = no_match_caption(best, threshold)
        shown_best, shown_threshold = (float(w.rstrip(")")) for w in text.split()[3::3])
        assert shown_best < shown_threshold, text
        assert shown_threshold != 1.0 and shown_best != -1.0, text


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


def _text_boxes(monkeypatch) -> list:
    """Patches Figure.savefig to record `(text, (x0, x1) in canvas pixels)` of every text
    of a saved grid, as drawn (its window extent)."""
    import matplotlib.figure

    boxes = []
    save = matplotlib.figure.Figure.savefig

    def savefig(figure, *args, **kwargs):
        renderer = figure.canvas.get_renderer()
        for ax in figure.axes:
            for t in ax.texts:
                box = t.get_window_extent(renderer=renderer)
                boxes.append((t.get_text(), (box.x0, box.x1)))
        return save(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return boxes


def _grid_data(num_queries=12, num_classes=4, seed=0, dim=8):
    """Unit embeddings of a gallery (3 per class) and queries (labels q % num_classes),
    their exact cosine top-k (k = 3), and 8 x 8 images."""
    rng = np.random.default_rng(seed)
    gallery_labels = np.repeat(np.arange(num_classes), 3)
    query_labels = np.arange(num_queries) % num_classes
    g = rng.normal(size=(len(gallery_labels), dim)).astype(np.float32)
    q = rng.normal(size=(num_queries, dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ g.T
    neighbours = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    images = rng.integers(0, 255, size=(len(g) + num_queries, 8, 8, 3), dtype=np.uint8)
    return dict(q=q, g=g, query_labels=query_labels, gallery_labels=gallery_labels,
                scores=scores, neighbours=neighbours,
                similarities=np.take_along_axis(scores, neighbours, 1),
                load_query=lambda rows: list(images[len(g) + np.asarray(rows)]),
                load_gallery=lambda rows: list(images[np.asarray(rows)]))


def test_worst_rows_rank_ties_by_the_margin_never_by_index(tmp_path, monkeypatch):
    """Of the queries with no same-class result in k, the worst are those whose own class
    loses by most: best other cosine - best same-class cosine, over the whole gallery."""
    from kdml.evaluation.plots import best_same_class_similarity

    texts = capture_grid_texts(monkeypatch)
    d = _grid_data(num_queries=40)
    best_same = best_same_class_similarity(d["q"], d["query_labels"], d["g"],
                                           d["gallery_labels"])
    info = retrieval_grid(d["query_labels"], d["neighbours"], d["gallery_labels"],
                          d["load_query"], d["load_gallery"], str(tmp_path / "g.png"),
                          num_sampled=2, num_worst=5, seed=0, thumb=16,
                          similarities=d["similarities"], best_same=best_same,
                          class_names=[f"class {c}" for c in range(4)])
    # NumPy reference over all pairs
    same = d["query_labels"][:, None] == d["gallery_labels"][None, :]
    margin = np.where(~same, d["scores"], -np.inf).max(1) - np.where(same, d["scores"],
                                                                     -np.inf).max(1)
    np.testing.assert_allclose(best_same, np.where(same, d["scores"], -np.inf).max(1),
                               rtol=1e-6)
    ranks = first_positive_rank(d["query_labels"], d["gallery_labels"][d["neighbours"]])
    want = sorted(range(40), key=lambda q: (-ranks[q], -margin[q], q))[:5]
    assert info["worst"] == want
    tied = [q for q in range(40) if ranks[q] == ranks[want[0]]]
    assert len(tied) > 5 and want != sorted(tied)[:5]  # the index would have picked others
    # every row names its query, its class and how it fared
    rows = [t for t, _, _ in texts if t.startswith("q") and "\n" in t]
    shown = info["sampled"] + info["worst"]
    assert len(rows) == len(shown)
    for text, q in zip(rows, shown):
        head, label, outcome = text.split("\n")
        assert head == f"q{q}" + (", worst" if q in info["worst"] else ", sample")
        assert label == f"class {d['query_labels'][q]}"
        assert outcome == (f"1st same class: {ranks[q]}" if ranks[q] <= 3
                           else "no same class in 3")


def test_a_grid_of_few_queries_shows_each_for_what_it_is(tmp_path, monkeypatch):
    """3 queries, 6 + 6 rows asked: all three shown in order, none called "worst"; a
    query whose class the gallery lacks says so and is never ranked worst."""
    from kdml.evaluation.plots import best_same_class_similarity

    texts = capture_grid_texts(monkeypatch)
    d = _grid_data(num_queries=3)
    labels = np.array([0, 1, 7])  # class 7: not in the gallery
    best_same = best_same_class_similarity(d["q"], labels, d["g"], d["gallery_labels"])
    assert np.isnan(best_same[2]) and not np.isnan(best_same[:2]).any()
    info = retrieval_grid(labels, d["neighbours"], d["gallery_labels"], d["load_query"],
                          d["load_gallery"], str(tmp_path / "g.png"), thumb=16,
                          similarities=d["similarities"], best_same=best_same,
                          class_names={0: "Latin/a", 1: "Latin/b", 7: "Greek/x"})
    assert info["sampled"] == [0, 1, 2] and info["worst"] == []
    rows = [t for t, _, _ in texts if t.startswith("q") and "\n" in t]
    assert [r.split("\n")[:2] for r in rows] == [["q0", "Latin/a"], ["q1", "Latin/b"],
                                                 ["q2", "Greek/x"]]
    assert not any("worst" in r or "sample" in r for r in rows)
    assert rows[2].endswith("class not in gallery")
    # many queries, all but one lone: the lone ones are never "worst"
    d = _grid_data(num_queries=20)
    labels = np.full(20, 9)
    labels[5] = 1
    best_same = best_same_class_similarity(d["q"], labels, d["g"], d["gallery_labels"])
    info = retrieval_grid(labels, d["neighbours"], d["gallery_labels"], d["load_query"],
                          d["load_gallery"], str(tmp_path / "g2.png"), num_sampled=2,
                          num_worst=3, thumb=16, similarities=d["similarities"],
                          best_same=best_same)
    assert info["worst"] == [5]


@pytest.mark.parametrize("k", [1, 2])
def test_captions_and_legend_fit_the_canvas_at_small_k(tmp_path, monkeypatch, k):
    """At k = 1 or 2 the "no match" caption is wider than the results: the grid widens, so
    it stays right of the query column and inside the picture; so does the header."""
    from PIL import Image

    from kdml.evaluation.plots import plot_retrieval_grid

    boxes = _text_boxes(monkeypatch)
    images = np.full((3, 8, 8, 3), 200, np.uint8)
    caption = no_match = "no match (best 0.998712 < threshold 0.999634)"
    path = plot_retrieval_grid([images[0], images[1]], [[images[2]] * k] * 2,
                               np.zeros((2, k), bool), str(tmp_path / "g.png"),
                               row_labels=["q0\nLatin/character01\nno same class in 1",
                                           "q1\n" + "x" * 60 + "\n1st same class: 1"],
                               no_match=[caption, None], title="a very long model name " * 3)
    cell = 64 + 2 * (_BORDER + _PAD)
    with Image.open(path) as png:
        width = png.size[0]
        assert png.size == grid_size(2, k, 64, [no_match, None])
    texts = dict(boxes)
    x0, x1 = texts[caption]
    assert _LABEL_WIDTH + cell < x0 and x1 <= width  # over the results, inside the image
    (legend,) = [t for t in texts if t.startswith(f"top {k} (")]
    assert texts[legend][1] <= width
    for text, (x0, x1) in boxes:  # row labels and the title stay in the label column
        if text.startswith(("q0", "q1", "...", "a very")):
            assert x1 <= _LABEL_WIDTH, text
    assert any(t.startswith("q1\n...") for t in texts)  # the long class cut from the left
