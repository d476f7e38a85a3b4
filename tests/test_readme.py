"""The front page's plain-Keras example runs as written, and what it prints is right."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keras_example():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    match = re.search(r"<!-- keras-example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its <!-- keras-example --> block"
    return match.group(1)


def _numpy_leave_one_out_recall_at_1(embeddings, labels):
    """Share of images whose most cosine-similar other image has their label."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarities = unit @ unit.T
    np.fill_diagonal(similarities, -np.inf)
    return float(np.mean(labels[np.argmax(similarities, axis=1)] == labels))


def test_readme_keras_example_trains_evaluates_and_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_keras_example(), "README.md", "exec"), namespace)
    embeddings = namespace["embeddings"]
    labels = np.asarray(namespace["splits"].test.labels)
    metrics = namespace["metrics"]

    # one embedding per test image, L2-normalised, and the printed Recall@1 is the
    # leave-one-out nearest-neighbour accuracy computed independently here
    assert embeddings.shape == (len(labels), 128)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # (a float32 near-tie may flip between TensorFlow's and NumPy's matmul: allow 2 queries)
    np.testing.assert_allclose(
        metrics["recall@1"], _numpy_leave_one_out_recall_at_1(embeddings, labels),
        atol=2.0 / len(labels))
    assert 0.0 < metrics["map@r"] <= metrics["r_precision"] <= 1.0

    # the saved file reloads (after `import kdml`) to the same function
    import keras

    reloaded = keras.saving.load_model(str(tmp_path / "embedder.keras"))
    x = np.random.default_rng(0).uniform(0, 255, (2, 28, 28, 3)).astype(np.float32)
    np.testing.assert_allclose(reloaded(x).numpy(), namespace["embedder"](x).numpy(), atol=1e-6)


def _readme_lines():
    return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()


def test_readme_is_a_front_page():
    """At most 200 lines, of which at most 150 are written by hand (the rest: the blocks
    `python -m kdml.benchmark report` generates); detail belongs in docs/."""
    lines = _readme_lines()
    generated, inside = 0, False
    for line in lines:
        if re.fullmatch(r"<!-- results(:\w+)?:start -->", line):
            inside = True
        if inside:
            generated += 1
        if re.fullmatch(r"<!-- results(:\w+)?:end -->", line):
            inside = False
    assert not inside, "README.md has a results block without its end marker"
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    assert len(lines) - generated <= 150, (
        f"README.md has {len(lines) - generated} hand-written lines; move detail to docs/")


def test_readme_starts_with_the_two_commands():
    """The first code block is `make train` and `make test` (tests/test_docs_commands.py
    checks that both targets exist)."""
    text = "\n".join(_readme_lines())
    first_block = re.search(r"```\w*\n(.*?)```", text, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert commands == ["make train", "make test"]
