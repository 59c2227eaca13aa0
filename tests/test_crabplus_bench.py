"""`edgeav bench` on Crab+: its rows, per-task stage times and ratios to torch fp32, the mask IoU column,
tables and JSON.

Fast: crabplus-tiny, torch rows only (onnx and tensorrt rows at a precision they do not offer, so they say
why without exporting). No assertion reads a time: only that times exist and relate as defined.
"""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch
from rich.console import Console

from edgeav.bench.timing import run_row
from edgeav.errors import OptionError
from edgeav.systems.crabplus import bench
from edgeav.systems.crabplus.tasks import mask_prompt

STAGES = {"s4": ("audio", "visual", "prefill", "decode", "per_token", "mask", "end_to_end"),
          "ave": ("audio", "visual", "prefill", "decode", "per_token", "end_to_end")}
TOKENS = 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One quick Crab+ bench: torch fp32 (the reference) and bf16; onnx and tensorrt bf16, which say why not."""
    json_path = tmp_path_factory.mktemp("crabplus-bench") / "bench.json"
    options = bench.make_options(preset="crabplus-tiny", random_weights=True, formats="torch,onnx,tensorrt",
                                 precisions="bf16", repeats=1, warmup=0, tokens=TOKENS, eval_n=1,
                                 json_path=json_path)
    result = bench.run_bench(options)
    result.write_json(json_path)
    return result, json.loads(json_path.read_text())


def test_rows_start_with_the_reference_and_say_why_one_did_not_run(report):
    _, data = report
    assert data["system"] == "crabplus" and data["model"].startswith("crabplus-tiny")
    rows = data["rows"]
    assert [row["name"] for row in rows] == ["torch fp32", "torch bf16", "onnx bf16", "tensorrt bf16"]
    assert rows[0]["status"] == rows[1]["status"] == "ok"
    offered = ", ".join(bench._export_precisions("onnx"))
    assert rows[2]["status"] == f"skipped: Crab+'s onnx engines offer {offered}"
    assert rows[3]["status"] == "skipped: TensorRT builds here offer fp32, fp16, int8; bf16 is not one of them"
    for row in rows[:2]:
        assert row["decode_steps"] == TOKENS and len(row["runs"]) == 1
        for task, stages in STAGES.items():  # every row decodes the forced tokens in both tasks
            assert row["runs"][0][f"{task}.decode_steps"] == TOKENS
            for stage in stages:
                assert row["stages_ms"][f"{task}.{stage}"]["p50"] > 0, (row["name"], task, stage)
            assert row["stages_ms"][f"{task}.per_token"]["p50"] == pytest.approx(
                row["stages_ms"][f"{task}.decode"]["p50"] / TOKENS)
        assert "ave.mask" not in row["stages_ms"]  # AVE draws no mask
        decode_ms = sum(row["runs"][0][f"{task}.decode"] for task in STAGES)
        assert row["decode_tokens_per_s"] == pytest.approx(1000 * 2 * TOKENS / decode_ms)
        assert row["size_kind"] == "memory" and row["peak_rss_bytes"] > 0
    assert rows[1]["size_bytes"] * 2 == pytest.approx(rows[0]["size_bytes"], rel=0.01)  # bf16 holds half


def test_every_row_runs_the_same_prompts_and_a_mask_from_the_fixed_answer(report):
    _, data = report
    tasks = data["tasks"]
    assert set(tasks) == {"s4", "ave"} and all(tasks[t]["forced_tokens"] == TOKENS for t in tasks)
    assert tasks["ave"]["prompt_tokens"] > tasks["s4"]["prompt_tokens"] > 64 + 25  # 10 frames vs one, 10 s vs 2 s
    prompt = mask_prompt(tasks["s4"]["answer"], "s4")
    assert prompt is not None and len(prompt.points) == 3  # SAM2 ran on the fixed box and points
    # The quality column: SAM2's masks against torch fp32's (the reference against itself: 1).
    assert data["rows"][0]["metric"] == 1.0 and 0.0 <= data["rows"][1]["metric"] <= 1.0


def test_ratios_divide_the_reference_p50_by_the_rows(report):
    _, data = report
    reference, bf16 = data["rows"][:2]
    expected = {f"{task}.{stage}" for task, stages in STAGES.items() for stage in stages if stage != "decode"}
    assert set(reference["ratios"]) == expected | {"end_to_end"}
    assert all(value == 1.0 for value in reference["ratios"].values())
    for key in expected:
        assert bf16["ratios"][key] == pytest.approx(reference["stages_ms"][key]["p50"] / bf16["stages_ms"][key]["p50"])
    assert bf16["ratios"]["end_to_end"] == pytest.approx(reference["end_to_end_s"]["p50"] / bf16["end_to_end_s"]["p50"])


def test_tables_fit_100_columns_with_a_line_per_task_and_the_plot_is_a_png(report, tmp_path):
    result, _ = report
    console = Console(file=io.StringIO(), width=100)
    for table in bench.tables(result):
        console.print(table)
    for line in bench.footer(result):
        console.print(line, highlight=False)
    out = console.file.getvalue()
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert "ratio to torch fp32" in out and "warm-up run(s) excluded" in " ".join(out.split())
    for name in ("torch fp32", "torch bf16"):  # in both tables: an s4 line, then an ave line
        assert len(re.findall(rf" {name} .* s4 .*\n .* ave .*", out)) == 2, out
    assert "[1] onnx bf16: skipped: Crab+'s onnx engines offer" in " ".join(out.split())
    from PIL import Image

    with Image.open(bench.write_plot(result, tmp_path / "bench.png")) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_without_the_export_an_onnx_row_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "edgeav.systems.crabplus.export", None)  # as if export.py were absent
    options = bench.make_options(random_weights=True)
    assert options.rows() == [("torch", "fp32"), ("torch", "bf16"), ("onnx", "fp32")]
    row = bench.Row("onnx fp32", "onnx", "fp32")
    run_row(row, bench._Context(options, None, torch.device("cpu"), tmp_path, lambda message: None), bench.ROW_BUILDERS)
    assert row.status == "skipped: Crab+ has no onnx export yet"


@pytest.mark.parametrize("values, needles", [
    (dict(preset="crabplus-tiny"), ["crabplus-tiny", "--random-weights"]),
    (dict(preset="crabplus-tinny", random_weights=True), ["crabplus-tiny"]),
    (dict(random_weights=True, project="orin-nano"), ["--project", "Crab+"]),
    (dict(random_weights=True, precisions="fp32,fp33"), ["--precisions", "fp33"]),
    (dict(random_weights=True, tokens=1), ["--tokens"]),
])
def test_bad_options_are_refused_before_anything_loads(values, needles):
    with pytest.raises(OptionError) as error:
        bench.make_options(**values)
    for needle in needles:
        assert needle in str(error.value)
