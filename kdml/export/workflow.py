"""`run_export`: the work of `python -m kdml.export` as a function (export, then parity)."""

from __future__ import annotations

import json
import os

from kdml import layers, losses, optimizers, regularizers  # noqa: F401  register kdml's classes
from kdml.data.sources import load_dataset
from kdml.embedding import load_embedder, model_fingerprint
from kdml.export.exporter import export_embedder
from kdml.export.images import calibration_images, heldout_images
from kdml.export.parity import format_parity_table, parity_report
from kdml.export.search import GALLERY_DTYPES, load_search_gallery


def _run_config(model_path: str) -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get("config") or {}


def run_export(model_path: str, output_dir=None, formats=("saved_model", "tflite"),
               quantizations=("float32", "float16", "dynamic", "int8"), dataset=None,
               eval_dataset=None, data_dir=None, calibration_count=300, parity_images=2000,
               latency_runs=50, max_recall_drop=1.0, parity=True, seed=0, gallery=None,
               gallery_dtype="float16", search_k=5, allow_model_mismatch=False):
    """The CLI's work as a function: export, then (optionally) the parity report.

    `gallery`: a `kdml.index` directory built by this model: adds the search model
    (`kdml.export.search`: the SavedModel's `search` signature and
    `embedder_<quantization>_search.tflite`), its gallery stored as `gallery_dtype`,
    returning `search_k` results. The gallery is checked (model fingerprint, size, empty,
    NaN) before anything is written.

    Returns:
        (paths {key: path}, report dict or None).
    """
    import keras

    if not os.path.isfile(model_path) or not model_path.endswith(".keras"):
        raise FileNotFoundError(f"No .keras embedder at {model_path}. Pass --model=<run>/embedder.keras.")
    config = _run_config(model_path)
    dataset = dataset or config.get("dataset") or "synthetic"
    eval_dataset = eval_dataset or config.get("eval_dataset")
    crop = config.get("eval_crop_fraction") or 0.875
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(model_path)), "export")
    search = None
    if gallery is not None:
        if gallery_dtype not in GALLERY_DTYPES:
            raise ValueError(f"Expected --search_gallery in {GALLERY_DTYPES}. Received: "
                             f"{gallery_dtype!r}")
        if isinstance(search_k, bool) or int(search_k) < 1:
            raise ValueError(f"Expected --search_k >= 1. Received: {search_k}")
        model_entry = model_fingerprint(load_embedder(model_path))
        index = load_search_gallery(gallery, model_entry,
                                    allow_model_mismatch=allow_model_mismatch)
        search = {"index": index, "gallery_dtype": gallery_dtype, "k": int(search_k),
                  "model": model_entry}
    embedder = keras.saving.load_model(model_path, compile=False)
    image_size = int(embedder.input_shape[1])
    needs_data = parity or ("tflite" in formats and "int8" in quantizations)
    splits = None
    if needs_data:
        splits = load_dataset(dataset, eval_spec=eval_dataset, data_dir=data_dir,
                              seed=config.get("seed", seed))
    calibration = None
    if "tflite" in formats and "int8" in quantizations:
        calibration = calibration_images(splits.train, image_size, calibration_count, seed, crop)
    variants = ", ".join(f for f in formats if f != "tflite")
    if "tflite" in formats:
        variants = ", ".join(filter(None, [variants, f"tflite {'/'.join(quantizations)}"]))
    print(f"Exporting {model_path} ({variants}) to {output_dir}")
    paths = export_embedder(embedder, output_dir, formats=formats, quantizations=quantizations,
                            calibration_images=calibration, backbone=config.get("backbone"),
                            source=os.path.abspath(model_path), search=search)

    def print_paths():
        for key, path in paths.items():
            print(f"Wrote {key}: {path}")

    if not parity:
        print_paths()
        return paths, None
    images, labels = heldout_images(splits.test, image_size, parity_images, seed, crop)
    output = os.path.join(output_dir, "parity.json")
    try:
        embedders = {key: path for key, path in paths.items() if not key.startswith("search_")}
        report = parity_report(model_path, embedders, images, labels, latency_runs=latency_runs,
                               max_recall_drop=max_recall_drop, output=output, seed=seed)
    finally:
        if os.path.isfile(output):
            with open(output) as f:
                print(format_parity_table(json.load(f)))
        print_paths()
        if os.path.isfile(output):
            print(f"Wrote {output}")
    return paths, report
