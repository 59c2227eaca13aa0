"""``edgeav bench``: every format x precision on one 10-s AVE clip, against the original way of running Crab.

    report = run_bench(BenchOptions(preset="crab-small", random_weights=True))
    report.to_dict()                       # every number, JSON-ready
    write_plot(report, "bench.png")        # bars of end-to-end latency and decode tokens/s

Rows, in order:

1. the baseline (:mod:`edgeav.bench.baseline`): transformers' Llama, fp32, eager attention,
   the I-LoRA as separate modules, HF ``generate``, edgeav's encoders;
2. ``torch`` (the reference engine) in each precision: fp32, bf16 and fp16 cast the whole model,
   int8 and int4 store the LLM's projections weight-only (``Runtime(llm_weights=...)``, edgeav.kernels);
3. ``onnx`` engines exported by :func:`edgeav.export.exporter.export_engine` (served from the
   export cache when the same weights were exported before);
4. ``tensorrt``: reported as skipped, with the reason (never pretended).

Every row runs the same clip with generation teacher-forced on the same ``tokens`` tokens (the
baseline: ``min_new_tokens`` = ``max_new_tokens``), so each decodes exactly as many tokens. Warm-up
runs are excluded; stage times are p50/p95 over the ``repeats`` runs that follow. The mask decoder
(which AVE does not use) is timed on its own, on one frame's CLIP features. A row that cannot run
says why in its status and the others go on.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import importlib.util
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from edgeav import __version__
from edgeav.bench import roofline
from edgeav.bench.baseline import BaselineCrab, build_prompt
from edgeav.checkpoints import LoadedCrab, load_converted, synthesize
from edgeav.config import PRESETS
from edgeav.engines.manifest import PRECISIONS as EXPORT_PRECISIONS
from edgeav.errors import EdgeavError, OptionError
from edgeav.runtime import DEMO_DIR, LLM_WEIGHT_GROUP, Runtime, Trace
from edgeav.stream import rss_mb

FORMATS = ("torch", "onnx", "tensorrt")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8", "int4")  # bf16 on request: on a CPU it is as slow as fp16
DEVICES = ("cpu", "cuda")
STAGE_NAMES = ("decode", "visual", "audio", "prefill", "per_token", "mask")
TASK = "ave"
CLIP_SEED = 7  # the world clip export_bench also runs
INT_GROUP_SIZE = 32  # int4 block / group size, the exporter's default
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASELINE = "baseline"
Progress = Callable[[str], None]


# -- options ---------------------------------------------------------------------------------------


def parse_choices(value: str | tuple[str, ...] | list[str], allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each checked against ``allowed`` (an unknown one gets the closest match)."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [v.strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise OptionError(f"{option}: empty; expected some of {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            close = difflib.get_close_matches(item, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"{option} {item!r}: expected some of {', '.join(allowed)} (comma-separated).{hint}")
    return tuple(dict.fromkeys(items))


def check_output_path(path: Path | None, option: str, suffix: str | None = None) -> None:
    """A file the run will write: its folder must exist, and it must not be a folder itself."""
    if path is None:
        return
    if path.is_dir():
        raise OptionError(f"{option} {path}: is a folder; name a file to write")
    if not path.parent.is_dir():
        raise OptionError(f"{option} {path}: folder {path.parent} does not exist; create it first")
    if suffix and path.suffix.lower() != suffix:
        raise OptionError(f"{option} {path}: expected a {suffix} file name")


@dataclass(frozen=True)
class BenchOptions:
    """What ``edgeav bench`` measures; checked on creation, before any model loads.

    ``threads``: torch and ONNX Runtime intra-op threads (None: torch's current setting for both).
    ``eval_n``: demo-suite AVE clips per row for the metric (only with the demo model's weights).
    ``row_budget_s``: seconds of timed runs per row after which a slow row (fp16 on a CPU) stops short of
    ``repeats``; its ``runs`` say how many it kept.
    """

    preset: str = "crab-tiny"
    random_weights: bool = False
    formats: tuple[str, ...] = FORMATS
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    device: str = "cpu"
    repeats: int = 3
    row_budget_s: float = 60.0
    warmup: int = 1
    tokens: int = 32
    eval_n: int = 4
    threads: int | None = None
    project: str | None = None
    json_path: Path | None = None
    plot_path: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", parse_choices(self.formats, FORMATS, "--formats"))
        object.__setattr__(self, "precisions", parse_choices(self.precisions, PRECISIONS, "--precisions"))
        if self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, PRESETS, n=1)
            raise OptionError(f"--preset {self.preset!r}: expected one of {', '.join(PRESETS)}"
                              + (f". Did you mean {close[0]!r}?" if close else ""))
        if not self.random_weights and self.preset != "crab-tiny":
            raise OptionError(f"--preset {self.preset} has no weights of its own; add --random-weights "
                              "(crab-tiny without it runs the demo model)")
        if self.device not in DEVICES:
            raise OptionError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.project is not None:
            roofline.device_spec(self.project)
        for name, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                   ("--tokens", self.tokens, 2), ("--eval-n", self.eval_n, 0)):
            if value < least:
                raise OptionError(f"{name} must be at least {least}, got {value}")
        if self.row_budget_s <= 0:
            raise OptionError(f"--row-budget must be positive, got {self.row_budget_s}")
        if self.threads is not None and self.threads < 1:
            raise OptionError(f"--threads must be at least 1, got {self.threads}")
        check_output_path(self.json_path, "--json")
        check_output_path(self.plot_path, "--plot", ".png")

    @property
    def demo_weights(self) -> bool:
        return self.preset == "crab-tiny" and not self.random_weights


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One format x precision (or the baseline). Times in seconds unless the name says ms; None: not measured."""

    name: str
    format: str
    precision: str
    status: str = "ok"
    size_bytes: int | None = None
    size_kind: str = ""  # "memory" (weights held by torch) or "disk" (engine files)
    metric: float | None = None
    stages_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {"p50", "p95"}
    ttft_s: dict[str, float] | None = None
    end_to_end_s: dict[str, float] | None = None
    decode_tokens_per_s: float | None = None
    real_time_factor: float | None = None
    peak_rss_bytes: int | None = None
    device_peak_bytes: int | None = None
    bytes_per_token: float | None = None
    achieved_bandwidth: float | None = None  # bytes/s
    bandwidth_share: float | None = None
    speedup_end_to_end: float | None = None
    speedup_decode: float | None = None
    decode_steps: int | None = None
    build_s: float | None = None
    stage_work: dict[str, dict] = field(default_factory=dict)  # stage -> bytes, flops, compute precision
    projection: dict | None = None
    not_projected: str | None = None  # why --project gave this row no projection
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BenchReport:
    options: BenchOptions
    model: str
    clip: str
    prompt_tokens: int
    hardware: dict
    versions: dict
    peak_bandwidth: dict  # bytes_per_s, how ("spec table" or "measured ...")
    flops: dict[str, float]
    rows: list[Row]
    projection_device: dict | None = None

    def to_dict(self) -> dict:
        options = asdict(self.options)
        options.update({k: str(v) if v is not None else None for k, v in options.items() if k.endswith("_path")})
        return {
            "benchmark": f"edgeav bench: one {CLIP_SECONDS} s {TASK.upper()} clip, {self.options.tokens} forced "
                         f"tokens, p50/p95 of {self.options.repeats} runs after {self.options.warmup} warm-up "
                         "run(s) (warm-up excluded)",
            "options": options, "model": self.model, "clip": self.clip, "prompt_tokens": self.prompt_tokens,
            "hardware": self.hardware, "versions": self.versions, "peak_bandwidth": self.peak_bandwidth,
            "flops_per_stage": self.flops,
            "projection": None if self.projection_device is None else {
                "kind": "roofline projection from published specs, NOT a measurement",
                "device": self.projection_device,
                "rows": {row.name: row.projection for row in self.rows if row.projection},
                "not_projected": {row.name: row.not_projected for row in self.rows if row.not_projected}},
            "rows": [asdict(row) for row in self.rows],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


CLIP_SECONDS = 10


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


def _files_bytes(folder: Path, stem: str) -> int:
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


# -- the rows -------------------------------------------------------------------------------------


def _row_errors() -> tuple[type[BaseException], ...]:
    """What a backend raises when a row cannot run (ONNX Runtime's errors derive from Exception only)."""
    errors: list[type[BaseException]] = [EdgeavError, RuntimeError, NotImplementedError, ValueError, TypeError,
                                         AttributeError, OSError, MemoryError, AssertionError]
    with contextlib.suppress(ImportError):
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        errors += [getattr(ort_errors, n) for n in ("Fail", "InvalidArgument", "RuntimeException",
                                                    "NotImplemented", "InvalidGraph") if hasattr(ort_errors, n)]
    return tuple(errors)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {text}"[:200]


def _tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def _compute(precision: str) -> str:
    """The roofline's compute precision for weights in ``precision`` (weight-only ints compute in fp32)."""
    return {"fp16": "fp16", "bf16": "fp16", "int8": "int8"}.get(precision, "fp32")


@dataclass
class _Context:
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


class _Skip(Exception):
    """A row that is not run, with the reason its status gives."""


def _llm_work(row: Row, ctx: _Context, weight_bytes: int, kv_element_bytes: int) -> None:
    cfg = ctx.loaded.config.llm
    context = roofline.mean_decode_context(ctx.prompt_tokens, row.decode_steps or 0)
    row.bytes_per_token = roofline.decode_bytes_per_token(weight_bytes, cfg, kv_element_bytes, round(context))
    row.stage_work["prefill"] = {"bytes": weight_bytes + roofline.kv_bytes_per_position(cfg, kv_element_bytes)
                                 * ctx.prompt_tokens, "flops": ctx.flops["prefill"]}
    row.stage_work["per_token"] = {"bytes": row.bytes_per_token, "flops": ctx.flops["per_token"]}


def _torch_row(row: Row, ctx: _Context) -> None:
    options = ctx.options
    llm_weights = row.precision if row.precision in ("int8", "int4") else None
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
                         + f"); I-LoRA, LM head, encoders and mask decoder {str(dtype).removeprefix('torch.')}"
                         + ("; on a CPU the layers dequantize per call" if ctx.device.type == "cpu" else ""))
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


def _onnx_row(row: Row, ctx: _Context) -> None:
    from edgeav.export.exporter import export_engine

    if row.precision not in EXPORT_PRECISIONS:
        offered = ", ".join(p for p, spec in EXPORT_PRECISIONS.items() if "onnx" in spec.formats)
        raise _Skip(f"onnx engines offer {offered}")
    if ctx.device.type != "cpu":
        raise _Skip("the onnx backend runs on the CPU only (no onnxruntime-gpu backend yet); drop --device cuda")
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
    _llm_work(row, ctx, _files_bytes(folder, llm_graph) + embedding_row, 4)
    row.stage_work["prefill"]["compute"] = row.stage_work["per_token"]["compute"] = _compute(components["llm"])
    for stage, graph, component in (("visual", "visual", "visual"), ("audio", "audio", "audio"),
                                    ("mask", "mask_avs", "mask")):
        row.stage_work[stage] = {"bytes": _files_bytes(folder, graph), "flops": ctx.flops[stage],
                                 "compute": _compute(components[component])}
    row.notes.append("sizes and weight bytes: the engine's files on disk")
    if ctx.options.demo_weights and ctx.options.eval_n:
        row.metric = _suite_metric(runtime, ctx.options.eval_n)


def _tensorrt_row(row: Row, ctx: _Context) -> None:
    offered = [name for name, spec in EXPORT_PRECISIONS.items() if "tensorrt" in spec.formats]
    if row.precision not in offered:
        raise _Skip(f"TensorRT builds here offer {', '.join(offered)}; {row.precision} is not one of them")
    if not _tensorrt_installed():
        raise _Skip("TensorRT not installed")
    raise _Skip("edgeav has no TensorRT runtime backend yet (edgeav export --format tensorrt builds engines "
                "that nothing here can run)")


def _baseline_row(row: Row, ctx: _Context) -> None:
    from edgeav.bench.baseline import import_transformers

    try:
        import_transformers()
    except OptionError:
        raise _Skip("transformers not installed (pip install transformers)") from None
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
    from edgeav.evaluate import evaluate

    return evaluate(runtime, n=n, tasks=(TASK,)).metrics[TASK]["accuracy"]


def _baseline_metric(baseline: BaselineCrab, n: int) -> float:
    from edgeav.evaluate import score, suite_cases, summarise

    scores: dict[str, list] = {}
    for case in suite_cases(TASK, n):
        score(case, baseline.run(case.path, TASK), scores)
    return summarise(TASK, scores)["accuracy"]


ROW_BUILDERS = {"torch": _torch_row, "onnx": _onnx_row, "tensorrt": _tensorrt_row, BASELINE: _baseline_row}


def _run_row(row: Row, ctx: _Context) -> Row:
    ctx.progress(f"{row.name}: running")
    try:
        ROW_BUILDERS[row.format](row, ctx)
    except _Skip as skip:
        row.status = f"skipped: {skip}"
    except _row_errors() as error:
        row.status = f"failed: {_one_line(error)}"
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    ctx.progress(f"{row.name}: {row.status}")
    return row


# -- the run ---------------------------------------------------------------------------------------


def _load(options: BenchOptions) -> tuple[LoadedCrab, str]:
    if options.demo_weights:
        if not (DEMO_DIR / "model.safetensors").is_file():
            raise OptionError(f"{DEMO_DIR}: the demo model is not installed; pass --random-weights")
        loaded = load_converted(DEMO_DIR)
        loaded.source = "edgeav demo model"
        return loaded, f"{loaded.source} (crab-tiny)"
    return synthesize(options.preset, 0), f"{options.preset}, random weights (seed 0)"


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters without requires_grad for a while (torch's FLOP counter hooks every tensor that wants grads)."""
    wanted = [p for p in module.parameters() if p.requires_grad]
    for param in wanted:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in wanted:
            param.requires_grad_(True)


def _reference_flops(loaded: LoadedCrab, pixels: np.ndarray, fbank: np.ndarray, hidden: torch.Tensor) -> dict:
    """FLOPs of the encoders and the mask decoder at this run's shapes, counted by torch's FLOP counter on the
    fp32 reference modules (matmuls, convolutions, attention)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The math attention path: the counter does not see the fused CPU attention kernel's matmuls.
    math_attention = sdpa_kernel(SDPBackend.MATH)
    model = loaded.variant("joint")
    counts = {}
    with torch.no_grad(), _frozen(model), math_attention:
        for stage, call in (("visual", lambda: model.encode_frames(torch.from_numpy(pixels))),
                            ("audio", lambda: model.encode_audio(torch.from_numpy(fbank)))):
            with FlopCounterMode(display=False) as counter:
                call()
            counts[stage] = float(counter.get_total_flops())
    if "avs" in loaded.variants:
        avs = loaded.variant("avs")
        with torch.no_grad(), _frozen(avs), sdpa_kernel(SDPBackend.MATH):
            features = avs.encode_frames(torch.from_numpy(pixels[:1]))
            with FlopCounterMode(display=False) as counter:
                avs.mask_logits(hidden, features)
            counts["mask"] = float(counter.get_total_flops())
        loaded.variant("joint")
    return counts


def run_bench(options: BenchOptions, progress: Progress = lambda message: None) -> BenchReport:
    """Measure every row (see the module docstring) and return the report."""
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device cuda: torch {torch.__version__} sees no CUDA device; drop --device cuda "
                          "or install a CUDA build of torch")
    if options.threads:
        torch.set_num_threads(options.threads)
    threads = torch.get_num_threads()
    from edgeav.bench import world

    progress(f"loading {'the demo model' if options.demo_weights else options.preset}")
    loaded, model_name = _load(options)
    cfg = loaded.config
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        workdir = Path(folder)
        clip = world.write_clip(world.sample_clip(CLIP_SEED, TASK, duration_s=CLIP_SECONDS), workdir / "ave.mp4")
        prompt = build_prompt(loaded.variant("joint"), loaded.tokenizer, clip, TASK)
        prompt_tokens = prompt.embeds.shape[1]
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(cfg.seg.num_mask_tokens, cfg.llm.hidden_size, generator=generator)
        flops = _reference_flops(loaded, prompt.pixels, prompt.fbank, hidden)
        steps = options.tokens  # the runtime's forced decode runs one forward pass per forced token
        flops["prefill"] = float(roofline.llm_prefill_flops(cfg.llm, cfg.lora, prompt_tokens))
        flops["per_token"] = float(roofline.llm_flops_per_token(
            cfg.llm, cfg.lora, round(roofline.mean_decode_context(prompt_tokens, steps))))
        forced = (loaded.tokenizer.encode("the time range is") * options.tokens)[: options.tokens]
        ctx = _Context(options, loaded, clip, forced, prompt_tokens, prompt.pixels[:1], hidden, flops, device,
                       workdir, progress)
        progress("measuring the peak memory bandwidth")
        peak = device_peak_bandwidth(device)
        rows = [Row("baseline: transformers fp32 eager", BASELINE, "fp32")]
        rows += [Row(f"{fmt} {precision}", fmt, precision) for fmt in options.formats for precision in options.precisions]
        for row in rows:
            _run_row(row, ctx)
    _compare(rows, peak["bytes_per_s"])
    report = BenchReport(options, model_name, f"world clip seed {CLIP_SEED}, {CLIP_SECONDS} s {TASK}, 320x240",
                         prompt_tokens, hardware_info(device, threads), tool_versions(), peak, flops, rows)
    if options.project:
        spec = roofline.device_spec(options.project)
        report.projection_device = {"key": options.project, "name": spec.name, "bandwidth_bytes_per_s": spec.bandwidth,
                                    "peak_ops_per_s": spec.peak_flops, "sources": spec.sources}
        for row in rows:
            if not row.ok:
                continue
            row.not_projected = roofline.projection_refusal(row.stage_work["per_token"]["bytes"], spec)
            if row.not_projected is None:
                row.projection = project_row(row, spec)
    return report


def _compare(rows: list[Row], peak_bandwidth: float) -> None:
    """Speed-ups over the baseline (when it ran) and achieved bandwidth, for every row that ran."""
    base = rows[0] if rows and rows[0].ok else None
    for row in rows:
        if not row.ok:
            continue
        if row.bytes_per_token and row.decode_tokens_per_s:
            row.achieved_bandwidth = row.bytes_per_token * row.decode_tokens_per_s
            row.bandwidth_share = row.achieved_bandwidth / peak_bandwidth
        if base is not None:
            row.speedup_end_to_end = base.end_to_end_s["p50"] / row.end_to_end_s["p50"]
            if base.decode_tokens_per_s and row.decode_tokens_per_s:
                row.speedup_decode = row.decode_tokens_per_s / base.decode_tokens_per_s


def project_row(row: Row, device: roofline.DeviceSpec) -> dict:
    """The roofline projection of ``row``'s stages on ``device`` (a lower bound, not a measurement)."""
    stages = {}
    for stage, work in row.stage_work.items():
        stages[stage] = roofline.project(roofline.StageWork(work["bytes"], work["flops"], work["compute"]), device)
    per_token = stages["per_token"]["seconds"]
    steps = row.decode_steps or 0
    model_s = sum(stages[s]["seconds"] for s in ("visual", "audio", "prefill")) + steps * per_token
    return {"stages": stages, "decode_tokens_per_s": 1 / per_token if per_token else None,
            "ttft_model_s": sum(stages[s]["seconds"] for s in ("visual", "audio", "prefill")),
            "end_to_end_model_s": model_s,
            "excludes": "media decode (a hardware decoder's job there) and host overheads"}


# -- presenting --------------------------------------------------------------------------------------

TABLE_WIDTH = 100  # columns the printed tables fit in; every number is in --json


def _p50(stats: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if not stats else f"{stats['p50'] * scale:.{digits}f}"


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _shown_name(row: Row) -> str:
    return "baseline (HF)" if row.format == BASELINE else row.name


def _statuses(report: BenchReport) -> dict[str, int]:
    """Each status other than "ok", numbered for the footnotes the tables point to."""
    numbered: dict[str, int] = {}
    for row in report.rows:
        if not row.ok and row.status not in numbered:
            numbered[row.status] = len(numbered) + 1
    return numbered


def _table(title: str, columns: tuple[str, ...]):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    for n, column in enumerate(columns):
        table.add_column(column, justify="left" if n == 0 else "right", no_wrap=n == 0)
    return table


def tables(report: BenchReport) -> list:
    """rich tables, each within :data:`TABLE_WIDTH` columns: throughput and quality; stage latencies (p50);
    memory and bandwidth; the projection (when asked and meaningful). A row that did not run points to
    the footnote saying why (:func:`footer`); p95s and every other number are in the JSON."""
    opts = report.options
    footnotes = _statuses(report)
    speed = _table(f"edgeav bench: {report.model}, {CLIP_SECONDS} s AVE clip, {opts.tokens} forced tokens, "
                   f"{opts.device}; p50 of up to {opts.repeats} timed runs, {opts.warmup} warm-up run(s) excluded",
                   ("row", "status", "size MB", "AVE acc", "TTFT s", "tok/s", "e2e s", "RTF", "e2e x", "tok/s x"))
    stages = _table("stage latency, p50 ms (p95 in --json)", ("row", *[f"{s}" for s in STAGE_NAMES]))
    memory = _table(f"memory and bandwidth (peak {report.peak_bandwidth['bytes_per_s'] / 1e9:.1f} GB/s, "
                    f"{report.peak_bandwidth['how'].split(':')[0]})",
                    ("row", "runs", "RSS MiB", "GPU MiB", "MB/token", "GB/s", "% peak", "build s"))
    for row in report.rows:
        name = _shown_name(row)
        status = "ok" if row.ok else f"{row.status.split(':')[0].replace('skipped', 'skip')} [{footnotes[row.status]}]"
        size = "-" if row.size_bytes is None else f"{row.size_bytes / 1e6:.1f} {row.size_kind.replace('memory', 'mem')}"
        speed.add_row(name, status, size, "-" if row.metric is None else f"{row.metric:.3f}",
                      "-" if not row.ttft_s else f"{row.ttft_s['p50']:.2f}",
                      "-" if row.decode_tokens_per_s is None else f"{row.decode_tokens_per_s:.1f}",
                      _p50(row.end_to_end_s, digits=2),
                      "-" if row.real_time_factor is None else f"{row.real_time_factor:.3f}",
                      _x(row.speedup_end_to_end), _x(row.speedup_decode))
        if not row.ok:
            continue
        stages.add_row(name, *[_p50(row.stages_ms.get(s)) for s in STAGE_NAMES])
        memory.add_row(name, str(len(row.runs)),
                       "-" if row.peak_rss_bytes is None else f"{row.peak_rss_bytes / 2**20:.0f}",
                       "n/a" if row.device_peak_bytes is None else f"{row.device_peak_bytes / 2**20:.0f}",
                       _mb(row.bytes_per_token),
                       "-" if row.achieved_bandwidth is None else f"{row.achieved_bandwidth / 1e9:.2f}",
                       "-" if row.bandwidth_share is None else f"{100 * row.bandwidth_share:.1f}%",
                       "-" if row.build_s is None else f"{row.build_s:.1f}")
    out = [speed, stages, memory]
    projected = [row for row in report.rows if row.projection]
    if report.projection_device and projected:
        device = report.projection_device
        projection = _table(f"PROJECTION, NOT A MEASUREMENT: roofline on {device['name']} "
                            f"({device['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, published specs), "
                            "max(bytes / bandwidth, FLOPs / peak), model stages only",
                            ("row", "prefill ms", "ms/token", "tok/s", "TTFT s", "e2e s", "bound"))
        for row in projected:
            work = row.projection["stages"]
            projection.add_row(_shown_name(row), f"{work['prefill']['seconds'] * 1000:.2f}",
                               f"{work['per_token']['seconds'] * 1000:.2f}",
                               f"{row.projection['decode_tokens_per_s']:.0f}", f"{row.projection['ttft_model_s']:.3f}",
                               f"{row.projection['end_to_end_model_s']:.3f}", work["per_token"]["bound"])
        out.append(projection)
    return out


def footer(report: BenchReport) -> list[str]:
    """What the tables' rows and columns mean, why rows did not run, and the machine."""
    hw, versions = report.hardware, report.versions
    lines = [f"[{n}] {', '.join(_shown_name(r) for r in report.rows if r.status == status)}: {status}"
             for status, n in _statuses(report).items()]
    unprojected = [row for row in report.rows if row.not_projected]
    if unprojected:
        which = ("nothing projected" if not any(row.projection for row in report.rows)
                 else ", ".join(_shown_name(r) for r in unprojected) + " not projected")
        largest = max(unprojected, key=lambda r: r.stage_work["per_token"]["bytes"])
        lines.append(f"--project {report.options.project}: {which}: "
                     + largest.not_projected.removeprefix("not projected: "))
    lines += [
        f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['threads']} threads (torch and ONNX Runtime)"
        + (f", GPU {hw['gpu']}" if hw["gpu"] else ", no GPU"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"prompt {report.prompt_tokens} tokens; baseline (HF): transformers fp32 eager, HF generate; x: ratio to "
        f"the baseline; stages: decode = media decode, per_token = one decode step, mask = the mask decoder on "
        f"one frame (timed apart: AVE has no mask); TTFT = media decode + encoders + prefill; RTF = end-to-end / "
        f"{CLIP_SECONDS} s of media",
        "MB/token = LLM weights (embedding: one row) + KV cache read per decode step, at the mean context; "
        "GB/s = MB/token x tok/s; p95s, stage work and row notes: --json",
    ]
    if not report.rows[0].ok:
        lines.append(f"no speed-ups: the baseline row did not run ({report.rows[0].status})")
    return lines


def write_plot(report: BenchReport, path: Path) -> Path:
    """A PNG of horizontal bars per row: end-to-end seconds and decode tokens/s (projection panels when asked)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [row for row in report.rows if row.ok]
    panels = [("end-to-end s (p50, measured)", [row.end_to_end_s["p50"] for row in rows], (70, 110, 200)),
              ("decode tokens/s (measured)", [row.decode_tokens_per_s or 0.0 for row in rows], (60, 160, 90))]
    if report.projection_device and any(row.projection for row in rows):
        name = report.projection_device["name"]
        # A row without a projection draws no bar.
        projected = lambda key: [(row.projection or {}).get(key) or 0.0 for row in rows]  # noqa: E731
        panels += [(f"PROJECTION (not measured), {name}: model e2e s", projected("end_to_end_model_s"), (200, 120, 50)),
                   (f"PROJECTION (not measured), {name}: tokens/s", projected("decode_tokens_per_s"), (200, 80, 80))]
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    label_w, bar_w, line_h, pad = 260, 420, 22, 12
    panel_h = 30 + line_h * max(len(rows), 1) + pad
    width = label_w + bar_w + 120
    height = 40 + panel_h * len(panels)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, 10), f"edgeav bench: {report.model} ({report.options.device}), warm-up excluded",
              fill="black", font=font)
    for index, (title, values, colour) in enumerate(panels):
        top = 40 + index * panel_h
        draw.text((pad, top), title, fill="black", font=font)
        scale = max(values) if values and max(values) > 0 else 1.0
        for n, (row, value) in enumerate(zip(rows, values)):
            y = top + 26 + n * line_h
            draw.text((pad, y), row.name[:34], fill="black", font=font)
            draw.rectangle([label_w, y + 2, label_w + max(1, int(bar_w * value / scale)), y + line_h - 4], fill=colour)
            draw.text((label_w + int(bar_w * value / scale) + 6, y), f"{value:.3g}", fill="black", font=font)
    image.save(path, format="PNG")
    return path


__all__ = ["TABLE_WIDTH", "BenchOptions", "BenchReport", "Row", "footer", "parse_choices", "project_row", "run_bench",
           "tables", "tensor_bytes", "write_plot"]
