"""SAM 2.1 image predictor (edgeav.models.sam2, edgeav.preprocess.sam2) against transformers.Sam2Model.

Same random weights, fp32, the tiny config of CRABPLUS_SPEC section 9; nothing is downloaded.
transformers is the independent anchor (the ``sam2`` package is not installed): its weights are
randomised under its own names and reach our model through ``sam2_state_dict_from_transformers``,
so the name mapping is tested too. transformers orders the sparse tokens points, corners, padding;
the predictor corners, points, padding. The two-way transformer does not depend on that order.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgeav.errors import CheckpointError, MediaError, OptionError
from edgeav.models.sam2 import (SAM2_PRESETS, Sam2, Sam2Config, Sam2Features, load_sam2_state_dict, masks_at,
                                sam2_config, sam2_state_dict_from_transformers)
from edgeav.preprocess.sam2 import SAM2_MEAN, SAM2_STD, sam2_pixels, sam2_prompt

TOL = 1e-4
TINY = SAM2_PRESETS["tiny"]
# Crab+'s prompt in 224 space: a box and three points
BOX = (20, 30, 180, 200)
POINTS = [(60, 70), (100, 120), (150, 160)]


def hf_sam2(config: Sam2Config) -> nn.Module:
    """``transformers.Sam2Model`` with ``config``'s sizes (randomly initialised by transformers)."""
    from transformers import Sam2Config as HFConfig
    from transformers import (Sam2HieraDetConfig, Sam2MaskDecoderConfig, Sam2Model, Sam2PromptEncoderConfig,
                              Sam2VisionConfig)

    c = config
    trunk = Sam2HieraDetConfig(
        hidden_size=c.stage_dims[0], image_size=[c.image_size] * 2, blocks_per_stage=list(c.stages),
        embed_dim_per_stage=list(c.stage_dims), num_attention_heads_per_stage=list(c.stage_heads),
        window_size_per_stage=list(c.window_spec), global_attention_blocks=list(c.global_att_blocks),
        window_positional_embedding_background_size=list(c.window_pos_embed_bkg_spatial_size))
    hf_config = HFConfig(
        vision_config=Sam2VisionConfig(
            backbone_config=trunk, backbone_channel_list=list(c.backbone_channel_list),
            backbone_feature_sizes=[[c.image_size // stride] * 2 for stride in (4, 8, 16)],
            fpn_hidden_size=c.d_model, fpn_top_down_levels=list(c.fpn_top_down_levels)),
        prompt_encoder_config=Sam2PromptEncoderConfig(
            hidden_size=c.d_model, image_size=c.image_size, patch_size=16, mask_input_channels=c.mask_in_chans),
        mask_decoder_config=Sam2MaskDecoderConfig(
            hidden_size=c.d_model, mlp_dim=c.decoder_mlp_dim, num_hidden_layers=c.decoder_depth,
            num_attention_heads=c.decoder_num_heads, iou_head_hidden_dim=c.iou_head_hidden_dim,
            dynamic_multimask_stability_delta=c.dynamic_multimask_stability_delta,
            dynamic_multimask_stability_thresh=c.dynamic_multimask_stability_thresh))
    return Sam2Model._from_config(hf_config, attn_implementation="eager").eval()


def randomize_hf(model: nn.Module, seed: int) -> nn.Module:
    """Every transformers weight random (norm gains near 1, tokens and positions of unit scale)."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            noise = torch.randn(t.shape, generator=g)
            if id(t) in norms:
                t.copy_(1 + 0.1 * noise)
            elif id(t) in embeddings or name.endswith("positional_embedding"):
                t.copy_(noise)
            elif name.endswith(("pos_embed", "pos_embed_window", "no_memory_embedding")):
                t.copy_(0.5 * noise)
            elif t.dim() >= 2:
                t.copy_(noise / math.sqrt(t.numel() / t.shape[0]))
            else:
                t.copy_(0.1 * noise)
        # The released model has one Fourier matrix; transformers holds it twice.
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding)
    return model


def ours_from(hf: nn.Module, config: Sam2Config = TINY) -> Sam2:
    return load_sam2_state_dict(Sam2(config), sam2_state_dict_from_transformers(hf.state_dict())).eval()


@pytest.fixture(scope="module")
def models() -> tuple[Sam2, nn.Module]:
    hf = randomize_hf(hf_sam2(TINY), seed=7)
    return ours_from(hf), hf


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    frame = np.random.default_rng(3).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    return sam2_pixels(frame, resolution=TINY.image_size)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item()
    assert diff <= TOL, diff
    return diff


def hf_prompt(space: int = 224, resolution: int = TINY.image_size) -> dict[str, torch.Tensor]:
    """The same prompt in transformers' layout: points [1,1,3,2], labels [1,1,3], box [1,1,4]."""
    scale = resolution / space
    return {"input_points": torch.tensor([[POINTS]], dtype=torch.float32) * scale,
            "input_labels": torch.ones(1, 1, len(POINTS), dtype=torch.int64),
            "input_boxes": torch.tensor([[BOX]], dtype=torch.float32) * scale}


def hf_features(features: Sam2Features) -> list[torch.Tensor]:
    """transformers' image_embeddings: finest level first."""
    return [features.feat_s0, features.feat_s1, features.image_embed]


# --------------------------------------------------------------------------------------------
# transformers.Sam2Model parity


def test_image_features_match_transformers(models, pixels):
    ours, hf = models
    with torch.no_grad():
        features = ours.image_features(pixels)
        s0, s1, embed = hf.get_image_embeddings(pixels)
    g = TINY.image_embedding_size
    assert features.image_embed.shape == (1, TINY.d_model, g, g)
    assert features.feat_s0.shape == (1, TINY.d_model // 8, 4 * g, 4 * g)
    assert features.feat_s1.shape == (1, TINY.d_model // 4, 2 * g, 2 * g)
    close(features.image_embed, embed)
    close(features.feat_s0, s0)
    close(features.feat_s1, s1)


def test_box_and_points_prompt_matches_transformers(models, pixels):
    ours, hf = models
    points, labels = sam2_prompt(BOX, POINTS, space=224, resolution=TINY.image_size)
    with torch.no_grad():
        features = ours.image_features(pixels)
        logits, iou, object_score = ours.predict(features, points, labels)
        ref = hf(image_embeddings=hf_features(features), multimask_output=False, **hf_prompt())
    assert logits.shape == (1, 1, TINY.low_res_size, TINY.low_res_size)
    close(logits, ref.pred_masks[:, 0])
    close(iou, ref.iou_scores[:, 0])
    close(object_score, ref.object_score_logits[:, 0])
    ours_mask, ref_mask = masks_at(logits), masks_at(ref.pred_masks[:, 0])
    assert ours_mask.shape == (1, 1, 224, 224) and ours_mask.dtype == torch.bool
    union = (ours_mask | ref_mask).sum().item()
    assert 0 < union < ours_mask.numel()  # a real mask, neither empty nor everything
    assert (ours_mask & ref_mask).sum().item() / union == 1.0


def test_one_image_serves_many_prompts(models, pixels):
    ours = models[0]
    box_only, corner_labels = sam2_prompt(BOX, [], resolution=TINY.image_size)
    clicks, click_labels = sam2_prompt(None, POINTS[:2], resolution=TINY.image_size)
    points, labels = torch.cat([box_only, clicks]), torch.cat([corner_labels, click_labels])  # 3 tokens each
    with torch.no_grad():
        features = ours.image_features(pixels)
        together = ours.predict(features, points, labels)
        alone = [ours.predict(features, points[i:i + 1], labels[i:i + 1]) for i in range(2)]
    for i, outputs in enumerate(alone):
        for batched, single in zip(together, outputs):
            close(batched[i:i + 1], single)
    assert not torch.equal(together[0][0], together[0][1])


@pytest.mark.parametrize("stable", [True, False], ids=["stable-single-mask", "unstable-falls-back"])
def test_dynamic_multimask_matches_transformers(models, pixels, stable):
    """Token 0's hypernetwork is set to a constant vector; on skip features shifted positive, a large one
    gives clear-cut logits (stable), a tiny one logits within +-delta (unstable: the best multimask wins)."""
    hf = copy.deepcopy(models[1])
    with torch.no_grad():
        head = hf.mask_decoder.output_hypernetworks_mlps[0].proj_out
        head.weight.zero_()
        head.bias.fill_(1.0 if stable else 1e-4)
    ours = ours_from(hf)
    points, labels = sam2_prompt(BOX, POINTS, space=224, resolution=TINY.image_size)
    with torch.no_grad():
        features = ours.image_features(pixels)
        features = features._replace(feat_s0=features.feat_s0 + 4.0)
        logits, iou, _ = ours.predict(features, points, labels)
        ref = hf(image_embeddings=hf_features(features), multimask_output=False, **hf_prompt())
        prompt = ours.sam_prompt_encoder
        all_logits, all_iou, _ = ours.sam_mask_decoder(features, prompt.dense_pe(), prompt.embed_points(points, labels),
                                                       prompt.no_mask_embed.weight.reshape(1, -1, 1, 1))
    single = all_logits[:, 0].flatten(1)
    stability = ((single > 0.05).sum() / (single > -0.05).sum()).item()
    assert (stability >= TINY.dynamic_multimask_stability_thresh) == stable, stability
    chosen = 0 if stable else 1 + all_iou[0, 1:].argmax().item()
    assert torch.equal(logits[:, 0], all_logits[:, chosen]) and torch.equal(iou[:, 0], all_iou[:, chosen])
    assert stable or not torch.equal(logits[:, 0], all_logits[:, 0])
    close(logits, ref.pred_masks[:, 0])
    close(iou, ref.iou_scores[:, 0])


def test_released_layout_matches_transformers_large():
    """sam2.1_hiera_large on the meta device: every transformers weight maps onto one of ours, same shape."""
    config = SAM2_PRESETS["sam2.1_hiera_large"]
    with torch.device("meta"):
        hf = hf_sam2(config)
        ours = Sam2(config)
    state = hf.state_dict()
    del state["shared_image_embedding.positional_embedding"]  # meta tensors cannot be compared with the copy
    converted = {k: tuple(v.shape) for k, v in sam2_state_dict_from_transformers(state).items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes["image_encoder.trunk.pos_embed"] == (1, 144, 7, 7)
    assert shapes["image_encoder.trunk.pos_embed_window"] == (1, 144, 8, 8)
    assert shapes["image_encoder.trunk.blocks.47.mlp.layers.1.weight"] == (1152, 4608)
    assert shapes["image_encoder.neck.convs.0.conv.weight"] == (256, 1152, 1, 1)
    assert shapes["image_encoder.neck.convs.3.conv.weight"] == (256, 144, 1, 1)
    assert shapes["sam_mask_decoder.conv_s0.weight"] == (32, 256, 1, 1)
    assert shapes["sam_mask_decoder.transformer.layers.1.mlp.layers.0.weight"] == (2048, 256)
    assert shapes["sam_mask_decoder.pred_obj_score_head.layers.2.weight"] == (1, 256)
    assert shapes["no_mem_embed"] == (1, 1, 256)
    assert round(sum(math.prod(s) for s in shapes.values()) / 1e6, 1) == 216.9  # 224.4 M with the video parts


# --------------------------------------------------------------------------------------------
# Front end


def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel bilinear resize of ``[H,W,C]`` float to ``size x size`` (edges clamped), in numpy."""
    def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, wy = taps(image.shape[0])
    x0, x1, wx = taps(image.shape[1])
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


@pytest.mark.parametrize("pre_size", [224, None], ids=["crabplus-lanczos-224", "direct"])
def test_sam2_pixels_match_reference(pre_size):
    frame = np.random.default_rng(0).integers(0, 256, (150, 100, 3), dtype=np.uint8)
    resized = frame if pre_size is None else np.asarray(Image.fromarray(frame).resize((224, 224), Image.LANCZOS))
    expected = (_bilinear_reference(resized.astype(np.float64) / 255, 1024) - SAM2_MEAN) / SAM2_STD
    pixels = sam2_pixels(frame, pre_size=pre_size)
    assert pixels.shape == (1, 3, 1024, 1024) and pixels.dtype == torch.float32
    assert np.abs(pixels[0].permute(1, 2, 0).numpy() - expected).max() < 1e-5
    assert torch.equal(sam2_pixels(Image.fromarray(frame), pre_size=pre_size), pixels)


def test_sam2_pixels_refuses_bad_frames():
    with pytest.raises(MediaError, match="uint8 RGB"):
        sam2_pixels(np.zeros((4, 4), np.uint8))
    with pytest.raises(MediaError, match="uint8 RGB"):
        sam2_pixels(np.zeros((4, 4, 3), np.float32))


def test_sam2_prompt_layout():
    points, labels = sam2_prompt(BOX, POINTS)
    assert labels.tolist() == [[2, 3, 1, 1, 1, -1]]
    expected = [[x * 1024 / 224, y * 1024 / 224] for x, y in [BOX[:2], BOX[2:], *POINTS]] + [[0.0, 0.0]]
    assert torch.allclose(points, torch.tensor([expected]), atol=1e-4)
    assert sam2_prompt(BOX, [])[1].tolist() == [[2, 3, -1]]
    points, labels = sam2_prompt(None, [(112, 56)], space=(224, 448))  # (height, width)
    assert labels.tolist() == [[1, -1]] and torch.allclose(points[0, 0], torch.tensor([256.0, 256.0]))
    with pytest.raises(OptionError, match="empty"):
        sam2_prompt(None, [])
    with pytest.raises(OptionError, match="four numbers"):
        sam2_prompt((1, 2, 3), [])


# --------------------------------------------------------------------------------------------
# Checkpoints and config


def test_load_released_layout_and_refusals(models, tmp_path):
    ours = models[0]
    released = dict(ours.state_dict())
    # What sam2.1_hiera_*.pt also holds: the video predictor's parts, to be dropped.
    released.update({"memory_attention.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
                     "maskmem_tpos_enc": torch.zeros(7, 1, 1, 64), "no_obj_ptr": torch.zeros(1, 32),
                     "obj_ptr_proj.layers.0.weight": torch.zeros(2, 2)})
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": released}, path)
    loaded = Sam2.from_checkpoint(path, preset="tiny")
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.state_dict().items())

    truncated = {k: v for k, v in released.items() if not k.startswith("sam_mask_decoder.")}
    with pytest.raises(CheckpointError, match=r"sam2_tiny\.pt: keys do not fit the tiny model \(missing \d+"):
        torch.save({"model": truncated}, path)
        Sam2.from_checkpoint(path, preset="tiny")
    with pytest.raises(CheckpointError, match="no_mem_embed has shape"):
        load_sam2_state_dict(Sam2(TINY), {**released, "no_mem_embed": torch.zeros(1, 1, 16)})
    with pytest.raises(CheckpointError, match="sam2_state_dict_from_transformers"):
        load_sam2_state_dict(Sam2(TINY), models[1].state_dict())
    with pytest.raises(CheckpointError, match="no such file"):
        Sam2.from_checkpoint(tmp_path / "absent.pt")


def test_config_and_presets():
    assert SAM2_PRESETS["sam2.1_hiera_large"] == Sam2Config()
    assert Sam2Config().backbone_channel_list == (1152, 576, 288, 144)
    assert (TINY.image_embedding_size, TINY.low_res_size) == (16, 64)
    assert round(sum(p.numel() for p in Sam2.from_preset("tiny", device="meta").parameters()) / 1e6, 2) == 0.35
    with pytest.raises(OptionError, match="expected one of"):
        sam2_config("hiera_l")
    with pytest.raises(OptionError, match="does not tile"):
        Sam2Config(window_spec=(6, 4, 16, 8))
    with pytest.raises(OptionError, match="do not divide"):
        Sam2Config(stage_heads=(5, 4, 8, 16))


# --------------------------------------------------------------------------------------------
# ONNX (about a minute: two dynamo exports)


class _Encoder(nn.Module):
    def __init__(self, sam: Sam2) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.sam.image_features(pixels))


class _Decoder(nn.Module):
    def __init__(self, sam: Sam2) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embed, feat_s0, feat_s1, points, labels) -> tuple[torch.Tensor, ...]:
        return self.sam.predict(Sam2Features(image_embed, feat_s0, feat_s1), points, labels)


@pytest.mark.slow
def test_onnx_export_round_trip(models, pixels, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    ours = models[0]
    points, labels = sam2_prompt(BOX, POINTS, space=224, resolution=TINY.image_size)
    with torch.no_grad():
        features = ours.image_features(pixels)
        expected = ours.predict(features, points, labels)
    runs = [(_Encoder(ours), (pixels,), ["pixels"], list(Sam2Features._fields), list(features)),
            (_Decoder(ours), (*features, points, labels), ["image_embed", "feat_s0", "feat_s1", "points", "labels"],
             ["low_res_logits", "iou", "object_score"], list(expected))]
    for i, (module, example, names, outputs, reference) in enumerate(runs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module.eval(), example, dynamo=True, input_names=names,
                                        output_names=outputs, opset_version=18, verbose=False)
        path = tmp_path / f"part{i}.onnx"
        program.save(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: t.numpy() for n, t in zip(names, example)})
        for a, b in zip(got, reference):
            close(torch.from_numpy(a), b)
