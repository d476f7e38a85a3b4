"""`load_embedder`: one interface over the three embedder formats kdml writes.

`.keras` (what `python -m kdml.train` writes), a SavedModel directory and a `.tflite`
file (what `python -m kdml.export` writes) all load as a `LoadedEmbedder` whose
`embed(images)` takes RGB pixels `(N, H, W, 3)` in [0, 255] and returns float32
`(N, d)` embeddings. `python -m kdml.evaluate`, `kdml.index` and the export parity
report use it; `load_image_embedder` adds the check they need (a fixed square input).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from kdml import layers, losses, optimizers, regularizers  # noqa: F401  register kdml's classes
from kdml.embedding.metadata import read_sidecar, read_tflite_metadata
from kdml.quiet_startup import native_output_hidden

FORMATS = ("keras", "saved_model", "tflite")
SERVING_SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"


class LoadedEmbedder:
    """An embedder loaded from a `.keras` file, a SavedModel or a `.tflite` file.

    Attributes:
        format: "keras" | "saved_model" | "tflite".
        path: the file or directory it was loaded from.
        image_size: (H, W) of the input.
        embedding_dim: d.
        input_dtype: numpy dtype the file's input takes (images are cast to it).
        metadata: the kdml metadata (sidecar JSON or TFLite entry), or None.
    """

    def __init__(self, fmt: str, path: str, image_size: Tuple[int, int], embedding_dim: int,
                 input_dtype, run, metadata: Optional[dict] = None, model=None):
        self.format = fmt
        self.path = path
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.embedding_dim = int(embedding_dim)
        self.input_dtype = np.dtype(input_dtype)
        self.metadata = metadata
        self.model = model  # the keras.Model, the SavedModel object or the Interpreter
        self._run = run

    def __repr__(self):
        return (f"LoadedEmbedder(format={self.format!r}, image_size={self.image_size}, "
                f"embedding_dim={self.embedding_dim}, path={self.path!r})")

    def check_images(self, images) -> np.ndarray:
        """`images` as an `(N, H, W, 3)` array of the file's input dtype; ValueError otherwise."""
        images = np.asarray(images)
        height, width = self.image_size
        expected = f"(N, {height}, {width}, 3) RGB in [0, 255], uint8 or float"
        if images.ndim == 3:
            raise ValueError(
                f"Expected a batch of images {expected}. Received one image of shape "
                f"{images.shape}: add a batch axis (images[None]).")
        if images.ndim != 4 or images.shape[1:3] != (height, width) or images.shape[3] != 3:
            raise ValueError(
                f"Expected images of shape {expected}. Received: shape={images.shape}. "
                "Resize (and convert grayscale / RGBA to RGB) before embedding.")
        if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"Expected {expected}. Received: dtype={images.dtype}")
        if images.size and np.issubdtype(images.dtype, np.number):
            low, high = images.min(), images.max()
            if low < 0 or high > 255:
                raise ValueError(
                    f"Expected pixel values in [0, 255]. Received values in [{low}, {high}]; "
                    "pass raw pixels, not normalised ones.")
        if self.input_dtype == np.uint8 and not np.issubdtype(images.dtype, np.integer):
            images = np.round(images)
        return images.astype(self.input_dtype, copy=False)

    def embed(self, images, batch_size: int = 64) -> np.ndarray:
        """`(N, H, W, 3)` RGB pixels in [0, 255] -> float32 `(N, d)` embeddings."""
        images = self.check_images(images)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: {batch_size}")
        out = [np.asarray(self._run(images[i:i + batch_size]), dtype=np.float32)
               for i in range(0, len(images), batch_size)]
        if not out:
            return np.zeros((0, self.embedding_dim), np.float32)
        return np.concatenate(out, axis=0)


def detect_format(path: str) -> str:
    """"keras", "saved_model" or "tflite" from the path; ValueError when none fits."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return "saved_model"
        raise ValueError(f"{path} is a directory without saved_model.pb: not a SavedModel.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No embedder at {path}.")
    if path.endswith(".keras"):
        return "keras"
    if path.endswith(".tflite"):
        return "tflite"
    raise ValueError(
        f"Cannot tell the format of {path}: expected a .keras file, a .tflite file or a "
        "SavedModel directory.")


def load_embedder(path: str, num_threads: Optional[int] = None) -> LoadedEmbedder:
    """Loads an embedder from a `.keras` file, a SavedModel directory or a `.tflite` file.

    Args:
        path: the file or directory.
        num_threads: LiteRT interpreter threads (`.tflite` only; None: LiteRT's default).

    Returns:
        A `LoadedEmbedder`.
    """
    fmt = detect_format(path)
    return {"keras": _load_keras, "saved_model": _load_saved_model,
            "tflite": lambda p: load_tflite(p, num_threads)}[fmt](path)


def load_image_embedder(path: str) -> LoadedEmbedder:
    """`load_embedder(path)` of an image embedder with a fixed `(N, H, W, 3)` input.

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: an input size that is not fixed.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No model at {path}. Pass --model=<path>/embedder.keras, a SavedModel "
            "directory or a .tflite file.")
    embedder = load_embedder(path)
    size = tuple(embedder.image_size)
    if len(size) != 2 or any(s is None for s in size):
        raise ValueError(
            f"The model at {path} takes inputs of shape (N, {size}): kdml.evaluate "
            "needs an image embedder with a fixed (N, S, S, 3) RGB input.")
    return embedder


def _load_keras(path: str) -> LoadedEmbedder:
    import keras

    model = keras.saving.load_model(path, compile=False)
    height, width = model.input_shape[1:3]

    def run(batch):
        return keras.ops.convert_to_numpy(model(batch.astype(np.float32), training=False))

    return LoadedEmbedder("keras", path, (height, width), model.output_shape[-1], np.float32,
                          run, metadata=None, model=model)


def _load_saved_model(path: str) -> LoadedEmbedder:
    import tensorflow as tf

    with native_output_hidden():  # oneDNN's "supports DT_HALF only on ... AVX-512" note
        loaded = tf.saved_model.load(path)
    if SERVING_SIGNATURE not in loaded.signatures:
        raise ValueError(f"SavedModel {path} has no {SERVING_SIGNATURE!r} signature.")
    signature = loaded.signatures[SERVING_SIGNATURE]
    _, inputs = signature.structured_input_signature
    if len(inputs) != 1:
        raise ValueError(f"SavedModel {path}: expected one image input. Received: {inputs}")
    input_name, spec = next(iter(inputs.items()))
    outputs = signature.structured_outputs
    output_name = OUTPUT_NAME if OUTPUT_NAME in outputs else next(iter(outputs))
    height, width = spec.shape[1:3]
    dtype = spec.dtype.as_numpy_dtype

    state = {"called": False}

    def run(batch):
        if state["called"]:
            return signature(**{input_name: tf.constant(batch)})[output_name].numpy()
        with native_output_hidden():  # the first call optimises the graph (oneDNN's note)
            out = signature(**{input_name: tf.constant(batch)})[output_name].numpy()
        state["called"] = True
        return out

    return LoadedEmbedder("saved_model", path, (height, width),
                          outputs[output_name].shape[-1], dtype, run,
                          metadata=read_sidecar(path), model=loaded)


def load_tflite(path: str, num_threads: Optional[int] = None) -> LoadedEmbedder:
    """A `.tflite` embedder on the LiteRT interpreter (`ai_edge_litert`)."""
    from ai_edge_litert.interpreter import Interpreter

    with open(path, "rb") as f:
        content = f.read()
    with native_output_hidden():  # LiteRT's "Created TensorFlow Lite XNNPACK delegate"
        interpreter = Interpreter(model_content=content, num_threads=num_threads)
        interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    if len(inp["shape"]) != 4 or inp["shape"][-1] != 3:
        raise ValueError(f"{path}: expected an image input (N, H, W, 3). Received: {inp['shape']}")
    height, width = (int(s) for s in inp["shape"][1:3])
    state = {"batch": None}

    def run(batch):
        if state["batch"] != len(batch):
            interpreter.resize_tensor_input(inp["index"], [len(batch), height, width, 3])
            interpreter.allocate_tensors()
            state["batch"] = len(batch)
        interpreter.set_tensor(inp["index"], np.ascontiguousarray(batch))
        interpreter.invoke()
        result = interpreter.get_tensor(out["index"])
        if out["dtype"] != np.float32:  # a quantized output: dequantize
            scale, zero_point = out["quantization"]
            result = (result.astype(np.float32) - zero_point) * scale
        return result.copy()

    metadata = read_tflite_metadata(content) or read_sidecar(path)
    return LoadedEmbedder("tflite", path, (height, width), int(out["shape"][-1]), inp["dtype"],
                          run, metadata=metadata, model=interpreter)
