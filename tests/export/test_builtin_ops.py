"""Every backbone and head converts to TFLite with builtin ops only, and matches Keras."""

import numpy as np
import pytest

import kdml
from kdml.export.saved_model import export_saved_model
from kdml.export.tflite import check_builtin_ops, convert_saved_model, tflite_ops

CASES = [
    # (backbone, head, image size): small images, random weights, float32 conversion
    ("conv4", "pooling", 28),
    ("conv4", "crt", 28),
    ("conv4_stride4", "crt", 28),
    pytest.param("mobilenet_v3_small", "pooling", 32, marks=pytest.mark.slow),
    pytest.param("resnet50", "pooling", 32, marks=pytest.mark.large),
    ("deit_tiny", "pooling", 32),
    ("deit_tiny", "crt", 32),
]
DEIT_TEST_LAYERS = 2  # of deit_tiny's 12 identical blocks: the same ops, 6x faster to convert


@pytest.fixture
def short_deit(monkeypatch):
    """deit_tiny's widths, heads and MLP with 2 transformer blocks instead of 12."""
    from kdml.models import backbones

    hidden, _, heads, intermediate, preset = backbones._DEIT["deit_tiny"]
    monkeypatch.setitem(backbones._DEIT, "deit_tiny",
                        (hidden, DEIT_TEST_LAYERS, heads, intermediate, preset))
    monkeypatch.setitem(backbones.BACKBONES, "deit_tiny",
                        (backbones._deit("deit_tiny"), backbones.BACKBONES["deit_tiny"][1]))


def _case(case):
    return tuple(case.values) if hasattr(case, "values") else case


def test_cases_cover_every_head_and_backbone():
    """No head or backbone goes unchecked (deit_small / deit_base: deit_tiny's ops; the
    keras-hub backbones: the float16 and int8 exports of their chain tests in
    tests/models/test_keras_hub_backbones.py, builtin ops only)."""
    from kdml.models.backbones import BACKBONES
    from kdml.models.keras_hub_backbones import HUB_BACKBONES

    backbones = {_case(case)[0] for case in CASES}
    heads = {_case(case)[1] for case in CASES}
    assert heads == set(kdml.models.embedder.HEADS)
    assert {name for name in BACKBONES if name not in ("deit_small", "deit_base")
            and name not in HUB_BACKBONES} == backbones


def _convert(embedder, directory):
    # the exporter's own path (builtin ops only), float32
    return convert_saved_model(export_saved_model(embedder, str(directory)), "float32")


@pytest.mark.parametrize("backbone, head, size", CASES, ids=lambda value: str(value))
def test_builtin_ops_only(backbone, head, size, rng, tmp_path, request):
    from ai_edge_litert.interpreter import Interpreter

    if backbone.startswith("deit"):
        request.getfixturevalue("short_deit")
    embedder = kdml.models.build_embedder(backbone, head=head, embedding_dim=16, image_size=size)
    model = _convert(embedder, tmp_path / "saved_model")
    check_builtin_ops(model, f"{backbone}/{head}")
    assert all(op["builtin"] for op in tflite_ops(model))
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    interpreter = Interpreter(model_content=model)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], [2, size, size, 3])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    got = interpreter.get_tensor(out["index"])
    expected = embedder.predict(images.astype(np.float32), verbose=0)
    # True cosine: a freshly initialised MobileNetV3 (inference-mode BatchNorm) shrinks
    # features below l2_normalize's epsilon, so its outputs are not unit length.
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosine = np.sum(unit(got) * unit(expected), axis=1)
    assert cosine.min() > 0.9999, cosine
