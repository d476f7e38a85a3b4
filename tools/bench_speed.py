"""Training and input-pipeline throughput of the default job (prints figures).

Measures, for `conv4` at 28 px, P x K = 32 x 4, Proxy Anchor on the embedded
glyphs: the input pipeline alone (images/s), the compiled training step with and
without XLA (`jit_compile`), and their ratio. The input pipeline must never be the
bottleneck: pipeline / training >= 3.

It also reports the cost of the Coded Residual Transform head (`--method=crt`)
against the default pooling head: parameters (counted on the built layers) and
FLOPs per image (analytic, a multiply-add = 2 FLOPs) for conv4 at 28 px, resnet50 at
224 px and deit_small at 224 px (feature shapes known, no weights downloaded), and
the train-step images/s of `--method=crt` (main + auxiliary branch, Multi-Similarity,
consistency) vs `--method=multi_similarity` (pooling head) on conv4.

    python tools/bench_speed.py [--steps=60] [--repeats=3] [--backbone=conv4] [--image_size=28]
        [--crt_only]

Every rate is the best of `--repeats` timed runs (the least disturbed one), and the
output starts and ends with when, how and on what it was measured, with the machine's
load average (`os.getloadavg`) before and after: a figure taken beside other work is
visibly so. Measure on an idle machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("steps", 60, "Timed steps per measurement (after warm-up).")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement; the best (fastest) is reported.")
flags.DEFINE_string("backbone", "conv4", "Backbone.")
flags.DEFINE_integer("image_size", 28, "Image size.")
flags.DEFINE_integer("classes_per_batch", 32, "P.")
flags.DEFINE_integer("images_per_class", 4, "K.")
flags.DEFINE_bool("crt_only", False, "Only the CRT head cost section.")
FLAGS = flags.FLAGS

# Backbone features at the reference sizes (B, ...) -> per-image shape, and the
# backbone's own cost per image in GFLOPs (published multiply-adds x 2) for scale.
_CRT_CASES = (
    # name, image size, feature shape, default pooling, backbone GFLOPs (None: computed)
    ("conv4", 28, (2, 2, 64), "avg_max", None),
    ("resnet50", 224, (7, 7, 2048), "avg_max", 2 * 4.1),   # 4.1 G multiply-adds (fvcore count)
    ("deit_small", 224, (198, 384), "cls", 2 * 4.6),        # 4.6 G multiply-adds (DeiT paper, Table 1)
)


def conv4_flops(image_size: int) -> float:
    """FLOPs per image of conv4's four 3x3 convolutions (multiply-add = 2)."""
    total, size, channels = 0.0, image_size, 3
    for _ in range(4):
        total += 2 * size * size * 9 * channels * 64
        size, channels = -(-size // 2), 64
    return total


def pooling_head_flops(shape, pooling: str, d: int) -> float:
    """avg+max pooling (2 N C) or the class token (0), then the projection 2 C d."""
    c = shape[-1]
    n = 1
    for s in shape[:-1]:
        n *= s
    return (2 * n * c if pooling == "avg_max" else 0) + 2 * c * d + 3 * d


def crt_head_flops(shape, k: int, d: int, skip_tokens: int = 0) -> float:
    """CodedResidualTransform per image: two (N, K, C) einsums, the K C -> d projection,
    norms and softmax (docs/design.md 3.3; see the layer's `call`)."""
    c = shape[-1]
    n = 1
    for s in shape[:-1]:
        n *= s
    n -= skip_tokens
    return (4 * n * k * c        # cosines x . c^ and the weighted sum of features
            + 2 * k * c * d      # projection of the (K C) code
            + 2 * n * c + 7 * n * k + 12 * k * c + 3 * d)  # norms, softmax, codes


def crt_cost_rows(k: int = 64, d: int = 512):
    """[(case, pooling params, crt params, pooling FLOPs, crt FLOPs, backbone FLOPs)]."""
    import keras

    from kdml.layers import CodedResidualTransform, PoolingHead

    rows = []
    for name, size, shape, pooling, backbone_gflops in _CRT_CASES:
        skip = 2 if name.startswith("deit") else 0
        pool = PoolingHead(d, pooling=pooling)
        pool.build((None, *shape))
        crt = CodedResidualTransform(k, d, skip_tokens=skip)
        crt.build((None, *shape))
        backbone = conv4_flops(size) if backbone_gflops is None else backbone_gflops * 1e9
        rows.append((f"{name} {size} px {shape}", pool.count_params(), crt.count_params(),
                     pooling_head_flops(shape, pooling, d), crt_head_flops(shape, k, d, skip),
                     backbone))
        del crt
        keras.backend.clear_session()
    return rows


def _print_crt_cost(k=64, d=512):
    print(f"\nCRT head (K = {k}, d = {d}) vs the default pooling head, per image; backbone "
          "FLOPs for scale (conv4 computed, others published)\n")
    print("| backbone, features | pooling params | CRT params | x | pooling FLOPs | CRT FLOPs "
          "| x | CRT / backbone FLOPs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for case, p_pool, p_crt, f_pool, f_crt, f_backbone in crt_cost_rows(k, d):
        print(f"| {case} | {p_pool:,} | {p_crt:,} | {p_crt / p_pool:.0f} | {f_pool / 1e6:.2f} M "
              f"| {f_crt / 1e6:.2f} M | {f_crt / f_pool:.0f} | {100 * f_crt / f_backbone:.1f} % |")


def best_rate(run, items: int, repeats: int) -> float:
    """Items per second of the fastest of `repeats` calls of `run()` (each does `items`)."""
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return items / min(seconds)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measurement_conditions(repeats: int, steps: int, when=None) -> str:
    """One line: when (UTC), how (best of `repeats` x `steps` steps), the CPU, and the
    load average over 1 / 5 / 15 minutes."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{when:%Y-%m-%d %H:%M} UTC; best of {repeats} timed runs of {steps} steps after 5 "
            f"warm-up steps; {_cpu_name()}, {os.cpu_count()} logical CPUs; load average "
            f"(1, 5, 15 min) {load}")


def _step_rate(model, data, steps, batch, repeats):
    cached = data.take(1).cache().repeat()  # a fixed batch: the step alone
    model.fit(cached, steps_per_epoch=5, epochs=1, verbose=0)
    return best_rate(lambda: model.fit(cached, steps_per_epoch=steps, epochs=1, verbose=0),
                     steps * batch, repeats)


def _rate(iterator, steps, batch, repeats, warmup=5):
    for _ in range(warmup):
        next(iterator)

    def run():
        for _ in range(steps):
            next(iterator)

    return best_rate(run, steps * batch, repeats)


def main(argv):
    del argv
    import keras

    from kdml.config import TrainConfig
    from kdml.data import AUGMENTATIONS, load_dataset, train_dataset
    from kdml.methods import get_method
    from kdml.models import build_embedder
    from kdml.optimizers import GroupedAdamW

    p, k, steps, repeats = (FLAGS.classes_per_batch, FLAGS.images_per_class, FLAGS.steps,
                            FLAGS.repeats)
    batch = p * k
    print(f"Measured: {measurement_conditions(repeats, steps)}")
    _print_crt_cost()
    splits = load_dataset("synthetic")
    data = train_dataset(splits.train, image_size=FLAGS.image_size, classes_per_batch=p,
                         images_per_class=k, augmentation=AUGMENTATIONS["glyph"])
    crt_rows = []
    for method_name in ("multi_similarity", "crt"):
        keras.utils.set_random_seed(0)
        config = TrainConfig(method=method_name, classes_per_batch=p,
                             images_per_class=k).resolved("glyph")
        method = get_method(method_name)
        head, head_options = method.head(config)
        embedder = build_embedder(FLAGS.backbone, head, 512, FLAGS.image_size,
                                  head_options=head_options)
        objective = method.build(embedder, splits.train.num_classes, config)
        objective.model.compile(GroupedAdamW(objective.learning_rate_multipliers,
                                             learning_rate=1e-3), objective.loss, jit_compile=False)
        crt_rows.append((method_name, head, _step_rate(objective.model, data, steps, batch,
                                                       repeats)))
    print(f"\n{FLAGS.backbone} at {FLAGS.image_size} px, P x K = {p} x {k}, jit_compile=False, "
          "train step on a fixed batch\n")
    print("| method (embedder head) | images/s |")
    print("|---|---|")
    for method_name, head, rate in crt_rows:
        print(f"| `{method_name}` ({head}) | {rate:,.0f} |")
    print(f"| crt / multi_similarity | {crt_rows[1][2] / crt_rows[0][2]:.2f}x |")
    if FLAGS.crt_only:
        print(f"\nEnded: {measurement_conditions(repeats, steps)}")
        return
    pipeline = _rate(iter(data), steps * 3, batch, repeats)

    rows = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        config = TrainConfig(classes_per_batch=p, images_per_class=k).resolved("glyph")
        embedder = build_embedder(FLAGS.backbone, embedding_dim=512, image_size=FLAGS.image_size)
        objective = get_method("proxy_anchor").build(embedder, splits.train.num_classes, config)
        model = objective.model
        model.compile(GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-3),
                      objective.loss, jit_compile=jit)
        step_only = _step_rate(model, data, steps, batch, repeats)
        end_to_end = best_rate(lambda: model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0),
                               steps * batch, repeats)
        rows.append((jit, step_only, end_to_end))

    print(f"\n{FLAGS.backbone} at {FLAGS.image_size} px, P x K = {p} x {k}, proxy_anchor, "
          f"{os.cpu_count()} CPU cores\n")
    print("| measurement | images/s |")
    print("|---|---|")
    print(f"| input pipeline alone | {pipeline:,.0f} |")
    for jit, step_only, end_to_end in rows:
        print(f"| train step, jit_compile={jit} (fixed batch) | {step_only:,.0f} |")
        print(f"| fit with the pipeline, jit_compile={jit} | {end_to_end:,.0f} |")
    best = max(r[1] for r in rows)
    print(f"| **pipeline / fastest train step** | **{pipeline / best:.1f}x** |")
    print(f"\nEnded: {measurement_conditions(repeats, steps)}")


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    app.run(main)
