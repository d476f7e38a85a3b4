"""The embedding floor: load an embedder of any format, read an image set, embed it.

Below evaluation, `kdml.index` and `kdml.export`, which all use it through these names:

    load_embedder(path) -> LoadedEmbedder     .keras, SavedModel directory or .tflite
    load_image_embedder(path)                 the same, with a fixed (N, S, S, 3) input
    read_image_set(spec, split)               synthetic, tfds:<name>, folder:<dir>
    load_source(spec)                         a gallery source (folder: every class), or an ImageSet
    read_image_files(paths, gallery_labels, gallery_paths)
                                              files labelled in a gallery's terms
    image_subset(image_set, rows), load_uint8(image_set, image_size)
    embed_image_set(embedder, image_set)      (N, d) float32, in batches
    model_fingerprint(embedder)               what identifies an embedder's vectors
    read_gallery(path)                        a saved gallery index's items (no search)

Modules: `loading.py`, `metadata.py` (an exported file's kdml metadata),
`fingerprint.py`, `image_sets.py`, `query_labels.py`, `embed.py`, `gallery_files.py`
(the saved gallery index format).
"""

from kdml.embedding.embed import PROGRESS_MIN_IMAGES, embed_image_set
from kdml.embedding.fingerprint import model_fingerprint
from kdml.embedding.gallery_files import IndexFormatError, StoredGallery, read_gallery
from kdml.embedding.image_sets import (SPLITS, image_subset, load_source, load_uint8,
                                       read_image_files, read_image_set)
from kdml.embedding.loading import (FORMATS, LoadedEmbedder, detect_format, load_embedder,
                                    load_image_embedder, load_tflite)
from kdml.embedding.query_labels import label_query_files

__all__ = ["FORMATS", "IndexFormatError", "LoadedEmbedder", "PROGRESS_MIN_IMAGES", "SPLITS",
           "StoredGallery", "detect_format", "embed_image_set", "image_subset",
           "label_query_files", "load_embedder", "load_image_embedder", "load_source", "load_tflite",
           "load_uint8", "model_fingerprint", "read_gallery", "read_image_files",
           "read_image_set"]
