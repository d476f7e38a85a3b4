"""Cross-batch memory: the last M embeddings of the global batch as extra pairs
(Wang et al., CVPR 2020; docs/design.md 3.5.6)."""

import keras
from keras import ops

from kdml.losses._cross_replica import BatchLoss

_PAIR_LOSSES = ("TripletMarginLoss, ContrastiveLoss, CircleLoss, SupConLoss, NTXentLoss, "
                "MultiSimilarityLoss")


@keras.saving.register_keras_serializable(package="kdml")
class MemoryQueue(keras.layers.Layer):
    """The memory of `CrossBatchMemory`: a ring buffer of M embeddings and labels.

    An identity layer (its output is its input) whose non-trainable weights are the
    queue: `embeddings` (M, d) float32, `labels` (M,) int32 and `count` (the number of
    rows ever written, int64). Put it in the training model (`CrossBatchMemory.memory`
    after the embedder) and `model.save_weights` / kdml's checkpoints and `.keras` files
    hold the queue, so a resumed run continues with the same memory. Under
    MirroredStrategy each weight is mirrored with `aggregation="only_first_replica"`:
    every replica writes the same (all-gathered) rows, and every replica holds the same
    queue.

    Args:
        memory_size: M, rows kept.
        embedding_size: d.

    Shapes: call: any tensor -> the same tensor.

    Example:

    >>> queue = MemoryQueue(memory_size=3, embedding_size=2)
    >>> _ = queue.enqueue(np.array([4, 5]), np.ones((2, 2), "float32"))
    >>> _ = queue.enqueue(np.array([6, 7]), np.zeros((2, 2), "float32"))
    >>> queue.labels.numpy().tolist(), int(queue.count.numpy())
    ([7, 5, 6], 4)
    """

    def __init__(self, memory_size, embedding_size, **kwargs):
        super().__init__(**kwargs)
        self.memory_size = _positive_int(memory_size, "memory_size")
        self.embedding_size = _positive_int(embedding_size, "embedding_size")
        self.embeddings = self.add_weight(
            shape=(self.memory_size, self.embedding_size), initializer="zeros",
            dtype="float32", trainable=False, autocast=False,
            aggregation="only_first_replica", name="embeddings")
        self.labels = self.add_weight(
            shape=(self.memory_size,), initializer="zeros", dtype="int32", trainable=False,
            aggregation="only_first_replica", name="labels")
        self.count = self.add_weight(
            shape=(), initializer="zeros", dtype="int64", trainable=False,
            aggregation="only_first_replica", name="count")
        self.built = True  # the weights exist from the start (saved even before a call)

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def enqueue(self, labels, embeddings):
        """Writes (B,) labels and (B, d) embeddings (B <= M) after the newest rows.

        Returns (labels (M,), embeddings (M, d), filled (M,) bool, positions (B,)): the
        queue after the write, which of its rows hold data (the first min(count, M)), and
        the rows the batch went to. Shapes are static (XLA compiles it).
        """
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        embeddings = ops.stop_gradient(ops.cast(embeddings, "float32"))
        batch = ops.shape(labels)[0]
        if isinstance(batch, int) and batch > self.memory_size:
            raise ValueError(
                f"CrossBatchMemory: the global batch ({batch}) is larger than the memory "
                f"(memory_size={self.memory_size}). Fix: use memory_size >= the global batch.")
        if embeddings.shape[-1] is not None and embeddings.shape[-1] != self.embedding_size:
            raise ValueError(
                f"CrossBatchMemory: embeddings of size {embeddings.shape[-1]} for a memory of "
                f"embedding_size={self.embedding_size}. Fix: pass the embedder's output size.")
        count = ops.convert_to_tensor(self.count)
        start = ops.cast(count % self.memory_size, "int32")
        positions = (start + ops.arange(batch, dtype="int32")) % self.memory_size
        new_embeddings = ops.scatter_update(self.embeddings, positions[:, None], embeddings)
        new_labels = ops.scatter_update(self.labels, positions[:, None], labels)
        new_count = count + ops.cast(batch, "int64")
        self.embeddings.assign(new_embeddings)
        self.labels.assign(new_labels)
        self.count.assign(new_count)
        filled = ops.less(ops.arange(self.memory_size, dtype="int64"),
                          ops.minimum(new_count, self.memory_size))
        return new_labels, new_embeddings, filled, positions

    def load_own_variables(self, store):
        """As Layer's, but an empty entry is allowed: a `.keras` file saves the queue once,
        under the model's layer, and the compiled `CrossBatchMemory` that refers to the same
        layer gets an empty entry (its loaded copy then starts with an empty queue)."""
        if len(store.keys()) == 0:
            return
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update({"memory_size": self.memory_size, "embedding_size": self.embedding_size})
        return config


@keras.saving.register_keras_serializable(package="kdml")
class CrossBatchMemory(BatchLoss):
    """Cross-batch memory (XBM): a pair-based loss of the batch against the last M embeddings.

    Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020 (Sec. 3.3, the
    XBM loss with a memory of size M); docs/design.md 3.5.6. Each call writes the
    (global) batch into a ring buffer of M rows (detached: the memory carries no
    gradient), then returns `loss.pair_loss` of the batch (queries, with gradient)
    against the filled memory (references), which holds the batch itself; a query's own
    row is neither its positive nor its negative. This is pytorch-metric-learning's
    `CrossBatchMemory(loss, embedding_size, memory_size=1024)` (default M = 1024).
    Difference: with a mining loss (TripletMarginLoss `hard` / `semihard` /
    `easy_positive`, MultiSimilarityLoss) kdml mines after leaving out the query's own
    row; PML's wrapper mines first and removes it after (its own row is then a
    positive at distance 0 for the miner).

    The queue is the `memory` layer (`MemoryQueue`), whose weights are non-trainable
    state: build the training model as `keras.Model(x, xbm.memory(embedder(x)))` so that
    checkpoints and `.keras` files include it (kdml.train does). A resumed run restores
    the checkpoint into the same objects and continues with the same queue. After
    `keras.saving.load_model` the model's `xbm_memory` layer holds the saved queue but
    the reloaded loss has a fresh one: compile the loaded model with a new
    `CrossBatchMemory` and copy the weights if training must go on from a `.keras` file.
    Under MirroredStrategy the batch is all-gathered first (as the wrapped losses do),
    every replica writes the same rows and holds the same queue, and a distributed step
    equals the one-device step.

    Args:
        loss: A kdml pair-based loss: TripletMarginLoss, ContrastiveLoss, CircleLoss,
            SupConLoss, NTXentLoss or MultiSimilarityLoss (its own
            `gather_across_replicas` is not used).
        embedding_size: d, the embedding size.
        memory_size: M, the rows kept (default 1024, as PML); at least the global batch.
        gather_across_replicas: All-gather the batch across replicas (default True).
        name, **kwargs: As `keras.losses.Loss`.

    Shapes:
        y_true: int labels (B,) or (B, 1).
        y_pred: embeddings (B, d).
        Returns: a float32 scalar. `sample_weight` is not supported.

    Example: a memory of 4 rows; the second batch also sees the first batch's rows.

    >>> xbm = CrossBatchMemory(kdml.losses.ContrastiveLoss(), embedding_size=2, memory_size=4)
    >>> a = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    >>> round(float(xbm(np.array([0, 1]), a)), 4)  # one negative pair at distance sqrt(2)
    0.0
    >>> # now positives at sqrt(2) in memory (term 1.4142) and negatives at 0 (term 1)
    >>> round(float(xbm(np.array([0, 1]), a[::-1])), 4)
    2.4142
    """

    def __init__(self, loss, embedding_size, memory_size=1024, gather_across_replicas=True,
                 name="cross_batch_memory", **kwargs):
        super().__init__(gather_across_replicas=gather_across_replicas, name=name, **kwargs)
        if isinstance(loss, dict):
            loss = keras.saving.deserialize_keras_object(loss)
        if not callable(getattr(loss, "pair_loss", None)):
            raise ValueError(
                f"CrossBatchMemory wraps a pair-based kdml loss ({_PAIR_LOSSES}). Received: "
                f"loss={loss!r}. Fix: wrap one of these (proxy and classification losses "
                "have no pairs to remember).")
        self.loss = loss
        self.memory = MemoryQueue(memory_size, embedding_size, name="xbm_memory")

    @property
    def memory_size(self):
        return self.memory.memory_size

    @property
    def embedding_size(self):
        return self.memory.embedding_size

    def call(self, y_true, y_pred):
        labels, embeddings = self._maybe_gather(y_true, y_pred)  # (B,), (B, d)
        embeddings = self.loss.prepare(embeddings)
        ref_labels, ref_embeddings, filled, positions = self.memory.enqueue(labels, embeddings)
        slots = ops.arange(self.memory_size, dtype="int32")
        excluded = ops.logical_or(ops.equal(positions[:, None], slots[None, :]),  # (B, M)
                                  ops.logical_not(filled)[None, :])
        return self.loss.pair_loss(labels, embeddings, ref_labels, ref_embeddings, excluded)

    def get_config(self):
        config = super().get_config()
        config.update({"loss": keras.saving.serialize_keras_object(self.loss),
                       "embedding_size": self.embedding_size, "memory_size": self.memory_size})
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)


def _positive_int(value, name):
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"Expected `{name}` to be a positive integer. Received: {name}={value!r}")
    return int(value)

