"""One benchmark run: its specification, cache key, cached result and execution.

A run is `kdml.training.train(TrainConfig(...))` on one split, evaluated on another:
Recall@1, MAP@R and R-Precision (`kdml.evaluation.retrieval_metrics`, leave-one-out over
the evaluation split) and, on test, the 20-way within-group one-shot accuracy of Lake
et al. (`kdml.evaluation.few_shot_accuracy`, groups = the top-level folder). Each run
executes in its own Python process (clean TensorFlow state) and its result is one small
JSON file, `<results_dir>/runs/<method>/<stage>-<index>-<key>.json`.

The key hashes everything that defines the run, so that nothing can go stale:
- the full resolved configuration (`resolved_config`: every TrainConfig field after
  `TrainConfig.resolved`, so a changed default changes the key);
- the files of both splits (`ClassSplit.fingerprint`: class names, each file's relative
  path and size) and the evaluation settings;
- the code (`code_fingerprint`: every kdml source file outside `kdml/benchmark/`, plus the
  source of the functions here that train, evaluate and re-rank a run), so a changed code
  path re-runs;
- the versions of TensorFlow, Keras and NumPy (`library_versions`).
A cached file is trusted only if the configuration the run itself resolved (stored as
`resolved_config`) equals the one predicted here; otherwise `cached_result` raises a
`StaleRunError` naming the field. The run process recomputes the fingerprint and refuses
to start if the sources changed after the benchmark computed its keys. A run that fails
(an exception, or a non-finite loss or metric) writes no result; the protocol writes a
failure record `<stage>-<index>-<key>.failed.json` beside where it would be
(`failure_path`: config, seed, error, step), which the report counts per row.

A run that saved a pair scorer (PDDM's `pddm.keras` beside `embedder.keras`) can also be
re-ranked (`rerank_in_subprocess`, `python -m kdml.benchmark _rerank`): reranked
Recall@1 for several top-k depths from one scoring pass over its evaluation split.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import ast
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Dict, Mapping, Optional

from kdml import layers  # noqa: F401  registers the PDDM layers for loading
from kdml.config import TrainConfig
from kdml.data.pipeline import eval_dataset
from kdml.data.sources.folder import load_folder
from kdml.evaluation import few_shot_accuracy
from kdml.evaluation.protocols import top_level_groups
from kdml.evaluation.rerank import pair_scorer, select_top_k
from kdml.training import embed, train

# The fields that locate a run rather than define it; never part of the key.
_NOT_IN_KEY = ("dataset", "eval_dataset", "output_dir", "verbose", "resume", "verify_images",
               "eval_every", "checkpoint_every_steps", "keep_checkpoints", "data_dir", "download")
KEY_VERSION = 3
LIBRARIES = ("tensorflow", "keras", "numpy")


class StaleRunError(ValueError):
    """A cached run that no longer matches what the protocol would run now."""


def resolved_config(config: Mapping) -> Dict:
    """Every TrainConfig field of `config` after `TrainConfig.resolved` (its data kind's
    and method's defaults filled in), location fields (`_NOT_IN_KEY`) left out.

    The data kind is `config["data_kind"]`, else "photo" (what a folder dataset is).
    """

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in config if k not in fields)
    if unknown:
        raise ValueError(f"Run config fields {unknown} are not TrainConfig fields.")
    train_config = TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                  for k, v in config.items()})
    resolved = train_config.resolved(config.get("data_kind") or "photo")
    return {k: _plain(v) for k, v in sorted(dataclasses.asdict(resolved).items())
            if k not in _NOT_IN_KEY}


_RUN_FUNCTIONS = ("train_and_evaluate", "embed_folder", "rerank_evaluation")
RUNS_MODULE = "benchmark/runs.py"  # where _RUN_FUNCTIONS live, relative to the package


def fingerprint_sources(sources: Mapping[str, bytes]) -> str:
    """sha1 (12 hex digits) of kdml's sources `{path relative to the package: bytes}`.

    Hashes the path and bytes of every `*.py` outside `benchmark/` (the protocol's choices
    reach a run only through its key's other parts), plus the source text of this
    module's `train_and_evaluate`, `embed_folder` and `rerank_evaluation` as
    `sources[RUNS_MODULE]` holds them. The same function serves a checkout
    (`code_fingerprint`) and a commit's files (`tools/rekey_benchmark_runs.py`).
    """
    digest = hashlib.sha1()
    for relative in sorted(sources):
        if relative.endswith(".py") and not relative.startswith("benchmark/"):
            digest.update(relative.encode() + b"\0" + sources[relative] + b"\0")
    text = sources[RUNS_MODULE].decode()
    lines = text.splitlines(keepends=True)
    functions = {node.name: node for node in ast.parse(text).body
                 if isinstance(node, ast.FunctionDef)}
    for name in _RUN_FUNCTIONS:
        if name not in functions:
            raise ValueError(f"{RUNS_MODULE} defines no function {name}.")
        node = functions[name]
        digest.update("".join(lines[node.lineno - 1:node.end_lineno]).encode())
    return digest.hexdigest()[:12]


def package_sources(package_dir: str) -> Dict[str, bytes]:
    """`{relative path: bytes}` of every `*.py` under `package_dir`."""
    sources = {}
    for path in sorted(glob.glob(os.path.join(package_dir, "**", "*.py"), recursive=True)):
        with open(path, "rb") as f:
            sources[os.path.relpath(path, package_dir).replace(os.sep, "/")] = f.read()
    return sources


@functools.lru_cache(maxsize=None)
def code_fingerprint(package_dir: Optional[str] = None) -> str:
    """`fingerprint_sources` of this checkout's kdml package: the code a run executes."""
    package_dir = package_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return fingerprint_sources(package_sources(package_dir))


@functools.lru_cache(maxsize=None)
def library_versions() -> Dict[str, str]:
    """`{"tensorflow", "keras", "numpy": installed version}` (part of every run key), read
    from the installed packages' metadata without importing them."""
    from importlib import metadata

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one run trains and where it is evaluated.

    Attributes:
        method: the benchmark row (e.g. "so_proxy"), not necessarily `config["method"]`.
        stage: "trial" (train -> validation) or "final" (train+validation -> test).
        index: trial number, or the seed of a final run.
        config: the run's TrainConfig fields (dataset paths and output dir excluded).
        train_split, eval_split, train_fingerprint, eval_fingerprint: split names and
            hashes of their classes (`ClassSplit.fingerprint`).
        one_shot: `{"n_way", "episodes"}` of the one-shot evaluation, or None.
        code: `code_fingerprint()` of the sources that run it ("" = this checkout's).
        versions: `library_versions()` it runs with (None = this environment's).
    """

    method: str
    stage: str
    index: int
    config: Mapping
    train_split: str
    eval_split: str
    train_fingerprint: str
    eval_fingerprint: str
    one_shot: Optional[Mapping] = None
    code: str = ""
    versions: Optional[Mapping] = None

    def __post_init__(self):
        if not self.code:
            object.__setattr__(self, "code", code_fingerprint())
        if self.versions is None:
            object.__setattr__(self, "versions", dict(library_versions()))

    @property
    def resolved(self) -> Dict:
        """`resolved_config(self.config)`: the full configuration the run will train with."""
        return resolved_config(self.config)

    @property
    def key(self) -> str:
        """sha1 of everything that defines the run (12 hex digits)."""
        payload = {"version": KEY_VERSION, "code": self.code, "config": self.resolved,
                   "versions": dict(self.versions),
                   "train": [self.train_split, self.train_fingerprint],
                   "eval": [self.eval_split, self.eval_fingerprint],
                   "one_shot": dict(self.one_shot) if self.one_shot else None}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def result_path(self, results_dir: str) -> str:
        return os.path.join(results_dir, "runs", self.method,
                            f"{self.stage}-{self.index}-{self.key}.json")

    def to_json(self) -> Dict:
        return {**dataclasses.asdict(self), "config": {k: _plain(v) for k, v in self.config.items()},
                "versions": dict(self.versions), "key": self.key}


def failure_path(spec: RunSpec, results_dir: str) -> str:
    """`<results_dir>/runs/<method>/<stage>-<index>-<key>.failed.json`: the failure record
    of `spec` (never read as a result)."""
    return spec.result_path(results_dir)[:-len(".json")] + ".failed.json"


class RunFailed(RuntimeError):
    """A run process that ended without a result: `error` (its last error line) and `step`
    (the global training step it stopped at, None when unknown)."""

    def __init__(self, message: str, error: str = "", step: Optional[int] = None):
        super().__init__(message)
        self.error, self.step = error, step


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def cached_result(spec: RunSpec, results_dir: str) -> Optional[Dict]:
    """The stored result of `spec`, None if it has not run.

    Raises:
        StaleRunError: the stored run resolved another configuration than `spec.resolved`
            (it names the first differing field), or ran other code.
    """
    path = spec.result_path(results_dir)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    check_result_matches(spec, result, path)
    return result


def check_result_matches(spec: RunSpec, result: Mapping, path: str) -> None:
    """Raises `StaleRunError` when `result` (stored at `path`) is not a run of `spec`."""
    if result.get("code") != spec.code:
        raise StaleRunError(
            f"{path}: ran kdml code {result.get('code')!r}, not this checkout's {spec.code!r}. "
            "Delete the file to re-run it.")
    if result.get("versions") not in (None, dict(spec.versions)):
        raise StaleRunError(
            f"{path}: ran with {result.get('versions')}, not {dict(spec.versions)}. Delete "
            "the file to re-run it.")
    if "resolved_config" not in result:
        raise StaleRunError(
            f"{path}: stores no resolved_config, so the configuration it trained cannot be "
            "checked. Delete the file to re-run it.")
    stored, expected = result["resolved_config"], spec.resolved
    for field in sorted(set(stored) | set(expected)):
        if field in _NOT_IN_KEY:
            continue
        if stored.get(field, "<missing>") != expected.get(field, "<missing>"):
            raise StaleRunError(
                f"{path}: resolved_config field {field!r} is {stored.get(field, '<missing>')!r} "
                f"in the cached run, {expected.get(field, '<missing>')!r} in what the protocol "
                "runs now. Delete the file to re-run it.")


def write_json_atomic(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def run_folder(spec: RunSpec, scratch_dir: str) -> str:
    """`<scratch_dir>/<method>/<stage>-<index>-<key>`: the run's request, log and `run/` output."""
    return os.path.join(scratch_dir, spec.method, f"{spec.stage}-{spec.index}-{spec.key}")


def execute_in_subprocess(spec: RunSpec, train_dir: str, eval_dir: str, scratch_dir: str) -> Dict:
    """Trains and evaluates `spec` in a fresh `python -m kdml.benchmark _run` process.

    Checkpoints, the embedder and the process log go to `<scratch_dir>/<method>/<stage>-
    <index>-<key>/`; returns the result dict (metrics and wall time). A failed run
    raises a RuntimeError that quotes the end of its log.
    """
    work = run_folder(spec, scratch_dir)
    os.makedirs(work, exist_ok=True)
    request = os.path.join(work, "request.json")
    write_json_atomic(request, {"spec": spec.to_json(), "train_dir": train_dir,
                                "eval_dir": eval_dir, "output_dir": os.path.join(work, "run")})
    if os.path.exists(os.path.join(work, "failure.json")):  # an earlier attempt's
        os.remove(os.path.join(work, "failure.json"))
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    with open(os.path.join(work, "log.txt"), "w") as log:
        code = subprocess.run([sys.executable, "-m", "kdml.benchmark", "_run", request],
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    if code != 0:
        with open(os.path.join(work, "log.txt")) as f:
            tail = f.read()[-2000:]
        failure = {}
        if os.path.exists(os.path.join(work, "failure.json")):
            with open(os.path.join(work, "failure.json")) as f:
                failure = json.load(f)
        raise RunFailed(f"Run {spec.method} {spec.stage} {spec.index} failed (exit {code}); "
                        f"log {work}/log.txt ends with:\n{tail}",
                        failure.get("error") or f"exit {code}", failure.get("step"))
    with open(os.path.join(work, "result.json")) as f:
        return {**json.load(f), "wall_s": wall}


def train_and_evaluate(spec: RunSpec, train_dir: str, eval_dir: str, output_dir: str) -> Dict:
    """Runs `spec` in this process: `kdml.training.train`, then the evaluation metrics."""
    import numpy as np

    epochs = spec.config.get("epochs", TrainConfig.epochs)
    # Trials evaluate on validation after every epoch (the curves of the budget rule);
    # final runs read test once, at the end.
    config = TrainConfig(**{**spec.config, "dataset": f"folder:{train_dir}",
                            "eval_dataset": f"folder:{eval_dir}", "output_dir": output_dir,
                            "verbose": 0, "verify_images": False, "resume": True,
                            "eval_every": 1 if spec.stage.startswith("trial") else epochs})
    history = train(config)
    final = history["final"]
    result = {"metrics": {k: float(final[k]) for k in ("recall@1", "map@r", "r_precision")}}
    bad = [k for k, v in result["metrics"].items() if not math.isfinite(v)]
    if bad:
        step = f", global step {epochs * config.steps_per_epoch}" if config.steps_per_epoch else ""
        raise FloatingPointError(f"non-finite metric {', '.join(bad)} at the end of training "
                                 f"(epoch {epochs}{step})")
    if spec.one_shot:
        resolved = history["config"]
        test, embeddings = embed_folder(output_dir, eval_dir, image_size=resolved["image_size"],
                                        crop_fraction=resolved["eval_crop_fraction"])
        groups = top_level_groups(test.class_names, test.labels)
        n_way = int(spec.one_shot["n_way"])
        classes_per_group = {g: len(set(test.labels[groups == g])) for g in set(groups.tolist())}
        keep = np.array([classes_per_group[g] >= n_way for g in groups.tolist()])
        if not keep.any():
            raise ValueError(
                f"One-shot evaluation: no test group has n_way={n_way} classes "
                f"(largest: {max(classes_per_group.values())}). Lower n_way or name larger test groups.")
        shot = few_shot_accuracy(embeddings[keep], test.labels[keep], n_way=n_way, k_shot=1,
                                 num_episodes=int(spec.one_shot["episodes"]), groups=groups[keep],
                                 seed=0)
        result["metrics"]["one_shot"] = shot["accuracy"]
        result["one_shot_ci95"] = shot["ci95"]
        names = sorted({test.class_names[c].split("/")[0] for c in set(test.labels[keep].tolist())})
        result["one_shot_groups"] = names
    last = history["epochs"].get(str(epochs), {})
    result["train_log"] = {k: float(v) for k, v in last.items()}
    result["curve"] = {e: float(logs["recall@1"]) for e, logs in sorted(
        history["epochs"].items(), key=lambda item: int(item[0])) if "recall@1" in logs}
    result["loss_curve"] = {e: float(logs["loss"]) for e, logs in sorted(
        history["epochs"].items(), key=lambda item: int(item[0])) if "loss" in logs}
    result["resolved_config"] = {k: _plain(v) for k, v in history["config"].items()
                                 if k not in ("dataset", "eval_dataset", "output_dir")}
    return result


def run_request_file(request_path: str) -> None:
    """Entry point of the run process (`python -m kdml.benchmark _run <request.json>`)."""
    with open(request_path) as f:
        request = json.load(f)
    fields = {f.name for f in dataclasses.fields(RunSpec)}
    spec_json = {k: v for k, v in request["spec"].items() if k in fields}
    spec = RunSpec(**spec_json)
    try:
        if spec.code != code_fingerprint():
            raise StaleRunError(
                f"The kdml sources changed after the benchmark keyed this run (fingerprint "
                f"{code_fingerprint()}, keyed {spec.code}). Re-run the benchmark so that every "
                "run of a comparison uses one version of the code.")
        if dict(spec.versions) != library_versions():
            raise StaleRunError(f"The run was keyed with {dict(spec.versions)}; this process has "
                                f"{library_versions()}. Run the benchmark in one environment.")
        result = train_and_evaluate(spec, request["train_dir"], request["eval_dir"],
                                    request["output_dir"])
    except Exception as error:  # the protocol's failure record: the error and its step
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:500]
        found = re.search(r"global step (\d+)", str(error))
        write_json_atomic(os.path.join(os.path.dirname(request_path), "failure.json"),
                          {"error": message, "step": int(found[1]) if found else None})
        raise
    write_json_atomic(os.path.join(os.path.dirname(request_path), "result.json"), result)


RERANK_ARTIFACTS = ("embedder.keras", "pddm.keras")


def rerank_in_subprocess(spec: RunSpec, result: Mapping, eval_dir: str, depths,
                         scratch_dir: str) -> Optional[Dict]:
    """Re-ranks run `spec` (already executed) in a fresh `python -m kdml.benchmark _rerank`.

    Reads `<run_folder>/run/{embedder,pddm}.keras` and embeds `eval_dir` with the image
    size and crop of `result["resolved_config"]`. Returns `{"rerank_recall@1": {"<depth>":
    R@1}, "rerank_wall_s": s}`, or None when either model file is missing. A failed
    evaluation raises a RuntimeError that quotes the end of its log.
    """
    work = run_folder(spec, scratch_dir)
    run_dir = os.path.join(work, "run")
    if not all(os.path.isfile(os.path.join(run_dir, name)) for name in RERANK_ARTIFACTS):
        return None
    resolved = result.get("resolved_config") or {}
    image_size = resolved.get("image_size") or spec.config.get("image_size")
    if not image_size:
        raise RuntimeError(f"Re-ranking {work}: its result names no image_size (resolved_config).")
    request = os.path.join(work, "rerank-request.json")
    output = os.path.join(work, "rerank.json")
    write_json_atomic(request, {"run_dir": run_dir, "eval_dir": eval_dir, "image_size": image_size,
                                "crop_fraction": resolved.get("eval_crop_fraction", 0.875),
                                "depths": [int(d) for d in depths], "output": output})
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    log_path = os.path.join(work, "rerank-log.txt")
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, "-m", "kdml.benchmark", "_rerank", request],
                              stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - start
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-2000:]
        raise RuntimeError(f"Re-ranking {spec.method} {spec.stage} {spec.index} failed (exit {code}); "
                           f"log {log_path} ends with:\n{tail}")
    with open(output) as f:
        return {**json.load(f), "rerank_wall_s": wall}


def embed_folder(run_dir: str, folder: str, *, image_size: int, crop_fraction: float,
                 batch_size: Optional[int] = None):
    """`(dataset, (N, d) embeddings)` of the folder dataset `folder` by
    `<run_dir>/embedder.keras`, centre-cropped and resized as the run evaluated it."""
    import keras

    images = load_folder(folder, verify_images=False)
    embedder = keras.saving.load_model(os.path.join(run_dir, "embedder.keras"), compile=False)
    options = {} if batch_size is None else {"batch_size": batch_size}
    return images, embed(embedder, eval_dataset(images, image_size=image_size,
                                                 crop_fraction=crop_fraction, **options))


def rerank_evaluation(run_dir: str, eval_dir: str, *, image_size: int, crop_fraction: float = 0.875,
                      depths=(1, 2, 4, 8, 16, 32), batch_size: int = 256) -> Dict:
    """Reranked Recall@1 of a saved run for each depth, in this process.

    Loads `<run_dir>/embedder.keras` (images -> (N, d)) and `<run_dir>/pddm.keras`
    (`[(n, d), (n, d)] -> (n,)` scores), embeds the folder dataset `eval_dir` as the run
    evaluated it (`eval_dataset`, centre crop `crop_fraction`, `image_size` px), and re-ranks
    each image's top-`depth` cosine neighbours, leave-one-out (`select_top_k`, one scoring
    pass). Depth 1 is the embedding's own Recall@1; depths above N - 1 are dropped.

    Returns:
        `{"rerank_recall@1": {"<depth>": float}}`.
    """
    import keras

    images, embeddings = embed_folder(run_dir, eval_dir, image_size=int(image_size),
                                      crop_fraction=crop_fraction, batch_size=batch_size)
    scorer = keras.saving.load_model(os.path.join(run_dir, "pddm.keras"), compile=False)
    kept = sorted({int(d) for d in depths if 1 <= int(d) <= len(images.labels) - 1})
    if not kept:
        raise ValueError(f"No re-ranking depth in {tuple(depths)} fits {len(images.labels)} images.")
    _, recalls = select_top_k(embeddings, images.labels, pair_scorer(scorer), candidates=kept, k=1)
    return {"rerank_recall@1": {str(d): float(recalls[d]) for d in kept}}


def rerank_request_file(request_path: str) -> None:
    """Entry point of `python -m kdml.benchmark _rerank <request.json>`; writes its "output"."""
    with open(request_path) as f:
        request = json.load(f)
    result = rerank_evaluation(request["run_dir"], request["eval_dir"],
                               image_size=request["image_size"],
                               crop_fraction=request["crop_fraction"], depths=request["depths"])
    write_json_atomic(request["output"], result)
