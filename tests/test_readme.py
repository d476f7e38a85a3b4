"""The README's plain-Keras example runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keras_example():
    readme = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(r"<!-- keras-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its <!-- keras-example --> block"
    return match.group(1)


def test_readme_keras_example_trains_evaluates_and_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_keras_example(), "README.md", "exec"), namespace)
    metrics = namespace["metrics"]
    assert 0.0 <= metrics["recall@1"] <= 1.0 and "map@r" in metrics
    assert os.path.exists(tmp_path / "embedder.keras")
    import keras
    import numpy as np

    reloaded = keras.saving.load_model("embedder.keras")
    x = np.zeros((2, 28, 28, 3), np.float32)
    np.testing.assert_allclose(reloaded(x).numpy(), namespace["embedder"](x).numpy(), atol=1e-6)
