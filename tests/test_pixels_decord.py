"""Pixels as Crab's data loader makes them: decord resizes while decoding, then CLIPImageProcessor.

Crab (dataset/*.py) reads a clip with ``decord.VideoReader(uri, height=224, width=224)``,
takes ``vr.get_batch(indices)`` at ``arange(0, n, n / 10)``, and hands the frames as
PIL images to transformers' CLIPImageProcessor. edgeav's clip policy must give the same
bytes, and clip_pixels the same normalised values.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeav.bench import authors_way
from edgeav.media import open_source, synth
from edgeav.preprocess.clip import CLIP_STD, clip_pixels

decord = pytest.importorskip("decord")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

# Sharp saturated edges at every angle: where scalers differ most.
SHAPES = (
    synth.Shape("rect", (250, 10, 10), 0.21, (0.15, 0.3), (0.85, 0.35)),
    synth.Shape("circle", (10, 240, 60), 0.17, (0.8, 0.7), (0.25, 0.6)),
    synth.Shape("rect", (20, 40, 250), 0.09, (0.5, 0.15), (0.45, 0.9)),
    synth.Shape("circle", (255, 255, 255), 0.05, (0.1, 0.9), (0.9, 0.1)),
)

CLIPS = {
    "h264 320x240": dict(name="a.mp4", width=320, height=240),
    "h264 400x176": dict(name="b.mp4", width=400, height=176),
    "mpeg4 320x240": dict(name="c.avi", width=320, height=240),
    "h264 rotated 90": dict(name="d.mp4", width=320, height=240, rotation=90),
    "h264 rotated 180": dict(name="e.mp4", width=192, height=144, rotation=180),
}


@pytest.fixture(scope="module")
def clip_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decord")
    paths = {}
    for case, options in CLIPS.items():
        options = dict(options)
        path = folder / options.pop("name")
        # 23 frames: Crab's float step truncates to uneven indices 0, 2, 4, 6, 9, ...
        synth.write_clip(path, duration_s=2.3, fps=10.0, shapes=SHAPES, bit_rate=2_000_000, audio=False, **options)
        paths[case] = path
    return paths


def crab_frames(path, size: int | None = 224) -> np.ndarray:
    """The authors' frames: decord resizing while decoding, at Crab's sampled indices."""
    return authors_way.video_frames(path, 10, size)


def edgeav_frames(path, size: int | None = 224) -> np.ndarray:
    with open_source(path) as src:
        frames = [frame for segment in src.segments("clip", frame_size=(size, size) if size else None)
                  for frame in segment.frames]
    return np.stack(frames)


@pytest.mark.parametrize("case", list(CLIPS))
def test_decoded_frames_match_decord_byte_for_byte(clip_paths, case):
    reference, ours = crab_frames(clip_paths[case]), edgeav_frames(clip_paths[case])
    assert ours.shape == reference.shape == (10, 224, 224, 3)
    assert reference.std() > 30  # real content, not two blank arrays
    diff = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert diff.max() <= 1, f"{case}: max {diff.max()} levels, {np.mean(diff > 0):.2%} of values differ"


def test_frames_at_the_source_size_match_decord(clip_paths):
    path = clip_paths["h264 rotated 90"]
    reference, ours = crab_frames(path, None), edgeav_frames(path, None)
    assert ours.shape == reference.shape == (10, 320, 240, 3)  # upright, as the display matrix says
    assert np.abs(ours.astype(np.int16) - reference.astype(np.int16)).max() <= 1


@pytest.mark.parametrize("case", ["h264 400x176", "mpeg4 320x240"])
def test_normalised_pixels_match_clip_image_processor(clip_paths, case):
    reference_frames = crab_frames(clip_paths[case])
    reference = authors_way.clip_processor().preprocess([Image.fromarray(f) for f in reference_frames],
                                            return_tensors="np")["pixel_values"]
    ours = clip_pixels(edgeav_frames(clip_paths[case]))
    assert ours.shape == reference.shape == (10, 3, 224, 224)
    assert np.abs(ours - reference).max() <= 1 / 255 / min(CLIP_STD) + 1e-6
