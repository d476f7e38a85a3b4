"""A tiny trained glyph embedder exported in every format, shared by the export tests.

conv4 at 28 px, d = 32, 20 Proxy Anchor steps on the synthetic glyphs (P x K = 16 x 4),
then `run_export` (the CLI's function): SavedModel + float32 / float16 / dynamic / int8
TFLite files (int8 calibrated on 128 training images) and the parity report on 20
held-out classes (400 images). Built once per test session: under pytest-xdist the
first worker builds it in the session's shared temp folder, the others wait for it.
"""

import json
import os
import time

import keras
import numpy as np
import pytest

import kdml

IMAGE_SIZE = 28
EMBEDDING_DIM = 32
TRAIN_STEPS = 20
PARITY_IMAGES = 400
_WAIT_SECONDS = 900


def _build(root):
    from kdml.export.images import heldout_images
    from kdml.export.workflow import run_export

    keras.utils.set_random_seed(0)
    splits = kdml.data.load_dataset("synthetic")
    train = kdml.data.train_dataset(splits.train, image_size=IMAGE_SIZE, classes_per_batch=16,
                                    images_per_class=4,
                                    augmentation=kdml.data.AUGMENTATIONS["glyph"])
    embedder = kdml.models.build_embedder("conv4", embedding_dim=EMBEDDING_DIM,
                                          image_size=IMAGE_SIZE)
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    proxies = kdml.layers.Proxies(splits.train.num_classes, name="proxies")
    model = keras.Model(images, proxies(embedder(images)))
    model.compile(optimizer=kdml.optimizers.GroupedAdamW({"^proxies/": 100.0}, learning_rate=1e-3),
                  loss=kdml.losses.ProxyAnchorLoss(), jit_compile=False)
    model.fit(train, epochs=1, steps_per_epoch=TRAIN_STEPS, verbose=0, shuffle=False)
    keras_path = os.path.join(root, "embedder.keras")
    embedder.save(keras_path)
    output_dir = os.path.join(root, "export")
    paths, report = run_export(keras_path, output_dir, dataset="synthetic",
                               calibration_count=128, parity_images=PARITY_IMAGES,
                               latency_runs=5, max_recall_drop=None)
    test_images, test_labels = heldout_images(splits.test, IMAGE_SIZE, PARITY_IMAGES, seed=0)
    reference = keras.ops.convert_to_numpy(embedder(test_images.astype("float32"), training=False))
    for name, array in (("images", test_images), ("labels", test_labels), ("reference", reference)):
        np.save(os.path.join(root, f"{name}.npy"), array)
    with open(os.path.join(root, "fixture.json"), "w") as f:
        json.dump({"keras": keras_path, "paths": paths, "report": report,
                   "output_dir": output_dir}, f)


def _load(root):
    with open(os.path.join(root, "fixture.json")) as f:
        data = json.load(f)
    for name in ("images", "labels", "reference"):
        data[name] = np.load(os.path.join(root, f"{name}.npy"))
    return data


@pytest.fixture(scope="session")
def exported(tmp_path_factory, worker_id):
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent  # shared by the xdist workers of this session
    root = str(shared / "kdml_export_fixture")
    done = os.path.join(root, "fixture.json")
    try:
        os.makedirs(root)  # atomic: exactly one process builds
    except FileExistsError:
        deadline = time.monotonic() + _WAIT_SECONDS
        while not os.path.exists(done):
            if os.path.exists(os.path.join(root, "failed")):
                pytest.fail("the export fixture failed in another xdist worker (see its error)")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for the export fixture in {root}")
            time.sleep(1)
        return _load(root)
    try:
        _build(root)
    except BaseException:
        open(os.path.join(root, "failed"), "w").close()
        raise
    return _load(root)
