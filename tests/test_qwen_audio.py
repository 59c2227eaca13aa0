"""Crab+'s audio path against transformers on the same inputs and random weights: the Whisper log-mel
front end of Qwen2.5-Omni's processor and the Qwen2.5-Omni audio tower (CRABPLUS_SPEC sections 2, 8, 9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
    Qwen2_5OmniAudioEncoderConfig,
    Qwen2_5OmniConfig,
)
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from edgeav.errors import CheckpointError, OptionError
from edgeav.models.qwen_audio import QwenAudioConfig, QwenAudioEncoder, audio_token_count
from edgeav.preprocess.whisper_mel import frame_count, log_mel

TOL = 1e-4
SR = 16000
# Spec section 9: the smallest useful audio tower.
TINY = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, n_window=100, output_dim=64)


@pytest.fixture(scope="module")
def whisper_300s():
    """The feature extractor as Qwen2.5-Omni's processor configures it (every audio padded to 300 s)."""
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=SR, hop_length=160, chunk_length=300, n_fft=400)


def _waveform(kind: str, seconds: float) -> np.ndarray:
    n = round(seconds * SR)
    rng = np.random.default_rng(7)
    if kind == "noise":
        return rng.uniform(-1.0, 1.0, n)
    if kind == "tone":
        return 0.5 * np.sin(2 * np.pi * 440.0 * np.arange(n) / SR)
    # Silence, then a burst in the last 3 ms: the loudest frame lies past the valid ones, so only the
    # processor's max over the padded array gives the right clamp floor.
    wave = np.zeros(n)
    wave[-50:] = rng.uniform(-1.0, 1.0, 50)
    return wave


@pytest.mark.parametrize(
    "kind,seconds",
    [("noise", 1.0), ("noise", 1.37), ("noise", 5.0), ("noise", 0.3), ("tone", 2.5001), ("tail", 1.0)],
)
def test_log_mel_matches_whisper_feature_extractor(whisper_300s, kind, seconds):
    wave = _waveform(kind, seconds)
    ref = whisper_300s(wave, sampling_rate=SR, return_attention_mask=True, return_tensors="np")
    valid = int(ref["attention_mask"].sum())
    ours = log_mel(wave)
    assert valid == frame_count(wave.shape[0])
    assert ours.shape == (128, valid) and ours.dtype == np.float32
    assert np.abs(ours - ref["input_features"][0, :, :valid]).max() <= TOL


def test_frame_count_is_ceil_of_hops():
    assert [frame_count(n) for n in (1, 160, 161, 16000, 21920, 10 * SR)] == [1, 1, 2, 100, 137, 1000]
    assert frame_count(400 * SR) == 30000  # the processor cuts at 300 s


def test_log_mel_rejects_stereo_and_empty():
    with pytest.raises(OptionError, match="mono"):
        log_mel(np.zeros((2, SR)))
    with pytest.raises(OptionError, match="empty"):
        log_mel(np.zeros(0))


def _randomised_reference(seed: int) -> Qwen2_5OmniAudioEncoder:
    """transformers' audio tower with weights large enough that a wrong op shows well above the tolerance."""
    torch.manual_seed(seed)
    ref = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(num_mel_bins=128, **TINY)).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            is_norm = "layer_norm" in name or "ln_post" in name
            param.normal_(1.0 if is_norm and name.endswith("weight") else 0.0, 0.2 if is_norm else 0.3)
    return ref


@pytest.fixture(scope="module")
def encoders():
    ref = _randomised_reference(seed=0)
    ours = QwenAudioEncoder(QwenAudioConfig(**TINY)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# 1 s, 1.37 s, a single short chunk, 2.5 s (full chunk + short one), a 199-frame tail (as many tokens as a
# full chunk), 4 s (two full chunks), 5 s.
@pytest.mark.parametrize("frames", [100, 137, 3, 250, 399, 400, 500])
def test_encoder_matches_transformers(encoders, frames):
    ref, ours = encoders
    mel = torch.rand(128, frames, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        expected = ref(mel, feature_lens=torch.tensor([frames])).last_hidden_state
        actual = ours(mel)
    assert actual.shape == (audio_token_count(frames), TINY["output_dim"]) == expected.shape
    assert (actual - expected).abs().max().item() <= TOL


def test_token_count_rule():
    assert [audio_token_count(seconds * 100) for seconds in (1, 5, 10, 20)] == [25, 125, 250, 500]
    frames = torch.arange(3, 3001)
    _, reference = Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, frames)
    assert [audio_token_count(int(n)) for n in frames] == reference.tolist()


def test_config_from_hf_reads_the_thinker_audio_section():
    section = Qwen2_5OmniConfig().to_dict()["thinker_config"]["audio_config"]
    assert QwenAudioConfig.from_hf(section) == QwenAudioConfig()  # the released 7B's audio tower
    assert QwenAudioConfig.from_hf(Qwen2_5OmniAudioEncoderConfig(**TINY).to_dict()) == QwenAudioConfig(**TINY)
    with pytest.raises(CheckpointError, match="activation_function"):
        QwenAudioConfig.from_hf({**section, "activation_function": "relu"})


def test_state_dict_with_a_saved_sinusoid_table_loads_strict(encoders):
    ref, ours = encoders
    saved = {**ref.state_dict(), "positional_embedding.positional_embedding": torch.zeros(1500, TINY["d_model"])}
    fresh = QwenAudioEncoder(QwenAudioConfig(**TINY)).eval()
    fresh.load_state_dict(saved, strict=True)
    mel = torch.rand(128, 250) * 2 - 1
    with torch.no_grad():
        assert torch.equal(fresh(mel), ours(mel))  # the table is recomputed, never taken from the file


def test_encoder_exports_at_a_fixed_length(encoders):
    _, ours = encoders
    program = torch.export.export(ours, (torch.rand(128, 250),), strict=False)
    mel = torch.rand(128, 250) * 2 - 1  # other values than the traced ones
    with torch.no_grad():
        assert (program.module()(mel) - ours(mel)).abs().max().item() <= TOL


def test_encoder_rejects_bad_mel(encoders):
    _, ours = encoders
    with pytest.raises(OptionError, match=r"\[128, frames\]"):
        ours(torch.zeros(80, 100))
    with pytest.raises(OptionError, match="at least 3"):
        ours(torch.zeros(128, 2))
