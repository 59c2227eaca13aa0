"""CLIP vision tower and Q-Former projector against Hugging Face's independent implementations."""

import pytest
import torch
import torch.nn.functional as F

from edgeav.config import QFormerConfig, VisionConfig
from edgeav.systems.crab.config import preset
from edgeav.errors import OptionError
from edgeav.models.qformer import QFormerProjector
from edgeav.systems.crab.model import audio_projector, visual_projector
from edgeav.models.vision import CLIPVisionTower, default_indexes

transformers = pytest.importorskip("transformers")

TOL = 1e-4
VISION = VisionConfig(image_size=28, patch_size=7, hidden_size=32, num_layers=4, num_heads=4,
                      intermediate_size=64, llm_layer=3, mask_layers=(1, 2))
QFORMER = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=8)
ENCODER_WIDTH = 24
LLM_HIDDEN = 48


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (zero biases, unit LayerNorms) so a misplaced one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        image_size=VISION.image_size, patch_size=VISION.patch_size, hidden_size=VISION.hidden_size,
        num_hidden_layers=VISION.num_layers, num_attention_heads=VISION.num_heads,
        intermediate_size=VISION.intermediate_size, layer_norm_eps=VISION.layer_norm_eps,
        hidden_act="quick_gelu", attn_implementation="eager")
    model = transformers.CLIPVisionModel(config).eval()
    _perturb(model, seed=1)
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, VISION.image_size, VISION.image_size, generator=torch.Generator().manual_seed(2))


def test_vision_matches_hf_hidden_states(hf_clip, pixels):
    last = VISION.num_layers
    tower = CLIPVisionTower(VISION, indexes=(0, 1, last - 1, last)).eval()
    tower.load_state_dict(hf_clip.state_dict())  # strict: post_layernorm.* accepted and ignored
    with torch.no_grad():
        ours = tower(pixels)
        theirs = hf_clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours) == 4
    for index, state in zip((0, 1, last - 1, last), ours):
        assert state.shape == (3, (VISION.image_size // VISION.patch_size) ** 2, VISION.hidden_size)
        assert _max_diff(state, theirs[index][:, 1:, :]) < TOL, f"hidden state {index}"


def test_vision_config_indexes_run_only_needed_blocks(hf_clip, pixels):
    tower = CLIPVisionTower(VISION).eval()
    assert tower.indexes == default_indexes(VISION) == (3, 1, 2)
    assert len(tower.encoder.layers) == 3  # block 4 is never run, so never built
    # A hub CLIP file keeps the "vision_model." prefix; the unused block 4 is dropped, not reported.
    hub = {f"vision_model.{k}": v for k, v in hf_clip.state_dict().items()}
    hub["vision_model.embeddings.position_ids"] = torch.arange(VISION.num_patches + 1)[None]  # old buffer
    tower.load_state_dict(hub)
    with torch.no_grad():
        llm_feats, *mask_feats = tower(pixels)
        theirs = hf_clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert _max_diff(llm_feats, theirs[3][:, 1:]) < TOL
    for index, state in zip(VISION.mask_layers, mask_feats):
        assert _max_diff(state, theirs[index][:, 1:]) < TOL, f"mask layer {index}"


def test_vision_negative_index_and_out_of_range():
    assert CLIPVisionTower(VISION, indexes=(-1, -2)).indexes == (4, 3)
    with pytest.raises(OptionError, match="index 5 is out of range"):
        CLIPVisionTower(VISION, indexes=(5,))


def test_vision_unexpected_and_bad_input(hf_clip):
    tower = CLIPVisionTower(VISION)
    state = dict(hf_clip.state_dict())
    state["encoder.layers.7.mlp.fc1.weight"] = torch.zeros(1)  # beyond num_layers: a real mismatch
    state["visual_projection.weight"] = torch.zeros(1)
    result = tower.load_state_dict(state, strict=False)
    assert sorted(result.unexpected_keys) == ["encoder.layers.7.mlp.fc1.weight", "visual_projection.weight"]
    assert result.missing_keys == []
    with pytest.raises(ValueError, match=r"pixels: expected shape \[frames, 3, 28, 28\]"):
        tower(torch.zeros(1, 3, 32, 32))


def test_vision_exports_with_dynamic_frames(pixels):
    tower = CLIPVisionTower(VISION).eval()
    frames = torch.export.Dim("frames", min=1, max=64)
    program = torch.export.export(tower, (pixels,), dynamic_shapes=({0: frames},))
    other = torch.randn(5, 3, VISION.image_size, VISION.image_size)
    with torch.no_grad():
        for exported, eager in zip(program.module()(other), tower(other)):
            assert _max_diff(exported, eager) < 1e-5


# ---------------------------------------------------------------- Q-Former

# Hugging Face Blip2QFormerModel name (per layer, after "encoder.layer.{i}.") -> ours (after "layers.{i}.").
HF_LAYER_NAMES = {
    "attention.attention.query": "self_attn.q_proj", "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_norm",
    "crossattention.attention.query": "cross_attn.q_proj", "crossattention.attention.key": "cross_attn.k_proj",
    "crossattention.attention.value": "cross_attn.v_proj", "crossattention.output.dense": "cross_attn.out_proj",
    "crossattention.output.LayerNorm": "cross_attn_norm",
    "intermediate_query.dense": "fc1", "output_query.dense": "fc2", "output_query.LayerNorm": "ffn_norm",
}
# Crab's released name (per layer, after "visual_Qformer.bert.encoder.layer.{i}.") -> ours.
RELEASED_LAYER_NAMES = {
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_norm",
    "crossattention.self.query": "cross_attn.q_proj", "crossattention.self.key": "cross_attn.k_proj",
    "crossattention.self.value": "cross_attn.v_proj", "crossattention.output.dense": "cross_attn.out_proj",
    "crossattention.output.LayerNorm": "cross_attn_norm",
    "intermediate_query.dense": "fc1", "output_query.dense": "fc2", "output_query.LayerNorm": "ffn_norm",
}


def _hf_to_ours(hf_state: dict) -> dict:
    ours = {}
    for key, tensor in hf_state.items():
        if key.startswith("layernorm."):
            ours["query_norm." + key.split(".")[-1]] = tensor
            continue
        _, _, index, rest = key.split(".", 3)  # encoder.layer.{i}.{module}.{weight|bias}
        module, leaf = rest.rsplit(".", 1)
        ours[f"layers.{index}.{HF_LAYER_NAMES[module]}.{leaf}"] = tensor
    return ours


def _released_layout(ours: dict, stem: str = "visual") -> dict:
    """Our state dict as Crab's finetune_weights.bin lays it out, unused BERT parts included."""
    top = {"encoder_norm": f"{stem}_ln", "query_norm": f"{stem}_Qformer.bert.embeddings.LayerNorm",
           "proj_in": f"{stem}_proj.0", "proj_out": f"{stem}_proj.2"}
    layer_names = {v: k for k, v in RELEASED_LAYER_NAMES.items()}
    released = {}
    for key, tensor in ours.items():
        if key == "queries":
            released[f"{stem}_query_tokens"] = tensor
        elif key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            module, leaf = rest.rsplit(".", 1)
            released[f"{stem}_Qformer.bert.encoder.layer.{index}.{layer_names[module]}.{leaf}"] = tensor
        else:
            module, leaf = key.rsplit(".", 1)
            released[f"{top[module]}.{leaf}"] = tensor
    hidden, inter = QFORMER.hidden_size, QFORMER.intermediate_size
    released[f"{stem}_Qformer.bert.embeddings.word_embeddings.weight"] = torch.randn(50, hidden)
    released[f"{stem}_Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(20, hidden)
    released[f"{stem}_Qformer.cls.predictions.bias"] = torch.randn(50)
    released[f"{stem}_Qformer.cls.predictions.transform.dense.weight"] = torch.randn(hidden, hidden)
    for index in range(QFORMER.num_layers):
        text = f"{stem}_Qformer.bert.encoder.layer.{index}."
        released[text + "intermediate.dense.weight"] = torch.randn(inter, hidden)
        released[text + "intermediate.dense.bias"] = torch.randn(inter)
        released[text + "output.dense.weight"] = torch.randn(hidden, inter)
        released[text + "output.dense.bias"] = torch.randn(hidden)
        released[text + "output.LayerNorm.weight"] = torch.randn(hidden)
        released[text + "output.LayerNorm.bias"] = torch.randn(hidden)
    return released


@pytest.fixture(scope="module")
def projector():
    torch.manual_seed(3)
    module = QFormerProjector(ENCODER_WIDTH, QFORMER, LLM_HIDDEN).eval()
    _perturb(module, seed=4)
    return module


@pytest.fixture(scope="module")
def features():
    return torch.randn(2, 10, ENCODER_WIDTH, generator=torch.Generator().manual_seed(5))


def test_qformer_matches_hf_blip2(features):
    config = transformers.Blip2QFormerConfig(
        hidden_size=QFORMER.hidden_size, num_hidden_layers=QFORMER.num_layers,
        num_attention_heads=QFORMER.num_heads, intermediate_size=QFORMER.intermediate_size,
        layer_norm_eps=QFORMER.layer_norm_eps, encoder_hidden_size=ENCODER_WIDTH,
        cross_attention_frequency=1, hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(6)
    hf = transformers.Blip2QFormerModel(config).eval()
    _perturb(hf, seed=7)
    ours = QFormerProjector(ENCODER_WIDTH, QFORMER, LLM_HIDDEN).eval()
    _perturb(ours, seed=8)  # queries, encoder norm and MLP: not in HF's model
    result = ours.load_state_dict(_hf_to_ours(hf.state_dict()), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == ["encoder_norm.bias", "encoder_norm.weight", "proj_in.bias",
                                           "proj_in.weight", "proj_out.bias", "proj_out.weight", "queries"]
    normed = F.layer_norm(features, (ENCODER_WIDTH,), ours.encoder_norm.weight, ours.encoder_norm.bias, eps=1e-5)
    with torch.no_grad():
        theirs = hf(query_embeds=ours.queries.expand(features.shape[0], -1, -1),
                    encoder_hidden_states=normed).last_hidden_state
        mine = ours.query_states(features)
    assert mine.shape == (2, QFORMER.num_queries, QFORMER.hidden_size)
    assert _max_diff(mine, theirs) < TOL


def test_projector_output_shape_and_mlp(projector, features):
    with torch.no_grad():
        tokens = projector(features)
        queries = projector.query_states(features)
    assert tokens.shape == (2, QFORMER.num_queries, LLM_HIDDEN)
    mlp = F.linear(F.gelu(F.linear(queries, projector.proj_in.weight, projector.proj_in.bias)),
                   projector.proj_out.weight, projector.proj_out.bias)
    assert _max_diff(tokens, mlp) < 1e-6
    with pytest.raises(ValueError, match=r"visual features: expected shape \[N, tokens, 24\]"):
        projector(torch.zeros(2, 10, 16))


def test_projector_loads_released_layout(projector, features):
    released = _released_layout(projector.state_dict())
    assert set(projector.released_state_dict()) <= set(released)
    fresh = QFormerProjector(ENCODER_WIDTH, QFORMER, LLM_HIDDEN).eval()
    fresh.load_state_dict(released)  # strict: unused BERT parts accepted and dropped
    with torch.no_grad():
        assert torch.equal(fresh(features), projector(features))


def test_projector_reports_missing_and_foreign_keys(projector):
    released = _released_layout(projector.state_dict())
    del released["visual_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"]
    released["audio_ln.weight"] = torch.ones(ENCODER_WIDTH)  # the other projector's key is not ours
    fresh = QFormerProjector(ENCODER_WIDTH, QFORMER, LLM_HIDDEN)
    with pytest.raises(RuntimeError, match=r"layers\.1\.cross_attn\.k_proj\.weight"):
        fresh.load_state_dict(released)
    result = fresh.load_state_dict(released, strict=False)
    assert result.missing_keys == ["layers.1.cross_attn.k_proj.weight"]
    assert result.unexpected_keys == ["audio_ln.weight"]


def test_projector_nested_prefix_and_audio_stem(features):
    audio = QFormerProjector(ENCODER_WIDTH, QFORMER, LLM_HIDDEN, prefix="audio").eval()
    _perturb(audio, seed=9)
    parent = torch.nn.Module()
    parent.al_projector = QFormerProjector(ENCODER_WIDTH, QFORMER, LLM_HIDDEN, prefix="audio").eval()
    nested = {f"al_projector.{k}": v for k, v in _released_layout(audio.state_dict(), stem="audio").items()}
    parent.load_state_dict(nested)
    with torch.no_grad():
        assert torch.equal(parent.al_projector(features), audio(features))


def test_crab_presets_build_projectors():
    cfg = preset("crab-tiny")
    assert visual_projector(cfg).encoder_width == cfg.vision.hidden_size
    assert audio_projector(cfg)(torch.zeros(1, 5, cfg.audio.hidden_size)).shape == (
        1, cfg.qformer.num_queries, cfg.llm.hidden_size)
