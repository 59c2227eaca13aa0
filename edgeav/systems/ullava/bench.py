"""u-LLaVA's ``edgeav bench`` (its System record's ``bench``): the PyTorch reference in fp32 and every
engine its export offers, stage by stage on one generated picture, in one run.

    options = make_options(preset="ullava-tiny", random_weights=True)
    report = run_bench(options)            # report.to_dict(): every number, JSON-ready

Rows: ``torch fp32`` first (the reference every ratio divides by), then each requested format x
precision; by default the ``onnx`` precisions u-LLaVA's export offers. Every row runs the ``res``
prompt on the same picture, drawn as the shapes suite draws its own
(:mod:`edgeav.systems.ullava.evaluate`), with generation teacher-forced on the same ``tokens``
tokens of the trained answer, so every row decodes as much, then SAM on the ``[SEG]`` state; and
GroundingDINO on the expression when the model holds it (engines do not). Stages: ``visual`` (CLIP +
projector), ``prefill``, decode (tokens/s), ``mask`` (SAM's encoder and decoder at the picture's
size), and ``boxes`` timed apart, so that end to end (the ``res`` run, picture to mask) is the same
work in every row. Warm-up runs are excluded; figures are p50/p95 of the timed runs; a row's ratios
are the reference's p50 over its own (above 1: faster). The quality column is the forced gIoU on
``eval_n`` pictures of the suite (random weights: random masks, which still show how far a
precision moves them). A row that cannot run says why. There is no transformers baseline row.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgeav.bench import system_bench
from edgeav.bench.report import write_plot
from edgeav.bench.system_bench import (BenchContext, BenchReport, DeviceStageTimer, Progress, Row, SystemBenchOptions,
                                       TableLayout)
from edgeav.bench.timing import run_row as run_timed_row
from edgeav.bench.timing import PeakMemory, hardware_info, percentiles, tensor_bytes, timed_runs, tool_versions
from edgeav.metrics import mask_giou
from edgeav.systems.ullava.config import PRESETS
from edgeav.systems.ullava.evaluate import SHAPES_SEED, run_forced, shapes_case, trained_answer

STAGES = ("visual", "prefill", "per_token", "mask", "boxes")
SMALL_PRESET = "ullava-tiny"  # --random-weights without --preset
PICTURE_SEED = SHAPES_SEED - 1  # the timed picture: the suite's seeds start one above


def _export_precisions(fmt: str) -> tuple[str, ...]:
    from edgeav.systems.ullava.export import PRECISIONS as EXPORT_PRECISIONS

    return tuple(name for name, spec in EXPORT_PRECISIONS.items() if fmt in spec.formats)


@dataclass(frozen=True)
class UllavaBenchOptions(SystemBenchOptions):
    """What u-LLaVA's bench measures (:class:`~edgeav.bench.system_bench.SystemBenchOptions`): torch fp32 and
    the onnx precisions its export offers by default; ``eval_n`` shapes-suite pictures per row for gIoU."""

    title = "u-LLaVA"
    presets = PRESETS
    small_preset = SMALL_PRESET
    export_precisions = staticmethod(_export_precisions)


def make_options(**values) -> UllavaBenchOptions:
    """:class:`UllavaBenchOptions` from ``edgeav bench``'s options (None: the default)."""
    return UllavaBenchOptions.from_cli(**values)


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class _Context(BenchContext):
    prompt_tokens: int | None = None  # of the res prompt, set by the first run


def forced_tokens(tokenizer, seg_id: int, expression: str, n: int) -> list[int]:
    """``n`` tokens of the trained answer, repeated as needed, with a ``[SEG]`` among them (the last one
    when the answer's own comes later)."""
    answer = tokenizer.encode(trained_answer(expression))
    forced = (answer * (n // len(answer) + 1))[:n]
    if seg_id not in forced:
        forced[-1] = seg_id
    return forced


def _boxes(runtime, picture, phrase: str) -> list:
    """GroundingDINO's boxes for ``phrase`` on ``picture`` (the model's own GroundingDINO), as ``rec`` finds them."""
    from edgeav.models.grounding_dino import detect
    from edgeav.preprocess.grounding_dino import grounding_dino_pixels

    engine = runtime.engine
    short, longest = runtime.config.grounding_size
    pixels = grounding_dino_pixels(picture, short, longest)
    caption = engine.grounding_tokenizer.encode(phrase)
    tensors = [torch.from_numpy(a).to(runtime.device) for a in (pixels.pixel_values, pixels.pixel_mask,
               caption.input_ids, caption.attention_mask, caption.token_type_ids)]
    if isinstance(engine.grounding, torch.nn.Module):  # it may stay fp32 in a half-float run; an engine's takes fp32
        tensors[0] = tensors[0].to(next(engine.grounding.parameters()).dtype)
    with torch.inference_mode():
        logits, boxes = engine.grounding(*tensors)
    return detect(logits, boxes, caption.input_ids, pixels.image_size, engine.grounding_tokenizer.decode)


def _measure(row: Row, runtime, ctx: _Context) -> None:
    """The timed runs of ``runtime`` on the bench picture, and the row's quality column."""
    options = ctx.options
    case = shapes_case(PICTURE_SEED)
    forced = forced_tokens(runtime.tokenizer, runtime.config.token_id("[SEG]"), case.expression, options.tokens)
    grounding = getattr(runtime.engine, "grounding", None) is not None
    if not grounding:
        row.notes.append("no GroundingDINO in this model (engines hold none): no boxes stage, rec boxes the mask")

    def once() -> dict:
        timer = DeviceStageTimer(runtime.device)
        run = run_forced(runtime, case.picture, case.expression, forced=forced, stage=timer.stage)
        ctx.prompt_tokens = run.prompt_tokens
        ms = timer.ms
        return {"visual": ms["visual"], "prefill": run.generation.prefill_s * 1000,
                "decode": run.generation.decode_s * 1000, "mask": ms.get("mask"),
                "decode_steps": len(run.generation.token_ids)}

    def boxes_once() -> dict:
        _boxes(runtime, case.picture, case.expression)
        return {}

    with PeakMemory(runtime.device).watch() as memory:
        runs = timed_runs(once, options, runtime.device)
    row.peak_rss_bytes, row.device_peak_bytes = memory.peak_rss, memory.device_peak
    if len(runs) < options.repeats:
        row.notes.append(f"{len(runs)} of {options.repeats} timed runs: the row budget ran out")
    row.runs, row.decode_steps = runs, runs[0]["decode_steps"]
    for stage in ("visual", "prefill", "decode", "mask"):
        if runs[0][stage] is not None:
            row.stages_ms[stage] = percentiles([run[stage] for run in runs])
    if grounding:  # timed apart, so that end to end means the same work in every row
        boxes = timed_runs(boxes_once, options, runtime.device)
        row.stages_ms["boxes"] = percentiles([run["end_to_end_s"] * 1000 for run in boxes])
    row.stages_ms["per_token"] = percentiles([run["decode"] / max(run["decode_steps"], 1) for run in runs])
    row.end_to_end_s = percentiles([run["end_to_end_s"] for run in runs])
    per_token_s = row.stages_ms["per_token"]["p50"] / 1000
    row.decode_tokens_per_s = 1 / per_token_s if per_token_s > 0 else None
    if options.eval_n:
        cases = [shapes_case(SHAPES_SEED + i) for i in range(options.eval_n)]
        masks = [run_forced(runtime, c.picture, c.expression).mask for c in cases]
        row.metric = mask_giou([np.zeros_like(c.mask) if m is None else m for m, c in zip(masks, cases)],
                               [c.mask for c in cases])


def _torch_row(row: Row, ctx: _Context) -> None:
    runtime = system_bench.torch_runtime(row, ctx)
    engine = runtime.engine
    row.size_bytes = tensor_bytes(engine.model) + (tensor_bytes(engine.grounding) if engine.grounding else 0)
    row.size_kind = "memory"
    _measure(row, runtime, ctx)


def _onnx_row(row: Row, ctx: _Context) -> None:
    _measure(row, system_bench.onnx_runtime(row, ctx), ctx)


ROW_BUILDERS = {"torch": _torch_row, "onnx": _onnx_row, "tensorrt": system_bench.tensorrt_row}


def run_row(row: Row, ctx: _Context) -> Row:
    return run_timed_row(row, ctx, ROW_BUILDERS)


def _load(options: UllavaBenchOptions):
    from edgeav.systems.ullava.checkpoints import load_checkpoint, synthesize

    if options.checkpoint is not None:
        loaded = load_checkpoint(Path(options.checkpoint), options.preset)
        return loaded, f"{options.checkpoint} ({loaded.config.name})"
    preset = options.preset or SMALL_PRESET
    return synthesize(preset, 0), f"{preset}, random weights (seed 0)"


def run_bench(options: UllavaBenchOptions, progress: Progress = lambda message: None) -> BenchReport:
    """Measure every row (see the module docstring) and return the report."""
    device = system_bench.bench_device(options)
    progress(f"loading {options.checkpoint or options.preset or SMALL_PRESET}")
    loaded, model_name = _load(options)
    rows = [Row(f"{fmt} {precision}", fmt, precision) for fmt, precision in options.rows()]
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        ctx = _Context(options, loaded, device, Path(folder), progress)
        for row in rows:
            run_row(row, ctx)
    system_bench.compare(rows, STAGES)
    case = shapes_case(PICTURE_SEED)
    height, width = case.picture.shape[:2]
    benchmark = (f"edgeav bench (u-LLaVA): the res prompt on one generated picture, {options.tokens} forced tokens, "
                 f"p50/p95 of {options.repeats} runs after {options.warmup} warm-up run(s) (warm-up excluded); "
                 "ratios: torch fp32's p50 over the row's")
    details = {"picture": f"shapes picture seed {PICTURE_SEED}, {width}x{height}, res prompt {case.expression!r}",
               "prompt_tokens": ctx.prompt_tokens}
    return BenchReport("ullava", benchmark, options, model_name, details, hardware_info(device, torch.get_num_threads()),
                       tool_versions(), rows)


# -- presenting --------------------------------------------------------------------------------------


def tables(report: BenchReport) -> list:
    """Stage latencies (p50) with size and gIoU; the ratios to torch fp32 with memory
    (:func:`edgeav.bench.system_bench.tables`)."""
    opts = report.options
    title = (f"edgeav bench: {report.model}, u-LLaVA res on a generated picture, {opts.tokens} forced tokens, "
             f"{opts.device}; p50 of up to {opts.repeats} timed runs, {opts.warmup} warm-up run(s) excluded")
    columns = (("visual ms", "visual", "visual"), ("prefill ms", "prefill", "prefill"), ("tok/s", "tok/s", "per_token"),
               ("mask ms", "mask", "mask"), ("boxes ms", "boxes", "boxes"), ("e2e ms", "e2e", "end_to_end"))
    return system_bench.tables(report, TableLayout(title, columns, metric="gIoU"))


def footer(report: BenchReport) -> list[str]:
    """Why rows did not run, the machine, and what the columns mean."""
    return system_bench.footer(report, [
        f"picture: {report.details['picture']}; prompt {report.details['prompt_tokens']} tokens; every row decodes "
        f"the same {report.options.tokens} tokens of the trained answer, teacher-forced",
        "visual = CLIP + projector; tok/s = forced decode steps per second; mask = SAM encoder + [SEG] decoder at "
        "the picture's size; e2e = the res run, picture to mask; boxes = GroundingDINO on the expression, timed "
        "apart (engines hold none)",
        f"gIoU: forced masks on {report.options.eval_n} shapes-suite pictures (random weights: random masks, "
        "comparable across rows); no transformers baseline row for u-LLaVA; p95s and row notes: --json",
    ])


__all__ = ["BenchReport", "Row", "UllavaBenchOptions", "footer", "forced_tokens", "make_options", "run_bench",
           "tables", "write_plot"]
