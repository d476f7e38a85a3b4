"""A 2-worker build on 127.0.0.1 (TF_CONFIG) merges into the one-process index."""

import os

import numpy as np
import pytest

from kdml.index import GalleryIndex, build_index
from tests.helpers import run_local_workers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240  # two TensorFlow start-ups; ~20 s on an idle 2-core machine


@pytest.mark.slow
def test_two_workers_build_the_one_process_index(index_assets, tmp_path):
    output = str(tmp_path / "mw.index")
    command = ["-m", "kdml.index", "build", f"--model={index_assets['model']}",
               f"--source={index_assets['source']}", f"--output_dir={output}",
               "--strategy=multi_worker", "--shard_size=16", "--wait_timeout_s=120"]
    logs = run_local_workers(lambda i: command, timeout_s=TIMEOUT_S, cwd=ROOT)
    assert "Indexed 72 images of 12 classes" in logs[0]
    assert "Wrote this worker's shards" in logs[1]
    assert sorted(os.listdir(tmp_path)) == ["mw.index"]  # the shards were merged and removed

    merged = GalleryIndex.load(output)
    single = build_index(index_assets["model"], index_assets["source"])
    assert merged.model == single.model
    assert merged.labels.tolist() == single.labels.tolist()
    assert merged.paths.tolist() == single.paths.tolist()
    np.testing.assert_allclose(merged.embeddings, single.embeddings, atol=1e-6)
    np.testing.assert_array_equal(merged.query(single.embeddings, k=5).indices,
                                  single.query(single.embeddings, k=5).indices)
