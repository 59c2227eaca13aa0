"""Inputs as Crab's loaders build them and as datasets store them.

- Audio pieces: a clip's whole waveform cut into ``tot`` parts of ``int(len / tot)``
  samples (GeWu-Lab/Crab dataset/unified_dataset.py and quick_start_dataset.py),
  checked sample for sample against the formula written out here from their code's
  semantics, on audio read with the ``wave`` module (as soundfile hands librosa a WAV).
- Image pixels: PIL RGB, bicubic 224x224, then transformers' CLIPImageProcessor.
- Sources: a video, an image, a folder of frames, each with ``--audio`` or not,
  through ``Runtime`` (the bundled demo model) and the CLI.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeav.systems.crab import inputs as edgeav_inputs
from edgeav.preprocess import clip as pp_clip
from edgeav.preprocess import fbank as pp_fbank
from edgeav.bench.authors_way import TOT, read_wav
from edgeav.bench.authors_way import audio_pieces as authors_pieces
from edgeav.cli import main
from edgeav.errors import MediaError, OptionError
from edgeav.media import SAMPLE_RATE, open_media, open_stills, synth
from edgeav.media.stills import natural_key
from edgeav.runtime import DEMO_CLIP, Runtime
from edgeav.stages import Trace
from edgeav.systems.crab.tasks import get_task

from conftest import rig_llm_to_say

# An odd sample count a little past each clip (their AVE example: 160,125).
ODD_LENGTH = {10: 160_125, 5: 80_063, 60: 961_234}
MASK_TOKENS = ["<mask_start>", *[f"<mask_{i}>" for i in range(6)], "<mask_end>"]


# -- media the tests write --------------------------------------------------------


def write_wav(path: Path, n_samples: int, seed: int = 0, rate: int = SAMPLE_RATE) -> Path:
    """Mono 16-bit PCM noise: decoding it involves no resampling or rounding."""
    samples = np.random.default_rng(seed).integers(-20000, 20000, n_samples).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())
    return path


def write_image(path: Path, size=(97, 61), seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    width, height = size
    # Smooth gradients plus noise: bicubic resampling has real work to do at every pixel.
    u, v = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([u * 255, v * 255, (1 - u) * 200], axis=-1) + rng.normal(0, 25, (height, width, 3))
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    image.convert(mode).save(path)
    return path


def knf_fbank(wave_: np.ndarray, num_bins: int = 80) -> np.ndarray:
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = 0
    opts.use_energy = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SAMPLE_RATE, (wave_.astype(np.float64) * 32768.0).tolist())
    fb.input_finished()
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    files = {f"wav{tot}": write_wav(folder / f"audio{tot}.wav", n, seed=tot) for tot, n in ODD_LENGTH.items()}
    files["wav1s"] = write_wav(folder / "one_second.wav", SAMPLE_RATE + 37, seed=1)
    files["wav13s"] = write_wav(folder / "long.wav", 13 * SAMPLE_RATE + 5, seed=13)
    files["image"] = write_image(folder / "0.png")
    files["image3"] = write_image(folder / "3.png", seed=3)  # AVSBench names a frame by its second
    frames = folder / "frames"
    frames.mkdir()
    for i in range(5):
        write_image(frames / f"{i}.png", size=(80, 60), seed=100 + i)
    files["frames"] = frames
    return files


@pytest.fixture(scope="module")
def demo():
    return Runtime.demo()


# -- audio pieces -------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TOT))
def test_clip_audio_pieces_are_the_authors_pieces(task, media):
    wav = media[f"wav{TOT[task]}"]
    audio = read_wav(wav)
    seconds = [0, 4, 9] if task == "avss" else None
    got = edgeav_inputs.decode(media["image"], get_task(task), seconds, audio=wav)
    expected = ({t: authors_pieces(audio, task, t) for t in seconds} if task == "avss"
                else {None: authors_pieces(audio, task)})
    assert got.audio.keys() == expected.keys()
    for key, pieces in expected.items():
        assert got.audio[key].shape == pieces.shape
        assert np.array_equal(got.audio[key], pieces), f"{task} piece {key} differs"
    nps = len(audio) // TOT[task]
    assert nps != SAMPLE_RATE  # the clip's real length sets the piece length (16,012 for the 10-s clip)
    assert not any("silence" in note or "heard" in note for note in got.notes)
    # The fbank the encoder sees comes from those pieces: against kaldi-native-fbank (80 bins: knf refuses 128).
    first = next(iter(expected.values()))
    ours, ref = pp_fbank._kaldi_fbank(next(iter(got.audio.values()))[0], SAMPLE_RATE, 80), knf_fbank(first[0])
    resolvable = ref.max(axis=1, keepdims=True) - ref < 18
    assert ours.shape == ref.shape and np.abs(ours - ref)[resolvable].max() <= 1e-3


def test_the_ave_example_length_gives_16012_sample_pieces(media):
    got = edgeav_inputs.decode(media["image"], get_task("ave"), audio=media["wav10"])
    assert got.audio[None].shape == (10, 16_012)


def test_a_video_track_is_cut_whole_like_a_separate_file(tmp_path):
    reference = read_wav(write_wav(tmp_path / "track.wav", ODD_LENGTH[10], seed=7))
    clip = tmp_path / "clip.mkv"  # 10.0078 s: a little past Crab's 10-s clip, as their example is
    synth.write_media(clip, duration_s=len(reference) / SAMPLE_RATE, fps=10, width=64, height=48,
                      render_frame=lambda t: np.full((48, 64, 3), int(t * 20) % 256, np.uint8),
                      render_audio=lambda start, n: reference[start : start + n], sample_rate=SAMPLE_RATE,
                      channels=1, audio_codec="pcm_s16le")
    got = edgeav_inputs.decode(clip, get_task("ave"))
    assert np.array_equal(got.audio[None], authors_pieces(reference, "ave"))
    assert got.notes == []


def test_a_clip_a_little_short_still_segments_its_last_second(tmp_path):
    """A 4.1-s S4 clip is within the slack of Crab's 5-s clip: second 4 is segmented from its 0.1-s tail."""
    clip = tmp_path / "short.mp4"
    synth.write_clip(clip, duration_s=4.1, fps=10.0, width=64, height=48)
    got = edgeav_inputs.decode(clip, get_task("s4"))
    assert sorted(got.image_frames) == [0, 1, 2, 3, 4]


def test_audio_far_from_the_clip_length_is_cut_in_exact_seconds(media):
    long_audio, short_audio = read_wav(media["wav13s"]), read_wav(media["wav1s"])
    got = edgeav_inputs.decode(media["image"], get_task("s4"), audio=media["wav13s"])
    assert np.array_equal(got.audio[None], long_audio[: 5 * SAMPLE_RATE].reshape(5, SAMPLE_RATE))
    assert any("only its first 5 s are heard" in note for note in got.notes)
    got = edgeav_inputs.decode(media["image"], get_task("s4"), audio=media["wav1s"])
    padded = np.zeros(5 * SAMPLE_RATE, np.float32)
    padded[: short_audio.size] = short_audio  # 1.002 s: second 0, 37 samples of second 1, then silence
    assert np.array_equal(got.audio[None], padded.reshape(5, SAMPLE_RATE))
    assert any("the rest is silence" in note for note in got.notes)


# -- pixels -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_image_pixels_match_clip_image_processor(media, tmp_path, mode):
    transformers = pytest.importorskip("transformers")
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_class(
        do_resize=True, size={"shortest_edge": 224}, resample=Image.Resampling.BICUBIC, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(pp_clip.CLIP_MEAN), image_std=list(pp_clip.CLIP_STD), do_convert_rgb=True)
    path = write_image(tmp_path / "frame.png", size=(97, 61), seed=5, mode=mode)
    authors_image = Image.open(path).convert("RGB").resize((224, 224))
    expected = processor([authors_image], return_tensors="np")["pixel_values"][0]
    got = edgeav_inputs.decode(path, get_task("s4"), silent_audio=True)
    np.testing.assert_allclose(got.video_pixels[0], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pp_clip.clip_pixels(got.image_frames[0])[0], expected, rtol=0, atol=1e-5)
    assert got.source_size == (97, 61)


# -- frames and sources -------------------------------------------------------------


def test_frames_sort_by_number_and_spread_one_per_second(tmp_path, media):
    for i, name in enumerate(["10.png", "2.png", "1.png"]):
        write_image(tmp_path / name, size=(40, 30), seed=i)
    (tmp_path / "notes.txt").write_text("not a frame")
    stills = open_stills(tmp_path)
    assert [p.name for p in stills.paths] == ["1.png", "2.png", "10.png"]
    assert sorted(["b10", "b9", "a100", "B2"], key=natural_key) == ["a100", "B2", "b9", "b10"]
    got = edgeav_inputs.decode(media["frames"], get_task("s4"), audio=media["wav5"])
    assert sorted(got.image_frames) == [0, 1, 2, 3, 4] and got.video_pixels.shape == (5, 3, 224, 224)
    for t in range(5):
        frame = np.array(Image.open(media["frames"] / f"{t}.png").convert("RGB").resize((224, 224)))
        assert np.array_equal(got.image_frames[t], frame)
        assert np.allclose(got.video_pixels[t], pp_clip.clip_pixels(frame)[0])
    assert got.source_size == (80, 60)
    two_fps = edgeav_inputs.decode(media["frames"], get_task("s4"), [1], audio=media["wav5"], fps=2)
    assert np.array_equal(two_fps.image_frames[1], np.asarray(
        Image.open(media["frames"] / "2.png").convert("RGB").resize((224, 224))))


def test_one_image_is_every_video_frame_and_the_frame_at_its_second(media):
    got = edgeav_inputs.decode(media["image"], get_task("s4"), audio=media["wav5"])
    assert list(got.image_frames) == [0]
    assert np.array_equal(got.video_pixels, np.repeat(got.video_pixels[:1], 5, axis=0))
    assert any("one image" in note for note in got.notes)
    avss = edgeav_inputs.decode(media["image"], get_task("avss"), [3], audio=media["wav10"])
    assert list(avss.image_frames) == [3] and list(avss.audio) == [3]
    assert avss.duration_s == pytest.approx(ODD_LENGTH[10] / SAMPLE_RATE)  # the image shows through its audio
    # --at is any second of the task's clip, however long the audio beside the image.
    with pytest.raises(OptionError, match=r"--at 10: outside the clip \(seconds 0 to 9\)"):
        edgeav_inputs.decode(media["image"], get_task("avss"), [10], audio=media["wav1s"])
    with pytest.raises(OptionError, match="--at 5: outside the clip"):
        edgeav_inputs.decode(media["image"], get_task("s4"), [5], audio=media["wav5"])
    silent = edgeav_inputs.decode(media["image"], get_task("s4"), silent_audio=True)
    assert silent.duration_s == 5.0 and not silent.audio[None].any()
    # The full-size picture is kept for the result's overlays; the model sees it at 224x224.
    assert got.source_frames[0].shape == (61, 97, 3)
    assert np.array_equal(got.image_frames[0], np.array(Image.open(media["image"]).convert("RGB").resize((224, 224))))


def test_bad_inputs_are_refused_in_one_line(tmp_path, media):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "texts"
    no_images.mkdir()
    (no_images / "a.txt").write_text("x")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    silent_video = tmp_path / "silent.mp4"
    synth.write_clip(silent_video, duration_s=1.0, width=64, height=48, audio=False)
    cases = [
        (dict(source=empty, audio=media["wav5"]), MediaError, "empty"),
        (dict(source=no_images, audio=media["wav5"]), MediaError, "no images"),
        (dict(source=broken, audio=media["wav5"]), MediaError, "not a readable image"),
        (dict(source=media["frames"], audio=media["wav5"], fps=0), OptionError, "--fps 0"),
        (dict(source=media["frames"], audio=media["wav5"], fps=-2.0), OptionError, "positive"),
        (dict(source=media["image"], audio=media["wav5"], fps=2), OptionError, "folder of frames"),
        (dict(source=media["image"], audio=tmp_path / "missing.wav"), MediaError, "missing.wav"),
        (dict(source=media["image"], audio=silent_video), MediaError, "no audio track"),
        (dict(source=silent_video, audio=silent_video), MediaError, "no audio track"),
        (dict(source=media["image"]), OptionError, "--silent-audio"),
        (dict(source=media["image"], audio=media["wav5"], silent_audio=True), OptionError, "exclude"),
    ]
    for options, error, needle in cases:
        with pytest.raises(error) as caught:
            edgeav_inputs.check_inputs(**options)
        message = str(caught.value)
        assert needle in message and "\n" not in message, message
        with pytest.raises(error):
            edgeav_inputs.decode(options.pop("source"), get_task("s4"), **options)


def test_a_video_without_an_audio_track_says_it_heard_silence(tmp_path):
    clip = tmp_path / "silent.mp4"
    synth.write_clip(clip, duration_s=5.0, width=64, height=48, audio=False)
    got = edgeav_inputs.decode(clip, get_task("s4"))
    assert not got.audio[None].any()
    assert any("no audio track" in note for note in got.notes)


# -- through the runtime and the CLI --------------------------------------------------


def test_a_video_hears_a_separate_audio_file(demo, media):
    trace = Trace()
    result = demo.run(DEMO_CLIP, "ave", audio=media["wav10"], max_new_tokens=2, trace=trace)
    expected = pp_fbank.crab_fbank_batch(authors_pieces(read_wav(media["wav10"]), "ave").astype(np.float32))
    assert np.array_equal(trace.fbank[0], expected)
    own = Trace()
    demo.run(DEMO_CLIP, "ave", max_new_tokens=2, trace=own)
    assert not np.array_equal(own.fbank[0], expected)
    assert result.source_size == (320, 240)


@pytest.mark.parametrize("task", ["s4", "avss", "arig"])
def test_one_image_and_its_audio_run(demo, media, task):
    result = demo.run(media["image"], task, audio=media["wav5" if task != "avss" else "wav10"], max_new_tokens=2)
    assert result.source_size == (97, 61)  # boxes and masks are scaled to the image
    assert any("one image" in note for note in result.notes)


@pytest.mark.parametrize("task", ["s4", "avss", "arig"])
def test_the_quick_start_layout_hears_the_images_own_second(demo, media, task):
    """AVSBench's quick start: ``3.png`` and its second's 1-s ``audio.wav``. The note points at --at 3,
    and with it the model hears the file's audio as second 3's (not silence)."""
    spec, image, wav = get_task(task), media["image3"], media["wav1s"]
    sound = read_wav(wav)
    hint = edgeav_inputs.decode(image, spec, audio=wav)
    assert any("pass --at 3" in note for note in hint.notes), hint.notes
    got = edgeav_inputs.decode(image, spec, [3], audio=wav)
    if task == "avss":  # the piece of the segmented frame
        heard = got.audio[3]
        assert heard.shape == (1, SAMPLE_RATE)
        expected = sound[None, :SAMPLE_RATE]
    else:  # second 3's window of the 5-s clip; the 37 samples past 1 s start second 4
        heard = got.audio[None]
        expected = np.zeros((5, SAMPLE_RATE), np.float32)
        expected[3], expected[4, : sound.size - SAMPLE_RATE] = sound[:SAMPLE_RATE], sound[SAMPLE_RATE:]
    assert np.abs(heard).max() > 0.1 and np.array_equal(heard, expected)
    assert any("hears it as second 3's, the image's" in note for note in got.notes), got.notes
    assert sorted(got.image_frames) == [3] and got.source_frames[3].shape == (61, 97, 3)
    with pytest.raises(OptionError, match="single --at"):
        edgeav_inputs.decode(image, get_task("s4"), [1, 3], audio=wav)
    # Through the runtime: the fbank of that audio reaches the encoder, the result says so and keeps the picture.
    trace = Trace()
    result = demo.run(image, task, at_seconds=[3], audio=wav, max_new_tokens=2, trace=trace)
    assert np.array_equal(trace.fbank[0], pp_fbank.crab_fbank_batch(expected))
    assert any("hears it as second 3's" in note for note in result.notes)
    assert list(result.frames) == [3.0] and np.array_equal(result.frames[3.0], got.source_frames[3])


def test_masks_come_back_at_the_image_size(media):
    runtime = Runtime.demo()
    runtime.engine.variant("avs")  # rig the LM head S4 runs with: it writes the six mask tokens
    rig_llm_to_say(runtime.engine, MASK_TOKENS)
    result = runtime.run(media["image"], "s4", audio=media["wav5"])
    assert [m.mask.shape for m in result.masks] == [(61, 97)]
    result = runtime.run(media["frames"], "s4", audio=media["wav5"])
    assert [m.time_s for m in result.masks] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(m.mask.shape == (60, 80) for m in result.masks)


def test_a_stream_over_an_image_and_its_audio(demo, media):
    with demo.stream(media["image"], "avss", audio=media["wav1s"], max_new_tokens=2) as windows:
        results = list(windows)
    assert [w.start_s for w in results] == [0.0] and results[0].result.source_size == (97, 61)
    with pytest.raises(OptionError, match="--silent-audio"):
        demo.stream(media["frames"], "s4")
    with demo.stream(media["frames"], "s4", audio=media["wav5"], max_new_tokens=2) as windows:
        assert [w.start_s for w in windows] == [0.0]
    with open_media(media["frames"], audio=media["wav5"]) as source:
        segments = list(source.segments(frame_size=(224, 224)))
    assert [s.index for s in segments] == [0, 1, 2, 3, 4]
    assert np.array_equal(np.concatenate([s.audio for s in segments]), read_wav(media["wav5"])[: 5 * SAMPLE_RATE])


def test_a_stream_source_takes_its_audio_from_the_file_or_silence(media):
    audio = read_wav(media["wav10"])
    with open_media(DEMO_CLIP, audio=media["wav10"]) as source:
        assert source.info.audio.codec == "pcm_s16le" and source.info.video.width == 320
        segments = list(source.segments(frame_size=(32, 32)))
    assert len(segments) == 10 and all(s.n_frames == 1 and s.has_audio for s in segments)
    assert np.array_equal(np.concatenate([s.audio for s in segments]), audio[: 10 * SAMPLE_RATE])
    with open_media(DEMO_CLIP, silent_audio=True) as source:
        assert not any(s.audio.any() or s.has_audio for s in source.segments(frame_size=(32, 32)))


def cli(capsys, *args):
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("source,task,options,note", [
    ("image", "s4", ("--audio", "wav5"), "one image"),
    ("image", "avss", ("--audio", "wav10"), "one image"),
    ("image", "arig", ("--audio", "wav5"), "one image"),
    ("frames", "s4", ("--audio", "wav5"), None),
    ("demo", "ave", ("--audio", "wav10"), None),
    ("image", "avss", ("--silent-audio",), "the model heard silence (--silent-audio)"),
])
def test_cli_runs_images_frames_and_separate_audio(capsys, media, source, task, options, note):
    path = DEMO_CLIP if source == "demo" else media[source]
    options = [media.get(o, o) for o in options]
    code, out, err = cli(capsys, "run", path, "--task", task, *options, "--json", "--max-new-tokens", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == task
    if note is not None:
        assert any(note in n for n in result["notes"]), result["notes"]


@pytest.mark.parametrize("extra,needle", [
    ((), "--silent-audio"),
    (("--audio", "nowhere.wav"), "nowhere.wav"),
    (("--fps", "0"), "--fps"),
])
def test_cli_refuses_bad_inputs_before_loading_a_model(capsys, media, tmp_path, extra, needle):
    # A checkpoint that does not exist: the input is refused before any model is looked at.
    code, out, err = cli(capsys, "run", media["image"], "--task", "s4", "--checkpoint", tmp_path / "no-model",
                         *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "no-model" not in lines[0], err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli(capsys, "stream", empty, "--task", "s4", "--audio", media["wav5"])
    assert code == 2 and "empty" in err and len(err.strip().splitlines()) == 1, err


def test_a_url_keeps_its_own_audio_in_run_and_stream(capsys, media, demo):
    """One rule for both commands and the library, checked before anything is opened (no network)."""
    url = "rtsp://camera.invalid/live"
    expected = f"{url}: --audio and --silent-audio apply to files; a URL streams its own audio"
    for extra in (("--audio", media["wav5"]), ("--silent-audio",)):
        for command in ("run", "stream"):
            code, out, err = cli(capsys, command, url, "--task", "ave", *extra)
            assert code == 2 and err.strip() == f"edgeav: error: {expected}", (command, err)
    with pytest.raises(OptionError, match="a URL streams its own audio"):
        edgeav_inputs.check_inputs(url, audio=media["wav5"])
    with pytest.raises(OptionError, match="a URL streams its own audio"):
        demo.stream(url, "ave", silent_audio=True)


# -- issue 12: fps, empty audio, audio names -------------------------------------------


@pytest.mark.parametrize("fps,seconds", [(0.5, [0, 2, 4]), (0.25, [0, 4])])
def test_frames_below_one_fps_segment_the_seconds_that_start_a_frame(media, fps, seconds):
    """5 frames at 0.5 fps start at 0, 2, 4, 6, 8 s: the 5-s S4 clip's default seconds are those inside it."""
    got = edgeav_inputs.decode(media["frames"], get_task("s4"), audio=media["wav5"], fps=fps)
    assert sorted(got.image_frames) == seconds
    stills = open_stills(media["frames"], fps)
    for t in seconds:
        assert np.array_equal(got.source_frames[t], stills.frame(stills.index_at(t)))
    with pytest.raises(OptionError, match="no frame at 1 s"):  # an explicit second without a frame is still refused
        edgeav_inputs.decode(media["frames"], get_task("s4"), [1], audio=media["wav5"], fps=fps)


@pytest.mark.parametrize("fps,needle", [(1e9, "at most 240"), (float("nan"), "positive"), (-1, "positive"),
                                        ("2", "must be a number"), (True, "must be a number")])
def test_fps_out_of_range_or_not_a_number_is_refused(media, fps, needle):
    with pytest.raises(OptionError, match=needle) as error:
        edgeav_inputs.check_inputs(media["frames"], audio=media["wav5"], fps=fps)
    assert str(error.value).startswith(("fps (--fps)", "fps, --fps"))
    edgeav_inputs.check_inputs(media["frames"], audio=media["wav5"], fps=240)


@pytest.mark.parametrize("n_samples,needle", [(0, "holds no audio samples"), (100, "holds only 100 audio samples")])
def test_audio_without_samples_is_refused_like_missing_audio(media, tmp_path, n_samples, needle):
    empty = write_wav(tmp_path / "header_only.wav", n_samples)
    with pytest.raises(MediaError, match=needle):
        edgeav_inputs.check_inputs(media["image"], audio=empty)
    with pytest.raises(MediaError, match=needle):  # the library's run path reads it too
        edgeav_inputs.decode(media["image"], get_task("s4"), audio=empty)
    with pytest.raises(MediaError, match=needle):
        open_media(media["frames"], audio=empty)
    edgeav_inputs.check_inputs(media["image"], audio=write_wav(tmp_path / "one_frame.wav", 400))


def test_audio_must_be_a_local_file_path(media):
    with pytest.raises(OptionError, match=r"audio \(--audio\) takes the path of an audio file .* not a ndarray"):
        edgeav_inputs.check_inputs(media["image"], audio=np.zeros(SAMPLE_RATE))
    for url in ("http://127.0.0.1:9/x.wav", "http:/127.0.0.1:9/x.wav"):  # the second: what Path makes of it
        with pytest.raises(OptionError, match=r"audio \(--audio\) takes a local file"):
            edgeav_inputs.check_inputs(media["image"], audio=url)


@pytest.mark.parametrize("extra,needle", [
    (("--audio", "http://127.0.0.1:9/x.wav"), "http://127.0.0.1:9/x.wav: audio (--audio) takes a local file"),
    (("--audio", "EMPTY"), "holds no audio samples; give the clip's audio, or --silent-audio"),
])
def test_cli_refuses_url_and_empty_audio_before_loading_a_model(capsys, media, tmp_path, extra, needle):
    extra = [str(write_wav(tmp_path / "empty.wav", 0)) if e == "EMPTY" else e for e in extra]
    code, out, err = cli(capsys, "run", media["image"], "--task", "s4", "--checkpoint", tmp_path / "no-model", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "no-model" not in lines[0], err


def test_cli_refuses_fps_above_240_before_loading_a_model(capsys, media, tmp_path):
    code, out, err = cli(capsys, "run", media["frames"], "--task", "s4", "--audio", media["wav5"], "--fps", "1e9",
                         "--checkpoint", tmp_path / "no-model")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "at most 240" in lines[0] and "no-model" not in lines[0], err


def test_a_stream_over_one_image_lasts_its_window(demo, media, capsys):
    """As `run` gives one image the task's clip, a stream gives it one window (not 1 s, shorter than any window)."""
    with demo.stream(media["image"], "s4", window=2, silent_audio=True, max_new_tokens=2) as windows:
        assert [(w.start_s, w.end_s) for w in windows] == [(0.0, 2.0)]
    with open_media(media["image"], silent_audio=True, image_s=3) as source:
        assert source.info.duration_s == 3.0 and len(list(source.segments(frame_size=(32, 32)))) == 3
    code, out, err = cli(capsys, "stream", media["image"], "--task", "s4", "--silent-audio", "--window", "2",
                         "--max-new-tokens", "2")
    assert code == 0, err
    assert "windows    1 processed" in out
