"""The Python parts of `tools/gpu_check.sh`: devices, MirroredStrategy + NCCL, train-step speed.

    python tools/gpu_check.py devices
    python tools/gpu_check.py mirrored
    python tools/gpu_check.py throughput [--budget_s=150] [--steps=20] [--dry_run]

`throughput` measures training images/s (Proxy Anchor, P x K = 32 x 4, GroupedAdamW,
a fixed batch of random uint8 pixels, random initial weights: no download) for
resnet50 and deit_small at 224 px, with XLA off/on and float32 / mixed_float16: one
Markdown row per configuration, printed as soon as it is measured, and configurations
left when `--budget_s` runs out are listed as skipped. `--dry_run` (CPU, seconds):
conv4 at 32 px, 2 timed steps, P x K = 4 x 2, XLA off, float32 and mixed_float16.

`mirrored` checks MirroredStrategy on the GPU: one step on the GPU(s) under
MirroredStrategy equals one step on one device; on a one-GPU machine the GPU is
split into two logical GPUs and NCCL all-reduce is tried on them (NCCL may refuse
two ranks on one physical GPU: then the all-reduce is reported as such and the step is
checked with HierarchicalCopyAllReduce).

Each prints `RESULT <name> <status> <details>` lines that gpu_check.sh collects.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _result(name: str, status: str, details: str = "") -> None:
    print(f"RESULT {name} {status} {details}".rstrip(), flush=True)


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:160] if lines else ''}"


def devices() -> None:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    build = tf.sysconfig.get_build_info()
    print(f"TensorFlow {tf.__version__}, CUDA {build.get('cuda_version', '-')}, "
          f"cuDNN {build.get('cudnn_version', '-')}")
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        print(f"  {gpu.name}: {details.get('device_name', '?')}, compute capability "
              f"{details.get('compute_capability', '?')}")
    _result("tf_visible_gpus", "pass" if gpus else "FAIL", f"{len(gpus)} GPU(s)")


def mirrored() -> None:
    import numpy as np
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        _result("mirrored_nccl", "FAIL", "no GPU visible")
        return
    if len(gpus) == 1:  # two logical GPUs on the one physical GPU
        tf.config.set_logical_device_configuration(
            gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=4096)] * 2)
    import keras

    from kdml.config import TrainConfig
    from kdml.methods import get_method
    from kdml.models import build_embedder
    from kdml.optimizers import GroupedAdamW

    logical = [d.name for d in tf.config.list_logical_devices("GPU")]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    config = TrainConfig().resolved("glyph")

    def one_step(strategy, initial=None):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            embedder = build_embedder("conv4", embedding_dim=16, image_size=32)
            objective = get_method("proxy_anchor").build(embedder, 4, config)
            model = objective.model
            if initial is not None:
                model.set_weights(initial)
            start = [w.numpy() for w in model.weights]
            model.compile(GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-2,
                                       epsilon=1.0), objective.loss, jit_compile=False)
        data = tf.data.Dataset.from_tensors((images, labels))
        model.fit(data, epochs=1, steps_per_epoch=1, shuffle=False, verbose=0)
        return start, [w.numpy() for w in model.weights]

    initial, single = one_step(tf.distribute.OneDeviceStrategy(logical[0]))
    for name, ops in (("nccl", tf.distribute.NcclAllReduce()),
                      ("hierarchical_copy", tf.distribute.HierarchicalCopyAllReduce())):
        try:
            tf.distribute.MirroredStrategy._collective_key_base += 10_000
            strategy = tf.distribute.MirroredStrategy(logical, cross_device_ops=ops)
            _, step = one_step(strategy, initial)
            error = max(float(np.max(np.abs(a - b))) for a, b in zip(single, step))
            _result(f"mirrored_{name}", "pass" if error < 1e-4 else "FAIL",
                    f"{len(logical)} replicas on {len(gpus)} GPU(s), max |w - w_1device| = {error:.1e}")
        except Exception as error:  # noqa: BLE001  (reported, the check goes on)
            _result(f"mirrored_{name}", "FAIL", _first_line(error))


def throughput(budget_s: float, steps: int, dry_run: bool) -> None:
    import numpy as np
    import tensorflow as tf

    import keras

    from kdml.config import TrainConfig
    from kdml.methods import get_method
    from kdml.models import build_embedder
    from kdml.optimizers import GroupedAdamW

    deadline = time.monotonic() + budget_s
    if dry_run:
        backbones, size, p, k, steps, warm = ("conv4",), 32, 4, 2, 2, 1
    else:
        backbones, size, p, k, warm = ("resnet50", "deit_small"), 224, 32, 4, 3
    # Most informative first, so a short budget still covers each backbone. The dry run
    # skips XLA (a CPU compile costs tens of seconds; the flag is a plain argument).
    settings = ((False, "float32"), (True, "mixed_float16"), (True, "float32"), (False, "mixed_float16"))
    runs = [(b, jit, policy) for jit, policy in settings if not (dry_run and jit) for b in backbones]
    rng = np.random.default_rng(0)
    batch = p * k
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(p), k).astype(np.int32)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    config = TrainConfig(classes_per_batch=p, images_per_class=k).resolved("photo")
    print("\n| backbone | px | XLA | precision | images/s | first step (s) |\n"
          "|---|---|---|---|---|---|", flush=True)
    for backbone, jit, policy in runs:
        name = f"train_{backbone}_{'xla' if jit else 'noxla'}_{policy}"
        if time.monotonic() > deadline:
            print(f"| {backbone} | {size} | {jit} | {policy} | skipped (budget) | - |", flush=True)
            _result(name, "skipped", "budget")
            continue
        try:
            keras.utils.set_random_seed(0)
            keras.mixed_precision.set_global_policy(policy)
            try:
                embedder = build_embedder(backbone, "pooling", 512, size, "none")
                objective = get_method("proxy_anchor").build(embedder, p, config)
            finally:
                keras.mixed_precision.set_global_policy("float32")
            model = objective.model
            model.compile(GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-4,
                                       weight_decay=1e-4), objective.loss, jit_compile=jit)
            start = time.perf_counter()
            model.fit(data, epochs=1, steps_per_epoch=warm, shuffle=False, verbose=0)  # trace / XLA compile
            first = time.perf_counter() - start
            start = time.perf_counter()
            history = model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False,
                                verbose=0)
            rate = steps * batch / (time.perf_counter() - start)
            loss = history.history["loss"][-1]
            ok = np.isfinite(loss)
            print(f"| {backbone} | {size} | {jit} | {policy} | {rate:,.0f} | {first:.0f} |", flush=True)
            _result(name, "pass" if ok else "FAIL", f"{rate:.0f} images/s, loss {loss:.3f}")
        except Exception as error:  # noqa: BLE001  (reported, the others still run)
            print(f"| {backbone} | {size} | {jit} | {policy} | error | - |", flush=True)
            _result(name, "FAIL", _first_line(error))
        finally:
            keras.backend.clear_session()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=("devices", "mirrored", "throughput"))
    parser.add_argument("--budget_s", type=float, default=150.0,
                        help="throughput: start no configuration after this many seconds")
    parser.add_argument("--steps", type=int, default=20, help="throughput: timed steps")
    parser.add_argument("--dry_run", action="store_true",
                        help="throughput: conv4 at 32 px, 2 steps (a CPU smoke test)")
    args = parser.parse_args()
    if args.check == "devices":
        devices()
    elif args.check == "mirrored":
        mirrored()
    else:
        throughput(args.budget_s, args.steps, args.dry_run)


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    main()
