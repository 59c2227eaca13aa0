"""Tasks: instructions byte for byte, strict parsers (what does not parse is a note, never an event),
metrics on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeav.errors import OptionError
from edgeav.metrics import (
    AVVPScores,
    answers_match,
    ave_accuracy,
    ave_second_labels,
    avqa_accuracy,
    avss_class_iou,
    avss_miou,
    avvp_scores,
    box_iou,
    fg_bg_iou,
    iou_share,
    mask_fscore,
    mask_iou,
    mask_miou,
    mean_avvp_scores,
    null_score,
)
from edgeav.tasks import AVSS_CLASS_NAMES, AVVP_CLASSES, Event
from edgeav.systems.crab.tasks import DEMO_WORLD_CLASSES, TASKS, box_to_source, get_task, parse_avvp, task_classes

VIDEO_AUDIO = "This is a video:\n<video_start><video><video_end>\nThis is an audio:\n<audio_start><audio><audio_end>\n"
IMAGE_AUDIO = "This is an image:\n<image_start><image><image_end>\nThis is an audio:\n<audio_start><audio><audio_end>\n"
MASKS = "<mask_start><mask_0><mask_1><mask_2><mask_3><mask_4><mask_5><mask_end>"


# ----------------------------------------------------------------- table and instructions


def test_instructions_are_byte_exact():
    assert get_task("ave").instruction() == (
        VIDEO_AUDIO + "Please describe the events and time range that occurred in the video."
    )
    assert get_task("avqa").instruction(question="What is the left instrument of the first sounding instrument?") == (
        VIDEO_AUDIO + "Please answer this question: What is the left instrument of the first sounding instrument?"
    )
    assert get_task("s4").instruction(second=2) == (
        VIDEO_AUDIO + "Please recognize the category of object making sound in the video, and then segment out "
        "the object that makes the sound at the third second of the video."
    )
    assert get_task("ms3").instruction() == (
        VIDEO_AUDIO + "Please recognize the category of object making sound in the video, and then segment out "
        "the object that makes the sound at the first second of the video."
    )
    assert get_task("arig").instruction() == (
        IMAGE_AUDIO + "Please recognize the category of object that makes the sound and then output the location "
        "coordinates."
    )
    assert get_task("avss").instruction() == (
        IMAGE_AUDIO + "Please recognize the category of the object making the sound in the image and segment it out."
    )
    assert get_task("avvp").instruction() == (
        VIDEO_AUDIO + "Please determine the events that occur based on the visual and audio information in the "
        "video, as well as the start and end times of these events."
    )
    # Ref-AVS is evaluated with the image block after the video and audio blocks.
    assert get_task("refavs").instruction(expression="making the loudest sound") == (
        VIDEO_AUDIO + "This is an image:\n<image_start><image><image_end>\n"
        "Please segment out the corresponding object in the image based on the referential expression: "
        "making the loudest sound"
    )
    assert get_task("ask").instruction(question="  Who is talking?  ") == VIDEO_AUDIO + "Who is talking?"


def test_question_braces_are_kept_verbatim():
    assert get_task("avqa").instruction(question="what is {x}?").endswith("Please answer this question: what is {x}?")


def test_table_limits_and_inputs():
    assert set(TASKS) == {"ave", "avvp", "arig", "s4", "ms3", "avss", "refavs", "avqa", "ask"}
    tokens = {name: task.max_new_tokens for name, task in TASKS.items()}
    assert tokens == {"ave": 500, "avvp": 500, "avqa": 500, "arig": 500, "s4": 100, "ms3": 100,
                      "refavs": 100, "avss": 100, "ask": 500}
    assert [TASKS[n].video_frames for n in ("ave", "avqa", "s4", "arig", "avss", "refavs")] == [10, 10, 5, 0, 0, 10]
    assert {n for n, t in TASKS.items() if t.image_frame} == {"arig", "s4", "ms3", "avss", "refavs"}
    assert {n: t.requires for n, t in TASKS.items() if t.requires} == {
        "avqa": "question", "ask": "question", "refavs": "expression"}
    assert {n: t.mask_classes for n, t in TASKS.items() if t.mask_classes} == {
        "s4": 1, "ms3": 1, "refavs": 1, "avss": 71}


def test_audio_plans_come_from_the_media_layer():
    assert get_task("ave").plan_audio().starts_s == tuple(float(i) for i in range(10))
    assert get_task("s4").plan_audio().starts_s == (0.0, 1.0, 2.0, 3.0, 4.0)
    assert get_task("avss").plan_audio(frame_time_s=3.4).starts_s == (3.0,)
    avqa = get_task("avqa").plan_audio()
    assert avqa.length_s == 2.0 and avqa.starts_s[:2] == (-0.5, 5.5)
    assert get_task("ask").plan_audio(duration_s=20.0).starts_s[:2] == (-0.5, 1.5)


def test_clip_lengths_live_in_the_task_table_and_the_rest_follows():
    """Crab's clip lengths (CRAB_SPEC 4): each task says it once; audio plans, the seconds a mask task
    segments, the --at bound and a stream's default window are read from it."""
    from edgeav.systems.crab.inputs import image_seconds
    from edgeav.systems.crab.pipeline import check_run_options, check_stream_options

    clip = {n: t.clip_s for n, t in TASKS.items()}
    assert clip == {"ave": 10, "avvp": 10, "avqa": 60, "ask": 60, "arig": 5, "s4": 5, "ms3": 5, "avss": 10,
                    "refavs": 10}
    assert {n for n, t in TASKS.items() if t.fixed_clip} == {"ave", "avvp", "refavs", "s4", "ms3", "arig"}
    for name, spec in TASKS.items():
        if spec.audio_plan == "seconds":  # one 1-s window per clip second
            assert spec.plan_audio().starts_s == tuple(float(i) for i in range(spec.clip_s)), name
        if spec.mask_classes:  # every second of the clip, as far as the source goes
            assert image_seconds(spec, None, 30.0) == list(range(spec.clip_s)), name
            assert image_seconds(spec, None, 2.5) == [0, 1, 2], name
        assert check_stream_options(name, window=None, stride=1, question="q" if spec.requires == "question" else None,
                                    expression="e" if spec.requires == "expression" else None)[1] == \
            spec.default_window_s
    assert {n: t.default_window_s for n, t in TASKS.items() if t.default_window_s != t.clip_s} == {
        "avss": 1, "avqa": 10, "ask": 10}
    assert {n for n, t in TASKS.items() if t.names_second} == {"s4", "ms3"}
    check_run_options(get_task("s4"), question=None, expression=None, max_new_tokens=None, at_seconds=[4])
    with pytest.raises(OptionError, match="--at 5: task 's4' segments seconds 0 to 4 of its clip"):
        check_run_options(get_task("s4"), question=None, expression=None, max_new_tokens=None, at_seconds=[5])


def test_unknown_task_lists_names_and_a_close_match():
    with pytest.raises(OptionError) as error:
        get_task("ref-avs")
    message = str(error.value)
    assert "'ref-avs'" in message and "ave, avvp, avqa, arig, s4, ms3, avss, refavs, ask" in message
    assert "Did you mean 'refavs'?" in message
    with pytest.raises(OptionError, match="expected one of"):
        get_task("zzzz")


def test_missing_or_unused_options():
    with pytest.raises(OptionError, match="--question"):
        get_task("avqa").instruction()
    with pytest.raises(OptionError, match="--question"):
        get_task("ask").instruction(question="   ")
    with pytest.raises(OptionError, match="needs an expression: pass --expression"):
        get_task("refavs").instruction()
    with pytest.raises(OptionError, match="needs a question: pass --question"):
        get_task("avqa").instruction(question="")
    with pytest.raises(OptionError, match="takes no --question"):
        get_task("ave").instruction(question="why?")
    with pytest.raises(OptionError, match="out of range"):
        get_task("s4").instruction(second=5)


# ----------------------------------------------------------------- parsers


def test_parse_ave_well_formed():
    text = ("A man speaks until the 8th second. So the audible and visible event in the video is "
            "<event> Male speech, man speaking </event>, and the time range is <range> 0,8 </range>.</s><unk><unk>")
    result = get_task("ave").parse(text)
    assert result.events == (Event("Male speech, man speaking", 0.0, 8.0, "audio-visual"),)
    assert result.text == text and result.task == "ave"


def test_parse_ave_variants():
    text = "<EVENT>church bell</Event> , and the time range is < range >2 , 5</RANGE>"
    assert get_task("ave").parse(text, clip_start_s=30.0).events == (Event("church bell", 32.0, 35.0, "audio-visual"),)
    several = "<event> Bark </event> at <range> 0,2 </range> and again <range>6,9</range>"
    assert [(e.start_s, e.end_s) for e in get_task("ave").parse(several).events] == [(0.0, 2.0), (6.0, 9.0)]
    inline = "<event> Bark,(0 3) </event>"
    assert get_task("ave").parse(inline).events == (Event("Bark", 0.0, 3.0, "audio-visual"),)


@pytest.mark.parametrize("garbage", ["", "no tags at all", "<event> </event> <range> a,b </range> ((",
                                     "<event> Dog </event>, and the time range is <range> 3,", "<range>1,2</range>"])
def test_parse_ave_garbage(garbage):
    result = get_task("ave").parse(garbage)
    assert result.events == () and result.text == garbage
    assert result.notes and all(note.startswith("parse_error: ") for note in result.notes)


def test_parse_avvp_well_formed():
    text = ("<visual_event>Chainsaw,(0 1),(3 6),(9 10)</visual_event> and "
            "<audio_event>Speech,(0 3),(5 10)</audio_event>")
    events = get_task("avvp").parse(text).events
    assert events == (
        Event("Chainsaw", 0.0, 1.0, "visual"), Event("Chainsaw", 3.0, 6.0, "visual"),
        Event("Chainsaw", 9.0, 10.0, "visual"),
        Event("Speech", 0.0, 3.0, "audio"), Event("Speech", 5.0, 10.0, "audio"),
    )


def test_parse_avvp_variants():
    text = ("<AUDIO_EVENT> speech , (0, 3) ,(5 10) </Audio_Event>"
            "<audio_event>Frying_(food),(2 4),Dog,(6 8)</audio_event><visual_event>Dog,(2 4)")
    assert [(e.label, e.start_s, e.end_s, e.modality) for e in parse_avvp(text, clip_start_s=10.0).events] == [
        ("speech", 10.0, 13.0, "audio"), ("speech", 15.0, 20.0, "audio"),
        ("Frying_(food)", 12.0, 14.0, "audio"), ("Dog", 16.0, 18.0, "audio"), ("Dog", 12.0, 14.0, "visual"),
    ]
    legacy = "<visual>Chainsaw,(0 10)</visual> and <audio>Chainsaw,(0 10)</audio>"
    assert [e.modality for e in parse_avvp(legacy).events] == ["visual", "audio"]


@pytest.mark.parametrize("garbage", ["", "Speech,(0 3)", "<audio_event>(1 2)</audio_event> noise",
                                     "<visual_event>Dog,(a b)</visual_event>"])
def test_parse_avvp_garbage(garbage):
    result = get_task("avvp").parse(garbage, classes=AVVP_CLASSES)
    assert result.events == () and result.text == garbage
    assert result.notes and all(note.startswith("parse_error: ") for note in result.notes)


def test_parse_avqa():
    avqa = get_task("avqa")
    assert avqa.parse("So the answer is <answer> saxophone </answer>.</s>").answer == "saxophone"
    assert avqa.parse("< ANSWER >Two</answer >").answer == "Two"
    assert avqa.parse("reasoning ... <answer> yes").answer == "yes"
    for garbage in ("", "the answer is saxophone", "<answer> </answer>"):
        result = avqa.parse(garbage)
        assert result.answer is None and result.text == garbage


def test_parse_arig():
    arig = get_task("arig")
    text = ("The sounding object is dog. Its coordinate of top left corner is (10,20) and coordinate of "
            "bottom right corner is (100,200)</s>")
    result = arig.parse(text)
    assert (result.object_label, result.box) == ("dog", (10.0, 20.0, 100.0, 200.0))
    assert arig.parse(text, source_size=(448, 112)).box == (20.0, 10.0, 200.0, 100.0)
    variant = ("the SOUNDING object is  a dog . its coordinate of TOP LEFT corner is ( 10 , 20 ) and "
               "coordinate of bottom right corner is ( 100,200.5 )")
    assert arig.parse(variant).box == (10.0, 20.0, 100.0, 200.5)
    assert arig.parse(variant).object_label == "a dog" and arig.parse(variant).notes == ()
    tagged = arig.parse("The sounding object is guitar. Its coordinates are <obj>(5,6)(50,60)</obj>.")
    assert tagged.box == (5.0, 6.0, 50.0, 60.0)
    for garbage in ("", "a box (1,2) (3,4)", "The sounding object is"):
        result = arig.parse(garbage)
        assert result.box is None and result.object_label is None and result.text == garbage
        assert result.notes and result.notes[0].startswith("parse_error: no 'top left corner")


def test_box_to_source_scales_each_axis():
    assert box_to_source([56, 112, 112, 224], 640, 480) == (160.0, 240.0, 320.0, 480.0)
    assert box_to_source([-5, 0, 300, 10], 224, 224) == (0.0, 0.0, 224.0, 10.0)


def test_parse_mask_outputs():
    s4 = get_task("s4").parse(
        "The object making the sound in the video is dog. The mask of the object that makes the sound at the "
        "first second is " + MASKS + "</s>")
    assert (s4.object_label, s4.has_mask_tokens) == ("dog", True)
    spaced = get_task("ms3").parse("The object making the sound in the video is Piano . mask <mask_start> <mask_0> "
                                   "<mask_1> <Mask_2> <mask_3> <mask_4> <mask_5> <mask_end>")
    assert (spaced.object_label, spaced.has_mask_tokens) == ("Piano", True)
    five = get_task("s4").parse("<mask_start><mask_0><mask_1><mask_2><mask_3><mask_4><mask_end>")
    assert five.has_mask_tokens is False
    ref = get_task("refavs").parse("At the first second in the video, the loudest instrument is guitar. Its mask is "
                                   + MASKS)
    assert (ref.object_label, ref.has_mask_tokens) == ("guitar", True)
    avss = get_task("avss").parse("The category of the sound-making object and its mask image are " + MASKS)
    assert (avss.object_label, avss.has_mask_tokens) == (None, True)
    for garbage in ("", "<mask_9><mask_start>", "object making the sound in the video is <mask_0>"):
        result = get_task("s4").parse(garbage)
        assert (result.object_label, result.has_mask_tokens, result.text) == (None, False, garbage)


def test_parse_ask_and_json():
    result = get_task("ask").parse("<s> A dog   barks. </s><unk>")
    assert result.answer == "A dog barks."
    assert get_task("ask").parse("</s>").answer is None
    ave = get_task("ave").parse("<event> Bark </event> <range> 1,3 </range>", clip_start_s=5.0)
    assert json.loads(json.dumps(ave.to_dict())) == {
        "task": "ave", "text": "<event> Bark </event> <range> 1,3 </range>",
        "events": [{"label": "Bark", "start_s": 6.0, "end_s": 8.0, "modality": "audio-visual"}],
        "box": None, "answer": None, "object_label": None, "has_mask_tokens": False, "notes": [],
    }
    assert get_task("arig").parse("The sounding object is x. <obj>(1,2)(3,4)</obj>").to_dict()["box"] == [1, 2, 3, 4]


def test_avvp_labels_must_be_the_models_classes():
    avvp = get_task("avvp")
    # What the demo model once wrote: a closing tag run into the next label.
    written = "<audio_event>horn,(1 3)</visualhorn,(0 10)</visual_event>"
    result = avvp.parse(written, classes=task_classes(avvp, "crab-tiny"))
    assert result.events == (Event("horn", 1.0, 3.0, "audio"),)
    assert result.notes == ("parse_error: label '</visualhorn' holds markup, not a class name; its events are dropped",)
    # Without a class list only markup is refused.
    assert avvp.parse(written).events == result.events
    # Crab's LLP classes: labels compare loosely and come back in the classes' spelling; others are refused.
    crab = avvp.parse("<audio_event>speech,(0 3),frying (food),(4 6),Unicorn,(7 9)</audio_event>",
                      classes=task_classes(avvp))
    assert crab.events == (Event("Speech", 0.0, 3.0, "audio"), Event("Frying_(food)", 4.0, 6.0, "audio"))
    assert crab.notes == ("parse_error: label 'Unicorn' is not one of the task's 25 classes; its events are dropped",)
    assert avvp.parse(written, classes=AVVP_CLASSES).events == ()


def test_reversed_ranges_and_boxes_are_errors_not_reordered():
    ave = get_task("ave").parse("<event> horn </event>, and the time range is <range> 5,2 </range>")
    assert ave.events == () and ave.notes == ("parse_error: event 'horn' 5-2 s ends before it starts; dropped",)
    avvp = get_task("avvp").parse("<audio_event>Dog,(6 3),(7 9)</audio_event>", classes=AVVP_CLASSES)
    assert avvp.events == (Event("Dog", 7.0, 9.0, "audio"),)
    assert avvp.notes == ("parse_error: event 'Dog' 6-3 s ends before it starts; dropped",)
    corners = "The sounding object is horn. Its coordinate of top left corner is ({}) and coordinate of bottom " \
              "right corner is ({})"
    for top_left, bottom_right in (("133,12", "120,16"), ("10,50", "20,40")):
        arig = get_task("arig").parse(corners.format(top_left, bottom_right), source_size=(320, 240))
        assert arig.box is None and arig.object_label == "horn"
        assert arig.notes[0].startswith(f"parse_error: box ({top_left})-({bottom_right}) has its bottom-right corner")
    assert get_task("arig").parse(corners.format("10,20", "10,40")).box == (10.0, 20.0, 10.0, 40.0)


def test_event_ranges_are_cut_at_the_clip_end():
    ave = get_task("ave")
    # A 2-s source: "siren 0-8 s" is cut to the two seconds there are.
    cut = ave.parse("<event> siren </event>, and the time range is <range> 0,8 </range>", duration_s=2.0)
    assert cut.events == (Event("siren", 0.0, 2.0, "audio-visual"),)
    assert cut.notes == ("event 'siren' 0-8 s runs past the clip's end; cut to 0-2 s",)
    # In source time (a window starting at 30 s), and a range starting past the end is dropped.
    late = ave.parse("<event> siren </event> <range> 1,3 </range> <range> 4,6 </range>", clip_start_s=30.0,
                     duration_s=4.0)
    assert late.events == (Event("siren", 31.0, 33.0, "audio-visual"),)
    assert late.notes == ("event 'siren' 34-36 s starts after the clip's end at 34 s; dropped",)
    avvp = get_task("avvp").parse("<visual_event>Dog,(0 10)</visual_event>", duration_s=10.0, classes=AVVP_CLASSES)
    assert avvp.events == (Event("Dog", 0.0, 10.0, "visual"),) and avvp.notes == ()
    assert get_task("avvp").parse("<visual_event>Dog,(0 10)</visual_event>", duration_s=3.0).events[0].end_s == 3.0
    assert ave.parse("<event> siren </event> <range> 0,8 </range>").events[0].end_s == 8.0  # no length given


def test_answer_markup_is_stripped():
    avqa, ask = get_task("avqa"), get_task("ask")
    assert avqa.parse("so <answer> three /answer>").answer == "three"
    assert avqa.parse("<answer><answer> yes </answer>").answer == "yes"
    missing = avqa.parse("the answer is yes")
    assert missing.answer is None and missing.notes == ("parse_error: no '<answer> X </answer>' in the text",)
    assert ask.parse("<answer> A dog barks. </answer></s>").answer == "A dog barks."
    assert ask.parse("It is <ANSWER>two</answer> dogs <answer").answer == "It is two dogs"
    assert ask.parse("<answer></answer>").notes == ("parse_error: the model wrote no text",)


def test_label_sets():
    from edgeav.bench import world

    assert task_classes("avvp") == AVVP_CLASSES and len(AVVP_CLASSES) == 25
    assert task_classes("avvp", "crab-7b") == AVVP_CLASSES
    assert DEMO_WORLD_CLASSES == world.CLASS_NAMES  # the demo model names the world's classes
    assert task_classes("avvp", "crab-tiny") == DEMO_WORLD_CLASSES
    assert task_classes("avss", "crab-tiny") == ("background", *DEMO_WORLD_CLASSES)
    assert task_classes("ave") == () and task_classes(get_task("s4")) == ()
    # AVSBench-semantic's label2idx.json counts from 1 with background first: class id = its number - 1.
    assert len(AVSS_CLASS_NAMES) == 71 == get_task("avss").mask_classes
    assert (AVSS_CLASS_NAMES[0], AVSS_CLASS_NAMES[1], AVSS_CLASS_NAMES[28], AVSS_CLASS_NAMES[70]) == (
        "background", "accordion", "guitar", "woman")


# ----------------------------------------------------------------- metrics


def test_ave_second_labels_end_is_exclusive_unless_asked():
    event = Event("Church bell", 0.0, 8.0, "audio-visual")
    assert ave_second_labels([event]) == ["church bell"] * 8 + ["background"] * 2
    assert ave_second_labels([event], inclusive_end=True) == ["church bell"] * 9 + ["background"]
    whole = Event("Bark", 0.0, 10.0, "audio-visual")
    assert ave_second_labels([whole], inclusive_end=True) == ["bark"] * 10
    # A second counts when its centre is inside [start, end): 2.6..4.4 covers seconds 3 only.
    assert ave_second_labels([Event("Bark", 2.6, 4.4, "audio-visual")]).count("bark") == 1
    shifted = Event("Bark", 32.0, 35.0, "audio-visual")
    assert ave_second_labels([shifted], clip_start_s=30.0) == ["background"] * 2 + ["bark"] * 3 + ["background"] * 5


def test_ave_accuracy_hand_computed():
    truth = [Event("Church bell", 2.0, 5.0, "audio-visual")]  # seconds 2, 3, 4
    assert ave_accuracy([Event("church  BELL", 2.0, 6.0, "audio-visual")], truth) == pytest.approx(0.9)
    assert ave_accuracy([Event("Church bell", 2.0, 5.0, "audio-visual")], truth) == 1.0
    assert ave_accuracy([Event("Dog", 2.0, 5.0, "audio-visual")], truth) == pytest.approx(0.7)
    assert ave_accuracy([], truth) == pytest.approx(0.7)  # empty prediction: all background
    assert ave_accuracy([], []) == 1.0
    # GeWu-Lab's reading: truth covers 2..5, prediction 2..4 -> one second differs.
    assert ave_accuracy([Event("Church bell", 2.0, 4.0, "audio-visual")], truth, inclusive_end=True) == 0.9


def _avvp_example():
    truth = [Event("Speech", 0, 3, "audio"), Event("Dog", 5, 10, "audio"), Event("Speech", 0, 5, "visual")]
    pred = [Event("speech", 0, 4, "audio"), Event("Speech", 8, 10, "audio"), Event("Dog", 6, 10, "audio"),
            Event("Speech", 0, 5, "visual")]
    return pred, truth


def test_avvp_scores_two_classes_hand_computed():
    pred, truth = _avvp_example()
    scores = avvp_scores(pred, truth)
    # Segment audio: Speech TP3 FP3 FN0 -> 6/9; Dog TP4 FP0 FN1 -> 8/9.
    assert scores.segment_audio == pytest.approx((6 / 9 + 8 / 9) / 2)
    assert scores.segment_visual == pytest.approx(1.0)  # Speech perfect, Dog absent in both
    # Audio-visual truth Speech 0..2, prediction Speech 0..3: TP3 FP1 -> 6/7; Dog absent.
    assert scores.segment_av == pytest.approx(6 / 7)
    # Pooled: Speech TP 3+5 FP 3 FN 0 -> 16/19; Dog 8/9.
    assert scores.segment_event_av == pytest.approx((16 / 19 + 8 / 9) / 2)
    assert scores.segment_type_av == pytest.approx((7 / 9 + 1 + 6 / 7) / 3)
    # Events: audio Speech [0,4) hits [0,3) (IoU 3/4), [8,10) is a false alarm -> 2/3; Dog [6,10) vs [5,10) -> 1.
    assert scores.event_audio == pytest.approx((2 / 3 + 1) / 2)
    assert scores.event_visual == pytest.approx(1.0)
    assert scores.event_av == pytest.approx(1.0)
    assert scores.event_event_av == pytest.approx((4 / 5 + 1) / 2)


def test_avvp_event_iou_threshold():
    truth = [Event("Dog", 0, 4, "audio")]
    assert avvp_scores([Event("Dog", 0, 2, "audio")], truth).event_audio == 1.0  # IoU 2/4
    assert avvp_scores([Event("Dog", 0, 1, "audio")], truth).event_audio == 0.0  # IoU 1/4
    assert avvp_scores([Event("Dog", 0, 1, "audio")], truth).segment_audio == pytest.approx(2 / 5)


def test_avvp_edge_cases():
    empty = avvp_scores([], [])
    assert all(v == 1.0 for v in empty.to_dict().values())
    missed = avvp_scores([], [Event("Speech", 0, 3, "audio")])
    assert (missed.segment_audio, missed.segment_visual, missed.event_audio, missed.segment_av) == (0.0, 1.0, 0.0, 1.0)
    # With the class list given, predicted labels outside it are not scored; true ones must be in it.
    assert avvp_scores([Event("Unicorn", 0, 3, "audio")], [], classes=["Speech"]).segment_audio == 1.0
    with pytest.raises(ValueError, match="Unicorn"):
        avvp_scores([], [Event("Unicorn", 0, 3, "audio")], classes=["Speech"])
    pred, truth = _avvp_example()
    mean = mean_avvp_scores([avvp_scores(pred, truth), empty])
    assert isinstance(mean, AVVPScores) and mean.event_audio == pytest.approx(((2 / 3 + 1) / 2 + 1) / 2)


def test_box_metrics():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert box_iou(None, [0, 0, 2, 2]) == 0.0
    assert box_iou([5, 5, 6, 6], [0, 0, 2, 2]) == 0.0
    assert iou_share([1 / 7, 0.5, 0.9]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        iou_share([])


def test_mask_iou_hand_computed():
    pred = np.array([[1, 1], [0, 0]], bool)
    truth = np.array([[1, 0], [1, 0]], bool)
    assert mask_iou(pred, truth) == pytest.approx(1 / 3)
    empty = np.zeros((2, 2), bool)
    assert mask_iou(np.array([[1, 0], [0, 0]], bool), empty) == pytest.approx(3 / 4)  # scored on the background
    assert mask_iou(empty, empty) == 1.0
    assert mask_iou(empty, truth) == 0.0
    assert mask_miou([pred, np.array([[1, 0], [0, 0]], bool), empty], [truth, empty, truth]) == pytest.approx(13 / 36)
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(pred, np.zeros((3, 3), bool))


def test_fg_bg_iou_is_the_mean_of_both_classes():
    pred = np.array([[1, 1], [0, 0]], bool)
    truth = np.array([[1, 0], [1, 0]], bool)
    # foreground 1/3 (one of three pixels), background 1/3 (pixel (1,1) of three) -> 1/3
    assert fg_bg_iou(pred, truth) == pytest.approx(1 / 3)
    empty = np.zeros((2, 2), bool)
    assert fg_bg_iou(empty, empty) == 1.0  # no foreground anywhere: that class scores 1, the background 1
    assert fg_bg_iou(np.array([[1, 0], [0, 0]], bool), empty) == pytest.approx((0 + 3 / 4) / 2)
    assert fg_bg_iou(pred, pred) == 1.0


def test_mask_fscore_best_threshold_per_sample():
    probs = np.array([[0.9, 0.2], [0.6, 0.1]])
    truth = np.array([[1, 1], [0, 0]], bool)
    # Best threshold in (0.6, 0.9]: P = 1, R = 1/2 -> 1.3 * 0.5 / (0.3 + 0.5) = 0.8125.
    assert mask_fscore(probs, truth) == pytest.approx(0.8125)
    assert mask_fscore(probs, np.array([[1, 0], [0, 0]], bool)) == pytest.approx(1.0)
    assert mask_fscore(probs, np.zeros((2, 2), bool)) == 0.0  # empty truth
    assert mask_fscore(np.zeros((2, 2)), truth) == pytest.approx(1.3 * 0.5 / (0.3 * 0.5 + 1))  # all-zero probability


def test_null_score():
    assert null_score(np.array([[1, 0], [0, 0]], bool)) == pytest.approx(0.5)
    assert null_score(np.zeros((2, 2), bool)) == 0.0


def test_avss_class_iou_hand_computed():
    truth = np.array([[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
    pred = np.array([[[0, 1], [2, 2]], [[0, 0], [0, 0]]])
    per_class = avss_class_iou(pred, truth, n_classes=4)
    assert per_class[:3] == pytest.approx([1.0, 0.5, 0.5]) and np.isnan(per_class[3])
    assert avss_miou(pred, truth, n_classes=4) == pytest.approx(0.5)  # a class never seen counts 0
    ignored = avss_class_iou(np.array([[1, 1]]), np.array([[1, 255]]), n_classes=4)
    assert ignored[1] == pytest.approx(1.0)
    assert avss_class_iou(np.zeros((2, 2), int), np.zeros((2, 2), int)).shape == (71,)


def test_avqa_accuracy():
    assert answers_match("  Saxophone ", "saxophone")
    assert not answers_match("two", "2")
    assert not answers_match(None, "yes")
    assert avqa_accuracy(["Saxophone", None, "two"], ["saxophone", "yes", "2"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        avqa_accuracy([], [])
