"""`tools/bench_backbones.py`: the phone table in docs/export.md is the one its JSON
renders to, and a backbone that fails to convert keeps its row with the error."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import bench_backbones  # noqa: E402


def _between_markers(text):
    return text.split(bench_backbones.START, 1)[1].split(bench_backbones.END, 1)[0].strip()


def test_the_docs_table_regenerates_from_the_committed_json():
    with open(os.path.join(ROOT, "docs", "results", "backbones_phone.json")) as f:
        results = json.load(f)
    with open(os.path.join(ROOT, "docs", "export.md")) as f:
        doc = f.read()
    assert _between_markers(doc) == bench_backbones.render_table(results)
    assert set(results["rows"]) <= set(bench_backbones.BACKBONES)


def test_a_failed_conversion_is_a_row_with_the_converters_error(tmp_path):
    row = {"backbone": "siglip_base", "keras_hub_class": "SigLIPVisionEncoder",
           "image_size": 224, "parameters": 93_000_000,
           "float16": {"size_bytes": 3 * 2 ** 20, "latency_ms": 12.345, "cosine_mean": 1.0,
                       "cosine_min": 1.0, "load_average": 1.5},
           "int8": {"error": "ConverterError: 'tfl.pow' op is neither a custom op nor a flex op"}}
    table = bench_backbones.render_table({"meta": {}, "rows": {"siglip_base": row}})
    line = next(line for line in table.splitlines() if line.startswith("| siglip_base "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:9] == ["93.0", "3.0", "-", "12.3", "-", "-"]
    assert "int8: ConverterError: 'tfl.pow' op is neither" in cells[10] and "load 1.5" in cells[10]
    assert "| dinov2_small | | | | | | | | | | not measured |" in table  # every name has a row

    doc = tmp_path / "export.md"
    doc.write_text(f"before\n{bench_backbones.START}\nold\n{bench_backbones.END}\nafter\n")
    bench_backbones.write_table(str(doc), table)
    assert doc.read_text() == (f"before\n{bench_backbones.START}\n{table}\n"
                               f"{bench_backbones.END}\nafter\n")
