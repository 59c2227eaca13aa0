"""Crab+'s part of ``edgeav export``: its graphs, example inputs, int8 calibration, receipt and engine
layout (the generic machinery is :mod:`edgeav.export`).

Graphs, each a thin wrapper over the reference modules (:mod:`edgeav.export.qwen_graphs`, which OpenAVS's
thinker and SAM2 share):

- ``audio``: the log-mel of one 2-s chunk ``[128, frames]`` -> its pooled, projected tokens
  ``[frames', D]``; ``frames`` is free (3 to ``2 * n_window``; the engine cuts any audio into chunks,
  :func:`~edgeav.engines.qwen_onnx.audio_chunks`), so every task's cut (1, 4, 5, 10 or
  20 s) runs through the one graph;
- ``vision``: the patch rows of one 224x224 temporal slice ``[256, 1176]`` -> ``[64, D]`` (fixed);
  an image is one slice, a 10-frame video five, a 4-frame video two
  (:func:`~edgeav.engines.qwen_onnx.vision_slices`);
- ``llm``: the Qwen2.5 decoder over an explicit KV cache with the routed I-LoRA on all seven
  projections (never merged) and the M-RoPE position ids as an input
  (:class:`~edgeav.export.graphs.LLMGraph` with M-RoPE), the token embedding table beside it as ``embed.npy``;
- ``sam2_encoder``: SAM2 pixels ``[1, 3, S, S]`` -> ``image_embed`` (with ``no_mem_embed``),
  ``feat_s0`` and ``feat_s1`` (after the decoder's skip convolutions), all fixed;
- ``sam2_decoder``: those three + prompt ``points [1, P, 2]`` and ``labels [1, P]`` (P free) ->
  ``low_res_logits [1, 1, 4g, 4g]``, ``iou [1, 1]``, ``object_score [1, 1]``, the dynamic-multimask
  choice inside.

Calibration and receipts run generated clips (a moving coloured shape and a tone) through the
PyTorch reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from edgeav.engines.manifest import precision_rows
from edgeav.engines.manifest_schema import ManifestCheck, check_logit_stats
from edgeav.engines.spec import ROLE_LLM, ROLE_REST, SystemExport
from edgeav.engines.qwen_onnx import TOKENIZER_KEYS, audio_chunks, tokenizer_entries, vision_slices
from edgeav.errors import OptionError
from edgeav.export.graphs import llm_graph
from edgeav.export.qwen_graphs import (
    AUDIO_GRAPH, SAM2_DECODER, SAM2_ENCODER, VISION_GRAPH, AudioChunkGraph, Sam2DecoderGraph, Sam2EncoderGraph,
    VisionSliceGraph, sam2_examples, sam2_profiles, sam2_shapes, tower_examples, tower_profiles, tower_shapes,
)
from edgeav.export.receipt import logit_stats
from edgeav.decoding import Generation, ensure_cache
from edgeav.generate import generate
from edgeav.media import SAMPLE_RATE
from edgeav.media.synth import Shape, SynthSpec, Tone, render_audio, render_frame
from edgeav.metrics import mask_iou
from edgeav.models.sam2 import sam2_config
from edgeav.preprocess.qwen_vision import frame_indices, image_pixels, patchify, video_frame_pixels
from edgeav.preprocess.sam2 import sam2_pixels, sam2_prompt
from edgeav.preprocess.whisper_mel import log_mel
from edgeav.stages import StageTimer
from edgeav.systems.crabplus.config import CrabPlusConfig
from edgeav.systems.crabplus.inputs import ClipInputs
from edgeav.qwen_thinker import PositionedLLM
from edgeav.systems.crabplus.pipeline import MASK_SPACE, CrabPlusPipeline, build_prompt
from edgeav.systems.crabplus.tasks import CrabPlusTask, get_task, mask_prompt

if TYPE_CHECKING:
    from edgeav.systems.crabplus.checkpoints import LoadedCrabPlus

COMPONENTS = {"audio": ROLE_REST, "vision": ROLE_REST, "llm": ROLE_LLM, "sam2_encoder": ROLE_REST,
              "sam2_decoder": ROLE_REST}
PRECISIONS = precision_rows(COMPONENTS, {
    "int8": "audio tower, ViT, SAM2's encoder and decoder int8 (static QDQ, calibrated on generated clips); "
            "LLM weights 8-bit (MatMulNBits; the I-LoRA and its router fp32; a TensorRT engine's LLM: fp32)",
    "int4": "LLM weights int4 (MatMulNBits; the I-LoRA and its router stay fp32); the rest fp32",
})

MAX_PROMPT_POINTS = 6  # two box corners, three points, one padding point (the pipeline's largest prompt)
def examples(loaded: LoadedCrabPlus) -> dict[str, tuple[Tensor, ...]]:
    """One example input per graph, for tracing (two or more of each dynamic axis: a size-1 axis would be
    specialised by the exporter)."""
    sam2 = sam2_examples(loaded.model.sam2, [2, 3, 1, 1, 1, -1])
    return {**tower_examples(loaded.config), "sam2_encoder": sam2["encoder"],
            "sam2_decoder": sam2["decoder"]}


def export_options(loaded: LoadedCrabPlus, *, variants: tuple[str, ...] | None = None,
                   merge_lora: bool = False) -> dict:
    """Crab+ takes no system options: one set of weights, the I-LoRA kept routed."""
    if variants is not None:
        raise OptionError(f"variants {tuple(variants)!r}: Crab+ has one set of weights; drop the variants")
    if merge_lora:
        raise OptionError("--merge-lora: Crab+'s engines keep the I-LoRA routed per token (a static merge is not "
                          "built for Crab+); drop it")
    return {}


def tokenizer_keys(loaded: LoadedCrabPlus) -> dict[str, str]:
    """The manifest keys naming the Qwen tokenizer's files, which the exporter writes beside the graphs."""
    return {key: name for key, (name, _) in tokenizer_entries(loaded.tokenizer, loaded.source).items()}


def build(loaded: LoadedCrabPlus, writer, options: dict) -> dict:
    """Emit Crab+'s graphs and its embedding table through ``writer``; -> the manifest's ``embed`` and the
    tokenizer's keys."""
    model = loaded.model
    example = examples(loaded)
    keys = tokenizer_keys(loaded)
    runs: dict = {}

    def feeds(graph: str) -> Callable[[], list[dict[str, np.ndarray]]]:
        return lambda: calibration_inputs(loaded, graph, CALIBRATION_CLIPS, runs)

    graphs = {"audio": (AudioChunkGraph(model), AUDIO_GRAPH), "vision": (VisionSliceGraph(model), VISION_GRAPH),
              "llm": llm_graph(model.llm, options["format"]), "sam2_encoder": (Sam2EncoderGraph(model), SAM2_ENCODER),
              "sam2_decoder": (Sam2DecoderGraph(model), SAM2_DECODER)}
    with torch.no_grad():
        for name, (module, spec) in graphs.items():
            writer.emit(name, name, module, spec, example[name],
                        calibration=None if name == "llm" else feeds(name))
    return {"embed": writer.save_table("embed.npy", model.llm.model.embed_tokens.weight), **keys}


def weights(loaded: LoadedCrabPlus) -> dict[str, dict[str, Tensor]]:
    return {"model": loaded.model.state_dict()}


# -- generated clips and the runs both sides share ---------------------------------------------------

RECEIPT_SEED = 5_000_000  # receipt and calibration clips come from seeds of their own
CALIBRATION_SEED = 6_000_000
CALIBRATION_CLIPS = 4
RECEIPT_TASKS = ("ave", "emotion", "s4")  # 5-, 2- and 1-slice vision grids; 10-, 4- and 1-s audio; SAM2
RECEIPT_TOKENS = 32
CLIP_SECONDS = 10


@dataclass(frozen=True)
class DemoClip:
    """A generated clip and the answer an S4 model would write for it (box and points on the shape, 224 grid)."""

    spec: SynthSpec
    mask_answer: str


def demo_clips(n: int, seed: int) -> list[DemoClip]:
    """``n`` 10-s clips of one moving coloured shape on a plain background with a tone in some seconds."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        kind = ("rect", "circle")[int(rng.integers(2))]
        start = tuple(float(v) for v in rng.uniform(0.3, 0.7, 2))
        shape = Shape(kind, tuple(int(v) for v in rng.integers(60, 256, 3)), float(rng.uniform(0.15, 0.3)), start,
                      tuple(float(v) for v in rng.uniform(0.3, 0.7, 2)))
        tones = tuple(Tone(float(s), float(s + 1), float(rng.uniform(220, 880))) for s in range(CLIP_SECONDS)
                      if rng.random() < 0.6)
        spec = SynthSpec(duration_s=CLIP_SECONDS, sample_rate=SAMPLE_RATE, channels=1, shapes=(shape,),
                         background=tuple(int(v) for v in rng.integers(0, 60, 3)), tones=tones)
        # the shape at t = 0 in the 224 grid: its box, its centre and two points between centre and edge
        cx, cy = start[0] * MASK_SPACE, start[1] * MASK_SPACE
        rx, ry = shape.size * spec.height / spec.width * MASK_SPACE, shape.size * MASK_SPACE
        box = [_grid(cx - rx), _grid(cy - ry), _grid(cx + rx), _grid(cy + ry)]
        points = [(_grid(cx), _grid(cy)), (_grid(cx - rx / 2), _grid(cy)), (_grid(cx), _grid(cy + ry / 2))]
        answer = (f"The sounding object is {kind}. [{box[0]},{box[1]},{box[2]},{box[3]}] "
                  + " ".join(f"[{x},{y}]" for x, y in points))
        clips.append(DemoClip(spec, answer))
    return clips


def _grid(value: float) -> int:
    """A coordinate of the 224 grid the thinker writes (whole, inside [0, 224))."""
    return min(max(round(value), 0), MASK_SPACE - 1)


def clip_inputs(clip: DemoClip, task: CrabPlusTask) -> ClipInputs:
    """What :func:`edgeav.systems.crabplus.inputs.decode` reads from the clip for ``task`` (second 0 for an
    image task), rendered rather than decoded."""
    spec = clip.spec
    frames = round(spec.duration_s * spec.fps)
    video = (np.stack([render_frame(spec, i / spec.fps) for i in frame_indices(frames, task.video_frames)])
             if task.video_frames else None)
    waveform = render_audio(spec, 0, round(spec.duration_s * spec.sample_rate))
    return ClipInputs(video, render_frame(spec, 0.0), 0.0, waveform, True, spec.duration_s)


def run_prompt(model, config: CrabPlusConfig, embeds: Tensor, positions: Tensor, delta: int, *,
               max_new_tokens: int = RECEIPT_TOKENS, forced: list[int] | None = None,
               logits_out: list[Tensor] | None = None) -> Generation:
    """Greedy generation (or teacher-forced on ``forced``) from a prompt, as the pipeline generates."""
    ensure_cache(model.llm, embeds.shape[1] + max(max_new_tokens, len(forced or ())) + 1, config.llm.max_seq_len)
    return generate(PositionedLLM(model.llm, positions, delta), embeds, max_new_tokens=max_new_tokens,
                    eos_id=config.llm.eos_id, forced=forced, logits_out=logits_out)


def sam2_feeds(model, config: CrabPlusConfig, clip: DemoClip, picture: np.ndarray) -> dict[str, np.ndarray]:
    """SAM2's decoder inputs for ``clip``'s mask answer on ``picture``, the features run by ``model``."""
    size = sam2_config(config.sam2).image_size
    prompt = mask_prompt(clip.mask_answer, "s4")
    features = model.sam2.image_features(sam2_pixels(picture, resolution=size))
    points, labels = sam2_prompt(prompt.box, list(prompt.points), space=MASK_SPACE, resolution=size)
    return {**{name: t.detach().numpy() for name, t in features._asdict().items()}, "points": points.numpy(),
            "labels": labels.numpy()}


# -- int8 calibration ----------------------------------------------------------------------------------


def calibration_inputs(loaded: LoadedCrabPlus, graph: str, n: int, runs: dict | None = None
                       ) -> list[dict[str, np.ndarray]]:
    """Feeds for ``graph`` (audio, vision, sam2_encoder or sam2_decoder) from ``n`` generated clips read as the
    receipt's tasks read them: every audio chunk and every vision slice, SAM2 on each clip's picture prompted
    by its mask answer. ``runs`` keeps them for the next graph."""
    graphs = ("audio", "vision", "sam2_encoder", "sam2_decoder")
    if graph not in graphs:
        raise OptionError(f"no calibration inputs for {graph!r}; expected one of {', '.join(graphs)}")
    runs = {} if runs is None else runs
    if "feeds" not in runs:
        runs["feeds"] = _calibration_feeds(loaded, n)
    return runs["feeds"][graph]


def _calibration_feeds(loaded: LoadedCrabPlus, n: int) -> dict[str, list[dict[str, np.ndarray]]]:
    config, model = loaded.config, loaded.model
    size = sam2_config(config.sam2).image_size
    feeds: dict[str, list] = {"audio": [], "vision": [], "sam2_encoder": [], "sam2_decoder": []}
    with torch.inference_mode():
        for clip in demo_clips(n, CALIBRATION_SEED):
            for task in map(get_task, RECEIPT_TASKS):
                inputs = clip_inputs(clip, task)
                cut = task.cut_audio(inputs.waveform, SAMPLE_RATE, frame_index=0 if task.cuts_at_frame else None)
                feeds["audio"] += [{"mel": c.numpy()} for c in audio_chunks(torch.from_numpy(log_mel(cut)),
                                                                            config.audio)]
                frames = image_pixels(inputs.picture)[None] if task.reads_image else video_frame_pixels(inputs.video)
                patches, grid = patchify(frames)
                feeds["vision"] += [{"patches": s.numpy()} for s in vision_slices(torch.from_numpy(patches), grid,
                                                                                  config.vision.patch_dim)]
            picture = clip_inputs(clip, get_task("s4")).picture
            feeds["sam2_encoder"].append({"pixels": sam2_pixels(picture, resolution=size).numpy()})
            feeds["sam2_decoder"].append(sam2_feeds(model, config, clip, picture))
    return feeds


# -- the fidelity receipt ------------------------------------------------------------------------------


def compare(reference: LoadedCrabPlus, engine, *, n: int, max_new_tokens: int = RECEIPT_TOKENS,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt of ``engine`` (anything shaped like :class:`LoadedCrabPlus`) against ``reference`` on ``n``
    generated clips, each read as :data:`RECEIPT_TASKS` read it.

    Next-token distributions of the engine teacher-forced on the reference's greedy answer; the share of
    greedy answers with identical text; the reference's mean next-token entropy as a share of the uniform
    distribution's (near 1: flat logits, as random weights give, where top-1 agreement means little);
    masks: both pipelines given the same S4 answer (a box and three points on the clip's shape), the
    engine's mask scored by IoU against the reference's.
    """
    config, tokenizer = reference.config, reference.tokenizer
    ref_logits, eng_logits, same_text, ious = [], [], [], []
    ref_pipeline, eng_pipeline = CrabPlusPipeline(reference), CrabPlusPipeline(engine)
    with torch.inference_mode():
        for index, clip in enumerate(demo_clips(n, RECEIPT_SEED)):
            for task in map(get_task, RECEIPT_TASKS):
                inputs = clip_inputs(clip, task)
                ref_prompt = build_prompt(reference.model, config, tokenizer, task, inputs)
                eng_prompt = build_prompt(engine.model, config, tokenizer, task, inputs)
                ref_steps, eng_steps = [], []
                ref = run_prompt(reference.model, config, *ref_prompt, max_new_tokens=max_new_tokens,
                                 logits_out=ref_steps)
                eng = run_prompt(engine.model, config, *eng_prompt, max_new_tokens=max_new_tokens)
                run_prompt(engine.model, config, *eng_prompt, forced=ref.token_ids, logits_out=eng_steps)
                ref_logits.append(torch.stack(ref_steps))
                eng_logits.append(torch.stack(eng_steps))
                same_text.append(tokenizer.decode(ref.token_ids) == tokenizer.decode(eng.token_ids))
            inputs = clip_inputs(clip, get_task("s4"))
            masks = [pipeline.read(get_task("s4"), inputs, clip.mask_answer, StageTimer()).masks[0].mask
                     for pipeline in (ref_pipeline, eng_pipeline)]
            ious.append(mask_iou(masks[1], masks[0]))
            progress(f"receipt: clip {index + 1} of {n} done")
    return {
        "clips": n,
        "tasks": list(RECEIPT_TASKS),
        "max_new_tokens": max_new_tokens,
        "logits": logit_stats(ref_logits, eng_logits),
        "reference_entropy_ratio": entropy_ratio(ref_logits),
        "greedy_text_agreement": float(np.mean(same_text)) if same_text else 1.0,
        "mask_iou_vs_reference": float(np.mean(ious)) if ious else None,
    }


def entropy_ratio(logits: list[Tensor]) -> float:
    """Mean entropy of the next-token distributions ``logits`` (each [steps, V]) over that of the uniform one."""
    steps = torch.cat(logits).double()
    log_p = steps.log_softmax(-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean() / math.log(steps.shape[-1]))


def receipt(loaded: LoadedCrabPlus, engine_dir, *, n: int, options: dict,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """:func:`compare` of the engine in ``engine_dir`` against ``loaded`` run by the reference."""
    from edgeav.systems.crabplus.onnx_engine import OnnxCrabPlus

    progress(f"receipt: comparing with the PyTorch reference on {n} generated clips, tasks "
             f"{', '.join(RECEIPT_TASKS)}")
    return compare(loaded, OnnxCrabPlus(engine_dir), n=n, progress=progress)


FLAT = 0.9  # a reference entropy ratio above this gets the note that top-1 agreement means little


def check_receipt(receipt: dict, check: ManifestCheck) -> None:
    number = (int, float)
    check.need(receipt, "clips", int, "receipt")
    check.need(receipt, "tasks", list, "receipt")
    check.need(receipt, "max_new_tokens", int, "receipt")
    check.need(receipt, "greedy_text_agreement", number, "receipt")
    check.need(receipt, "reference_entropy_ratio", number, "receipt")
    check.need(receipt, "mask_iou_vs_reference", (*number, type(None)), "receipt")
    check_logit_stats(check.need(receipt, "logits", dict, "receipt"), check)


def receipt_lines(receipt: dict) -> list[str]:
    """What ``edgeav info`` prints of a Crab+ receipt."""
    logits = receipt["logits"]
    clips = f"{receipt['clips']} generated clip{'s' if receipt['clips'] != 1 else ''}"
    lines = [f"receipt against the PyTorch reference, {clips} x {len(receipt['tasks'])} tasks "
             f"({', '.join(receipt['tasks'])}), greedy up to {receipt['max_new_tokens']} tokens:"]
    if logits:
        lines.append(f"  next-token logits  max |diff| {logits['max_abs_logit_diff']:.3g}, mean |diff| "
                     f"{logits['mean_abs_logit_diff']:.3g}, KL mean {logits['kl_mean']:.3g} "
                     f"(max {logits['kl_max']:.3g}), top-1 agreement {logits['top1_agreement']:.3f} over "
                     f"{logits['steps']} steps")
    else:
        lines.append("  next-token logits  no step compared")
    if receipt["reference_entropy_ratio"] > FLAT:
        lines.append(f"  note               the reference's next-token entropy is "
                     f"{receipt['reference_entropy_ratio']:.0%} of the uniform's: near-flat logits (random weights "
                     "give them), so top-1 agreement means little; read the KL and the logit error")
    lines.append(f"  greedy text        identical in {receipt['greedy_text_agreement']:.0%} of runs")
    if receipt.get("mask_iou_vs_reference") is not None:
        lines.append(f"  masks              IoU {receipt['mask_iou_vs_reference']:.3f} against the reference's "
                     "(both SAM2s prompted with the same box and points)")
    return lines


# -- the engine directory's layout ---------------------------------------------------------------------


def expected_shapes(component: str, config: CrabPlusConfig) -> dict[str, tuple]:
    """The input/output shapes a component's graph has under ``config`` (None: a dynamic or free axis)."""
    if component in ("audio", "vision", "llm"):
        return tower_shapes(component, config)
    if component in ("sam2_encoder", "sam2_decoder"):
        return sam2_shapes(component.removeprefix("sam2_"), sam2_config(config.sam2))
    raise ValueError(f"no graph shapes for component {component!r}")


def check_layout(manifest: dict, check: ManifestCheck) -> None:
    """Crab+'s keys: one graph per component under its own name, the ``embed`` table and the Qwen tokenizer's
    files (``tokenizer_merges`` beside a ``vocab.json``)."""
    graphs = manifest["graphs"]
    for name in COMPONENTS:
        if graphs.get(name, {}).get("component") != name:
            raise check.refuse("graphs", f"has no {name} graph")
    check.listed_file(manifest, "embed", "")
    for key in TOKENIZER_KEYS:
        if key in manifest or (key == "tokenizer_merges" and manifest.get("tokenizer") == "vocab.json"):
            check.listed_file(manifest, key, "")


def embed_tables(manifest: dict) -> list[str]:
    return [manifest["embed"]]


def profiles_for(component: str, config: CrabPlusConfig) -> dict[str, tuple]:
    """TensorRT optimization profiles (batch 1): a chunk of 3 to ``2 * n_window`` mel frames, one vision slice,
    prefill and decode of the LLM, one SAM2 image and prompts of up to six points."""
    if component in ("audio", "vision", "llm"):
        return tower_profiles(component, config)
    if component in ("sam2_encoder", "sam2_decoder"):
        return sam2_profiles(component.removeprefix("sam2_"), sam2_config(config.sam2), points=MAX_PROMPT_POINTS)
    raise OptionError(f"no TensorRT profile for component {component!r}")


EXPORT = SystemExport(
    system="crabplus",
    components=COMPONENTS,
    precisions=PRECISIONS,
    config_class=CrabPlusConfig,
    config_from_dict=CrabPlusConfig.from_dict,
    expected_shapes=expected_shapes,
    check_layout=check_layout,
    embed_tables=embed_tables,
    check_receipt=check_receipt,
    receipt_lines=receipt_lines,
    weights=weights,
    options=export_options,
    build=build,
    receipt=receipt,
    profiles=profiles_for,
)
