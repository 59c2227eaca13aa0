"""Runtime and `edgeav run`: every task end to end on a generated clip with a synthetic checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from edgeav.systems.crab.checkpoints import JOINT_FILE
from edgeav.cli import main
from edgeav.media import SAMPLE_RATE
from edgeav.systems.crab.pipeline import STAGES
from edgeav.runtime import Runtime
from edgeav.systems.crab.tasks import TASKS

from conftest import rig_llm_to_say

OPTIONS = {"avqa": ["--question", "How many sounds?"], "ask": ["--question", "What moves?"],
           "refavs": ["--expression", "the red square"]}
RESULT_KEYS = {"task", "text", "events", "box", "answer", "masks", "timings_ms"}


def run_cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_runs_with_a_synthetic_checkpoint(task, tiny_released, demo_clip, capsys, tmp_path):
    code, out, err = run_cli(capsys, "run", demo_clip, "--task", task, "--checkpoint", tiny_released, "--json",
                             "--max-new-tokens", "4", *(["--out", tmp_path] if TASKS[task].mask_classes else []),
                             *OPTIONS.get(task, []))
    assert code == 0, err
    result = json.loads(out)
    assert RESULT_KEYS <= result.keys() and result["task"] == task
    assert set(result["timings_ms"]) == set(STAGES)
    assert result["timings_ms"]["prefill"] > 0 and result["timings_ms"]["visual"] > 0
    assert isinstance(result["text"], str) and isinstance(result["events"], list)


def test_mask_task_writes_masks_at_the_source_size(tiny_released, demo_clip, tmp_path):
    runtime = Runtime.from_checkpoint(tiny_released)
    runtime.engine.variant("avs")  # rig the LM head that S4 runs with
    rig_llm_to_say(runtime.engine, ["<mask_start>", *[f"<mask_{i}>" for i in range(6)], "<mask_end>"])
    result = runtime.run(demo_clip, "s4", at_seconds=[0, 3])
    assert [m.time_s for m in result.masks] == [0.0, 3.0]
    assert all(m.mask.shape == (240, 320) and m.mask.dtype == bool for m in result.masks)
    assert result.timings_ms["mask"] > 0
    result.save_masks(tmp_path)
    saved = sorted(tmp_path.glob("*.png"))
    assert len(saved) == 2 and Image.open(saved[0]).size == (320, 240)
    assert result.to_dict()["masks"][0]["path"] == str(saved[0])


def test_avss_masks_are_class_maps(tiny_released, demo_clip):
    runtime = Runtime.from_checkpoint(tiny_released)
    runtime.engine.variant("avss")
    rig_llm_to_say(runtime.engine, ["<mask_start>", *[f"<mask_{i}>" for i in range(6)], "<mask_end>"])
    result = runtime.run(demo_clip, "avss", at_seconds=[2])
    (mask,) = result.masks
    assert mask.mask.dtype == np.uint8 and mask.mask.shape == (240, 320) and mask.mask.max() < 71


def test_converted_and_released_checkpoints_answer_alike(tiny_released, demo_clip, tmp_path, capsys):
    assert run_cli(capsys, "convert", tiny_released, tmp_path / "conv")[0] == 0
    texts = []
    for folder in (tiny_released, tmp_path / "conv"):
        code, out, err = run_cli(capsys, "run", demo_clip, "--task", "ave", "--checkpoint", folder, "--json",
                                 "--max-new-tokens", "12")
        assert code == 0, err
        texts.append(json.loads(out)["text"])
    assert texts[0] == texts[1]


def one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_run_refuses_bad_checkpoints_and_options(tiny_released, demo_clip, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_released, broken)
    data = (broken / JOINT_FILE).read_bytes()
    (broken / JOINT_FILE).write_bytes(data[: len(data) // 3])
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--checkpoint", broken)[::2])
    assert JOINT_FILE in line and "truncated" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--checkpoint", tiny_released, "--preset", "crab-small")[::2])
    assert "crab-small" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--checkpoint", tiny_released, "--task", "avqa")[::2])
    assert "--question" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--checkpoint", tiny_released, "--task", "s4",
                                   "--at", "7")[::2])
    assert "--at 7" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--task", "avee")[::2])
    assert "'ave'" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--preset", "crab-small")[::2])
    assert "--random-weights" in line


def test_synth_and_convert_refuse_to_overwrite(tiny_released, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    line = one_line_error(*run_cli(capsys, "synth", target, "--preset", "crab-tiny")[::2])
    assert "already exists" in line and (target / "keep.txt").read_text() == "mine"
    line = one_line_error(*run_cli(capsys, "convert", tiny_released, target)[::2])
    assert "already exists" in line
    line = one_line_error(*run_cli(capsys, "synth", tmp_path / "big", "--preset", "crab-7b")[::2])
    assert "30 GB" in line
    code, out, err = run_cli(capsys, "synth", tmp_path / "fresh", "--preset", "crab-tiny", "--seed", "4")
    assert code == 0 and (tmp_path / "fresh" / JOINT_FILE).is_file()
    assert not (tmp_path / "fresh.partial").exists()


def test_avss_hears_the_second_of_each_frame(demo_clip):
    from edgeav.systems.crab.inputs import decode
    from edgeav.systems.crab.tasks import get_task

    inputs = decode(demo_clip, get_task("avss"), [0, 1, 3])
    # The authors' cut makes each piece len // 10 samples (16,012 here), so piece 0 ends with 12 of second 1's.
    rms = {t: float(np.sqrt(np.mean(w[:, :SAMPLE_RATE] ** 2))) for t, w in inputs.audio.items()}
    assert all(w.shape[1] >= SAMPLE_RATE for w in inputs.audio.values())
    assert rms[0.0] < 0.01 and rms[1.0] > 0.3 and rms[3.0] > 0.3  # the demo clip sounds in odd seconds
    assert sorted(inputs.image_frames) == sorted(inputs.source_frames) == [0, 1, 3]
    assert inputs.source_frames[1].shape == (240, 320, 3) and inputs.duration_s == pytest.approx(10.0, abs=0.1)


def test_weights_stay_trainable_after_a_mask_run(tiny_released, demo_clip):
    runtime = Runtime.from_checkpoint(tiny_released)
    runtime.run(demo_clip, "avss", at_seconds=[1], max_new_tokens=2)
    seg = runtime.engine.model.seg
    assert seg.num_classes == 71
    assert not any(p.is_inference() for p in runtime.engine.model.parameters())
    with torch.no_grad():
        next(seg.parameters()).add_(1.0)  # in-place edits (fine-tuning, export) still work


def test_bf16_runs(tiny_released, demo_clip, capsys):
    code, out, err = run_cli(capsys, "run", demo_clip, "--checkpoint", tiny_released, "--dtype", "bf16",
                             "--json", "--max-new-tokens", "3")
    assert code == 0, err
    assert json.loads(out)["timings_ms"]["prefill"] > 0


def test_longer_sources_read_the_task_clip_and_say_so(tiny_released, tmp_path):
    from edgeav.media import synth

    clip = tmp_path / "long.mp4"
    synth.write_clip(clip, duration_s=14, width=96, height=64)
    result = Runtime.from_checkpoint(tiny_released).run(clip, "ave", max_new_tokens=2)
    assert any("first 10 s" in note for note in result.notes)


def test_run_refuses_unwritable_out_and_reserved_tokens(tiny_released, demo_clip, tmp_path, capsys):
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--checkpoint", tiny_released,
                                   "--out", tmp_path / "missing" / "masks")[::2])
    assert "--out" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--task", "avqa", "--question", "is <audio> loud?")[::2])
    assert "<audio>" in line
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--task", "arig", "--at", "0", "--at", "1")[::2])
    assert "single --at" in line


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_weight_only_llm_keeps_the_demo_answers(weights):
    """int8/int4 LLM projections (I-LoRA and head exact) answer the demo clip as the fp32 model does,
    mask tasks included (they swap the head's rows per weight variant)."""
    from edgeav.kernels import QuantizedILoRALinear
    from edgeav.runtime import DEMO_CLIP

    reference, quantized = Runtime.demo(), Runtime.demo(llm_weights=weights)
    layers = quantized.engine.model.llm.model.layers
    assert isinstance(layers[0].self_attn.q_proj, QuantizedILoRALinear)
    for task, at in (("ave", None), ("s4", [2])):
        expected = reference.run(DEMO_CLIP, task, at_seconds=at)
        got = quantized.run(DEMO_CLIP, task, at_seconds=at)
        assert got.text == expected.text
    assert (got.masks[0].mask == expected.masks[0].mask).mean() > 0.95


def test_llm_weights_refused_for_engines_and_unknown_modes(demo_engine, capsys):
    line = one_line_error(*run_cli(capsys, "run", "--engine", demo_engine, "--llm-weights", "int4")[::2])
    assert "--llm-weights" in line
    line = one_line_error(*run_cli(capsys, "run", "--llm-weights", "int3")[::2])
    assert "int3" in line
    line = one_line_error(*run_cli(capsys, "run", "--llm-weights", "int4")[::2])
    assert "--llm-weights int4 on the CPU" in line and "--precision int4" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_device_cuda_without_a_gpu_is_one_line(capsys):
    line = one_line_error(*run_cli(capsys, "run", "--device", "cuda")[::2])
    assert "--device cuda" in line and "CUDA" in line


# -- issue 12: the library's option types, long questions ------------------------------


@pytest.fixture(scope="module")
def tiny_runtime(tiny_released):
    return Runtime.from_checkpoint(tiny_released)


@pytest.mark.parametrize("options,needle", [
    (dict(at_seconds=[2.5]), r"at_seconds \(--at\) 2.5: a frame is named by its whole second"),
    (dict(at_seconds=[True]), r"at_seconds \(--at\) True: .* bool is not one"),
    (dict(at_seconds="2"), r"at_seconds \(--at\) '2': give whole seconds"),
    (dict(at_seconds=[-1]), r"at_seconds \(--at\) -1: seconds start at 0"),
    (dict(max_new_tokens=2.5), r"max_new_tokens \(--max-new-tokens\) 2.5: give a whole number"),
    (dict(max_new_tokens=True), r"max_new_tokens \(--max-new-tokens\) True"),
])
def test_run_refuses_options_of_the_wrong_type_in_one_line(tiny_runtime, demo_clip, options, needle):
    from edgeav.errors import OptionError

    with pytest.raises(OptionError, match=needle):
        tiny_runtime.run(demo_clip, "s4", **options)


def test_a_single_int_at_seconds_is_one_second(tiny_runtime, demo_clip):
    from edgeav.systems.crab.pipeline import check_run_options

    assert check_run_options(TASKS["s4"], question=None, expression=None, max_new_tokens=None, at_seconds=2) == [2]
    assert check_run_options(TASKS["s4"], question=None, expression=None, max_new_tokens=None,
                             at_seconds=(np.int64(1), 3)) == [1, 3]
    result = tiny_runtime.run(demo_clip, "s4", at_seconds=2, max_new_tokens=2)
    assert list(result.frames) == [2.0]


@pytest.mark.parametrize("options,needle", [(dict(window=2.5), r"window \(--window\) 2.5: give whole seconds"),
                                            (dict(stride=1.5), r"stride \(--stride\) 1.5: give whole seconds")])
def test_stream_windows_and_strides_are_whole_seconds(tiny_runtime, options, needle):
    from edgeav.errors import OptionError

    with pytest.raises(OptionError, match=needle):
        tiny_runtime.push_session("ave", **options)


def test_a_question_longer_than_the_context_is_refused_with_the_fix(tiny_runtime, demo_clip, capsys, tiny_released):
    from edgeav.errors import OptionError

    context = tiny_runtime.config.llm.max_seq_len
    long_question = "why " * (2 * context)
    with pytest.raises(OptionError, match=rf"the model's context is {context} tokens: shorten the question "
                                          r"\(--question\)") as error:
        tiny_runtime.run("no-such-file.mp4", "avqa", question=long_question)  # refused before the media is read
    assert "its text alone" in str(error.value)
    line = one_line_error(*run_cli(capsys, "run", demo_clip, "--checkpoint", tiny_released, "--task", "avqa",
                                   "--question", long_question)[::2])
    assert f"the model's context is {context} tokens: shorten the question" in line
    # A question that fits the text alone but not with the clip's media tokens is refused before generation.
    tokens = tiny_runtime.tokenizer.encode_chat
    words = context
    while (n := len(tokens(TASKS["avqa"].instruction(question="why " * words)))) >= context:
        words = min(words - 1, words * (context - 2) // n)
    assert n >= context - 50
    with pytest.raises(OptionError, match="with its media"):
        tiny_runtime.run(demo_clip, "avqa", question="why " * words, max_new_tokens=2)
