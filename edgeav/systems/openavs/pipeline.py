"""OpenAVS's run (OPENAVS_SPEC section 1): per second of the source, its describers (Pengi with three
prompts; the thinker on the frame and the sound; or BEATs' AudioSet labels) -> the translator (none, a
local LLM, or an OpenAI-compatible server) -> object names -> GroundingDINO + SAM or SAM2 -> one mask at the
source's size, with the objects, the describers' texts and the boxes in the result.

Decisions the paper leaves open (OPENAVS_SPEC section 7), made here:
- Pengi decodes with its wrapper's example settings (beam 3, at most 30 tokens, temperature 1) on the
  second's audio tiled to 7 s; the thinker answers greedily with the Qwen2.5-Omni system prompt, at most
  :data:`DESCRIBE_TOKENS` tokens; a local translator greedily, at most :data:`TRANSLATE_TOKENS`, with the
  strategy's system prompt in the ChatML prompt: the thinker, or the Qwen2.5 text release that
  ``--translator-checkpoint`` names (loaded once per pipeline, on its device and dtype).
- Translator ``none``: the caption is Pengi's "Generate audio caption" text (the paper's most robust
  prompt), or the edge variant's labels.
- Edge: the labels whose probability is at least :data:`LABEL_THRESHOLD`, at most :data:`TOP_LABELS`,
  each AudioSet name cut at its first comma ("Male speech, man speaking" -> "male speech").
- A frame whose answer is missing or empty gets an empty mask and a note.
"""

from __future__ import annotations

import csv
import dataclasses
import threading
from functools import cache
from typing import Callable, NamedTuple
from pathlib import Path

import numpy as np
import torch

from edgeav.errors import MediaError, OptionError
from edgeav.media import SAMPLE_RATE
from edgeav.media.open import check_audio_samples, check_media_options
from edgeav.media.source import is_url
from edgeav.media.windows import check_window
from edgeav.preprocess.fbank import crab_fbank
from edgeav.preprocess.pengi_audio import pengi_waveform
from edgeav.qwen_text import QwenTextModel, check_text_checkpoint, load_text_model
from edgeav.qwen_tokenizer import QWEN_OMNI_SYSTEM
from edgeav.results import Description, Mask, Result
from edgeav.stages import StageTimer
from edgeav.systems import DEMO_CLIP
from edgeav.systems.openavs.checkpoints import LoadedOpenAVS
from edgeav.systems.openavs.inputs import Second, decode
from edgeav.systems.openavs.segment import BoxSegmenter
from edgeav.systems.openavs.tasks import TASK, VARIANTS, check_options
from edgeav.systems.openavs.translator import (
    PER_FRAME_STRATEGIES, FrameTexts, HttpTranslator, LocalTranslator, caption, check_endpoint, raw_caption,
    run_translation,
)

STAGES = ("decode", "describe_audio", "describe_image", "translate", "boxes", "mask")
PENGI_PROMPTS = ("This is a sound of", "Generate metadata", "Generate audio caption")
CAPTION_PROMPT = "Generate audio caption"
BEATS = "beats"  # the edge variant's describer label
IMAGE_PROMPT = "Please describe the image in detail"
AUDIO_PROMPT = "Please describe the audio in detail"
DESCRIBE_TOKENS = 96
TRANSLATE_TOKENS = 256
PENGI_BEAM, PENGI_MAX_TOKENS = 3, 30
TOP_LABELS, LABEL_THRESHOLD = 3, 0.1
LABELS_FILE = Path(__file__).resolve().parent / "data" / "audioset_labels.csv"


@cache
def audioset_labels() -> tuple[str, ...]:
    """AudioSet's 527 class names in the head's order (the ontology's display names)."""
    with LABELS_FILE.open(newline="", encoding="utf-8") as f:
        return tuple(row["display_name"] for row in csv.DictReader(f))


def check_run(task: str, *, source=None, question=None, expression=None, max_new_tokens=None, at_seconds=None,
              audio=None, fps=None, silent_audio=False, variant=None, translator=None, translator_url=None,
              translator_model=None, translator_checkpoint=None, segmenter=None) -> dict:
    """What an OpenAVS run cannot take, refused before any model loads; a ``--translator http`` endpoint is
    reached here, and a ``--translator-checkpoint`` folder's config.json and safetensors headers read, so
    either fails before the models load. Returns the cascade's options."""
    if task != TASK:
        raise OptionError(f"--task {task}: OpenAVS's task is {TASK}")
    for name, value in (("--question", question), ("--expression", expression), ("--at", at_seconds),
                        ("--max-new-tokens", max_new_tokens)):
        if value is not None and value != []:
            raise OptionError(f"{name}: OpenAVS segments every second it hears; drop {name}")
    options = check_options(variant=variant, translator=translator, translator_url=translator_url,
                            translator_model=translator_model, translator_checkpoint=translator_checkpoint,
                            segmenter=segmenter)
    if source is not None and not is_url(str(source)) and not Path(source).exists():
        raise MediaError(f"{source}: no such file or folder; check the path")
    check_media_options(source if source is not None else DEMO_CLIP, audio=audio, fps=fps, silent_audio=silent_audio)
    if audio is not None:
        check_audio_samples(audio)
    if options["translator"] == "http":
        check_endpoint(options["translator_url"])
    if options["translator_checkpoint"] is not None:
        check_text_checkpoint(options["translator_checkpoint"])
    return options


def check_stream(task: str, *, window: int | None, stride: int, question=None, expression=None,
                 max_new_tokens=None, **options) -> tuple[dict, int]:
    """A stream's options, checked before any media is read -> the cascade's options and the window
    (default 1 s: each second translated on its own)."""
    cascade = check_run(task, question=question, expression=expression, max_new_tokens=max_new_tokens, **options)
    window = 1 if window is None else window
    check_window(window, stride)
    return cascade, window


class Translation(NamedTuple):
    """What the translator made of some seconds."""

    captions: list[str | None]  # GroundingDINO's caption of each second; None: no object named
    objects: list[list[str]]  # the objects named for each second
    reply: str  # the translator's replies as written ("" without a translator)
    notes: list[str]  # what was off in the replies


def untranslated(frame: FrameTexts) -> tuple[str | None, list[str]]:
    """Translator ``none``: (GroundingDINO's caption or None, the objects) straight from one describer: the
    edge variant's labels, else Pengi's "Generate audio caption" text as one phrase."""
    texts = dict(frame.audio)
    if BEATS in texts:
        names = [name.strip() for name in texts[BEATS].split(",") if name.strip()]
        return (caption(names) if names else None), names
    text = texts.get(f"pengi: {CAPTION_PROMPT}", "").strip()
    return (raw_caption(text) if text else None), ([text] if text else [])


class OpenAVSPipeline:
    """The cascade on one device (the PyTorch reference)."""

    def __init__(self, engine: LoadedOpenAVS, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 llm_weights: str | None = None) -> None:
        if llm_weights is not None:
            raise OptionError("--llm-weights is not built for OpenAVS; drop it")
        self.device = torch.device(device)
        self.dtype = dtype
        self.engine = engine.to(self.device, dtype)
        self.config = engine.config
        self.tokenizer = engine.gpt2_tokenizer
        self.model = engine.model
        self.describe_tokens, self.translate_tokens = DESCRIBE_TOKENS, TRANSLATE_TOKENS  # the thinker's caps
        self._prompts = None  # Pengi's prompts as CLIP ids and mask, encoded once
        self._text_translator: tuple[Path, QwenTextModel] | None = None  # --translator-checkpoint's, by folder
        self._thinker_lock = threading.Lock()

    @property
    def source(self) -> str:
        return self.engine.source

    def run(self, source: str | Path, task: str = TASK, **options) -> Result:
        """Segment the sounding objects of every second of a video, an image or a folder of frames:
        :meth:`prepare`, then the models."""
        return self.prepare(source, task, **options)()

    def prepare(self, source: str | Path, task: str = TASK, *, question: str | None = None,
                expression: str | None = None, sampling: str = "greedy", max_new_tokens: int | None = None,
                at_seconds=None, audio=None, fps: float | None = None, silent_audio: bool = False,
                variant: str | None = None, translator: str | None = None, translator_url: str | None = None,
                translator_model: str | None = None, translator_checkpoint: str | Path | None = None,
                segmenter: str | None = None) -> Callable[[], Result]:
        """Check the options and decode ``source``; calling what comes back runs the cascade (a batch decodes
        the next item meanwhile). ``question``, ``expression``, ``max_new_tokens`` and ``at_seconds`` are
        other systems' options, refused when given; the describers decode as the paper's models do
        (``sampling`` greedy only)."""
        if sampling != "greedy":
            raise OptionError(f"--sampling {sampling}: OpenAVS decodes as its models do (Pengi's beam search, the "
                              "thinker greedy); drop --sampling")
        options = check_run(task, source=source, question=question, expression=expression,
                            max_new_tokens=max_new_tokens, at_seconds=at_seconds, audio=audio, fps=fps,
                            silent_audio=silent_audio, variant=variant, translator=translator,
                            translator_url=translator_url, translator_model=translator_model,
                            translator_checkpoint=translator_checkpoint, segmenter=segmenter)
        self.check_parts(options)
        self.load_translator(options)
        timer = StageTimer()
        with timer.stage("decode"):
            seconds, heard = decode(source, audio=audio, fps=fps, silent_audio=silent_audio)

        def answer() -> Result:
            with torch.inference_mode():
                for second in seconds:
                    second.texts = self.describe(second, options["variant"], timer)
                return self.answer(seconds, options, timer, heard=heard, source=str(source))
        return answer

    def check_parts(self, options: dict) -> None:
        """Refuse a variant, translator or segmenter whose model this checkpoint or engine does not hold."""
        model, variant = self.model, options["variant"]
        needs = {"thinker": variant in ("default", "large") or (options["translator"] == "local"
                                                                and options.get("translator_checkpoint") is None),
                 "beats": variant == "edge", "sam2": options["segmenter"] == "sam2"}
        why = {"thinker": "Qwen2.5-Omni thinker (qwen2.5-omni/)", "beats": "fine-tuned BEATs with its AudioSet head",
               "sam2": "SAM2.1 (sam2.1_hiera_large.pt)"}
        for part, needed in needs.items():
            if needed and getattr(model, part) is None:
                if getattr(self.engine, "backend", None) is None:  # a checkpoint
                    fix = "add it to the checkpoint folder or pick another option"
                else:  # an engine holds every part of the checkpoint it was exported from
                    fix = ("export a checkpoint that has it, run such a checkpoint (--checkpoint), or pick another "
                           "option")
                raise OptionError(f"{self.source} holds no {why[part]}, which --variant {variant} --translator "
                                  f"{options['translator']} --segmenter {options['segmenter']} needs; {fix}")

    def load_translator(self, options: dict) -> QwenTextModel | None:
        """The Qwen2.5 text model ``--translator-checkpoint`` names (None without one), loaded on the
        pipeline's device and dtype the first time and kept: one translator model at a time."""
        folder = options.get("translator_checkpoint")
        if folder is None:
            return None
        key = Path(folder).resolve()
        if self._text_translator is None or self._text_translator[0] != key:
            self._text_translator = None  # the model it held goes before the next one loads
            self._text_translator = (key, load_text_model(folder, device=self.device, dtype=self.dtype))
        return self._text_translator[1]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.dtype)

    # -- describers -----------------------------------------------------------------

    def describe(self, second: Second, variant: str, timer: StageTimer) -> FrameTexts:
        """The variant's describers on one second -> their texts, labelled by describer."""
        audio: list[tuple[str, str]] = []
        image: list[tuple[str, str]] = []
        with timer.stage("describe_audio"):
            if variant == "edge":
                audio.append((BEATS, ", ".join(self.labels(second.waveform))))
            else:
                audio += [(f"pengi: {prompt}", text) for prompt, text in zip(PENGI_PROMPTS, self.pengi(second.waveform))]
            if variant == "large":
                audio.append(("thinker: audio", self.thinker([("audio", 0), ("text", AUDIO_PROMPT)],
                                                             waveform=second.waveform)))
        if variant in ("default", "large"):
            with timer.stage("describe_image"):
                image.append(("thinker: image", self.thinker([("image", 0), ("text", IMAGE_PROMPT)],
                                                             picture=second.picture)))
        return FrameTexts(audio=audio, image=image)

    def pengi(self, waveform: np.ndarray) -> list[str]:
        """Pengi's text for each of :data:`PENGI_PROMPTS` on one second of audio (encoded once)."""
        pengi = self.model.pengi
        audio = self._tensor(pengi_waveform(waveform, SAMPLE_RATE))[None]
        if self._prompts is None:
            self._prompts = self.engine.clip_tokenizer.encode_prompts(list(PENGI_PROMPTS), pengi.config.enc_text_len)
        ids, mask = (t.to(self.device) for t in self._prompts)
        captions = pengi.describe(audio, ids, mask, beam_size=PENGI_BEAM, max_len=PENGI_MAX_TOKENS)
        return [self.engine.gpt2_tokenizer.decode(tokens).strip() for tokens in captions]

    def labels(self, waveform: np.ndarray) -> list[str]:
        """BEATs' AudioSet labels for one second: at most :data:`TOP_LABELS` at or above :data:`LABEL_THRESHOLD`."""
        fbank = self._tensor(crab_fbank(waveform))[None]
        probabilities = self.model.beats.classify(fbank)[0].float()
        names = audioset_labels()
        top = torch.topk(probabilities, min(TOP_LABELS, probabilities.numel()))
        return [names[i].split(",")[0].strip().lower() if i < len(names) else f"class {i}"
                for p, i in zip(top.values.tolist(), top.indices.tolist()) if p >= LABEL_THRESHOLD]

    def thinker(self, parts, *, system: str = QWEN_OMNI_SYSTEM, picture=None, waveform=None,
                max_new_tokens: int | None = None) -> str:
        """One thinker turn. A stream describes second t + 1 on its encode thread while its llm thread
        translates with the same thinker, whose KV cache (or engine binding) is one: turns take the lock."""
        with self._thinker_lock:
            text, _ = self.model.thinker.chat(self.engine.qwen_tokenizer, parts, system=system, picture=picture,
                                              waveform=waveform,
                                              max_new_tokens=max_new_tokens or self.describe_tokens)
        return text

    # -- translation and masks -------------------------------------------------------

    def translate(self, seconds: list[Second], options: dict, timer: StageTimer) -> Translation:
        """The seconds' texts -> GroundingDINO's caption and the objects of each second."""
        texts = [s.texts for s in seconds]
        if options["translator"] == "none":
            chosen = [untranslated(frame) for frame in texts]
            return Translation([phrase for phrase, _ in chosen], [names for _, names in chosen], "", [])
        if options["translator"] == "http":
            translator = HttpTranslator(options["translator_url"], model=options["translator_model"])
        elif (text_model := self.load_translator(options)) is not None:
            translator = LocalTranslator(lambda system, user: text_model.chat(
                system, user, max_new_tokens=self.translate_tokens)[0])
        else:
            translator = LocalTranslator(lambda system, user: self.thinker(
                [("text", user)], system=system, max_new_tokens=self.translate_tokens))
        with timer.stage("translate"):
            answers, notes, replies = run_translation(translator, texts, VARIANTS[options["variant"]][1])
        objects = [answer or [] for answer in answers]
        return Translation([caption(names) if names else None for names in objects], objects, "\n".join(replies), notes)

    def segmenter(self, segmenter: str) -> BoxSegmenter:
        model = self.model
        parts = {"sam": model.sam} if segmenter == "sam" else {"sam2": model.sam2}
        return BoxSegmenter(model.grounding, self.engine.grounding_tokenizer, self.config.grounding_size, **parts)

    def answer(self, seconds: list[Second], options: dict, timer: StageTimer, *, heard: bool = True,
               source: str | None = None, newest_only: bool = False) -> Result:
        """Described seconds -> translated, detected, segmented: one mask per second (``newest_only``: of the
        last second only, the others being the clip its translation reads, as a stream's window)."""
        notes = [] if heard else ["the describers heard silence: the source has no audio track, or --silent-audio"]
        targets = seconds[-1:] if newest_only else seconds
        # A per-clip strategy reads every second of the window; one call a frame needs only the targets.
        read = targets if VARIANTS[options["variant"]][1] in PER_FRAME_STRATEGIES else seconds
        translation = self.translate(read, options, timer)
        notes += translation.notes
        segmenter = self.segmenter(options["segmenter"])
        masks, detections = [], []
        kept = len(targets)
        for second, phrase, names in zip(targets, translation.captions[-kept:], translation.objects[-kept:]):
            height, width = second.picture.shape[:2]
            if phrase is None:
                notes.append(f"{second.time_s:g} s: no object named, so the mask is empty")
                masks.append(Mask(second.time_s, np.zeros((height, width), bool), ""))
                continue
            with timer.stage("boxes"):
                found = segmenter.boxes(second.picture, phrase)
            with timer.stage("mask"):
                per_box = segmenter.masks(second.picture, [d.box for d in found])
            if not found:
                notes.append(f"{second.time_s:g} s: GroundingDINO found nothing for {phrase!r}, so the mask is empty")
            masks.append(Mask(second.time_s, per_box.any(axis=0) if len(per_box) else np.zeros((height, width), bool),
                              ", ".join(names)))
            detections += [dataclasses.replace(d, time_s=second.time_s) for d in found]
        descriptions = [Description(s.time_s, label, text) for s in seconds
                        for label, text in s.texts.audio + s.texts.image]
        height, width = seconds[0].picture.shape[:2]
        return Result(task=TASK, text=translation.reply, masks=masks, detections=detections, descriptions=descriptions,
                      timings_ms={stage: timer.ms.get(stage, 0.0) for stage in STAGES}, source_size=(width, height),
                      notes=notes, model=self.source, source=source,
                      frames={s.time_s: s.picture for s in targets})

    def stream_stages(self, spec, **options):
        """The encode and llm stages a :class:`edgeav.stream.Stream` runs."""
        from edgeav.systems.openavs.stream import OpenAVSStreamStages

        return OpenAVSStreamStages(self, spec, **options)


__all__ = ["OpenAVSPipeline", "audioset_labels", "check_run", "check_stream"]
