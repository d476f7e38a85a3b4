import numpy as np
import pytest
import tensorflow as tf

from kdml.data import load_dataset
from kdml.data.sources.synthetic import glyphs


def test_synthetic_is_the_zero_shot_glyph_split():
    splits = load_dataset("synthetic")
    assert (splits.train.num_classes, splits.test.num_classes) == (100, 100)
    assert (splits.train.num_images, splits.test.num_images) == (2000, 2000)
    assert splits.kind == "glyph"
    everything = glyphs()
    np.testing.assert_array_equal(splits.test.pixels, everything.pixels[2000:])  # classes 100-199
    assert splits.test.class_names[0] == everything.class_names[100]


def _write_classes(root, names, per_class=3):
    images = glyphs(num_classes=len(names), images_per_class=per_class, image_size=16, seed=1)
    for pixels, label in zip(images.pixels, images.labels):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        n = len(list(folder.iterdir()))
        tf.io.write_file(str(folder / f"{n}.png"), tf.io.encode_png(pixels))


def test_folder_with_eval_dataset_trains_on_every_class_of_the_first(tmp_path):
    _write_classes(tmp_path / "a", ["x1", "x2", "x3", "x4"])
    _write_classes(tmp_path / "b", ["y1", "y2"])
    halves = load_dataset(f"folder:{tmp_path / 'a'}")
    assert halves.train.class_names == ("x1", "x2") and halves.test.class_names == ("x3", "x4")
    assert halves.kind == "photo"
    other = load_dataset(f"folder:{tmp_path / 'a'}", eval_spec=f"folder:{tmp_path / 'b'}")
    assert other.train.class_names == ("x1", "x2", "x3", "x4")
    assert other.test.class_names == ("y1", "y2")


@pytest.mark.parametrize("spec,eval_spec,message", [
    ("imagenet", None, "Valid datasets: synthetic, folder:<dir>, tfds:<name>"),
    ("folder:", None, "Unknown dataset"),
    ("synthetic", "folder:/x", "--eval_dataset is supported with --dataset=folder"),
    ("folder:/x", "tfds:cub200", "--eval_dataset must be folder:<dir>"),
])
def test_bad_specs_name_the_valid_forms(spec, eval_spec, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(spec, eval_spec=eval_spec)
