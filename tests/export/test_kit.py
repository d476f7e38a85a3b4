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
    out["fingerprint"] = embedder.fingerprint
    # a directory without index.json (a write killed before its rename) is refused
    import shutil
    partial = os.path.join(work, "partial.index")
    shutil.copytree(prefix, partial)
    os.remove(os.path.join(partial, "index.json"))
    try:
        kit.CosineIndex.load(partial)
    except ValueError as error:
        out["partial_error"] = str(error)
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
    assert "its write was interrupted" in out["partial_error"]

    # kdml reads the kit's index directory, and fingerprints the .tflite the same way
    from kdml.index import GalleryIndex, build_index, model_fingerprint

    kit_index = GalleryIndex.load(str(tmp_path / "index"))
    assert len(kit_index) == 40 and kit_index.labels[:3].tolist() == out["index_labels"]
    assert kit_index.model["fingerprint"] == out["fingerprint"] == \
        model_fingerprint(load_embedder(model))["fingerprint"]
    np.testing.assert_allclose(np.linalg.norm(kit_index.embeddings, axis=1), 1.0, atol=1e-6)

    # the kit reads (and queries) an index `kdml.index` built with the same .tflite file
    kdml_index = build_index(model, f"folder:{tmp_path / 'gallery'}", str(tmp_path / "kdml.index"))
    want = kdml_index.query(kdml_index.embeddings[:3], k=4)
    code = _BLOCK.format(kit=os.path.join(REPO, "export")) + _READ_KDML_INDEX.format(
        index=str(tmp_path / "kdml.index"), model=model)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    read = json.loads(result.stdout.strip().splitlines()[-1])
    assert read["count"] == 40
    for row, want_paths, want_scores in zip(read["hits"], want.paths, want.similarities):
        assert [h[1] for h in row] == want_paths.tolist()
        np.testing.assert_allclose([h[2] for h in row], want_scores, atol=1e-5)
    # a model of another size (the float32 file has the same size, so: a mismatch by name)
    assert "but the query model is" in read["mismatch_error"]
    assert "\n" not in read["mismatch_error"]


_READ_KDML_INDEX = textwrap.dedent("""
    import json
    import numpy as np
    import kdml_litert as kit

    index = kit.CosineIndex.load({index!r})
    hits = index.query(index.embeddings[:3], k=4)
    embedder = kit.Embedder({model!r}, num_threads=1)
    index.check_model(embedder)
    index.model["fingerprint"] = "0" * 16
    try:
        index.check_model(embedder)
    except ValueError as error:
        mismatch = str(error)
    print(json.dumps({{"count": len(index), "hits": hits, "mismatch_error": mismatch}}))
""")


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
