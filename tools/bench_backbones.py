"""The phone table of the keras-hub backbones (docs/export.md, "Backbones on a phone").

For each backbone at its native image size, with random weights (`--weights=none`,
no download) and the pooling head (d = 128): parameters, the float16 and int8
`.tflite` sizes, LiteRT latency per image on 1 thread (batch 1), the int8 parity
guard's figures (cosine of the int8 file's embeddings to the float Keras embedder's
on held-out images; int8 calibrated on training images of the synthetic glyphs,
resized to the native size), and whether MediaPipe Tasks' `ImageEmbedder` loads the
int8 file and embeds an image. A backbone that fails to convert or quantize is a row
with the converter's error. Each backbone runs in its own process (memory).

    python tools/bench_backbones.py                     # all, writes JSON + the table
    python tools/bench_backbones.py --backbones=efficientnet_b0,mobilenet_v3_large
    python tools/bench_backbones.py --render_only       # the table again from the JSON

Results merge into `--output` (one entry per backbone), and the markdown table is
rewritten between the markers of `--doc`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

BACKBONES = ("dinov2_small", "dinov2_base", "dinov3_small", "siglip_base", "clip_vit_b16",
             "efficientnet_b0", "mobilenet_v3_large")
START, END = "<!-- backbones-phone:start -->", "<!-- backbones-phone:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(ROOT, "docs", "results", "backbones_phone.json")
DEFAULT_DOC = os.path.join(ROOT, "docs", "export.md")


def measure(backbone: str, *, embedding_dim=128, calibration=32, heldout=32,
            latency_runs=10, workdir="runs/bench_backbones") -> dict:
    """One backbone's row (see the module docstring); errors become `"error"` fields."""
    import numpy as np

    import kdml  # noqa: F401
    from kdml.data.sources import load_dataset
    from kdml.export.exporter import export_embedder
    from kdml.export.images import calibration_images, heldout_images
    from kdml.embedding import load_embedder
    from kdml.export.parity import tflite_latency_ms
    from kdml.models import backbone_spec, build_embedder

    spec = backbone_spec(backbone)
    size = spec.native_image_size
    row = {"backbone": backbone, "keras_hub_class": spec.keras_hub_class, "preset": spec.preset,
           "image_size": size, "embedding_dim": embedding_dim}
    embedder = build_embedder(backbone, image_size=size, embedding_dim=embedding_dim,
                              weights="none")
    row["backbone_parameters"] = int(embedder.get_layer("backbone").count_params())
    row["parameters"] = int(embedder.count_params())
    splits = load_dataset("synthetic")
    calib = calibration_images(splits.train, size, calibration, seed=0)
    images, _ = heldout_images(splits.test, size, heldout, seed=0)
    images = images[:heldout]
    reference = np.asarray(embedder.predict(images.astype("float32"), verbose=0))
    out = os.path.join(workdir, backbone)
    for quantization in ("float16", "int8"):
        entry = row[quantization] = {}
        start = time.perf_counter()
        try:
            paths = export_embedder(embedder, out, formats=("tflite",),
                                    quantizations=(quantization,), calibration_images=calib,
                                    backbone=backbone)
        except Exception as error:  # the converter's error is the result
            entry["error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            continue
        entry["convert_seconds"] = round(time.perf_counter() - start, 1)
        path = paths[f"tflite_{quantization}"]
        entry["size_bytes"] = os.path.getsize(path)
        try:
            embeddings = load_embedder(path).embed(images)
            cos = np.sum(_unit(embeddings) * _unit(reference), axis=1)
            entry["cosine_mean"], entry["cosine_min"] = float(cos.mean()), float(cos.min())
            entry["latency_ms"] = tflite_latency_ms(path, images, latency_runs)
            entry["load_average"] = round(os.getloadavg()[0], 1)  # other jobs on the cores
        except Exception as error:  # converted, but LiteRT fails to run it
            entry["error"] = (f"LiteRT: {type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]}")
        if quantization == "int8":
            entry["mediapipe"] = _mediapipe_loads(path, images[0])
    return row


def _unit(x):
    import numpy as np

    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mediapipe_loads(path: str, image) -> str:
    """"yes" when MediaPipe's ImageEmbedder loads `path` and embeds `image`, else the error."""
    import numpy as np

    try:
        import mediapipe
        from mediapipe.tasks.python import BaseOptions, vision
    except ImportError as error:
        return f"not measured (mediapipe not installed: {error})"
    try:
        options = vision.ImageEmbedderOptions(base_options=BaseOptions(model_asset_path=path))
        with vision.ImageEmbedder.create_from_options(options) as embedder:
            result = embedder.embed(mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB,
                                                    data=np.ascontiguousarray(image)))
            if not np.all(np.isfinite(result.embeddings[0].embedding)):
                return "loads, non-finite embedding"
        return "yes"
    except Exception as error:
        return f"no: {' '.join(str(error).split())[:200]}"


def render_table(results: dict) -> str:
    """The markdown table of `results` ({"meta": ..., "rows": {backbone: row}})."""
    meta = results.get("meta", {})
    lines = [
        f"Random weights, native size, pooling head (the backbone's default pooling, "
        f"d = {meta.get('embedding_dim', 128)}); int8 calibrated on "
        f"{meta.get('calibration_images', '?')} and compared on "
        f"{meta.get('heldout_images', '?')} held-out synthetic glyph images resized to the "
        f"native size; latency: median of {meta.get('latency_runs', '?')} images, LiteRT "
        f"interpreter, 1 thread, batch 1, on {meta.get('machine', 'this machine')} (the "
        f"notes give the 1-minute load average while it was timed: a load above the core "
        f"count inflates the figure). Measured {meta.get('date', '?')} by "
        f"`python tools/bench_backbones.py`.",
        "",
        "| backbone | keras-hub class | px | params (M) | float16 MB | int8 MB | float16 ms "
        "| int8 ms | int8 cosine mean / min | MediaPipe loads int8 | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for name in BACKBONES:
        row = results.get("rows", {}).get(name)
        if row is None or "failed" in row:
            why = "not measured" if row is None else f"process failed: {row['failed']}"
            lines.append(f"| {name} | | | | | | | | | | {why} |")
            continue
        f16, i8 = row.get("float16", {}), row.get("int8", {})
        cells = [name, row["keras_hub_class"], f"{row['image_size']}",
                 f"{row['parameters'] / 1e6:.1f}"]
        cells += [f"{e['size_bytes'] / 2 ** 20:.1f}" if "size_bytes" in e else "-" for e in (f16, i8)]
        cells += [f"{e['latency_ms']:.1f}" if "latency_ms" in e else "-" for e in (f16, i8)]
        cells.append(f"{i8['cosine_mean']:.4f} / {i8['cosine_min']:.4f}"
                     if "cosine_mean" in i8 else "-")
        cells.append(i8.get("mediapipe", "-"))
        notes = [f"{q}: {e['error']}" for q, e in (("float16", f16), ("int8", i8)) if "error" in e]
        loads = [e["load_average"] for e in (f16, i8) if "load_average" in e]
        if loads:
            notes.append(f"load {max(loads):g}")
        cells.append("; ".join(notes))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_table(doc_path: str, table: str) -> None:
    """Replaces the text between the markers of `doc_path` with `table`."""
    with open(doc_path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise ValueError(f"{doc_path}: no {START} ... {END} markers; add them where the "
                         "table goes.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(doc_path, "w") as f:
        f.write(f"{head}{START}\n{table}\n{END}{tail}")


def _load(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": {}, "rows": {}}


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--doc", default=DEFAULT_DOC)
    parser.add_argument("--calibration_images", type=int, default=32)
    parser.add_argument("--heldout_images", type=int, default=32)
    parser.add_argument("--latency_runs", type=int, default=10)
    parser.add_argument("--workdir", default="runs/bench_backbones")
    parser.add_argument("--render_only", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one backbone
    args = parser.parse_args(argv)
    if args.one:
        row = measure(args.one, calibration=args.calibration_images,
                      heldout=args.heldout_images, latency_runs=args.latency_runs,
                      workdir=args.workdir)
        print("ROW " + json.dumps(row), flush=True)
        return
    results = _load(args.output)
    if not args.render_only:
        results["meta"] = {
            "embedding_dim": 128, "calibration_images": args.calibration_images,
            "heldout_images": args.heldout_images, "latency_runs": args.latency_runs,
            "machine": f"{os.cpu_count()} shared CPU cores",
            "date": datetime.date.today().isoformat()}
        for backbone in args.backbones.split(","):
            child = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--one", backbone,
                 "--calibration_images", str(args.calibration_images),
                 "--heldout_images", str(args.heldout_images),
                 "--latency_runs", str(args.latency_runs), "--workdir", args.workdir],
                capture_output=True, text=True)
            rows = [line[4:] for line in child.stdout.splitlines() if line.startswith("ROW ")]
            if rows:
                results["rows"][backbone] = json.loads(rows[-1])
            else:
                tail = " ".join(child.stderr.strip().splitlines()[-1:])
                results["rows"][backbone] = {"backbone": backbone, "failed": tail[:300]}
            print(backbone, json.dumps(results["rows"][backbone]), flush=True)
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(results, f, indent=2, sort_keys=True)
                f.write("\n")
    write_table(args.doc, render_table(results))


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    main()
