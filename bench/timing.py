"""Measuring for ``edgeav bench``, whatever the system: timed runs with warm-up excluded, peak memory,
weight bytes, the device's memory bandwidth, the machine and the tool versions."""

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
from edgeav.errors import EdgeavError
from edgeav.stream import rss_mb

# -- timing ----------------------------------------------------------------------------------------


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_runs(run_once: Callable[[], dict], options, device: torch.device) -> list[dict]:
    """``options.warmup`` runs thrown away, then up to ``options.repeats`` runs kept (each: what ``run_once``
    returns, plus ``end_to_end_s``); a row whose kept runs would pass ``options.row_budget_s`` stops early
    (never below one kept run)."""
    kept: list[dict] = []
    spent = 0.0
    for attempt in range(options.warmup + options.repeats):
        if kept and spent + kept[-1]["end_to_end_s"] > options.row_budget_s:
            break
        synchronize(device)
        start = time.perf_counter()
        run = run_once()
        synchronize(device)
        run["end_to_end_s"] = time.perf_counter() - start
        if attempt >= options.warmup:
            kept.append(run)
            spent += run["end_to_end_s"]
    return kept


# -- a row that cannot run ------------------------------------------------------------------------


def row_errors() -> tuple[type[BaseException], ...]:
    """What a backend raises when a row cannot run (ONNX Runtime's errors derive from Exception only)."""
    errors: list[type[BaseException]] = [EdgeavError, RuntimeError, NotImplementedError, ValueError, TypeError,
                                         AttributeError, OSError, MemoryError, AssertionError]
    with contextlib.suppress(ImportError):
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        errors += [getattr(ort_errors, n) for n in ("Fail", "InvalidArgument", "RuntimeException",
                                                    "NotImplemented", "InvalidGraph") if hasattr(ort_errors, n)]
    return tuple(errors)


def one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {text}"[:200]


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
    """Weights of a torch model (every component it holds)."""
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


class RowSkipped(Exception):
    """A bench row that is not run, with the reason its status gives."""


def run_row(row, ctx, builders: dict) -> object:
    """Run ``row`` with the builder of its format (``ctx.progress`` and ``ctx.device`` used): its status says
    skipped, failed (in one line) or what the builder set; memory is given back between rows."""
    import gc

    ctx.progress(f"{row.name}: running")
    try:
        builders[row.format](row, ctx)
    except RowSkipped as skip:
        row.status = f"skipped: {skip}"
    except row_errors() as error:
        row.status = f"failed: {one_line(error)}"
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    ctx.progress(f"{row.name}: {row.status}")
    return row

