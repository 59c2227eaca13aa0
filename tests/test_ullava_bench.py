"""`edgeav bench` on u-LLaVA: its rows, stage times and ratios to torch fp32, table, JSON and plot.

Fast: ullava-tiny, torch rows only (the onnx rows export: a ``slow`` test). No assertion reads a time:
only that times exist and relate as defined.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from edgeav.cli import main
from edgeav.systems.ullava.checkpoints import save_released, synthesize

STAGES = ("visual", "prefill", "decode", "per_token", "mask", "boxes")


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One fast u-LLaVA bench: torch fp32 (the reference) and bf16; onnx and tensorrt bf16, which say why not."""
    folder = tmp_path_factory.mktemp("ullava-bench")
    json_path, png_path = folder / "bench.json", folder / "bench.png"
    rc, out, err = run_cli("bench", "--preset", "ullava-tiny", "--random-weights", "--formats", "torch,onnx,tensorrt",
                           "--precisions", "bf16", "--repeats", "2", "--warmup", "0", "--tokens", "6", "--eval-n", "1",
                           "--json", json_path, "--plot", png_path)
    return rc, out, err, json_path, png_path


def test_rows_start_with_the_reference_and_say_why_one_did_not_run(bench_run):
    rc, out, err, json_path, _ = bench_run
    assert rc == 0, err
    report = json.loads(json_path.read_text())
    assert report["system"] == "ullava" and report["model"].startswith("ullava-tiny")
    rows = report["rows"]
    assert [row["name"] for row in rows] == ["torch fp32", "torch bf16", "onnx bf16", "tensorrt bf16"]
    assert rows[0]["status"] == rows[1]["status"] == "ok"
    assert rows[2]["status"] == "skipped: u-LLaVA's onnx engines offer fp32, fp16, int8, int4"
    assert rows[3]["status"] == "skipped: TensorRT builds here offer fp32, fp16, int8; bf16 is not one of them"
    for row in rows[:2]:
        assert row["decode_steps"] == 6 and len(row["runs"]) == 2  # every row decodes the forced tokens
        for stage in STAGES:
            assert row["stages_ms"][stage]["p50"] > 0, (row["name"], stage)
        assert row["decode_tokens_per_s"] == pytest.approx(1000 / row["stages_ms"]["per_token"]["p50"])
        assert 0.0 <= row["metric"] <= 1.0 and row["size_kind"] == "memory"
    # bf16 holds fewer bytes (GroundingDINO stays fp32 in a half-float run).
    assert rows[1]["size_bytes"] < rows[0]["size_bytes"]


def test_ratios_divide_the_reference_p50_by_the_rows(bench_run):
    _, _, _, json_path, _ = bench_run
    reference, bf16 = json.loads(json_path.read_text())["rows"][:2]
    assert set(reference["ratios"]) == {"visual", "prefill", "per_token", "mask", "boxes", "end_to_end"}
    assert all(value == 1.0 for value in reference["ratios"].values())
    for stage in ("visual", "prefill", "per_token", "mask", "boxes"):
        assert bf16["ratios"][stage] == pytest.approx(reference["stages_ms"][stage]["p50"] / bf16["stages_ms"][stage]["p50"])
    assert bf16["ratios"]["end_to_end"] == pytest.approx(reference["end_to_end_s"]["p50"] / bf16["end_to_end_s"]["p50"])


def test_tables_fit_100_columns_and_the_plot_is_a_png(bench_run):
    rc, out, _, _, png_path = bench_run
    assert max(len(line) for line in out.splitlines()) <= 100, out
    assert "ratio to torch fp32" in out and "warm-up run(s) excluded" in " ".join(out.split())
    positions = [out.index(name) for name in ("torch fp32", "torch bf16", "onnx bf16")]
    assert positions == sorted(positions)
    assert "[1] onnx bf16: skipped: u-LLaVA's onnx engines offer" in " ".join(out.split())
    from PIL import Image

    with Image.open(png_path) as image:
        assert image.format == "PNG" and image.size[0] > 300


@pytest.fixture(scope="module")
def ullava_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "ullava-tiny"
    save_released(synthesize("ullava-tiny", seed=2), folder)
    return folder


def test_a_checkpoint_is_benchmarked(ullava_checkpoint, tmp_path):
    json_path = tmp_path / "bench.json"
    rc, _, err = run_cli("bench", "--checkpoint", ullava_checkpoint, "--formats", "torch", "--repeats", "1", "--warmup",
                         "0", "--tokens", "2", "--eval-n", "0", "--json", json_path)
    assert rc == 0, err
    report = json.loads(json_path.read_text())
    assert report["model"].startswith(str(ullava_checkpoint)) and [r["name"] for r in report["rows"]] == ["torch fp32"]
    assert report["rows"][0]["metric"] is None and report["rows"][0]["decode_steps"] == 2


@pytest.mark.parametrize("args, needles", [
    (["--preset", "ullava-tiny"], ["ullava-tiny", "--random-weights"]),
    (["--preset", "ullava-tiny", "--random-weights", "--project", "orin-nano"], ["--project", "u-LLaVA"]),
    (["--preset", "ullava-tiny", "--random-weights", "--precisions", "fp32,fp33"], ["--precisions", "fp33"]),
    (["--checkpoint", "{ullava}", "--random-weights"], ["--random-weights", "--checkpoint"]),
    (["--checkpoint", "{crab}"], ["--checkpoint", "Crab"]),
    (["--checkpoint", "{missing}"], ["no such checkpoint folder"]),
])
def test_bad_options_end_with_one_line_and_exit_2(args, needles, ullava_checkpoint, tiny_released, tmp_path):
    args = [a.format(ullava=ullava_checkpoint, crab=tiny_released, missing=tmp_path / "none") for a in args]
    rc, _, err = run_cli("bench", *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow
def test_onnx_rows_run_from_an_export():
    from edgeav.systems.ullava.bench import make_options, run_bench

    report = run_bench(make_options(random_weights=True, formats="onnx", precisions="fp32", repeats=1, warmup=0,
                                    tokens=4, eval_n=2))
    reference, onnx = report.rows
    assert onnx.status == "ok" and onnx.size_kind == "disk" and onnx.size_bytes > 0
    assert "boxes" in onnx.stages_ms  # the engine holds ullava-tiny's GroundingDINO, run by ONNX Runtime
    assert onnx.ratios["mask"] == pytest.approx(reference.stages_ms["mask"]["p50"] / onnx.stages_ms["mask"]["p50"])
    # The same fp32 weights give the same forced masks, whichever runs them.
    assert onnx.metric == pytest.approx(reference.metric, abs=2e-3)
