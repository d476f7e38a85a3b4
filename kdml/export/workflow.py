"""`run_export`: the work of `python -m kdml.export` as a function (export, then parity)."""

from __future__ import annotations

import json
import os


def _run_config(model_path: str) -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "metrics.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f).get("config") or {}


def run_export(model_path: str, output_dir=None, formats=("saved_model", "tflite"),
               quantizations=("float32", "float16", "dynamic", "int8"), dataset=None,
               eval_dataset=None, data_dir=None, calibration_count=300, parity_images=2000,
               latency_runs=50, max_recall_drop=1.0, parity=True, seed=0):
    """The CLI's work as a function: export, then (optionally) the parity report.

    Returns:
        (paths {key: path}, report dict or None).
    """
    import keras

    import kdml  # noqa: F401  registers kdml's serializable classes
    from kdml.data.sources import load_dataset
    from kdml.export.exporter import export_embedder
    from kdml.export.images import calibration_images, heldout_images
    from kdml.export.parity import format_parity_table, parity_report

    if not os.path.isfile(model_path) or not model_path.endswith(".keras"):
        raise FileNotFoundError(f"No .keras embedder at {model_path}. Pass --model=<run>/embedder.keras.")
    config = _run_config(model_path)
    dataset = dataset or config.get("dataset") or "synthetic"
    eval_dataset = eval_dataset or config.get("eval_dataset")
    crop = config.get("eval_crop_fraction") or 0.875
    output_dir = output_dir or os.path.join(os.path.dirname(os.path.abspath(model_path)), "export")
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
                            source=os.path.abspath(model_path))

    def print_paths():
        for key, path in paths.items():
            print(f"Wrote {key}: {path}")

    if not parity:
        print_paths()
        return paths, None
    images, labels = heldout_images(splits.test, image_size, parity_images, seed, crop)
    output = os.path.join(output_dir, "parity.json")
    try:
        report = parity_report(model_path, paths, images, labels, latency_runs=latency_runs,
                               max_recall_drop=max_recall_drop, output=output, seed=seed)
    finally:
        if os.path.isfile(output):
            with open(output) as f:
                print(format_parity_table(json.load(f)))
        print_paths()
        if os.path.isfile(output):
            print(f"Wrote {output}")
    return paths, report
