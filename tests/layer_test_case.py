"""The serialization and numerics contract of every public kdml layer, loss and regularizer.

Modelled on keras-hub's `TestCase.run_layer_test`: one call per object, with its
constructor arguments and a small input, checks what every kdml layer, loss and
regularizer promises (STYLE.md, convention 3):

1. config: `get_config()` -> JSON text -> `from_config` gives the same config, through
   the registered name (`keras.saving.serialize_keras_object`) and through the class.
2. `.keras` file: a tiny model holding the object saves and loads with no
   `custom_objects`, and the loaded model computes exactly what the original did.
3. training: one optimizer step of that model gives a finite float32 loss equal to the
   loss computed directly before the step, and changes the trainable weights.
4. mixed precision: under the global policies mixed_float16 and mixed_bfloat16 the
   object computes what it documents (layers: `output_dtype`, float32 unless the layer
   documents its compute dtype; losses and regularizers: float32 scalars), close to the
   float32 result with the same weights; the global policy is restored afterwards.
5. TFLite (layers): the model converts with builtin ops only
   (`tf.lite.OpsSet.TFLITE_BUILTINS`) and the LiteRT interpreter's output equals Keras'.
"""

import contextlib
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

MIXED_POLICIES = ("mixed_float16", "mixed_bfloat16")
_HALF_ATOL = 5e-2  # float32 vs half-precision compute on O(1) values (bfloat16: 8 bits)


def _as_list(data):
    return list(data) if isinstance(data, (list, tuple)) else [data]


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@contextlib.contextmanager
def _global_policy(name):
    """The global mixed-precision policy `name` inside the block, restored after it."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _json(config):
    """`config` as JSON gives it back (tuples become lists); raises if not JSON-able."""
    return json.loads(json.dumps(config))


def assert_json_config_roundtrip(obj):
    """get_config -> JSON -> from_config, by registered name and by class; returns the clone.

    Configs are compared as JSON values (a tuple and the list JSON returns are equal).
    """
    config = _json(obj.get_config())
    clone = keras.saving.deserialize_keras_object(_json(keras.saving.serialize_keras_object(obj)))
    assert type(clone) is type(obj), (type(clone), type(obj))
    assert _json(clone.get_config()) == config
    rebuilt = type(obj).from_config(_json(obj.get_config()))
    assert type(rebuilt) is type(obj) and _json(rebuilt.get_config()) == config
    return clone


def _save_and_load(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return keras.saving.load_model(path)  # no custom_objects: registered names only


def _layer_model(layer_cls, init_kwargs, inputs, prefix=None):
    """Inputs -> [prefix Dense] -> the layer; the layer and the model."""
    layer = layer_cls(**init_kwargs)
    symbolic = [keras.Input(shape=x.shape[1:], batch_size=x.shape[0], dtype=str(x.dtype),
                            name=f"input_{i}") for i, x in enumerate(inputs)]
    hidden = [prefix(x) if prefix is not None else x for x in symbolic]
    outputs = layer(*hidden)
    return layer, keras.Model(symbolic if len(symbolic) > 1 else symbolic[0], outputs)


def _train_one_step(model, x, y, loss):
    """One SGD step: the logged loss is the loss (plus `model.losses`) before the step,
    finite float32, and the trainable weights move. Returns the logged loss."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss=loss, jit_compile=False)
    before = [w.numpy().copy() for w in model.trainable_weights]
    assert before, "the training check needs trainable weights"
    value = loss(y, model(x, training=False))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = float(value) + sum(float(penalty) for penalty in model.losses)
    logged = float(np.ravel(model.train_on_batch(x, y))[0])
    assert np.isfinite(logged)
    np.testing.assert_allclose(logged, expected, rtol=1e-5, atol=1e-7)
    moved = [np.abs(w.numpy() - b).max() for w, b in zip(model.trainable_weights, before)]
    assert max(moved) > 0, "one training step left every trainable weight unchanged"
    return logged


def run_layer_test(layer_cls, init_kwargs, input_data, *, output_dtype="float32",
                   tflite=True, tflite_atol=1e-5, mixed_atol=_HALF_ATOL):
    """The contract (module docstring) for one layer.

    Args:
        layer_cls: the layer class.
        init_kwargs: constructor arguments.
        input_data: a float32 array (B, ...) or a list of them for a multi-input
            `call(a, b)`.
        output_dtype: what the output is under a mixed policy: "float32", or
            "compute" for the policy's compute dtype (float16 / bfloat16).
        tflite: whether to run the TFLite check.
        tflite_atol: absolute tolerance between LiteRT and Keras outputs.
        mixed_atol: absolute tolerance between half-precision and float32 outputs.
    """
    inputs = [np.asarray(x, np.float32) for x in _as_list(input_data)]
    feed = inputs if len(inputs) > 1 else inputs[0]

    # 1. config round trip, on a built layer (build must not change the config).
    layer, model = _layer_model(layer_cls, init_kwargs, inputs)
    assert_json_config_roundtrip(layer)
    expected = _numpy(model(feed, training=False))
    assert expected.dtype == np.float32 and np.all(np.isfinite(expected))
    symbolic_shape = tuple(model.output.shape)  # from compute_output_shape / _spec
    assert len(symbolic_shape) == expected.ndim and all(
        s is None or s == e for s, e in zip(symbolic_shape, expected.shape)), symbolic_shape

    # 2. .keras round trip: same weights, same outputs.
    loaded = _save_and_load(model)
    assert isinstance(loaded.layers[-1], layer_cls)
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(_numpy(b), _numpy(a))
    np.testing.assert_allclose(_numpy(loaded(feed, training=False)), expected, rtol=0, atol=1e-6)

    # 3. a training step (through a Dense in front when the layer has no weights).
    keras.utils.set_random_seed(1)
    prefix = None
    if not layer.trainable_weights:
        prefix = keras.layers.Dense(inputs[0].shape[-1], name="prefix")
    _, train_model = _layer_model(layer_cls, init_kwargs, inputs, prefix)
    target = np.random.default_rng(0).normal(size=expected.shape).astype("float32")
    _train_one_step(train_model, feed, target, keras.losses.MeanSquaredError())

    # 4. mixed precision: the documented output dtype, close to float32 (same weights).
    for policy in MIXED_POLICIES:
        with _global_policy(policy):
            mixed, mixed_model = _layer_model(layer_cls, init_kwargs, inputs)
            mixed_model.set_weights(model.get_weights())
            for weight in mixed.weights:
                assert weight.dtype == "float32", (policy, weight.path, weight.dtype)
            got = mixed_model(feed, training=False)
            want = "float32" if output_dtype == "float32" else mixed.compute_dtype
            assert keras.backend.standardize_dtype(got.dtype) == want, (policy, got.dtype)
            np.testing.assert_allclose(_numpy(got).astype(np.float32), expected,
                                       atol=mixed_atol)

    # 5. TFLite with builtin ops only, equal to Keras.
    if tflite:
        np.testing.assert_allclose(tflite_outputs(model, inputs), expected, rtol=0,
                                   atol=tflite_atol)
    return model


def tflite_outputs(model, inputs):
    """`model` converted with TFLITE_BUILTINS only, run on LiteRT on `inputs`."""
    from ai_edge_litert.interpreter import Interpreter

    from kdml.export.tflite import check_builtin_ops

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    content = converter.convert()
    check_builtin_ops(content, model.name)
    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    assert len(details) == len(inputs)
    for detail in details:  # inputs are named input_<i> by `_layer_model`
        index = int(detail["name"].split("input_")[-1].split(":")[0])
        interpreter.set_tensor(detail["index"], inputs[index])
    interpreter.invoke()
    (out,) = interpreter.get_output_details()
    return interpreter.get_tensor(out["index"])


def run_loss_test(loss_cls, init_kwargs, y_true, build_model, x):
    """The contract for one loss.

    Args:
        loss_cls: the loss class.
        init_kwargs: constructor arguments.
        y_true: the labels of the batch.
        build_model: () -> a tiny `keras.Model` whose output is the loss' `y_pred`.
        x: the model's float32 input batch.
    """
    # 1. config round trip.
    loss = loss_cls(**init_kwargs)
    assert_json_config_roundtrip(loss)

    keras.utils.set_random_seed(1)
    model = build_model()
    y_pred = model(x, training=False)
    value = loss(y_true, y_pred)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert tuple(value.shape) == () and np.isfinite(float(value))

    # 2. .keras round trip of a model compiled with the loss.
    model.compile(optimizer="sgd", loss=loss, jit_compile=False)
    loaded = _save_and_load(model)
    assert type(loaded.loss) is loss_cls and loaded.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(float(loaded.loss(y_true, loaded(x, training=False))),
                               float(value), rtol=1e-6)

    # 3. a training step: the logged loss is the loss before the step, weights move.
    np.testing.assert_allclose(_train_one_step(model, x, y_true, loss_cls(**init_kwargs)),
                               float(value) + sum(float(p) for p in model.losses), rtol=1e-5)

    # 4. mixed precision: y_pred in the policy's compute dtype, a float32 loss of it.
    for policy in MIXED_POLICIES:
        with _global_policy(policy):
            compute_dtype = keras.mixed_precision.global_policy().compute_dtype
            half = keras.ops.cast(y_pred, compute_dtype)
            got = loss_cls(**init_kwargs)(y_true, half)
        assert keras.backend.standardize_dtype(got.dtype) == "float32", (policy, got.dtype)
        rounded = keras.ops.cast(half, "float32")
        np.testing.assert_allclose(float(got), float(loss_cls(**init_kwargs)(y_true, rounded)),
                                   rtol=1e-5, atol=1e-6)
    return loss


def run_regularizer_test(regularizer_cls, init_kwargs, weight_shape):
    """The contract for one weight regularizer, on a Dense kernel of `weight_shape` (in, out).

    The training step starts where the data loss (MSE to the model's own outputs) has
    zero gradient, so the step and the logged loss are the penalty's alone.
    """
    regularizer = regularizer_cls(**init_kwargs)
    assert_json_config_roundtrip(regularizer)

    def build():
        inputs = keras.Input((weight_shape[0],), batch_size=4)
        dense = keras.layers.Dense(weight_shape[1], kernel_regularizer=regularizer_cls(
            **init_kwargs), kernel_initializer="random_normal", name="dense")
        return keras.Model(inputs, dense(inputs))

    keras.utils.set_random_seed(1)
    model = build()
    x = np.random.default_rng(0).normal(size=(4, weight_shape[0])).astype("float32")
    model(x)
    kernel = model.get_layer("dense").kernel
    penalty = regularizer(kernel)
    assert keras.backend.standardize_dtype(penalty.dtype) == "float32"
    assert tuple(penalty.shape) == () and float(penalty) > 0
    np.testing.assert_allclose(float(model.losses[0]), float(penalty), rtol=1e-6)

    # .keras round trip: the loaded kernel carries the same regularizer and penalty.
    loaded = _save_and_load(model)
    loaded_layer = loaded.get_layer("dense")
    assert type(loaded_layer.kernel_regularizer) is regularizer_cls
    assert loaded_layer.kernel_regularizer.get_config() == regularizer.get_config()
    loaded(x)
    np.testing.assert_allclose(float(loaded.losses[0]), float(penalty), rtol=1e-6)

    # training step: only the penalty has a gradient (the targets are the outputs).
    target = _numpy(model(x))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="mse",
                  jit_compile=False)
    before = kernel.numpy().copy()
    logged = float(np.ravel(model.train_on_batch(x, target))[0])
    np.testing.assert_allclose(logged, float(penalty), rtol=1e-5)
    assert np.abs(kernel.numpy() - before).max() > 0

    # mixed precision: a half-precision weight gives the float32 penalty of its rounding.
    for policy in MIXED_POLICIES:
        with _global_policy(policy):
            half = keras.ops.cast(before, keras.mixed_precision.global_policy().compute_dtype)
            got = regularizer_cls(**init_kwargs)(half)
            assert keras.backend.standardize_dtype(got.dtype) == "float32", (policy, got.dtype)
        np.testing.assert_allclose(float(got), float(regularizer(keras.ops.cast(half, "float32"))),
                                   rtol=1e-5)
    return regularizer
