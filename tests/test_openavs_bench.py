"""`edgeav bench` on OpenAVS: its rows, the per-frame stage times of each variant, the ratios to torch fp32,
tables and JSON.

Fast: openavs-tiny, the torch fp32 row only (other systems' bench tests cover the rows that say why they
do not run). No assertion reads a time: only that times exist and relate as defined.
"""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from edgeav.systems.openavs import bench


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    json_path = tmp_path_factory.mktemp("openavs-bench") / "bench.json"
    options = bench.make_options(preset="openavs-tiny", random_weights=True, formats="torch",
                                 precisions="fp32", repeats=1, warmup=0, tokens=2, json_path=json_path)
    result = bench.run_bench(options)
    result.write_json(json_path)
    return result, json.loads(json_path.read_text())


def test_every_variant_is_timed_stage_by_stage_per_frame(report):
    _, data = report
    assert data["system"] == "openavs" and data["frames"] == 2
    names = [row["name"] for row in data["rows"]]
    assert names == ["torch fp32"]
    reference = data["rows"][0]
    assert reference["status"] == "ok" and len(reference["runs"]) == 1
    stages = reference["stages_ms"]
    for variant in bench.VARIANTS:
        assert stages[f"{variant}.per_frame"]["p50"] > 0
        parts = sum(stages[f"{variant}.{stage}"]["p50"] for stage in bench.STAGES[:-1])
        assert parts <= stages[f"{variant}.per_frame"]["p50"] * 1.001  # the stages lie inside the frame's time
    assert stages["lite.describe_image"]["p50"] == 0 and stages["default.describe_image"]["p50"] > 0
    assert stages["edge.translate"]["p50"] == 0 and stages["large.translate"]["p50"] > 0
    assert stages["lite.boxes"]["p50"] > 0 and stages["lite.mask"]["p50"] > 0  # lite goes straight to the detector
    assert reference["ratios"]["lite.per_frame"] == 1.0
    run = reference["runs"][0]
    assert run["lite.boxes_per_frame"] > 0 and run["default.boxes_per_frame"] == 0  # no <answer>: no detector
    assert bench.OpenAVSBenchOptions.export_precisions("onnx") == ("fp32", "fp16", "int8", "int4")


def test_tables_and_footer_print(report):
    result, _ = report
    console = Console(file=io.StringIO(), width=100)
    for table in bench.tables(result):
        console.print(table)
    for line in bench.footer(result):
        console.print(line)
    text = console.file.getvalue()
    assert "lite" in text and "large" in text and "frame" in text
    assert "boxes per frame above the 0.25 threshold" in text
