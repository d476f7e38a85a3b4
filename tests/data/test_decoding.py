"""`decode_rgb` against Pillow's decoding of the same files, and `find_unreadable`."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from kdml.data.decoding import decode_rgb, find_unreadable

H, W = 12, 10


def _rgb(seed=0):
    """A smooth colour image (JPEG round-trips it closely) with some texture."""
    y, x = np.mgrid[0:H, 0:W]
    rng = np.random.default_rng(seed)
    image = np.stack([x * 20, y * 18, 255 - x * 10 - y * 8], -1) + rng.integers(0, 30, (H, W, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _rgba():
    """Left half opaque colour, right half fully transparent black, one pixel half-transparent."""
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, : W // 2, :3] = _rgb()[:, : W // 2]
    rgba[:, : W // 2, 3] = 255
    rgba[0, 0] = (200, 100, 0, 128)
    return rgba


def _over_white_reference(path):
    """Pillow's compositing of the file on a white background."""
    image = Image.open(path).convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, image).convert("RGB"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rgb = _rgb()
    Image.fromarray(rgb).save(d / "rgb.jpg", quality=95, subsampling=0)  # 4:4:4
    Image.fromarray(rgb[..., 0]).save(d / "gray.jpg", quality=95)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 1]).save(d / "gray.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(d / "gray16.png")
    Image.fromarray(_rgba(), "RGBA").save(d / "rgba.png")
    Image.fromarray(_rgba()[..., [0, 3]], "LA").save(d / "la.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.save(d / "palette.png")
    palette.save(d / "palette_trns.png", transparency=0)
    Image.fromarray(rgb).save(d / "rgb.gif")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(rgb).save(d / "rgb.bmp")
    Image.fromarray(rgb[..., 2]).save(d / "gray.bmp")
    # Unreadable.
    (d / "zero.png").write_bytes(b"")
    jpeg = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = (d / "rgba.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "text.png").write_text("not an image\n")
    return d


def _decode(path):
    image = decode_rgb(tf.io.read_file(str(path)))
    assert image.dtype == tf.uint8
    assert image.shape == (H, W, 3)
    return image.numpy()


@pytest.mark.parametrize(
    "name",
    ["rgb.png", "gray.png", "gray16.png", "palette.png", "rgb.gif", "anim.gif", "rgb.bmp", "gray.bmp"],
)
def test_lossless_formats_match_pillow_exactly(files, name):
    expected = np.asarray(Image.open(files / name).convert("RGB"))  # first frame of a GIF
    if name == "gray16.png":  # Pillow's "I;16" -> "RGB" clips; 16 -> 8 bits is v // 257
        expected = np.repeat(_rgb()[..., 1:2], 3, axis=-1)
    np.testing.assert_array_equal(_decode(files / name), expected)


@pytest.mark.parametrize("name", ["rgb.jpg", "gray.jpg", "cmyk.jpg"])
def test_jpeg_matches_pillow_within_jpeg_tolerance(files, name):
    got = _decode(files / name).astype(int)
    expected = np.asarray(Image.open(files / name).convert("RGB")).astype(int)
    assert np.abs(got - expected).max() <= 2
    if name == "gray.jpg":
        np.testing.assert_array_equal(got[..., 0], got[..., 1])
        np.testing.assert_array_equal(got[..., 0], got[..., 2])
    else:  # and close to the pixels that were encoded
        assert np.abs(got - _rgb().astype(int)).mean() < 6


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "palette_trns.png"])
def test_transparency_is_composited_on_white(files, name):
    got = _decode(files / name).astype(int)
    np.testing.assert_allclose(got, _over_white_reference(files / name), atol=1)
    if name != "palette_trns.png":
        # The transparent right half is black underneath: it must come out white.
        np.testing.assert_array_equal(got[:, W // 2 :], 255)
        # (200, 100, 0) at alpha 128 over white: (c * 128 + 255 * 127) / 255.
        np.testing.assert_allclose(got[0, 0], [227, 227, 227] if name == "la.png" else [227, 177, 127], atol=1)
        opaque = _rgb()[1:, : W // 2]
        np.testing.assert_array_equal(got[1:, : W // 2], opaque if name == "rgba.png" else np.repeat(opaque[..., :1], 3, -1))


def test_static_shape_inside_tf_data(files):
    paths = [str(files / n) for n in ["rgb.jpg", "rgba.png", "rgb.gif", "gray.bmp"]]
    ds = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: decode_rgb(tf.io.read_file(p)))
    assert ds.element_spec.shape.as_list() == [None, None, 3]
    assert ds.element_spec.dtype == tf.uint8
    assert [tuple(x.shape) for x in ds] == [(H, W, 3)] * 4


@pytest.mark.parametrize("name", ["zero.png", "truncated.jpg", "truncated.png", "text.png"])
def test_broken_files_raise(files, name):
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_rgb(tf.io.read_file(str(files / name)))


def test_find_unreadable_marks_exactly_the_broken_files(files):
    names = ["rgb.jpg", "zero.png", "rgba.png", "truncated.jpg", "palette.png", "text.png",
             "rgb.gif", "truncated.png", "missing.png", "rgb.bmp"]
    broken = {"zero.png", "truncated.jpg", "text.png", "truncated.png", "missing.png"}
    got = find_unreadable([str(files / n) for n in names] * 3)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, [n in broken for n in names] * 3)


def test_find_unreadable_empty():
    assert find_unreadable([]).shape == (0,)
