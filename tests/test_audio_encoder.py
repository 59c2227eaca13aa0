"""BEATs audio encoder (edgeav.models.audio): shapes, arithmetic pieces, config and checkpoint names.

Small configs (crab-tiny's audio part or a custom one), fp32, seeded.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from edgeav.config import AudioConfig
from edgeav.systems.crab.config import preset
from edgeav.errors import OptionError
from edgeav.models.audio import (
    BeatsEncoder,
    BeatsEncoderConfig,
    BeatsSelfAttention,
    WeightNormConv1d,
    beats_config_from_checkpoint_cfg,
    relative_position_buckets,
)

TINY = preset("crab-tiny").audio  # 2 layers, width 64, 4 heads, patch width 32, 32 buckets, max distance 64

# The released checkpoint's cfg (BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2), as third-party copies print it.
RELEASED_CFG = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "dropout": 0.0, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0, "layer_norm_first": False,
    "conv_bias": False, "conv_pos": 128, "conv_pos_groups": 16, "relative_position_embedding": True,
    "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True, "deep_norm": True, "input_patch_size": 16,
    "layer_wise_gradient_decay_ratio": 0.6, "embed_dim": 512, "finetuned_model": True,
    "predictor_dropout": 0.0, "predictor_class": 527,
}
TINY_CFG = dict(RELEASED_CFG, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
                encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4, num_buckets=32,
                max_distance=64)


def _seeded_encoder(cfg=TINY, seed: int = 0) -> BeatsEncoder:
    torch.manual_seed(seed)
    return BeatsEncoder(cfg).eval()


def _fbank(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 128, generator=torch.Generator().manual_seed(seed))


# --- token counts -------------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "tokens"), [(98, 48), (198, 96)])
def test_one_and_two_seconds_give_48_and_96_tokens(frames, tokens):
    encoder = _seeded_encoder()
    with torch.no_grad():
        out = encoder(_fbank(2, frames))
    assert out.shape == (2, tokens, TINY.hidden_size)
    assert encoder.num_tokens(frames) == tokens


def test_trailing_frames_short_of_a_patch_are_dropped():
    # 98 frames = 6 patches of 16 + 2 frames that BEATs' strided conv never reads.
    encoder = _seeded_encoder()
    fbank = _fbank(1, 98)
    with torch.no_grad():
        full, cut = encoder(fbank), encoder(fbank[:, :96])
    torch.testing.assert_close(full, cut, rtol=0, atol=1e-6)


def test_fbank_of_the_wrong_shape_is_refused_with_the_expected_shape():
    encoder = _seeded_encoder()
    with pytest.raises(ValueError, match=r"\[batch, frames, 128\]"):
        encoder(torch.zeros(1, 98, 80))
    with pytest.raises(ValueError, match="fewer than one 16-frame patch"):
        encoder(torch.zeros(1, 10, 128))


# --- relative position buckets ------------------------------------------------------------------


def test_relative_position_buckets_match_hand_computed_table():
    """Bidirectional buckets, offset = key - query.

    With num_buckets=32, max_distance=64: each direction has n = 16 buckets, positive offsets
    add 16; distances d < e = 8 are exact; otherwise e + trunc(log(d/e) / log(64/8) * (16 - 8)),
    capped at 15:
      d=8:   8 + trunc(0)                          = 8
      d=11:  8 + trunc(log(1.375)/log(8) * 8)      = 8 + trunc(1.225) = 9
      d=16:  8 + trunc(log(2)/log(8) * 8 = 8/3)    = 10
      d=32:  8 + trunc(log(4)/log(8) * 8 = 16/3)   = 13
      d=63:  8 + trunc(log(7.875)/log(8) * 8)      = 8 + trunc(7.94) = 15
      d=64:  8 + 8 = 16 -> capped 15;  d=1000 -> 15
    With the released 320 / 800: n = 160, e = 80;
      d=160: 80 + trunc(log(2)/log(10) * 80 = 24.08) = 104;  d=800: 160 -> capped 159.
    """
    offsets = torch.tensor([0, -3, 3, -7, 7, -8, 8, -11, -16, 16, -32, -63, -64, 64, -1000, 1000])
    expected = torch.tensor([0, 3, 19, 7, 23, 8, 24, 9, 10, 26, 13, 15, 15, 31, 15, 31])
    assert torch.equal(relative_position_buckets(offsets, 32, 64), expected)

    offsets = torch.tensor([-79, -80, -160, 160, -800, 800])
    expected = torch.tensor([79, 80, 104, 264, 159, 319])
    assert torch.equal(relative_position_buckets(offsets, 320, 800), expected)


def test_position_bias_is_the_table_looked_up_by_bucket():
    attention = BeatsSelfAttention(BeatsEncoderConfig(audio=TINY), owns_position_table=True)
    bias = attention.position_bias(5)
    assert bias.shape == (TINY.num_heads, 5, 5)
    table = attention.relative_attention_bias.weight
    # query 4, key 1: offset -3 -> bucket 3; query 1, key 4: offset +3 -> bucket 19
    torch.testing.assert_close(bias[:, 4, 1], table[3])
    torch.testing.assert_close(bias[:, 1, 4], table[19])


# --- weight-normalised positional convolution ---------------------------------------------------


def test_weight_norm_conv_equals_torch_weight_norm():
    torch.manual_seed(0)
    channels, kernel, groups = 64, 16, 4
    ours = WeightNormConv1d(channels, kernel, groups)
    g = torch.rand(1, 1, kernel) + 0.5
    v = torch.randn(channels, channels // groups, kernel)
    bias = torch.randn(channels)
    ours.load_state_dict({"weight_g": g, "weight_v": v, "bias": bias})

    reference = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=groups)
    reference = nn.utils.parametrizations.weight_norm(reference, name="weight", dim=2)
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(g)
        reference.parametrizations.weight.original1.copy_(v)
        reference.bias.copy_(bias)
        x = torch.randn(2, channels, 30)
        torch.testing.assert_close(ours.weight(), reference.weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)

    # A state dict saved with torch's parametrization names loads too.
    again = WeightNormConv1d(channels, kernel, groups)
    again.load_state_dict(reference.state_dict(), strict=True)
    torch.testing.assert_close(again.weight_g, g)
    torch.testing.assert_close(again.weight_v, v)


# --- GRU-gated relative position ----------------------------------------------------------------


def test_gru_gate_with_zero_grep_weights_is_closed_form():
    """With grep_linear's weight zero, a = sum(bias[0:4]), b = sum(bias[4:8]) for every query, so
    gate = sigmoid(a) * (sigmoid(b) * grep_a - 1) + 2; with a zero bias too, 0.5 * (0.5 * grep_a - 1) + 2
    = 1.5 + grep_a / 4."""
    torch.manual_seed(0)
    attention = BeatsSelfAttention(BeatsEncoderConfig(audio=TINY), owns_position_table=True)
    heads, head_dim = TINY.num_heads, TINY.hidden_size // TINY.num_heads
    grep_a = torch.tensor([0.5, 1.0, 2.0, -1.0]).view(1, heads, 1, 1)
    query = torch.randn(2, heads, 7, head_dim)
    with torch.no_grad():
        attention.grep_a.copy_(grep_a)
        attention.grep_linear.weight.zero_()
        attention.grep_linear.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.4, -0.5, 0.2, 0.0, 0.1]))
        a, b = torch.sigmoid(torch.tensor(0.6)), torch.sigmoid(torch.tensor(-0.2))
        expected = (a * (b * grep_a - 1) + 2).expand(2, heads, 7, 1)
        torch.testing.assert_close(attention.rel_pos_gate(query), expected)

        attention.grep_linear.bias.zero_()
        expected = (1.5 + grep_a / 4).expand(2, heads, 7, 1)
        torch.testing.assert_close(attention.rel_pos_gate(query), expected)


def test_gru_gate_scales_the_position_bias_in_attention():
    # Zero grep_linear: the gated layer must equal an ungated one fed bias * (1.5 + grep_a / 4).
    torch.manual_seed(0)
    gated = BeatsSelfAttention(BeatsEncoderConfig(audio=TINY), owns_position_table=True)
    plain = BeatsSelfAttention(BeatsEncoderConfig(audio=dataclasses.replace(TINY, gru_rel_pos=False)),
                               owns_position_table=True)
    grep_a = torch.tensor([0.5, 1.0, 2.0, -1.0]).view(1, -1, 1, 1)
    with torch.no_grad():
        gated.grep_a.copy_(grep_a)
        nn.init.zeros_(gated.grep_linear.weight)
        nn.init.zeros_(gated.grep_linear.bias)
        plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "grep" not in k}, strict=True)
        hidden = torch.randn(2, 9, TINY.hidden_size)
        bias = gated.position_bias(9)
        torch.testing.assert_close(gated(hidden, bias), plain(hidden, bias * (1.5 + grep_a[0] / 4)),
                                   rtol=1e-5, atol=1e-6)
        assert not torch.allclose(gated(hidden, bias), plain(hidden, bias), atol=1e-4)


def test_changing_grep_a_changes_the_output():
    encoder = _seeded_encoder()
    fbank = _fbank(1, 98)
    with torch.no_grad():
        before = encoder(fbank)
        encoder.encoder.layers[1].self_attn.grep_a.fill_(3.0)
        after = encoder(fbank)
    assert (before - after).abs().max() > 1e-3


# --- deep-norm, batching, dropout ---------------------------------------------------------------


def test_deep_norm_scales_residuals_and_changes_the_output():
    on = _seeded_encoder(BeatsEncoderConfig(audio=TINY))
    off = BeatsEncoder(BeatsEncoderConfig(audio=dataclasses.replace(TINY, deep_norm=False))).eval()
    off.load_state_dict(on.state_dict(), strict=True)
    assert on.encoder.layers[0].residual_scale == pytest.approx((2 * TINY.num_layers) ** 0.25)
    assert off.encoder.layers[0].residual_scale == 1.0
    fbank = _fbank(1, 98)
    with torch.no_grad():
        assert (on(fbank) - off(fbank)).abs().max() > 1e-3


def test_output_does_not_depend_on_batch_composition():
    encoder = _seeded_encoder()
    batch = _fbank(3, 198)
    with torch.no_grad():
        together = encoder(batch)
        alone = encoder(batch[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-5)


def test_training_mode_runs_every_layer_without_dropout():
    encoder = _seeded_encoder()
    fbank = _fbank(2, 98)
    with torch.no_grad():
        evaluated = encoder(fbank)
        trained = encoder.train()(fbank)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)


# --- config from a BEATs checkpoint cfg ---------------------------------------------------------


def test_config_from_released_cfg():
    cfg = beats_config_from_checkpoint_cfg(RELEASED_CFG)
    assert cfg.encoder_layerdrop == 0.0  # the file says 0.05; Crab forces 0
    assert cfg.audio == AudioConfig()  # our crab-7b audio preset is the released model
    assert (cfg.conv_bias, cfg.layer_norm_first, cfg.relative_position_embedding, cfg.activation_fn) == (
        False, False, True, "gelu")
    assert cfg.num_tokens(98) == 48 and cfg.num_tokens(198) == 96
    tiny = beats_config_from_checkpoint_cfg(TINY_CFG)
    assert (tiny.audio.num_layers, tiny.audio.hidden_size, tiny.audio.patch_embed_dim) == (2, 64, 32)
    assert tiny.audio.max_distance == 64 and tiny.audio.conv_pos_groups == 4


@pytest.mark.parametrize("key", ["max_distance", "deep_norm", "input_patch_size", "conv_pos_groups"])
def test_config_missing_required_key_is_named(key):
    cfg = {k: v for k, v in RELEASED_CFG.items() if k != key}
    with pytest.raises(OptionError, match=f"missing key '{key}'"):
        beats_config_from_checkpoint_cfg(cfg)


def test_config_rejects_wrong_types_and_contradictions():
    with pytest.raises(OptionError, match="encoder_layers=True should be int"):
        beats_config_from_checkpoint_cfg(dict(RELEASED_CFG, encoder_layers=True))
    with pytest.raises(OptionError, match="deep_norm and layer_norm_first"):
        beats_config_from_checkpoint_cfg(dict(RELEASED_CFG, layer_norm_first=True))
    with pytest.raises(OptionError, match="activation_fn 'glu'"):
        beats_config_from_checkpoint_cfg(dict(RELEASED_CFG, activation_fn="glu"))
    with pytest.raises(OptionError, match="encoder_layerdrop"):
        BeatsEncoderConfig(encoder_layerdrop=0.1)


# --- released key names -------------------------------------------------------------------------


def _beats_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the names and shapes Microsoft's BEATs gives for ``cfg`` (fine-tuned:
    with ``predictor.*``; every layer lists the shared relative table), filled from a seeded
    generator independently of our module's initialisation."""
    gen = torch.Generator().manual_seed(seed)
    embed, dim, ffn = cfg["embed_dim"], cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"]
    heads, patch, kernel = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]

    def weight(*shape):
        fan_in = math.prod(shape[1:]) or 1
        return torch.randn(*shape, generator=gen) / math.sqrt(fan_in)

    def near_one(n):
        return 1 + 0.1 * torch.randn(n, generator=gen)

    def small(*shape):
        return 0.1 * torch.randn(*shape, generator=gen)

    state = {
        "patch_embedding.weight": weight(embed, 1, patch, patch),
        "layer_norm.weight": near_one(embed), "layer_norm.bias": small(embed),
        "post_extract_proj.weight": weight(dim, embed), "post_extract_proj.bias": small(dim),
        "encoder.pos_conv.0.bias": small(dim),
        "encoder.pos_conv.0.weight_g": 0.5 + torch.rand(1, 1, kernel, generator=gen),
        "encoder.pos_conv.0.weight_v": torch.randn(dim, dim // cfg["conv_pos_groups"], kernel, generator=gen),
        "encoder.layer_norm.weight": near_one(dim), "encoder.layer_norm.bias": small(dim),
    }
    table = torch.randn(cfg["num_buckets"], heads, generator=gen)
    for i in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{i}."
        state[p + "self_attn.grep_a"] = 1 + 0.5 * torch.randn(1, heads, 1, 1, generator=gen)
        state[p + "self_attn.relative_attention_bias.weight"] = table  # one tensor listed per layer
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            state[p + f"self_attn.{proj}.weight"] = weight(dim, dim)
            state[p + f"self_attn.{proj}.bias"] = small(dim)
        state[p + "self_attn.grep_linear.weight"] = weight(8, dim // heads)
        state[p + "self_attn.grep_linear.bias"] = small(8)
        state[p + "self_attn_layer_norm.weight"] = near_one(dim)
        state[p + "self_attn_layer_norm.bias"] = small(dim)
        state[p + "fc1.weight"], state[p + "fc1.bias"] = weight(ffn, dim), small(ffn)
        state[p + "fc2.weight"], state[p + "fc2.bias"] = weight(dim, ffn), small(dim)
        state[p + "final_layer_norm.weight"] = near_one(dim)
        state[p + "final_layer_norm.bias"] = small(dim)
    state["predictor.weight"] = weight(527, dim)
    state["predictor.bias"] = small(527)
    return state


def test_released_key_names_load_strict():
    released = _beats_state_dict(TINY_CFG)
    encoder = BeatsEncoder.from_checkpoint_cfg(TINY_CFG)
    encoder.load_state_dict(dict(released), strict=True)

    ours = encoder.state_dict()
    dropped = {"predictor.weight", "predictor.bias", "encoder.layers.1.self_attn.relative_attention_bias.weight"}
    assert set(ours) == set(released) - dropped
    for key, value in ours.items():
        assert torch.equal(value, released[key]), key


def test_layer_copy_of_the_shared_table_must_match_layer_0():
    released = _beats_state_dict(TINY_CFG)
    released["encoder.layers.1.self_attn.relative_attention_bias.weight"] = torch.zeros(32, 4)
    with pytest.raises(OptionError, match="layers.1.self_attn.relative_attention_bias.weight differs"):
        BeatsEncoder.from_checkpoint_cfg(TINY_CFG).load_state_dict(released, strict=True)


def test_matches_values_from_an_independent_beats_port():
    """Outputs pinned from SpeechBrain 1.1.2's port of Microsoft's BEATs (speechbrain.lobes.models.beats),
    run once outside this suite on ``_beats_state_dict(TINY_CFG)`` and this fbank; the arithmetic as a
    whole (scaling order, gate, deep-norm, positional conv, buckets) must keep reproducing them."""
    encoder = BeatsEncoder.from_checkpoint_cfg(TINY_CFG).eval()
    encoder.load_state_dict(_beats_state_dict(TINY_CFG), strict=True)
    with torch.no_grad():
        out = encoder(_fbank(1, 198, seed=7))
    assert out.shape == (1, 96, 64)
    expected_corner = torch.tensor(EXPECTED_CORNER)
    torch.testing.assert_close(out[0, :3, :4], expected_corner, rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0, -1, :4], torch.tensor(EXPECTED_LAST), rtol=0, atol=1e-4)
    assert out.abs().sum().item() == pytest.approx(EXPECTED_ABS_SUM, rel=1e-5)


EXPECTED_CORNER = [[0.41037, -0.959658, 0.480046, 1.285399],
                   [-0.894768, 0.577625, -1.334549, 1.038065],
                   [-1.992955, -0.05238, -0.052778, 1.21801]]
EXPECTED_LAST = [-1.268413, -0.159969, 0.227981, -0.021002]
EXPECTED_ABS_SUM = 4889.3496


def test_from_checkpoint_reads_a_released_style_file(tmp_path):
    path = tmp_path / "beats.pt"
    torch.save({"cfg": TINY_CFG, "model": _beats_state_dict(TINY_CFG)}, path)
    encoder = BeatsEncoder.from_checkpoint(path)
    assert not encoder.training
    reference = BeatsEncoder.from_checkpoint_cfg(TINY_CFG)
    reference.load_state_dict(_beats_state_dict(TINY_CFG), strict=True)
    fbank = _fbank(1, 98)
    with torch.no_grad():
        torch.testing.assert_close(encoder(fbank), reference.eval()(fbank), rtol=0, atol=0)

    torch.save({"model": {}}, tmp_path / "no_cfg.pt")
    with pytest.raises(OptionError, match="expected a dict with 'cfg' and 'model'"):
        BeatsEncoder.from_checkpoint(tmp_path / "no_cfg.pt")
    with pytest.raises(OptionError, match="cannot be read"):
        BeatsEncoder.from_checkpoint(tmp_path / "missing.pt")


# --- export -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_exports_with_dynamic_batch_and_time():
    # torch.export needs no data-dependent branch; one graph serves 1 s and 2 s segments.
    encoder = _seeded_encoder()
    dynamic = {"fbank": {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}}
    program = torch.export.export(encoder, (_fbank(2, 98),), dynamic_shapes=dynamic)
    for batch, frames in ((1, 98), (3, 198), (2, 1000)):
        fbank = _fbank(batch, frames, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(fbank), encoder(fbank), rtol=1e-5, atol=1e-5)
