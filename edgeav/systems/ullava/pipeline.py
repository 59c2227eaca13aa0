"""u-LLaVA's run: the source's picture (or 8 frames of a video) -> CLIP with centre crop -> one Linear
-> the ``conv_sep2`` prompt -> Vicuna, greedy -> the answer; for mask tasks the state that produced
the last ``[SEG]`` -> ``text_hidden_fcs`` -> SAM on the whole picture -> a mask at the source's size;
for box tasks the mask's bounding box (GroundingDINO's pick among its boxes is not wired yet).

Stopping: the released config's end id is 1 and its keyword criterion never matches ``</s>``, so
the original runs to ``max_new_tokens``; this pipeline stops at ``</s>`` (id 2) and says so in the notes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeav.errors import MediaError, OptionError
from edgeav.fastpath import generate_fast
from edgeav.media import open_source, open_stills
from edgeav.media.source import is_url
from edgeav.media.stills import is_stills
from edgeav.preprocess.clip import clip_crop_pixels, clip_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.results import Mask, Result
from edgeav.sampling import Sampling, resolve_sampling
from edgeav.stages import StageTimer
from edgeav.systems.ullava.checkpoints import LoadedUllava
from edgeav.systems.ullava.config import chat_prompt
from edgeav.systems.ullava.tasks import Task, get_task, readable, tags

STAGES = ("decode", "visual", "prefill", "decode_tokens", "mask")
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

    def run(self, source: str | Path, task: str = "caption", *, question: str | None = None,
            expression: str | None = None, sampling: str | Sampling = "greedy", max_new_tokens: int | None = None,
            fps: float | None = None, **unused) -> Result:
        """Run ``task`` on an image, a folder of frames (a video at ``fps``) or a video file."""
        check_run(task, source=source, question=question, expression=expression, max_new_tokens=max_new_tokens,
                  **unused)
        spec = get_task(task)
        timer = StageTimer()
        with timer.stage("decode"):
            picture, video = self._decode(source, spec, fps)
        with torch.inference_mode():
            return self._answer(spec, picture, video, timer, question, expression, resolve_sampling(sampling),
                                max_new_tokens, str(source))

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

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, self.dtype)

    def _answer(self, spec: Task, picture: np.ndarray, video: np.ndarray | None, timer: StageTimer, question,
                expression, sampling: Sampling, max_new_tokens: int | None, source: str) -> Result:
        token = self.config.token_id
        notes: list[str] = []
        with timer.stage("visual"):
            if video is not None:
                tokens = self.model.encode_video(self._tensor(clip_pixels(video, self.config.vision.image_size)))
                placeholder, block = token("<video_patch>"), ("<vid_beg>", "<video_patch>", "</vid_end>")
                notes.append(f"{source} is read as a video: {len(video)} frames, {tokens.shape[0]} visual tokens")
            else:
                tokens = self.model.encode_image(self._tensor(clip_crop_pixels(picture, self.config.vision.image_size)))
                placeholder, block = token("<image_patch>"), ("<img_beg>", "<image_patch>", "</img_end>")
        instruction = spec.instruction(question=question, expression=expression, video=video is not None)
        # The image block goes first with a newline; a video block is appended to the message (ULLAVA_SPEC 4).
        media = "".join(block)
        message = f"{media}\n{instruction}" if video is None else f"{instruction}{media}"
        # As its scripts do: tokenizer(prompt).input_ids, the BOS id added, not written as "<s>" text.
        prompt_ids = self.tokenizer.encode(chat_prompt(message), add_special_tokens=True)
        embeds = self.model.embed_prompt(prompt_ids, {placeholder: tokens})
        limit = max_new_tokens or spec.max_new_tokens
        context = self.config.llm.max_seq_len
        if embeds.shape[1] >= context:
            raise OptionError(f"the prompt has {embeds.shape[1]} tokens; u-LLaVA's context is {context}: shorten "
                              f"the {spec.requires or 'prompt'}")
        llm = self.model.llm
        if embeds.shape[1] + limit > llm.max_seq_len:
            llm.setup_caches(1, min(max(embeds.shape[1] + limit, 256), context))
        seg = token("[SEG]")
        generation = generate_fast(llm, embeds, max_new_tokens=limit, eos_id=self.tokenizer.eos_id,
                                   mask_token_ids=(seg,) if "mask" in spec.outputs else (), n_mask_tokens=1,
                                   sampling=sampling, fast=self.device.type == "cuda")
        timer.ms["prefill"] += generation.prefill_s * 1000
        timer.ms["decode_tokens"] += generation.decode_s * 1000
        text = self.tokenizer.decode(generation.token_ids)
        if generation.stopped_by == "eos":
            notes.append(STOP_NOTE)
        elif generation.stopped_by == "max_new_tokens":
            notes.append(f"the answer was cut at {limit} new tokens (--max-new-tokens) before the model ended it")
        height, width = picture.shape[:2]
        masks, box = [], None
        if "mask" in spec.outputs:
            if generation.mask_hidden is None:
                notes.append("no mask: the model did not write [SEG]")
            else:
                with timer.stage("mask"):
                    pixels, resized = sam_pixels(picture, self.model.visual_model.config.img_size)
                    embedding = self.model.encode_sam(self._tensor(pixels))
                    logits = self.model.mask_logits(generation.mask_hidden.to(self.dtype), embedding, resized,
                                                    (height, width))
                    masks.append(Mask(0.0, (logits[0] > 0).cpu().numpy(), text))
        if "box" in spec.outputs and masks:
            box = _bounding_box(masks[0].mask)
            notes.append("the box is the mask's bounding box: GroundingDINO's boxes for the [tag] text are not "
                         "wired into u-LLaVA's run yet" if box is not None else "no box: the mask is empty")
        found = tags(text)
        return Result(task=spec.name, text=text, box=box, answer=readable(text) if spec.name in ("ask", "caption")
                      else None, object_label=found[-1] if found else None, masks=masks,
                      timings_ms={stage: timer.ms.get(stage, 0.0) for stage in STAGES}, source_size=(width, height),
                      notes=notes, model=self.source, source=source, frames={0.0: picture} if masks else {})


def _bounding_box(mask: np.ndarray) -> list[float] | None:
    """(x1, y1, x2, y2) of a boolean mask in source pixels; x2, y2 are the last covered pixel (as the
    authors' ``masks_to_boxes``)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]
