"""What a new user has after an hour, for the bad-input and agreement tests: an
embedder, a nested gallery folder (`alpha<a>/char<c>/<i>.png`), its index with a
threshold, the float32 `.tflite` and its search model, and one file of each bad kind.

The embedder is linear (rescale to [-1, 1], flatten, dense, L2 norm) and each class is
a random 16 x 16 image plus small noise, so same-class cosines sit near 1 and others
near 0: rankings do not hinge on 1e-3 differences (a float16 gallery's error), and every
tool sees the same pixels (16 px files, `--crop_fraction=1`).
"""

import os

import keras
import numpy as np
import pytest

import kdml

IMAGE_SIZE, EMBEDDING_DIM, SEARCH_K = 16, 16, 5


def write_bad_files(folder) -> dict:
    """`{kind: path}`: corrupt (truncated PNG), text named .png, zero bytes, missing; and
    the valid-but-unusual grayscale and 16-bit RGB / grayscale PNGs."""
    import tensorflow as tf
    from PIL import Image

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    png = tf.io.encode_png(pixels).numpy()
    files = {name: os.path.join(folder, f"{name}.png") for name in (
        "corrupt", "text", "empty", "gray", "rgb16", "gray16", "missing")}
    with open(files["corrupt"], "wb") as f:
        f.write(png[: len(png) // 2])
    with open(files["text"], "w") as f:
        f.write("<html>not an image</html>\n")
    open(files["empty"], "wb").close()
    Image.fromarray(pixels[..., 0], "L").save(files["gray"])
    wide = rng.integers(0, 65536, (20, 20, 3)).astype(np.uint16)
    tf.io.write_file(files["rgb16"], tf.io.encode_png(tf.constant(wide)))
    Image.fromarray(wide[..., 0]).save(files["gray16"])  # mode I;16
    return files


def write_noise_gallery(root, *, num_classes=8, per_class=4, seed=5) -> str:
    """`<root>/alpha<c // 4>/char<c % 4>/<c>_<i>.png`: class c is a random RGB image,
    each of its images that plus Gaussian noise (sigma 12); returns `str(root)`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        base = rng.uniform(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3))
        folder = os.path.join(str(root), f"alpha{c // 4}", f"char{c % 4:02d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.round(base + rng.normal(0, 12, base.shape)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{c}_{i}.png"))
    return str(root)


@pytest.fixture(scope="session")
def newcomer(tmp_path_factory):
    from kdml.export.workflow import run_export
    from kdml.index import build_index

    root = tmp_path_factory.mktemp("newcomer")
    keras.utils.set_random_seed(0)
    embedder = keras.Sequential([
        keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.Rescaling(1 / 127.5, -1.0),
        keras.layers.Flatten(), keras.layers.Dense(EMBEDDING_DIM),
        kdml.layers.L2Normalization()])
    keras_path = str(root / "embedder.keras")
    embedder.save(keras_path)
    gallery = write_noise_gallery(root / "gallery")
    index_dir = str(root / "gallery.index")
    index = build_index(keras_path, f"folder:{gallery}", index_dir, crop_fraction=1.0)
    # the threshold: mid-way in the widest gap between the cosines the queries see
    seen = np.sort(np.asarray(index.query(index.embeddings, k=SEARCH_K + 2)
                              .similarities)[:, 1:].ravel())  # column 0: the item itself
    cut = int(np.argmax(np.diff(seen)))
    assert seen[cut + 1] - seen[cut] > 0.1, seen
    index.set_threshold({"threshold": float((seen[cut] + seen[cut + 1]) / 2)}, "test")
    index.save(index_dir)
    paths, _ = run_export(keras_path, str(root / "export"), formats=("tflite",),
                          quantizations=("float32",), dataset="synthetic", calibration_count=16,
                          parity=False, latency_runs=0, gallery=index_dir, search_k=SEARCH_K)
    return {"root": root, "keras": keras_path, "gallery": gallery, "index": index_dir,
            "tflite": paths["tflite_float32"], "search": paths["search_float32"],
            "bad": write_bad_files(root / "bad"), "threshold": index.threshold["value"]}
