import numpy as np
import pytest

from edgeav.preprocess import clip as pp_clip
from edgeav.preprocess import fbank as pp_fbank

knf = pytest.importorskip("kaldi_native_fbank")

SR = 16000
LOG_EPS = np.float32(np.log(np.finfo(np.float32).eps))


def knf_fbank(wave: np.ndarray, num_bins: int) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0  # knf defaults to 3e-5; torchaudio's kaldi.fbank to 0
    opts.frame_opts.samp_freq = SR
    opts.frame_opts.snip_edges = True
    opts.frame_opts.frame_length_ms = 25
    opts.frame_opts.frame_shift_ms = 10
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = 0
    opts.use_energy = False
    # Fields left at knf defaults must equal torchaudio's defaults.
    f, m = opts.frame_opts, opts.mel_opts
    assert abs(f.preemph_coeff - 0.97) < 1e-6 and f.remove_dc_offset and f.round_to_power_of_two
    assert opts.use_power and opts.use_log_fbank and opts.eps == pytest.approx(np.finfo(np.float32).eps)
    assert not m.htk_mode and not m.is_librosa
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SR, (wave.astype(np.float64) * 32768.0).tolist())
    fb.input_finished()
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


def _sines_noise():
    t = np.arange(SR) / SR
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t)
    return (x + 0.05 * np.random.default_rng(0).standard_normal(SR)).astype(np.float32)


def _chirp():
    t = np.arange(2 * SR) / SR
    f0, f1, dur = 50.0, 7900.0, 2.0
    return (0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * dur)))).astype(np.float32)


def _half_silent():
    x = np.zeros(SR, dtype=np.float32)
    x[: SR // 2] = 0.1 * np.random.default_rng(1).standard_normal(SR // 2)
    return x


# (signal, frames, min fraction of entries compared). Entries more than 18 log units
# (~78 dB) below their frame's peak are float32 round-off in any float32 Kaldi
# implementation (knf vs torchaudio differ by ~2 there on the pure chirp), so they are
# excluded; only the noiseless chirp has such entries in bulk.
SIGNALS = [(_sines_noise, 98, 0.98), (_chirp, 198, 0.15), (_half_silent, 98, 0.98)]


# Kaldi and knf reject 128 bins at 16 kHz (mel bin 3 is narrower than an FFT bin and
# covers none); 126 is the largest count knf accepts, so the pipeline is compared there.
@pytest.mark.parametrize("num_bins", [126, 80])
@pytest.mark.parametrize("make,frames,coverage", SIGNALS)
def test_fbank_matches_kaldi_native_fbank(make, frames, coverage, num_bins):
    wave = make()
    ours, ref = pp_fbank._kaldi_fbank(wave, SR, num_bins), knf_fbank(wave, num_bins)
    assert ref.shape == ours.shape == (frames, num_bins)
    resolvable = ref.max(axis=1, keepdims=True) - ref < 18
    assert resolvable.mean() >= coverage
    diff = np.abs(ours - ref)[resolvable].max()
    print(f"{make.__name__} bins={num_bins}: max abs diff {diff:.3g} on {resolvable.mean():.1%}")
    assert diff <= 1e-3


def test_kaldi_refuses_128_bins():
    # If this starts failing, knf accepts empty bins and parity can be checked at 128 directly.
    with pytest.raises(Exception, match="num_mel_bins too large"):
        knf_fbank(_sines_noise(), 128)


@pytest.mark.parametrize("make,frames,coverage", SIGNALS)
def test_fbank_128_shape_and_empty_bin(make, frames, coverage):
    out = pp_fbank.fbank(make())
    assert out.dtype == np.float32 and out.shape == (frames, 128)
    # torchaudio semantics: the empty filter is an all-zero row, so that bin is always log(eps).
    np.testing.assert_array_equal(out[:, 3], LOG_EPS)
    w = pp_fbank._mel_banks(128)
    assert w.shape == (257, 128) and np.flatnonzero(w.sum(axis=0) == 0).tolist() == [3]
    assert w.min() >= 0 and w.max() <= 1 and not w[-1].any()


def test_fbank_log_floor_on_silence():
    out = pp_fbank.fbank(_half_silent())
    np.testing.assert_array_equal(out[-10:], LOG_EPS)  # frames fully inside the silent half
    assert np.delete(out[:10], 3, axis=1).min() > LOG_EPS + 5


def test_crab_fbank_normalisation():
    wave = _sines_noise()
    expected = (pp_fbank.fbank(wave) - 15.41663) / (2 * 6.55582)
    np.testing.assert_allclose(pp_fbank.crab_fbank(wave), expected, atol=1e-6)
    batch = pp_fbank.crab_fbank_batch(np.stack([wave, wave[::-1].copy()]))
    assert batch.shape == (2, 98, 128) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], expected, atol=1e-6)
    assert not np.allclose(batch[1], expected)


def test_fbank_rejects_bad_input():
    with pytest.raises(ValueError, match="sample_rate"):
        pp_fbank.fbank(np.zeros(SR, np.float32), sample_rate=8000)
    with pytest.raises(ValueError, match="400"):
        pp_fbank.fbank(np.zeros(399, np.float32))


def test_clip_pixels_shape_and_constant_colour():
    colour = np.array([200, 17, 96], dtype=np.uint8)
    frames = np.broadcast_to(colour, (2, 120, 350, 3)).copy()
    out = pp_clip.clip_pixels(frames)
    assert out.shape == (2, 3, 224, 224) and out.dtype == np.float32
    expected = (colour / 255.0 - np.array(pp_clip.CLIP_MEAN)) / np.array(pp_clip.CLIP_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected[None, :, None, None], out.shape), atol=1e-5)
    assert pp_clip.clip_pixels(frames[0]).shape == (1, 3, 224, 224)


def test_clip_pixels_no_resize_at_224():
    img = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    x = img.transpose(0, 3, 1, 2) / 255.0
    expected = (x - np.reshape(pp_clip.CLIP_MEAN, (3, 1, 1))) / np.reshape(pp_clip.CLIP_STD, (3, 1, 1))
    np.testing.assert_allclose(pp_clip.clip_pixels(img), expected, atol=1e-5)


def test_clip_pixels_resize_rounds_to_pixel_levels():
    img = np.random.default_rng(3).integers(0, 256, (1, 448, 300, 3), dtype=np.uint8)
    out = pp_clip.clip_pixels(img).astype(np.float64)
    assert out.shape == (1, 3, 224, 224)
    levels = (out * np.reshape(pp_clip.CLIP_STD, (3, 1, 1)) + np.reshape(pp_clip.CLIP_MEAN, (3, 1, 1))) * 255
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.min() >= -1e-3 and levels.max() <= 255 + 1e-3


def test_clip_pixels_downscale_is_antialiased():
    # 1-px stripes shrunk 3x: an antialiased resize averages them to mid-grey, a plain
    # bicubic resample lands on single pixels and aliases to full 0/255 contrast.
    img = np.zeros((1, 672, 672, 3), np.uint8)
    img[:, :, 1::2] = 255
    levels = pp_clip.clip_pixels(img)[0, 0].astype(np.float64) * pp_clip.CLIP_STD[0] + pp_clip.CLIP_MEAN[0]
    assert np.ptp(levels * 255) < 40


@pytest.mark.parametrize("bad", [
    np.zeros((1, 32, 32, 3), np.float32),
    np.zeros((1, 32, 32, 4), np.uint8),
    np.zeros((32, 32), np.uint8),
])
def test_clip_pixels_rejects_bad_input(bad):
    with pytest.raises(ValueError, match=r"\[F,H,W,3\].*got"):
        pp_clip.clip_pixels(bad)
