"""Measuring Crab's rows for ``edgeav bench``: its runtime's and the baseline's timed runs on the clip, the
mask decoder timed apart, and a row's latency fields. What any system's bench measures the same way
(timed runs, peak memory, bytes, bandwidth, the machine): :mod:`edgeav.bench.timing`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgeav.bench.options import TASK, BenchOptions
from edgeav.bench.report import Row
from edgeav.bench.timing import percentiles, synchronize, timed_runs
from edgeav.stages import Trace

if TYPE_CHECKING:
    from edgeav.bench.baseline import BaselineCrab
    from edgeav.runtime import Runtime

# -- measuring -------------------------------------------------------------------------------------


def runtime_runs(runtime: Runtime, clip: Path, forced: list[int], options: BenchOptions) -> list[dict]:
    def once() -> dict:
        trace = Trace(forced=[forced])
        result = runtime.run(clip, TASK, trace=trace)
        timings = dict(result.timings_ms)
        steps = len(trace.logits[0]) - 1  # one distribution from the prefill, one per decode step
        timings["ttft"] = timings["decode"] + timings["visual"] + timings["audio"] + timings["prefill"]
        return {**timings, "decode_steps": steps}

    return timed_runs(once, options, runtime.device)


def baseline_runs(baseline: BaselineCrab, clip: Path, options: BenchOptions) -> list[dict]:
    def once() -> dict:
        run = baseline.run(clip, TASK, new_tokens=options.tokens)
        return {**run.timings_ms, "decode_steps": run.decode_steps}

    return timed_runs(once, options, baseline.device)


def mask_times(model, frame_pixels: torch.Tensor, hidden: torch.Tensor, options: BenchOptions,
               device: torch.device) -> list[float]:
    """Milliseconds of the mask decoder (six hidden states + one frame's CLIP scales -> logits), warm-up excluded."""
    with torch.inference_mode():
        features = model.encode_frames(frame_pixels)
        times = []
        for attempt in range(options.warmup + options.repeats):
            synchronize(device)
            start = time.perf_counter()
            model.mask_logits(hidden, features)
            synchronize(device)
            if attempt >= options.warmup:
                times.append((time.perf_counter() - start) * 1000)
    return times


def summarise_runs(row: Row, runs: list[dict], mask_ms: list[float] | None, clip_s: float,
                   options_repeats: int) -> None:
    """Fill ``row``'s latency fields from its kept runs."""
    row.runs = runs
    steps = runs[0]["decode_steps"]
    if len(runs) < options_repeats:
        row.notes.append(f"{len(runs)} of {options_repeats} timed runs: the row budget ran out")
    row.decode_steps = steps
    for stage in ("decode", "visual", "audio", "prefill"):
        row.stages_ms[stage] = percentiles([run[stage] for run in runs])
    row.stages_ms["per_token"] = percentiles([run["decode_tokens"] / max(steps, 1) for run in runs])
    if mask_ms:
        row.stages_ms["mask"] = percentiles(mask_ms)
    row.ttft_s = {k: v / 1000 for k, v in percentiles([run["ttft"] for run in runs]).items()}
    row.end_to_end_s = percentiles([run["end_to_end_s"] for run in runs])
    per_token_s = row.stages_ms["per_token"]["p50"] / 1000
    row.decode_tokens_per_s = 1 / per_token_s if per_token_s > 0 else None
    row.real_time_factor = row.end_to_end_s["p50"] / clip_s
