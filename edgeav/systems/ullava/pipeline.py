"""u-LLaVA's run: the source's picture (or 8 frames of a video) -> CLIP with centre crop -> one Linear
-> the ``conv_sep2`` prompt -> Vicuna, greedy -> the answer; for mask tasks the state that produced
the last ``[SEG]`` -> ``text_hidden_fcs`` -> SAM on the whole picture -> a mask at the source's size;
for box tasks GroundingDINO on the last ``[tag]...[/tag]`` text of the answer, keeping the box that best
overlaps the mask's bounding box (the mask's box when it finds none), as the authors' REC evaluation does.

Stopping: the released config's end id is 1 and its keyword criterion never matches ``</s>``, so
the original runs to ``max_new_tokens``; this pipeline stops at ``</s>`` (id 2) and says so in the notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgeav.errors import MediaError, OptionError
from edgeav.fastpath import generate_fast
from edgeav.decoding import ensure_cache
from edgeav.media import open_source, open_stills
from edgeav.media.source import is_url
from edgeav.media.windows import check_window
from edgeav.media.stills import is_stills
from edgeav.models.sam import sam_config
from edgeav.preprocess.clip import clip_crop_pixels, clip_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.metrics import box_iou, mask_box
from edgeav.models.grounding_dino import detect
from edgeav.preprocess.grounding_dino import grounding_dino_pixels
from edgeav.results import Detection, Mask, Result
from edgeav.sampling import Sampling, resolve_sampling
from edgeav.stages import StageTimer
from edgeav.grounding_files import GROUNDING_FILE
from edgeav.systems.ullava.checkpoints import LoadedUllava
from edgeav.systems.ullava.config import VIDEO_FRAMES, prompt_ids
from edgeav.systems.ullava.tasks import Task, get_task, readable, tags

STAGES = ("decode", "visual", "prefill", "decode_tokens", "mask", "boxes")
STOP_NOTE = ("stopped at </s> (id 2); the released u-LLaVA never stops there (its config's end id is 1) and runs "
             "to max_new_tokens")


def check_run(task: str, *, source=None, question=None, expression=None, max_new_tokens=None, at_seconds=None,
              audio=None, fps=None, silent_audio=False) -> None:
    """What a u-LLaVA run cannot take, refused before any model loads."""
    spec = get_task(task)
    spec.check_options(question=question, expression=expression)
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise OptionError(f"max_new_tokens (--max-new-tokens) {max_new_tokens!r}: give a whole number >= 1")
    for name, value in (("--at", at_seconds), ("--audio", audio)):
        if value:
            raise OptionError(f"{name}: u-LLaVA reads no audio and segments the source's first frame; drop {name}")
    if silent_audio:
        raise OptionError("--silent-audio: u-LLaVA hears nothing; drop it")
    if source is not None and not is_url(str(source)) and not Path(source).exists():
        raise MediaError(f"{source}: no such file or folder; check the path")


def check_stream(task: str, *, window: int | None, stride: int, question: str | None = None,
                 expression: str | None = None, max_new_tokens: int | None = None) -> tuple[Task, int]:
    """A stream's options, checked before any media is read -> the task and its window (default: 8 s, one
    frame a second, for the video tasks; 1 s for the picture tasks)."""
    spec = get_task(task)
    check_run(task, question=question, expression=expression, max_new_tokens=max_new_tokens)
    window = (VIDEO_FRAMES if spec.video else 1) if window is None else window
    check_window(window, stride)
    return spec, window


class UllavaPipeline:
    """u-LLaVA on one device (the PyTorch reference)."""

    def __init__(self, engine: LoadedUllava, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 llm_weights: str | None = None) -> None:
        if llm_weights is not None:
            raise OptionError("--llm-weights is not built for u-LLaVA yet; drop it")
        self.device = torch.device(device)
        self.dtype = dtype
        self.engine = engine.to(self.device, dtype)
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        self.model = engine.model

    @property
    def source(self) -> str:
        return self.engine.source

    def run(self, source: str | Path, task: str = "caption", **options) -> Result:
        """Run ``task`` on an image, a folder of frames (a video at ``fps``) or a video file: :meth:`prepare`,
        then the model."""
        return self.prepare(source, task, **options)()

    def prepare(self, source: str | Path, task: str = "caption", *, question: str | None = None,
                expression: str | None = None, sampling: str | Sampling = "greedy",
                max_new_tokens: int | None = None, fps: float | None = None, **unused) -> Callable[[], Result]:
        """Check the options and decode ``source``; calling what comes back runs the model (a batch decodes
        the next item meanwhile)."""
        check_run(task, source=source, question=question, expression=expression, max_new_tokens=max_new_tokens,
                  **unused)
        spec = get_task(task)
        timer = StageTimer()
        with timer.stage("decode"):
            picture, video = self._decode(source, spec, fps)

        def answer() -> Result:
            with torch.inference_mode():
                return self.answer(spec, picture, video, timer, question=question, expression=expression,
                                   sampling=sampling, max_new_tokens=max_new_tokens, source=str(source))
        return answer

    def _decode(self, source, spec: Task, fps: float | None) -> tuple[np.ndarray, np.ndarray | None]:
        """-> (the picture at the source's size, the video's frames at CLIP size or None)."""
        size = self.config.vision.image_size
        frames = self.config.video_frames
        if is_stills(source):
            stills = open_stills(source, fps)
            picture = stills.frame(0)
            if not stills.is_folder or not spec.video:
                return picture, None
            indices = [int(i * stills.n_frames / frames) for i in range(frames)]
            return picture, np.stack([stills.frame(i, (size, size)) for i in indices])
        with open_source(source) as src:
            if src.info.video is None:
                raise MediaError(f"{source}: has no video track; u-LLaVA needs an image or a video")
            first = next(src.segments("clip", clip_frames=1), None)
        if first is None or not len(first.frames):
            raise MediaError(f"{source}: no video frame could be decoded; check the file")
        picture = first.frames[0]
        if not spec.video:
            return picture, None
        with open_source(source) as src:
            clip = [f for segment in src.segments("clip", clip_frames=frames, frame_size=(size, size))
                    for f in segment.frames]
        return picture, np.stack(clip)

    def stream_stages(self, spec: Task, **options):
        """The encode and llm stages a :class:`edgeav.stream.Stream` runs for ``spec``."""
        from edgeav.systems.ullava.stream import UllavaStreamStages

        return UllavaStreamStages(self, spec, **options)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, self.dtype)

    def answer(self, spec: Task, picture: np.ndarray, video: np.ndarray | None, timer: StageTimer, *,
               question: str | None = None, expression: str | None = None, sampling: str | Sampling = "greedy",
               max_new_tokens: int | None = None, source: str | None = None, frame_s: float = 0.0) -> Result:
        """Encode, prompt, generate and parse: ``picture`` is the source-size frame (CLIP's input for image
        tasks, SAM's for masks), ``video`` the frames at CLIP size when the task reads a video (else None).
        ``frame_s`` is the source time of ``picture`` (a stream window's frame)."""
        sampling = resolve_sampling(sampling)
        token = self.config.token_id
        notes: list[str] = []
        with timer.stage("visual"):
            if video is not None:
                tokens = self.model.encode_video(self._tensor(clip_pixels(video, self.config.vision.image_size)))
                notes.append(f"{source or 'the window'} is read as a video: {len(video)} frames, "
                             f"{tokens.shape[0]} visual tokens")
            else:
                tokens = self.model.encode_image(self._tensor(clip_crop_pixels(picture, self.config.vision.image_size)))
        placeholder = token("<video_patch>" if video is not None else "<image_patch>")
        instruction = spec.instruction(question=question, expression=expression, video=video is not None)
        ids = prompt_ids(self.tokenizer, instruction, video=video is not None)
        embeds = self.model.embed_prompt(ids, {placeholder: tokens})
        limit = max_new_tokens or spec.max_new_tokens
        context = self.config.llm.max_seq_len
        if embeds.shape[1] >= context:
            raise OptionError(f"the prompt has {embeds.shape[1]} tokens; u-LLaVA's context is {context}: shorten "
                              f"the {spec.requires or 'prompt'}")
        llm = self.model.llm
        ensure_cache(llm, embeds.shape[1] + limit, context)
        # Every [SEG] gets its mask; no loop detection: the original stops at the token limit only.
        generation = generate_fast(llm, embeds, max_new_tokens=limit, eos_id=self.tokenizer.eos_id,
                                   mask_token_ids=(token("[SEG]"),) if "mask" in spec.outputs else (),
                                   n_mask_tokens=None, sampling=sampling, stop_repeats=False,
                                   fast=self.device.type == "cuda")
        timer.ms["prefill"] += generation.prefill_s * 1000
        timer.ms["decode_tokens"] += generation.decode_s * 1000
        text = self.tokenizer.decode(generation.token_ids)
        if generation.stopped_by == "eos":
            notes.append(STOP_NOTE)
        elif len(generation.token_ids) < limit:
            notes.append(f"the answer was cut where u-LLaVA's {context}-token context ends")
        else:
            notes.append(f"the answer was cut at {limit} new tokens (--max-new-tokens) before the model ended it")
        height, width = picture.shape[:2]
        masks = []
        if "mask" in spec.outputs:
            if generation.mask_hidden is None:
                notes.append("no mask: the model did not write [SEG]")
            else:
                with timer.stage("mask"):
                    pixels, resized = sam_pixels(picture, sam_config(self.config.sam).img_size)
                    embedding = self.model.encode_sam(self._tensor(pixels))
                    logits = self.model.mask_logits(generation.mask_hidden.to(self.dtype), embedding, resized,
                                                    (height, width))
                    masks += [Mask(frame_s, (one > 0).cpu().numpy(), text) for one in logits]
        found = tags(text)
        box, detections = None, []
        if "box" in spec.outputs:
            with timer.stage("boxes"):
                box, detections = self._boxes(picture, found[-1] if found else None, masks, notes)
        return Result(task=spec.name, text=text, box=box, answer=readable(text) if spec.name in ("ask", "caption")
                      else None, object_label=found[-1] if found else None, masks=masks,
                      detections=detections if spec.name == "ground" else [],
                      timings_ms={stage: timer.ms.get(stage, 0.0) for stage in STAGES}, source_size=(width, height),
                      notes=notes, model=self.source, source=source,
                      frames={frame_s: picture} if spec.outputs else {})


    def _boxes(self, picture: np.ndarray, phrase: str | None, masks: list[Mask],
               notes: list[str]) -> tuple[list[float] | None, list[Detection]]:
        """GroundingDINO's boxes for ``phrase`` and the one that best overlaps the mask's bounding box."""
        found_box = mask_box(masks[0].mask) if masks else None
        mask_xyxy = None if found_box is None else list(found_box)
        detections: list[Detection] = []
        if self.engine.grounding is None:
            why = f"{self.source} holds no GroundingDINO ({GROUNDING_FILE} and its vocab.txt)"
        elif phrase is None:
            why = "the answer has no [tag]...[/tag] for GroundingDINO"
        else:
            detections = [_inside(d, picture.shape[1], picture.shape[0]) for d in self._detect(picture, phrase)]
            why = f"GroundingDINO found nothing for {phrase!r}"
        if detections and mask_xyxy is not None:
            # Ties (no box overlaps the mask) go to the higher score.
            best = max(detections, key=lambda d: (box_iou(list(d.box), mask_xyxy), d.score))
            return list(best.box), detections
        if detections:
            best = max(detections, key=lambda d: d.score)
            notes.append("no mask to match GroundingDINO's boxes against: the box is its best-scoring one")
            return list(best.box), detections
        notes.append(f"{why}: the box is the mask's bounding box" if mask_xyxy is not None
                     else f"no box: {why}, and there is no mask")
        return mask_xyxy, detections

    def _detect(self, picture: np.ndarray, phrase: str) -> list[Detection]:
        tokenizer, model = self.engine.grounding_tokenizer, self.engine.grounding
        short, longest = self.config.grounding_size
        pixels = grounding_dino_pixels(picture, short, longest)
        caption = tokenizer.encode(phrase)
        # fp32 pixels whatever the run's dtype: GroundingDINO stays fp32 (LoadedUllava.to), as an engine's graph
        tensors = [torch.from_numpy(a).to(self.device) for a in (pixels.pixel_values, pixels.pixel_mask,
                   caption.input_ids, caption.attention_mask, caption.token_type_ids)]
        logits, boxes = model(*tensors)
        return [Detection(tuple(found.box_xyxy), found.score, found.phrase)
                for found in detect(logits, boxes, caption.input_ids, pixels.image_size, tokenizer.decode)]


def _inside(detection: Detection, width: int, height: int) -> Detection:
    """The box cut to the picture (GroundingDINO's may reach past its edges), the label without BERT's markers."""
    x1, y1, x2, y2 = detection.box
    box = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    label = " ".join(w for w in detection.label.split() if w not in ("[CLS]", "[SEP]"))
    return Detection(box, detection.score, label)
