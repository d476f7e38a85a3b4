"""Tests for the procedural glyph dataset (`kdml.data.sources.synthetic`)."""

import time

import numpy as np
import pytest

from kdml.data.image_set import ImageSet
from kdml.data.sources import synthetic

# Small configurations keep the file fast; the default 200 x 20 set is generated once
# (it is cached) for the difficulty test.
_SMALL = dict(num_classes=6, images_per_class=5, image_size=32)
_NO_JITTER = dict(
    rotation_degrees=0.0,
    scale_range=(1.0, 1.0),
    shear=0.0,
    translation=0.0,
    point_jitter=0.0,
    stroke_width_range=(0.06, 0.06),
    ink_range=(1.0, 1.0),
    noise_std=0.0,
)


def _fresh(**kwargs):
    """`glyphs(**kwargs)` computed anew, not served from the in-memory cache."""
    synthetic._cached_glyphs.cache_clear()
    return synthetic.glyphs(**kwargs)


def _ink(pixels):
    """(N, S, S, 3) uint8 -> (N, S * S) float64 ink amount (0 on white paper)."""
    return 255.0 - pixels[..., 0].reshape(len(pixels), -1).astype(np.float64)


def _cosine_matrix(features):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    return unit @ unit.T


def test_layout_shapes_dtype_and_names():
    image_set = synthetic.glyphs(num_classes=4, images_per_class=3, image_size=24, seed=1)
    assert isinstance(image_set, ImageSet)
    assert image_set.name == "synthetic"
    assert image_set.paths is None
    assert image_set.pixels.shape == (12, 24, 24, 3)
    assert image_set.pixels.dtype == np.uint8
    assert image_set.labels.dtype == np.int64
    np.testing.assert_array_equal(image_set.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert image_set.class_names == ("glyph_000", "glyph_001", "glyph_002", "glyph_003")
    # Grayscale ink stored as RGB: the three channels agree.
    np.testing.assert_array_equal(image_set.pixels[..., 0], image_set.pixels[..., 2])


def test_deterministic_from_seed_and_seed_matters():
    first = _fresh(seed=7, **_SMALL)
    second = _fresh(seed=7, **_SMALL)
    assert first is not second
    assert first.pixels.tobytes() == second.pixels.tobytes()
    other = synthetic.glyphs(seed=8, **_SMALL)
    # Every image changes with the seed, not just a few pixels.
    changed = (other.pixels != first.pixels).reshape(len(first.pixels), -1).mean(axis=1)
    assert changed.min() > 0.2


def test_class_and_image_streams_do_not_depend_on_dataset_size():
    small = synthetic.glyphs(num_classes=10, images_per_class=2, seed=0)
    large = synthetic.glyphs(num_classes=200, images_per_class=2, seed=0)
    np.testing.assert_array_equal(large.pixels[:20], small.pixels)
    # Image i of class c is the same whatever images_per_class is.
    longer = synthetic.glyphs(num_classes=10, images_per_class=3, seed=0)
    np.testing.assert_array_equal(longer.pixels.reshape(10, 3, 32, 32, 3)[:, :2],
                                  small.pixels.reshape(10, 2, 32, 32, 3))


def test_cached_and_read_only():
    first = synthetic.glyphs(**_SMALL)
    assert synthetic.glyphs(**_SMALL) is first
    # Lists and tuples of the same jitter share one cache entry.
    assert synthetic.glyphs(scale_range=[0.7, 1.2], **_SMALL) is first
    with pytest.raises(ValueError, match="read-only"):
        first.pixels[0, 0, 0, 0] = 0
    with pytest.raises(ValueError, match="read-only"):
        first.labels[0] = 1


def test_value_range_white_paper_dark_ink_inside_central_crop():
    image_set = synthetic.glyphs(num_classes=20, images_per_class=6, image_size=32, seed=2)
    gray = image_set.pixels[..., 0].astype(np.float64)
    # Paper is near white, strokes are dark.
    assert np.median(gray, axis=(1, 2)).min() >= 220
    assert gray.min(axis=(1, 2)).max() <= 80
    # Every image has ink (clearly dark pixels) inside the central 87% crop.
    lo, hi = 2, 30  # the 87% centre crop of 32 px keeps rows/cols 2..29
    inside = (gray[:, lo:hi, lo:hi] < 128).sum(axis=(1, 2))
    assert inside.min() >= 10
    # And none outside it: the 2-px border holds noise only, never a stroke.
    border = np.ones((32, 32), bool)
    border[lo:hi, lo:hi] = False
    assert (gray[:, border] < 100).sum(axis=1).max() == 0


def test_strokes_never_reach_the_border_without_noise():
    image_set = synthetic.glyphs(
        num_classes=30, images_per_class=4, image_size=32, seed=3,
        **{**_NO_JITTER, "rotation_degrees": 45.0, "scale_range": (1.3, 1.3),
           "translation": 0.4, "stroke_width_range": (0.085, 0.085)},
    )
    gray = image_set.pixels[..., 0]
    # Ink ends 0.85 half-widths from the centre, 2.4 px from the edge: the outer two
    # pixels stay paper-white, the third at most faintly touched.
    ring = np.ones((32, 32), bool)
    ring[2:30, 2:30] = False
    assert (gray[:, ring] == 255).all()
    third = np.ones((32, 32), bool)
    third[3:29, 3:29] = False
    assert gray[:, third].min() >= 200
    # The test is not vacuous: these glyphs are large and do reach near the crop edge.
    assert (gray[:, 3:29, 3:29] < 128).any(axis=1).any(axis=1).all()
    assert (gray[:, [3, 28], :] < 128).any() and (gray[:, :, [3, 28]] < 128).any()


def test_without_jitter_all_images_of_a_class_are_identical():
    still = synthetic.glyphs(**_SMALL, **_NO_JITTER).pixels.reshape(6, 5, -1)
    assert (still == still[:, :1]).all()
    # Different classes are different drawings.
    assert all((still[0, 0] != still[c, 0]).any() for c in range(1, 6))
    jittered = synthetic.glyphs(**_SMALL).pixels.reshape(6, 5, -1)
    assert not (jittered == jittered[:, :1]).all(axis=-1)[:, 1:].any()


def test_stroke_coverage_matches_pen_width():
    """A straight horizontal stroke of width w puts w pixels of ink in each column."""
    template = np.zeros((1, 4, 5, 2))
    template[0, 0, :4] = [[-0.5, 0.05], [-0.2, 0.05], [0.2, 0.05], [0.5, 0.05]]
    template[0, 0, 4] = 1.0
    for width_fraction in (0.05, 0.08):
        gray = synthetic._render_batch(
            template, [(0, 0, 0)], 32, **{**_NO_JITTER,
                                          "stroke_width_range": (width_fraction,) * 2},
        )
        ink_per_column = (255.0 - gray[0]).sum(axis=0) / 255.0
        # Columns well inside the stroke (x in [-0.4, 0.4] -> pixels 10..21).
        np.testing.assert_allclose(ink_per_column[10:22], width_fraction * 32, atol=0.05)
        assert ink_per_column[:6].sum() == 0 and ink_per_column[27:].sum() == 0


def test_within_class_more_similar_than_between_classes():
    image_set = synthetic.glyphs(num_classes=30, images_per_class=8, seed=4)
    labels = image_set.labels
    cosine = _cosine_matrix(_ink(image_set.pixels))
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(cosine), dtype=bool)
    # Pixel space is deliberately a weak metric (~0.35 within vs ~0.30 between), but
    # the class signal is there, overall and for nearly every class.
    within, between = cosine[same & off_diagonal].mean(), cosine[~same].mean()
    assert within > between + 0.03, (within, between)
    per_class_within = np.array(
        [cosine[np.ix_(labels == c, labels == c)][off_diagonal[:8, :8]].mean() for c in range(30)]
    )
    per_class_between = np.array([cosine[np.ix_(labels == c, labels != c)].mean() for c in range(30)])
    assert np.mean(per_class_within > per_class_between) >= 0.85


def test_default_set_is_hard_for_raw_pixel_nearest_neighbour():
    """Zero-shot classes 100-199: raw-pixel cosine Recall@1 is low but above chance."""
    image_set = synthetic.glyphs()
    assert image_set.pixels.shape == (4000, 32, 32, 3)
    test = image_set.select_classes(range(100, 200))
    cosine = _cosine_matrix(test.pixels.reshape(len(test.pixels), -1).astype(np.float64))
    np.fill_diagonal(cosine, -np.inf)  # leave one out
    recall_at_1 = np.mean(test.labels[cosine.argmax(axis=1)] == test.labels)
    assert 0.10 <= recall_at_1 <= 0.40, recall_at_1


def test_generation_is_fast():
    synthetic._cached_glyphs.cache_clear()
    start = time.perf_counter()
    synthetic.glyphs(num_classes=20, images_per_class=10, image_size=32, seed=5)
    elapsed = time.perf_counter() - start
    # ~0.06 s on 2 shared cores; the full 200 x 20 set takes ~1 s.
    assert elapsed < 1.5, elapsed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=1), "`num_classes` must be >= 2. Received: num_classes=1"),
        (dict(images_per_class=1), "`images_per_class` must be >= 2. Received: images_per_class=1"),
        (dict(image_size=15), "`image_size` must be >= 16. Received: image_size=15"),
        (dict(num_classes=2.5), "`num_classes` must be an integer. Received: num_classes=2.5"),
        (dict(image_size=True), "`image_size` must be an integer"),
        (dict(seed=-1), "`seed` must be >= 0"),
        (dict(rotation_degrees=-5), "`rotation_degrees` must be >= 0.0. Received: rotation_degrees=-5"),
        (dict(noise_std=float("nan")), "`noise_std` must be >= 0.0"),
        (dict(scale_range=(1.2, 0.7)), r"`scale_range` must satisfy low <= high"),
        (dict(stroke_width_range=0.05), r"`stroke_width_range` must be a \(low, high\) pair"),
        (dict(ink_range=(0.5, 1.5)), r"`ink_range` must satisfy"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthetic.glyphs(**kwargs)
