"""Keras -> SavedModel -> TFLite (each quantization) on a tiny trained glyph embedder."""

import inspect
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kdml.embedding.metadata import read_sidecar, read_tflite_metadata
from kdml.export import load_embedder
from kdml.export.parity import ParityError, format_parity_table, parity_report
from kdml.export.tflite import check_builtin_ops, tflite_ops
from kdml.version import __version__

from tests.export.conftest import EMBEDDING_DIM, IMAGE_SIZE

QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")


def _cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def test_saved_model_serving_signature(exported):
    signature = tf.saved_model.load(exported["paths"]["saved_model"]).signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["images"]
    assert inputs["images"].dtype == tf.uint8
    assert inputs["images"].shape.as_list() == [None, IMAGE_SIZE, IMAGE_SIZE, 3]
    outputs = signature.structured_outputs
    assert list(outputs) == ["embeddings"]
    assert outputs["embeddings"].dtype == tf.float32
    assert outputs["embeddings"].shape.as_list() == [None, EMBEDDING_DIM]
    got = signature(images=tf.constant(exported["images"][:32]))["embeddings"].numpy()
    np.testing.assert_allclose(got, exported["reference"][:32], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("quantization, min_cosine", [
    ("float32", 0.9999), ("float16", 0.99), ("dynamic", 0.99), ("int8", 0.95)])
def test_tflite_matches_keras(exported, quantization, min_cosine):
    path = exported["paths"][f"tflite_{quantization}"]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    # camera pixels in, float32 embeddings out, whatever the quantization
    assert inp["dtype"] == np.uint8 and list(inp["shape_signature"]) == [-1, IMAGE_SIZE, IMAGE_SIZE, 3]
    assert out["dtype"] == np.float32 and list(out["shape_signature"]) == [-1, EMBEDDING_DIM]
    images = exported["images"]
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    got = interpreter.get_tensor(out["index"])
    cosines = _cosines(got, exported["reference"])
    assert cosines.min() >= min_cosine, cosines.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5 if quantization != "int8" else 2e-2)


def test_tflite_ops_are_builtin_and_quantized_as_asked(exported):
    ops = {q: tflite_ops(open(exported["paths"][f"tflite_{q}"], "rb").read()) for q in QUANTIZATIONS}
    for quantization, file_ops in ops.items():
        assert all(op["builtin"] for op in file_ops), quantization
        # the uint8 pixels are cast to float inside the graph
        assert {"op": "CAST", "builtin": True, "types": ["UINT8"]} in file_ops

    def kernel_types(quantization, name):
        return {tuple(op["types"][:2]) for op in ops[quantization] if op["op"] == name}

    assert kernel_types("float32", "CONV_2D") == {("FLOAT32", "FLOAT32")}
    # full integer: every conv and the projection run int8 x int8 kernels
    assert kernel_types("int8", "CONV_2D") == {("INT8", "INT8")}
    assert kernel_types("int8", "FULLY_CONNECTED") == {("INT8", "INT8")}
    assert {op["op"] for op in ops["int8"]} >= {"QUANTIZE", "DEQUANTIZE"}
    # float16: float16 weights dequantised once; dynamic: float activations, int8 weights
    assert any(op["op"] == "DEQUANTIZE" and op["types"] == ["FLOAT16"] for op in ops["float16"])
    assert kernel_types("dynamic", "CONV_2D") == {("FLOAT32", "INT8")}
    sizes = {q: os.path.getsize(exported["paths"][f"tflite_{q}"]) for q in QUANTIZATIONS}
    assert sizes["float16"] < 0.6 * sizes["float32"] and sizes["int8"] < 0.35 * sizes["float32"]


def test_check_builtin_ops_rejects_select_tf_ops():
    @tf.function(input_signature=[tf.TensorSpec([4], tf.float32)])
    def uses_a_tf_op(x):
        return tf.raw_ops.Betainc(a=x, b=x, x=x)  # no TFLite builtin, no Flex kernel

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [uses_a_tf_op.get_concrete_function()], uses_a_tf_op)
    converter.allow_custom_ops = True  # kept as a custom op instead of failing
    model = converter.convert()
    assert [op["op"] for op in tflite_ops(model)] == ["Betainc"]
    with pytest.raises(ValueError, match="Betainc.*Select TF ops"):
        check_builtin_ops(model, "betainc.tflite")


def test_metadata_sidecar_and_embedded(exported):
    for key, path in exported["paths"].items():
        sidecar = read_sidecar(path)
        assert sidecar["embedding_dim"] == EMBEDDING_DIM
        assert sidecar["image_size"] == [IMAGE_SIZE, IMAGE_SIZE]
        assert sidecar["kdml_version"] == __version__
        assert sidecar["name"] == "embedder"
        assert sidecar["input"]["dtype"] == "uint8" and sidecar["output"]["l2_normalized"]
        if key.startswith("tflite_"):
            assert sidecar["quantization"] == key[len("tflite_"):]
            assert read_tflite_metadata(open(path, "rb").read()) == sidecar


def _recall_at_1(embeddings, labels):
    """Leave-one-out nearest-neighbour accuracy, brute force in NumPy."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    return 100.0 * np.mean(labels[np.argmax(similarity, axis=1)] == labels)


def test_parity_report_numbers(exported):
    report = exported["report"]
    labels, reference = exported["labels"], exported["reference"]
    assert report["images"] == len(labels) == 400 and report["classes"] == 20
    assert report["keras"]["recall@1"] == pytest.approx(_recall_at_1(reference, labels), abs=1e-6)
    # the trained model retrieves far above chance (1 / 20 classes)
    assert report["keras"]["recall@1"] > 30
    with open(os.path.join(exported["output_dir"], "parity.json")) as f:
        assert json.load(f) == report
    for key, row in report["files"].items():
        embeddings = load_embedder(row["path"]).embed(exported["images"])
        cosines = _cosines(embeddings, reference)
        assert row["cosine_mean"] == pytest.approx(cosines.mean(), abs=1e-6)
        assert row["cosine_min"] == pytest.approx(cosines.min(), abs=1e-6)
        assert row["recall@1"] == pytest.approx(_recall_at_1(embeddings, labels), abs=1e-6)
        assert row["recall@1_drop"] == pytest.approx(report["keras"]["recall@1"] - row["recall@1"])
        if key.startswith("tflite_"):
            assert row["size_bytes"] == os.path.getsize(row["path"])
            assert 0 < row["latency_ms"] < 1000
        else:
            assert row["latency_ms"] is None
    table = format_parity_table(report)
    assert table.count("\n| ") == 2 + len(report["files"])  # header rule, keras, one per file


def _cosines_between_rows(embeddings):
    x = np.asarray(embeddings, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def _query_int8_gets_wrong(keras_embeddings, int8_embeddings, labels):
    """(q, [its Keras and its int8 nearest neighbour]) for the held-out query whose Keras
    nearest neighbour shares its class and whose int8 one does not, by the widest margin
    (leave-one-out, cosine, float64)."""
    keras_sim = _cosines_between_rows(keras_embeddings)
    int8_sim = _cosines_between_rows(int8_embeddings)
    best = None
    for q in range(len(labels)):
        same, other = labels == labels[q], labels != labels[q]
        same[q] = False
        keras_margin = keras_sim[q, same].max() - keras_sim[q, other].max()  # > 0: right
        int8_margin = int8_sim[q, other].max() - int8_sim[q, same].max()  # > 0: wrong
        if min(keras_margin, int8_margin) > (best[0] if best else 0.0):
            neighbours = {int(np.flatnonzero(same)[np.argmax(keras_sim[q, same])]),
                          int(np.flatnonzero(other)[np.argmax(int8_sim[q, other])])}
            best = (min(keras_margin, int8_margin), q, sorted(neighbours))
    assert best is not None, "no held-out query that Keras retrieves right and int8 wrong"
    return best[1], best[2]


def test_int8_guard_at_its_default_threshold_of_one_point(exported):
    """Image sets whose int8 Recall@1 drop is known exactly: 100/101 points passes the
    default --max_recall_drop=1, 100/99 points fails it.

    One query q that Keras retrieves right and int8 wrong keeps both outcomes in any
    subset of the held-out images that holds its Keras and its int8 nearest neighbour
    (no other image was nearer). Every other image is included twice, so its nearest
    neighbour is its own copy (right in both). With N images, Keras Recall@1 is 100 and
    int8's 100 (N - 1) / N: a drop of 100 / N points.
    """
    assert inspect.signature(parity_report).parameters["max_recall_drop"].default == 1.0
    from kdml.export.workflow import run_export

    assert inspect.signature(run_export).parameters["max_recall_drop"].default == 1.0
    images, labels = exported["images"], exported["labels"]
    int8_path = exported["paths"]["tflite_int8"]
    int8_embeddings = load_embedder(int8_path).embed(images)
    q, helpers = _query_int8_gets_wrong(exported["reference"], int8_embeddings, labels)
    others = [i for i in range(len(labels)) if i != q and i not in helpers]

    def image_set(size):  # q + pairs of copies: size = 1 + 2 x (number of pairs)
        pairs = [*helpers, *others[:(size - 1) // 2 - len(helpers)]]
        index = np.array([q, *pairs, *pairs])
        assert len(index) == size
        return images[index], labels[index]

    for size in (101, 99):
        drop = 100.0 / size  # 0.990 and 1.010 points
        set_images, set_labels = image_set(size)
        if drop < 1.0:
            report = parity_report(exported["keras"], {"tflite_int8": int8_path}, set_images,
                                   set_labels, latency_runs=0)  # the default threshold
            row = report["files"]["tflite_int8"]
            assert report["keras"]["recall@1"] == pytest.approx(100.0)
            assert row["recall@1"] == pytest.approx(100.0 * (size - 1) / size)
            assert row["recall@1_drop"] == pytest.approx(drop)
        else:
            with pytest.raises(ParityError, match=r"int8 Recall@1 dropped 1\.01 points \(100\.00 "
                               r"-> 98\.99\), more than --max_recall_drop=1\.0\. Calibrate"):
                parity_report(exported["keras"], {"tflite_int8": int8_path}, set_images,
                              set_labels, latency_runs=0)


def test_run_export_errors(tmp_path):
    from kdml.export.workflow import run_export
    from kdml.export.exporter import export_embedder

    with pytest.raises(FileNotFoundError, match="--model="):
        run_export(str(tmp_path / "missing.keras"))
    import kdml

    embedder = kdml.models.build_embedder("conv4", embedding_dim=4, image_size=16)
    with pytest.raises(ValueError, match="calibration images"):
        export_embedder(embedder, str(tmp_path), formats=["tflite"], quantizations=["int8"])
    with pytest.raises(ValueError, match="quantizations"):
        export_embedder(embedder, str(tmp_path), formats=["tflite"], quantizations=["int4"])
    with pytest.raises(ValueError, match="formats"):
        export_embedder(embedder, str(tmp_path), formats=["onnx"])
