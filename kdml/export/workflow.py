"""`run_export`: the work of `python -m kdml.export` as a function (export, then parity)."""

from __future__ import annotations

import json
import os
import warnings

from kdml import layers, losses, optimizers, regularizers  # noqa: F401  register kdml's classes
from kdml.data.sources import load_dataset
from kdml.embedding import (embed_image_set, load_embedder, load_source, load_uint8,
                            model_fingerprint)
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


def _search_calibration(threshold: dict, model_path: str, source=None, data_dir=None):
    """The calibration data of an index's threshold, embedded for its re-check on each
    search model (`export_embedder`'s `search["calibration"]`); None, with one warning,
    when the index's recorded source cannot be read (an explicit `source` must be)."""
    recorded = threshold.get("calibration") or {}
    spec = source or recorded.get("source") or threshold.get("source")
    crop = float(recorded.get("crop_fraction", 0.875))
    try:
        image_set = load_source(spec, split=recorded.get("split", "all"), data_dir=data_dir,
                                seed=recorded.get("seed", 0))
    except (ValueError, FileNotFoundError, OSError) as error:
        if source is not None:
            raise
        warnings.warn(
            f"the search models keep the index's threshold {threshold['value']:.4f} "
            f"unchecked: its calibration data {spec!r} cannot be read ({error}); pass "
            "--search_calibration=<labelled source> to re-check it on each model.",
            stacklevel=3)
        return None
    embedder = load_embedder(model_path)
    images = load_uint8(image_set, int(embedder.image_size[0]), crop)
    return {"labels": image_set.labels, "source": spec,
            "reference": embed_image_set(embedder, image_set, crop_fraction=crop),
            "keras": embedder.embed(images),
            "embed": lambda path: load_embedder(path).embed(images)}


def _threshold_line(search_path: str) -> str:
    """What a search model's sidecar says of its threshold, in one line ("" for none)."""
    with open(search_path + ".json") as f:
        t = (json.load(f).get("search") or {}).get("threshold")
    if not t:
        return ""
    if not t.get("checked"):
        return f"threshold cosine >= {t['value']:.6f}: the index's, not re-checked"
    return (f"threshold cosine >= {t['value']:.6f} (index {t['index_value']:.6f}; limited by "
            f"{t['limited_by']}): precision {t['precision']:.4f}, recall {t['recall']:.4f}, "
            f"FAR {t['far']:.2e}, accepts {100 * t['acceptance']:.1f} % of "
            f"{t['queries']:,} calibration queries")


def run_export(model_path: str, output_dir=None, formats=("saved_model", "tflite"),
               quantizations=("float32", "float16", "dynamic", "int8"), dataset=None,
               eval_dataset=None, data_dir=None, calibration_count=300, parity_images=2000,
               latency_runs=50, max_recall_drop=1.0, parity=True, seed=0, gallery=None,
               gallery_dtype="float16", search_k=5, allow_model_mismatch=False,
               search_calibration=None):
    """The CLI's work as a function: export, then (optionally) the parity report.

    `gallery`: a `kdml.index` directory built by this model: adds the search model
    (`kdml.export.search`: the SavedModel's `search` signature and
    `embedder_<quantization>_search.tflite`), its gallery stored as `gallery_dtype`,
    returning `search_k` results. The gallery is checked (model fingerprint, size, empty,
    NaN) before anything is written. An index threshold is re-checked on each search
    model (`kdml.export.search.check_search_threshold`) against its calibration data:
    `search_calibration` (a labelled source spec), default the one the index records.

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
        if index.threshold:
            search["calibration"] = _search_calibration(index.threshold, model_path,
                                                        search_calibration, data_dir)
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
            if key.startswith("search_"):
                line = _threshold_line(path)
                if line:
                    print(f"  {line}")

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
