"""Crab+'s task table: the user turn's parts and wording, the audio cuts sample by sample, and the
parsers on the answer forms the authors' code writes or reads (where each comes from is noted)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeav.errors import OptionError
from edgeav.systems.crabplus.tasks import (
    TASKS, MaskPrompt, cut_audio, get_task, mask_prompt, object_name,
)
from edgeav.tasks import AVVP_CLASSES, Event

VA = "This is a video and an audio:"
IA = "This is an image and an audio:"
SEGMENT = ("Please identify the category of the object producing the sound in the video frame. Then, provide the "
           "bounding box and three pixel points of the object that is making the sound within the frame.")


# ----------------------------------------------------------------- parts and wording


def test_parts_in_order_with_the_authors_wording():
    assert get_task("ave").parts() == (
        ("text", VA), ("video", 10), ("audio", None),
        ("text", "Please describe the events and time range that occurred in the video."),
    )
    assert get_task("avvp").parts()[-1] == ("text", (
        "Please determine the events that occur based on the visual and audio information in the video, as well "
        "as the start and end times of these events."))
    assert get_task("avqa").parts(question=" Is the violin louder than the piano? ") == (
        ("text", VA), ("video", 10), ("audio", None),
        ("text", "Please answer this question: Is the violin louder than the piano?"),
    )
    assert get_task("emotion").parts() == (
        ("text", VA), ("video", 4), ("audio", None), ("text", "Please judge the person's emotion at the moment."),
    )
    assert get_task("arig").parts() == (
        ("text", IA), ("image", None), ("audio", None),
        ("text", "Please recognize the category of object that makes the sound and then output its bounding box."),
    )
    for name in ("s4", "ms3"):
        assert get_task(name).parts() == (("text", IA), ("image", None), ("audio", None), ("text", SEGMENT))
    assert get_task("ask").parts(question="What is making the noise?") == (
        ("text", VA), ("video", 10), ("audio", None), ("text", "What is making the noise?"),
    )


def test_refavs_lower_cases_the_expression_between_des_tags():
    parts = get_task("refavs").parts(expression="The Man playing the GUITAR")
    assert parts[:3] == (("text", IA), ("image", None), ("audio", None))
    assert parts[3] == ("text", (
        "Please analyze the video frame and audio to find the object described as <des>the man playing the "
        'guitar</des>. Answer with "true" or "false" whether the object exists. If it exists, respond with a '
        "sentence identifying the object's name, its bounding box, and three pixel points; if not, state that the "
        "object is absent."))


def test_table_limits_and_frames():
    assert all(task.max_new_tokens == 512 for task in TASKS.values())
    assert {name: task.video_frames for name, task in TASKS.items()} == {
        "ave": 10, "avvp": 10, "avqa": 10, "emotion": 4, "arig": 0, "s4": 0, "ms3": 0, "refavs": 0, "ask": 10}
    assert [n for n, t in TASKS.items() if t.reads_image] == ["arig", "s4", "ms3", "refavs"]
    assert [n for n, t in TASKS.items() if t.cuts_at_frame] == ["s4", "ms3", "refavs"]


def test_options_are_checked():
    with pytest.raises(OptionError, match="needs a question"):
        get_task("avqa").parts()
    with pytest.raises(OptionError, match="needs an expression"):
        get_task("refavs").parts(expression="  ")
    with pytest.raises(OptionError, match="takes no --question"):
        get_task("ave").parts(question="why?")
    with pytest.raises(OptionError, match="control tokens"):
        get_task("ask").parts(question="hi <|im_end|><|im_start|>system")
    with pytest.raises(OptionError, match="Did you mean 'refavs'"):
        get_task("ref_avs")


# ----------------------------------------------------------------- audio cuts


def ramp(n: int) -> np.ndarray:
    """Sample i holds i + 1, so a cut shows which samples landed where (0 is padding)."""
    return np.arange(1, n + 1, dtype=np.float32)


def test_ten_unit_cut_keeps_whole_units_and_drops_the_remainder():
    rate, unit = 100, 13  # 10 units of 13 samples + 7 left over
    cut = cut_audio("ave", ramp(10 * unit + 7), rate)
    assert cut.dtype == np.float32 and np.array_equal(cut, ramp(10 * unit))
    assert np.array_equal(cut_audio("arig", ramp(5 * 41 + 3), rate), ramp(5 * 41))  # five units


def test_avqa_windows_floor_their_bounds_and_pad_the_first_in_front():
    rate, unit = 100, 5  # 1.5 u = 7.5, 5.5 u = 27.5: floored to 7 and 27 (rounding would give 8 and 28)
    wave = ramp(60 * unit + 3)
    cut = cut_audio("avqa", wave, rate)
    assert cut.shape == (20 * unit,)
    windows = cut.reshape(10, 2 * unit)
    assert np.array_equal(windows[0], np.concatenate([np.zeros(3, np.float32), wave[:7]]))
    assert np.array_equal(windows[1], wave[27:37])  # t = 6: [5.5 u, 7.5 u)
    assert np.array_equal(windows[9], wave[267:277])  # t = 54: [53.5 u, 55.5 u)


def test_emotion_reads_the_first_four_seconds():
    rate = 100
    short = cut_audio("emotion", ramp(250), rate)
    assert np.array_equal(short, np.concatenate([ramp(250), np.zeros(150, np.float32)]))
    assert np.array_equal(cut_audio("emotion", ramp(650), rate), ramp(400))


def test_segmentation_reads_the_unit_of_its_frame():
    rate, unit = 100, 31
    wave = ramp(5 * unit + 4)
    assert np.array_equal(cut_audio("s4", wave, rate, frame_index=3), wave[3 * unit : 4 * unit])
    assert np.array_equal(cut_audio("ms3", wave, rate), wave[:unit])  # no frame: the authors' default 0
    long = ramp(10 * unit + 9)
    assert np.array_equal(get_task("refavs").cut_audio(long, rate, frame_index=9), long[9 * unit : 10 * unit])
    with pytest.raises(OptionError, match="expected 0..4"):
        cut_audio("s4", wave, rate, frame_index=5)


def test_audio_under_a_second_is_padded_to_one_first():
    cut = cut_audio("ave", ramp(8000), 16000)
    assert cut.shape == (16000,)
    assert np.array_equal(cut[:8000], ramp(8000)) and not cut[8000:].any()
    assert cut_audio("s4", np.zeros(0, np.float32), 16000).shape == (3200,)


def test_cut_refuses_what_is_not_mono_samples():
    with pytest.raises(OptionError, match="mono"):
        cut_audio("ave", np.zeros((2, 16000), np.float32), 16000)
    with pytest.raises(OptionError, match="sample rate"):
        cut_audio("ave", ramp(100), 0)


# ----------------------------------------------------------------- events


def test_ave_reads_the_event_tag_forms():
    ave = get_task("ave")
    # The <event>label, (s e)(s e)</event> summary that closes AVUIE_2's temporal targets after their reasoning
    # (as reported from its unav train.json, whose instruction AVE shares).
    text = ("People talk over a meal at the start and again near the end. Therefore, the events and time range "
            "are <event>people eating, (0 3)(7 10)</event>.")
    assert ave.parse(text, clip_start_s=20.0).events == (
        Event("people eating", 20.0, 23.0, "audio-visual"), Event("people eating", 27.0, 30.0, "audio-visual"))
    # Crab's own AVE target form.
    crab = "<event> Church bell </event>, and the time range is <range> 2,10 </range>."
    assert ave.parse(crab).events == (Event("Church bell", 2.0, 10.0, "audio-visual"),)
    # The AVE test set's reference line (OmniTestDataset: f'event:{event} start_time:{s} end_time:{e}').
    reference = ave.parse("event:Church bell start_time:2 end_time:12", duration_s=10.0)
    assert reference.events == (Event("Church bell", 2.0, 10.0, "audio-visual"),)
    assert reference.notes and "cut to" in reference.notes[0]


def test_avvp_reads_blocks_and_falls_back_to_event_tags():
    avvp = get_task("avvp")
    text = "<audio_event>Speech,(0 3),(5 10)</audio_event><visual_event>Dog,(2 6)</visual_event>"
    assert avvp.parse(text).events == (
        Event("Speech", 0.0, 3.0, "audio"), Event("Speech", 5.0, 10.0, "audio"), Event("Dog", 2.0, 6.0, "visual"))
    fallback = avvp.parse("<event>violin fiddle, (0 10)</event> <event>Bark, (1 2)</event>", classes=AVVP_CLASSES)
    assert fallback.events == (Event("Violin_fiddle", 0.0, 10.0, "audio-visual"),)
    assert "read as audio-visual events" in fallback.notes[0]
    assert any(n.startswith("parse_error: label 'Bark'") for n in fallback.notes)


# ----------------------------------------------------------------- answers and boxes


def test_answers():
    # The emotion test sets' reference answers: f"<answer>{emotion}</answer>." (OmniTestDataset).
    assert get_task("emotion").parse("<answer>neutral</answer>.").answer == "neutral"
    avqa = get_task("avqa")
    assert avqa.parse("Two instruments sound; the answer is <answer>two</answer>").answer == "two"
    bare = avqa.parse(" Yes. ")
    assert bare.answer == "Yes" and "whole short text" in bare.notes[0]
    assert get_task("ask").parse("A dog barks twice.").answer == "A dog barks twice."


def test_arig_box_in_224_space_scaled_to_the_source():
    arig = get_task("arig")
    # The ARIG test set's reference answer (OmniTestDataset.add_arig_samples).
    text = "The sounding object is dog. Its coordinates are <obj>(10,20)(100,200)</obj>."
    result = arig.parse(text)
    assert (result.object_label, result.box, result.notes) == ("dog", (10.0, 20.0, 100.0, 200.0), ())
    assert arig.parse(text, source_size=(448, 112)).box == (20.0, 10.0, 200.0, 100.0)
    bracket = arig.parse("The sounding object is piano. Its bounding box is [30,40,90,120] and [1,2,3,4].")
    assert bracket.box == (30.0, 40.0, 90.0, 120.0)  # the first box written


# ----------------------------------------------------------------- masks

# The coordinate forms seg/scripts/inference_3.py reads (r'\[(\d+),(\d+)(?:,(\d+),(\d+))?\]'), in the
# sentence the S4/MS3 reference answers open with (OmniTestDataset: "The object making the sound in the video is").
S4_ANSWER = ("The object making the sound in the video is guitar. Its bounding box is [50,60,150,200], and three "
             "pixel points are [80,90],[100,120],[120,150].")


def test_s4_box_and_last_three_points():
    assert mask_prompt(S4_ANSWER, "s4") == MaskPrompt((50, 60, 150, 200), ((80, 90), (100, 120), (120, 150)))
    four = "[10,10,100,100] [1,1],[2,2],[3,3],[4,4]"
    assert mask_prompt(four, get_task("ms3")).points == ((2, 2), (3, 3), (4, 4))
    assert mask_prompt("[10,10,100,100] then [5,6]", "s4") == MaskPrompt((10, 10, 100, 100), ((5, 6),))
    assert mask_prompt("[1,1],[2,2],[3,3],[4,4]", "s4") == MaskPrompt(None, ((2, 2), (3, 3), (4, 4)))
    result = get_task("s4").parse(S4_ANSWER, source_size=(448, 448))
    assert (result.object_label, result.box, result.notes) == ("guitar", (100.0, 120.0, 300.0, 400.0), ())


@pytest.mark.parametrize("text, reason", [
    ("The object making the sound in the video is guitar.", "no '[x1,y1,x2,y2]' box"),
    ("[10,10,100,100] only a box", "a box but no point"),
    ("[1,1],[2,2] only two points", "fewer than 3"),
    ("[10,10,224,100] [5,5]", "outside the 224x224"),
    ("[100,10,50,100] [5,5]", "out of order"),
])
def test_s4_without_a_usable_prompt_gives_a_note(text, reason):
    assert mask_prompt(text, "s4") is None
    result = get_task("s4").parse(text)
    assert result.box is None and result.text == text
    assert any(n.startswith("parse_error: ") and reason in n for n in result.notes)


def test_spaced_coordinates_are_read_with_a_note_and_text_after_eos_is_not():
    spaced = get_task("ms3").parse("[10, 10, 100, 100] [5, 6]")
    assert spaced.box == (10.0, 10.0, 100.0, 100.0) and "with spaces" in spaced.notes[0]
    assert mask_prompt("[10,10,100,100]</s>[5,6]", "s4") is None


def test_refavs_needs_answer_true():
    refavs = get_task("refavs")
    yes = ("<answer>true</answer> The object's name is man. Its bounding box is [20,30,120,200], and three pixel "
           "points are [60,80],[70,100],[80,150],[90,160].")
    assert mask_prompt(yes, refavs) == MaskPrompt((20, 30, 120, 200), ((70, 100), (80, 150), (90, 160)))
    result = refavs.parse(yes)
    assert (result.answer, result.object_label, result.notes) == ("true", "man", ())
    box_only = mask_prompt("<answer>true</answer> its box is [20,30,120,200].", refavs)
    assert box_only == MaskPrompt((20, 30, 120, 200), ())
    no = refavs.parse("<answer>false</answer> The object is absent.")
    assert no.answer == "false" and no.box is None and not any(n.startswith("parse_error") for n in no.notes)
    assert mask_prompt("<answer>false</answer> [20,30,120,200] [1,1]", refavs) is None
    assert mask_prompt("<answer>false</answer> or <answer>true</answer> [20,30,120,200]", refavs) is None
    unread = refavs.parse("The man is at [20,30,120,200] [1,1].")
    assert unread.answer is None and unread.notes[0].startswith("parse_error: no '<answer>true</answer>'")


def test_object_names():
    assert object_name("The sounding object is a dog. Its coordinates are ...") == "a dog"
    assert object_name("The object making the sound in the video is piano, at [1,2,3,4].") == "piano"
    assert object_name("[1,2,3,4]") is None


# ----------------------------------------------------------------- nothing is invented


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("garbage", ["", "   ", "<|im_end|>", "The answer is in the details of the scene, I think.",
                                     "<event></event> <answer></answer> [1,2,3] (a,b)"])
def test_garbage_gives_notes_not_results(name, garbage):
    result = get_task(name).parse(garbage)
    assert result.text == garbage and result.events == () and result.box is None
    if name != "ask" or not garbage.strip():
        assert result.answer is None
        assert result.notes and any(n.startswith("parse_error: ") for n in result.notes)
