"""`load_folder` / `load_folder_splits` on small generated folder trees."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from kdml.data.sources.folder import load_folder, load_folder_splits


def _write_image(path, value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(path, format=fmt)


def _make_tree(root, layout):
    """layout: {"Alpha/character01": ["a.png", ...]} -> files under root."""
    for folder, names in layout.items():
        for i, name in enumerate(names):
            fmt = {"jpg": "JPEG", "jpeg": "JPEG"}.get(name.rsplit(".", 1)[-1].lower())
            _write_image(root / folder / name, value=10 * i, fmt=fmt)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_omniglot_layout_classes_are_leaf_folders(tmp_path):
    _make_tree(tmp_path, {
        "Korean/character02": ["0002_02.png", "0002_01.png"],
        "Korean/character01": ["0001_01.png", "0001_02.png", "0001_03.png"],
        "Greek/character01": ["b.png", "a.png"],
    })
    (tmp_path / "README.txt").write_text("not an image")
    _write_image(tmp_path / "Greek" / "character01" / ".hidden.png")  # valid, but hidden
    _write_image(tmp_path / ".git" / "objects" / "x.png")

    image_set = load_folder(tmp_path)

    assert image_set.class_names == ("Greek/character01", "Korean/character01", "Korean/character02")
    np.testing.assert_array_equal(image_set.labels, [0, 0, 1, 1, 1, 2, 2])
    rel = [os.path.relpath(p, tmp_path) for p in image_set.paths]
    assert rel == [
        "Greek/character01/a.png", "Greek/character01/b.png",
        "Korean/character01/0001_01.png", "Korean/character01/0001_02.png",
        "Korean/character01/0001_03.png",
        "Korean/character02/0002_01.png", "Korean/character02/0002_02.png",
    ]
    assert all(os.path.isabs(p) for p in image_set.paths)


def test_cub_layout_and_extensions_are_case_insensitive(tmp_path):
    _make_tree(tmp_path, {
        "images/001.Black_footed_Albatross": ["x1.JPG", "x2.jpeg", "x3.Png"],
        "images/002.Laysan_Albatross": ["y1.jpg", "y2.gif", "y3.BMP"],
    })
    (tmp_path / "images" / "002.Laysan_Albatross" / "notes.txt").write_text("skip me")
    image_set = load_folder(tmp_path)
    assert image_set.class_names == ("images/001.Black_footed_Albatross", "images/002.Laysan_Albatross")
    assert image_set.class_counts().tolist() == [3, 3]
    assert load_folder(tmp_path / "images").class_names == (
        "001.Black_footed_Albatross", "002.Laysan_Albatross")


def test_unreadable_images_are_skipped_in_one_warning(tmp_path, caplog):
    _make_tree(tmp_path, {"a": ["1.png", "2.png", "3.png"], "b": ["1.jpg", "2.jpg"]})
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "a" / "text.png").write_text("not an image")
    jpeg = (tmp_path / "b" / "1.jpg").read_bytes()
    (tmp_path / "b" / "3_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])

    with caplog.at_level(logging.WARNING):
        image_set = load_folder(tmp_path)

    assert image_set.class_counts().tolist() == [3, 2]
    assert not any(p.endswith(("zero.png", "text.png", "3_truncated.jpg")) for p in image_set.paths)
    skipped = [m for m in _warnings(caplog) if "cannot be decoded" in m]
    assert len(skipped) == 1
    assert "skipping 3 of 8" in skipped[0]
    assert "zero.png" in skipped[0] and "3_truncated.jpg" in skipped[0]

    unverified = load_folder(tmp_path, verify_images=False)
    assert unverified.class_counts().tolist() == [5, 3]


def test_small_classes_are_dropped_with_a_warning(tmp_path, caplog):
    _make_tree(tmp_path, {"a": ["1.png", "2.png"], "b": ["1.png"], "c": ["1.png", "2.png"],
                          "d": ["1.png"]})
    (tmp_path / "d" / "broken.png").write_bytes(b"")  # leaves d with one readable image
    with caplog.at_level(logging.WARNING):
        image_set = load_folder(tmp_path)
    assert image_set.class_names == ("a", "c")
    np.testing.assert_array_equal(image_set.labels, [0, 0, 1, 1])
    dropped = [m for m in _warnings(caplog) if "dropping" in m]
    assert len(dropped) == 1 and "'b'" in dropped[0] and "'d'" in dropped[0]


def test_images_beside_subfolders_are_ignored(tmp_path, caplog):
    _make_tree(tmp_path, {"a": ["1.png", "2.png"], "a/inner": ["1.png", "2.png"], "b": ["1.png", "2.png"]})
    with caplog.at_level(logging.WARNING):
        image_set = load_folder(tmp_path)
    assert image_set.class_names == ("a/inner", "b")
    assert any("ignoring 2 image(s)" in m for m in _warnings(caplog))


def test_symlinked_folders_are_followed_once(tmp_path):
    _make_tree(tmp_path / "data", {"a": ["1.png", "2.png"], "b": ["1.png", "2.png"]})
    os.symlink(tmp_path / "data", tmp_path / "data" / "a_loop")  # a cycle
    image_set = load_folder(tmp_path / "data")
    assert image_set.class_names == ("a", "b")


def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_folder(missing)


def test_root_without_images_names_the_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"{tmp_path}.*no image files"):
        load_folder(tmp_path)


def test_fewer_than_two_classes_names_the_path(tmp_path):
    _make_tree(tmp_path, {"only": ["1.png", "2.png"], "single": ["1.png"]})
    with pytest.raises(ValueError, match=f"{tmp_path}.*1 usable class") as error:
        load_folder(tmp_path)
    # the fix is a second image in the single-image class, not sub-folders (it has them)
    assert "1 class folder(s) hold fewer than 2 readable images: add a second image" in str(
        error.value) and "sub-folder" not in str(error.value)


def test_one_image_per_class_advises_a_second_image(tmp_path):
    _make_tree(tmp_path, {f"Latin/c{i}": ["1.png"] for i in range(4)})
    with pytest.raises(ValueError, match="0 usable class.*4 class folder.*add a second image"):
        load_folder(tmp_path)


def test_splits_first_half_train_second_half_test(tmp_path):
    _make_tree(tmp_path, {c: ["1.png", "2.png"] for c in ["e", "a", "d", "b", "c"]})
    splits = load_folder_splits(tmp_path)
    assert splits.train.class_names == ("a", "b")
    assert splits.test.class_names == ("c", "d", "e")
    np.testing.assert_array_equal(splits.train.labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(splits.test.labels, [0, 0, 1, 1, 2, 2])
    assert all("/c/" in p for p in splits.test.paths[:2])


def test_splits_with_eval_root(tmp_path):
    _make_tree(tmp_path / "background", {"A/c1": ["1.png", "2.png"], "A/c2": ["1.png", "2.png"],
                                         "B/c1": ["1.png", "2.png"]})
    _make_tree(tmp_path / "evaluation", {"C/c1": ["1.png", "2.png"], "C/c2": ["1.png", "2.png"]})
    splits = load_folder_splits(tmp_path / "background", eval_root=tmp_path / "evaluation")
    assert splits.train.class_names == ("A/c1", "A/c2", "B/c1")
    assert splits.test.class_names == ("C/c1", "C/c2")
    assert all("evaluation" in p for p in splits.test.paths)
    assert all("background" in p for p in splits.train.paths)
