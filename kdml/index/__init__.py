"""`kdml.index`: a gallery index of a trained embedder, exact or approximate.

    from kdml.index import GalleryIndex, build_index
    index = build_index("runs/default/embedder.keras", "folder:gallery/", "gallery.index",
                        backend="faiss")                      # or backend="exact"
    index = GalleryIndex.load("gallery.index")
    result = index.query(query_embeddings, k=5)             # indices, similarities, labels, paths

Command line: `python -m kdml.index build|query|evaluate --help`. The saved format
(`kdml.embedding.gallery_files`) is read by the LiteRT kit (`export/kdml_litert.py`) with
NumPy only.
"""

from kdml.embedding import IndexFormatError, model_fingerprint
from kdml.index.backends import BACKENDS, faiss_available, scann_available
from kdml.index.build import build_index
from kdml.index.gallery_index import GalleryIndex, QueryResult, check_embeddings

load_index = GalleryIndex.load

__all__ = ["BACKENDS", "GalleryIndex", "IndexFormatError", "QueryResult", "build_index",
           "check_embeddings", "faiss_available", "load_index", "model_fingerprint",
           "scann_available"]
