"""SAM v1 component (edgeav.models.sam, edgeav.preprocess.sam) against two independent implementations.

Anchors, on the same random weights in fp32: the ``segment_anything`` package (the released code)
and ``transformers.SamModel``. Nothing is downloaded; the models are the tiny config of
ULLAVA_SPEC section 10 (ViT-H is built on the meta device only, to count parameters).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import sys
import types
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgeav.errors import CheckpointError, MediaError, OptionError
from edgeav.models.sam import SAM_PRESETS, LayerNorm2d, Sam, SamConfig, load_sam_state_dict, postprocess_masks
from edgeav.preprocess.sam import SAM_SIZE, sam_coords, sam_pixels, sam_resized_size

TOL = 1e-4
TINY = SAM_PRESETS["tiny"]
# 16 tokens a side in windows of 5: the last window is zero-padded, as ViT-H's 64 in windows of 14.
TINY_PADDED = dataclasses.replace(TINY, window_size=5)
# ViT-H's geometry (1024 pixels, 64x64 tokens, windows of 14, global block) at a tiny width.
THIN_VIT_H = dataclasses.replace(TINY, img_size=1024, window_size=14)


def _raise(*args, **kwargs):
    raise AssertionError("torchvision stub called: this test must not depend on torchvision")


@pytest.fixture(scope="module")
def sa():
    """``segment_anything``'s modeling classes and transforms.

    Its package ``__init__`` imports torchvision, which this environment lacks. transformers is
    imported first so that its own torchvision probe sees the truth; then empty stand-ins for the
    three torchvision modules segment_anything imports are put in sys.modules just while it is
    imported. Their functions raise if called: only the pure-torch model code is used.
    """
    import transformers  # noqa: F401

    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("torchvision") is None:
            stubs = {"torchvision": {}, "torchvision.transforms": {},
                     "torchvision.transforms.functional": {"resize": _raise, "to_pil_image": _raise},
                     "torchvision.ops": {}, "torchvision.ops.boxes": {"batched_nms": _raise, "box_area": _raise}}
            for name, attrs in stubs.items():
                module = types.ModuleType(name)
                for attr, value in attrs.items():
                    setattr(module, attr, value)
                mp.setitem(sys.modules, name, module)
        import segment_anything
        import segment_anything.modeling as modeling
        from segment_anything.utils.transforms import ResizeLongestSide
    return types.SimpleNamespace(modeling=modeling, build_sam_vit_h=segment_anything.build_sam_vit_h,
                                 ResizeLongestSide=ResizeLongestSide)


def reference_sam(sa, config: SamConfig) -> nn.Module:
    """segment_anything's ``Sam`` with ``config``'s sizes (as its registry builds ViT-H)."""
    m = sa.modeling
    grid = config.image_embedding_size
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=config.img_size, patch_size=config.patch_size, embed_dim=config.embed_dim,
            depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
            out_chans=config.out_chans, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=config.use_rel_pos, window_size=config.window_size,
            global_attn_indexes=config.global_attn_indexes),
        prompt_encoder=m.PromptEncoder(
            embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(config.img_size, config.img_size), mask_in_chans=config.mask_in_chans),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=m.TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                                            mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads,
                                            attention_downsample_rate=config.attention_downsample_rate),
            transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim),
    ).eval()


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every weight random (norm gains near 1, positions and tokens of unit scale), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(p) for mod in model.modules() if isinstance(mod, (nn.LayerNorm, LayerNorm2d))
             for p in (mod.weight,)}
    embeddings = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            noise = torch.randn(t.shape, generator=g)
            if id(t) in norms:
                t.copy_(1 + 0.1 * noise)
            elif id(t) in embeddings or name.endswith("gaussian_matrix"):
                t.copy_(noise)
            elif name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
                t.copy_(0.5 * noise)
            elif t.dim() >= 2:
                t.copy_(noise / math.sqrt(t.numel() / t.shape[0]))
            else:
                t.copy_(0.1 * noise)
    return model.eval()


def pair(sa, config: SamConfig = TINY, seed: int = 0) -> tuple[Sam, nn.Module]:
    ours = randomize(Sam(config), seed)
    ref = reference_sam(sa, config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    assert diff <= TOL, diff
    return diff


def points_prompt(seed: int, n: int, p: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    points = torch.rand((n, p, 2), generator=g) * (size - 1)
    labels = torch.randint(-1, 2, (n, p), generator=g)
    labels[:, 0] = 1  # at least one real point each
    return points, labels


# --------------------------------------------------------------------------------------------
# segment_anything parity


@pytest.mark.parametrize("config", [TINY, TINY_PADDED, THIN_VIT_H], ids=["tiny", "padded-windows", "vit-h-geometry"])
def test_image_embeddings_match_segment_anything(sa, config):
    ours, ref = pair(sa, config, seed=1)
    pixels = torch.randn(1, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours.encode_image(pixels)
        close(got, ref.image_encoder(pixels))
    grid = config.image_embedding_size
    assert got.shape == (1, config.out_chans, grid, grid)


def test_dense_pe_matches_segment_anything(sa):
    ours, ref = pair(sa, seed=3)
    with torch.no_grad():
        close(ours.dense_pe(), ref.prompt_encoder.get_dense_pe())


@pytest.mark.parametrize("config", [TINY, THIN_VIT_H], ids=["tiny", "vit-h-geometry"])
@pytest.mark.parametrize("multimask", [False, True])
def test_sparse_vector_prompt_matches_segment_anything(sa, multimask, config):
    """u-LLaVA's path: one projected [SEG] vector per mask, no padding point, no-mask dense map."""
    ours, ref = pair(sa, config, seed=4)
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(1, 3, config.img_size, config.img_size, generator=g)
    seg_vectors = torch.randn(3, 1, config.prompt_embed_dim, generator=g)
    with torch.no_grad():
        embeddings = ours.encode_image(pixels)
        sparse, dense = ours.prompt_embeddings(sparse=seg_vectors)
        assert sparse.shape == (3, 1, config.prompt_embed_dim)  # the vector alone: no padding point
        _, ref_dense = ref.prompt_encoder(points=None, boxes=None, masks=None)
        close(dense, ref_dense.expand(3, -1, -1, -1))
        logits, iou = ours.decode_masks(embeddings, sparse, dense, multimask_output=multimask)
        ref_logits, ref_iou = ref.mask_decoder(
            image_embeddings=ref.image_encoder(pixels), image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=seg_vectors, dense_prompt_embeddings=ref_dense.expand(3, -1, -1, -1),
            multimask_output=multimask)
    channels = 3 if multimask else 1
    assert logits.shape == (3, channels, config.low_res_size, config.low_res_size)
    close(logits, ref_logits)
    close(iou, ref_iou)
    # the prompts really differ, and each mask follows its own vector
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    with torch.no_grad():  # one embedding per prompt gives what one shared embedding gives
        per_prompt = ours.decode_masks(embeddings.expand(3, -1, -1, -1), sparse, dense, multimask_output=multimask)
    close(per_prompt[0], logits)


@pytest.mark.parametrize("prompt", ["points", "box", "points+box", "mask"])
@pytest.mark.parametrize("multimask", [False, True])
def test_point_box_mask_prompts_match_segment_anything(sa, prompt, multimask):
    ours, ref = pair(sa, seed=6)
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(1, 3, 256, 256, generator=g)
    n = 2
    points, labels = points_prompt(8, n, 3, 256)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [0.0, 0.0, 255.0, 255.0]])
    masks = torch.randn(n, 1, TINY.low_res_size, TINY.low_res_size, generator=g)
    kwargs = {"points": {"points": points, "labels": labels}, "box": {"boxes": boxes},
              "points+box": {"points": points, "labels": labels, "boxes": boxes},
              "mask": {"masks": masks}}[prompt]
    ref_points = (kwargs["points"], kwargs["labels"]) if "points" in kwargs else None
    with torch.no_grad():
        sparse, dense = ours.prompt_embeddings(**kwargs)
        ref_sparse, ref_dense = ref.prompt_encoder(points=ref_points, boxes=kwargs.get("boxes"),
                                                   masks=kwargs.get("masks"))
        close(sparse, ref_sparse)
        close(dense, ref_dense)
        embeddings = ours.encode_image(pixels)
        logits, iou = ours.decode_masks(embeddings, sparse, dense, multimask_output=multimask)
        ref_logits, ref_iou = ref.mask_decoder(
            image_embeddings=embeddings, image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=ref_sparse, dense_prompt_embeddings=ref_dense, multimask_output=multimask)
    close(logits, ref_logits)
    close(iou, ref_iou)
    expected_tokens = {"points": 4, "box": 2, "points+box": 5, "mask": 0}[prompt]  # 3 points + 1 pad / 2 corners
    assert sparse.shape == (n, expected_tokens, TINY.prompt_embed_dim)


def test_sparse_vectors_follow_point_tokens(sa):
    """A caller's sparse tokens come after the point tokens (LISA/u-LLaVA order)."""
    ours, ref = pair(sa, seed=9)
    points, labels = points_prompt(10, 2, 2, 256)
    extra = torch.randn(2, 1, TINY.prompt_embed_dim)
    with torch.no_grad():
        sparse, _ = ours.prompt_embeddings(points=points, labels=labels, sparse=extra)
        ref_sparse, _ = ref.prompt_encoder(points=(points, labels), boxes=None, masks=None)
    close(sparse, torch.cat([ref_sparse, extra], dim=1))


def test_end_to_end_matches_segment_anything_forward(sa):
    """Frame -> sam_pixels -> encoder -> point prompt -> decoder -> postprocess, against Sam.forward."""
    ours, ref = pair(sa, seed=11)
    frame = np.random.default_rng(12).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pixels, input_size = sam_pixels(frame, img_size=TINY.img_size)
    source_points = np.array([[[5.0, 7.0], [40.0, 30.0]]])
    labels = torch.tensor([[1, 0]])
    points = torch.from_numpy(sam_coords(source_points, frame.shape[:2], TINY.img_size))
    with torch.no_grad():
        embeddings = ours.encode_image(torch.from_numpy(pixels))
        sparse, dense = ours.prompt_embeddings(points=points, labels=labels)
        low_res, iou = ours.decode_masks(embeddings, sparse, dense, multimask_output=True)
        logits = ours.postprocess_masks(low_res, input_size, frame.shape[:2])
        resized = np.array(Image.fromarray(frame).resize(input_size[::-1], Image.BILINEAR))
        ref_points = sa.ResizeLongestSide(TINY.img_size).apply_coords(source_points, frame.shape[:2])
        (out,) = ref([{"image": torch.from_numpy(resized).permute(2, 0, 1).float(), "original_size": frame.shape[:2],
                       "point_coords": torch.from_numpy(ref_points).float(), "point_labels": labels}],
                     multimask_output=True)
    close(low_res, out["low_res_logits"])
    close(iou, out["iou_predictions"])
    assert logits.shape == (1, 3, 37, 53)
    decided = logits.abs() > 1e-3  # pixels whose sign a rounding difference cannot flip
    assert torch.equal((logits > ours.mask_threshold)[decided], out["masks"][decided])


@pytest.mark.parametrize("original_size", [(37, 53), (53, 37), (256, 256), (100, 1)])
def test_postprocess_matches_segment_anything(sa, original_size):
    _, ref = pair(sa, seed=13)
    low_res = torch.randn(2, 3, TINY.low_res_size, TINY.low_res_size, generator=torch.Generator().manual_seed(14))
    input_size = sam_resized_size(*original_size, img_size=TINY.img_size)
    got = postprocess_masks(low_res, input_size, original_size, img_size=TINY.img_size)
    assert got.shape == (2, 3, *original_size) and got.dtype == torch.float32
    close(got, ref.postprocess_masks(low_res, input_size, original_size))


def test_vit_h_has_the_released_layout_and_size(sa):
    """ViT-H on the meta device: same keys and shapes as segment_anything's registry builder."""
    with torch.device("meta"):
        ref = sa.build_sam_vit_h()
    ours = Sam.from_preset("vit_h", device="meta")
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert count(ours) == count(ref)
    assert count(ours.image_encoder) == count(ref.image_encoder)
    assert round(count(ref) / 1e6) == 641 and round(count(ref.image_encoder) / 1e6) == 637  # ULLAVA_SPEC 7


# --------------------------------------------------------------------------------------------
# transformers.SamModel parity (second anchor)

_HF_RENAMES = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"^vision_encoder\.blocks\.", "vision_encoder.layers."),
    (r"\.norm([1-4])\.", r".layer_norm\1."),
    (r"norm_final_attn", "layer_norm_final_attn"),
    (r"neck\.0\.", "neck.conv1."), (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."), (r"neck\.3\.", "neck.layer_norm2."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."), (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."), (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"point_embeddings\.", "point_embed."),
    (r"output_upscaling\.0\.", "upscale_conv1."), (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
    # three-layer MLPs: first, middle, last
    (r"(mlps\.\d+|prediction_head)\.layers\.0\.", r"\1.proj_in."),
    (r"(mlps\.\d+|prediction_head)\.layers\.1\.", r"\1.layers.0."),
    (r"(mlps\.\d+|prediction_head)\.layers\.2\.", r"\1.proj_out."),
]


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            out["shared_image_embedding.positional_embedding"] = value
            out["prompt_encoder.shared_embedding.positional_embedding"] = value
            continue
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def hf_pair():
    from transformers import SamConfig as HFConfig
    from transformers import SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    c = TINY
    config = HFConfig(
        vision_config=SamVisionConfig(
            hidden_size=c.embed_dim, output_channels=c.out_chans, num_hidden_layers=c.depth,
            num_attention_heads=c.num_heads, image_size=c.img_size, patch_size=c.patch_size,
            window_size=c.window_size, global_attn_indexes=list(c.global_attn_indexes), mlp_ratio=c.mlp_ratio,
            num_pos_feats=c.prompt_embed_dim // 2),  # the shared Fourier matrix has decoder width / 2 columns
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=c.prompt_embed_dim, image_size=c.img_size, patch_size=c.patch_size,
            mask_input_channels=c.mask_in_chans),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=c.prompt_embed_dim, mlp_dim=c.decoder_mlp_dim, num_hidden_layers=c.decoder_depth,
            num_attention_heads=c.decoder_num_heads, attention_downsample_rate=c.attention_downsample_rate,
            num_multimask_outputs=c.num_multimask_outputs, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim))
    hf = SamModel._from_config(config, attn_implementation="eager").eval()
    ours = randomize(Sam(c), seed=21)
    missing, unexpected = hf.load_state_dict(to_transformers(ours.state_dict()), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, hf


def test_image_embeddings_match_transformers(hf_pair):
    ours, hf = hf_pair
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        close(ours.encode_image(pixels), hf.get_image_embeddings(pixels))
        close(ours.dense_pe(), hf.get_image_wide_positional_embeddings())


@pytest.mark.parametrize("multimask", [False, True])
def test_sparse_vector_decoder_matches_transformers(hf_pair, multimask):
    ours, hf = hf_pair
    g = torch.Generator().manual_seed(23)
    pixels = torch.randn(1, 3, 256, 256, generator=g)
    seg_vectors = torch.randn(3, 1, TINY.prompt_embed_dim, generator=g)
    with torch.no_grad():
        embeddings = ours.encode_image(pixels)
        logits, iou = ours.decode_masks(embeddings, *ours.prompt_embeddings(sparse=seg_vectors),
                                        multimask_output=multimask)
        no_mask = hf.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, 16, 16)
        # transformers: [image batch, prompts per image, tokens, width]
        hf_logits, hf_iou = hf.mask_decoder(
            image_embeddings=hf.get_image_embeddings(pixels),
            image_positional_embeddings=hf.get_image_wide_positional_embeddings(),
            sparse_prompt_embeddings=seg_vectors[None], dense_prompt_embeddings=no_mask,
            multimask_output=multimask)[:2]
    close(logits, hf_logits[0])
    close(iou, hf_iou[0])


# --------------------------------------------------------------------------------------------
# Pre-processing


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 9), (300, 200), (1024, 768)])
@pytest.mark.parametrize("img_size", [SAM_SIZE, TINY.img_size])
def test_sam_pixels_match_resize_longest_side_and_preprocess(sa, shape, img_size):
    """Size from ResizeLongestSide, PIL bilinear (what its apply_image runs), Sam.preprocess normalising."""
    frame = np.random.default_rng(shape[0] * 7 + shape[1]).integers(0, 256, (*shape, 3), dtype=np.uint8)
    pixels, size = sam_pixels(frame, img_size=img_size)
    expected_size = sa.ResizeLongestSide.get_preprocess_shape(*shape, img_size)
    assert size == expected_size and max(size) == img_size
    resized = np.array(Image.fromarray(frame).resize(expected_size[::-1], Image.BILINEAR))
    ref = reference_sam(sa, TINY)
    ref_self = types.SimpleNamespace(pixel_mean=ref.pixel_mean, pixel_std=ref.pixel_std,
                                     image_encoder=types.SimpleNamespace(img_size=img_size))
    expected = sa.modeling.Sam.preprocess(ref_self, torch.from_numpy(resized).permute(2, 0, 1).float())
    assert pixels.shape == (1, 3, img_size, img_size) and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[0], expected.numpy())
    assert not pixels[0, :, size[0]:, :].any() and not pixels[0, :, :, size[1]:].any()  # zero padding


def test_sam_coords_match_resize_longest_side(sa):
    rng = np.random.default_rng(30)
    points = rng.uniform(0, 53, (2, 4, 2))
    boxes = rng.uniform(0, 37, (3, 4))
    rls = sa.ResizeLongestSide(SAM_SIZE)
    np.testing.assert_allclose(sam_coords(points, (37, 53)), rls.apply_coords(points, (37, 53)), rtol=1e-6)
    np.testing.assert_allclose(sam_coords(boxes, (37, 53)), rls.apply_boxes(boxes, (37, 53)), rtol=1e-6)


@pytest.mark.parametrize("frame", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8),
                                   np.zeros((0, 4, 3), np.uint8)], ids=["float", "gray", "empty"])
def test_sam_pixels_refuses_bad_frames(frame):
    with pytest.raises(MediaError, match="SAM"):
        sam_pixels(frame)


# --------------------------------------------------------------------------------------------
# Checkpoints and config


def test_checkpoint_round_trip_and_errors(tmp_path):
    ours = randomize(Sam(TINY), seed=40)
    state = ours.state_dict()
    path = tmp_path / "sam_tiny.pth"
    torch.save({"visual_model." + k: v for k, v in state.items()} | {"text_hidden_fcs.0.weight": torch.zeros(2)},
               path)
    loaded = Sam.from_checkpoint(path, "tiny", prefix="visual_model.")
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a file that saved the reference's pixel-norm buffers still loads
    torch.save(state | {"pixel_mean": torch.zeros(3, 1, 1), "pixel_std": torch.ones(3, 1, 1)}, path)
    Sam.from_checkpoint(path, "tiny")
    with pytest.raises(CheckpointError, match="do not fit the tiny"):
        load_sam_state_dict(Sam(TINY), {k: v for k, v in state.items() if "neck" not in k})
    with pytest.raises(CheckpointError, match="expects"):
        load_sam_state_dict(Sam(TINY), state | {"mask_decoder.iou_token.weight": torch.zeros(1, 3)})
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(state, tmp_path / "sam_tiny.safetensors")
    loaded = Sam.from_checkpoint(tmp_path / "sam_tiny.safetensors", "tiny")
    assert torch.equal(loaded.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        Sam.from_checkpoint(tmp_path / "tensor.pth", "tiny")
    with pytest.raises(CheckpointError, match="no such file"):
        Sam.from_checkpoint(tmp_path / "missing.pth", "tiny")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        Sam.from_checkpoint(tmp_path / "broken.pth", "tiny")


def test_config_and_presets():
    assert TINY.image_embedding_size == 16 and TINY.low_res_size == 64 and TINY.num_mask_tokens == 4
    vit_h = SAM_PRESETS["vit_h"]
    assert (vit_h.image_embedding_size, vit_h.mlp_dim, vit_h.global_attn_indexes) == (64, 5120, (7, 15, 23, 31))
    with pytest.raises(OptionError, match="expected one of"):
        Sam.from_preset("vit_x")
    with pytest.raises(OptionError, match="out_chans"):
        SamConfig(out_chans=128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        vit_h.depth = 3


def test_mismatched_prompt_batches_are_refused():
    ours = Sam(TINY)
    with pytest.raises(ValueError, match="batch sizes disagree"):
        ours.prompt_embeddings(sparse=torch.zeros(2, 1, 16), boxes=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="points and labels"):
        ours.prompt_embeddings(points=torch.zeros(1, 1, 2))


# --------------------------------------------------------------------------------------------
# ONNX


class SparsePromptDecoder(nn.Module):
    """What an exporter wraps: one image embedding + N sparse vectors -> N low-res masks and IoU."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    def forward(self, image_embeddings: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.sam.prompt_embeddings(sparse=sparse)
        return self.sam.decode_masks(image_embeddings, sparse, dense, multimask_output=False)


def _export(module: nn.Module, example: tuple, names: list[str], outputs: list[str], dynamic, path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), example, dynamo=True, input_names=names, output_names=outputs,
                                    dynamic_shapes=dynamic, opset_version=18, verbose=False)
    program.save(str(path))
    return path


def test_onnx_export_round_trip(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    ours = randomize(Sam(TINY_PADDED), seed=50)
    g = torch.Generator().manual_seed(51)
    batch = torch.export.Dim("batch", min=1, max=8)
    prompts = torch.export.Dim("prompts", min=1, max=64)
    encoder = _export(ours.image_encoder, (torch.randn(1, 3, 256, 256, generator=g),), ["pixels"],
                      ["image_embeddings"], ({0: batch},), tmp_path / "encoder.onnx")
    decoder = _export(SparsePromptDecoder(ours), (torch.randn(1, 16, 16, 16, generator=g),
                                                  torch.randn(2, 1, 16, generator=g)),
                      ["image_embeddings", "sparse"], ["low_res_logits", "iou"], (None, {0: prompts}),
                      tmp_path / "decoder.onnx")
    options = {"providers": ["CPUExecutionProvider"]}
    pixels = torch.randn(2, 3, 256, 256, generator=g)  # another batch size than exported with
    with torch.no_grad():
        embeddings = ours.encode_image(pixels)
    (onnx_embeddings,) = ort.InferenceSession(str(encoder), **options).run(None, {"pixels": pixels.numpy()})
    close(torch.from_numpy(onnx_embeddings), embeddings)
    seg_vectors = torch.randn(5, 1, 16, generator=g)
    with torch.no_grad():
        logits, iou = SparsePromptDecoder(ours)(embeddings[:1], seg_vectors)
    onnx_logits, onnx_iou = ort.InferenceSession(str(decoder), **options).run(
        None, {"image_embeddings": embeddings[:1].numpy(), "sparse": seg_vectors.numpy()})
    close(torch.from_numpy(onnx_logits), logits)
    close(torch.from_numpy(onnx_iou), iou)
