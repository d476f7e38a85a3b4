"""CrossBatchMemory and its MemoryQueue: the queue's contents after wrap-around, the loss
against the memory, errors, the queue in checkpoints (resume with the same queue), and a
2-replica run equal to one process (same weights, the same queue on every replica).

Step-by-step agreement with pytorch-metric-learning's CrossBatchMemory is in
tests/losses/test_pml_agreement.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.losses import (ContrastiveLoss, CrossBatchMemory, MultiSimilarityLoss, ProxyAnchorLoss,
                         SupConLoss, TripletMarginLoss)
from kdml.losses.cross_batch_memory import MemoryQueue
from kdml.training.checkpointing import restore_checkpoint, save_checkpoint
from tests.helpers import assert_config_roundtrip
from tests.losses import pair_references as ref


def test_queue_contents_after_wrap_around():
    queue = MemoryQueue(memory_size=5, embedding_size=2)
    written = []
    for step in range(4):  # 4 batches of 2 into 5 rows: rows 0-1, 2-3, 4-0, 1-2
        labels = np.array([10 * step, 10 * step + 1])
        emb = np.full((2, 2), float(step), "float32") + np.array([[0.0], [0.5]], "float32")
        got_labels, got_emb, filled, positions = queue.enqueue(labels, emb)
        written.append(positions.numpy().tolist())
        assert filled.numpy().tolist() == [i < 2 * (step + 1) for i in range(5)]
        np.testing.assert_array_equal(got_labels.numpy(), queue.labels.numpy())
    assert written == [[0, 1], [2, 3], [4, 0], [1, 2]]
    # Newest rows win: row 0 <- step 2's second row, rows 1-2 <- step 3, rows 3-4 older.
    np.testing.assert_array_equal(queue.labels.numpy(), [21, 30, 31, 11, 20])
    np.testing.assert_array_equal(queue.embeddings.numpy()[:, 0], [2.5, 3.0, 3.5, 1.5, 2.0])
    assert int(queue.count.numpy()) == 8
    assert all(not w.trainable for w in queue.weights)


def test_memory_of_one_batch_gives_the_plain_loss_value():
    # With M = B the memory is exactly the batch (own rows excluded): the plain loss.
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    for inner in (TripletMarginLoss(margin=0.4), SupConLoss(), ContrastiveLoss(),
                  MultiSimilarityLoss(base=0.0)):
        emb = rng.normal(size=(8, 4)).astype("float32")
        if isinstance(inner, MultiSimilarityLoss):
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        xbm = CrossBatchMemory(inner, embedding_size=4, memory_size=8)
        for _ in range(2):  # and again once the memory is full
            np.testing.assert_allclose(float(xbm(labels, emb)), float(inner(labels, emb)),
                                       rtol=1e-6)


def test_loss_against_the_memory_equals_the_numpy_loop_on_the_union():
    # SupCon of the second batch's queries against the memory = both batches: written
    # out per query over the union, the query's own row left out. Each class has one
    # image per batch, so every positive comes from the first batch (memory).
    rng = np.random.default_rng(5)
    first = rng.normal(size=(4, 3)).astype("float32")
    second = rng.normal(size=(4, 3)).astype("float32")
    labels1, labels2 = np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3])
    xbm = CrossBatchMemory(SupConLoss(temperature=0.5), embedding_size=3, memory_size=16)
    xbm(labels1, first)
    got = float(xbm(labels2, second))
    # Per query of `second`: positives = its class in `first`, candidates = the other 7 rows.
    union = np.concatenate([second, first])
    union = union / np.linalg.norm(union, axis=1, keepdims=True)
    union_labels = np.concatenate([labels2, labels1])
    terms = []
    for i in range(4):
        others = [j for j in range(8) if j != i]
        logits = {j: float(union[i] @ union[j]) / 0.5 for j in others}
        log_denominator = np.log(sum(np.exp(v) for v in logits.values()))
        positives = [j for j in others if union_labels[j] == union_labels[i]]
        terms.append(-np.mean([logits[p] - log_denominator for p in positives]))
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)
    assert ref.supcon(labels2, second, temperature=0.5) == 0.0  # no positive inside the batch


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="pair-based"):
        CrossBatchMemory(ProxyAnchorLoss(), embedding_size=4)
    with pytest.raises(ValueError, match="memory_size=0"):
        CrossBatchMemory(ContrastiveLoss(), embedding_size=4, memory_size=0)
    xbm = CrossBatchMemory(ContrastiveLoss(), embedding_size=4, memory_size=3)
    with pytest.raises(ValueError, match=r"global batch \(4\) is larger"):
        xbm(np.arange(4), np.ones((4, 4), "float32"))
    with pytest.raises(ValueError, match="embedding_size=4"):
        xbm(np.arange(2), np.ones((2, 5), "float32"))


def test_config_round_trip_rebuilds_the_wrapped_loss():
    xbm = CrossBatchMemory(TripletMarginLoss(margin=0.3, mining="hard"), embedding_size=8,
                           memory_size=64)
    clone = assert_config_roundtrip(xbm)
    assert isinstance(clone.loss, TripletMarginLoss) and clone.loss.mining == "hard"
    assert clone.memory_size == 64 and clone.embedding_size == 8
    queue = assert_config_roundtrip(MemoryQueue(7, 3))
    assert queue.memory_size == 7


# --- the queue as model state: checkpoints, .keras, replicas ---------------------------

_X = np.random.default_rng(12).normal(size=(3, 8, 4)).astype("float32")  # 3 batches of 8
_Y = np.array([[0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 0, 0, 5, 5, 1, 1], [2, 2, 6, 6, 3, 3, 0, 0]])


def _model_and_loss(memory_size=12):
    """Dense embedder -> xbm.memory (identity); the queue is part of the model's weights."""
    xbm = CrossBatchMemory(ContrastiveLoss(pos_margin=0.1, neg_margin=1.2), embedding_size=3,
                           memory_size=memory_size)
    inputs = keras.Input(shape=(4,))
    model = keras.Model(inputs, xbm.memory(keras.layers.Dense(3, name="embedding")(inputs)))
    return model, xbm


def _fit(model, xbm, steps, first=0, strategy=None):
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=xbm, jit_compile=False)
    data = tf.data.Dataset.from_tensor_slices((_X[first:first + steps], _Y[first:first + steps]))
    if strategy is not None:
        data = strategy.experimental_distribute_dataset(data)
    model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)


def test_the_queue_is_saved_with_the_model_and_a_resumed_run_continues_with_it(tmp_path):
    keras.utils.set_random_seed(0)
    model, xbm = _model_and_loss()
    initial = model.get_weights()
    _fit(model, xbm, 3)  # uninterrupted: 3 steps, 24 rows through 12 (wraps around)
    whole = model.get_weights()
    assert int(xbm.memory.count.numpy()) == 24

    killed, xbm_killed = _model_and_loss()
    killed.set_weights(initial)
    _fit(killed, xbm_killed, 2)
    path = save_checkpoint(killed, str(tmp_path / "checkpoints"), 2, {"epoch": 0})
    # A new process: a fresh model and loss (empty queue) restored from the checkpoint.
    resumed, xbm_resumed = _model_and_loss()
    resumed.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=xbm_resumed)
    restore_checkpoint(resumed, path)
    assert int(xbm_resumed.memory.count.numpy()) == 16
    np.testing.assert_array_equal(xbm_resumed.memory.labels.numpy(),
                                  xbm_killed.memory.labels.numpy())
    np.testing.assert_array_equal(xbm_resumed.memory.embeddings.numpy(),
                                  xbm_killed.memory.embeddings.numpy())
    _fit(resumed, xbm_resumed, 1, first=2)
    for a, b in zip(whole, resumed.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-6)
    # The queue matters: resuming with an empty queue ends elsewhere.
    empty, xbm_empty = _model_and_loss()
    empty.set_weights([w for w in killed.get_weights()])
    xbm_empty.memory.count.assign(0)
    _fit(empty, xbm_empty, 1, first=2)
    assert max(np.abs(a - b).max() for a, b in zip(whole, empty.get_weights())) > 1e-4


def test_a_train_step_compiles_with_xla():
    # The memory has static shapes (full buffers and a mask of the filled rows).
    keras.utils.set_random_seed(0)
    model, xbm = _model_and_loss()
    reference, xbm_reference = _model_and_loss()
    reference.set_weights(model.get_weights())
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=xbm, jit_compile=True)
    reference.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=xbm_reference,
                      jit_compile=False)
    for step in range(3):
        a = model.train_on_batch(_X[step], _Y[step])
        b = reference.train_on_batch(_X[step], _Y[step])
        np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_array_equal(xbm.memory.labels.numpy(), xbm_reference.memory.labels.numpy())
    assert int(xbm.memory.count.numpy()) == 24


def test_the_queue_survives_a_keras_file(tmp_path):
    model, xbm = _model_and_loss()
    _fit(model, xbm, 2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    queue = loaded.get_layer("xbm_memory")
    assert isinstance(queue, MemoryQueue) and isinstance(loaded.loss, CrossBatchMemory)
    np.testing.assert_array_equal(queue.labels.numpy(), xbm.memory.labels.numpy())
    np.testing.assert_array_equal(queue.embeddings.numpy(), xbm.memory.embeddings.numpy())


def test_two_replicas_equal_one_process_and_hold_the_same_queue(mirrored):
    keras.utils.set_random_seed(0)
    model, xbm = _model_and_loss(memory_size=20)
    initial = model.get_weights()
    _fit(model, xbm, 3)
    with mirrored.scope():
        model2, xbm2 = _model_and_loss(memory_size=20)
        model2.set_weights(initial)
    _fit(model2, xbm2, 3, strategy=mirrored)
    assert max(np.abs(a - b).max() for a, b in zip(initial, model.get_weights())) > 1e-3
    for a, b in zip(model.get_weights(), model2.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-5)
    replicas = mirrored.experimental_local_results(xbm2.memory.embeddings.value)
    assert len(replicas) == 2
    for copy in replicas:
        np.testing.assert_allclose(copy.numpy(), xbm.memory.embeddings.numpy(), atol=1e-5)
    for copy in mirrored.experimental_local_results(xbm2.memory.labels.value):
        np.testing.assert_array_equal(copy.numpy(), xbm.memory.labels.numpy())
