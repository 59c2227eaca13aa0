"""Qwen2.5-VL vision front end and windowed ViT (edgeav.preprocess.qwen_vision, edgeav.models.qwen_vision).

Parity on the same inputs and random weights, fp32, against transformers' ``Qwen2VLImageProcessorPil``
and ``Qwen2_5OmniVisionEncoder`` (the tiny vision config of CRABPLUS_SPEC section 9).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from edgeav.errors import OptionError
from edgeav.models.qwen_vision import QwenVisionConfig, QwenVisionEncoder, vision_token_count
from edgeav.preprocess.qwen_vision import (
    frame_indices,
    image_pixels,
    patchify,
    video_frame_pixels,
    vision_grid,
)

TINY = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=112,
            fullatt_block_indexes=[1], out_hidden_size=64)


def _frames(count: int, height: int = 224, width: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def _processor() -> Qwen2VLImageProcessorPil:
    # min = max = 224*224 pixels: smart_resize keeps a 224x224 input as it is.
    return Qwen2VLImageProcessorPil(min_pixels=224 * 224, max_pixels=224 * 224)


# --- front end ----------------------------------------------------------------------------------


def test_image_patches_match_qwen2vl_image_processor():
    image = _frames(1)[0]
    reference = _processor()(images=[image], return_tensors="np")
    patches, grid = patchify(image_pixels(image))
    assert grid == tuple(reference["image_grid_thw"][0]) == (1, 16, 16)
    assert patches.shape == reference["pixel_values"].shape == (256, 1176)
    assert np.abs(patches - reference["pixel_values"]).max() <= 1e-4


@pytest.mark.parametrize(("count", "grid_t"), [(10, 5), (4, 2), (3, 2)])
def test_video_patches_hold_each_frame_where_the_processor_puts_it(count, grid_t):
    """transformers' video processor needs torchvision (absent here), so each frame goes through the image
    processor alone; its rows hold the frame at temporal index 0 of the (channel, frame, y, x) row layout
    that the Conv3d patch embed reads. Frame 2g+j must sit at index j of slice g, an odd count repeating
    the last frame."""
    frames = _frames(count, seed=count)
    reference = _processor()(images=list(frames), return_tensors="np")["pixel_values"]
    per_frame = reference.reshape(count, 256, 3, 2, 14, 14)[:, :, :, 0]
    patches, grid = patchify(frames)
    assert grid == (grid_t, 16, 16) == vision_grid(count)
    ours = patches.reshape(grid_t, 256, 3, 2, 14, 14)
    for g in range(grid_t):
        for j in range(2):
            source = min(2 * g + j, count - 1)
            assert np.abs(ours[g, :, :, j] - per_frame[source]).max() <= 1e-4


def _bicubic_aa_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] antialiased bicubic (a = -0.5, support widened by the downscale), half-pixel centres."""
    def kernel(x):
        x = np.abs(x)
        return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((x - 5) * x + 8) * x * -0.5 + 2, 0.0))

    scale = n_in / n_out
    support, stretch = 2.0 * max(scale, 1.0), 1.0 / max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = kernel((np.arange(lo, hi) - centre + 0.5) * stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


@pytest.mark.parametrize(("height", "width"), [(240, 320), (120, 100)])
def test_video_frames_resize_like_torchvision_on_uint8(height, width):
    """Reference: the separable antialiased bicubic torchvision runs on a uint8 video (in float64 here),
    then clamp and round. Values near x.5 may round apart (float32 vs float64): at most 1 level, rarely."""
    frames = _frames(2, height, width, seed=height)
    ours = video_frame_pixels(frames)
    assert ours.shape == (2, 224, 224, 3) and ours.dtype == np.uint8
    rows = np.einsum("oh,thwc->towc", _bicubic_aa_weights(height, 224), frames.astype(np.float64))
    resized = np.einsum("towc,pw->topc", rows, _bicubic_aa_weights(width, 224))
    diff = np.abs(ours.astype(np.int64) - np.clip(resized, 0, 255).round())
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_video_frames_already_224_are_left_as_they_are():
    frames = _frames(3)
    assert np.array_equal(video_frame_pixels(frames), frames)


def test_frame_indices_round_half_to_even_like_the_original():
    assert frame_indices(250, 10).tolist() == [0, 28, 55, 83, 111, 138, 166, 194, 221, 249]
    assert frame_indices(10, 3).tolist() == [0, 4, 9]  # 4.5 -> 4


def test_image_pixels_squash_to_224_and_put_transparency_on_white():
    rgba = np.zeros((100, 300, 4), np.uint8)  # fully transparent black
    out = image_pixels(Image.fromarray(rgba, "RGBA"))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and (out == 255).all()
    rgb = _frames(1, 150, 90)[0]
    assert np.array_equal(image_pixels(rgb), image_pixels(Image.fromarray(rgb)))


def test_patchify_refuses_frames_off_the_28_pixel_grid():
    with pytest.raises(OptionError, match="multiples of 28"):
        patchify(_frames(2, 224, 230))


# --- encoder ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders() -> tuple[Qwen2_5OmniVisionEncoder, QwenVisionEncoder]:
    """transformers' tower with every parameter randomised (norm weights too) and ours loaded from it by name."""
    reference = Qwen2_5OmniVisionEncoder(Qwen2_5OmniVisionEncoderConfig(**TINY)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if "norm" in name or "ln_q" in name else 0.1 * noise)
    ours = QwenVisionEncoder(QwenVisionConfig.from_hf(reference.config.to_dict())).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_parameter_names_and_shapes_equal_transformers(encoders):
    reference, ours = encoders
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert "blocks.1.attn.q.weight" in theirs and "patch_embed.proj.weight" in theirs


@pytest.mark.parametrize("grid", [(1, 16, 16), (5, 16, 16), (2, 12, 20)])
def test_encoder_matches_transformers(encoders, grid):
    """Image, 10-frame video, and a grid whose windows do not tile it (partial windows at the edges)."""
    reference, ours = encoders
    t, h, w = grid
    patches = torch.randn(t * h * w, 1176, generator=torch.Generator().manual_seed(t * h))
    with torch.no_grad():
        expected = reference(patches, grid_thw=torch.tensor([grid])).pooler_output
        got = ours(patches, grid)
    assert got.shape == expected.shape == (vision_token_count(grid), 64)
    assert (got - expected).abs().max().item() <= 1e-4


def test_no_block_attends_across_time(encoders):
    """Changing the second temporal slice leaves the first slice's tokens unchanged."""
    _, ours = encoders
    patches = torch.randn(2 * 256, 1176, generator=torch.Generator().manual_seed(5))
    changed = patches.clone()
    changed[256:] += 1.0
    with torch.no_grad():
        a, b = ours(patches, (2, 16, 16)), ours(changed, (2, 16, 16))
    assert torch.equal(a[:64], b[:64]) and not torch.allclose(a[64:], b[64:])


def test_encoder_refuses_patches_that_do_not_fit_the_grid(encoders):
    _, ours = encoders
    with pytest.raises(OptionError, match="do not fit grid"):
        ours(torch.zeros(256, 1176), (2, 16, 16))


# --- token counts and config --------------------------------------------------------------------


def test_token_counts_of_an_image_and_videos():
    assert vision_token_count(vision_grid(1)) == 64
    assert vision_token_count(vision_grid(10)) == 320
    assert vision_token_count(vision_grid(4)) == 128
    assert vision_token_count(vision_grid(20)) == 640


def test_default_config_is_the_released_tower():
    released = Qwen2_5OmniVisionEncoderConfig(hidden_size=1280, out_hidden_size=3584).to_dict()
    assert QwenVisionConfig.from_hf(released) == QwenVisionConfig()
    assert QwenVisionConfig().head_dim == 80 and QwenVisionConfig().patch_dim == 1176


def test_from_hf_refuses_another_activation():
    with pytest.raises(OptionError, match="hidden_act"):
        QwenVisionConfig.from_hf(dict(TINY, hidden_act="gelu"))
