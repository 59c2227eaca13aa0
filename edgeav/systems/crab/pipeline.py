"""Crab's run: decode the source (media) -> CLIP pixels and fbank (preprocess) ->
visual and audio tokens -> prompt embeddings -> generation -> parsed result, and for
mask tasks the mask decoder on the ``<mask_i>`` hidden states, resized to the source.

:class:`edgeav.runtime.Runtime` builds one :class:`CrabPipeline` per loaded model and
hands it every run; the stream's llm stage prompts through :meth:`CrabPipeline.answer`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edgeav.decoding import ensure_cache
from edgeav.errors import OptionError
from edgeav.media.windows import check_window
from edgeav.numpy_ops import NumpyOps
from edgeav.preprocess.clip import clip_pixels
from edgeav.preprocess.fbank import crab_fbank_batch
from edgeav.results import Mask, Result
from edgeav.sampling import SAMPLING_PRESETS, Sampling, resolve_sampling
from edgeav.stages import StageTimer, Trace
from edgeav.systems.crab.features import Encoded
from edgeav.systems.crab.inputs import Inputs, decode
from edgeav.systems.crab.tasks import Task, get_task, task_classes

if TYPE_CHECKING:
    from edgeav.systems.crab.checkpoints import LoadedCrab
    from edgeav.systems.crab.onnx_engine import OnnxEngine

STAGES = ("decode", "visual", "audio", "prefill", "decode_tokens", "mask")
LLM_WEIGHT_GROUP = 128  # int4 group size of Runtime(llm_weights="int4")


class CrabPipeline:
    """Crab on one device.

    ``engine`` is the reference (:class:`~edgeav.systems.crab.checkpoints.LoadedCrab`, the torch
    backend) or an exported engine (:class:`~edgeav.systems.crab.onnx_engine.OnnxEngine`); both offer
    the same per-variant model interface, so a run is the same whichever executes it. ``ops`` computes
    around the model in its arrays: :class:`~edgeav.torch_ops.TorchOps` for the reference,
    :class:`~edgeav.numpy_ops.NumpyOps` for an engine (whose runs import no torch).
    """

    def __init__(self, engine: LoadedCrab | OnnxEngine, *, device: str = "cpu", dtype=None,
                 llm_weights: str | None = None) -> None:
        """``dtype``: the reference's torch dtype (None: float32; an engine takes only that).
        ``llm_weights`` ("int8" or "int4"): store the LLM's projections weight-only quantized
        (:func:`edgeav.kernels.quantize_llm_`, 128-wide int4 groups; the I-LoRA, embeddings and LM
        head stay in ``dtype``, the head because mask tasks swap its rows per weight variant)."""
        exported = getattr(engine, "backend", "torch") != "torch"
        if exported:
            self.ops = NumpyOps()
            self.engine = engine.to(device, dtype)
        else:
            from edgeav.torch_ops import TorchOps

            self.ops = TorchOps(device, dtype)
            self.engine = engine.to(self.ops.device, self.ops.dtype)
        self.config = engine.config
        self.tokenizer = engine.tokenizer
        if llm_weights is not None:
            if exported:
                raise OptionError("--llm-weights applies to the PyTorch engine; an exported engine's precision "
                                  "is fixed at export (edgeav export --precision)")
            from edgeav.kernels import quantize_llm_

            quantize_llm_(engine.model.llm, llm_weights, LLM_WEIGHT_GROUP, lm_head=False)

    @property
    def source(self) -> str:
        return self.engine.source

    @property
    def device(self):
        """The torch device the model runs on (an engine: the CPU; asking an engine imports torch)."""
        return self.ops.device

    @property
    def dtype(self):
        """The torch dtype the model takes (an engine: float32; asking an engine imports torch)."""
        return self.ops.dtype

    # -- one run ------------------------------------------------------------

    def run(self, source: str | Path, task: str = "ave", **options) -> Result:
        """Run ``task`` on ``source``: :meth:`prepare`, then the model (the options are :meth:`prepare`'s)."""
        return self.prepare(source, task, **options)()

    def prepare(
        self,
        source: str | Path,
        task: str = "ave",
        *,
        question: str | None = None,
        expression: str | None = None,
        sampling: str | Sampling = "greedy",
        max_new_tokens: int | None = None,
        at_seconds: Sequence[int] | None = None,
        trace: Trace | None = None,
        audio: str | Path | None = None,
        fps: float | None = None,
        silent_audio: bool = False,
    ) -> Callable[[], Result]:
        """Check the options and decode ``source`` (a video, an image, or a folder of frames) for ``task``;
        calling what comes back runs the model. A batch decodes the next item while the model runs this one.

        ``at_seconds`` picks the seconds whose frame a mask task segments (default: every
        second of its clip), or the one second whose frame ARIG grounds (default 0).
        ``audio`` is a separate audio file heard instead of the source's own track (AVSBench's
        ``audio.wav``, AVE's ``.mp3``); ``fps`` the frame rate of a folder of frames (default 1);
        ``silent_audio`` lets an image or frames run without audio (on silence). How images map
        to the task's frames and how the audio is cut: :mod:`edgeav.systems.crab.inputs`.
        ``trace`` records every stage's inputs and outputs (see :class:`Trace`).
        """
        spec = get_task(task)
        at_seconds = check_run_options(spec, question=question, expression=expression, max_new_tokens=max_new_tokens,
                                       at_seconds=at_seconds)
        sampling = resolve_sampling(sampling)
        self.check_prompt_fits(spec, question=question, expression=expression)
        timer = StageTimer()
        with timer.stage("decode"):
            inputs = decode(source, spec, at_seconds, audio=audio, fps=fps, silent_audio=silent_audio)

        def answer() -> Result:
            model = self.engine.variant(spec.weights)  # in place, so here: another prepare may come between
            with self.ops.inference():
                return self._generate_all(model, spec, inputs, timer, question, expression, sampling,
                                          max_new_tokens, trace, str(source))
        return answer

    def _generate_all(self, model, spec: Task, inputs: Inputs, timer: StageTimer, question, expression,
                      sampling: Sampling, max_new_tokens: int | None, trace: Trace | None, source: str) -> Result:
        with timer.stage("visual"):
            image_pixels = {t: clip_pixels(frame) for t, frame in inputs.image_frames.items()}
            video = (model.encode_frames(self.model_input(inputs.video_pixels)) if inputs.video_pixels is not None
                     else None)
            images = {t: model.encode_frames(self.model_input(pixels)) for t, pixels in image_pixels.items()}
        with timer.stage("audio"):
            fbanks = {t: crab_fbank_batch(w) for t, w in inputs.audio.items()}
            audio = {t: _rows(model.encode_audio(self.model_input(fbank))) for t, fbank in fbanks.items()}
        if trace is not None:
            trace.pixels += [inputs.video_pixels] if inputs.video_pixels is not None else []
            trace.pixels += list(image_pixels.values())
            trace.fbank += list(fbanks.values())
        encoded = Encoded(video=None if video is None else _rows(video.tokens), images=images, audio=audio,
                          ordinals={t: t for t in images}, source_size=inputs.source_size, notes=list(inputs.notes),
                          duration_s=inputs.duration_s)
        frames = {float(t): frame for t, frame in inputs.source_frames.items()}
        return self.answer(model, spec, encoded, timer, question=question, expression=expression, sampling=sampling,
                           max_new_tokens=max_new_tokens, trace=trace, source=source, frames=frames)

    def answer(self, model, spec: Task, encoded: Encoded, timer: StageTimer, *, question: str | None = None,
               expression: str | None = None, sampling: Sampling = SAMPLING_PRESETS["greedy"],
               max_new_tokens: int | None = None, trace: Trace | None = None, clip_start_s: float = 0.0,
               source: str | None = None, frames: dict[float, np.ndarray] | None = None) -> Result:
        """Prompt, generate and parse from encoded inputs (one prompt per image second, else one).

        ``clip_start_s`` is the source time of the clip's start: event times come back in source time.
        ``source`` and ``frames`` (source-size frames by second, for ``Result.plot``) go into the result.
        Notes say when generation hit the token limit or stopped in a loop, and what did not parse.
        """
        token = self.tokenizer.token_id
        blocks = {}
        if encoded.video is not None:
            blocks[token("<video>")] = encoded.video
        texts, masks, notes = [], [], list(encoded.notes)
        images = encoded.images
        for second in sorted(images) or [None]:
            blocks[token("<audio>")] = encoded.audio[second if second in encoded.audio else None]
            if second is not None and "image" in spec.blocks:
                blocks[token("<image>")] = _rows(images[second].tokens)
            instruction = spec.instruction(question=question, expression=expression,
                                           second=encoded.ordinals[second] if spec.names_second else None)
            prompt_ids = self.tokenizer.encode_chat(instruction)
            if trace is not None:
                trace.prompt_ids.append(prompt_ids)
            embeds = model.embed_prompt(prompt_ids, blocks)
            limit = max_new_tokens or spec.max_new_tokens
            self._check_context(spec, embeds.shape[1], "with its media")
            ensure_cache(model.llm, embeds.shape[1] + limit, self.config.llm.max_seq_len)
            logits: list | None = [] if trace is not None else None
            forced = None
            if trace is not None and trace.forced:
                if len(trace.tokens) >= len(trace.forced):
                    raise OptionError(f"Trace.forced holds {len(trace.forced)} answers; this run has more prompts")
                forced = trace.forced[len(trace.tokens)]
            generation = self.ops.generate(
                model.llm, embeds, max_new_tokens=limit, eos_id=self.tokenizer.eos_id,
                mask_token_ids=tuple(token(f"<mask_{i}>") for i in range(6)),
                n_mask_tokens=self.config.seg.num_mask_tokens, sampling=sampling, forced=forced, logits_out=logits,
            )
            if trace is not None:
                trace.tokens.append(generation.token_ids)
                trace.logits.append(self.ops.trace_logits(logits))
            timer.ms["prefill"] += generation.prefill_s * 1000
            timer.ms["decode_tokens"] += generation.decode_s * 1000
            text = self.tokenizer.decode(generation.token_ids)
            texts.append(text)
            if forced is None:
                notes += self._generation_notes(generation, limit, "" if second is None else f" at {second} s")
            if spec.mask_classes and second is not None:
                if generation.mask_hidden is None:
                    notes.append(f"no mask at {second} s: the model did not write the six <mask_i> tokens")
                    continue
                with timer.stage("mask"):
                    mask_logits = model.mask_logits(generation.mask_hidden, images[second])
                    masks.append(Mask(float(second), self.ops.mask_at_size(mask_logits, encoded.source_size), text))
                if trace is not None:
                    frame = images[second]
                    trace.mask_inputs.append({name: self.ops.host(array) for name, array in (
                        ("mask_hidden", generation.mask_hidden[None]), ("mask_low", frame.mask_low[:1]),
                        ("mask_high", frame.mask_high[:1]))})
                    trace.mask_logits.append(self.ops.host(mask_logits))

        classes = task_classes(spec, self.config.name)
        parsed = spec.parse(texts[0], clip_start_s=clip_start_s, source_size=encoded.source_size,
                            duration_s=encoded.duration_s, classes=classes or None)
        return Result(
            task=spec.name,
            text="\n".join(texts),
            events=list(parsed.events),
            box=None if parsed.box is None else list(parsed.box),
            answer=parsed.answer,
            object_label=parsed.object_label,
            masks=masks,
            timings_ms={stage: timer.ms.get(stage, 0.0) for stage in STAGES},
            source_size=encoded.source_size,
            notes=notes + list(parsed.notes),
            model=self.source,
            source=source,
            frames=dict(frames or {}),
            classes=classes,
        )

    def _generation_notes(self, generation, limit: int, where: str) -> list[str]:
        """What the caller must know about how generation ended: cut at the token limit, or in a loop."""
        if generation.stopped_by == "max_new_tokens":
            return [f"the answer{where} was cut at {limit} new tokens (--max-new-tokens) before the model ended it"]
        if generation.stopped_by == "repetition":
            ngram = self.tokenizer.decode(generation.repeated)
            return [f"generation{where} stopped early after {len(generation.token_ids)} tokens: the answer ended in "
                    f"{ngram!r} repeated over and over"]
        return []

    # -- streams ------------------------------------------------------------

    def stream_stages(self, spec: Task, **options):
        """The encode and llm stages a :class:`edgeav.stream.Stream` runs for ``spec``."""
        from edgeav.systems.crab.stream import CrabStreamStages

        return CrabStreamStages(self, spec, **options)

    # -- stages -------------------------------------------------------------


    def check_prompt_fits(self, spec: Task, *, question: str | None = None, expression: str | None = None) -> None:
        """Refuse a question or expression too long for the model's context before any media is read
        (the text alone; :meth:`answer` checks again with the media's tokens)."""
        if question is None and expression is None:
            return
        instruction = spec.instruction(question=question, expression=expression,
                                       second=0 if spec.names_second else None)
        self._check_context(spec, len(self.tokenizer.encode_chat(instruction)), "its text alone")

    def _check_context(self, spec: Task, prompt_len: int, counted: str) -> None:
        """The answer needs room for one token at least (generation stops where the context ends)."""
        context = self.config.llm.max_seq_len
        if prompt_len >= context:
            what = f"the {spec.requires} (--{spec.requires})" if spec.requires else "the prompt"
            raise OptionError(f"the prompt has {prompt_len} tokens ({counted}); the model's context is {context} "
                              f"tokens: shorten {what}")

    def model_input(self, array: np.ndarray):
        """A host array (pixels, fbank) as the model takes it: a torch tensor on the reference's device, an
        engine's float32 numpy array."""
        return self.ops.model_input(array)


def _rows(block):
    """A feature block [n, Q, D] as prompt rows [n * Q, D] (a torch tensor or a numpy array alike)."""
    return block.reshape(-1, block.shape[-1])


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def at_seconds_list(at_seconds) -> list[int] | None:
    """``at_seconds`` as a list of whole seconds (a single int is one second); refuses anything else."""
    if at_seconds is None:
        return None
    if _is_int(at_seconds):
        at_seconds = [at_seconds]
    if isinstance(at_seconds, (str, bytes)) or not isinstance(at_seconds, Iterable):
        raise OptionError(f"at_seconds (--at) {at_seconds!r}: give whole seconds, as 2 or [0, 3]")
    seconds = list(at_seconds)
    bad = [t for t in seconds if not _is_int(t)]
    if bad:
        raise OptionError(f"at_seconds (--at) {bad[0]!r}: a frame is named by its whole second, as 2; "
                          f"{type(bad[0]).__name__} is not one")
    negative = [t for t in seconds if t < 0]
    if negative:
        raise OptionError(f"at_seconds (--at) {negative[0]}: seconds start at 0")
    return [int(t) for t in seconds]


def check_run_options(spec: Task, *, question: str | None, expression: str | None, max_new_tokens: int | None,
                      at_seconds: Sequence[int] | int | None) -> list[int] | None:
    """Everything about a run's options that can be checked before any model or media is touched
    -> ``at_seconds`` as a list of seconds (None: the task's default)."""
    for name, text in (("question", question), ("expression", expression)):
        if text is not None and not isinstance(text, str):
            raise OptionError(f"{name} (--{name}) takes a string, not a {type(text).__name__}")
    spec.check_options(question=question, expression=expression)
    if max_new_tokens is not None and not _is_int(max_new_tokens):
        raise OptionError(f"max_new_tokens (--max-new-tokens) {max_new_tokens!r}: give a whole number of tokens")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise OptionError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}")
    at_seconds = at_seconds_list(at_seconds)
    if at_seconds:
        if not spec.image_frame:
            raise OptionError(f"task {spec.name!r} reads no single frame; at_seconds (--at) applies to "
                              "arig and mask tasks")
        if spec.name == "arig" and len(at_seconds) > 1:
            raise OptionError("task 'arig' grounds one frame; pass a single --at (at_seconds: one second)")
        if spec.names_second and max(at_seconds) >= spec.clip_s:
            raise OptionError(f"at_seconds, --at {max(at_seconds)}: task {spec.name!r} segments seconds 0 to "
                              f"{spec.clip_s - 1} of its clip")
    return at_seconds


def check_stream_options(task: str, *, window: int | None, stride: int, question: str | None = None,
                         expression: str | None = None, max_new_tokens: int | None = None) -> tuple[Task, int]:
    """A stream's options checked before any model or media is touched -> the task and the window
    (``None``: the task's default, ``Task.default_window_s``)."""
    spec = get_task(task)
    check_run_options(spec, question=question, expression=expression, max_new_tokens=max_new_tokens, at_seconds=None)
    window = spec.default_window_s if window is None else window
    check_window(window, stride)
    return spec, window

