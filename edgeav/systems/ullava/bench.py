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

import contextlib
import copy
import difflib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from edgeav.bench.options import check_output_path, parse_choices
from edgeav.bench.report import write_plot
from edgeav.bench.timing import run_row as run_timed_row
from edgeav.bench.timing import (PeakMemory, RowSkipped, hardware_info, percentiles, synchronize, tensor_bytes,
                                 timed_runs, tool_versions)
from edgeav.engines import check_threads
from edgeav.errors import OptionError
from edgeav.metrics import mask_giou
from edgeav.systems.ullava.config import PRESETS
from edgeav.systems.ullava.evaluate import SHAPES_SEED, run_forced, shapes_case, trained_answer

FORMATS = ("torch", "onnx", "tensorrt")
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
DEVICES = ("cpu", "cuda")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE = ("torch", "fp32")
STAGES = ("visual", "prefill", "per_token", "mask", "boxes")
SMALL_PRESET = "ullava-tiny"  # --random-weights without --preset
PICTURE_SEED = SHAPES_SEED - 1  # the timed picture: the suite's seeds start one above
INT_GROUP_SIZE = 32  # int4 block size, the exporter's default
Progress = Callable[[str], None]


def _export_precisions(fmt: str) -> tuple[str, ...]:
    from edgeav.systems.ullava.export import PRECISIONS as EXPORT_PRECISIONS

    return tuple(name for name, spec in EXPORT_PRECISIONS.items() if fmt in spec.formats)


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UllavaBenchOptions:
    """What u-LLaVA's bench measures; checked on creation, before any model loads.

    ``formats``/``precisions``: None for the defaults (torch and onnx; each format's own precisions:
    torch fp32, onnx what the export offers). ``checkpoint``: a u-LLaVA checkpoint folder (``preset``,
    when given, is checked against it), else ``preset`` (default ``ullava-tiny``) with ``random_weights``.
    ``eval_n``: shapes-suite pictures per row for the gIoU column.
    """

    preset: str | None = None
    random_weights: bool = False
    checkpoint: Path | None = None
    formats: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None
    device: str = "cpu"
    repeats: int = 3
    row_budget_s: float = 60.0
    warmup: int = 1
    tokens: int = 32
    eval_n: int = 4
    threads: int | None = None
    json_path: Path | None = None
    plot_path: Path | None = None

    def __post_init__(self) -> None:
        if self.formats is not None:
            object.__setattr__(self, "formats", parse_choices(self.formats, FORMATS, "--formats"))
        if self.precisions is not None:
            object.__setattr__(self, "precisions", parse_choices(self.precisions, PRECISIONS, "--precisions"))
        if self.preset is not None and self.preset not in PRESETS:
            close = difflib.get_close_matches(self.preset, PRESETS, n=1)
            raise OptionError(f"--preset {self.preset!r}: expected one of {', '.join(PRESETS)}"
                              + (f". Did you mean {close[0]!r}?" if close else ""))
        if self.checkpoint is not None and self.random_weights:
            raise OptionError("--random-weights and --checkpoint exclude each other; pass one")
        if self.checkpoint is None and not self.random_weights:
            raise OptionError(f"--preset {self.preset or SMALL_PRESET} has no weights of its own; add "
                              "--random-weights or pass --checkpoint DIR")
        if self.device not in DEVICES:
            raise OptionError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        for name, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                   ("--tokens", self.tokens, 2), ("--eval-n", self.eval_n, 0)):
            if value < least:
                raise OptionError(f"{name} must be at least {least}, got {value}")
        if self.row_budget_s <= 0:
            raise OptionError(f"--row-budget must be positive, got {self.row_budget_s}")
        check_threads(self.threads)
        check_output_path(self.json_path, "--json")
        check_output_path(self.plot_path, "--plot", ".png")

    def rows(self) -> list[tuple[str, str]]:
        """(format, precision) of every row: the reference first, then the rest in order, once each."""
        rows = [REFERENCE]
        for fmt in self.formats or ("torch", "onnx"):
            offered = ("fp32",) if fmt == "torch" else _export_precisions(fmt)
            for precision in self.precisions or offered:
                if (fmt, precision) not in rows:
                    rows.append((fmt, precision))
        return rows


def make_options(*, project: str | None = None, **values) -> UllavaBenchOptions:
    """:class:`UllavaBenchOptions` from ``edgeav bench``'s options (None: the default)."""
    if project is not None:
        raise OptionError(f"--project {project}: u-LLaVA's bench has no roofline projection yet; drop --project")
    return UllavaBenchOptions(**{name: value for name, value in values.items() if value is not None})


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """One format x precision. Times in seconds unless the name says ms; None: not measured."""

    name: str
    format: str
    precision: str
    status: str = "ok"
    size_bytes: int | None = None
    size_kind: str = ""  # "memory" (weights torch holds) or "disk" (engine files)
    metric: float | None = None  # forced gIoU on the suite's pictures
    stages_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {"p50", "p95"}
    end_to_end_s: dict[str, float] | None = None
    decode_tokens_per_s: float | None = None
    decode_steps: int | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # stage -> reference p50 / this row's p50
    peak_rss_bytes: int | None = None
    device_peak_bytes: int | None = None
    build_s: float | None = None
    runs: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    projection = None  # the shared plot draws a projection panel only for rows that have one

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BenchReport:
    options: UllavaBenchOptions
    model: str
    picture: str
    prompt_tokens: int | None
    hardware: dict
    versions: dict
    rows: list[Row]
    projection_device = None  # no roofline projection for u-LLaVA yet

    def to_dict(self) -> dict:
        options = asdict(self.options)
        options.update({k: str(v) if v is not None else None for k, v in options.items()
                        if k.endswith("_path") or k == "checkpoint"})
        return {
            "benchmark": f"edgeav bench (u-LLaVA): the res prompt on one generated picture, {self.options.tokens} "
                         f"forced tokens, p50/p95 of {self.options.repeats} runs after {self.options.warmup} warm-up "
                         "run(s) (warm-up excluded); ratios: torch fp32's p50 over the row's",
            "system": "ullava", "options": options, "model": self.model, "picture": self.picture,
            "prompt_tokens": self.prompt_tokens, "hardware": self.hardware, "versions": self.versions,
            "rows": [asdict(row) for row in self.rows],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class _Context:
    options: UllavaBenchOptions
    loaded: object  # LoadedUllava
    device: torch.device
    workdir: Path
    progress: Progress
    prompt_tokens: int | None = None


def _timer(device: torch.device, ms: dict[str, float]):
    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        synchronize(device)
        start = time.perf_counter()
        yield
        synchronize(device)
        ms[name] = ms.get(name, 0.0) + (time.perf_counter() - start) * 1000

    return stage


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
    tensors[0] = tensors[0].to(next(engine.grounding.parameters()).dtype)  # it may stay fp32 in a half-float run
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
        ms: dict[str, float] = {}
        run = run_forced(runtime, case.picture, case.expression, forced=forced, stage=_timer(runtime.device, ms))
        ctx.prompt_tokens = run.prompt_tokens
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
    from edgeav.runtime import Runtime

    if row.precision not in TORCH_DTYPES:
        raise RowSkipped("weight-only int8/int4 (--llm-weights) is not built for u-LLaVA yet")
    if row.precision == "fp16" and ctx.device.type == "cpu":
        row.notes.append("fp16 on a CPU: torch runs many fp16 kernels slowly or not at all")
    start = time.perf_counter()
    # A copy: the pipeline casts its model in place, and the exports read the shared one.
    runtime = Runtime(copy.deepcopy(ctx.loaded), device=str(ctx.device), dtype=TORCH_DTYPES[row.precision])
    row.build_s = time.perf_counter() - start
    engine = runtime.engine
    row.size_bytes = tensor_bytes(engine.model) + (tensor_bytes(engine.grounding) if engine.grounding else 0)
    row.size_kind = "memory"
    _measure(row, runtime, ctx)


def _onnx_row(row: Row, ctx: _Context) -> None:
    from edgeav.export.exporter import export_engine
    from edgeav.runtime import Runtime

    offered = _export_precisions("onnx")
    if row.precision not in offered:
        raise RowSkipped(f"u-LLaVA's onnx engines offer {', '.join(offered)}")
    if ctx.device.type != "cpu":
        raise RowSkipped("the onnx backend runs on the CPU only (no onnxruntime-gpu backend yet); drop --device cuda")
    start = time.perf_counter()
    folder = export_engine(ctx.loaded, ctx.workdir / f"onnx-{row.precision}", precision=row.precision,
                           block_size=INT_GROUP_SIZE, receipt_n=0,
                           progress=lambda message: ctx.progress(f"  {row.name}: {message}"))
    row.build_s = time.perf_counter() - start
    row.size_bytes, row.size_kind = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()), "disk"
    threads = ctx.options.threads or torch.get_num_threads()
    _measure(row, Runtime.from_engine(folder, threads=threads), ctx)


def _tensorrt_row(row: Row, ctx: _Context) -> None:
    import importlib.util

    offered = _export_precisions("tensorrt")
    if row.precision not in offered:
        raise RowSkipped(f"TensorRT builds here offer {', '.join(offered)}; {row.precision} is not one of them")
    if importlib.util.find_spec("tensorrt") is None:
        raise RowSkipped("TensorRT not installed")
    raise RowSkipped("edgeav has no TensorRT runtime backend yet (edgeav export --format tensorrt builds engines "
                "that nothing here can run)")


ROW_BUILDERS = {"torch": _torch_row, "onnx": _onnx_row, "tensorrt": _tensorrt_row}


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
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device cuda: torch {torch.__version__} sees no CUDA device; drop --device cuda "
                          "or install a CUDA build of torch")
    if options.threads:
        torch.set_num_threads(options.threads)
    progress(f"loading {options.checkpoint or options.preset or SMALL_PRESET}")
    loaded, model_name = _load(options)
    rows = [Row(f"{fmt} {precision}", fmt, precision) for fmt, precision in options.rows()]
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        ctx = _Context(options, loaded, device, Path(folder), progress)
        for row in rows:
            run_row(row, ctx)
    compare(rows)
    case = shapes_case(PICTURE_SEED)
    height, width = case.picture.shape[:2]
    return BenchReport(options, model_name, f"shapes picture seed {PICTURE_SEED}, {width}x{height}, "
                       f"res prompt {case.expression!r}", ctx.prompt_tokens,
                       hardware_info(device, torch.get_num_threads()), tool_versions(), rows)


def compare(rows: list[Row]) -> None:
    """Each row's ratios to the reference (the first row, torch fp32): its p50 over the row's, per stage
    (``per_token``: the decode speed-up) and end to end."""
    base = rows[0] if rows and rows[0].ok else None
    if base is None:
        return
    for row in rows:
        if not row.ok:
            continue
        for stage in STAGES:
            if stage in row.stages_ms and stage in base.stages_ms and row.stages_ms[stage]["p50"] > 0:
                row.ratios[stage] = base.stages_ms[stage]["p50"] / row.stages_ms[stage]["p50"]
        row.ratios["end_to_end"] = base.end_to_end_s["p50"] / row.end_to_end_s["p50"]


# -- presenting --------------------------------------------------------------------------------------


def _table(title: str, columns: tuple[str, ...]):
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    for n, column in enumerate(columns):
        table.add_column(column, justify="left" if n == 0 else "right", no_wrap=n == 0)
    return table


def _statuses(report: BenchReport) -> dict[str, int]:
    numbered: dict[str, int] = {}
    for row in report.rows:
        if not row.ok and row.status not in numbered:
            numbered[row.status] = len(numbered) + 1
    return numbered


def _ms(row: Row, stage: str) -> str:
    stats = row.stages_ms.get(stage)
    return "-" if not stats else f"{stats['p50']:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def tables(report: BenchReport) -> list:
    """rich tables within 100 columns: stage latencies (p50) with size and quality; the ratios to torch fp32
    with memory. A row that did not run points to its footnote (:func:`footer`); p95s are in the JSON."""
    opts = report.options
    footnotes = _statuses(report)
    speed = _table(f"edgeav bench: {report.model}, u-LLaVA res on a generated picture, {opts.tokens} forced "
                   f"tokens, {opts.device}; p50 of up to {opts.repeats} timed runs, {opts.warmup} warm-up run(s) "
                   "excluded", ("row", "status", "size MB", "gIoU", "visual ms", "prefill ms", "tok/s", "mask ms",
                                "boxes ms", "e2e ms"))
    ratios = _table("ratio to torch fp32 (its p50 over the row's; above 1: faster)",
                    ("row", "visual", "prefill", "tok/s", "mask", "boxes", "e2e", "runs", "RSS MiB", "build s"))
    for row in report.rows:
        status = "ok" if row.ok else f"{row.status.split(':')[0].replace('skipped', 'skip')} [{footnotes[row.status]}]"
        size = "-" if row.size_bytes is None else f"{row.size_bytes / 1e6:.1f} {row.size_kind.replace('memory', 'mem')}"
        speed.add_row(row.name, status, size, "-" if row.metric is None else f"{row.metric:.3f}", _ms(row, "visual"),
                      _ms(row, "prefill"), "-" if row.decode_tokens_per_s is None else f"{row.decode_tokens_per_s:.1f}",
                      _ms(row, "mask"), _ms(row, "boxes"),
                      "-" if row.end_to_end_s is None else f"{row.end_to_end_s['p50'] * 1000:.1f}")
        if row.ok:
            ratios.add_row(row.name, *[_x(row.ratios.get(s)) for s in ("visual", "prefill", "per_token", "mask",
                                                                        "boxes", "end_to_end")],
                           str(len(row.runs)), "-" if row.peak_rss_bytes is None else f"{row.peak_rss_bytes / 2**20:.0f}",
                           "-" if row.build_s is None else f"{row.build_s:.1f}")
    return [speed, ratios]


def footer(report: BenchReport) -> list[str]:
    """Why rows did not run, what the columns mean, and the machine."""
    hw = report.hardware
    lines = [f"[{n}] {', '.join(r.name for r in report.rows if r.status == status)}: {status}"
             for status, n in _statuses(report).items()]
    lines += [
        f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['threads']} threads (torch and ONNX Runtime)"
        + (f", GPU {hw['gpu']}" if hw["gpu"] else ", no GPU"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"picture: {report.picture}; prompt {report.prompt_tokens} tokens; every row decodes the same "
        f"{report.options.tokens} tokens of the trained answer, teacher-forced",
        "visual = CLIP + projector; tok/s = forced decode steps per second; mask = SAM encoder + [SEG] decoder at "
        "the picture's size; e2e = the res run, picture to mask; boxes = GroundingDINO on the expression, timed "
        "apart (engines hold none)",
        f"gIoU: forced masks on {report.options.eval_n} shapes-suite pictures (random weights: random masks, "
        "comparable across rows); no transformers baseline row for u-LLaVA; p95s and row notes: --json",
    ]
    if not report.rows[0].ok:
        lines.append(f"no ratios: the torch fp32 row did not run ({report.rows[0].status})")
    return lines


__all__ = ["BenchReport", "Row", "UllavaBenchOptions", "compare", "footer", "forced_tokens", "make_options",
           "run_bench", "tables", "write_plot"]
