"""The synthetic world the demo model trains and is evaluated on (bench/world.py, its scenes in bench/world_scene.py)."""

from __future__ import annotations


import numpy as np
import pytest

from bench import world
from edgeav.media import segments
from edgeav.preprocess.fbank import _mel, fbank
from edgeav.systems.crab.tasks import ORDINALS, box_to_source, get_task

SR = world.SAMPLE_RATE
SEEDS = range(12)


def clips(kind: str, seeds=SEEDS):
    return [world.sample_clip(seed, kind) for seed in seeds]


def mel_bin(freq_hz: float) -> int:
    """The 128-bin Kaldi fbank bin centred nearest ``freq_hz`` (20 Hz - 8 kHz)."""
    lo, hi = _mel(20.0), _mel(SR / 2)
    return int(round((_mel(freq_hz) - lo) / ((hi - lo) / 129) - 1))


def second_level(audio: np.ndarray, second: int, freq_hz: float) -> float:
    """Mean log-mel energy of one second of audio in the bin of ``freq_hz``."""
    return float(fbank(audio[second * SR : (second + 1) * SR])[:, mel_bin(freq_hz)].mean())


def seconds_of(intervals, duration):
    return {s for a, b in intervals for s in range(a, b)}


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", world.TASK_KINDS)
def test_a_seed_fixes_the_clip_its_frames_and_its_audio(kind):
    a, b, other = world.sample_clip(5, kind), world.sample_clip(5, kind), world.sample_clip(6, kind)
    assert a == b and a != other
    assert np.array_equal(world.render_frame(a, 1.3), world.render_frame(b, 1.3))
    assert np.array_equal(world.render_audio(a, 0, 2 * SR), world.render_audio(b, 0, 2 * SR))
    assert not np.array_equal(world.render_frame(a, 1.3), world.render_frame(other, 1.3))
    assert not np.array_equal(world.render_audio(a, 0, 2 * SR), world.render_audio(other, 0, 2 * SR))


def test_audio_does_not_depend_on_how_it_is_chunked():
    clip = world.sample_clip(3, "avvp")
    whole = world.render_audio(clip, 0, 3 * SR)
    chunks = [world.render_audio(clip, start, min(1024, 3 * SR - start)) for start in range(0, 3 * SR, 1024)]
    assert np.array_equal(whole, np.concatenate(chunks))


def test_dataset_seeds_give_disjoint_reproducible_samples_in_turn():
    train = list(world.dataset(0, 70))
    held_out = list(world.dataset(1, 70))
    assert [kind for _, kind in train] == list(world.TASK_KINDS) * 10
    assert {clip.seed for clip, _ in train}.isdisjoint({clip.seed for clip, _ in held_out})
    assert len({clip.seed for clip, _ in train}) == 70
    assert [clip for clip, _ in world.dataset(0, 5)] == [clip for clip, _ in train[:5]]
    assert [kind for _, kind in world.dataset(2, 4, kinds=("s4",))] == ["s4"] * 4


# --------------------------------------------------------------------------- recipes


def test_each_kind_follows_its_recipe():
    for clip in clips("ave"):
        sounding = [o for o in clip.objects if o.sounding]
        assert len(sounding) == 1 and len(sounding[0].sounding) == 1 and len(clip.objects) <= 3
        start, end = sounding[0].sounding[0]
        assert end - start >= 2
        assert all(s.class_index not in {o.class_index for o in clip.objects} for s in clip.offscreen)
    for kind in ("s4", "arig"):
        for clip in clips(kind):
            assert clip.duration_s == 5 and [o.sounding for o in clip.objects if o.sounding] == [((0, 5),)]
            if kind == "arig":
                assert all(o.start_xy == o.end_xy for o in clip.objects)
    for kind, n_objects, max_sounders in (("ms3", (2, 3), 2), ("avss", (1, 2, 3), 3)):
        for clip in clips(kind):
            sounders = [o for o in clip.objects if o.sounding]
            assert len(clip.objects) in n_objects and 1 <= len(sounders) <= max_sounders
            covered = set().union(*(seconds_of(o.sounding, clip.duration_s) for o in sounders))
            assert covered == set(range(clip.duration_s)), "every second has a sounding object to segment"
    assert {len(c.objects) for c in clips("avss", range(40))} == {1, 2, 3}
    questions = {c.question.split(" ")[0] for c in clips("avqa", range(40))}
    assert questions == {"How", "Which", "Does", "Is"}


def test_classes_are_distinct():
    assert [c.name for c in world.CLASSES] == ["bell", "drum", "flute", "horn", "siren", "whistle"]
    assert len({c.shape for c in world.CLASSES}) == len({c.color for c in world.CLASSES}) == 6
    assert all(max(c.color) >= 200 and 200 <= c.f0_hz <= 1600 for c in world.CLASSES)
    assert len({mel_bin(c.f0_hz) for c in world.CLASSES}) == 6


# --------------------------------------------------------------------------- truth texts


@pytest.mark.parametrize("kind", world.TASK_KINDS)
def test_truth_text_parses_back_to_the_structured_truth(kind):
    task = get_task(kind)
    for clip in clips(kind):
        seconds = range(5) if kind in ("s4", "ms3") else range(clip.duration_s) if kind == "avss" else [0]
        for second in seconds:
            truth = world.truth(clip, kind, second=second)
            parsed = task.parse(truth.text)
            task.instruction(question=truth.question, second=second if kind in ("s4", "ms3") else None)
            if kind == "ave":
                assert parsed.events == truth.events and len(truth.events) == 1
                (target,) = [o for o in clip.objects if o.sounding]
                assert truth.events[0].label == target.name
                assert (truth.events[0].start_s, truth.events[0].end_s) == target.sounding[0]
            elif kind == "avvp":
                assert parsed.events == truth.events
                heard = {e.label for e in truth.events if e.modality == "audio"}
                seen = {e.label for e in truth.events if e.modality == "visual"}
                assert heard == {o.name for o in clip.objects if o.sounding} | {
                    world.CLASSES[s.class_index].name for s in clip.offscreen}
                assert seen == {o.name for o in clip.objects}
                assert sorted((e.label, e.start_s, e.end_s) for e in truth.events if e.modality == "audio") != sorted(
                    (e.label, e.start_s, e.end_s) for e in truth.events if e.modality == "visual")
            elif kind == "arig":
                assert parsed.box == truth.box and parsed.object_label == truth.object_label
                assert all(isinstance(v, int) and 0 <= v <= 224 for v in truth.box)
            elif kind == "avqa":
                assert parsed.answer == truth.answer and truth.question == clip.question
            else:
                assert parsed.has_mask_tokens and parsed.object_label == truth.object_label
                names = sorted(o.name for o in clip.objects if second in seconds_of(o.sounding, clip.duration_s))
                assert sorted(truth.object_label.split(" and ")) == names
            if kind != "avqa":
                assert truth.question is None


def test_avqa_answers_follow_the_clip():
    for clip in clips("avqa", range(40)):
        truth = world.truth(clip, "avqa")
        sounding = [o for o in clip.objects if o.sounding]
        if clip.question.startswith("How many"):
            assert truth.answer == ("zero", "one", "two", "three")[len(sounding)]
        elif clip.question.startswith("Which"):
            assert [truth.answer] == [o.name for o in sounding]
        elif clip.question.startswith("Is the"):
            (obj,) = sounding
            xs = (obj.start_xy[0], obj.end_xy[0])
            assert truth.answer == "left" and max(xs) < 0.5 or truth.answer == "right" and min(xs) > 0.5
        else:
            (named,) = [o for o in clip.objects if o.name in clip.question]
            assert truth.answer == ("first" if named.sounding[0][0] < 5 else "second")
    clip = world.sample_clip(0, "avqa")
    assert world.truth(clip, "avqa", question="How many objects are making sound?").answer in ("one", "two", "three")
    with pytest.raises(ValueError, match="not one of the world's questions"):
        world.truth(clip, "avqa", question="What colour is the sky?")


def test_mask_tasks_name_seconds_in_crabs_ordinal_range():
    clip = world.sample_clip(0, "s4")
    assert len(ORDINALS) == clip.duration_s
    with pytest.raises(ValueError, match="outside the 5-s clip"):
        world.truth(clip, "s4", second=5)


# --------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("kind", ["ave", "avvp", "ms3", "avqa"])
def test_masks_boxes_and_class_maps_agree_with_the_rendered_pixels(kind):
    for clip in clips(kind, range(6)):
        for t in (0.0, 2.5, clip.duration_s - 0.1):
            frame = world.render_frame(clip, t)
            labels = world.class_map(clip, t)
            for i, obj in enumerate(clip.objects):
                mask = world.object_mask(clip, i, t)
                color = world.CLASSES[obj.class_index].color
                assert np.array_equal(np.all(frame == color, axis=-1), mask), "exactly the mask has its colour"
                assert np.array_equal(labels == obj.class_index + 1, mask)
                if not mask.any():
                    assert obj.visible is not None
                    continue
                # Mapped back to the frame as the runtime maps ARIG boxes, the box encloses the mask's pixels
                # and is at most one grid pixel larger on each side.
                x1, y1, x2, y2 = box_to_source(world.box(clip, i, t), clip.width, clip.height)
                ys, xs = np.nonzero(mask)
                cell_x, cell_y, eps = clip.width / 224, clip.height / 224, 1e-9
                assert x1 <= xs.min() + eps and xs.max() + 1 <= x2 + eps
                assert y1 <= ys.min() + eps and ys.max() + 1 <= y2 + eps
                assert xs.min() - x1 < cell_x and x2 - xs.max() - 1 < cell_x
                assert ys.min() - y1 < cell_y and y2 - ys.max() - 1 < cell_y


@pytest.mark.parametrize("kind", ["s4", "ms3", "avss"])
def test_truth_masks_cover_exactly_the_sounding_objects(kind):
    for clip in clips(kind, range(6)):
        for second in range(clip.duration_s):
            truth = world.truth(clip, kind, second=second)
            frame = world.render_frame(clip, float(second))
            assert truth.mask.shape == (clip.height, clip.width)
            sounders = [o for o in clip.objects if second in seconds_of(o.sounding, clip.duration_s)]
            if kind == "avss":
                assert truth.mask.dtype == np.uint8
                assert set(np.unique(truth.mask)) == {0} | {o.class_index + 1 for o in sounders}
                for o in sounders:
                    assert np.all(frame[truth.mask == o.class_index + 1] == world.CLASSES[o.class_index].color)
            else:
                assert truth.mask.dtype == bool and truth.mask.any()
                colors = {world.CLASSES[o.class_index].color for o in sounders}
                assert {tuple(int(v) for v in p) for p in frame[truth.mask]} == colors
                silent = [o for o in clip.objects if o not in sounders]
                for o in silent:
                    assert not np.any(np.all(frame[truth.mask] == world.CLASSES[o.class_index].color, axis=-1))


def test_objects_never_overlap_and_stay_inside_the_frame():
    for kind in world.TASK_KINDS:
        for clip in clips(kind, range(8)):
            for t in np.arange(0, clip.duration_s, 0.25):
                masks = [world.object_mask(clip, i, t) for i in range(len(clip.objects))]
                union = np.sum(masks, axis=0) if masks else np.zeros(1)
                assert union.max() <= 1, f"{kind} clip {clip.seed} overlaps at {t} s"
            for obj in clip.objects:
                r = obj.half_size * clip.height
                for x, y in (obj.start_xy, obj.end_xy):
                    assert r <= x * clip.width <= clip.width - r and r <= y * clip.height <= clip.height - r
                assert 30 <= 2 * r * 224 / clip.height <= 90


# --------------------------------------------------------------------------- audio


def test_each_class_is_heard_at_its_own_fundamental():
    quiet = world.WorldClip(1, 32, 32, 10, (), noise=0.01, seed=1)
    base = fbank(world.render_audio(quiet, 0, SR)).mean(0)
    rise = np.zeros((6, 6))  # [class sounding, bin of class's fundamental]: log-energy over the noise floor
    for k in range(6):
        alone = world.WorldClip(1, 32, 32, 10, (world.WorldObject(k, 0.1, (0.5, 0.5), (0.5, 0.5), ((0, 1),)),),
                                noise=0.01, seed=1)
        level = fbank(world.render_audio(alone, 0, SR)).mean(0) - base
        rise[k] = [level[mel_bin(c.f0_hz)] for c in world.CLASSES]
    own, cross = np.diag(rise), rise - np.diag(np.diag(rise))
    assert own.min() > 6, np.round(rise, 1)
    assert np.all(own > 2 * cross.max(0)) and np.all(own > 2 * cross.max(1)), np.round(rise, 1)


def test_the_sounding_class_is_louder_in_its_seconds_than_in_the_others():
    for clip in clips("ave", range(6)):
        (target,) = [o for o in clip.objects if o.sounding]
        audio = world.render_audio(clip, 0, clip.duration_s * SR)
        f0 = world.CLASSES[target.class_index].f0_hz
        on = seconds_of(target.sounding, clip.duration_s)
        levels = [second_level(audio, s, f0) for s in range(clip.duration_s)]
        loud = min(levels[s] for s in on)
        off = [levels[s] for s in range(clip.duration_s) if s not in on]
        assert not off or loud > max(off) + 3, f"clip {clip.seed}: {np.round(levels, 1)}"
        assert np.abs(audio).max() < 1.0


def test_offscreen_sounds_are_heard_never_seen():
    found = 0
    for clip in clips("avvp", range(20)):
        truth = world.truth(clip, "avvp")
        audio = world.render_audio(clip, 0, clip.duration_s * SR)
        for sound in clip.offscreen:
            found += 1
            name = world.CLASSES[sound.class_index].name
            assert any(e.label == name and e.modality == "audio" for e in truth.events)
            assert not any(e.label == name and e.modality == "visual" for e in truth.events)
            assert not any(o.class_index == sound.class_index for o in clip.objects)
            second = sound.sounding[0][0]
            silent = world.WorldClip(**{**clip.__dict__, "offscreen": ()})
            muted = world.render_audio(silent, 0, clip.duration_s * SR)
            f0 = world.CLASSES[sound.class_index].f0_hz
            assert second_level(audio, second, f0) > second_level(muted, second, f0) + 3
    assert found >= 3, "avvp clips should often carry off-screen sounds"
    for clip in clips("ave", range(30)):
        labels = {e.label for e in world.truth(clip, "ave").events}
        assert labels.isdisjoint({world.CLASSES[s.class_index].name for s in clip.offscreen})


# --------------------------------------------------------------------------- files and speed


def test_a_written_mp4_reads_back_with_its_seconds_and_its_sound(tmp_path):
    clip = world.sample_clip(4, "s4", width=160, height=120)
    path = world.write_clip(clip, tmp_path / "s4.mp4")
    segs = list(segments(path, policy="stream"))
    assert len(segs) == clip.duration_s
    frame = segs[2].frames[0]
    (target,) = [i for i, o in enumerate(clip.objects) if o.sounding]
    mask = world.object_mask(clip, target, segs[2].frame_times[0])
    inner = mask & np.roll(mask, 3, 0) & np.roll(mask, -3, 0) & np.roll(mask, 3, 1) & np.roll(mask, -3, 1)
    color = np.array(world.CLASSES[clip.objects[target].class_index].color)
    assert np.abs(frame[inner].astype(int) - color).mean() < 25
    f0 = world.CLASSES[clip.objects[target].class_index].f0_hz
    quiet = world.WorldClip(**{**clip.__dict__, "objects": ()})
    decoded = np.concatenate([s.audio for s in segs])
    assert second_level(decoded, 2, f0) > second_level(world.render_audio(quiet, 0, 5 * SR), 2, f0) + 3
