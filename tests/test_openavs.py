"""OpenAVS as a system: presets counted on the meta device, the released (third-party files) and converted
layouts, end-to-end runs of every variant through the CLI and the runtime, streams, and the glue between
its components (captions, thresholds, the mask union, empty answers) on real tiny models.

The parity of its parts with independent implementations is in test_pengi.py, test_htsat.py,
test_sam.py, test_sam2.py, test_grounding_dino.py and test_qwen_*.py; the translator in
test_openavs_translator.py."""

from __future__ import annotations

import dataclasses
import json
import socket

import numpy as np
import pytest
import torch

from edgeav.errors import CheckpointError, OptionError
from edgeav.media import synth
from edgeav.models.grounding_dino import detect
from edgeav.preprocess.sam import sam_coords, sam_pixels
from edgeav.results import Detection
from edgeav.runtime import Runtime
from edgeav.stages import StageTimer
from edgeav.systems import get_system, system_of_checkpoint
from edgeav.systems.openavs.checkpoints import BEATS_FILE, THINKER_DIR, load_checkpoint, save_converted, save_released, synthesize
from edgeav.systems.openavs.inputs import Second
from edgeav.systems.openavs.pipeline import OpenAVSPipeline, audioset_labels
from edgeav.systems.openavs.segment import BOX_THRESHOLD, TEXT_THRESHOLD, BoxSegmenter
from edgeav.systems.openavs.tasks import check_options
from edgeav.systems.openavs.translator import FrameTexts

from test_cli import assert_user_error, cli
from test_openavs_translator import ChatServer, completion


@pytest.fixture(scope="module")
def loaded():
    return synthesize("openavs-tiny", seed=7)


@pytest.fixture(scope="module")
def pipeline(loaded):
    return OpenAVSPipeline(loaded)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 3-s clip with sound, 160x120."""
    path = tmp_path_factory.mktemp("clips") / "avs.mp4"
    synth.write_clip(path, duration_s=3.0, width=160, height=120)
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory, loaded):
    folder = tmp_path_factory.mktemp("ckpt") / "openavs-tiny"
    save_released(loaded, folder)
    return folder


def _same_weights(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_paper_sized_preset_is_counted_on_the_meta_device():
    counts = get_system("openavs").parameter_counts("openavs")
    # GroundingDINO SwinT-OGC 172 M; SAM ViT-H 641 M; SAM2.1-L's image predictor 217 M; BEATs 90 M + head.
    assert abs(counts["grounding"] - 172e6) < 2e6
    assert abs(counts["sam"] - 641e6) < 1e6
    assert abs(counts["sam2"] - 217e6) < 1e6
    assert abs(counts["thinker"] - 8.93e9) < 0.01e9
    assert abs(counts["beats"] - 90.6e6) < 1e6


def test_released_and_converted_layouts_round_trip(loaded, released, tmp_path):
    assert system_of_checkpoint(released).name == "openavs"
    again = load_checkpoint(released)
    assert again.config == loaded.config  # every component's size read back from its weights
    _same_weights(loaded, again)
    converted = save_converted(again, tmp_path / "converted")
    assert system_of_checkpoint(converted).name == "openavs"
    third = load_checkpoint(converted)
    assert third.config == loaded.config
    _same_weights(loaded, third)


def test_optional_components_are_optional_and_named_when_missing(released, tmp_path, clip):
    import shutil

    folder = tmp_path / "lite-only"
    shutil.copytree(released, folder)
    shutil.rmtree(folder / THINKER_DIR)
    (folder / BEATS_FILE).unlink()
    lite = load_checkpoint(folder)
    assert lite.model.thinker is None and lite.model.beats is None and lite.config.name == "openavs-custom"
    runtime = Runtime(lite)
    with pytest.raises(OptionError, match="holds no Qwen2.5-Omni thinker"):
        runtime.run(clip, variant="default", translator="local")
    with pytest.raises(OptionError, match="AudioSet head"):
        runtime.run(clip, variant="edge")


def test_a_broken_component_file_is_one_line(released, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(released, folder)
    (folder / "pengi" / "base.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="base.pth"):
        load_checkpoint(folder)


@pytest.mark.parametrize("junk", [b"\xff\xfe\x00binary", b""], ids=["binary", "empty"])
def test_a_broken_caption_vocabulary_is_one_line(released, tmp_path, junk):
    import shutil

    folder = tmp_path / "vocab"
    shutil.copytree(released, folder)
    (folder / "bert-base-uncased" / "vocab.txt").write_bytes(junk)
    with pytest.raises(CheckpointError, match="vocab.txt: not a usable BERT vocabulary") as refused:
        load_checkpoint(folder)
    assert "\n" not in str(refused.value)


def test_half_precision_keeps_groundingdino_in_fp32(clip):
    runtime = Runtime.from_preset("openavs-tiny", random_weights=True, dtype=torch.bfloat16)
    model = runtime.engine.model
    assert next(model.grounding.parameters()).dtype == torch.float32
    assert next(model.sam.parameters()).dtype == next(model.pengi.parameters()).dtype == torch.bfloat16
    result = runtime.run(clip, variant="edge")
    assert [m.time_s for m in result.masks] == [0.0, 1.0, 2.0]


def test_cli_lite_writes_one_mask_per_second_with_its_objects(capsys, clip, tmp_path):
    out = tmp_path / "m"
    r = cli(capsys, "run", clip, "--system", "openavs", "--variant", "lite", "--preset", "openavs-tiny",
            "--random-weights", "--out", out, "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert result["task"] == "avs"
    assert [m["time_s"] for m in result["masks"]] == [0.0, 1.0, 2.0]
    assert sorted(p.name for p in out.iterdir()) == ["mask_000.00s.png", "mask_001.00s.png", "mask_002.00s.png"]
    # Translator none: each mask's objects are Pengi's "Generate audio caption" text of its second.
    captions = {d["time_s"]: d["text"] for d in result["descriptions"] if d["describer"].endswith("audio caption")}
    assert [m["text"] for m in result["masks"]] == [captions[t] for t in (0.0, 1.0, 2.0)]
    assert len(result["descriptions"]) == 3 * 3  # three Pengi prompts a second


def test_cli_runs_a_synth_checkpoint(capsys, clip, tmp_path):
    folder = tmp_path / "ckpt"
    r = cli(capsys, "synth", "--preset", "openavs-tiny", folder)
    assert r.rc == 0, r.err
    r = cli(capsys, "run", clip, "--checkpoint", folder, "--variant", "edge", "--segmenter", "sam2", "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert len(result["masks"]) == 3
    assert {d["describer"] for d in result["descriptions"]} == {"beats"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_translator_fails_before_any_model_loads(capsys, clip, monkeypatch):
    import edgeav.runtime

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(edgeav.runtime.Runtime, "from_preset", no_load)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    r = cli(capsys, "run", clip, "--system", "openavs", "--preset", "openavs-tiny", "--random-weights",
            "--translator", "http", "--translator-url", url)
    assert_user_error(r, url, "not reachable")
    assert r.out == ""


@pytest.mark.parametrize("args, needles", [
    (("--variant", "default"), ("--translator local or http",)),
    (("--variant", ""), ("--variant ''",)),
    (("--translator-model", "x"), ("--translator http",)),
    (("--variant", "huge"), ("--variant", "lite, default, large, edge")),
    (("--translator", "http"), ("--translator-url",)),
    (("--translator-url", "http://localhost:1/v1"), ("--translator http",)),
    (("--translator", "http", "--translator-url", "ftp://host/x"), ("ftp://host/x", "is not http(s)")),
    (("--translator", "http", "--translator-url", "http://[::1"), ("cannot be parsed",)),
    (("--segmenter", "sam3"), ("--segmenter", "sam2")),
])
def test_cascade_options_are_checked_first(capsys, clip, args, needles):
    r = cli(capsys, "run", clip, "--system", "openavs", "--preset", "openavs-tiny", "--random-weights", *args)
    assert_user_error(r, *needles)


def test_other_systems_refuse_the_cascade_options(capsys, clip):
    r = cli(capsys, "run", clip, "--variant", "lite")
    assert_user_error(r, "--variant", "OpenAVS")


def test_default_and_large_describe_the_frame_with_the_thinker_and_translate_locally(loaded, clip):
    pipeline = OpenAVSPipeline(loaded)
    pipeline.describe_tokens = pipeline.translate_tokens = 8  # random weights run to the cap: keep it short
    result = pipeline.run(clip, variant="large", translator="local")
    describers = {d.describer for d in result.descriptions}
    assert describers == {"pengi: This is a sound of", "pengi: Generate metadata", "pengi: Generate audio caption",
                          "thinker: audio", "thinker: image"}
    assert len(result.masks) == 3
    assert result.timings_ms["describe_image"] > 0 and result.timings_ms["translate"] > 0
    # The tiny thinker's 8 tokens hold no <answer> line: each frame's mask is empty, with a note saying why.
    assert result.text and all("<answer>" not in line for line in result.text.splitlines())
    for mask in result.masks:
        assert mask.text == "" and not mask.mask.any()
        assert f"frame {mask.time_s:g}: no answer line (empty mask)" in result.notes
        assert f"{mask.time_s:g} s: no object named, so the mask is empty" in result.notes


def test_edge_labels_are_audioset_names(pipeline):
    names = audioset_labels()
    assert len(names) == 527 and names[0] == "Speech" and names[526] == "Field recording"
    labels = pipeline.labels(np.zeros(16000, np.float32))
    assert 1 <= len(labels) <= 3
    shortened = {n.split(",")[0].strip().lower() for n in names}
    assert set(labels) <= shortened


def test_stream_segments_each_newest_second(loaded, clip):
    runtime = Runtime(loaded)
    described = []
    describe = runtime.pipeline.describe

    def counting(second, variant, timer):
        described.append(second.time_s)
        return describe(second, variant, timer)

    runtime.pipeline.describe = counting
    with runtime.stream(clip, variant="lite", window=2) as windows:
        results = list(windows)
    assert [w.frame_s for w in results] == [1.0, 2.0]
    for window in results:
        assert [m.time_s for m in window.result.masks] == [window.frame_s]
        assert {d.time_s for d in window.result.descriptions} == {window.frame_s - 1, window.frame_s}
    assert described == [0.0, 1.0, 2.0]  # a second two windows share is described once
    assert windows.telemetry.stages["describe_audio"].count == 2  # the encode stage's time, once per window


# -- the glue, on real tiny models ---------------------------------------------------------------


def test_thresholds_keep_boxes_and_phrases_as_hand_computed(loaded):
    tokenizer = loaded.grounding_tokenizer
    tokens = tokenizer.encode("dog . cat .")
    ids = tokens.input_ids[0].tolist()  # [CLS] dog . cat . [SEP]
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    logits = torch.full((3, 8), logit(0.01))
    logits[0, 1] = logit(0.30)  # query 0: "dog" at 0.30 -> kept, phrase dog
    logits[1, 3] = logit(0.24)  # query 1: best token 0.24 < 0.25 -> dropped
    logits[2, 1], logits[2, 3] = logit(0.26), logit(0.20)  # query 2: kept; cat below the text threshold
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
    assert (BOX_THRESHOLD, TEXT_THRESHOLD) == (0.25, 0.25)  # the paper's box threshold; Grounded-SAM's text one
    found = detect(logits, boxes, ids, (100, 200), tokenizer.decode, box_threshold=BOX_THRESHOLD,
                   text_threshold=TEXT_THRESHOLD)
    assert [f.phrase.strip() for f in found] == ["dog", "dog"]
    assert found[0].box_xyxy == pytest.approx((80.0, 30.0, 120.0, 70.0))
    assert found[1].box_xyxy == pytest.approx((0.0, 0.0, 100.0, 50.0))
    assert [round(f.score, 2) for f in found] == [0.30, 0.26]


def test_each_box_mask_is_sams_own_for_that_box(loaded):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    sam = loaded.model.sam
    segmenter = BoxSegmenter(loaded.model.grounding, loaded.grounding_tokenizer, (224, 400), sam=sam)
    boxes = [(10.0, 10.0, 60.0, 80.0), (70.0, 20.0, 150.0, 110.0)]
    masks = segmenter.masks(picture, boxes)
    assert masks.shape == (2, 120, 160)
    with torch.inference_mode():
        pixels, resized = sam_pixels(picture, sam.config.img_size)
        embedding = sam.encode_image(torch.from_numpy(pixels))
        for box, mask in zip(boxes, masks):  # by hand: one box at a time through SAM's own calls
            prompt = torch.from_numpy(sam_coords(np.asarray([box]), (120, 160), sam.config.img_size))
            sparse, dense = sam.prompt_embeddings(boxes=prompt)
            logits, _ = sam.decode_masks(embedding, sparse, dense)
            expected = (sam.postprocess_masks(logits, resized, (120, 160))[0, 0] > 0).numpy()
            np.testing.assert_array_equal(mask, expected)
    assert segmenter.masks(picture, []).shape == (0, 120, 160)


def _seconds(texts: list[str]) -> list[Second]:
    rng = np.random.default_rng(1)
    return [Second(float(t), rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), np.zeros(16000, np.float32),
                   FrameTexts(audio=[("pengi: Generate audio caption", text)])) for t, text in enumerate(texts)]


def test_answers_become_captions_masks_and_notes(pipeline):
    """Through a real HTTP translator: the answers' objects are the masks' objects; an empty or missing
    answer is an empty mask with a note; a second's mask is the union of its boxes' masks."""
    reply = "<answer>Car Engine, wind</answer>\n<answer></answer>"
    seconds = _seconds(["an engine runs", "silence", "a dog barks"])
    with ChatServer(lambda body: (200, completion(reply), 0.0)) as server:
        # The edge variant's strategy ("frame") is per clip: one call answers every second.
        options = check_options(variant="edge", translator="http", translator_url=server.url)
        result = pipeline.answer(seconds, options, StageTimer())
        (path, _, body), = server.requests
    assert path == "/v1/chat/completions" and "<frame2>" in body["messages"][1]["content"]
    assert [m.text for m in result.masks] == ["car engine, wind", "", ""]
    assert not result.masks[1].mask.any() and not result.masks[2].mask.any()
    assert any("1 s: no object named" in n for n in result.notes)
    assert any("2 s: no object named" in n for n in result.notes)
    assert any("2 answer lines for 3 frames" in n for n in result.notes)
    assert result.text == reply
    boxes = [d.box for d in result.detections]
    assert len(boxes) >= 2 and {d.time_s for d in result.detections} == {0.0}  # the random tiny detector fires
    per_box = pipeline.segmenter("sam").masks(seconds[0].picture, boxes)
    union = np.zeros((120, 160), bool)
    for mask in per_box:  # by hand
        union |= mask
    assert union.any() and not per_box[0].all()
    np.testing.assert_array_equal(result.masks[0].mask, union)


def test_translator_none_takes_pengis_caption_or_the_edge_labels(pipeline):
    seconds = _seconds(["A Dog Barks.", ""])
    captions, objects, reply, notes = pipeline.translate(seconds, check_options(), StageTimer())
    assert captions == ["a dog barks.", None] and objects == [["A Dog Barks."], []] and reply == "" and notes == []
    seconds[0].texts = FrameTexts(audio=[("beats", "dog, bark")])
    captions, objects, _, _ = pipeline.translate(seconds[:1], check_options(variant="edge"), StageTimer())
    assert captions == ["dog . bark ."] and objects == [["dog", "bark"]]


def test_detections_carry_their_second():
    detection = dataclasses.replace(Detection((0, 0, 1, 1), 0.5, "dog"), time_s=2.0)
    assert detection.to_dict() == {"time_s": 2.0, "box": [0, 0, 1, 1], "score": 0.5, "label": "dog"}
