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
    (["--block-size", "48", "--precision", "int4"], "--block-size 48"),
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


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.pop("variants"), "variants is missing"),
    (lambda m: m["config"]["llm"].update(hidden_size="128"), "config.llm.hidden_size must be a whole number"),
    (lambda m: m["graphs"]["llm"].update(file=7), "graphs.llm.file must be a string, not int"),
    (lambda m: m.update(receipt={"logits": {}, "metrics": []}), "receipt.clips_per_task is missing"),
    (lambda m: m["graphs"]["visual"].update(file="../visual.onnx"), "not a file name inside the engine directory"),
])
def test_malformed_manifest_is_one_line_from_the_cli(demo_engine, tmp_path, capsys, change, needle):
    """A manifest that parses but has missing keys, wrong types or paths out of the folder: exit 2, one line,
    before any model loads (no KeyError, TypeError or ONNX Runtime traceback)."""
    broken = tmp_path / "engine"
    shutil.copytree(demo_engine, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    change(manifest)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(cli(capsys, "info", broken), "manifest.json", needle, "export the engine again")
    assert_user_error(cli(capsys, "run", "--engine", broken, "--threads", "1"), needle)
    assert_user_error(cli(capsys, "eval", "--engine", broken, "--n", "1"), needle)


def test_manifest_config_edit_is_refused_by_info_and_run(demo_engine, tmp_path, capsys):
    """A config edit the hashes cannot see (they cover the files, not the manifest) is caught by `info` too."""
    broken = tmp_path / "engine"
    shutil.copytree(demo_engine, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["config"]["llm"]["num_layers"] = 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    for args in (("info", broken), ("run", "--engine", broken, "--threads", "1")):
        assert_user_error(cli(capsys, *args), "llm.onnx", "the manifest's config does not match its graphs",
                          "export the engine again")


def test_graph_not_listed_in_files_is_refused_by_info(demo_engine, tmp_path, capsys):
    broken = tmp_path / "engine"
    shutil.copytree(demo_engine, broken)
    shutil.copy(broken / "llm.onnx", broken / "llm_b.onnx")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["graphs"]["llm"]["file"] = "llm_b.onnx"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(cli(capsys, "info", broken), "graphs.llm.file 'llm_b.onnx' is not listed in files")
    assert_user_error(cli(capsys, "run", "--engine", broken), "graphs.llm.file 'llm_b.onnx' is not listed in files")


def test_info_without_compared_logit_steps(demo_engine, tmp_path, capsys):
    """A receipt whose runs compared no logit step (an empty ``logits``) still prints."""
    engine = tmp_path / "engine"
    shutil.copytree(demo_engine, engine)
    manifest = json.loads((engine / "manifest.json").read_text())
    manifest["receipt"]["logits"] = {}
    (engine / "manifest.json").write_text(json.dumps(manifest))
    r = cli(capsys, "info", engine)
    assert r.rc == 0, r.err
    assert "no step compared" in r.out


@pytest.mark.parametrize("command", ["run", "eval"])
def test_threads_has_an_upper_bound(demo_engine, capsys, command):
    from edgeav.engines import MAX_THREADS

    line = assert_user_error(cli(capsys, command, "--engine", demo_engine, "--threads", "100000"), "--threads")
    assert str(MAX_THREADS) in line
    assert_user_error(cli(capsys, command, "--engine", demo_engine, "--threads", "0"), "--threads")
