"""Results: what a run reports (notes, model, source, events cut at the clip's end) and the overlay
pictures ``Result.plot()`` draws on the source frame.

Runs use the demo model; answers it would not write by itself are teacher-forced through the real
runtime (``Trace.forced``), so the parser, the clip length and the frames come from a real run.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from edgeav.errors import OptionError
from edgeav.media import synth
from edgeav.results import BOX_COLOR, MASK_COLOR, Mask, Result, avss_palette
from edgeav.runtime import DEMO_CLIP, Runtime
from edgeav.stages import Trace


@pytest.fixture(scope="module")
def demo():
    return Runtime.demo()


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """A 2-s 160x120 clip with sound."""
    path = tmp_path_factory.mktemp("results") / "two_seconds.mp4"
    synth.write_clip(path, duration_s=2.0, width=160, height=120)
    return path


def forced(runtime: Runtime, text: str) -> Trace:
    return Trace(forced=[runtime.tokenizer.encode(text)])


def frame_at(path, second: float) -> np.ndarray:
    """The first frame at or after ``second``, decoded by PyAV directly at the source's size."""
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time >= second - 1e-6:
                return frame.to_ndarray(format="rgb24")
    raise AssertionError(f"no frame at {second} s")


# -- what a run says ----------------------------------------------------------------------------------


def test_edgeav_result_is_the_results_type_and_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, edgeav; from edgeav.results import Result; assert edgeav.Result is Result; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_events_are_cut_at_the_sources_real_length(demo, short_clip):
    result = demo.run(short_clip, "ave", trace=forced(demo, "<event> siren </event>, and the time range is "
                                                            "<range> 0,8 </range>"))
    assert [(e.label, e.start_s, e.end_s) for e in result.events] == [("siren", 0.0, 2.0)]
    assert "event 'siren' 0-8 s runs past the clip's end; cut to 0-2 s" in result.notes
    assert result.model == demo.source and result.source == str(short_clip)
    assert result.to_dict()["model"] == demo.source and result.to_dict()["source"] == str(short_clip)


def test_a_clip_of_a_longer_source_ends_with_the_clip(demo, tmp_path):
    # AVE reads the first 10 s of a 14-s source: nothing can be said of seconds 10 to 14.
    long_clip = tmp_path / "fourteen_seconds.mp4"
    synth.write_clip(long_clip, duration_s=14.0, fps=5.0, width=64, height=48)
    result = demo.run(long_clip, "ave", trace=forced(demo, "<event> horn </event>, and the time range is "
                                                          "<range> 2,14 </range>"))
    assert [(e.start_s, e.end_s) for e in result.events] == [(2.0, 10.0)]
    assert "event 'horn' 2-14 s runs past the clip's end; cut to 2-10 s" in result.notes
    arig = demo.run(DEMO_CLIP, "arig", trace=forced(demo, "The sounding object is horn. Its coordinate of top "
                                                          "left corner is (10,20) and coordinate of bottom right "
                                                          "corner is (100,200)"))
    assert arig.box == pytest.approx([10 * 320 / 224, 20 * 240 / 224, 100 * 320 / 224, 200 * 240 / 224])
    assert not any(note.startswith("parse_error") for note in arig.notes)


def test_what_does_not_parse_is_a_note_and_no_invented_event(demo, short_clip):
    result = demo.run(short_clip, "avvp", trace=forced(demo, "<audio_event>horn,(0 1)</visualhorn,(0 2)"))
    assert [(e.label, e.modality) for e in result.events] == [("horn", "audio")]
    assert "parse_error: label '</visualhorn' holds markup, not a class name; its events are dropped" in result.notes
    # The demo model's classes are the world's: an LLP class is not one of them.
    speech = demo.run(short_clip, "avvp", trace=forced(demo, "<audio_event>Speech,(0 1)</audio_event>"))
    assert speech.events == [] and any("'Speech' is not one of the task's 6 classes" in n for n in speech.notes)


def test_generation_cut_by_the_token_limit_says_so(demo):
    result = demo.run(DEMO_CLIP, "ave", max_new_tokens=3)
    assert len(demo.tokenizer.encode(result.text)) <= 3
    assert "the answer was cut at 3 new tokens (--max-new-tokens) before the model ended it" in result.notes
    full = demo.run(DEMO_CLIP, "ave")
    assert not any("new tokens" in note for note in full.notes) and full.events


def test_a_looping_model_stops_early_with_a_note():
    from edgeav.systems.crab.checkpoints import load_converted
    from edgeav.runtime import DEMO_DIR

    from test_generate import rig_llm_to_cycle

    loaded = load_converted(DEMO_DIR)
    rig_llm_to_cycle(loaded, [300, 301])
    runtime = Runtime(loaded)
    result = runtime.run(DEMO_CLIP, "ave")
    loop = runtime.tokenizer.decode([300, 301])
    assert result.text == runtime.tokenizer.decode([300, 301] * 16)
    assert f"generation stopped early after 32 tokens: the answer ended in {loop!r} repeated over and over" \
        in result.notes
    assert any(note.startswith("parse_error: ") for note in result.notes)


# -- pictures -----------------------------------------------------------------------------------------


def test_mask_tasks_keep_the_source_frames_of_their_seconds(demo):
    result = demo.run(DEMO_CLIP, "s4", at_seconds=[1, 3])
    assert sorted(result.frames) == [1.0, 3.0]
    for second, frame in result.frames.items():
        np.testing.assert_array_equal(frame, frame_at(DEMO_CLIP, second))
    assert demo.run(DEMO_CLIP, "ave", max_new_tokens=2).frames == {}
    picture = result.plot()
    assert picture.dtype == np.uint8 and picture.shape == (240, 2 * 320, 3)  # the two frames side by side
    assert [m.time_s for m in result.masks] == [1.0, 3.0]
    one = result.plot(3)
    mask = result.masks[1].mask
    assert one.shape == (240, 320, 3) and mask.any() and not mask.all()
    frame = result.frames[3.0]
    changed = np.any(one != frame, axis=-1)
    # Painted where the mask is, the frame as it was everywhere else.
    assert changed[mask].mean() > 0.9 and not changed[~mask].any()
    assert np.all(one[mask][:, 0] >= frame[mask][:, 0])  # towards red
    with pytest.raises(OptionError, match="no frame at 2 s"):
        result.plot(2)


def test_plot_draws_the_box_in_source_pixels(demo):
    result = demo.run(DEMO_CLIP, "arig", trace=forced(demo, "The sounding object is horn. Its coordinate of top "
                                                            "left corner is (56,56) and coordinate of bottom right "
                                                            "corner is (168,168)"))
    assert result.box == [80.0, 60.0, 240.0, 180.0] and list(result.frames) == [0.0]
    picture = result.plot()
    assert picture.shape == (240, 320, 3)
    assert tuple(picture[120, 80]) == BOX_COLOR and tuple(picture[180, 160]) == BOX_COLOR  # left and bottom edges
    np.testing.assert_array_equal(picture[200:, :], result.frames[0.0][200:, :])  # nothing drawn below the box


def test_binary_and_class_masks_paint_their_colours():
    frame = np.full((40, 60, 3), 100, np.uint8)
    binary = np.zeros((40, 60), bool)
    binary[10:20, 10:30] = True
    painted = Mask(0.0, binary, "").overlay(frame)
    assert tuple(painted[15, 15]) == tuple(round(0.5 * 100 + 0.5 * c) for c in MASK_COLOR)
    assert tuple(painted[30, 40]) == (100, 100, 100)
    classes = np.zeros((40, 60), np.uint8)
    classes[:, :20], classes[:, 40:] = 8, 70
    painted = Mask(0.0, classes, "").overlay(frame)
    assert tuple(painted[5, 5]) == (82, 50, 50)  # id 8: (64, 0, 0)
    assert tuple(painted[5, 50]) == (66, 114, 114)  # id 70: (32, 128, 128)
    assert tuple(painted[5, 30]) == (100, 100, 100)  # the background is left as is
    with pytest.raises(OptionError, match="pass the source frame"):
        Mask(0.0, binary, "").overlay(frame[:20])


def test_avss_palette_is_avsbenchs():
    palette = avss_palette()
    assert palette.shape == (71, 3) and palette.dtype == np.uint8
    # Bits of the id dealt to R, G, B from the high bit down: 1 -> R 128, 2 -> G 128, 4 -> B 128, 8 -> R 64.
    assert palette[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128],
                                    [128, 0, 128], [0, 128, 128], [128, 128, 128], [64, 0, 0]]
    assert len({tuple(c) for c in palette.tolist()}) == 71


def test_avss_plot_has_a_legend_of_the_classes_present():
    frame = np.full((120, 160, 3), 200, np.uint8)
    classes = np.zeros((120, 160), np.uint8)
    classes[60:, 100:] = 4  # "horn" of the demo world's classes
    result = Result(task="avss", text="", masks=[Mask(0.0, classes, "")], frames={0.0: frame},
                    classes=("background", "bell", "drum", "flute", "horn", "siren", "whistle"))
    picture = result.plot()
    assert tuple(picture[100, 140]) == (100, 100, 164)  # id 4: (0, 0, 128) at half strength
    legend = picture[:20, :80].reshape(-1, 3)
    assert (legend == 0).all(axis=1).any()  # the legend's dark box
    assert (legend == [0, 0, 128]).all(axis=1).any()  # the swatch of the class present
    assert not (legend == [128, 0, 0]).all(axis=1).any()  # no swatch of a class absent (bell)
    plain = Result(task="avss", text="", masks=[Mask(0.0, np.zeros((120, 160), np.uint8), "")], frames={0.0: frame})
    np.testing.assert_array_equal(plain.plot(), frame)  # nothing present: no legend, nothing painted


def test_save_overlay_to_a_file_or_a_folder(tmp_path):
    frames = {float(t): np.full((30, 40, 3), 10 * t, np.uint8) for t in (0, 1)}
    masks = [Mask(float(t), np.eye(30, 40, dtype=bool), "") for t in (0, 1)]
    result = Result(task="s4", text="", masks=masks, frames=frames)
    written = result.save_overlay(tmp_path / "both.png")
    assert written == [tmp_path / "both.png"]
    with Image.open(written[0]) as image:
        assert image.size == (80, 30)
        np.testing.assert_array_equal(np.asarray(image), result.plot())
    folder = result.save_overlay(tmp_path / "frames")
    assert [p.name for p in folder] == ["overlay_000.00s.png", "overlay_001.00s.png"]
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [p.name for p in folder]
    with pytest.raises(OptionError, match="keeps no source frame"):
        Result(task="ave", text="").plot()
