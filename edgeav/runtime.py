"""Runtime: load a model once, then ``run(source, task)`` -> :class:`Result`.

One run: decode the source (media) -> CLIP pixels and fbank (preprocess) ->
visual and audio tokens -> prompt embeddings -> generation -> parsed result,
and for mask tasks the mask decoder on the ``<mask_i>`` hidden states, resized
to the source.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.checkpoints import LoadedCrab, load_checkpoint, synthesize
from edgeav.errors import OptionError
from edgeav.generate import SAMPLING_PRESETS, Sampling, generate
from edgeav.media import open_source
from edgeav.media.windows import audio_windows
from edgeav.models.crab import VisualFeatures
from edgeav.preprocess import CLIP_SIZE, clip_pixels, crab_fbank_batch
from edgeav.tasks import Event, Task, get_task

log = logging.getLogger("edgeav")

STAGES = ("decode", "visual", "audio", "prefill", "decode_tokens", "mask")
# Seconds a mask task segments by default (CRAB_SPEC 4: S4/MS3 5-s clips, Ref-AVS and AVSS 10 s).
MASK_SECONDS = {"s4": 5, "ms3": 5, "refavs": 10, "avss": 10}


@dataclass
class Mask:
    """A mask at the source's size: bool [H, W] (binary tasks) or uint8 class ids (AVSS)."""

    time_s: float
    mask: np.ndarray
    text: str
    path: str | None = None

    def save_png(self, path: Path) -> None:
        from PIL import Image

        array = self.mask.astype(np.uint8) * 255 if self.mask.dtype == bool else self.mask
        Image.fromarray(array).save(path)
        self.path = str(path)


@dataclass
class Result:
    """What one run produced; ``to_dict`` gives the CLI's JSON."""

    task: str
    text: str
    events: list[Event] = field(default_factory=list)
    box: list[float] | None = None
    answer: str | None = None
    object_label: str | None = None
    masks: list[Mask] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_size: tuple[int, int] | None = None

    def save_masks(self, folder: str | Path) -> None:
        """Write each mask as ``mask_{time}s.png`` under ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for mask in self.masks:
            mask.save_png(folder / f"mask_{mask.time_s:06.2f}s.png")

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "text": self.text,
            "events": [e.to_dict() for e in self.events],
            "box": self.box,
            "answer": self.answer,
            "object_label": self.object_label,
            "masks": [{"time_s": m.time_s, "path": m.path, "text": m.text} for m in self.masks],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


class _Timer:
    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.ms[name] += (time.perf_counter() - self.start) * 1000

        return _Stage()


@dataclass
class _Inputs:
    """Decoded and preprocessed inputs of one source."""

    video_pixels: np.ndarray | None  # [F, 3, 224, 224]
    audio: dict[float | None, np.ndarray]  # [S, samples] per frame time (AVSS) or for the clip (key None)
    image_frames: dict[float, np.ndarray]  # second -> uint8 [224, 224, 3]
    source_size: tuple[int, int]  # (width, height)
    duration_s: float


class Runtime:
    """Crab on one device. Build with :meth:`from_checkpoint` or :meth:`from_preset`."""

    def __init__(self, loaded: LoadedCrab, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.loaded = loaded
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = loaded.model.to(self.device, dtype).eval()
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self._cache_len = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, preset: str | None = None, **options) -> "Runtime":
        return cls(load_checkpoint(path, preset), **options)

    @classmethod
    def from_preset(cls, name: str, *, random_weights: bool = False, seed: int = 0, **options) -> "Runtime":
        """A model of a named preset; only random weights exist for a bare preset (nothing is written to disk)."""
        if not random_weights:
            raise OptionError(f"preset {name!r} has no weights of its own; pass random_weights=True "
                              "(--random-weights) or a --checkpoint")
        return cls(synthesize(name, seed, options.get("dtype", torch.float32)), **options)

    @property
    def source(self) -> str:
        return self.loaded.source

    # -- one run ------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        source: str | Path,
        task: str = "ave",
        *,
        question: str | None = None,
        expression: str | None = None,
        sampling: str | Sampling = "greedy",
        max_new_tokens: int | None = None,
        at_seconds: Sequence[float] | None = None,
    ) -> Result:
        """Run ``task`` on ``source``.

        ``at_seconds`` picks the frames a mask task segments (default: every second of
        its clip) or the image ARIG grounds (default 0).
        """
        spec = get_task(task)
        spec.check_options(question=question, expression=expression)
        sampling = _sampling(sampling)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise OptionError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        timer = _Timer()
        with timer.stage("decode"):
            inputs = self._decode(source, spec, at_seconds)
        model = self.loaded.variant({1: "avs", 0: "joint"}.get(spec.mask_classes, "avss")).to(self.device, self.dtype)

        with timer.stage("visual"):
            video = self._encode_frames(inputs.video_pixels) if inputs.video_pixels is not None else None
            images = {t: self._encode_frames(clip_pixels(frame)) for t, frame in inputs.image_frames.items()}
        with timer.stage("audio"):
            audio = {t: model.encode_audio(self._tensor(crab_fbank_batch(w))).flatten(0, 1)
                     for t, w in inputs.audio.items()}

        blocks = {}
        if video is not None:
            blocks[self.tokenizer.token_id("<video>")] = video.tokens.flatten(0, 1)
        texts, masks = [], []
        frame_times = sorted(images) or [None]
        for frame_time in frame_times:
            blocks[self.tokenizer.token_id("<audio>")] = audio[frame_time if frame_time in audio else None]
            if frame_time is not None and "image" in spec.blocks:
                blocks[self.tokenizer.token_id("<image>")] = images[frame_time].tokens.flatten(0, 1)
            second = int(frame_time) if frame_time is not None and spec.name in ("s4", "ms3") else None
            instruction = spec.instruction(question=question, expression=expression, second=second)
            embeds = model.embed_prompt(self.tokenizer.encode_chat(instruction), blocks)
            limit = max_new_tokens or spec.max_new_tokens
            self._ensure_cache(embeds.shape[1] + limit)
            generation = generate(
                model.llm, embeds, max_new_tokens=limit, eos_id=self.tokenizer.eos_id,
                mask_token_ids=tuple(self.tokenizer.token_id(f"<mask_{i}>") for i in range(6)),
                n_mask_tokens=self.config.seg.num_mask_tokens, sampling=sampling,
            )
            timer.ms["prefill"] += generation.prefill_s * 1000
            timer.ms["decode_tokens"] += generation.decode_s * 1000
            text = self.tokenizer.decode(generation.token_ids)
            texts.append(text)
            if spec.mask_classes and frame_time is not None:
                if generation.mask_hidden is None:
                    log.info("%s at %.1f s: the model wrote no six <mask_i> tokens, so no mask", spec.name, frame_time)
                    continue
                with timer.stage("mask"):
                    logits = model.mask_logits(generation.mask_hidden, images[frame_time])
                    masks.append(Mask(frame_time, _mask_at_size(logits, inputs.source_size), text))

        parsed = spec.parse(texts[0], source_size=inputs.source_size)
        return Result(
            task=spec.name,
            text="\n".join(texts),
            events=list(parsed.events),
            box=None if parsed.box is None else list(parsed.box),
            answer=parsed.answer,
            object_label=parsed.object_label,
            masks=masks,
            timings_ms={stage: timer.ms.get(stage, 0.0) for stage in STAGES},
            source_size=inputs.source_size,
        )

    # -- stages -------------------------------------------------------------

    def _decode(self, source: str | Path, spec: Task, at_seconds: Sequence[float] | None) -> _Inputs:
        with open_source(source) as src:
            info = src.info
            size = (info.video.width, info.video.height)
            duration = info.duration_s or 0.0
            image_times = self._image_times(spec, at_seconds, duration)
            # AVSS hears the second of each frame it segments; every other task one plan for the clip.
            if spec.name == "avss":
                plans = {t: spec.plan_audio(frame_time_s=t) for t in image_times}
            else:
                plans = {None: spec.plan_audio(duration_s=duration or None)}
            audio_end = max(max(p.starts_s) + p.length_s for p in plans.values())
            frames, heard = [], []
            for segment in src.segments("clip", clip_frames=max(spec.video_frames, 1), frame_size=(CLIP_SIZE,) * 2):
                frames.extend(segment.frames)
                if segment.start_s < audio_end:
                    heard.append(segment)
        images = self._frames_at(source, image_times) if image_times else {}
        pixels = clip_pixels(np.stack(frames)) if spec.video_frames and frames else None
        if spec.video_frames and pixels is None:
            raise OptionError(f"{source}: no video frames could be decoded; task {spec.name!r} needs video")
        audio = {t: audio_windows(heard, plan) for t, plan in plans.items()}
        return _Inputs(pixels, audio, images, size, duration)

    @staticmethod
    def _image_times(spec: Task, at_seconds: Sequence[float] | None, duration: float) -> list[float]:
        if not spec.image_frame:
            if at_seconds:
                raise OptionError(f"task {spec.name!r} reads no single frame; --at applies to arig and mask tasks")
            return []
        last = max(duration - 1e-3, 0.0)
        if at_seconds:
            bad = [t for t in at_seconds if not 0 <= t <= last]
            if bad:
                raise OptionError(f"--at {bad[0]}: outside the source (0 to {last:.2f} s)")
            if spec.name in ("s4", "ms3") and max(at_seconds) >= MASK_SECONDS[spec.name]:
                raise OptionError(f"--at {max(at_seconds)}: task {spec.name!r} segments seconds 0 to 4 of its clip")
            return sorted(set(float(t) for t in at_seconds))
        if spec.name in MASK_SECONDS:
            return [float(t) for t in range(min(MASK_SECONDS[spec.name], max(int(np.ceil(duration)), 1)))]
        return [0.0]

    @staticmethod
    def _frames_at(source: str | Path, times: list[float]) -> dict[float, np.ndarray]:
        """The frame shown at each time (the stream policy's frame of that second)."""
        wanted = {int(t): t for t in times}
        found: dict[float, np.ndarray] = {}
        with open_source(source) as src:
            for segment in src.segments("stream", frame_size=(CLIP_SIZE,) * 2):
                if segment.index in wanted and segment.n_frames:
                    found[wanted[segment.index]] = segment.frames[0]
                if len(found) == len(wanted):
                    break
        missing = [t for t in times if t not in found]
        if missing:
            raise OptionError(f"{source}: no frame at {missing[0]} s; pick a time inside the video (--at)")
        return found

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, self.dtype)

    def _encode_frames(self, pixels: np.ndarray) -> VisualFeatures:
        return self.model.encode_frames(self._tensor(pixels))

    def _ensure_cache(self, length: int) -> None:
        if length > self._cache_len:
            length = min(max(length, 256), self.config.llm.max_seq_len)
            self.model.llm.setup_caches(1, length)
            self._cache_len = length


def _sampling(sampling: str | Sampling) -> Sampling:
    if isinstance(sampling, Sampling):
        return sampling
    if sampling not in SAMPLING_PRESETS:
        raise OptionError(f"unknown sampling {sampling!r}; expected one of {', '.join(SAMPLING_PRESETS)}")
    return SAMPLING_PRESETS[sampling]


def _mask_at_size(logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Logits [1, C, 224, 224] -> the mask at the source's (width, height)."""
    width, height = size
    resized = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    if resized.shape[0] == 1:
        return (resized[0].sigmoid() > 0.5).cpu().numpy()
    return resized.argmax(0).to(torch.uint8).cpu().numpy()
