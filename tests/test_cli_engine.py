"""Command line around engines: ``edgeav export``, ``info``, ``run --engine`` and ``eval --engine``."""

from __future__ import annotations

import json
import shutil

import pytest

from test_cli import assert_user_error, cli


def test_info_prints_manifest_and_receipt(demo_engine, capsys):
    r = cli(capsys, "info", demo_engine)
    assert r.rc == 0, r.err
    assert "onnx, fp32" in r.out and "hashes match" in r.out
    assert "top-1 agreement 1.000" in r.out and "identical in 100% of runs" in r.out
    for graph in ("visual", "audio", "llm", "mask_avs", "mask_avss"):
        assert f"\n{graph} " in r.out
    as_json = json.loads(cli(capsys, "info", demo_engine, "--json").out)
    assert as_json["precision"] == "fp32" and "receipt" in as_json


def test_run_with_engine_matches_the_reference(demo_engine, capsys):
    engine = json.loads(cli(capsys, "run", "--engine", demo_engine, "--json", "--threads", "1").out)
    reference = json.loads(cli(capsys, "run", "--json").out)
    assert engine["text"] == reference["text"]
    assert engine["events"] == reference["events"]
    assert "onnx engine" in engine["model"]


def test_eval_with_engine(demo_engine, capsys):
    r = cli(capsys, "eval", "--engine", demo_engine, "--n", "1", "--task", "avqa", "--json")
    assert r.rc == 0, r.err
    assert set(json.loads(r.out)["metrics"]) == {"avqa"}


def test_corrupted_engine_is_refused_with_one_line(demo_engine, tmp_path, capsys):
    broken = tmp_path / "engine"
    shutil.copytree(demo_engine, broken)
    (broken / "audio.onnx").write_bytes(b"garbage")
    assert_user_error(cli(capsys, "info", broken), "audio.onnx", "SHA-256")
    assert_user_error(cli(capsys, "run", "--engine", broken), "audio.onnx", "export the engine again")
    (broken / "manifest.json").unlink()
    assert_user_error(cli(capsys, "run", "--engine", broken), "no manifest.json")


@pytest.mark.parametrize("args, needle", [
    (["--precision", "int4", "--format", "tensorrt"], "not offered for --format tensorrt"),
    (["--precision", "int3"], "int3"),
    (["--block-size", "64", "--precision", "int4"], "--block-size 64"),
    (["--format", "tensorrt"], "needs the 'tensorrt' package"),
])
def test_export_bad_options(tmp_path, capsys, args, needle):
    out = tmp_path / "engine"
    assert_user_error(cli(capsys, "export", "demo", "-o", out, *args), needle)
    assert not out.exists()


def test_export_refuses_a_folder_that_is_not_an_engine(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert_user_error(cli(capsys, "export", "demo", "-o", tmp_path, "--receipt-n", "0"), "not an engine directory")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_export_onto_a_file(tmp_path, capsys):
    target = tmp_path / "engine"
    target.write_text("mine")
    assert_user_error(cli(capsys, "export", "demo", "-o", target, "--receipt-n", "0"), "is a file")
    assert target.read_text() == "mine"


def test_export_unknown_model(tmp_path, capsys):
    assert_user_error(cli(capsys, "export", "crab-huge", "-o", tmp_path / "e"), "crab-huge", "preset")


def test_engine_excludes_checkpoint_options(demo_engine, capsys):
    assert_user_error(cli(capsys, "run", "--engine", demo_engine, "--dtype", "bf16"), "--dtype")
    assert_user_error(cli(capsys, "run", "--engine", demo_engine, "--preset", "crab-tiny"), "--engine")
    assert_user_error(cli(capsys, "run", "--threads", "2"), "--threads")
