"""HTSAT (Pengi's audio encoder) and Pengi's audio front end.

Anchors: the log-mel against ``transformers.audio_utils`` (FFT spectrogram, Slaney mel bank);
bn0, the spectrogram image, patch embedding, Swin stages, final norm, token regrouping and
pooled embedding against ``transformers.ClapAudioModel`` on the same random weights. The
TSCAM classifier and the resampler have no independent implementation installed: the first is
checked against a transcription of Pengi's head on ClapAudioModel's output, the second by
properties that a wrong kernel, phase or length would break.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeav.errors import MediaError, OptionError
from edgeav.models.htsat import HTSAT, HTSAT_PRESETS, HTSATConfig, htsat_config, slaney_mel_filters
from edgeav.preprocess.pengi_audio import fixed_window, pengi_waveform, resample

TINY = HTSAT_PRESETS["tiny"]
# Two blocks per stage, so the shifted (masked) windows of stages 0-2 run too.
TINY_SHIFTED = dataclasses.replace(TINY, depths=(2, 2, 2, 2))


def report(name: str, value: float) -> None:
    print(f"{name}: max abs diff {value:.3g}")


# --- 1. log-mel front end -------------------------------------------------------------------


@pytest.mark.parametrize("rate,fmax", [(32000, 14000.0), (44100, 8000.0)])
def test_mel_filters_match_transformers(rate, fmax):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50.0, max_frequency=fmax,
                          sampling_rate=rate, norm="slaney", mel_scale="slaney")
    ours = slaney_mel_filters(rate, 1024, 64, 50.0, fmax).double().numpy()
    diff = np.abs(ours - ref).max()
    report(f"mel filters {rate} Hz / fmax {fmax}", diff)
    assert diff <= 1e-7 * np.abs(ref).max()


def test_log_mel_matches_transformers_spectrogram():
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    c = TINY
    rng = np.random.default_rng(0)
    t = np.arange(c.sample_rate) / c.sample_rate  # 1 s: 138 frames
    wave = (0.1 * rng.standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    ours = HTSAT(c).htsat.log_mel(torch.from_numpy(wave)[None])[0, 0].double().numpy()
    mel = mel_filter_bank(num_frequency_bins=c.window_size // 2 + 1, num_mel_filters=c.mel_bins,
                          min_frequency=c.fmin, max_frequency=c.fmax, sampling_rate=c.mel_sample_rate,
                          norm="slaney", mel_scale="slaney")
    ref = spectrogram(wave.astype(np.float64), window_function(c.window_size, "hann", periodic=True),
                      frame_length=c.window_size, hop_length=c.hop_size, fft_length=c.window_size, power=2.0,
                      center=True, pad_mode="reflect", mel_filters=mel, mel_floor=1e-10, log_mel="dB",
                      reference=1.0, min_value=1e-10, db_range=None, dtype=np.float64).T
    assert ours.shape == ref.shape == (c.sample_rate // c.hop_size + 1, c.mel_bins)
    diff = np.abs(ours - ref).max()
    report("log-mel (dB) vs transformers.audio_utils", diff)
    assert diff <= 2e-4  # dB: fp32 conv-DFT sums of 1024 terms against a float64 FFT


def test_log_mel_is_computed_from_the_stored_kernels():
    model = HTSAT(TINY).htsat
    wave = torch.randn(1, 8000)
    before = model.log_mel(wave)
    with torch.no_grad():
        model.spectrogram_extractor.stft.conv_real.weight.mul_(2.0)
        model.spectrogram_extractor.stft.conv_imag.weight.mul_(2.0)
        model.logmel_extractor.melW.mul_(3.0)
    shift = (model.log_mel(wave) - before).double()
    assert torch.allclose(shift, torch.full_like(shift, 10 * math.log10(12.0)), atol=1e-4)


# --- 2. Swin stages against ClapAudioModel ----------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value, so that a wrong mapping cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (1.0 if "bias_table" in name else 0.1))
        bn = model.htsat.bn0
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen) * 5 - 30)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) * 50 + 10)


def clap_state(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> ClapAudioModel's; the front end, masks and heads have no counterpart there."""
    renames = [("htsat.bn0.", "batch_norm."), ("htsat.", ""), (".norm1.", ".layernorm_before."),
               (".norm2.", ".layernorm_after."), (".attn.proj.", ".attention.output.dense."),
               (".attn.relative_position", ".attention.self.relative_position"),
               (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense.")]
    mapped = {}
    for key, value in ours.items():
        if key.split(".")[1] in ("spectrogram_extractor", "logmel_extractor", "tscam_conv", "head") \
                or key.endswith("attn_mask"):
            continue
        if ".attn.qkv." in key:
            for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                mapped["audio_encoder." + key[len("htsat."):].replace("attn.qkv", f"attention.self.{part}")] = chunk
            continue
        for old, new in renames:
            key = key.replace(old, new, 1)
        mapped["audio_encoder." + key] = value
    return mapped


def test_swin_stages_match_clap_audio_model():
    from transformers import ClapAudioConfig, ClapAudioModel

    c = TINY_SHIFTED
    model = HTSAT(c).eval()
    randomize(model, seed=1)
    clap = ClapAudioModel(ClapAudioConfig(
        spec_size=c.spec_size, num_mel_bins=c.mel_bins, patch_size=c.patch_size, patch_stride=list(c.patch_stride),
        patch_embeds_hidden_size=c.embed_dim, depths=list(c.depths), num_attention_heads=list(c.num_heads),
        window_size=c.window, mlp_ratio=c.mlp_ratio, enable_fusion=False, hidden_act="gelu", qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_norm_eps=1e-5)).eval()
    clap.load_state_dict(clap_state(model.state_dict()), strict=True)

    stage_outputs = []
    for module in (model.htsat.patch_embed, *model.htsat.layers):
        module.register_forward_hook(lambda _m, _i, out: stage_outputs.append(out))
    # 7 s at 44.1 kHz gives 965 frames: both interpolate them to 1024 before the reshape
    log_mel = torch.randn(2, 1, 965, c.mel_bins, generator=torch.Generator().manual_seed(2)) * 15 - 35
    with torch.no_grad():
        ours = model.htsat.forward_log_mel(log_mel)
        ref = clap(input_features=log_mel, output_hidden_states=True)

    assert len(ref.hidden_states) == len(stage_outputs) == 1 + len(c.depths)
    for i, (mine, theirs) in enumerate(zip(stage_outputs, ref.hidden_states)):
        side = math.isqrt(mine.shape[1])
        grid = mine.transpose(1, 2).reshape(theirs.shape)
        assert theirs.shape[-2:] == (side, side)
        diff = (grid - theirs).abs().max().item()
        report("patch embed" if i == 0 else f"stage {i - 1}", diff)
        assert diff <= 1e-4
    diff = (ours["embedding"] - ref.pooler_output).abs().max().item()
    report("embedding (latent_output) vs pooler_output", diff)
    assert ours["embedding"].shape == (2, c.num_features) and diff <= 1e-4
    # Pengi's TSCAM head, transcribed, on ClapAudioModel's regrouped grid
    tscam = model.htsat.tscam_conv
    expected = torch.sigmoid(F.conv2d(ref.last_hidden_state, tscam.weight, tscam.bias, padding=(0, 1))
                             .flatten(2).mean(-1))
    diff = (ours["clipwise_output"] - expected).abs().max().item()
    report("clipwise_output vs TSCAM transcription", diff)
    assert ours["clipwise_output"].shape == (2, c.num_classes) and diff <= 1e-5


def test_tiny_forward_on_seven_seconds():
    model = HTSAT.from_preset("tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 7 * 44100))
    assert out["embedding"].shape == (1, TINY.num_features) and out["clipwise_output"].shape == (1, TINY.num_classes)
    assert ((out["clipwise_output"] > 0) & (out["clipwise_output"] < 1)).all()


def test_waveform_longer_than_the_image_is_refused():
    model = HTSAT(TINY)
    model(torch.randn(1, TINY.max_samples))  # 1024 frames: the largest that fits
    with pytest.raises(OptionError, match="pengi_waveform"):
        model(torch.randn(1, TINY.max_samples + 1))


# --- config -----------------------------------------------------------------------------------


def test_config_round_trip_and_errors():
    import json

    for config in HTSAT_PRESETS.values():
        assert HTSATConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert HTSAT_PRESETS["pengi"].num_features == 768 and HTSAT_PRESETS["pengi"].freq_ratio == 4
    with pytest.raises(OptionError, match="tiny"):
        htsat_config("tinny")
    with pytest.raises(OptionError, match="unknown fields"):
        HTSATConfig.from_dict({"windw": 8})
    with pytest.raises(OptionError, match="enable_tscam"):
        HTSATConfig(enable_tscam=False)
    with pytest.raises(OptionError, match="num_heads"):
        HTSATConfig(num_heads=(4, 8, 16))


# --- 3. resampler -----------------------------------------------------------------------------


def test_resampled_sine_keeps_frequency_amplitude_and_phase():
    n = 16000
    tone = np.sin(2 * np.pi * 1000 * np.arange(n) / 16000).astype(np.float32)
    out = resample(tone, 16000, 44100)
    assert out.dtype == np.float32 and out.shape == (44100,)
    expected = np.sin(2 * np.pi * 1000 * np.arange(out.size) / 44100)
    middle = slice(2000, out.size - 2000)  # away from the zero-padded edges
    diff = np.abs(out[middle] - expected[middle]).max()
    report("1 kHz sine 16 -> 44.1 kHz vs the ideal samples", diff)
    assert diff < 1.5e-3


def test_resample_lengths_identity_and_antialiasing():
    rng = np.random.default_rng(0)
    for n in (1, 159, 16000, 16001, 12345):
        assert resample(rng.standard_normal(n).astype(np.float32), 16000, 44100).shape == (math.ceil(n * 441 / 160),)
    assert resample(np.zeros(44100, np.float32), 44100, 16000).shape == (16000,)
    signal = rng.standard_normal(500).astype(np.float32)
    assert resample(signal, 16000, 16000) is signal
    # 10 kHz lies above 16 kHz's Nyquist frequency: downsampling must filter it out (-45 dB here)
    high = np.sin(2 * np.pi * 10000 * np.arange(44100) / 44100).astype(np.float32)
    assert np.sqrt(np.mean(resample(high, 44100, 16000)[1000:-1000] ** 2)) < 0.01
    with pytest.raises(OptionError):
        resample(signal, 0, 44100)


# --- 4. fixed window --------------------------------------------------------------------------


def test_fixed_window_tiles_and_centre_crops():
    base = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(fixed_window(base, 25), np.concatenate([base, base, base[:5]]))
    np.testing.assert_array_equal(fixed_window(base, 10), base)
    np.testing.assert_array_equal(fixed_window(base, 4), base[3:7])
    np.testing.assert_array_equal(fixed_window(base, 5), base[2:7])


def test_pengi_waveform_tiles_one_second_seven_times_and_centre_crops_long_clips():
    rng = np.random.default_rng(1)
    second = rng.standard_normal(16000).astype(np.float32)
    out = pengi_waveform(second, 16000)
    assert out.dtype == np.float32 and out.shape == (7 * 44100,)
    one = resample(second, 16000, 44100)
    np.testing.assert_array_equal(out.reshape(7, 44100), np.broadcast_to(one, (7, 44100)))
    long_clip = rng.standard_normal(10 * 44100).astype(np.float32)
    np.testing.assert_array_equal(pengi_waveform(long_clip, 44100), long_clip[66150:66150 + 308700])
    with pytest.raises(MediaError, match="mono"):
        pengi_waveform(np.zeros((2, 16000), np.float32), 16000)
    with pytest.raises(MediaError):
        pengi_waveform(np.zeros(0, np.float32), 16000)


# --- 5. checkpoint layout ---------------------------------------------------------------------


def pengi_htsat_shapes(c: HTSATConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of ``audio_encoder.base.*`` in Pengi's checkpoint, written out from its model code
    (HTSAT_Swin_Transformer with torchlibrosa's Spectrogram and LogmelFilterBank)."""
    bins, h = c.window_size // 2 + 1, "htsat."
    shapes = {h + "spectrogram_extractor.stft.conv_real.weight": (bins, 1, c.window_size),
              h + "spectrogram_extractor.stft.conv_imag.weight": (bins, 1, c.window_size),
              h + "logmel_extractor.melW": (bins, c.mel_bins),
              h + "bn0.num_batches_tracked": (),
              h + "patch_embed.proj.weight": (c.embed_dim, 1, c.patch_size, c.patch_size),
              h + "patch_embed.proj.bias": (c.embed_dim,)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[h + f"bn0.{name}"] = (c.mel_bins,)
    norms = {h + "patch_embed.norm": c.embed_dim, h + "norm": c.num_features}
    grid = c.spec_size // c.patch_stride[0]
    for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
        dim, res = c.embed_dim * 2 ** i, grid // 2 ** i
        win = min(res, c.window)
        for j in range(depth):
            b = h + f"layers.{i}.blocks.{j}."
            norms[b + "norm1"] = norms[b + "norm2"] = dim
            shapes.update({b + "attn.relative_position_bias_table": ((2 * win - 1) ** 2, heads),
                           b + "attn.relative_position_index": (win * win, win * win),
                           b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                           b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                           b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                           b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
            if j % 2 and res > c.window:
                shapes[b + "attn_mask"] = ((res // win) ** 2, win * win, win * win)
        if i < len(c.depths) - 1:
            shapes[h + f"layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            norms[h + f"layers.{i}.downsample.norm"] = 4 * dim
    for prefix, width in norms.items():
        shapes[prefix + ".weight"] = shapes[prefix + ".bias"] = (width,)
    rows = c.spec_size // 2 ** (len(c.depths) - 1) // c.patch_stride[0] // c.freq_ratio
    shapes.update({h + "tscam_conv.weight": (c.num_classes, c.num_features, rows, 3),
                   h + "tscam_conv.bias": (c.num_classes,),
                   h + "head.weight": (c.num_classes, c.num_classes), h + "head.bias": (c.num_classes,)})
    return shapes


def test_pengi_shaped_state_dict_loads_strict():
    c = HTSAT_PRESETS["pengi"]
    shapes = pengi_htsat_shapes(c)
    assert len(shapes) == 200
    integer = ("num_batches_tracked", "relative_position_index")
    state = {k: torch.zeros(s, dtype=torch.long) if k.endswith(integer) else torch.full(s, 0.5)
             for k, s in shapes.items()}
    model = HTSAT(c)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.htsat.logmel_extractor.melW, torch.full(shapes["htsat.logmel_extractor.melW"], 0.5))
