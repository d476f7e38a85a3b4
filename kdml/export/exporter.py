"""`export_embedder`: a Keras embedder -> SavedModel and TFLite files with their metadata."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Dict, Optional, Sequence

import keras
import numpy as np

from kdml import layers, losses, optimizers, regularizers  # noqa: F401  register kdml's classes
from kdml.embedding.metadata import embed_tflite_metadata, embedder_metadata, write_sidecar
from kdml.export.saved_model import export_saved_model
from kdml.export.search import (append_search, check_search_threshold, encode_gallery,
                                search_filename, search_function, search_metadata)
from kdml.export.tflite import QUANTIZATIONS, check_builtin_ops, convert_saved_model
from kdml.quiet_startup import native_output_hidden

EXPORT_FORMATS = ("saved_model", "tflite")


def tflite_filename(quantization: str) -> str:
    return f"embedder_{quantization}.tflite"


def export_embedder(embedder, output_dir: str, *,
                    formats: Sequence[str] = EXPORT_FORMATS,
                    quantizations: Sequence[str] = QUANTIZATIONS,
                    calibration_images: Optional[np.ndarray] = None,
                    name: Optional[str] = None, backbone: Optional[str] = None,
                    source: Optional[str] = None, search: Optional[dict] = None
                    ) -> Dict[str, str]:
    """Exports an embedder as a SavedModel and/or `.tflite` files.

    Args:
        embedder: a `keras.Model` `(B, H, W, 3)` pixels -> `(B, d)` (as
            `kdml.models.build_embedder` makes), or the path of its `.keras` file.
        output_dir: written: `saved_model/`, `embedder_<quantization>.tflite`, and a
            sidecar `<file>.json` with the metadata next to each.
        formats: subset of ("saved_model", "tflite").
        quantizations: TFLite variants, subset of ("float32", "float16", "dynamic", "int8").
        calibration_images: uint8 `(N, H, W, 3)` training images; required for "int8".
        name: the model name stored in the metadata (default: the model's name).
        backbone: the backbone's name, stored in the metadata when known.
        source: where the model came from (stored in the metadata).
        search: optional search model (`kdml.export.search`): `{"index": GalleryIndex
            (checked by `load_search_gallery`), "gallery_dtype": "float16" | "int8",
            "k": int, "model": the model's fingerprint entry, ["calibration": ...]}`.
            Adds the SavedModel's `search` signature and
            `embedder_<quantization>_search.tflite` per variant. With an index that
            holds a threshold, `"calibration"` re-checks it on each search model
            (`check_search_threshold`): `{"labels" (N,), "reference" (N, d) the index
            model's embeddings of the calibration images, "keras" (N, d) this
            embedder's embeddings of them as uint8 images, "embed": f(.tflite path) ->
            (N, d) the same through that file, "source": name}`; without it the
            index's threshold is copied, marked `"checked": False`, with a warning.

    Returns:
        {"saved_model": dir, "tflite_<quantization>": path, "search_<quantization>":
        path, ...}.
    """
    if isinstance(embedder, str):
        source = source or embedder
        embedder = keras.saving.load_model(embedder, compile=False)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"`formats` must be a non-empty subset of {EXPORT_FORMATS}. "
                         f"Received: {list(formats)}")
    if "tflite" in formats:
        bad = [q for q in quantizations if q not in QUANTIZATIONS]
        if bad or not quantizations:
            raise ValueError(f"`quantizations` must be a non-empty subset of {QUANTIZATIONS}. "
                             f"Received: {list(quantizations)}")
    height, width = embedder.input_shape[1:3]
    if "tflite" in formats and "int8" in quantizations:
        calibration_images = _check_calibration(calibration_images, (height, width))
    os.makedirs(output_dir, exist_ok=True)
    meta = dict(name=name or embedder.name, embedding_dim=embedder.output_shape[-1],
                image_size=(height, width), backbone=backbone, source=source)
    paths: Dict[str, str] = {}
    encoded = threshold = None
    if search is not None:
        encoded = encode_gallery(search["index"].embeddings, search.get("gallery_dtype",
                                                                        "float16"))
        if encoded["values"].shape[1] != meta["embedding_dim"]:
            raise ValueError(f"The gallery has {encoded['values'].shape[1]} columns, the "
                             f"embedder gives {meta['embedding_dim']}-d embeddings.")
        threshold = _model_threshold(search, encoded, "keras",
                                     lambda: search["calibration"]["keras"])
    keep = "saved_model" in formats
    saved_model_dir = (os.path.join(output_dir, "saved_model") if keep
                       else tempfile.mkdtemp(prefix="kdml_saved_model_"))
    try:
        if os.path.isdir(saved_model_dir) and keep:
            shutil.rmtree(saved_model_dir)
        # quiet command: hides oneDNN's C++ "DT_HALF only on platforms with AVX-512" line
        # that tracing the float16 gallery product prints on CPUs without AVX-512 FP16
        with native_output_hidden():
            export_saved_model(embedder, saved_model_dir, search=(
                search_function(embedder, encoded, search.get("k", 5),
                                threshold and threshold["value"])
                if encoded is not None and keep else None))
        if keep:
            write_sidecar(saved_model_dir, embedder_metadata(fmt="saved_model", **meta))
            paths["saved_model"] = saved_model_dir
        if "tflite" in formats:
            for quantization in quantizations:
                representative = None
                if quantization == "int8":
                    representative = lambda: (calibration_images[i:i + 1]  # noqa: E731
                                              for i in range(len(calibration_images)))
                model = convert_saved_model(saved_model_dir, quantization, representative)
                path = os.path.join(output_dir, tflite_filename(quantization))
                check_builtin_ops(model, path)
                metadata = embedder_metadata(fmt="tflite", quantization=quantization, **meta)
                with open(path, "wb") as f:
                    f.write(embed_tflite_metadata(model, metadata))
                write_sidecar(path, metadata)
                paths[f"tflite_{quantization}"] = path
                if encoded is not None:
                    checked = _model_threshold(search, encoded, quantization,
                                               lambda: search["calibration"]["embed"](path))
                    paths[f"search_{quantization}"] = _write_search(
                        model, encoded, search, checked, metadata, output_dir, quantization)
    finally:
        if not keep:
            shutil.rmtree(saved_model_dir, ignore_errors=True)
    return paths


def _model_threshold(search, encoded, name, queries) -> Optional[dict]:
    """The threshold entry of one search model (`name`: its embedder's quantization or
    "keras"): `check_search_threshold` on `queries()`, the calibration images through
    its embedder; the index's entry marked unchecked without calibration data; None
    without a threshold."""
    index_threshold = search["index"].threshold
    if not index_threshold:
        return None
    calibration = search.get("calibration")
    if calibration is None:
        return {**index_threshold, "checked": False}
    checked = check_search_threshold(index_threshold, queries(), calibration["reference"],
                                     calibration["labels"], encoded)
    if checked["limited_by"] == "unreachable" and name != "keras":
        target = ", ".join(f"{k} {v:g}" for k, v in checked["target"].items())
        warnings.warn(
            f"the {name} search model cannot reach the index's threshold target ({target}) "
            f"on {calibration.get('source', 'the calibration set')}: it stores cosine "
            f">= {checked['value']:.4f}, the lowest score of an exact duplicate there "
            f"(precision {checked['precision']:.4f}); export a less quantized variant, or "
            "relax the target.", stacklevel=3)
    return checked


def _write_search(embedder_model: bytes, encoded, search, threshold, metadata, output_dir,
                  quantization) -> str:
    """Writes `embedder_<quantization>_search.tflite` and its sidecar (temporary names,
    then renamed into place). `threshold`: this model's entry (`_model_threshold`)."""
    k = search.get("k", 5)
    model = append_search(embedder_model, encoded, k, threshold and threshold["value"])
    check_builtin_ops(model, search_filename(quantization))
    info = search_metadata(search["index"], encoded, k, model_entry=search.get("model"),
                           base={**metadata, "format": "tflite_search"}, threshold=threshold)
    path = os.path.join(output_dir, search_filename(quantization))
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(embed_tflite_metadata(model, info))
        write_sidecar(tmp, info)
        os.replace(tmp + ".json", path + ".json")
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".json"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def _check_calibration(images, image_size) -> np.ndarray:
    if images is None or len(images) == 0:
        raise ValueError(
            "int8 quantization needs calibration images: pass `calibration_images` (uint8 "
            "(N, H, W, 3) training images) or --dataset / --calibration_images on the CLI.")
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != (*image_size, 3):
        raise ValueError(f"`calibration_images` must have shape (N, {image_size[0]}, "
                         f"{image_size[1]}, 3). Received: {images.shape}")
    if images.dtype != np.uint8:
        images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return images

