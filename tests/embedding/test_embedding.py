"""`kdml.embedding`: an image set read from a folder, a dataset or files, embedded in
batches (with a progress line on long sets at a terminal), a saved gallery read back."""

import io
import os

import keras
import numpy as np
import pytest

import kdml
from kdml.embedding import (StoredGallery, embed_image_set, image_subset, load_embedder,
                            load_image_embedder, load_uint8, model_fingerprint, read_gallery,
                            read_image_files, read_image_set)
from kdml.embedding import embed as embed_module
from kdml.index import GalleryIndex
from tests.helpers import write_glyph_folder

IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A conv4 embedder (16 px, d = 8) and a folder of 5 classes, one of a single image."""
    root = tmp_path_factory.mktemp("embedding")
    keras.utils.set_random_seed(0)
    model = kdml.models.build_embedder("conv4", embedding_dim=8, image_size=IMAGE_SIZE)
    path = str(root / "embedder.keras")
    model.save(path)
    folder = write_glyph_folder(root / "gallery", num_classes=4, images_per_class=3,
                                class_dir=lambda label: f"g{label % 2}/c{label}")
    os.makedirs(os.path.join(folder, "solo"))
    first = sorted(os.listdir(os.path.join(folder, "g0", "c0")))[0]
    os.replace(os.path.join(folder, "g0", "c0", first), os.path.join(folder, "solo", first))
    return {"model": path, "folder": folder}


def test_a_folder_with_split_all_keeps_every_leaf_class(assets):
    image_set = read_image_set(f"folder:{assets['folder']}", "all")
    # leaf folders relative to the root, sorted; the single-image class stays
    assert image_set.class_names == ("g0/c0", "g0/c2", "g1/c1", "g1/c3", "solo")
    assert np.bincount(image_set.labels).tolist() == [2, 3, 3, 3, 1]
    names = np.asarray(image_set.class_names)[image_set.labels]
    for name, path in zip(names, image_set.paths):
        assert os.path.relpath(os.path.dirname(path), assets["folder"]) == name
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_image_set(f"folder:{assets['folder']}/missing", "all")


def test_a_dataset_with_split_all_is_its_train_then_its_test_classes():
    splits = kdml.data.load_dataset("synthetic")
    both = read_image_set("synthetic", "all")
    train, test = splits.train, splits.test
    assert both.num_images == train.num_images + test.num_images
    np.testing.assert_array_equal(both.labels[train.num_images:],
                                  test.labels + train.num_classes)
    np.testing.assert_array_equal(both.pixels[:train.num_images], train.pixels)
    assert both.class_names == tuple(train.class_names) + tuple(test.class_names)
    assert read_image_set("synthetic", "test").num_images == test.num_images


def test_files_are_labelled_in_the_gallery_terms_and_subsets_keep_their_order(assets):
    gallery = read_image_set(f"folder:{assets['folder']}", "all")
    names = np.asarray(gallery.class_names)[gallery.labels]
    files = [os.path.join(assets["folder"], "g1", "c3", "q.png"),
             os.path.join(assets["folder"], "g0", "new", "q.png"),
             os.path.join(os.path.dirname(assets["folder"]), "elsewhere", "x", "q.png")]
    queries = read_image_files(files, names, gallery.paths)
    assert [queries.class_names[i] for i in queries.labels] == ["g1/c3", "g0/new", "x"]
    assert queries.paths.tolist() == files
    rows = np.array([7, 0, 3])
    subset = image_subset(gallery, rows)
    assert subset.paths.tolist() == gallery.paths[rows].tolist()
    assert subset.labels.tolist() == gallery.labels[rows].tolist()
    assert subset.class_names == gallery.class_names


def test_embeddings_are_the_model_on_the_evaluation_crops_in_order(assets):
    image_set = read_image_set(f"folder:{assets['folder']}", "all")
    embedder = load_image_embedder(assets["model"])
    got = embed_image_set(embedder, image_set, batch_size=5)  # 12 images: 5 + 5 + 2
    floats = np.concatenate([x.numpy() for x, _ in kdml.data.eval_dataset(
        image_set, image_size=IMAGE_SIZE)])
    model = keras.saving.load_model(assets["model"])
    want = keras.ops.convert_to_numpy(model(floats, training=False))
    assert got.shape == (12, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    # load_uint8: the same crops, rounded to camera pixels
    np.testing.assert_array_equal(load_uint8(image_set, IMAGE_SIZE),
                                  np.clip(np.round(floats), 0, 255).astype(np.uint8))
    with pytest.raises(FileNotFoundError, match="No model at"):
        load_image_embedder(assets["model"] + ".missing")


def test_a_long_set_at_a_terminal_shows_one_progress_line(assets, monkeypatch):
    image_set = read_image_set(f"folder:{assets['folder']}", "all")
    embedder = load_embedder(assets["model"])
    quiet = io.StringIO()
    embed_image_set(embedder, image_set, batch_size=5, progress_stream=quiet)
    assert quiet.getvalue() == ""  # "auto": not a terminal, and a short set

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    embed_image_set(embedder, image_set, batch_size=5, progress_stream=terminal)
    assert terminal.getvalue() == ""  # a terminal, but 12 < PROGRESS_MIN_IMAGES
    monkeypatch.setattr(embed_module, "PROGRESS_MIN_IMAGES", 10)
    embed_image_set(embedder, image_set, batch_size=5, progress_stream=terminal)
    name = f"Embedding {image_set.name}"
    assert terminal.getvalue() == (f"\r{name}: 5/12 images (41%)\r{name}: 10/12 images (83%)"
                                   f"\r{name}: 12/12 images (100%)\n")
    forced = io.StringIO()
    embed_image_set(embedder, image_subset(image_set, np.arange(3)), progress=True,
                    progress_stream=forced)
    assert forced.getvalue().endswith(": 3/3 images (100%)\n")


def test_a_saved_gallery_reads_back_without_a_search_backend(assets, tmp_path):
    embedder = load_embedder(assets["model"])
    entry = model_fingerprint(embedder)
    image_set = read_image_set(f"folder:{assets['folder']}", "all")
    names = np.asarray(image_set.class_names)[image_set.labels]
    index = GalleryIndex(embed_image_set(embedder, image_set), names, image_set.paths,
                         model=entry, threshold={"value": 0.5, "source": "x"})
    index.save(str(tmp_path / "g.index"))
    stored = read_gallery(str(tmp_path / "g.index"))
    assert isinstance(stored, StoredGallery) and len(stored) == 12 and stored.dim == 8
    # the rows GalleryIndex.load gives (what the search model stored before read_gallery)
    loaded = GalleryIndex.load(str(tmp_path / "g.index"), backend="exact")
    np.testing.assert_array_equal(stored.embeddings, loaded.embeddings)
    np.testing.assert_allclose(stored.embeddings, index.embeddings, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(stored.embeddings, axis=1), 1.0, rtol=1e-6)
    assert stored.labels.tolist() == names.tolist()
    assert stored.paths.tolist() == image_set.paths.tolist()
    assert stored.threshold == {"value": 0.5, "source": "x"} and stored.model == entry
    stored.check_model(entry)
    other = dict(entry, fingerprint="0" * 16, path="other.keras")
    with pytest.raises(ValueError, match="not comparable"):
        stored.check_model(other)
    stored.check_model(other, allow_model_mismatch=True)
    with pytest.raises(ValueError, match="size 8"):
        stored.check_model(dict(entry, embedding_dim=4))
