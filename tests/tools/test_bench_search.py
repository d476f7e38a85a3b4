"""tools/bench_search.py on tiny settings: the table's rows and the files' sizes."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "tools"))

import bench_search  # noqa: E402


@pytest.mark.slow  # about 7 s: TensorFlow's start, one export
def test_latency_rows_and_gallery_bytes(capsys):
    rows = bench_search.main(["latency", "--sizes=40,400", "--dims=8", "--image_size=16",
                              "--runs=2"])
    assert [(r["items"], r["gallery"]) for r in rows] == [
        (0, "none (embedder)"), (40, "float16"), (40, "int8"), (400, "float16"), (400, "int8")]
    base = rows[0]["kb"] * 1024
    for row in rows[1:]:
        # float16: 2 bytes a value; int8: 1 byte a value + a float32 scale a row, twice
        # (the weights' quantization and the re-scoring's GATHER)
        gallery = row["items"] * 8 * (2 if row["gallery"] == "float16" else 1)
        if row["gallery"] == "int8":
            gallery += 8 * row["items"]
        extra = row["kb"] * 1024 - base
        assert gallery <= extra <= gallery + 4096 + 16 * row["items"], row
        assert row["ms"] > 0
    table = capsys.readouterr().out
    assert "| 8 | 400 | int8 |" in table and np.isfinite(rows[-1]["ms"])


def test_hybrid_query_rounding_by_hand():
    # range [-0.25, 0.5]: step 0.75 / 255, zero point round(-128 + 0.25 / step) = -43
    q = np.array([[0.5, -0.25, 0.0, 0.123]])
    step = 0.75 / 255
    want = np.array([[170, -85, 0, 42]]) * step  # 0.123 / step = 41.82 -> 42
    np.testing.assert_allclose(bench_search.hybrid_query_rounding(q), want, rtol=1e-12)
    # all positive: the range starts at 0 (zero point -128), the largest value is exact
    np.testing.assert_allclose(bench_search.hybrid_query_rounding([[0.3, 0.1]]),
                               [[0.3, round(0.1 / (0.3 / 255)) * 0.3 / 255]], rtol=1e-12)


def test_numpy_agreement_rows():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(200, 16))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:50] + 0.3 * rng.normal(size=(50, 16))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argmax(queries @ gallery.T, axis=1)
    out = bench_search.numpy_agreement(queries, gallery, exact)
    assert len(out) == 6
    assert out["numpy top-1 = exact top-1, float32 gallery, float query"] == 1.0
    assert all(0.9 <= value <= 1.0 for value in out.values()), out
