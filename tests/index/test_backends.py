"""Approximate backends against the exact search; they skip cleanly without the extra."""

import json

import numpy as np
import pytest

from kdml.index import GalleryIndex
from kdml.index.approximation import measure_approximation
from kdml.index.backends import default_nlist, drop_query_rows, sample_recall, scann_available


def _clustered(n, d=16, classes=50, noise=1.0, seed=0):
    """Unit vectors around `classes` random unit centres (noise of norm ~`noise`)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(classes, size=n)] + rng.normal(size=(n, d)) * noise / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_helpers_by_hand():
    assert sample_recall(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 9], [7, 8, 9]]), 3) \
        == pytest.approx((2 / 3 + 0) / 2)
    np.testing.assert_array_equal(drop_query_rows(np.array([[5, 1, 2], [0, 7, 3]]),
                                                  np.array([5, 9]), 2), [[1, 2], [0, 7]])
    assert [default_nlist(n) for n in (10, 100, 10_000, 1_000_000)] == [1, 2, 256, 4096]


def test_faiss_meets_its_calibrated_recall_and_saves(tmp_path):
    pytest.importorskip("faiss")
    data = _clustered(20_050)  # gallery and fresh queries around the same centres
    gallery, queries = data[:20_000], data[20_000:]
    labels = [str(i % 7) for i in range(len(gallery))]
    index = GalleryIndex(gallery, labels, backend="faiss", backend_options={"nlist": 64})
    config = index.backend.config()
    assert config["nlist"] == 64 and config["calibrated_recall"] >= 0.97
    report = measure_approximation(index, k=10, num_queries=300, seed=1)
    assert report["backend"] == "faiss" and report["k"] == 10
    assert report["recall_at_k"] >= 0.95  # fresh queries, independent of the calibration sample
    index.save(str(tmp_path / "f.index"))
    loaded = GalleryIndex.load(str(tmp_path / "f.index"))
    assert loaded.backend.name == "faiss" and loaded.backend.config()["nprobe"] == config["nprobe"]
    np.testing.assert_array_equal(loaded.query(queries, k=10).indices,
                                  index.query(queries, k=10).indices)
    exact = GalleryIndex.load(str(tmp_path / "f.index"), backend="exact").query(queries, k=10)
    assert sample_recall(index.query(queries, k=10).indices, exact.indices, 10) >= 0.95


def test_faiss_on_a_small_gallery_is_exact_and_adds_incrementally():
    pytest.importorskip("faiss")
    data = _clustered(69)
    gallery, queries = data[:60], data[60:]
    labels = [str(i) for i in range(60)]
    index = GalleryIndex(gallery[:50], labels[:50], backend="faiss")
    assert index.backend.config()["nlist"] == 1  # too small for IVF: IndexFlatIP
    index.add(gallery[50:], labels[50:])
    exact = GalleryIndex(gallery, labels)
    got, want = index.query(queries, k=5), exact.query(queries, k=5)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.similarities, want.similarities, atol=1e-5)


@pytest.mark.skipif(not scann_available(), reason="ScaNN is not importable here")
def test_scann_recall():
    gallery = _clustered(5_000)
    index = GalleryIndex(gallery, ["x"] * len(gallery), backend="scann")
    assert measure_approximation(index, k=10, num_queries=200)["recall_at_k"] >= 0.9


def test_missing_extra_is_a_one_line_error(monkeypatch):
    import kdml.index.backends as backends

    monkeypatch.setattr(backends, "faiss_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'kdml\[ann\]'.*backend='exact'"):
        GalleryIndex(_clustered(10), ["a"] * 10, backend="faiss")
    with pytest.raises(ValueError, match="Valid backends: exact, faiss, scann"):
        GalleryIndex(_clustered(10), ["a"] * 10, backend="annoy")


# --- faiss HNSW ----------------------------------------------------------------------


def _hnsw_index(gallery, **options):
    labels = [str(i % 7) for i in range(len(gallery))]
    return GalleryIndex(gallery, labels, backend="faiss",
                        backend_options={"faiss_index": "hnsw", "hnsw_m": 16, **options})


def test_faiss_hnsw_meets_its_calibrated_recall_and_round_trips(tmp_path):
    pytest.importorskip("faiss")
    data = _clustered(8_200)
    gallery, queries = data[:8_000], data[8_000:]
    index = _hnsw_index(gallery)
    config = index.backend.config()
    assert config["faiss_index"] == "hnsw" and config["hnsw_m"] == 16
    assert config["calibrated_recall"] >= 0.97 and config["ef_search"] >= 16
    exact = GalleryIndex(gallery, index.labels).query(queries, k=10)
    found = index.query(queries, k=10)
    assert sample_recall(found.indices, exact.indices, 10) >= 0.95  # fresh queries
    # similarities are the float32 inner products of the returned rows
    np.testing.assert_allclose(
        found.similarities, np.einsum("qd,qkd->qk", queries / np.linalg.norm(
            queries, axis=1, keepdims=True), gallery[found.indices] / np.linalg.norm(
            gallery[found.indices], axis=2, keepdims=True)), atol=1e-5)
    path = str(tmp_path / "h.index")
    index.save(path)
    with open(tmp_path / "h.index" / "index.json") as f:
        saved = json.load(f)
    assert saved["backend"] == {"name": "faiss", "config": config}
    assert "faiss.index" in saved["files"]
    loaded = GalleryIndex.load(path)
    assert loaded.backend.config() == config
    assert loaded.backend._index.hnsw.efSearch == config["ef_search"]
    again = loaded.query(queries, k=10)
    np.testing.assert_array_equal(again.indices, found.indices)
    np.testing.assert_array_equal(again.similarities, found.similarities)


def test_faiss_hnsw_add_then_search_finds_the_added_items(tmp_path):
    pytest.importorskip("faiss")
    data = _clustered(3_000, seed=3)
    index = _hnsw_index(data[:2_500])
    new = _clustered(500, classes=5, noise=0.05, seed=4)  # 5 tight new clusters
    index.add(new, [f"new{i}" for i in range(500)])
    assert len(index) == 3_000 and index.backend._index.ntotal == 3_000
    found = index.query(new, k=1)
    assert np.mean(found.indices[:, 0] >= 2_500) == 1.0  # each added item finds an added one
    exact = GalleryIndex(index.embeddings, index.labels).query(new, k=10)
    assert sample_recall(index.query(new, k=10).indices, exact.indices, 10) >= 0.9
    index.save(str(tmp_path / "a.index"))
    loaded = GalleryIndex.load(str(tmp_path / "a.index"))
    np.testing.assert_array_equal(loaded.query(new, k=5).indices, index.query(new, k=5).indices)


def test_faiss_hnsw_single_thread_build_is_deterministic():
    faiss = pytest.importorskip("faiss")
    data = _clustered(2_100, seed=5)
    gallery, queries = data[:2_000], data[2_000:]
    threads = faiss.omp_get_max_threads()
    try:
        first = _hnsw_index(gallery, threads=1, ef_search=16)
        second = _hnsw_index(gallery, threads=1, ef_search=16)
    finally:
        faiss.omp_set_num_threads(threads)
    np.testing.assert_array_equal(first.query(queries, k=10).indices,
                                  second.query(queries, k=10).indices)
    assert first.backend.config()["calibrated_recall"] is None  # ef_search given: no calibration


def test_faiss_options_are_checked():
    pytest.importorskip("faiss")
    gallery = _clustered(100)
    with pytest.raises(ValueError, match=r"Unknown faiss index 'ivfpq'\. Valid: ivf, hnsw"):
        GalleryIndex(gallery, ["a"] * 100, backend="faiss",
                     backend_options={"faiss_index": "ivfpq"})
    with pytest.raises(ValueError, match="hnsw_m=0"):
        GalleryIndex(gallery, ["a"] * 100, backend="faiss",
                     backend_options={"faiss_index": "hnsw", "hnsw_m": 0})
    with pytest.raises(ValueError, match=r"backend='exact' does not take faiss_index"):
        GalleryIndex(gallery, ["a"] * 100, backend="exact",
                     backend_options={"faiss_index": "hnsw"})


def test_cli_passes_the_hnsw_flags():
    from kdml.index.__main__ import _backend_options, _parser

    args = _parser().parse_args(["build", "--model=m.keras", "--source=synthetic",
                                 "--output_dir=o", "--backend=faiss", "--faiss_index=hnsw",
                                 "--hnsw_m=8", "--ef_construction=20", "--ef_search=48"])
    assert _backend_options(args) == {"faiss_index": "hnsw", "hnsw_m": 8,
                                      "ef_construction": 20, "ef_search": 48}
    with pytest.raises(SystemExit):
        _parser().parse_args(["evaluate", "--index=i", "--faiss_index=pq"])
