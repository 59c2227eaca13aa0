"""``edgeav bench --llm-only``: the LLM alone against llama.cpp at the same bits (edgeav.bench.llm_bench).

Fast: the demo model's LLM (crab-tiny), one timed run per row, the export and GGUF caches in a temporary
folder. No assertion reads a time: only that times exist and relate as defined. The llama.cpp rows need
llama-cpp-python; without it they must say so, with the install command, and the rest run.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_cli import assert_user_error, cli

HAS_LLAMA_CPP = all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf"))


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    """One fast LLM-only bench on the demo model: torch, onnx and llama.cpp at fp32 and int4, short prompts."""
    from edgeav.bench.llm_bench import LLMBenchOptions, run_llm_bench

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEAV_CACHE", str(tmp_path_factory.mktemp("cache")))
        return run_llm_bench(LLMBenchOptions(formats=("torch", "onnx", "llama.cpp"), precisions=("fp32", "int4"),
                                             repeats=1, warmup=0, new_tokens=4, prompt_tokens=16, prefill_tokens=64,
                                             threads=2))


def rows_by_name(report) -> dict:
    return {row.name: row for row in report.rows}


def test_llm_only_rows_come_in_order_with_tokens_per_second_and_greedy_tokens(llm_run):
    names = [row.name for row in llm_run.rows]
    assert names == ["baseline: transformers fp32", "torch fp32", "torch int4", "onnx fp32", "onnx int4",
                     "llama.cpp F32", "llama.cpp Q4_0"]
    rows = rows_by_name(llm_run)
    assert rows["torch int4"].status.startswith("skipped: torch's weight-only int4")
    ran = [row for row in llm_run.rows if row.ok]
    assert {r.name for r in ran} >= {"baseline: transformers fp32", "torch fp32", "onnx fp32", "onnx int4"}
    for row in ran:
        assert row.decode_tok_s > 0 and row.prefill_tok_s > 0 and row.weight_bytes > 0, row.name
        assert len(row.greedy_ids) == 4 + 1 and row.greedy_reference == "torch fp32", row.name
        assert row.decode_tok_s == pytest.approx(4 / row.decode_s["p50"])
        assert row.prefill_tok_s == pytest.approx(64 / row.prefill_s["p50"])
    # onnx fp32 computes the reference's numbers: the same greedy tokens; so does transformers on the same tensors
    assert rows["onnx fp32"].greedy_match is True and rows["torch fp32"].greedy_match is True
    assert rows["baseline: transformers fp32"].greedy_match is True
    assert rows["onnx int4"].weight_bytes < rows["onnx fp32"].weight_bytes / 3
    assert any("LLM weights 4-bit (MatMulNBits" in note for note in rows["onnx int4"].notes)


def test_each_row_is_timed_beside_its_llama_cpp_peer(llm_run):
    from edgeav.bench.llm_bench import _measuring_order

    timed = [row.name for row in _measuring_order(llm_run.rows, ("fp32", "int4"))]
    assert timed == ["baseline: transformers fp32", "torch fp32", "onnx fp32", "llama.cpp F32", "torch int4",
                     "onnx int4", "llama.cpp Q4_0"]


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python or gguf not installed")
def test_llm_only_speedups_are_ratios_to_llama_cpp_at_the_same_bits(llm_run):
    rows = rows_by_name(llm_run)
    peer = rows["llama.cpp F32"]
    assert peer.ok and peer.speedup_vs_peer == {"decode": 1.0, "prefill": 1.0, "peer": "llama.cpp F32"}
    for name in ("torch fp32", "onnx fp32", "baseline: transformers fp32"):
        speedup = rows[name].speedup_vs_peer
        assert speedup["peer"] == "llama.cpp F32"
        assert speedup["decode"] == pytest.approx(rows[name].decode_tok_s / peer.decode_tok_s)
        assert speedup["prefill"] == pytest.approx(rows[name].prefill_tok_s / peer.prefill_tok_s)
    # crab-tiny's MLP is 344 wide: Q4_0's blocks of 32 do not fit, and the row says so; onnx int4 has no peer
    assert rows["llama.cpp Q4_0"].status.startswith("skipped: Q4_0 quantizes rows in blocks of 32")
    assert rows["onnx int4"].speedup_vs_peer is None
    assert llm_run.llama_cpp["n_threads"] == llm_run.llama_cpp["n_threads_batch"] == 2
    assert peer.size_kind == "disk" and peer.weight_bytes < peer.size_bytes


def test_llm_only_command_writes_the_table_and_json_with_machine_threads_and_versions(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEAV_CACHE", str(tmp_path / "cache"))
    json_path = tmp_path / "llm.json"
    result = cli(capsys, "bench", "--llm-only", "--formats", "llama.cpp,tensorrt", "--precisions", "fp32",
                 "--repeats", "1", "--warmup", "0", "--tokens", "2", "--threads", "2", "--json", json_path)
    assert result.rc == 0, result.err
    report = json.loads(json_path.read_text())
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    assert report["hardware"]["cpu"] == cpu and report["hardware"]["threads"] == 2
    assert {"llama_cpp", "gguf", "onnxruntime", "torch"} <= set(report["versions"])
    assert [row["name"] for row in report["rows"]] == ["baseline: transformers fp32", "llama.cpp F32", "tensorrt fp32"]
    assert report["rows"][0]["status"] == "ok" and report["rows"][2]["status"].startswith("skipped:")
    assert report["options"]["prompt_tokens"] == 128 and report["options"]["prefill_tokens"] == 720
    assert all(len(line) <= 100 for line in result.out.splitlines()), "the table must fit 100 columns"
    # skipped rows are footnoted in order: llama.cpp's too where llama-cpp-python is missing
    note = 1 if HAS_LLAMA_CPP else 2
    assert f"skip [{note}]" in result.out and f"[{note}] tensorrt fp32: skipped:" in result.out
    if HAS_LLAMA_CPP:
        assert report["rows"][1]["status"] == "ok" and report["llama_cpp"]["version"] == report["versions"]["llama_cpp"]
        assert "llama.cpp (llama-cpp-python" in result.out


def test_missing_llama_cpp_skips_its_rows_with_the_install_command_and_the_rest_run(monkeypatch, tmp_path):
    from edgeav.bench.llm_bench import LLMBenchOptions, run_llm_bench

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without llama-cpp-python imports
    monkeypatch.setenv("EDGEAV_CACHE", str(tmp_path))
    report = run_llm_bench(LLMBenchOptions(formats=("torch", "llama.cpp"), precisions=("fp32",), repeats=1,
                                           warmup=0, new_tokens=2))
    baseline, torch_row, peer = report.rows
    assert baseline.ok and torch_row.ok and torch_row.speedup_vs_peer is None
    assert peer.status.startswith("skipped: llama-cpp-python not installed; pip install")
    assert peer.decode_tok_s is None and not report.llama_cpp


@pytest.mark.parametrize("args, needles", [
    (["--formats", "torch,llama.cpp"], ["--formats llama.cpp", "--llm-only"]),
    (["--llm-only", "--formats", "llamacpp"], ["llamacpp", "llama.cpp"]),
    (["--llm-only", "--plot", "{tmp}/chart.png"], ["--plot", "drop"]),
    (["--llm-only", "--device", "cuda"], ["--device", "cpu"]),
    (["--llm-only", "--project", "orin-nano"], ["--project", "drop"]),
    (["--llm-only", "--preset", "ullava-tiny", "--random-weights"], ["--llm-only", "Crab"]),
    (["--llm-only", "--preset", "crab-small"], ["crab-small", "--random-weights"]),
])
def test_bad_llm_only_options_end_with_one_line_and_exit_2(capsys, tmp_path, args, needles):
    result = cli(capsys, "bench", *[a.format(tmp=tmp_path) for a in args])
    assert_user_error(result, *needles)
