"""Parity report: each exported file against the Keras embedder it came from.

For every file: its size, the mean and min cosine between its embeddings and the Keras
model's on held-out images, Recall@1 and MAP@R on the held-out classes for both
(`kdml.evaluation.retrieval_metrics`), and the latency per image on the LiteRT
interpreter (one thread, batch 1; `.tflite` files only).
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import numpy as np

from kdml.embedding import load_embedder, load_tflite
from kdml.evaluation import retrieval_metrics


class ParityError(ValueError):
    """An exported file lost more retrieval accuracy than allowed."""


def _size_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, f))
                   for root, _, files in os.walk(path) for f in files)
    return os.path.getsize(path)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tflite_latency_ms(path: str, images: np.ndarray, runs: int = 50, warmup: int = 5) -> float:
    """Median milliseconds per image on the LiteRT interpreter, 1 thread, batch 1."""
    embedder = load_tflite(path, num_threads=1)
    interpreter = embedder.model
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    batches = [embedder.check_images(images[i % len(images)][None]) for i in range(runs)]
    for _ in range(warmup):
        embedder.embed(batches[0])  # resizes the input to batch 1 and allocates
    times = []
    for x in batches:
        start = time.perf_counter()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        interpreter.get_tensor(out["index"])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def parity_report(keras_path: str, exported: Dict[str, str], images: np.ndarray,
                  labels: np.ndarray, *, latency_runs: int = 50,
                  max_recall_drop: Optional[float] = 1.0, output: Optional[str] = None,
                  seed: int = 0) -> dict:
    """Compares every exported file with the Keras embedder at `keras_path`.

    Args:
        keras_path: the `.keras` embedder the files were exported from.
        exported: {key: path} as `export_embedder` returns.
        images: uint8 `(N, H, W, 3)` held-out images; labels: `(N,)` their classes.
        latency_runs: images timed per `.tflite` file (0: skip latency).
        max_recall_drop: points of Recall@1 the int8 file may lose against Keras;
            None disables the check. Raised as `ParityError` after the report is written.
        output: JSON path for the report (None: not written).

    Returns:
        {"images": N, "classes": C, "keras": {...}, "files": {key: {...}}}; recall and
        MAP@R in percent, cosines in [-1, 1], sizes in bytes, latency in ms per image.
    """
    def metrics(embeddings):
        m = retrieval_metrics(embeddings, labels, ks=(1,), nmi=False, seed=seed)
        return {"recall@1": 100.0 * m["recall@1"], "map@r": 100.0 * m["map@r"]}

    reference = load_embedder(keras_path).embed(images)
    report = {"model": keras_path, "images": int(len(images)),
              "classes": int(len(np.unique(labels))),
              "keras": {"size_bytes": _size_bytes(keras_path), **metrics(reference)},
              "files": {}}
    for key, path in exported.items():
        embeddings = load_embedder(path).embed(images)
        cosines = np.sum(_normalise(embeddings) * _normalise(reference), axis=1)
        row = {"path": path, "size_bytes": _size_bytes(path),
               "cosine_mean": float(cosines.mean()), "cosine_min": float(cosines.min()),
               "max_norm_error": float(np.abs(np.linalg.norm(embeddings, axis=1) - 1).max()),
               **metrics(embeddings), "latency_ms": None}
        row["recall@1_drop"] = report["keras"]["recall@1"] - row["recall@1"]
        if path.endswith(".tflite") and latency_runs:
            row["latency_ms"] = tflite_latency_ms(path, images, latency_runs)
        report["files"][key] = row
    if output:
        with open(output, "w") as f:
            json.dump(report, f, indent=2)
    int8 = report["files"].get("tflite_int8")
    if max_recall_drop is not None and int8 and int8["recall@1_drop"] > max_recall_drop:
        raise ParityError(
            f"int8 Recall@1 dropped {int8['recall@1_drop']:.2f} points ({report['keras']['recall@1']:.2f}"
            f" -> {int8['recall@1']:.2f}), more than --max_recall_drop={max_recall_drop}. "
            "Calibrate on more or more representative images (--calibration_images, "
            "--dataset) or ship the float16 / dynamic file.")
    return report


def format_parity_table(report: dict) -> str:
    """The report as a markdown table, the Keras model first."""
    keras_row = report["keras"]
    lines = [
        f"{report['images']} held-out images, {report['classes']} classes",
        "",
        "| file | size (KB) | mean cos | min cos | recall@1 | map@r | ms/image (1 thread) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| keras | {keras_row['size_bytes'] / 1024:,.0f} | 1 | 1 | {keras_row['recall@1']:.2f} "
        f"| {keras_row['map@r']:.2f} | |",
    ]
    for key, row in report["files"].items():
        latency = "" if row["latency_ms"] is None else f"{row['latency_ms']:.3f}"
        lines.append(
            f"| {key} | {row['size_bytes'] / 1024:,.0f} | {row['cosine_mean']:.5f} | "
            f"{row['cosine_min']:.5f} | {row['recall@1']:.2f} | {row['map@r']:.2f} | {latency} |")
    return "\n".join(lines)
