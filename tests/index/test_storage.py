"""The saved index: round trip, atomic writes, corrupt or partial directories, bad input."""

import json
import os
import shutil

import numpy as np
import pytest

from kdml.embedding.gallery_files import read_index_files
from kdml.index import GalleryIndex, IndexFormatError, check_embeddings


def _clustered(rng, n=60, d=8, classes=6):
    centres = rng.normal(size=(classes, d))
    labels = np.arange(n) % classes
    x = centres[labels] + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32), [f"c{label}" for label in labels]


def _numpy_top_k(queries, gallery, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    scores = q @ g.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k], scores


def test_round_trip_gives_the_neighbours_of_exact_knn_and_numpy(rng, tmp_path):
    from kdml.evaluation import exact_knn

    gallery, labels = _clustered(rng)
    paths = [f"img/{i}.png" for i in range(len(labels))]
    model = {"fingerprint": "f" * 16, "format": "keras", "path": "m.keras",
             "image_size": [16, 16], "embedding_dim": 8}
    GalleryIndex(gallery * 5.0, labels, paths, model=model).save(str(tmp_path / "g.index"))
    index = GalleryIndex.load(str(tmp_path / "g.index"))
    assert len(index) == 60 and index.dim == 8 and index.model == model
    assert index.labels.tolist() == labels and index.paths.tolist() == paths
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-6)

    queries = rng.normal(size=(7, 8)).astype(np.float32)
    result = index.query(queries, k=5)
    want, scores = _numpy_top_k(queries, gallery, 5)
    knn, knn_scores = exact_knn(queries, gallery, k=5)
    np.testing.assert_array_equal(result.indices, knn)
    np.testing.assert_array_equal(result.indices, want)
    np.testing.assert_allclose(result.similarities, knn_scores, atol=1e-6)
    np.testing.assert_allclose(result.similarities, np.take_along_axis(scores, want, 1), atol=1e-6)
    assert result.labels.tolist() == [[labels[j] for j in row] for row in want]
    assert result.paths[0, 0] == paths[want[0, 0]]
    assert result.as_records()[0][0]["label"] == labels[want[0, 0]]
    info = json.load(open(tmp_path / "g.index" / "index.json"))
    assert info["format"] == "kdml-gallery-index" and info["version"] == 1
    assert info["count"] == 60 and info["embedding_dim"] == 8 and info["similarity"] == "cosine"
    assert info["backend"]["name"] == "exact"


def test_incremental_add_equals_building_on_everything(rng, tmp_path):
    gallery, labels = _clustered(rng)
    index = GalleryIndex(gallery[:40], labels[:40])
    index.add(gallery[40:], labels[40:], [f"p{i}" for i in range(40, 60)])
    index.save(str(tmp_path / "g.index"))
    loaded = GalleryIndex.load(str(tmp_path / "g.index"))
    whole = GalleryIndex(gallery, labels)
    queries = rng.normal(size=(5, 8))
    np.testing.assert_array_equal(loaded.query(queries, k=6).indices,
                                  whole.query(queries, k=6).indices)
    assert loaded.paths.tolist() == [""] * 40 + [f"p{i}" for i in range(40, 60)]


def test_a_killed_write_never_loads_and_keeps_the_previous_index(rng, tmp_path, monkeypatch):
    gallery, labels = _clustered(rng)
    path = str(tmp_path / "g.index")
    GalleryIndex(gallery[:30], labels[:30]).save(path)
    calls = []
    real_save = np.save

    def dying_save(file, array, **kwargs):  # the process "dies" after the first array
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(file, array, **kwargs)

    monkeypatch.setattr(np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        GalleryIndex(gallery, labels).save(path)
    monkeypatch.undo()
    assert len(GalleryIndex.load(path)) == 30  # the previous index, intact
    assert sorted(os.listdir(tmp_path)) == ["g.index"]

    # what a SIGKILL leaves behind (the temporary directory, no index.json) is refused
    partial = tmp_path / ".g2.index.tmp-123"
    shutil.copytree(path, partial)
    os.remove(partial / "index.json")
    with pytest.raises(IndexFormatError, match=r"no index.json: its write was interrupted"):
        GalleryIndex.load(str(partial))


def test_truncated_corrupt_and_foreign_directories_are_one_line_errors(rng, tmp_path):
    gallery, labels = _clustered(rng)
    path = tmp_path / "g.index"
    GalleryIndex(gallery, labels).save(str(path))
    broken = tmp_path / "b.index"

    def fresh():
        shutil.rmtree(broken, ignore_errors=True)
        shutil.copytree(path, broken)

    fresh()
    data = open(broken / "embeddings.npy", "rb").read()
    open(broken / "embeddings.npy", "wb").write(data[:-100])
    with pytest.raises(IndexFormatError, match=r"embeddings.npy has \d+ bytes.*truncated"):
        read_index_files(str(broken))
    fresh()
    data = bytearray(open(broken / "labels.npy", "rb").read())
    data[-1] ^= 1
    open(broken / "labels.npy", "wb").write(bytes(data))
    with pytest.raises(IndexFormatError, match="labels.npy does not match its SHA-256"):
        read_index_files(str(broken))
    read_index_files(str(broken), verify=False)  # sizes still agree
    fresh()
    info = json.load(open(broken / "index.json"))
    json.dump({**info, "version": 99}, open(broken / "index.json", "w"))
    with pytest.raises(IndexFormatError, match="version 99; this kdml reads version 1"):
        read_index_files(str(broken))
    open(broken / "index.json", "w").write("{not json")
    with pytest.raises(IndexFormatError, match="index.json is corrupt"):
        read_index_files(str(broken))
    with pytest.raises(FileNotFoundError, match="No index at .*kdml.index build"):
        read_index_files(str(tmp_path / "missing"))
    for message in ("truncated", "SHA-256"):
        assert "\n" not in message


def test_empty_nan_and_wrong_size_inputs(rng):
    with pytest.raises(ValueError, match="is empty: no embeddings to index"):
        GalleryIndex(np.zeros((0, 4), np.float32), [])
    x = rng.normal(size=(10, 4)).astype(np.float32)
    x[3, 1], x[7, 0] = np.nan, np.inf
    paths = [f"g/{i}.png" for i in range(10)]
    with pytest.raises(ValueError) as error:
        check_embeddings(x, paths)
    message = str(error.value)
    assert "2 of 10 embeddings" in message and "row 3 (g/3.png)" in message
    assert "\n" not in message
    model = {"fingerprint": "a" * 16, "path": "built.keras", "embedding_dim": 4}
    index = GalleryIndex(rng.normal(size=(10, 4)), [str(i) for i in range(10)], model=model)
    with pytest.raises(ValueError, match=r"size 4 \(model a{16} \(built.keras\)\); the queries "
                                         r"have shape \(2, 5\)"):
        index.query(rng.normal(size=(2, 5)))
    other = {"fingerprint": "b" * 16, "path": "query.tflite", "embedding_dim": 8}
    with pytest.raises(ValueError, match=r"size 4 from model a{16} \(built.keras\), but the query "
                                         r"model b{16} \(query.tflite\) gives 8"):
        index.check_model(other)
    with pytest.raises(ValueError, match=r"built by model a{16} \(built.keras\), but the query "
                                         r"model is b{16} \(query.tflite\)"):
        index.check_model({**other, "embedding_dim": 4})
    index.check_model({**other, "embedding_dim": 4}, allow_model_mismatch=True)
    with pytest.raises(ValueError, match="k >= 1"):
        index.query(rng.normal(size=(2, 4)), k=0)
    assert index.query(rng.normal(size=(2, 4)), k=50).indices.shape == (2, 10)
