"""Crab+ as a system: presets counted on the meta device, the released and converted layouts, the LoRA
file's refusal, end-to-end runs through the CLI, and SAM2 driven by what the thinker writes.

The parity of its parts with independent implementations is in test_qwen_*.py, test_sam2.py,
test_ilora.py and test_crabplus_parity.py; its task table and parsers in test_crabplus_tasks.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgeav.runtime
from edgeav.errors import CheckpointError, OptionError
from edgeav.runtime import Runtime
from edgeav.stages import StageTimer
from edgeav.systems import get_system, system_of_checkpoint
from edgeav.systems.crabplus.checkpoints import (
    LORA_FILE, load_checkpoint, save_converted, save_released, synthesize,
)
from edgeav.systems.crabplus.inputs import decode
from edgeav.systems.crabplus.tasks import get_task

from test_cli import assert_user_error, cli


@pytest.fixture(scope="module")
def crabplus_released(tmp_path_factory):
    """A synthetic crabplus-tiny checkpoint in Crab+'s released layout."""
    folder = tmp_path_factory.mktemp("ckpt") / "crabplus-tiny"
    save_released(synthesize("crabplus-tiny", seed=5), folder)
    return folder


def _same_weights(a, b) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_7b_parameter_counts_from_the_meta_device():
    counts = get_system("crabplus").parameter_counts("crabplus-7b")
    assert counts["I-LoRA"] == 870_480_512  # spec section 2: LLM 682.4 M + vision 124.8 M + audio 63.3 M
    assert abs(counts["thinker"] - 8.93e9) < 0.01e9
    # SAM2.1-L's image predictor; the released 224 M also holds the video memory modules edgeav does not build.
    assert abs(counts["SAM2"] - 217e6) < 1e6


def test_a_preset_too_big_for_the_machine_is_refused_with_its_sizes(monkeypatch):
    monkeypatch.setattr(edgeav.runtime, "available_memory_bytes", lambda: 16 * 2**30)
    with pytest.raises(OptionError, match=r"crabplus-7b: 10\.02 B parameters \(thinker 8\.93 B, I-LoRA 870 M, "
                                          r"SAM2 217 M\) need 40\.1 GB as float32"):
        Runtime.from_preset("crabplus-7b", random_weights=True)


def test_released_and_converted_layouts_round_trip(crabplus_released, tmp_path):
    assert system_of_checkpoint(crabplus_released).name == "crabplus"
    released = load_checkpoint(crabplus_released)
    assert released.config.name == "crabplus-tiny" and released.config.sam2 == "tiny"
    _same_weights(released, synthesize("crabplus-tiny", seed=5))
    converted = load_checkpoint(save_converted(released, tmp_path / "converted"))
    assert converted.config == released.config
    _same_weights(converted, released)
    ids = released.tokenizer.encode("<|im_start|>user\n[12,34]")
    assert converted.tokenizer.encode("<|im_start|>user\n[12,34]") == ids


def test_a_lora_file_short_of_its_tensors_is_refused(crabplus_released, tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    for path in crabplus_released.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    lora = torch.load(folder / LORA_FILE, weights_only=True)
    dropped = next(k for k in lora if ".visual." not in k and "lora_route" in k)
    del lora[dropped]
    torch.save(lora, folder / LORA_FILE)
    with pytest.raises(CheckpointError, match=rf"{LORA_FILE}: {len(lora)} of its {len(lora)} tensors match the "
                                              rf"{len(lora) + 1} LoRA weights"):
        load_checkpoint(folder)
    # A prefix the original's strict=False would skip silently (nothing loaded) is refused too.
    torch.save({"model." + k: v for k, v in lora.items()}, folder / LORA_FILE)
    with pytest.raises(CheckpointError, match="not under base_model.model."):
        load_checkpoint(folder)


def test_run_ave_end_to_end(capsys, crabplus_released, demo_clip):
    r = cli(capsys, "run", demo_clip, "--checkpoint", crabplus_released, "--task", "ave", "--max-new-tokens", "8",
            "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert result["task"] == "ave" and result["text"]
    assert set(result["timings_ms"]) >= {"audio", "visual", "prefill", "decode_tokens"}


def test_run_s4_writes_no_mask_without_coordinates(capsys, crabplus_released, demo_clip, tmp_path):
    r = cli(capsys, "run", demo_clip, "--checkpoint", crabplus_released, "--task", "s4", "--max-new-tokens", "8",
            "--out", tmp_path / "m")
    assert r.rc == 0, r.err
    assert "no mask" in r.out and not list((tmp_path / "m").glob("*.png"))


def test_crabplus_options_are_refused_before_loading(capsys, crabplus_released, demo_clip):
    assert_user_error(cli(capsys, "run", demo_clip, "--checkpoint", crabplus_released, "--task", "ave", "--at", "3"),
                      "--at", "whole clip")
    assert_user_error(cli(capsys, "run", demo_clip, "--checkpoint", crabplus_released, "--task", "refavs"),
                      "expression")


@pytest.fixture(scope="module")
def tiny_pipeline():
    return Runtime(synthesize("crabplus-tiny", seed=1)).pipeline


def test_sam2_segments_what_the_thinker_wrote(tiny_pipeline, demo_clip):
    """The box and three points of an S4 answer drive SAM2 on the frame; the mask comes at the source's size."""
    spec = get_task("s4")
    inputs = decode(demo_clip, video_frames=None, at_fraction=2 / 5)
    text = "The object making the sound is a rect. [20,30,120,100] [50,60] [70,80] [90,70]"
    result = tiny_pipeline.read(spec, inputs, text, StageTimer())
    assert result.object_label and len(result.masks) == 1
    mask = result.masks[0]
    assert mask.mask.shape == inputs.picture.shape[:2] == (240, 320) and mask.mask.dtype == bool
    assert mask.time_s == pytest.approx(4.0) and result.box == pytest.approx([20 * 320 / 224, 30 * 240 / 224,
                                                                              120 * 320 / 224, 100 * 240 / 224])
    # The same prompt without the box is another prompt: SAM2 reads the box.
    without_box = tiny_pipeline.read(spec, inputs, "[50,60] [70,80] [90,70]", StageTimer())
    assert not np.array_equal(without_box.masks[0].mask, mask.mask) or not mask.mask.any()


def test_refavs_false_draws_no_mask(tiny_pipeline, demo_clip):
    spec = get_task("refavs")
    inputs = decode(demo_clip, video_frames=None)
    result = tiny_pipeline.read(spec, inputs, "<answer>false</answer> [20,30,120,100] [50,60] [70,80] [90,70]",
                                StageTimer())
    assert result.masks == [] and result.answer == "false"
    assert any("false" in note for note in result.notes)


def test_video_tasks_read_frames_spread_over_the_clip(demo_clip):
    inputs = decode(demo_clip, video_frames=10)
    assert inputs.video.shape == (10, 240, 320, 3)
    assert inputs.waveform.shape[0] == pytest.approx(10 * 16000, abs=160) and inputs.heard
    emotion = decode(demo_clip, video_frames=4)
    assert emotion.video.shape[0] == 4
    assert not np.array_equal(inputs.video[0], inputs.video[-1])  # the shapes move over the clip


def test_stream_runs_windows_of_the_task_clip(crabplus_released, demo_clip):
    runtime = Runtime.from_checkpoint(crabplus_released)
    with runtime.stream(demo_clip, "s4", stride=5, max_new_tokens=4) as windows:
        results = list(windows)
    assert [(r.start_s, r.end_s) for r in results] == [(0.0, 5.0), (5.0, 10.0)]
    assert windows.telemetry.audio_windows_encoded == 2 and windows.telemetry.frames_encoded == 2
    with pytest.raises(OptionError, match="--window 3: task 's4' hears one second of a 5-s clip"):
        runtime.stream(demo_clip, "s4", window=3, stride=3)


def test_event_times_are_units_of_the_clip_placed_in_source_seconds(tiny_pipeline, demo_clip):
    """AVE answers in tenths of its clip: on a 6-s clip starting at 20 s of a stream, units 5-10 are 23-26 s."""
    spec = get_task("ave")
    inputs = decode(demo_clip, video_frames=10)
    inputs.duration_s = 6.0
    result = tiny_pipeline.read(spec, inputs, "<event> dog barking </event> <range> 5,10 </range>", StageTimer(),
                                clip_start_s=20.0)
    assert [(e.start_s, e.end_s) for e in result.events] == [(23.0, 26.0)]


def _copy(folder, target):
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_weights_of_another_shape_than_the_config_are_refused_in_one_line(crabplus_released, tmp_path):
    folder = _copy(crabplus_released, tmp_path / "other-shape")
    config = json.loads((folder / "config.json").read_text())
    config["thinker_config"]["vision_config"]["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"weight 'visual\.blocks\.0\.mlp\.\w+_proj\.weight' has shape "
                                              r"\(\d+, \d+\), the model config says .*do not belong together"):
        load_checkpoint(folder)
    del config["thinker_config"]["vision_config"]["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_config has no hidden_size"):
        load_checkpoint(folder)


def test_media_options_are_refused_before_the_model_loads(capsys, crabplus_released, tmp_path):
    from PIL import Image

    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 48)).save(image)
    assert_user_error(cli(capsys, "run", image, "--checkpoint", crabplus_released, "--task", "s4"), "--audio")
