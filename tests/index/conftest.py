"""A tiny untrained conv4 embedder (16 px, d = 16) and a folder of 72 glyph PNGs
(12 classes x 6), shared by the index tests."""

import keras
import pytest

import kdml
from tests.helpers import write_glyph_folder

IMAGE_SIZE = 16
EMBEDDING_DIM = 16


@pytest.fixture(scope="session")
def index_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("index_assets")
    keras.utils.set_random_seed(0)
    embedder = kdml.models.build_embedder("conv4", embedding_dim=EMBEDDING_DIM,
                                          image_size=IMAGE_SIZE)
    model = str(root / "embedder.keras")
    embedder.save(model)
    keras.utils.set_random_seed(1)
    other = kdml.models.build_embedder("conv4", embedding_dim=EMBEDDING_DIM, image_size=IMAGE_SIZE)
    other_model = str(root / "other.keras")
    other.save(other_model)
    wide = kdml.models.build_embedder("conv4", embedding_dim=8, image_size=IMAGE_SIZE)
    wide_model = str(root / "d8.keras")
    wide.save(wide_model)
    folder = write_glyph_folder(root / "gallery")
    return {"root": root, "model": model, "other_model": other_model, "d8_model": wide_model,
            "folder": folder, "source": f"folder:{folder}"}
