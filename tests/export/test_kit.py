"""The `export/` kit runs with TensorFlow and kdml unimportable (a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs first in the subprocess: any `import tensorflow` (or kdml, keras) raises ImportError.
_BLOCK = textwrap.dedent("""
    import sys
    for name in ("tensorflow", "kdml", "keras", "tf_keras"):
        sys.modules[name] = None
    sys.path.insert(0, {kit!r})
""")

_SCRIPT = textwrap.dedent("""
    import json, os
    import numpy as np
    import kdml_litert as kit
    from PIL import Image

    work = {work!r}
    images = np.load(os.path.join(work, "images.npy"))
    labels = np.load(os.path.join(work, "labels.npy"))
    embedder = kit.Embedder({model!r}, num_threads=1)
    out = {{"image_size": embedder.image_size, "embedding_dim": embedder.embedding_dim,
           "metadata": embedder.metadata}}
    np.save(os.path.join(work, "kit.npy"), embedder.embed(images, batch_size=7))
    out["one"] = embedder.embed(images[0]).shape
    errors = []
    for bad in (images[:, :-1], images[..., :1], images.astype(np.float32), images[0, 0]):
        try:
            embedder.embed(bad)
        except ValueError as error:
            errors.append(str(error))
    out["errors"] = errors
    # a gallery folder of PNG files, one subfolder per label
    gallery = os.path.join(work, "gallery")
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(gallery, str(label)), exist_ok=True)
        Image.fromarray(image).save(os.path.join(gallery, str(label), f"{{i:03d}}.png"))
    prefix = os.path.join(work, "index")
    code = kit.main(["index", "--model", {model!r}, "--gallery", gallery, "--index", prefix])
    index = kit.CosineIndex.load(prefix)
    out["index_code"], out["index_size"] = code, len(index)
    paths = index.paths[:3]
    hits = index.query(embedder.embed_files(paths), k=4)
    out["hits"] = [[list(h) for h in row] for row in hits]
    out["paths"] = paths
    out["index_labels"] = index.labels[:3]
    out["tensorflow_blocked"] = True
    try:
        import tensorflow  # noqa: F401
        out["tensorflow_blocked"] = False
    except ImportError:
        pass
    print(json.dumps(out))
""")


def test_kit_runs_without_tensorflow(exported, tmp_path):
    model = exported["paths"]["tflite_int8"]
    images, labels = exported["images"][:40], exported["labels"][:40]
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    code = _BLOCK.format(kit=os.path.join(REPO, "export")) + _SCRIPT.format(
        work=str(tmp_path), model=model)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tensorflow_blocked"]
    assert out["image_size"] == [28, 28] and out["embedding_dim"] == 32
    assert out["metadata"]["quantization"] == "int8" and out["metadata"]["embedding_dim"] == 32

    # same embeddings as kdml's LiteRT loader, renormalised to unit length
    from kdml.export import load_embedder

    expected = load_embedder(model).embed(images)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(tmp_path / "kit.npy"), expected, atol=1e-6)
    assert out["one"] == [1, 32]

    wrong_size, wrong_channels, wrong_dtype, wrong_rank = out["errors"]
    for message in out["errors"]:
        assert "(N, 28, 28, 3) uint8" in message
    assert "shape=(40, 27, 28, 3)" in wrong_size
    assert "grayscale / RGBA" in wrong_channels
    assert "dtype=float32" in wrong_dtype
    assert "shape=(28, 3)" in wrong_rank

    # the index: 40 PNGs, and each gallery image finds itself first (cosine 1)
    assert out["index_code"] == 0 and out["index_size"] == 40
    for path, label, hits in zip(out["paths"], out["index_labels"], out["hits"]):
        assert hits[0][0] == label and hits[0][1] == path
        assert abs(hits[0][2] - 1.0) < 1e-5
        scores = [h[2] for h in hits]
        assert scores == sorted(scores, reverse=True)
    assert os.path.isfile(tmp_path / "index.npy")
    with open(tmp_path / "index.json") as f:
        assert len(json.load(f)["labels"]) == 40


def test_kit_cosine_index_against_numpy(rng):
    sys.path.insert(0, os.path.join(REPO, "export"))
    try:
        import kdml_litert as kit
    finally:
        sys.path.pop(0)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    index = kit.CosineIndex(gallery * 3.0, [f"c{i % 4}" for i in range(30)])
    hits = index.query(queries, k=3)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ \
        (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).T
    for q, row in enumerate(hits):
        best = np.argsort(-cos[q])[:3]
        assert [h[0] for h in row] == [f"c{j % 4}" for j in best]
        np.testing.assert_allclose([h[2] for h in row], cos[q, best], rtol=1e-5)
