"""TFLite conversion: float32, float16, dynamic-range and full-integer int8 embedders.

Every file takes `images` uint8 `(N, H, W, 3)` RGB in [0, 255] (normalisation is in
the graph, after a CAST) and returns float32 `(N, d)` L2-normalised embeddings, so
LiteRT, MediaPipe Tasks `ImageEmbedder` and mobile apps feed camera pixels directly.

- float32: no optimisation.
- float16: weights stored as float16 (half the size), computed in float32 on CPU.
- dynamic: weights int8, activations quantized on the fly (no calibration data).
- int8: weights and activations int8, calibrated on a representative dataset of
  training images; the uint8 input is CAST to float and QUANTIZEd in the graph, and the
  int8 output is DEQUANTIZEd in the graph, so input and output keep the types above.
  (An int8-only graph with uint8 input would need the input scale to be exactly 1, and
  a float32 input would need normalisation metadata for MediaPipe.)

Only TFLite builtin ops are allowed (no Select TF ops / Flex delegate): the converter is
restricted to `TFLITE_BUILTINS` (and `TFLITE_BUILTINS_INT8`), so an unsupported op is a
conversion error, and `tflite_ops` lists what a file uses for tests.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import numpy as np
import tensorflow as tf

from kdml.quiet_startup import native_output_hidden

QUANTIZATIONS = ("float32", "float16", "dynamic", "int8")


def convert_saved_model(saved_model_dir: str, quantization: str = "float32",
                        representative_images: Optional[Callable[[], Iterable[np.ndarray]]] = None
                        ) -> bytes:
    """Converts a kdml SavedModel (`export_saved_model`) to a `.tflite` flatbuffer.

    Args:
        saved_model_dir: the SavedModel directory (signature `serving_default`).
        quantization: one of `QUANTIZATIONS`.
        representative_images: for "int8", a callable returning an iterable of uint8
            `(1, H, W, 3)` calibration images (a few hundred training images).

    Returns:
        The flatbuffer bytes.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"Unknown quantization {quantization!r}. Valid: {', '.join(QUANTIZATIONS)}.")
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir,
                                                         signature_keys=["serving_default"])
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantization == "int8":
        if representative_images is None:
            raise ValueError("int8 quantization needs `representative_images` (calibration data).")
        converter.representative_dataset = lambda: ([np.asarray(x, np.uint8)]
                                                    for x in representative_images())
        # builtins_int8 for the quantized ops; plain builtins for the uint8 CAST
        # at the input (float fallback only where no int8 kernel exists).
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    converter.target_spec.supported_ops = ops
    with native_output_hidden():  # the converter's C++ "fully_quantize: ..." lines
        return converter.convert()


def tflite_ops(model: bytes) -> List[dict]:
    """The operators of a `.tflite` flatbuffer: [{"op": name, "builtin": bool, "types": [...]}].

    `types` are the dtypes of the op's input tensors (e.g. "INT8" for quantized
    kernels). Custom ops (Flex / Select TF ops included) have `builtin=False`.
    """
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    root = schema.Model.GetRootAs(model, 0)
    codes = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            codes.append((code.CustomCode().decode("utf-8"), False))
        else:
            codes.append((names.get(builtin, str(builtin)), True))
    ops = []
    for s in range(root.SubgraphsLength()):
        graph = root.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            name, builtin = codes[op.OpcodeIndex()]
            inputs = [op.Inputs(k) for k in range(op.InputsLength())]
            ops.append({"op": name, "builtin": builtin,
                        "types": [types[graph.Tensors(t).Type()] for t in inputs if t >= 0]})
    return ops


def check_builtin_ops(model: bytes, name: str = "model") -> None:
    """ValueError naming every non-builtin (custom / Select TF) op in `model`."""
    custom = sorted({op["op"] for op in tflite_ops(model) if not op["builtin"]})
    if custom:
        raise ValueError(
            f"{name} uses ops outside the TFLite builtin set: {', '.join(custom)}. It would "
            "need the Flex delegate (Select TF ops), which MediaPipe and LiteRT's default "
            "runtime do not ship.")
