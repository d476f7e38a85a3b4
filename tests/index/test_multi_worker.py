"""A 2-worker build on 127.0.0.1 (TF_CONFIG) merges into the one-process index."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from kdml.distribute import local_cluster
from kdml.index import GalleryIndex, build_index

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240  # two TensorFlow start-ups; ~20 s on an idle 2-core machine


@pytest.mark.slow
def test_two_workers_build_the_one_process_index(index_assets, tmp_path):
    output = str(tmp_path / "mw.index")
    command = [sys.executable, "-m", "kdml.index", "build", f"--model={index_assets['model']}",
               f"--source={index_assets['source']}", f"--output={output}",
               "--strategy=multi_worker", "--shard_size=16", "--wait_timeout_s=120"]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    workers = [subprocess.Popen(command, cwd=ROOT, env={**env, "TF_CONFIG": tf_config},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for tf_config in local_cluster(2)]
    deadline, logs = time.monotonic() + TIMEOUT_S, []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=max(1, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for i, worker in enumerate(workers):
        assert worker.returncode == 0, f"worker {i}: {logs[i][-3000:] if i < len(logs) else 'timed out'}"
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
