"""tf.distribute for kdml: strategies by name, the worker's role, per-replica input.

- `create_strategy(name)`: "auto" | "one_device" | "mirrored" | "multi_worker".
- `worker_role(strategy)`: this process's worker index, the number of workers and
  whether it is the chief (the one process that writes checkpoints, logs,
  metrics.json and embedder.keras).
- `describe_strategy(strategy, role)`: one line for the run's header.
- `distribute_batches(strategy, make_worker_dataset, global_batch)`: feeds each
  replica its contiguous rows of the global batch, every worker loading only its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")

_TF_CONFIG_EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
    '"task": {"type": "worker", "index": 0}}\'')


def parse_tf_config(environ=os.environ) -> dict:
    """The `TF_CONFIG` of this process, checked: cluster workers and this task.

    Raises:
        ValueError: TF_CONFIG is missing, not JSON, or lacks `cluster.worker` /
            `task.type` / `task.index`, or the index is out of range; the message
            shows a valid example.
    """
    raw = environ.get("TF_CONFIG")
    fix = f"Set it on every worker, e.g. {_TF_CONFIG_EXAMPLE} (index 1 on the second)."
    if not raw:
        raise ValueError(f"--strategy=multi_worker needs the TF_CONFIG environment variable. {fix}")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: {raw!r}. {fix}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    workers = (cluster or {}).get("worker") if isinstance(cluster, dict) else None
    if not isinstance(workers, list) or not workers or not isinstance(task, dict):
        raise ValueError(f"TF_CONFIG needs `cluster.worker` (a list of host:port) and `task`. "
                         f"Received: {raw!r}. {fix}")
    task_type, index = task.get("type"), task.get("index")
    members = cluster.get(task_type) if isinstance(task_type, str) else None
    if not isinstance(members, list) or not isinstance(index, int) or not 0 <= index < len(members):
        raise ValueError(f"TF_CONFIG `task` must name a cluster job and an index into it. "
                         f"Received: task={task!r}, cluster={cluster!r}. {fix}")
    return tf_config


def create_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Builds the strategy `name`.

    - "auto": MirroredStrategy when more than one GPU is visible, else the default
      (single-device) strategy.
    - "one_device": the first GPU, or the CPU.
    - "mirrored": MirroredStrategy over all GPUs; without GPUs, over all logical
      CPU devices (tests split the CPU in two to exercise it).
    - "multi_worker": MultiWorkerMirroredStrategy over the processes listed in
      `TF_CONFIG` (all GPUs of each, or its CPU). Must be created before any other
      TensorFlow op runs in the process (collectives are configured at start-up).
    """
    if name == "multi_worker":
        parse_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        if gpus:
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    raise ValueError(f"Unknown strategy {name!r}. Valid strategies: {', '.join(STRATEGIES)}.")


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """This process's place in the job: worker `index` of `count`, chief or not."""

    index: int = 0
    count: int = 1
    is_chief: bool = True


def worker_role(strategy: tf.distribute.Strategy) -> WorkerRole:
    """The role of this process; a single-process strategy is worker 0 of 1, chief.

    With MultiWorkerMirroredStrategy the chief is the task of type "chief", or
    worker 0 when the cluster has no "chief" job (Keras' multi-worker rule).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return WorkerRole()
    spec = resolver.cluster_spec().as_dict()
    jobs = [job for job in ("chief", "worker") if job in spec]
    order = [(job, i) for job in jobs for i in range(len(spec[job]))]
    me = (resolver.task_type, int(resolver.task_id))
    index = order.index(me) if me in order else 0
    return WorkerRole(index=index, count=len(order), is_chief=index == 0)


def describe_strategy(strategy: tf.distribute.Strategy, role: WorkerRole = WorkerRole()) -> str:
    """One line naming the strategy and its devices, e.g. "MirroredStrategy, 2 replicas
    on GPU:0, GPU:1", "one device, CPU:0" or "MultiWorkerMirroredStrategy, 4 replicas:
    2 workers x 2 devices (GPU:0, GPU:1 here); this is worker 0, the chief"."""
    if not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy():
        return f"one device, {'GPU:0' if tf.config.list_logical_devices('GPU') else 'CPU:0'}"
    devices = [f"{spec.device_type}:{spec.device_index}" for spec in
               map(tf.DeviceSpec.from_string, strategy.extended.worker_devices)]
    replicas = strategy.num_replicas_in_sync
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return (f"MultiWorkerMirroredStrategy, {replicas} replicas: {role.count} workers x "
                f"{len(devices)} device{'s' * (len(devices) > 1)} ({', '.join(devices)} here); "
                f"this is worker {role.index}{', the chief' if role.is_chief else ''}")
    return (f"{type(strategy).__name__}, {replicas} replica{'s' * (replicas > 1)} on "
            f"{', '.join(devices)}")


def check_replica_batch(global_batch: int, strategy: tf.distribute.Strategy) -> None:
    """Raises a ValueError naming the fix unless the batch splits evenly over replicas."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ValueError(
            f"The global batch P x K = {global_batch} does not split evenly over "
            f"{replicas} replicas. Choose --classes_per_batch (P) and --images_per_class (K) "
            f"with P x K a multiple of {replicas} (P a multiple of the number of workers keeps "
            "each worker's rows to whole classes).")


def distribute_batches(strategy: tf.distribute.Strategy,
                       make_worker_dataset: Callable[[int, int], tf.data.Dataset],
                       global_batch: int):
    """Feeds every replica its rows of each global batch.

    `make_worker_dataset(shard_index, num_shards)` returns the dataset of this
    worker's rows `[w * B / W, (w + 1) * B / W)` of every global batch (B rows, W
    workers). Its batches are split into the worker's L local replicas in order, so
    global replica `w * L + l` gets rows `[(w * L + l) * B / R, ...)`: the replicas
    together see exactly the single-process global batch, in the replica order of
    `all_gather`. A single-replica strategy gets the plain dataset.

    Returns:
        A `tf.data.Dataset` (one replica) or a `tf.distribute.DistributedDataset`
        that `model.fit` takes as is.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return make_worker_dataset(0, 1)
    check_replica_batch(global_batch, strategy)
    per_replica = global_batch // replicas

    def dataset_fn(context: tf.distribute.InputContext):
        local = replicas // context.num_input_pipelines

        @tf.autograph.experimental.do_not_convert  # no control flow; AutoGraph warns on it
        def split(*batch):
            parts = [tf.reshape(t, [local, per_replica, *t.shape[1:]]) for t in batch]
            return tf.data.Dataset.from_tensor_slices(tuple(parts))

        dataset = make_worker_dataset(context.input_pipeline_id, context.num_input_pipelines)
        return dataset.flat_map(split).prefetch(tf.data.AUTOTUNE)

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def local_cluster(num_workers: int, host: str = "127.0.0.1") -> list:
    """TF_CONFIG values (JSON strings) of `num_workers` processes on this machine.

    Each worker gets a free port (bound once by the OS, then released); process i
    runs with `TF_CONFIG=local_cluster(n)[i]`. For tests, benchmarks and one-machine
    multi-process runs; several machines list their own host:port pairs.
    """
    import socket

    sockets = [socket.socket() for _ in range(num_workers)]
    try:
        for s in sockets:
            s.bind((host, 0))
        addresses = [f"{host}:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()
    return [json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": i}})
            for i in range(num_workers)]


def fix_multi_worker_build(model) -> None:
    """Lets `model.fit` start under MultiWorkerMirroredStrategy (Keras 3.15 bug).

    Before training, Keras' TF trainer pulls one distributed batch and
    `strategy.reduce("MEAN", (x, y))`s it only to learn the input shapes
    (`_maybe_symbolic_build`); MultiWorkerMirroredStrategy cannot reduce a nest
    of PerReplica values and fit fails with "Attempt to convert a value
    (PerReplica ...)" (keras-team/keras#20585, tensorflow/tensorflow#72388).
    This replaces that step, for this model only, by the same symbolic build on
    this worker's first replica batch (shapes and dtypes are all it needs).

    Second, the trainer reduces the step's logs with `reduce("MEAN", v, axis=0)`
    under multi-worker (`reduce_per_replica(..., "auto")`, not configurable),
    which fails on scalar logs ("Invalid reduction dimension 0"). The train step
    therefore returns each scalar log as shape (1,): the reduction then averages
    over replicas and returns the scalar Keras expects.

    No-op under other strategies.
    """
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        logs = train_step(data)
        return {k: tf.reshape(v, [1]) if getattr(v, "shape", None) == () else v
                for k, v in logs.items()}

    model.train_step = train_step_with_vector_logs

    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if data_batch is None and iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


# --- inside a replica: the global batch of a batch-level loss or layer -----------------


def _peer_replica_context():
    """The replica context when this code runs inside one with peers, else None."""
    if tf.distribute.in_cross_replica_context():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def num_replicas_in_sync():
    """Number of replicas computing this step together (1 outside a replica context)."""
    context = _peer_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def all_gather(tensor):
    """Concatenates `tensor` over replicas along axis 0: (b, ...) -> (R * b, ...).

    Inside a `tf.distribute` replica context with more than one replica this is
    `get_replica_context().all_gather(tensor, axis=0)`, in replica order; its gradient
    sums the upstream gradient over replicas and slices back this replica's rows.
    Anywhere else (no strategy, one replica, cross-replica context) it returns `tensor`.
    """
    context = _peer_replica_context()
    if context is None:
        return tensor
    return context.all_gather(tensor, axis=0)
