"""``edgeav batch`` and ``Runtime.batch``: one line per item, errors as lines, resume, workers, Ray, manifests.

Every batch here runs the demo model on generated clips; its results are compared with ``edgeav run``'s.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgeav
from edgeav.batch import Item, collect_items
from edgeav.media import synth
from edgeav.runtime import Runtime
from test_cli import assert_user_error, cli

N_GOOD = 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Five short clips (different lengths and noise) and one file that is not a video."""
    folder = tmp_path_factory.mktemp("batch") / "clips"
    folder.mkdir()
    for i in range(N_GOOD):
        synth.write_clip(folder / f"clip{i}.mp4", duration_s=3 + i % 3, noise=0.02 * i, seed=i)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(result: dict) -> dict:
    """A result without what differs between two runs of the same item (its timings)."""
    return {k: v for k, v in result.items() if k != "timings_ms"}


@pytest.fixture(scope="module")
def first_batch(dataset, tmp_path_factory):
    """``edgeav batch`` over the folder, once; (its JSONL, the command's result)."""
    from edgeav.cli import main  # capsys is function-scoped: the module's fixture runs the CLI as it is

    jsonl = tmp_path_factory.mktemp("batch-out") / "out.jsonl"
    rc = main(["batch", str(dataset), "--jsonl", str(jsonl)])
    return jsonl, rc


def test_batch_writes_one_line_per_item_equal_to_run_and_a_rerun_does_no_work(dataset, first_batch, capsys):
    jsonl, rc = first_batch
    assert rc == 1  # one item failed
    lines = lines_of(jsonl)
    assert len(lines) == N_GOOD + 1 and len({line["key"] for line in lines}) == N_GOOD + 1
    errors = [line for line in lines if not line["ok"]]
    assert [Path(line["source"]).name for line in errors] == ["broken.mp4"]
    # The error is the one line `edgeav run` gives for the same file.
    run = cli(capsys, "run", errors[0]["source"])
    assert assert_user_error(run) == f"edgeav: error: {errors[0]['error']}"
    for line in lines:
        if line["ok"]:
            run = cli(capsys, "run", line["source"], "--json")
            assert run.rc == 0, run.err
            assert comparable(line["result"]) == comparable(json.loads(run.out))
    before = jsonl.read_bytes()
    again = cli(capsys, "batch", dataset, "--jsonl", jsonl)
    assert again.rc == 0, again.err
    assert "on 0 of 6 items (6 already in" in again.out and "1 of them errors" in again.out
    assert jsonl.read_bytes() == before


def test_two_workers_write_the_same_results(dataset, first_batch, tmp_path, capsys):
    jsonl = tmp_path / "two.jsonl"
    r = cli(capsys, "batch", dataset, "--jsonl", jsonl, "--workers", 2, "--threads", 2)
    assert r.rc == 1 and "2 workers, 1 thread each" in r.out
    assert "1 of 6 items failed" in r.err
    by_key = {line["key"]: line for line in lines_of(first_batch[0])}
    lines = lines_of(jsonl)
    assert {line["worker"] for line in lines} == {"worker-0", "worker-1"}
    assert len(lines) == len(by_key)
    for line in lines:
        expected = by_key[line["key"]]
        assert line["ok"] == expected["ok"] and line.get("error") == expected.get("error")
        if line["ok"]:
            assert comparable(line["result"]) == comparable(expected["result"])


def test_ray_writes_the_same_results(dataset, first_batch, tmp_path, capsys):
    pytest.importorskip("ray.data")
    jsonl = tmp_path / "ray.jsonl"
    r = cli(capsys, "batch", dataset, "--jsonl", jsonl, "--ray", "--workers", 2, "--threads", 2)
    assert r.rc == 1 and "Ray, 2 actors, 1 thread each" in r.out, r.err
    by_key = {line["key"]: line for line in lines_of(first_batch[0])}
    lines = lines_of(jsonl)
    assert len(lines) == len(by_key)
    for line in lines:
        expected = by_key[line["key"]]
        assert line["worker"].startswith("ray-")
        assert line["ok"] == expected["ok"] and line.get("error") == expected.get("error")
        if line["ok"]:
            assert comparable(line["result"]) == comparable(expected["result"])


def test_manifest_rows_bring_their_own_id_question_and_seconds(dataset, tmp_path, capsys):
    """A JSONL manifest (paths relative to it) for a mask task: ``at`` and ``id`` per row, masks under out/ID/."""
    (tmp_path / "media").symlink_to(dataset)
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps({"id": "first", "source": "media/clip0.mp4", "at": [1, 2]}) + "\n\n"
                        + json.dumps({"id": 7, "source": str(dataset / "clip3.mp4"), "at": 0}) + "\n")
    jsonl, out = tmp_path / "s4.jsonl", tmp_path / "masks"
    r = cli(capsys, "batch", manifest, "--task", "s4", "--jsonl", jsonl, "--out", out)
    assert r.rc == 0, r.err
    lines = {line["id"]: line for line in lines_of(jsonl)}
    assert set(lines) == {"first", "7"} and lines["first"]["at"] == [1, 2]
    assert [m["time_s"] for m in lines["first"]["result"]["masks"]] == [1.0, 2.0]
    for item_id, line in lines.items():
        for mask in line["result"]["masks"]:
            assert Path(mask["path"]).parent == out / item_id and Path(mask["path"]).is_file()
    run = cli(capsys, "run", dataset / "clip0.mp4", "--task", "s4", "--at", 1, "--at", 2, "--json")
    assert [m["time_s"] for m in json.loads(run.out)["masks"]] == [1.0, 2.0]
    assert json.loads(run.out)["text"] == lines["first"]["result"]["text"]

    # A CSV manifest: the question of each row (AVQA).
    csv_manifest = tmp_path / "questions.csv"
    csv_manifest.write_text("\ufeffsource,question\nmedia/clip1.mp4,How many sounding objects are there?\n"
                            "media/clip1.mp4,Where is the sounding object?\n")  # as a spreadsheet saves it, BOM first
    jsonl = tmp_path / "avqa.jsonl"
    r = cli(capsys, "batch", csv_manifest, "--task", "avqa", "--jsonl", jsonl)
    assert r.rc == 0, r.err
    lines = lines_of(jsonl)
    assert [line["question"] for line in lines] == ["How many sounding objects are there?",
                                                    "Where is the sounding object?"]
    run = cli(capsys, "run", lines[1]["source"], "--task", "avqa", "--question", lines[1]["question"], "--json")
    assert comparable(json.loads(run.out)) == comparable(lines[1]["result"])


@pytest.mark.parametrize("content, needles", [
    ("source,quesiton\na.mp4,hi\n", ["unknown column 'quesiton'"]),
    ("question\nhi\n", ["no \"source\" column"]),
    ('{"source": "a.mp4", "at": "soon"}\n', ["at 'soon'"]),
    ("source,at\na.mp4,\u00b2\n", ["at '\u00b2'"]),
    ('{"source": "a.mp4", "id": "x"}\n{"source": "b.mp4", "id": "x"}\n', ["'x' names two items"]),
    ("not json\n", [":1: not JSON"]),
], ids=["misspelt-column", "no-source", "bad-at", "superscript-at", "same-id", "not-json"])
def test_a_bad_manifest_is_one_line_and_exit_2(tmp_path, capsys, content, needles):
    manifest = tmp_path / ("items.csv" if content.startswith(("source,", "question")) else "items.jsonl")
    manifest.write_text(content)
    jsonl = tmp_path / "out.jsonl"
    assert_user_error(cli(capsys, "batch", manifest, "--jsonl", jsonl), manifest.name, *needles)
    assert not jsonl.exists()


def test_bad_inputs_and_options_are_one_line_and_exit_2(dataset, first_batch, tmp_path, capsys):
    jsonl = tmp_path / "out.jsonl"
    assert_user_error(cli(capsys, "batch", tmp_path / "nowhere", "--jsonl", jsonl), "nowhere", "no such file")
    assert_user_error(cli(capsys, "batch", str(tmp_path / "*.mkv"), "--jsonl", jsonl), "matches nothing")
    assert_user_error(cli(capsys, "batch", dataset, "--task", "avqa", "--jsonl", jsonl), "question")
    assert_user_error(cli(capsys, "batch", dataset, "--jsonl", jsonl, "--workers", 4, "--threads", 2),
                      "--threads 2", "4 workers")
    assert_user_error(cli(capsys, "batch", dataset, "--jsonl", jsonl, "--task", "ave", "--out", tmp_path / "m"),
                      "--out", "makes none")
    # Another task's results file is not mixed into.
    kept = first_batch[0].read_bytes()
    assert_user_error(cli(capsys, "batch", dataset, "--task", "avvp", "--jsonl", first_batch[0]),
                      "results of --task ave", "its own --jsonl")
    assert first_batch[0].read_bytes() == kept
    assert not jsonl.exists()


def test_retry_failed_and_a_line_cut_short(dataset, tmp_path, capsys):
    """An item keyed by id keeps its error across reruns until --retry-failed; a cut line runs its item again."""
    shutil.copy(dataset / "clip0.mp4", tmp_path / "good.mp4")
    (tmp_path / "later.mp4").write_bytes(b"")
    manifest = tmp_path / "items.csv"
    manifest.write_text("id,source\ngood,good.mp4\nlater,later.mp4\n")
    jsonl = tmp_path / "out.jsonl"
    assert cli(capsys, "batch", manifest, "--jsonl", jsonl).rc == 1
    shutil.copy(dataset / "clip1.mp4", tmp_path / "later.mp4")  # the file is fixed; its id is the same
    assert cli(capsys, "batch", manifest, "--jsonl", jsonl).rc == 0
    assert len(lines_of(jsonl)) == 2
    r = cli(capsys, "batch", manifest, "--jsonl", jsonl, "--retry-failed")
    assert r.rc == 0 and "on 1 of 2 items" in r.out
    lines = lines_of(jsonl)
    assert [(line["id"], line["ok"]) for line in lines] == [("good", True), ("later", False), ("later", True)]

    # The machine died while the last line was written: that item runs again, and lines stay whole.
    good, *later = jsonl.read_text().splitlines(keepends=True)
    jsonl.write_text("".join(later) + good[:40])
    r = cli(capsys, "batch", manifest, "--jsonl", jsonl)
    assert r.rc == 0 and "on 1 of 2 items" in r.out
    raw = jsonl.read_text().splitlines()
    assert raw[-2] == good[:40] and json.loads(raw[-1])["id"] == "good"


def test_ctrl_c_keeps_every_line_written_and_a_rerun_finishes(dataset, tmp_path):
    jsonl = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "edgeav", "batch", str(dataset), "--jsonl", str(jsonl)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if jsonl.exists() and jsonl.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    written = lines_of(jsonl)  # every line whole
    assert 1 <= len(written) < N_GOOD + 1
    r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    broken_ran = any(not line["ok"] for line in written)  # the rerun's exit code counts its own items
    assert r.returncode == (0 if broken_ran else 1) and f"{len(written)} already in" in r.stdout, r.stderr
    keys = [line["key"] for line in lines_of(jsonl)]
    assert len(keys) == N_GOOD + 1 == len(set(keys))


def test_runtime_batch_gives_results_in_order(dataset):
    runtime = Runtime.demo()
    done = list(runtime.batch([dataset / "clip2.mp4", dataset / "broken.mp4", dataset / "clip2.mp4"]))
    assert [d.ok for d in done] == [True, False]  # a file given twice runs once
    result = done[0].result_or_raise()
    assert result.to_dict()["events"] == runtime.run(dataset / "clip2.mp4").to_dict()["events"]
    with pytest.raises(edgeav.EdgeavError, match="broken.mp4"):
        done[1].result_or_raise()
    # A runtime built from a model in hand cannot be rebuilt by worker processes: said before anything runs.
    loaded = Runtime(runtime.engine)
    with pytest.raises(edgeav.OptionError, match="worker processes cannot rebuild"):
        next(iter(loaded.batch([dataset / "clip2.mp4"], workers=2)))


def test_items_are_keyed_by_id_or_by_file_and_options(dataset, tmp_path):
    copy = tmp_path / "clip.mp4"
    shutil.copy(dataset / "clip0.mp4", copy)
    plain = Item.make(str(copy))
    assert Item.make(str(copy)).key == plain.key
    assert Item.make(str(copy), question="Why?").key != plain.key
    assert Item.make(str(copy), id="a").key == Item.make(str(dataset / "clip1.mp4"), id="a").key
    copy.write_bytes(copy.read_bytes() + b"\0")  # rewritten: runs again
    assert Item.make(str(copy)).key != plain.key
    items = collect_items([dataset, str(dataset / "clip*.mp4")])
    assert [Path(i.source).name for i in items] == ["broken.mp4"] + [f"clip{i}.mp4" for i in range(N_GOOD)]
    assert len({i.folder for i in items}) == len(items)
    # A glob takes media files only, and the batch's own outputs never become items.
    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / "masks").mkdir()
    shutil.copy(dataset / "clip1.mp4", tmp_path / "masks" / "mask.mp4")
    found = collect_items([str(tmp_path / "*"), tmp_path], exclude=[tmp_path / "masks", tmp_path / "out.jsonl"])
    assert [Path(i.source).name for i in found] == ["clip.mp4"]


def test_a_prepared_run_keeps_its_own_task_weights(dataset):
    """Crab swaps its task weights in place: a clip prepared for s4 runs s4's, whatever was prepared since."""
    runtime = Runtime.demo()
    clip = dataset / "clip0.mp4"
    s4 = runtime.prepare(clip, "s4", at_seconds=[1])
    runtime.prepare(clip, "avss", at_seconds=[1])
    assert (s4().masks[0].mask == runtime.run(clip, "s4", at_seconds=[1]).masks[0].mask).all()
