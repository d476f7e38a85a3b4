"""Frozen backbone (`--freeze_backbone`) against full fine-tuning: speed and Recall@1.

Trains the same job twice per seed, at the same batch geometry and schedule: once
with the whole model trained (the data kind's augmentation), once with the backbone
frozen (its features computed once, only the head and the proxies trained, no
augmentation). Prints, per mode and seed:

- epochs/s: the steady-state training rate of `kdml.training`'s `Throughput` callback
  (images/s, first batch of each epoch excluded, median over epochs) over the
  images of an epoch (steps x P x K);
- the one-time feature pass of the frozen run (seconds, training and test images);
- the whole run's wall time (feature pass, evaluations and saving included);
- test Recall@1 (%) of the final embedder.

The default job is the glyph benchmark budget: conv4 from scratch at 28 px, P x K =
32 x 4, d = 512, 10 epochs, Proxy Anchor, on the embedded synthetic glyphs; a frozen
conv4 without pretrained weights is a random-feature backbone, so this measures the
speed of the mode and the price of not training the backbone on glyphs.

    python tools/bench_frozen.py [--dataset=synthetic | --dataset=folder:<dir>]
        [--epochs=10] [--seeds=0,1] [--backbone=conv4] [--image_size=28]
        [--method=proxy_anchor]

The output starts and ends with the time, the machine and its load average: figures
taken beside other work are visibly so.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _stamp(label: str) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"# {label} {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
            f"{platform.node() or 'host'}, {os.cpu_count()} CPUs, load average {load}")


def run_mode(config, frozen: bool, train_images: int) -> dict:
    """One training run; its speed, feature pass, wall time and final Recall@1."""
    import dataclasses

    from absl import logging

    from kdml.data.pipeline import steps_per_epoch
    from kdml.training import train

    logging.set_verbosity(logging.WARNING)
    config = dataclasses.replace(config, freeze_backbone=frozen,
                                 augmentation="none" if frozen else None)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own report
        history = train(config)
    wall = time.perf_counter() - start
    rates = [e["images_per_second"] for e in history["epochs"].values()
             if "images_per_second" in e]
    images_per_epoch = config.batch_size * steps_per_epoch(train_images, config.batch_size)
    return {
        "mode": "frozen" if frozen else "full",
        "seed": config.seed,
        "epochs_per_second": statistics.median(rates) / images_per_epoch,
        "feature_seconds": sum(f["seconds"] for f in history.get("features", {}).values()),
        "wall_seconds": wall,
        "recall@1": 100 * history["final"]["recall@1"],
    }


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic",
                        help="synthetic, or folder:<dir> (e.g. an Omniglot alphabets folder).")
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--image_size", type=int, default=28)
    parser.add_argument("--method", default="proxy_anchor")
    parser.add_argument("--embedding_dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--classes_per_batch", type=int, default=32)
    parser.add_argument("--images_per_class", type=int, default=4)
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds (paired runs).")
    parser.add_argument("--output_dir", default=None,
                        help="Where the runs go (default: a temporary folder, deleted).")
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    args = parser.parse_args(argv)

    import kdml  # noqa: F401
    from kdml.config import TrainConfig
    from kdml.data.sources import load_dataset

    print(_stamp("start"), flush=True)
    train_images = load_dataset(args.dataset).train.num_images
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or tmp
        for seed in (int(s) for s in args.seeds.split(",")):
            for frozen in (False, True):
                config = TrainConfig(
                    dataset=args.dataset, backbone=args.backbone, image_size=args.image_size,
                    weights="none", method=args.method, embedding_dim=args.embedding_dim,
                    epochs=args.epochs, classes_per_batch=args.classes_per_batch,
                    images_per_class=args.images_per_class, seed=seed, verbose=0,
                    eval_every=args.epochs, recall_ks=(1,),
                    output_dir=os.path.join(out, f"{'frozen' if frozen else 'full'}-{seed}"))
                row = run_mode(config, frozen, train_images)
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n{args.backbone} at {args.image_size} px, {args.method}, d = {args.embedding_dim}, "
          f"P x K = {args.classes_per_batch} x {args.images_per_class}, {args.epochs} epochs, "
          f"{args.dataset}, seeds {args.seeds}\n")
    print("| mode | epochs/s (training) | feature pass (s, once) | run wall time (s) | test Recall@1 (%) |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("full", "frozen"):
        mine = [r for r in rows if r["mode"] == mode]
        mean = {k: statistics.mean(r[k] for r in mine)
                for k in ("epochs_per_second", "feature_seconds", "wall_seconds", "recall@1")}
        recalls = ", ".join(f"{r['recall@1']:.2f}" for r in mine)
        print(f"| {mode} | {mean['epochs_per_second']:.2f} | "
              f"{mean['feature_seconds']:.1f} | {mean['wall_seconds']:.0f} | "
              f"{mean['recall@1']:.2f} ({recalls}) |")
    full = statistics.mean(r["epochs_per_second"] for r in rows if r["mode"] == "full")
    fast = statistics.mean(r["epochs_per_second"] for r in rows if r["mode"] == "frozen")
    print(f"\nfrozen / full training speed: {fast / full:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(_stamp("end"), flush=True)


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    main()
