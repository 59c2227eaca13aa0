"""Measuring a row for ``edgeav bench``: timed runs, peak memory, weight bytes, memory bandwidth, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from edgeav import __version__
from edgeav.bench.baseline import BaselineCrab
from edgeav.bench.options import TASK, BenchOptions
from edgeav.bench.report import Row
from edgeav.runtime import Runtime
from edgeav.stages import Trace
from edgeav.stream import rss_mb

# -- measuring -------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    return round(rss_mb() * 2**20)


class PeakMemory:
    """Highest host RSS (sampled every 10 ms on a thread) and torch's CUDA peak while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = 0
        self.device_peak: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_rss = max(self.peak_rss, _rss_bytes())

    @contextlib.contextmanager
    def watch(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss = _rss_bytes()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak_rss = max(self.peak_rss, _rss_bytes())
            if self.device.type == "cuda":
                self.device_peak = torch.cuda.max_memory_allocated()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 and p95 (linear interpolation between the sorted values)."""
    data = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(data, 50)), "p95": float(np.percentile(data, 95))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed_runs(run_once: Callable[[], dict], options: BenchOptions, device: torch.device) -> list[dict]:
    """``warmup`` runs thrown away, then up to ``repeats`` runs kept (each: stage ms, end_to_end_s, decode_steps);
    a row whose kept runs would pass ``row_budget_s`` stops early (never below one kept run)."""
    kept: list[dict] = []
    spent = 0.0
    for attempt in range(options.warmup + options.repeats):
        if kept and spent + kept[-1]["end_to_end_s"] > options.row_budget_s:
            break
        _sync(device)
        start = time.perf_counter()
        run = run_once()
        _sync(device)
        run["end_to_end_s"] = time.perf_counter() - start
        if attempt >= options.warmup:
            kept.append(run)
            spent += run["end_to_end_s"]
    return kept


def runtime_runs(runtime: Runtime, clip: Path, forced: list[int], options: BenchOptions) -> list[dict]:
    def once() -> dict:
        trace = Trace(forced=[forced])
        result = runtime.run(clip, TASK, trace=trace)
        timings = dict(result.timings_ms)
        steps = len(trace.logits[0]) - 1  # one distribution from the prefill, one per decode step
        timings["ttft"] = timings["decode"] + timings["visual"] + timings["audio"] + timings["prefill"]
        return {**timings, "decode_steps": steps}

    return _timed_runs(once, options, runtime.device)


def baseline_runs(baseline: BaselineCrab, clip: Path, options: BenchOptions) -> list[dict]:
    def once() -> dict:
        run = baseline.run(clip, TASK, new_tokens=options.tokens)
        return {**run.timings_ms, "decode_steps": run.decode_steps}

    return _timed_runs(once, options, baseline.device)


def mask_times(model, frame_pixels: torch.Tensor, hidden: torch.Tensor, options: BenchOptions,
               device: torch.device) -> list[float]:
    """Milliseconds of the mask decoder (six hidden states + one frame's CLIP scales -> logits), warm-up excluded."""
    with torch.inference_mode():
        features = model.encode_frames(frame_pixels)
        times = []
        for attempt in range(options.warmup + options.repeats):
            _sync(device)
            start = time.perf_counter()
            model.mask_logits(hidden, features)
            _sync(device)
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


# -- sizes, bytes and bandwidth -------------------------------------------------------------------------

_NOT_WEIGHTS = ("kv_cache", "causal_mask", "rope_", "rotary_emb")


def tensor_bytes(module: torch.nn.Module, *, embedding: str | None = None, skip: tuple[str, ...] = _NOT_WEIGHTS) -> int:
    """Bytes of the weights ``module`` holds (parameters and buffers, each storage once); the tensor named
    ``embedding`` counts one row, as one decode step reads one row of it."""
    seen: set[int] = set()
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor is None or any(part in name for part in skip) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        nbytes = tensor.numel() * tensor.element_size()
        total += nbytes // tensor.shape[0] if name == embedding else nbytes
    return total


def model_bytes(model) -> int:
    """Weights of a torch CrabModel (every component), or of any module."""
    return tensor_bytes(model)


def files_bytes(folder: Path, stem: str) -> int:
    """An exported graph's bytes on disk (the .onnx and its external .data)."""
    return sum(p.stat().st_size for p in (folder / f"{stem}.onnx", folder / f"{stem}.onnx.data") if p.exists())


def host_memcpy_bandwidth(size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes per second a large host memcpy moves (read + write), the best of ``repeats``."""
    source = torch.ones(size_bytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


# Peak memory bandwidth of GPUs by name (bytes/s), from their vendors' datasheets.
GPU_BANDWIDTH = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 864e9), ("L4", 300e9), ("A10G", 600e9),
    ("RTX 4090", 1008e9), ("Orin", 204.8e9), ("Thor", 273e9),
)


def device_peak_bandwidth(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bandwidth in GPU_BANDWIDTH:
            if key in name:
                return {"bytes_per_s": bandwidth, "how": f"spec table ({key}: {bandwidth / 1e9:.0f} GB/s)"}
        source = torch.ones(256 << 18, device=device)
        target = torch.empty_like(source)
        target.copy_(source)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            target.copy_(source)
        torch.cuda.synchronize()
        measured = 2 * source.numel() * 4 * 10 / (time.perf_counter() - start)
        return {"bytes_per_s": measured, "how": f"measured: device memcpy of 256 MiB on {name} (read + write)"}
    bandwidth = host_memcpy_bandwidth()
    return {"bytes_per_s": bandwidth, "how": "measured: host memcpy of 256 MiB (read + write), best of 5"}


def hardware_info(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def tool_versions() -> dict:
    versions = {"edgeav": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("onnxruntime", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions
