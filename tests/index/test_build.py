"""`build_index` from a saved embedder and a folder: embeddings, shards, strategies, errors."""

import importlib
import os

import keras
import numpy as np
import pytest

import kdml
from kdml.embedding import embed_image_set, read_image_set
from kdml.export import load_embedder
from kdml.index import GalleryIndex, build_index, model_fingerprint
from tests.conftest import new_mirrored_strategy
from tests.index.conftest import IMAGE_SIZE

build_module = importlib.import_module("kdml.index.build")


def _reference(index_assets):
    """The Keras model called on kdml's evaluation crops of every file, normalised."""
    image_set = read_image_set(index_assets["source"], "all", None, 0)
    model = keras.saving.load_model(index_assets["model"])
    images = np.concatenate([x.numpy() for x, _ in kdml.data.eval_dataset(
        image_set, image_size=IMAGE_SIZE)])
    x = keras.ops.convert_to_numpy(model(images, training=False))
    return image_set, x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference(index_assets):
    return _reference(index_assets)


def test_folder_build_holds_the_models_embeddings_labels_and_paths(index_assets, reference,
                                                                   tmp_path):
    image_set, want = reference
    output = str(tmp_path / "g.index")
    index = build_index(index_assets["model"], index_assets["source"], output, shard_size=20)
    np.testing.assert_allclose(index.embeddings, want, atol=1e-5)
    assert index.labels.tolist() == [image_set.class_names[c] for c in image_set.labels]
    assert index.labels[:6].tolist() == ["char00"] * 6
    assert index.paths.tolist() == image_set.paths.tolist()
    assert index.model == model_fingerprint(load_embedder(index_assets["model"]))
    assert sorted(os.listdir(tmp_path)) == ["g.index"]  # shards merged and removed
    loaded = GalleryIndex.load(output)
    top = loaded.query(want[:5], k=1)
    assert top.indices[:, 0].tolist() == [0, 1, 2, 3, 4]
    # the fingerprint ignores the file's save date: the same weights saved again match
    again = str(tmp_path / "again.keras")
    keras.saving.load_model(index_assets["model"]).save(again)
    assert model_fingerprint(load_embedder(again))["fingerprint"] == index.model["fingerprint"]


def test_a_rerun_after_a_kill_embeds_only_the_missing_shards(index_assets, reference, tmp_path,
                                                              monkeypatch):
    _, want = reference
    calls, real = [], embed_image_set

    def embed(embedder, image_set, **kwargs):
        calls.append(image_set.num_images)
        if die_at and len(calls) == die_at:
            raise KeyboardInterrupt  # killed while embedding the third shard
        return real(embedder, image_set, **kwargs)

    monkeypatch.setattr(build_module, "embed_image_set", embed)  # what build_index calls
    output = str(tmp_path / "g.index")
    die_at = 3
    with pytest.raises(KeyboardInterrupt):
        build_index(index_assets["model"], index_assets["source"], output, shard_size=20)
    assert not os.path.exists(output)
    assert len(os.listdir(output + ".shards")) == 2
    calls.clear()
    die_at = None
    index = build_index(index_assets["model"], index_assets["source"], output, shard_size=20)
    assert calls == [20, 12]  # shards 3 and 4 of 20, 20, 20, 12 images
    np.testing.assert_allclose(index.embeddings, want, atol=1e-5)
    # shards of another model are not reused
    calls.clear()
    build_index(index_assets["other_model"], index_assets["source"], str(tmp_path / "o.index"),
                shard_size=20)
    assert calls == [20, 20, 20, 12]


def test_mirrored_build_equals_one_device(index_assets, reference):
    _, want = reference
    index = build_index(index_assets["model"], index_assets["source"],
                        strategy=new_mirrored_strategy(), batch_size=10)
    np.testing.assert_allclose(index.embeddings, want, atol=1e-5)


def test_tf_data_source_and_incremental_add(index_assets, reference, tmp_path):
    import tensorflow as tf

    image_set, want = reference
    pixels = np.concatenate([x.numpy() for x, _ in kdml.data.eval_dataset(
        image_set, image_size=IMAGE_SIZE)])
    data = tf.data.Dataset.from_tensor_slices((pixels, image_set.labels)).batch(16)
    index = build_index(index_assets["model"], data.take(2))  # 32 images
    np.testing.assert_allclose(index.embeddings, want[:32], atol=1e-5)
    assert index.labels.tolist() == [str(c) for c in image_set.labels[:32]]
    grown = build_index(index_assets["model"], data.skip(2), add_to=index)
    assert len(grown) == 72 and grown.paths[-1] == "tf.data#39"
    np.testing.assert_allclose(grown.embeddings, want, atol=1e-5)


def test_bad_models_and_sources_are_one_line_errors(index_assets, tmp_path):
    index = GalleryIndex.load(_built(index_assets, tmp_path))
    with pytest.raises(ValueError) as error:
        build_index(index_assets["other_model"], index_assets["source"], add_to=index)
    message = str(error.value)
    assert f"built by model {index.model['fingerprint']}" in message
    assert "other.keras" in message and "embedder.keras" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"size 16 from model .*embedder.keras.*gives 8"):
        build_index(index_assets["d8_model"], index_assets["source"], add_to=index)
    os.makedirs(tmp_path / "empty" / "class_a")
    with pytest.raises(ValueError, match="no images"):
        build_index(index_assets["model"], f"folder:{tmp_path / 'empty'}")
    # a model whose output is NaN
    model = keras.saving.load_model(index_assets["model"])
    kernel = model.weights[-2]
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    model.save(str(tmp_path / "nan.keras"))
    with pytest.raises(ValueError, match=r"72 of 72 embeddings of the gallery folder:.* are not "
                                         r"finite .*row 0 \(.*char00.*png\)"):
        build_index(str(tmp_path / "nan.keras"), index_assets["source"])


def _built(index_assets, tmp_path):
    path = str(tmp_path / "built.index")
    build_index(index_assets["model"], index_assets["source"], path)
    return path
