"""Procedurally drawn glyphs: kdml's embedded, offline default dataset.

`glyphs()` draws Omniglot-like characters in pure NumPy: every class is a small set of
smooth pen strokes (cubic Bezier curves), and every image of a class is that drawing
redrawn by a slightly different "hand": an affine jitter (rotation, scale, shear,
translation), perturbed control points, its own pen width and pixel noise. Black ink on
white, RGB uint8, like Omniglot.

Determinism is by random stream, not by call order:

- class `c` is drawn from `np.random.default_rng([seed, c])`, so class `c` is the same
  whatever `num_classes` is;
- image `i` of class `c` is jittered from `np.random.default_rng([seed, c, i])`, so it
  is the same whatever `num_classes` and `images_per_class` are.

Rendering is vectorised over batches of images. A stroke is sampled densely along its
curve and each sample, weighted by the arc length it stands for, splats an isotropic
Gaussian; a Gaussian factorises as `g(x) g(y)`, so the splat sum of a whole image is one
matrix product `Gy^T diag(w) Gx` of (H, P) x (P, W). Along a stroke the sum is the line
integral `sigma sqrt(2 pi) exp(-d^2 / (2 sigma^2))` of the distance `d` from the curve,
which we invert into a distance estimate and turn into anti-aliased ink coverage
`clip(width / 2 + 0.5 - d, 0, 1)` (a one-pixel ramp at the stroke's edge).

Example:

    from kdml.data.sources import synthetic
    image_set = synthetic.glyphs()          # 200 classes x 20 images, 32 x 32 RGB
    image_set.pixels.shape                  # (4000, 32, 32, 3), uint8, read-only
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import numpy as np

from kdml.data.image_set import ImageSet

__all__ = ["glyphs", "DATASET_NAME"]

DATASET_NAME = "synthetic"

# Class templates: strokes, control points and where the glyph may lie, in normalised
# image coordinates ([-1, 1] across the image, y pointing down).
_MAX_STROKES = 4
_CONTROL_POINTS = 4  # a cubic Bezier curve per stroke
_GLYPH_RADIUS = 0.6  # template curves span [-r, r] on their longer axis
_CONNECT_PROBABILITY = 0.7  # a stroke starts on an earlier stroke (connected glyphs)
# After jitter an image's curves are shrunk and shifted, if needed, into [-r, r]^2 with
# r = _INK_RADIUS - (pen reach), so that all ink stays inside the central 87% crop.
_INK_RADIUS = 0.85
_IMAGES_PER_BATCH = 256  # bounds memory: ~(batch x strokes x samples x size) floats
_MIN_SIZE = 16
_STROKE_TRIES = 10  # redraws of a stroke that retraces earlier strokes
_MIN_STROKE_GAP = 0.15  # template units; closer samples count as retracing

_BERNSTEIN_CACHE: dict = {}


def glyphs(
    num_classes: int = 200,
    images_per_class: int = 20,
    image_size: int = 32,
    seed: int = 0,
    *,
    rotation_degrees: float = 35.0,
    scale_range: Tuple[float, float] = (0.7, 1.2),
    shear: float = 0.3,
    translation: float = 0.25,
    point_jitter: float = 0.045,
    stroke_width_range: Tuple[float, float] = (0.04, 0.085),
    ink_range: Tuple[float, float] = (0.75, 1.0),
    noise_std: float = 0.10,
) -> ImageSet:
    """Omniglot-like procedural glyphs, `images_per_class` hand-jittered copies per class.

    Each class is 2-4 smooth strokes (cubic Bezier curves with random control points;
    70% of the later strokes start on an earlier stroke). Each image redraws its class
    with its own affine jitter, control-point perturbation, pen width, ink darkness and
    pixel noise. Results are cached in memory per argument tuple, so repeated calls are
    free; the returned arrays are read-only (copy them to modify).

    The default jitter is tuned so that raw pixels are a weak metric while the classes
    stay clearly distinct to the eye (`tools/show_glyphs.py` draws a contact sheet): on
    classes 100-199, leave-one-out cosine Recall@1 is 0.22 on raw pixels and 0.15 for
    a randomly initialised 4 x conv3x3-64 net, which 15 epochs of cosine-softmax
    training on classes 0-99 (about 2.5 CPU minutes) raise to 0.45.

    Args:
        num_classes: number of classes C, >= 2. Class `c` does not depend on C.
        images_per_class: images per class K, >= 2.
        image_size: height and width S in pixels, >= 16.
        seed: dataset seed; same seed and arguments give identical bytes.
        rotation_degrees: rotation drawn uniformly in [-r, r] degrees.
        scale_range: isotropic scale drawn log-uniformly in this range.
        shear: horizontal shear factor drawn uniformly in [-shear, shear].
        translation: shift drawn uniformly in [-t, t] per axis, as a fraction of the
            half image width.
        point_jitter: standard deviation of the per-control-point perturbation, as a
            fraction of the half image width (a per-stroke shift of half that is added).
        stroke_width_range: pen width drawn uniformly in this range, as a fraction of
            the image size (0.04-0.085 is 1.3-2.7 px at 32 px).
        ink_range: ink darkness drawn uniformly in this range (1 = black).
        noise_std: standard deviation of the additive Gaussian pixel noise, as a
            fraction of 255.

    Returns:
        An `ImageSet` named "synthetic" with `pixels` (C * K, S, S, 3) uint8 RGB (black
        strokes on white), class-major `labels` (K zeros, then K ones, ...) and
        `class_names` "glyph_000", "glyph_001", ...

    Raises:
        ValueError: if an argument is out of range.
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    images_per_class = _check_int("images_per_class", images_per_class, 2)
    image_size = _check_int("image_size", image_size, _MIN_SIZE)
    seed = _check_int("seed", seed, 0)
    scale_range = _check_range("scale_range", scale_range, low=0.0, low_open=True)
    stroke_width_range = _check_range(
        "stroke_width_range", stroke_width_range, low=0.0, low_open=True
    )
    ink_range = _check_range("ink_range", ink_range, low=0.0, high=1.0, low_open=True)
    jitter = dict(
        rotation_degrees=_check_float("rotation_degrees", rotation_degrees, 0.0),
        scale_range=scale_range,
        shear=_check_float("shear", shear, 0.0),
        translation=_check_float("translation", translation, 0.0),
        point_jitter=_check_float("point_jitter", point_jitter, 0.0),
        stroke_width_range=stroke_width_range,
        ink_range=ink_range,
        noise_std=_check_float("noise_std", noise_std, 0.0),
    )
    return _cached_glyphs(
        num_classes, images_per_class, image_size, seed, tuple(sorted(jitter.items()))
    )


@functools.lru_cache(maxsize=8)
def _cached_glyphs(num_classes, images_per_class, image_size, seed, jitter_items):
    jitter = dict(jitter_items)
    templates = np.stack([_class_template(seed, c) for c in range(num_classes)])
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
    image_ids = np.tile(np.arange(images_per_class), num_classes)
    pixels = np.empty((len(labels), image_size, image_size, 3), dtype=np.uint8)
    # Batch images of glyphs with equally many strokes together, so that a batch
    # renders only the strokes its glyphs use (the result does not depend on this).
    num_strokes = templates[:, :, _CONTROL_POINTS, 0].sum(axis=1)
    order = np.argsort(num_strokes[labels], kind="stable")
    for start in range(0, len(order), _IMAGES_PER_BATCH):
        batch = order[start : start + _IMAGES_PER_BATCH]
        gray = _render_batch(
            templates[labels[batch]],
            [(seed, int(labels[k]), int(image_ids[k])) for k in batch],
            image_size,
            **jitter,
        )
        pixels[batch] = gray[..., None]
    labels.setflags(write=False)
    pixels.setflags(write=False)
    return ImageSet(
        labels=labels,
        class_names=tuple(f"glyph_{c:03d}" for c in range(num_classes)),
        pixels=pixels,
        name=DATASET_NAME,
    )


def _class_template(seed: int, class_id: int) -> np.ndarray:
    """(MAX_STROKES, CONTROL_POINTS + 1, 2) float64: Bezier control points per stroke.

    A stroke runs from a start point to an end point 0.6-1.2 away (before scaling);
    its two inner control points sit on the chord at 1/3 and 2/3 and bow out sideways,
    so strokes are pen-like lines, arcs and S-curves rather than knots. A stroke that
    mostly retraces earlier strokes is redrawn (up to 10 tries). The glyph is
    then centred and scaled so that its drawn curves span [-0.6, 0.6] on the longer axis.
    The extra last row holds the stroke's mask (1 drawn, 0 unused) in both columns.
    """
    rng = np.random.default_rng([seed, class_id])
    num_strokes = int(rng.integers(2, _MAX_STROKES + 1))
    strokes = np.zeros((_MAX_STROKES, _CONTROL_POINTS + 1, 2))
    basis = _bernstein_samples(24)
    drawn = np.empty((0, 2))  # samples along the accepted strokes
    for s in range(num_strokes):
        for _ in range(_STROKE_TRIES):
            stroke = _random_stroke(rng, strokes[:s, :_CONTROL_POINTS])
            samples = basis @ stroke
            if not s:
                break
            # Reject strokes that mostly retrace earlier ones: they draw blobs.
            gap2 = ((samples[:, None] - drawn[None]) ** 2).sum(-1).min(1)
            if np.mean(gap2 < _MIN_STROKE_GAP**2) < 0.3:
                break
        strokes[s, :_CONTROL_POINTS] = stroke
        strokes[s, _CONTROL_POINTS] = 1.0
        drawn = np.concatenate([drawn, samples])
    # Centre the drawn curves' bounding box and scale its longer side to the glyph size.
    low, high = drawn.min(0), drawn.max(0)
    scale = _GLYPH_RADIUS / max((high - low).max() / 2, 1e-6)
    strokes[:num_strokes, :_CONTROL_POINTS] = (
        strokes[:num_strokes, :_CONTROL_POINTS] - (low + high) / 2
    ) * scale
    return strokes


def _random_stroke(rng: np.random.Generator, earlier: np.ndarray) -> np.ndarray:
    """(4, 2) control points of one pen stroke; `earlier` (s, 4, 2) strokes so far."""
    if len(earlier) and rng.random() < _CONNECT_PROBABILITY:
        # Start on an earlier stroke, at a random position along it.
        curve = earlier[rng.integers(len(earlier))]
        start = _bernstein(rng.uniform(0.0, 1.0)) @ curve
    else:
        start = rng.uniform(-0.45, 0.45, size=2)
    angle = rng.uniform(0.0, 2 * math.pi)
    chord = rng.uniform(0.6, 1.2) * np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-chord[1], chord[0]])
    bows = rng.normal(0.0, 0.25, size=2)
    return np.stack(
        [start, start + chord / 3 + bows[0] * normal,
         start + 2 * chord / 3 + bows[1] * normal, start + chord]
    )


def _bernstein(t: np.ndarray) -> np.ndarray:
    """(...) curve parameters -> (..., 4) cubic Bernstein basis."""
    u = 1.0 - t
    return np.stack([u**3, 3 * u**2 * t, 3 * u * t**2, t**3], axis=-1)


def _bernstein_samples(num_samples: int) -> np.ndarray:
    if num_samples not in _BERNSTEIN_CACHE:
        _BERNSTEIN_CACHE[num_samples] = _bernstein(np.linspace(0.0, 1.0, num_samples))
    return _BERNSTEIN_CACHE[num_samples]


def _render_batch(
    templates,
    stream_keys,
    image_size,
    *,
    rotation_degrees,
    scale_range,
    shear,
    translation,
    point_jitter,
    stroke_width_range,
    ink_range,
    noise_std,
) -> np.ndarray:
    """(B, MAX_STROKES, CONTROL_POINTS + 1, 2) templates -> (B, S, S) uint8 gray images.

    `stream_keys` holds each image's `(seed, class_id, image_id)` random stream key.
    """
    b, size = len(templates), image_size
    n_ctrl = _MAX_STROKES * _CONTROL_POINTS
    # One stream per image, drawn in a fixed order: 7 uniforms (rotation, scale, shear,
    # shift x, shift y, width, ink), control-point and stroke normals, pixel noise.
    uniforms = np.empty((b, 7))
    point_noise = np.empty((b, n_ctrl + _MAX_STROKES, 2))
    pixel_noise = np.empty((b, size, size), dtype=np.float32)
    for k, key in enumerate(stream_keys):
        rng = np.random.default_rng(key)
        uniforms[k] = rng.random(7)
        point_noise[k] = rng.standard_normal((n_ctrl + _MAX_STROKES, 2))
        pixel_noise[k] = rng.standard_normal((size, size), dtype=np.float32)

    # Per-control-point perturbation plus a smaller per-stroke shift.
    points = templates[:, :, :_CONTROL_POINTS].copy()  # (B, MAX_STROKES, 4, 2)
    points += point_jitter * point_noise[:, :n_ctrl].reshape(points.shape)
    points += 0.5 * point_jitter * point_noise[:, n_ctrl:, None, :]
    # Render only up to the last stroke any glyph of the batch uses.
    mask = templates[:, :, _CONTROL_POINTS, 0]  # (B, MAX_STROKES), used strokes first
    strokes_used = int(mask.sum(axis=1).max())
    mask, points = mask[:, :strokes_used], points[:, :strokes_used]

    # Affine jitter x' = A x + t with A = rotation @ shear @ scale.
    angle = np.deg2rad(rotation_degrees) * (2 * uniforms[:, 0] - 1)
    log_lo, log_hi = np.log(scale_range[0]), np.log(scale_range[1])
    scale = np.exp(log_lo + (log_hi - log_lo) * uniforms[:, 1])
    shear_k = shear * (2 * uniforms[:, 2] - 1)
    cos, sin = np.cos(angle), np.sin(angle)
    matrix = np.empty((b, 2, 2))
    matrix[:, 0, 0] = scale * cos
    matrix[:, 0, 1] = scale * (cos * shear_k - sin)
    matrix[:, 1, 0] = scale * sin
    matrix[:, 1, 1] = scale * (sin * shear_k + cos)
    shift = translation * (2 * uniforms[:, 3:5] - 1)  # (B, 2)
    points = np.matmul(points, matrix[:, None].transpose(0, 1, 3, 2)) + shift[:, None, None]

    width = size * (
        stroke_width_range[0] + (stroke_width_range[1] - stroke_width_range[0]) * uniforms[:, 5]
    )
    reach = width / 2 + 0.5  # ink ends here (pixels from the curve)

    # Dense samples along each stroke (B, strokes, T, 2). Keep the ink inside the
    # central crop: a glyph whose box is wider than [-r, r] shrinks about its box
    # centre, then a glyph that sticks out is shifted back in (not shrunk, so the
    # translation jitter survives).
    radius = np.maximum(_INK_RADIUS - reach / (size / 2.0), 0.25)[:, None]  # (B, 1)
    # size + 16 samples per stroke (~1 px apart): all but 0.03% of pixels are within 2
    # grey levels of an 8x denser sampling.
    num_samples = size + 16
    curve = np.matmul(_bernstein_samples(num_samples), points)  # (B, strokes, T, 2)
    used = (mask > 0)[:, :, None, None]
    low = np.where(used, curve, np.inf).min(axis=(1, 2))  # (B, 2)
    high = np.where(used, curve, -np.inf).max(axis=(1, 2))
    centre = (low + high) / 2
    shrink = np.minimum(1.0, 2 * radius[:, 0] / np.maximum((high - low).max(-1), 1e-9))
    low = centre + (low - centre) * shrink[:, None]
    high = centre + (high - centre) * shrink[:, None]
    inward = np.maximum(0.0, -radius - low) - np.maximum(0.0, high - radius)
    curve = (curve - centre[:, None, None]) * shrink[:, None, None, None] + (
        centre + inward
    )[:, None, None]
    curve = (curve + 1.0) * (size / 2.0)  # pixel coordinates, pixel centres at i + 0.5
    # Trapezoid arc-length weight of each sample; unused strokes weigh zero.
    seg = np.sqrt((np.diff(curve, axis=2) ** 2).sum(-1))  # (B, strokes, T - 1)
    weight = np.zeros(curve.shape[:3])
    weight[:, :, 1:] += 0.5 * seg
    weight[:, :, :-1] += 0.5 * seg
    weight *= mask[:, :, None]

    # Splat size: wide enough that samples ~1 px apart sum to a smooth line (the ripple
    # of a Gaussian comb is ~2 exp(-2 pi^2 sigma^2 / spacing^2)), narrow enough that
    # the profile is still informative at `reach`.
    sigma = np.maximum(0.6 * reach, 0.6)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))

    centres = np.arange(size, dtype=np.float32) + 0.5
    inv = (-0.5 / sigma**2).astype(np.float32)[:, None, None]
    xs = curve[..., 0].reshape(b, -1, 1).astype(np.float32)  # (B, P, 1)
    ys = curve[..., 1].reshape(b, -1, 1).astype(np.float32)
    gx = np.exp(inv * (xs - centres) ** 2)  # (B, P, S)
    gy = np.exp(inv * (ys - centres) ** 2)
    gx *= (weight.reshape(b, -1, 1) * norm[:, None, None]).astype(np.float32)
    density = np.matmul(gy.transpose(0, 2, 1), gx)  # (B, S_y, S_x), peak ~1 on a stroke

    # Invert the line-integral profile into a distance, then anti-aliased coverage.
    distance = sigma[:, None, None] * np.sqrt(
        -2.0 * np.log(np.clip(density, 1e-12, 1.0))
    )
    coverage = np.clip(reach[:, None, None] - distance, 0.0, 1.0)

    ink = ink_range[0] + (ink_range[1] - ink_range[0]) * uniforms[:, 6]
    gray = 1.0 - ink[:, None, None] * coverage + noise_std * pixel_noise
    return np.clip(np.rint(255.0 * gray), 0, 255).astype(np.uint8)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value}")
    return int(value)


def _check_float(name, value, minimum):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number. Received: {name}={value!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value}")
    return value


def _check_range(name, value, low, high=None, low_open=False):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a (low, high) pair of numbers. Received: {name}={value!r}"
        ) from None
    bad_low = lo <= low if low_open else lo < low
    if bad_low or not lo <= hi or (high is not None and hi > high):
        bounds = f"({low}, {'inf' if high is None else high}]"
        raise ValueError(
            f"`{name}` must satisfy low <= high within {bounds}. Received: {name}={value!r}"
        )
    return (lo, hi)
