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
        # float16: 2 bytes a value; int8: 1 byte a value + a float32 scale a row
        gallery = row["items"] * 8 * (2 if row["gallery"] == "float16" else 1)
        if row["gallery"] == "int8":
            gallery += 4 * row["items"]
        extra = row["kb"] * 1024 - base
        assert gallery <= extra <= gallery + 4096 + 16 * row["items"], row
        assert row["ms"] > 0
    table = capsys.readouterr().out
    assert "| 8 | 400 | int8 |" in table and np.isfinite(rows[-1]["ms"])
