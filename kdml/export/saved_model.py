"""SavedModel export with a named serving signature.

`serving_default`: `images` uint8 `(None, H, W, 3)` RGB in [0, 255] -> `embeddings`
float32 `(None, d)`, L2-normalised; with a gallery, also `search` (top-k gallery rows and
cosines, `kdml.export.search`). Written with Keras 3's `keras.export.ExportArchive`
(`model.export(format="tf_saved_model")` names its input after the Keras input and
keeps its float32 dtype; the archive lets us fix the uint8 `images` spec and the
output key while still tracking the model's variables).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kdml.embedding.loading import INPUT_NAME, OUTPUT_NAME, SERVING_SIGNATURE

SEARCH_SIGNATURE = "search"


def serving_function(embedder: keras.Model):
    """The function both exporters trace: uint8 images -> {"embeddings": float32 (B, d)}."""
    height, width = embedder.input_shape[1:3]
    spec = tf.TensorSpec((None, height, width, 3), tf.uint8, name=INPUT_NAME)

    def serve(images):
        embeddings = embedder(tf.cast(images, tf.float32), training=False)
        return {OUTPUT_NAME: tf.cast(embeddings, tf.float32)}

    return serve, spec


def export_saved_model(embedder: keras.Model, path: str, search=None) -> str:
    """Writes `embedder` as a SavedModel directory at `path` (see module docstring).

    `search`: optional `(serve, spec, variables)` of `kdml.export.search.search_function`,
    added as the `search` signature.
    """
    _check_embedder(embedder)
    serve, spec = serving_function(embedder)
    archive = keras.export.ExportArchive()
    archive.track(embedder)
    archive.add_endpoint(SERVING_SIGNATURE, serve, input_signature=[spec])
    if search is not None:
        search_serve, search_spec, variables = search
        holder = tf.Module()
        holder.gallery = variables  # tracked: saved with the SavedModel
        archive.track(holder)
        archive.add_endpoint(SEARCH_SIGNATURE, search_serve, input_signature=[search_spec])
    archive.write_out(path, verbose=False)
    return path


def _check_embedder(embedder: keras.Model) -> None:
    shape = embedder.input_shape
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[-1] != 3 or None in shape[1:3]:
        raise ValueError(
            "Export needs an embedder with one fixed-size RGB image input (B, H, W, 3), as "
            f"`kdml.models.build_embedder` makes. Received: input_shape={shape}")
    if len(embedder.output_shape) != 2:
        raise ValueError(
            f"Export needs an embedder with output (B, d). Received: {embedder.output_shape}")
