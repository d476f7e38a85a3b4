"""Export: SavedModel and (quantized) TFLite embedders, parity report, loading any format.

Public API:
    load_embedder(path) -> LoadedEmbedder      .keras, SavedModel directory or .tflite
                                               (kdml.embedding's, re-exported)
    export_embedder(...)                       SavedModel + TFLite files + sidecar JSON
    parity_report(...), format_parity_table    each exported file against the Keras model
    run_export(...)                            the whole `python -m kdml.export` job

Command line: `python -m kdml.export --model=embedder.keras --output_dir=...`.
"""

from kdml.embedding import FORMATS, LoadedEmbedder, detect_format, load_embedder
from kdml.export.exporter import export_embedder
from kdml.export.parity import ParityError, format_parity_table, parity_report
from kdml.export.tflite import QUANTIZATIONS
from kdml.export.workflow import run_export

__all__ = ["FORMATS", "LoadedEmbedder", "ParityError", "QUANTIZATIONS", "detect_format",
           "export_embedder", "format_parity_table", "load_embedder", "parity_report",
           "run_export"]
