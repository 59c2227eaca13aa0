"""Crab+'s run (CRABPLUS_SPEC sections 1 and 5): the task's frames -> the windowed ViT, the task's
audio cut -> Whisper log-mel -> the audio tower, the Qwen chat template with each placeholder repeated
once per token -> the thinker with M-RoPE positions, greedy -> the answer; for S4, MS3 and Ref-AVS the
box and points it wrote -> SAM2 on the frame -> a mask at the source's size.

The thinker stops at ``<|im_end|>`` (spec section 7: assumed from the checkpoint's config) and its text
is decoded with special tokens skipped and stripped, as the authors' inference script does. SAM2 runs on
the frame resized to 224x224 (LANCZOS), as the authors' image predictor script reads it; its 224x224 mask
logits are resized bilinearly to the source's size and thresholded at 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.errors import MediaError, OptionError
from edgeav.decoding import ensure_cache
from edgeav.generate import generate
from edgeav.media import SAMPLE_RATE
from edgeav.media.open import check_audio_samples, check_media_options
from edgeav.media.source import is_url
from edgeav.media.windows import check_window
from edgeav.models.mrope import rope_positions
from edgeav.preprocess.qwen_vision import image_pixels, patchify, video_frame_pixels
from edgeav.preprocess.sam2 import sam2_pixels, sam2_prompt
from edgeav.preprocess.whisper_mel import log_mel
from edgeav.qwen_tokenizer import AUDIO, IMAGE, VIDEO, chat_ids
from edgeav.results import Mask, Result
from edgeav.sampling import Sampling, resolve_sampling
from edgeav.stages import StageTimer
from edgeav.systems import DEMO_CLIP
from edgeav.systems.crabplus.checkpoints import LoadedCrabPlus
from edgeav.systems.crabplus.inputs import ClipInputs, decode
from edgeav.qwen_thinker import PositionedLLM, position_blocks
from edgeav.systems.crabplus.tasks import CrabPlusTask, get_task, mask_prompt

STAGES = ("decode", "audio", "visual", "prefill", "decode_tokens", "mask")
MASK_SPACE = 224  # the grid the thinker writes boxes and points in, and SAM2's input frame


def check_run(task: str, *, source=None, question=None, expression=None, max_new_tokens=None, at_seconds=None,
              audio=None, fps=None, silent_audio=False) -> None:
    """What a Crab+ run cannot take, refused before any model loads."""
    spec = get_task(task)
    spec.check_options(question=question, expression=expression)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise OptionError(f"max_new_tokens (--max-new-tokens) {max_new_tokens!r}: give a whole number >= 1")
    _frame_index(spec, at_seconds)
    if source is not None and not is_url(str(source)) and not Path(source).exists():
        raise MediaError(f"{source}: no such file or folder; check the path")
    check_media_options(source if source is not None else DEMO_CLIP, audio=audio, fps=fps, silent_audio=silent_audio)
    if audio is not None:
        check_audio_samples(audio)


def check_stream(task: str, *, window: int | None, stride: int, question: str | None = None,
                 expression: str | None = None, max_new_tokens: int | None = None) -> tuple[CrabPlusTask, int]:
    """A stream's options, checked before any media is read -> the task and its window (default: the task's
    clip, as many seconds as it has units: 10 for AVE, 5 for S4)."""
    spec = get_task(task)
    check_run(task, question=question, expression=expression, max_new_tokens=max_new_tokens)
    if window is not None and spec.cuts_at_frame and window != spec.audio_units:
        raise OptionError(f"--window {window}: task {spec.name!r} hears one second of a {spec.audio_units}-s clip "
                          f"(the newest frame's); drop --window or pass {spec.audio_units}")
    window = spec.audio_units if window is None else window
    check_window(window, stride)
    return spec, window


def _frame_index(spec: CrabPlusTask, at_seconds) -> int:
    """The frame index an image task reads (default 0): ``--at i`` is frame ``i`` of the task's ``T``-unit
    clip, second ``i`` of AVSBench's 5-s clips; its audio is that unit. Video tasks take none."""
    if not at_seconds:
        return 0
    if not spec.reads_image:
        raise OptionError(f"--at: task {spec.name!r} reads the whole clip; only the image tasks (arig, s4, ms3, "
                          "refavs) read one second's frame")
    seconds = [int(t) for t in at_seconds]
    if len(seconds) != 1:
        raise OptionError(f"--at: Crab+ reads one frame per run; pass one second, not {len(seconds)}")
    if not 0 <= seconds[0] < spec.audio_units:
        raise OptionError(f"--at {seconds[0]}: task {spec.name!r} cuts its clip into {spec.audio_units} units (frames "
                          f"0 to {spec.audio_units - 1})")
    return seconds[0]


def build_prompt(model, config, tokenizer, spec: CrabPlusTask, inputs: ClipInputs, *, frame_index: int = 0,
                 question: str | None = None, expression: str | None = None, timer: StageTimer | None = None,
                 tensor=torch.from_numpy) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One clip's prompt as ``model`` (the reference or an engine) runs it: the task's audio cut through the
    audio tower, its frames through the ViT, the chat template with each placeholder once per token ->
    embeddings [1, L, D], M-RoPE positions [3, L] and the decode ``delta``. ``tensor`` puts arrays where
    the model runs; ``timer`` times the ``audio`` and ``visual`` stages."""
    timer = timer or StageTimer()
    with timer.stage("audio"):
        cut = spec.cut_audio(inputs.waveform, SAMPLE_RATE, frame_index=frame_index if spec.cuts_at_frame else None)
        audio_tokens = model.encode_audio(tensor(log_mel(cut)))
    with timer.stage("visual"):
        frames = image_pixels(inputs.picture)[None] if spec.reads_image else video_frame_pixels(inputs.video)
        patches, grid = patchify(frames)
        vision_tokens = model.encode_vision(tensor(patches), grid)
    counts = {"audio": audio_tokens.shape[0], "image": vision_tokens.shape[0], "video": vision_tokens.shape[0]}
    parts = [(kind, counts.get(kind, value)) for kind, value in spec.parts(question=question, expression=expression)]
    ids = chat_ids(tokenizer, parts)
    embeds = model.embed_prompt(ids, {IMAGE if spec.reads_image else VIDEO: vision_tokens, AUDIO: audio_tokens})
    positions, delta = rope_positions(position_blocks(ids, grid, config.seconds_per_slice),
                                      tokens_per_second=config.tokens_per_second)
    return embeds, positions, delta


class CrabPlusPipeline:
    """Crab+ on one device (the PyTorch reference)."""

    def __init__(self, engine: LoadedCrabPlus, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 llm_weights: str | None = None) -> None:
        if llm_weights is not None:
            raise OptionError("--llm-weights is not built for Crab+ yet; drop it")
        self.device = torch.device(device)
        self.dtype = dtype
        self.engine = engine.to(self.device, dtype)
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model = engine.model

    @property
    def source(self) -> str:
        return self.engine.source

    def run(self, source: str | Path, task: str = "ave", **options) -> Result:
        """Run ``task`` on a video, an image or a folder of frames: :meth:`prepare`, then the model."""
        return self.prepare(source, task, **options)()

    def prepare(self, source: str | Path, task: str = "ave", *, question: str | None = None,
                expression: str | None = None, sampling: str | Sampling = "greedy",
                max_new_tokens: int | None = None, at_seconds=None, audio=None, fps: float | None = None,
                silent_audio: bool = False) -> Callable[[], Result]:
        """Check the options and decode ``source`` (with ``audio``, or silence); calling what comes back runs
        the model (a batch decodes the next item meanwhile)."""
        check_run(task, source=source, question=question, expression=expression, max_new_tokens=max_new_tokens,
                  at_seconds=at_seconds)
        spec = get_task(task)
        at = _frame_index(spec, at_seconds)
        timer = StageTimer()
        with timer.stage("decode"):
            inputs = decode(source, video_frames=spec.video_frames or None, at_fraction=at / spec.audio_units,
                            audio=audio, fps=fps, silent_audio=silent_audio)

        def answer() -> Result:
            with torch.inference_mode():
                return self.answer(spec, inputs, timer, frame_index=at, question=question, expression=expression,
                                   sampling=sampling, max_new_tokens=max_new_tokens, source=str(source))
        return answer

    def stream_stages(self, spec: CrabPlusTask, **options):
        """The encode and llm stages a :class:`edgeav.stream.Stream` runs for ``spec``."""
        from edgeav.systems.crabplus.stream import CrabPlusStreamStages

        return CrabPlusStreamStages(self, spec, **options)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    def answer(self, spec: CrabPlusTask, inputs: ClipInputs, timer: StageTimer, *, frame_index: int = 0,
               question: str | None = None, expression: str | None = None, sampling: str | Sampling = "greedy",
               max_new_tokens: int | None = None, source: str | None = None, clip_start_s: float = 0.0) -> Result:
        """Encode, prompt, generate, parse and (mask tasks) segment one decoded clip that starts at
        ``clip_start_s`` of the source (a stream's window)."""
        sampling = resolve_sampling(sampling)
        notes: list[str] = []
        if not inputs.heard:
            notes.append("the model heard silence: the source has no audio track, or --silent-audio")
        embeds, positions, delta = build_prompt(self.model, self.config, self.tokenizer, spec, inputs,
                                                frame_index=frame_index, question=question, expression=expression,
                                                timer=timer, tensor=self._tensor)
        limit = max_new_tokens or spec.max_new_tokens
        context = self.config.llm.max_seq_len
        if embeds.shape[1] >= context:
            raise OptionError(f"the prompt has {embeds.shape[1]} tokens; Crab+'s context is {context}: shorten the "
                              f"{spec.requires or 'prompt'}")
        ensure_cache(self.model.llm, embeds.shape[1] + limit, context)
        llm = PositionedLLM(self.model.llm, positions.to(self.device), delta)
        generation = generate(llm, embeds, max_new_tokens=limit, eos_id=self.config.llm.eos_id, sampling=sampling)
        timer.ms["prefill"] += generation.prefill_s * 1000
        timer.ms["decode_tokens"] += generation.decode_s * 1000
        text = self.tokenizer.decode(generation.token_ids, skip_special=True).strip()
        if generation.stopped_by == "max_new_tokens":
            notes.append(f"the answer was cut at {limit} new tokens (--max-new-tokens) before the model ended it")
        elif generation.stopped_by == "repetition":
            notes.append("the answer was cut where it began repeating itself")
        return self.read(spec, inputs, text, timer, notes=notes, source=source, clip_start_s=clip_start_s)

    def read(self, spec: CrabPlusTask, inputs: ClipInputs, text: str, timer: StageTimer, *,
             notes: list[str] | None = None, source: str | None = None, clip_start_s: float = 0.0) -> Result:
        """What the thinker wrote -> the result: parsed, and for the mask tasks the box and points it wrote
        -> SAM2 on the picture. Event times are written in the task's units of the clip (tenths of AVE's
        clip): they are read in units, then placed in the source's seconds."""
        notes = list(notes or [])
        height, width = inputs.picture.shape[:2]
        parsed = spec.parse(text, duration_s=spec.audio_units, source_size=(width, height),
                            classes=spec.classes or None)
        notes.extend(parsed.notes)
        unit_s = inputs.duration_s / spec.audio_units
        events = [dataclasses.replace(event, start_s=clip_start_s + event.start_s * unit_s,
                                      end_s=clip_start_s + event.end_s * unit_s) for event in parsed.events]
        masks = []
        if spec.output == "mask":
            prompt = mask_prompt(text, spec)
            if prompt is not None:
                with timer.stage("mask"):
                    masks.append(Mask(inputs.picture_s, self._mask(inputs.picture, prompt), text))
        return Result(task=spec.name, text=text, events=events,
                      box=None if parsed.box is None else list(parsed.box), answer=parsed.answer,
                      object_label=parsed.object_label, masks=masks,
                      timings_ms={stage: timer.ms.get(stage, 0.0) for stage in STAGES}, source_size=(width, height),
                      notes=notes, model=self.source, source=source,
                      frames={inputs.picture_s: inputs.picture} if spec.output in ("mask", "box") else {})

    def _mask(self, picture: np.ndarray, prompt) -> np.ndarray:
        """SAM2 prompted by the thinker's box and points -> bool [H, W] at the picture's size."""
        sam2 = self.model.sam2
        size = sam2.config.image_size
        features = sam2.image_features(sam2_pixels(picture, resolution=size).to(self.device, self.dtype))
        points, labels = sam2_prompt(prompt.box, list(prompt.points), space=MASK_SPACE, resolution=size)
        logits, _, _ = sam2.predict(features, points.to(self.device, self.dtype), labels.to(self.device))
        logits = F.interpolate(logits.float(), size=(MASK_SPACE, MASK_SPACE), mode="bilinear", align_corners=False)
        height, width = picture.shape[:2]
        at_source = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return (at_source[0, 0] > 0).cpu().numpy()
