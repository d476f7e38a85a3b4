"""`kdml.evaluate --projector`: the files TensorBoard's projector plugin reads, read by the plugin."""

import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from google.protobuf import text_format
from PIL import Image
from tensorboard.plugins import base_plugin
from tensorboard.plugins.projector import ProjectorConfig
from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
from werkzeug.test import Client

import kdml  # noqa: F401
from kdml.data import eval_dataset, load_dataset
from kdml.evaluation.projector import sprite_cell_size, sprite_image, write_projector
from kdml.embedding import embed_image_set
from kdml.evaluation.protocols import evaluate_model
from kdml.export import load_embedder
from kdml.models import build_embedder
from tests.helpers import write_glyph_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _NoRuns:
    """A TensorBoard data provider without runs: the plugin then reads the logdir itself."""

    def list_runs(self, ctx, experiment_id):
        return []


def _plugin_get(directory, route, **params):
    """What the projector plugin serves for `route` of the logdir `directory`."""
    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=directory, data_provider=_NoRuns()))
    response = Client(plugin.get_plugin_apps()[route]).get("/", query_string=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data()


def _read_config(directory):
    config = ProjectorConfig()
    with open(os.path.join(directory, "projector_config.pbtxt")) as f:
        text_format.Parse(f.read(), config)
    return config


def test_sprite_cells_are_the_thumbnails_in_row_major_order():
    thumbnails = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3)
    sprite = sprite_image(thumbnails)
    assert sprite.shape == (6, 6, 3)  # ceil(sqrt(5)) = 3 cells of 2 px
    for i in range(5):
        row, col = divmod(i, 3)
        np.testing.assert_array_equal(sprite[2 * row:2 * row + 2, 2 * col:2 * col + 2], thumbnails[i])
    assert (sprite[4:, 2:] == 255).all()  # cells 7 and 8 are empty (white)
    # The cell shrinks so the sprite stays within TensorBoard's 8192 px: 142 x 57 = 8094.
    assert sprite_cell_size(10_000) == 64 and sprite_cell_size(20_000) == 57


def test_the_plugin_serves_the_written_embeddings_metadata_and_sprite(tmp_path):
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(7, 5)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    thumbnails = rng.integers(0, 256, size=(7, 4, 4, 3), dtype=np.uint8)
    write_projector(str(tmp_path), embeddings, labels, ["cat", "dog\tx", "emu"], thumbnails)

    config = _read_config(str(tmp_path))
    (info,) = config.embeddings
    assert list(info.tensor_shape) == [7, 5] and list(info.sprite.single_image_dim) == [4, 4]
    served = np.frombuffer(_plugin_get(str(tmp_path), "/tensor", run=".", name="embeddings"),
                           dtype=np.float32).reshape(7, 5)
    np.testing.assert_array_equal(served, embeddings)  # float32 exact through the TSV
    lines = _plugin_get(str(tmp_path), "/metadata", run=".", name="embeddings").decode().splitlines()
    assert lines == ["class\tclass_id", "cat\t0", "dog x\t1", "emu\t2", "cat\t0", "dog x\t1",
                     "emu\t2", "cat\t0"]
    sprite = np.array(Image.open(io.BytesIO(
        _plugin_get(str(tmp_path), "/sprite_image", run=".", name="embeddings"))))
    assert sprite.shape == (3 * 4, 3 * 4, 3)  # single_image_dim x ceil(sqrt(7))
    np.testing.assert_array_equal(sprite[4:8, 0:4], thumbnails[3])


@pytest.fixture(scope="module")
def embedder_path(tmp_path_factory):
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("projector_model") / "embedder.keras")
    build_embedder("conv4", embedding_dim=8, image_size=16).save(path)
    return path


def test_evaluate_writes_the_evaluated_embeddings_of_a_sample(tmp_path, embedder_path):
    folder = write_glyph_folder(tmp_path / "glyphs")
    out = str(tmp_path / "projector")
    report = evaluate_model(embedder_path, f"folder:{folder}", "test", projector_dir=out,
                            projector_points=20, verification=False)
    assert report["projector"] == {"directory": out, "points": 20, "thumbnail": 64}

    test_set = load_dataset(f"folder:{folder}").test
    evaluated = embed_image_set(load_embedder(embedder_path), test_set)
    served = np.frombuffer(_plugin_get(out, "/tensor", run=".", name="embeddings"),
                           dtype=np.float32).reshape(20, 8)
    # Each point is one evaluated image's embedding, in the image set's order.
    rows = [int(np.flatnonzero((evaluated == row).all(axis=1))[0]) for row in served]
    assert rows == sorted(set(rows)) and len(rows) == 20
    lines = _plugin_get(out, "/metadata", run=".", name="embeddings").decode().splitlines()
    assert lines[0] == "class\tclass_id" and len(lines) == 21
    assert lines[1:] == [f"{test_set.class_names[c]}\t{c}" for c in test_set.labels[rows]]
    sprite = np.array(Image.open(os.path.join(out, "sprite.png")))
    assert sprite.shape == (5 * 64, 5 * 64, 3)  # 20 points: a 5 x 5 grid of 64 px cells
    # The last point's cell (3, 4) holds its image, centre square resized to 64 px.
    image = next(iter(eval_dataset(test_set, image_size=64, crop_fraction=1.0).unbatch()
                      .skip(rows[19]).take(1)))[0].numpy()
    np.testing.assert_array_equal(sprite[3 * 64:4 * 64, 4 * 64:5 * 64], np.round(image).astype(np.uint8))


@pytest.mark.slow
def test_command_line_projector(tmp_path, embedder_path):
    folder = write_glyph_folder(tmp_path / "glyphs")
    result = subprocess.run(
        [sys.executable, "-m", "kdml.evaluate", f"--model={embedder_path}",
         f"--dataset=folder:{folder}", "--projector", "--verification=false",
         f"--output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300,
        cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = str(tmp_path / "out" / "eval_test_projector")
    assert f"Wrote projector: {out} (36 points; tensorboard --logdir {out})" in result.stdout
    (info,) = _read_config(out).embeddings
    assert list(info.tensor_shape) == [36, 8] and info.sprite.image_path == "sprite.png"
