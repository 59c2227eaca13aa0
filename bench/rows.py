"""One ``edgeav bench`` row per format: the transformers baseline, torch, onnx and tensorrt (skipped, with why).

A row that cannot run says why in its status (:func:`run_row`) and the others go on.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeav.bench import roofline
from edgeav.bench.baseline import BaselineCrab
from edgeav.bench.measure import baseline_runs, mask_times, runtime_runs, summarise_runs
from edgeav.bench.timing import PeakMemory, RowSkipped, files_bytes, model_bytes, tensor_bytes
from edgeav.bench.timing import run_row as run_timed_row
from edgeav.bench.options import BASELINE, CLIP_SECONDS, INT_GROUP_SIZE, TASK, BenchOptions, Progress
from edgeav.bench.report import Row
from edgeav.systems.crab.checkpoints import LoadedCrab
from edgeav.systems.crab.engine_layout import PRECISIONS as EXPORT_PRECISIONS
from edgeav.errors import OptionError
from edgeav.systems.crab.pipeline import LLM_WEIGHT_GROUP
from edgeav.runtime import Runtime

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _compute(precision: str) -> str:
    """The roofline's compute precision for weights in ``precision`` (weight-only ints compute in fp32)."""
    return {"fp16": "fp16", "bf16": "fp16", "int8": "int8"}.get(precision, "fp32")


@dataclass
class RowContext:
    """What every row shares: the weights, the clip, the forced tokens, the reference's work per stage."""

    options: BenchOptions
    loaded: LoadedCrab
    clip: Path
    forced: list[int]
    prompt_tokens: int
    frame_pixels: np.ndarray  # [1, 3, 224, 224]
    mask_hidden: torch.Tensor  # [6, D]
    flops: dict[str, float]
    device: torch.device
    workdir: Path
    progress: Progress


def _llm_work(row: Row, ctx: RowContext, weight_bytes: int, kv_element_bytes: int) -> None:
    cfg = ctx.loaded.config.llm
    context = roofline.mean_decode_context(ctx.prompt_tokens, row.decode_steps or 0)
    row.bytes_per_token = roofline.decode_bytes_per_token(weight_bytes, cfg, kv_element_bytes, round(context))
    row.stage_work["prefill"] = {"bytes": weight_bytes + roofline.kv_bytes_per_position(cfg, kv_element_bytes)
                                 * ctx.prompt_tokens, "flops": ctx.flops["prefill"]}
    row.stage_work["per_token"] = {"bytes": row.bytes_per_token, "flops": ctx.flops["per_token"]}


def _torch_row(row: Row, ctx: RowContext) -> None:
    options = ctx.options
    llm_weights = row.precision if row.precision in ("int8", "int4") else None
    if llm_weights is not None and ctx.device.type == "cpu":
        raise RowSkipped(f"torch's weight-only {llm_weights} dequantizes on every call on a CPU and decodes slower "
                         "than fp32 (the CLI refuses it there); the onnx rows measure int8 and int4 on a CPU")
    # Weight-only rows compute in fp16 on a GPU (the int4-LLM + fp16-encoders configuration), fp32 on a CPU.
    dtype = TORCH_DTYPES.get(row.precision, torch.float16 if ctx.device.type == "cuda" else torch.float32)
    if row.precision == "fp16" and ctx.device.type == "cpu":
        row.notes.append("fp16 on a CPU: torch runs many fp16 kernels slowly or not at all")
    start = time.perf_counter()
    # A copy: Runtime casts its checkpoint in place and grows KV caches on it, and exports read the shared one.
    loaded = copy.deepcopy(ctx.loaded)
    runtime = Runtime(loaded, device=str(ctx.device), dtype=dtype, llm_weights=llm_weights)
    mask_ms, mask_bytes = None, None
    if "avs" in loaded.variants:
        mask_model = loaded.variant("avs")
        pixels = torch.from_numpy(ctx.frame_pixels).to(ctx.device, dtype)
        mask_ms = mask_times(mask_model, pixels, ctx.mask_hidden.to(ctx.device, dtype), options, ctx.device)
        mask_bytes = model_bytes(mask_model.seg)
    model = loaded.variant("joint")
    if llm_weights is not None:
        row.notes.append(f"LLM projections {llm_weights} weight-only (Runtime(llm_weights=...), edgeav.kernels; "
                         + ("per channel" if llm_weights == "int8" else f"groups of {LLM_WEIGHT_GROUP}")
                         + f"); I-LoRA, LM head, encoders and mask decoder {str(dtype).removeprefix('torch.')}")
    row.build_s = time.perf_counter() - start
    row.size_bytes, row.size_kind = model_bytes(model), "memory"
    with PeakMemory(ctx.device).watch() as memory:
        runs = runtime_runs(runtime, ctx.clip, ctx.forced, options)
    row.peak_rss_bytes, row.device_peak_bytes = memory.peak_rss, memory.device_peak
    summarise_runs(row, runs, mask_ms, CLIP_SECONDS, ctx.options.repeats)
    kv_cache = model.llm.model.layers[0].self_attn.kv_cache
    kv_bytes = kv_cache.k_cache.element_size() if kv_cache is not None else torch.finfo(dtype).bits // 8
    _llm_work(row, ctx, tensor_bytes(model.llm, embedding="model.embed_tokens.weight"), kv_bytes)
    compute = _compute(row.precision) if llm_weights is None else "fp32" if dtype == torch.float32 else "fp16"
    for stage, parts in (("visual", (model.vision, model.visual_projector)), ("audio", (model.audio, model.audio_projector))):
        row.stage_work[stage] = {"bytes": sum(model_bytes(p) for p in parts), "flops": ctx.flops[stage]}
    if mask_bytes is not None:
        row.stage_work["mask"] = {"bytes": mask_bytes, "flops": ctx.flops["mask"]}
    for work in row.stage_work.values():
        work["compute"] = compute
    if ctx.options.demo_weights and options.eval_n:
        row.metric = _suite_metric(runtime, options.eval_n)


def _onnx_row(row: Row, ctx: RowContext) -> None:
    from edgeav.export.exporter import export_engine

    if row.precision not in EXPORT_PRECISIONS:
        offered = ", ".join(p for p, spec in EXPORT_PRECISIONS.items() if "onnx" in spec.formats)
        raise RowSkipped(f"onnx engines offer {offered}")
    if ctx.device.type != "cpu":
        raise RowSkipped("the onnx backend runs on the CPU only (no onnxruntime-gpu backend yet); drop --device cuda")
    start = time.perf_counter()
    folder = export_engine(ctx.loaded, ctx.workdir / f"onnx-{row.precision}", precision=row.precision,
                           block_size=INT_GROUP_SIZE, receipt_n=0, variants=("joint", "avs"),
                           progress=lambda message: ctx.progress(f"  {row.name}: {message}"))
    row.build_s = time.perf_counter() - start
    row.size_bytes, row.size_kind = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()), "disk"
    runtime = Runtime.from_engine(folder, threads=ctx.options.threads or torch.get_num_threads())
    mask_ms = mask_times(runtime.engine.variant("avs"), torch.from_numpy(ctx.frame_pixels), ctx.mask_hidden,
                         ctx.options, ctx.device)
    with PeakMemory(ctx.device).watch() as memory:
        runs = runtime_runs(runtime, ctx.clip, ctx.forced, ctx.options)
    row.peak_rss_bytes = memory.peak_rss
    summarise_runs(row, runs, mask_ms, CLIP_SECONDS, ctx.options.repeats)
    manifest = runtime.engine.manifest
    components = EXPORT_PRECISIONS[row.precision].components
    llm_graph = manifest["variants"]["joint"]["llm"]
    # The graph holds every LLM weight but the embedding table, which decoding reads one row of (fp32).
    embedding_row = ctx.loaded.config.llm.hidden_size * 4
    _llm_work(row, ctx, files_bytes(folder, llm_graph) + embedding_row, 4)
    row.stage_work["prefill"]["compute"] = row.stage_work["per_token"]["compute"] = _compute(components["llm"])
    for stage, graph, component in (("visual", "visual", "visual"), ("audio", "audio", "audio"),
                                    ("mask", "mask_avs", "mask")):
        row.stage_work[stage] = {"bytes": files_bytes(folder, graph), "flops": ctx.flops[stage],
                                 "compute": _compute(components[component])}
    row.notes.append("sizes and weight bytes: the engine's files on disk")
    if ctx.options.demo_weights and ctx.options.eval_n:
        row.metric = _suite_metric(runtime, ctx.options.eval_n)


def _tensorrt_row(row: Row, ctx: RowContext) -> None:
    offered = [name for name, spec in EXPORT_PRECISIONS.items() if "tensorrt" in spec.formats]
    if row.precision not in offered:
        raise RowSkipped(f"TensorRT builds here offer {', '.join(offered)}; {row.precision} is not one of them")
    if not _tensorrt_installed():
        raise RowSkipped("TensorRT not installed")
    raise RowSkipped("edgeav has no TensorRT runtime backend yet (edgeav export --format tensorrt builds engines "
                "that nothing here can run)")


def _baseline_row(row: Row, ctx: RowContext) -> None:
    from edgeav.bench.baseline import import_transformers

    try:
        import_transformers()
    except OptionError:
        raise RowSkipped("transformers not installed (pip install transformers)") from None
    start = time.perf_counter()
    loaded = ctx.loaded if ctx.device.type == "cpu" else copy.deepcopy(ctx.loaded).to(ctx.device, torch.float32)
    baseline = BaselineCrab(loaded, device=str(ctx.device))
    row.build_s = time.perf_counter() - start
    mask_ms, mask_bytes = None, None
    if "avs" in loaded.variants:
        mask_model = loaded.variant("avs")
        mask_ms = mask_times(mask_model, torch.from_numpy(ctx.frame_pixels).to(ctx.device),
                             ctx.mask_hidden.to(ctx.device), ctx.options, ctx.device)
        mask_bytes = model_bytes(mask_model.seg)
    model = loaded.variant("joint")
    encoders = (model.vision, model.visual_projector, model.audio, model.audio_projector)
    row.size_bytes = tensor_bytes(baseline.hf) + sum(model_bytes(m) for m in encoders) + (mask_bytes or 0)
    row.size_kind = "memory"
    with PeakMemory(ctx.device).watch() as memory:
        runs = baseline_runs(baseline, ctx.clip, ctx.options)
    row.peak_rss_bytes, row.device_peak_bytes = memory.peak_rss, memory.device_peak
    summarise_runs(row, runs, mask_ms, CLIP_SECONDS, ctx.options.repeats)
    _llm_work(row, ctx, tensor_bytes(baseline.hf, embedding="model.embed_tokens.weight"), 4)
    for stage, parts in (("visual", encoders[:2]), ("audio", encoders[2:])):
        row.stage_work[stage] = {"bytes": sum(model_bytes(p) for p in parts), "flops": ctx.flops[stage]}
    if mask_bytes is not None:
        row.stage_work["mask"] = {"bytes": mask_bytes, "flops": ctx.flops["mask"]}
    for work in row.stage_work.values():
        work["compute"] = "fp32"
    row.notes.append("transformers LlamaForCausalLM fp32, eager attention, I-LoRA as separate modules, "
                     "HF generate (greedy); edgeav's encoders")
    if ctx.options.demo_weights and ctx.options.eval_n:
        row.metric = _baseline_metric(baseline, ctx.options.eval_n)


def _suite_metric(runtime: Runtime, n: int) -> float:
    from edgeav.systems.crab.evaluate import evaluate

    return evaluate(runtime, n=n, tasks=(TASK,)).metrics[TASK]["accuracy"]


def _baseline_metric(baseline: BaselineCrab, n: int) -> float:
    from edgeav.systems.crab.evaluate import score, suite_cases, summarise

    scores: dict[str, list] = {}
    for case in suite_cases(TASK, n):
        score(case, baseline.run(case.path, TASK), scores)
    return summarise(TASK, scores)["accuracy"]


ROW_BUILDERS = {"torch": _torch_row, "onnx": _onnx_row, "tensorrt": _tensorrt_row, BASELINE: _baseline_row}


def run_row(row: Row, ctx: RowContext) -> Row:
    return run_timed_row(row, ctx, ROW_BUILDERS)
