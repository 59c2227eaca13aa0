"""Crab's part of ``edgeav export``: its graphs, example inputs, int8 calibration and receipt (the
generic machinery is :mod:`edgeav.export`; what the engine holds and how its manifest is checked,
torch-free, is :mod:`edgeav.systems.crab.engine_layout`).

Graphs: ``visual`` (CLIP + visual Q-Former and the mask decoder's two CLIP scales), ``audio``
(BEATs + audio Q-Former), one ``llm`` per distinct LM head (the I-LoRA routed per token, never
merged unless asked) with an embedding table per distinct table, and ``mask_avs`` /
``mask_avss`` for the mask variants. Calibration and receipts run the demo world through the
PyTorch reference.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.export.graphs import GraphSpec, llm_example, llm_graph, llm_profiles
from edgeav.export.receipt import logit_stats
from edgeav.metrics import mask_iou
from edgeav.models.ilora import ILoRALinear
from edgeav.stages import Trace
from edgeav.systems.crab.config import CrabConfig
from edgeav.systems.crab.evaluate import DEMO_TASKS, score, suite_cases, summarise
from edgeav.systems.crab.model import CrabModel
from edgeav.systems.crab.seg import SegModule
from edgeav.systems.crab.tasks import TASKS, get_task

if TYPE_CHECKING:
    from edgeav.runtime import Runtime
    from edgeav.systems.crab.checkpoints import LoadedCrab


# -- graphs ------------------------------------------------------------------------------------------

VISUAL = GraphSpec(("pixels",), ("visual_tokens", "mask_low", "mask_high"),
                   {"pixels": {0: "frames"}, "visual_tokens": {0: "frames"}, "mask_low": {0: "frames"},
                    "mask_high": {0: "frames"}})
AUDIO = GraphSpec(("fbank",), ("audio_tokens",),
                  {"fbank": {0: "segments", 1: "fbank_frames"}, "audio_tokens": {0: "segments"}})
MASK = GraphSpec(("mask_hidden", "mask_low", "mask_high"), ("mask_logits",), {})


class VisualGraph(nn.Module):
    """CLIP-normalised pixels [frames, 3, 224, 224] -> LLM tokens and the mask decoder's two CLIP scales."""

    def __init__(self, model: CrabModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.model.encode_frames(pixels)
        return features.tokens, features.mask_low, features.mask_high


class AudioGraph(nn.Module):
    """Crab fbank [segments, frames, 128] -> audio tokens [segments, Q, D]."""

    def __init__(self, model: CrabModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, fbank: Tensor) -> Tensor:
        return self.model.encode_audio(fbank)


class MaskGraph(nn.Module):
    """The six ``<mask_i>`` hidden states [1, 6, D] and one frame's CLIP scales -> mask logits [1, C, 224, 224]."""

    def __init__(self, seg: SegModule) -> None:
        super().__init__()
        self.seg = seg

    def forward(self, mask_hidden: Tensor, mask_low: Tensor, mask_high: Tensor) -> Tensor:
        return self.seg(mask_hidden, mask_low, mask_high)


def examples(loaded: LoadedCrab) -> dict[str, tuple[Tensor, ...]]:
    """One example input per component, for tracing."""
    cfg = loaded.config
    size = cfg.vision.image_size
    grid = size // cfg.vision.patch_size
    return {
        "visual": (torch.randn(2, 3, size, size),),
        "audio": (torch.randn(2, 98, 128),),
        "llm": llm_example(cfg.llm),
        "mask": (torch.randn(1, cfg.seg.num_mask_tokens, cfg.llm.hidden_size),
                 torch.randn(1, cfg.vision.hidden_size, grid, grid), torch.randn(1, cfg.vision.hidden_size, grid, grid)),
    }


def merge_lora(llm: nn.Module) -> tuple[nn.Module, float]:
    """A copy of ``llm`` whose I-LoRA layers are plain linears with the heads mixed uniformly.

    Lossy by design (the router mixes per token); the receipt reports how lossy.
    Returns the copy and the largest relative weight change.
    """
    merged = copy.deepcopy(llm)
    worst = 0.0
    for parent in list(merged.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, ILoRALinear):
                mix = torch.full((child.heads,), 1.0 / child.heads)
                weight = child.merged_weight(mix)
                worst = max(worst, float((weight - child.weight).norm() / child.weight.norm().clamp_min(1e-12)))
                linear = nn.Linear(child.in_features, child.out_features, bias=False)
                linear.weight = nn.Parameter(weight)
                setattr(parent, child_name, linear)
    return merged, worst


def llm_keys(loaded: LoadedCrab) -> dict[str, tuple[str, str]]:
    """variant -> (LLM graph name, embedding table name); variants with the joint tensors share its files."""
    joint = loaded.variant("joint").llm
    head, embed = joint.lm_head.weight.detach().clone(), joint.model.embed_tokens.weight.detach().clone()
    out = {"joint": ("llm", "embed_joint")}
    for name, tensors in loaded.variants.items():
        same_head = torch.equal(tensors["lm_head.weight"], head)
        same_embed = torch.equal(tensors["model.embed_tokens.weight"], embed)
        out[name] = ("llm" if same_head else f"llm_{name}", "embed_joint" if same_embed else f"embed_{name}")
    return out


def export_options(loaded: LoadedCrab, *, variants: tuple[str, ...] | None = None,
                   merge_lora: bool = False) -> dict:
    """Crab's export options: the weight variants to include ("joint" always; default every one the
    checkpoint has: an engine without "avs"/"avss" refuses the mask tasks) and the LoRA merge."""
    available = ("joint", *loaded.variants)
    variants = available if variants is None else tuple(dict.fromkeys(("joint", *variants)))
    missing = [v for v in variants if v not in available]
    if missing:
        raise OptionError(f"variant {missing[0]!r}: the checkpoint has {', '.join(available)}")
    return {"merge_lora": merge_lora, "variants": list(variants)}


def build(loaded: LoadedCrab, writer, options: dict) -> dict:
    """Emit Crab's graphs and embedding tables through ``writer``; -> the manifest's ``variants`` and ``lora``."""
    example = examples(loaded)
    traces: dict = {}

    def feeds(graph: str) -> Callable[[], list[dict[str, np.ndarray]]]:
        return lambda: calibration_inputs(loaded, graph, CALIBRATION_CLIPS, traces)

    model = loaded.variant("joint")
    with torch.no_grad():
        writer.emit("visual", "visual", VisualGraph(model), VISUAL, example["visual"], calibration=feeds("visual"))
        writer.emit("audio", "audio", AudioGraph(model), AUDIO, example["audio"], calibration=feeds("audio"))
    keys = {name: files for name, files in llm_keys(loaded).items() if name in options["variants"]}
    entries: dict[str, dict] = {}
    merge_error = None
    for variant, (llm_name, embed_name) in keys.items():
        model = loaded.variant(variant)
        if llm_name not in writer.graphs:
            llm = model.llm
            if options["merge_lora"]:
                llm, merge_error = merge_lora(llm)
            writer.emit(llm_name, "llm", *llm_graph(llm, options["format"]), example["llm"])
        writer.save_table(f"{embed_name}.npy", model.llm.model.embed_tokens.weight)
        entry = {"llm": llm_name, "embed": f"{embed_name}.npy"}
        if variant != "joint":
            writer.emit(f"mask_{variant}", "mask", MaskGraph(model.seg), MASK, example["mask"],
                        calibration=feeds(f"mask_{variant}"))
            entry["mask"] = f"mask_{variant}"
        entries[variant] = entry
    loaded.variant("joint")
    merged = options["merge_lora"]
    return {"variants": entries,
            "lora": {"merged": merged, "mix": "uniform" if merged else "routed per token (exact)",
                     "max_relative_weight_change": merge_error}}


def weights(loaded: LoadedCrab) -> dict[str, dict[str, Tensor]]:
    """Every tensor of every weight variant (the source digest)."""
    # The joint model's mask decoder is whichever variant ran last (mask weights live in the variants).
    joint = {k: v for k, v in loaded.variant("joint").state_dict().items() if not k.startswith("seg.")}
    return {"joint": joint, **loaded.variants}


# -- int8 calibration ----------------------------------------------------------------------------------

CALIBRATION_CLIPS = 6
# Calibration clips come from their own seeds: neither training's nor the held-out suite's.
CALIBRATION_SEED = 2_000_000
# Encoders calibrate on joint-weight tasks (video and single frames), so no mask variant is needed.
_CALIBRATION_TASKS = {"visual": ("ave", "arig"), "audio": ("ave", "avqa"), "mask_avs": ("s4", "ms3"),
                      "mask_avss": ("avss",)}


def calibration_inputs(loaded: LoadedCrab, graph: str, n: int,
                       traces: dict[str, list[Trace]] | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds for ``graph`` (visual, audio, mask_avs or mask_avss) from ``n`` demo clips per task.

    Mask feeds come from generation teacher-forced on the world's answer, so the six
    ``<mask_i>`` states exist even for a model that would not write them itself.
    ``traces`` (task -> traces) keeps the reference's runs for the next graph's call.
    """
    if graph not in _CALIBRATION_TASKS:
        raise OptionError(f"no calibration inputs for {graph!r}; expected one of {', '.join(_CALIBRATION_TASKS)}")
    traces = {} if traces is None else traces
    feeds: list[dict[str, np.ndarray]] = []
    for task in _CALIBRATION_TASKS[graph]:
        if task not in traces:
            traces[task] = _calibration_traces(loaded, task, n)
        for trace in traces[task]:
            if graph == "visual":
                feeds += [{"pixels": p} for p in trace.pixels]
            elif graph == "audio":
                feeds += [{"fbank": f} for f in trace.fbank]
            else:
                feeds += trace.mask_inputs
    return feeds


def _calibration_traces(loaded: LoadedCrab, task: str, n: int) -> list[Trace]:
    from edgeav.runtime import Runtime

    runtime = Runtime(loaded)
    traces = []
    for case in suite_cases(task, n, first_seed=CALIBRATION_SEED):
        answer = runtime.tokenizer.encode(case.truth.text)
        trace = Trace(forced=[answer] * len(case.at_seconds or [0]))
        runtime.run(case.path, task, question=case.truth.question, at_seconds=case.at_seconds, trace=trace)
        traces.append(trace)
    return traces


def quantize_int8(source, target, graph: str, loaded: LoadedCrab, traces: dict | None = None) -> None:
    """Static int8 QDQ of ``source`` (visual, audio or mask graph) calibrated on demo-world inputs
    (``traces``: the reference runs shared between the graphs of one export)."""
    from edgeav.export.quantize import quantize_int8_qdq

    quantize_int8_qdq(source, target, calibration_inputs(loaded, graph, CALIBRATION_CLIPS, traces))


# -- the fidelity receipt ------------------------------------------------------------------------------


def compare(reference: Runtime, engine: Runtime, *, n: int, tasks: tuple[str, ...] = DEMO_TASKS,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt of ``engine`` against ``reference`` on ``n`` held-out clips per task.

    Next-token distributions teacher-forced on the reference's own answer (max and mean absolute
    logit difference, KL, top-1 agreement); the share of greedy runs with identical text; the IoU
    of the engine's masks against the reference's; the task metrics of ``edgeav eval`` for both.
    """
    ref_logits, eng_logits = [], []
    same_text, ious = [], []
    ref_scores: dict[str, dict[str, list]] = {t: {} for t in tasks}
    eng_scores: dict[str, dict[str, list]] = {t: {} for t in tasks}
    for task in tasks:
        for case in suite_cases(task, n):
            options = {"question": case.truth.question, "at_seconds": case.at_seconds}
            ref_trace, eng_trace = Trace(), Trace()
            ref = reference.run(case.path, task, trace=ref_trace, **options)
            eng = engine.run(case.path, task, trace=eng_trace, **options)
            if eng_trace.tokens != ref_trace.tokens:  # else teacher forcing would replay the greedy run's steps
                eng_trace = Trace(forced=ref_trace.tokens)
                engine.run(case.path, task, trace=eng_trace, **options)
            ref_logits += ref_trace.logits
            eng_logits += eng_trace.logits
            same_text.append(ref.text == eng.text)
            by_time = {m.time_s: m.mask for m in eng.masks}  # a mask the engine did not write counts 0
            ious += [mask_iou(by_time[m.time_s], m.mask) if m.time_s in by_time else 0.0 for m in ref.masks]
            score(case, ref, ref_scores[task])
            score(case, eng, eng_scores[task])
        progress(f"receipt: {task} done")
    return {
        "clips_per_task": n,
        "logits": logit_stats(ref_logits, eng_logits),
        "greedy_text_agreement": float(np.mean(same_text)),
        "mask_iou_vs_reference": float(np.mean(ious)) if ious else None,
        "metrics": {t: {"reference": summarise(t, ref_scores[t]), "engine": summarise(t, eng_scores[t])}
                    for t in tasks},
    }


def fidelity_receipt(loaded: LoadedCrab, engine_dir, *, n: int, tasks: tuple[str, ...] = DEMO_TASKS,
                     progress: Callable[[str], None] = lambda message: None) -> dict:
    """:func:`compare` of the engine in ``engine_dir`` against ``loaded`` run by the reference."""
    from edgeav.runtime import Runtime
    from edgeav.systems.crab.onnx_engine import OnnxEngine

    return compare(Runtime(loaded), Runtime(OnnxEngine(engine_dir)), n=n, tasks=tasks, progress=progress)


def receipt(loaded: LoadedCrab, engine_dir, *, n: int, options: dict,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt over the demo tasks whose weight variant the engine holds."""
    progress(f"receipt: comparing with the PyTorch reference on {n} demo clips per task")
    tasks = tuple(t for t in DEMO_TASKS if get_task(t).weights in options["variants"])
    return fidelity_receipt(loaded, engine_dir, n=n, tasks=tasks, progress=progress)


SECOND_FBANK_FRAMES = 98


def audio_frame_range() -> tuple[int, int]:
    """Fewest and most fbank frames in one audio piece the runtime feeds the audio encoder.

    Pieces are exact-second windows (98 frames a second), or cut the authors' way from a task's clip
    whose audio lasts its clip length within ``WHOLE_CLIP_SLACK_S``: ``len // clip_s`` samples per
    second, so 4 to 6 s of a 5-s task's audio give 78 to 118 frames and AVQA's 2-s windows up to 201.
    Computed with the runtime's own cutting and fbank, so the profile follows them.
    """
    from edgeav.media import SAMPLE_RATE
    from edgeav.systems.crab.audio_cut import WHOLE_CLIP_SLACK_S, cut_clip_audio
    from edgeav.preprocess.fbank import fbank

    lengths = set()
    for spec in TASKS.values():
        plan, clip_s = spec.plan_audio(), spec.clip_s
        lengths.add(plan.n_samples)
        for clip_samples in (math.ceil((clip_s - WHOLE_CLIP_SLACK_S) * SAMPLE_RATE),
                             math.floor((clip_s + WHOLE_CLIP_SLACK_S) * SAMPLE_RATE)):
            lengths.add(cut_clip_audio(np.zeros(clip_samples, np.float32), plan, clip_s).shape[1])
    frames = [fbank(np.zeros(n, np.float32)).shape[0] for n in lengths]
    return min(frames), max(frames)


def profiles_for(component: str, config: CrabConfig) -> dict[str, tuple]:
    """One optimization profile per exported component, from the model config (batch 1, Crab's sizes)."""
    size = config.vision.image_size
    if component == "visual":  # up to Crab's 10 clip frames plus the mask frames of one run
        return {"pixels": ((1, 3, size, size), (10, 3, size, size), (16, 3, size, size))}
    if component == "audio":  # every piece length the runtime cuts; most often exact seconds (98 frames)
        fewest, most = audio_frame_range()
        return {"fbank": ((1, fewest, 128), (10, SECOND_FBANK_FRAMES, 128), (16, most, 128))}
    if component == "llm":  # prefill (past 0, up to the whole context) and decode (one token)
        return llm_profiles(config.llm, typical=768)
    if component == "mask":
        return {}
    raise OptionError(f"no TensorRT profile for component {component!r}")
