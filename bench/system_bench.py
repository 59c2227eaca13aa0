"""What the ``edgeav bench`` of a system other than Crab shares: the options and their checks
(:class:`SystemBenchOptions`), :class:`Row` and :class:`BenchReport` (JSON), the ratios to the reference
row (:func:`compare`), the two tables (:func:`tables`) and the footer (:func:`footer`); the plot is
:func:`edgeav.bench.report.write_plot`. A system's bench module (its System record's ``bench``) measures its
own workload and fills these in.

Rows are format x precision; the first is the reference (torch fp32) every ratio divides by, taken in the
same run. Crab's bench (``report.py``, ``harness.py``) has more columns (its transformers baseline,
bandwidth, the roofline projection) and keeps its own row and report.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Mapping

import torch

from edgeav.bench.options import DEVICES, FORMATS, PRECISIONS, check_output_path, options_json, parse_choices
from edgeav.bench.timing import RowSkipped, synchronize, tensor_bytes
from edgeav.engines import check_threads
from edgeav.errors import OptionError
from edgeav.stages import StageTimer

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REFERENCE = ("torch", "fp32")
INT_GROUP_SIZE = 32  # int4 block size of the onnx rows, the exporter's default
END_TO_END = "end_to_end"
Progress = Callable[[str], None]


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SystemBenchOptions:
    """What a system's bench measures; checked on creation, before any model loads. A system subclasses it
    to name itself, its presets and the precisions its export offers (:meth:`export_precisions`).

    ``formats``/``precisions``: None for the defaults (torch and onnx; each format's own precisions: torch
    ``torch_precisions``, the others what the export offers). ``checkpoint``: a checkpoint folder
    (``preset``, when given, is checked against it), else ``preset`` (default ``small_preset``) with
    ``random_weights``. ``eval_n``: inputs per row for the quality column (0: none).
    """

    title: ClassVar[str]  # the system as people write it, for messages
    presets: ClassVar[Mapping[str, object]]
    small_preset: ClassVar[str]  # --random-weights without --preset
    torch_precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # the torch rows without --precisions

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
        for name in ("checkpoint", "json_path", "plot_path"):  # the Python API may pass strings
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.formats is not None:
            object.__setattr__(self, "formats", parse_choices(self.formats, FORMATS, "--formats"))
        if self.precisions is not None:
            object.__setattr__(self, "precisions", parse_choices(self.precisions, PRECISIONS, "--precisions"))
        if self.preset is not None and self.preset not in self.presets:
            close = difflib.get_close_matches(self.preset, self.presets, n=1)
            raise OptionError(f"--preset {self.preset!r}: expected one of {', '.join(self.presets)}"
                              + (f". Did you mean {close[0]!r}?" if close else ""))
        if self.checkpoint is not None and self.random_weights:
            raise OptionError("--random-weights and --checkpoint exclude each other; pass one")
        if self.checkpoint is None and not self.random_weights:
            raise OptionError(f"--preset {self.preset or self.small_preset} has no weights of its own; add "
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

    @classmethod
    def from_cli(cls, *, project: str | None = None, **values) -> "SystemBenchOptions":
        """The options from ``edgeav bench``'s (None: the default)."""
        if project is not None:
            raise OptionError(f"--project {project}: {cls.title}'s bench has no roofline projection yet; "
                              "drop --project")
        return cls(**{name: value for name, value in values.items() if value is not None})

    @staticmethod
    def export_precisions(fmt: str) -> tuple[str, ...]:
        """The precisions the system's export offers for ``fmt`` (empty: none, or no export yet)."""
        return ()

    def rows(self) -> list[tuple[str, str]]:
        """(format, precision) of every row: the reference first, then the rest in order, once each. A format
        that offers nothing still gets a row, which says why it does not run."""
        rows = [REFERENCE]
        for fmt in self.formats or ("torch", "onnx"):
            offered = self.torch_precisions if fmt == "torch" else self.export_precisions(fmt)
            for precision in self.precisions or offered or ("fp32",):
                if (fmt, precision) not in rows:
                    rows.append((fmt, precision))
        return rows


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
    metric: float | None = None  # the system's quality column
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
    """One bench run. ``benchmark``: one line saying what was measured; ``details``: the system's own
    top-level JSON fields (its workload, prompt lengths), after ``model``."""

    system: str
    benchmark: str
    options: SystemBenchOptions
    model: str
    details: dict
    hardware: dict
    versions: dict
    rows: list[Row]
    projection_device = None  # no roofline projection outside Crab's bench

    def to_dict(self) -> dict:
        return {"benchmark": self.benchmark, "system": self.system, "options": options_json(self.options),
                "model": self.model, **self.details, "hardware": self.hardware, "versions": self.versions,
                "rows": [asdict(row) for row in self.rows]}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def compare(rows: list[Row], stages: tuple[str, ...]) -> None:
    """Each row's ratios to the reference (the first row, torch fp32): its p50 over the row's, per stage
    in ``stages`` (``per_token``: the decode speed-up) and end to end."""
    base = rows[0] if rows and rows[0].ok else None
    if base is None:
        return
    for row in rows:
        if not row.ok:
            continue
        for stage in stages:
            if stage in row.stages_ms and stage in base.stages_ms and row.stages_ms[stage]["p50"] > 0:
                row.ratios[stage] = base.stages_ms[stage]["p50"] / row.stages_ms[stage]["p50"]
        row.ratios[END_TO_END] = base.end_to_end_s["p50"] / row.end_to_end_s["p50"]


# -- measuring -------------------------------------------------------------------------------------


def bench_device(options: SystemBenchOptions) -> torch.device:
    """The device the torch rows run on, refused when torch cannot reach it; torch's threads set as asked."""
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"--device cuda: torch {torch.__version__} sees no CUDA device; drop --device cuda "
                          "or install a CUDA build of torch")
    if options.threads:
        torch.set_num_threads(options.threads)
    return device


class DeviceStageTimer(StageTimer):
    """A :class:`~edgeav.stages.StageTimer` that waits for the device at each stage's edges, so that a stage
    queued on a GPU is counted in its own time, not the next one's."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self.ms[name] += (time.perf_counter() - start) * 1000


@dataclass
class BenchContext:
    """What every row of one bench run shares (a system's bench adds what its rows pass on)."""

    options: SystemBenchOptions
    loaded: object  # the system's loaded model; rows copy it or export it, never change it
    device: torch.device
    workdir: Path  # engines are exported here
    progress: Progress


def torch_runtime(row: Row, ctx: BenchContext):
    """A :class:`~edgeav.runtime.Runtime` of the model in the row's torch dtype; ``row.build_s`` set."""
    from edgeav.runtime import Runtime

    if row.precision not in TORCH_DTYPES:
        raise RowSkipped(f"weight-only int8/int4 (--llm-weights) is not built for {ctx.options.title} yet")
    if row.precision == "fp16" and ctx.device.type == "cpu":
        row.notes.append("fp16 on a CPU: torch runs many fp16 kernels slowly or not at all")
    start = time.perf_counter()
    # A copy: the pipeline casts its model in place, and the exports read the shared one.
    runtime = Runtime(copy.deepcopy(ctx.loaded), device=str(ctx.device), dtype=TORCH_DTYPES[row.precision])
    row.build_s = time.perf_counter() - start
    return runtime


def onnx_runtime(row: Row, ctx: BenchContext):
    """The model exported to an onnx engine in the row's precision and opened by a
    :class:`~edgeav.runtime.Runtime`; ``row.build_s`` (the export) and its size on disk set."""
    from edgeav.export.exporter import export_engine
    from edgeav.runtime import Runtime

    offered = ctx.options.export_precisions("onnx")
    if not offered:
        raise RowSkipped(f"{ctx.options.title} has no onnx export yet")
    if row.precision not in offered:
        raise RowSkipped(f"{ctx.options.title}'s onnx engines offer {', '.join(offered)}")
    if ctx.device.type != "cpu":
        raise RowSkipped("the onnx backend runs on the CPU only (no onnxruntime-gpu backend yet); drop --device cuda")
    start = time.perf_counter()
    folder = export_engine(ctx.loaded, ctx.workdir / f"onnx-{row.precision}", precision=row.precision,
                           block_size=INT_GROUP_SIZE, receipt_n=0,
                           progress=lambda message: ctx.progress(f"  {row.name}: {message}"))
    row.build_s = time.perf_counter() - start
    row.size_bytes, row.size_kind = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()), "disk"
    return Runtime.from_engine(folder, threads=ctx.options.threads or torch.get_num_threads())


def tensorrt_row(row: Row, ctx: BenchContext) -> None:
    """Why a TensorRT row does not run (always: edgeav has no TensorRT runtime backend yet)."""
    import importlib.util

    offered = ctx.options.export_precisions("tensorrt")
    if row.precision not in offered:
        raise RowSkipped(f"TensorRT builds here offer {', '.join(offered) or 'nothing'}; {row.precision} is not one "
                         "of them")
    if importlib.util.find_spec("tensorrt") is None:
        raise RowSkipped("TensorRT not installed")
    raise RowSkipped("edgeav has no TensorRT runtime backend yet (edgeav export --format tensorrt builds engines "
                     "that nothing here can run)")


def row_builders(measure: Callable) -> dict[str, Callable]:
    """The row builders of a system whose torch and onnx rows both run ``measure(row, runtime, ctx)``: a torch
    row sized by the tensors its model holds, an onnx row by its engine files, a tensorrt row saying why not."""

    def torch_row(row: Row, ctx: BenchContext) -> None:
        runtime = torch_runtime(row, ctx)
        row.size_bytes, row.size_kind = tensor_bytes(runtime.engine.model), "memory"
        measure(row, runtime, ctx)

    def onnx_row(row: Row, ctx: BenchContext) -> None:
        measure(row, onnx_runtime(row, ctx), ctx)

    return {"torch": torch_row, "onnx": onnx_row, "tensorrt": tensorrt_row}


def load_model(options: SystemBenchOptions, load_checkpoint: Callable, synthesize: Callable) -> tuple[object, str]:
    """The bench's model and how the report names it: ``options.checkpoint``, else random weights (seed 0) of
    ``options.preset`` or the system's small preset."""
    if options.checkpoint is not None:
        loaded = load_checkpoint(Path(options.checkpoint), options.preset)
        return loaded, f"{options.checkpoint} ({loaded.config.name})"
    preset = options.preset or options.small_preset
    return synthesize(preset, 0), f"{preset}, random weights (seed 0)"


# -- presenting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLayout:
    """What a system's tables show.

    ``columns``: (header in the latency table, header in the ratio table, stage) per stage column; the
    latency table shows a stage's p50 in ms, tokens/s for ``per_token``. ``tasks``: when given, each row
    takes one line per task, its stage keys ``"{task}.{stage}"`` (:func:`stage_key`); else the stage
    ``end_to_end`` is the row's ``end_to_end_s``. ``metric``: the quality column's header (None: no column).
    """

    title: str
    columns: tuple[tuple[str, str, str], ...]
    metric: str | None = None
    tasks: tuple[str, ...] = ()


def _table(title: str, columns: tuple[str, ...], wrap: tuple[str, ...] = ()):
    """A rich table; only the ``wrap`` columns may wrap (numbers are never cut short)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    for n, column in enumerate(columns):
        table.add_column(column, justify="left" if n == 0 else "right", no_wrap=column not in wrap)
    return table


def _statuses(report: BenchReport) -> dict[str, int]:
    """Each status other than "ok", numbered for the footnotes the tables point to."""
    numbered: dict[str, int] = {}
    for row in report.rows:
        if not row.ok and row.status not in numbered:
            numbered[row.status] = len(numbered) + 1
    return numbered


def stage_key(task: str | None, stage: str) -> str:
    """The key of ``stage`` of ``task`` in :attr:`Row.stages_ms` and :attr:`Row.ratios` (no task: the stage)."""
    return stage if task is None else f"{task}.{stage}"


def _stats(row: Row, task: str | None, stage: str) -> dict[str, float] | None:
    """A stage's p50/p95 in ms (end to end of a row without tasks: its ``end_to_end_s``)."""
    if stage == END_TO_END and task is None:
        return None if row.end_to_end_s is None else {k: v * 1000 for k, v in row.end_to_end_s.items()}
    return row.stages_ms.get(stage_key(task, stage))


def _cell(stats: dict[str, float] | None, stage: str) -> str:
    if not stats:
        return "-"
    if stage == "per_token":
        return f"{1000 / stats['p50']:.1f}" if stats["p50"] > 0 else "-"
    return f"{stats['p50']:.0f}" if stats["p50"] >= 1000 else f"{stats['p50']:.1f}"  # tenths of a second-long stage: noise


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}x" if value >= 100 else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def tables(report: BenchReport, layout: TableLayout) -> list:
    """rich tables within 100 columns: stage latencies (p50) with size and quality; the ratios to torch fp32
    with runs, memory and build time (a row with tasks: one line per task in one table row). A row that
    did not run points to its footnote (:func:`footer`); p95s are in the JSON."""
    footnotes = _statuses(report)
    stages = [stage for _, _, stage in layout.columns]
    tasks = layout.tasks or (None,)
    task_column = ("task",) if layout.tasks else ()
    metric_column = (layout.metric,) if layout.metric else ()
    gpu = any(row.device_peak_bytes is not None for row in report.rows)
    speed = _table(layout.title, ("row", "status", "size MB", *metric_column, *task_column,
                                  *[header for header, _, _ in layout.columns]),
                   wrap=("status", "size MB", *metric_column))
    ratios = _table("ratio to torch fp32 (its p50 over the row's; above 1: faster)",
                    ("row", *task_column, *[header for _, header, _ in layout.columns], "runs", "RSS MiB",
                     *(("GPU MiB",) if gpu else ()), "build s"),
                    wrap=("RSS MiB", "GPU MiB", "build s"))
    task_cell = ("\n".join(layout.tasks),) if layout.tasks else ()
    for row in report.rows:
        status = "ok" if row.ok else f"{row.status.split(':')[0].replace('skipped', 'skip')} [{footnotes[row.status]}]"
        size = "-" if row.size_bytes is None else f"{row.size_bytes / 1e6:.1f} {row.size_kind.replace('memory', 'mem')}"
        metric = ("-" if row.metric is None else f"{row.metric:.3f}",) if layout.metric else ()
        speed.add_row(row.name, status, size, *metric, *task_cell,
                      *["\n".join(_cell(_stats(row, task, stage), stage) for task in tasks) for stage in stages])
        if row.ok:
            ratios.add_row(row.name, *task_cell,
                           *["\n".join(_x(row.ratios.get(stage_key(task, stage))) for task in tasks) for stage in stages],
                           str(len(row.runs)), _mib(row.peak_rss_bytes), *((_mib(row.device_peak_bytes),) if gpu else ()),
                           "-" if row.build_s is None else f"{row.build_s:.1f}")
    return [speed, ratios]


def footer(report: BenchReport, about: list[str]) -> list[str]:
    """Why rows did not run, the machine, then ``about`` (what the workload and the columns are)."""
    hw = report.hardware
    lines = [f"[{n}] {', '.join(r.name for r in report.rows if r.status == status)}: {status}"
             for status, n in _statuses(report).items()]
    lines += [
        f"hardware: {hw['cpu']}, {hw['cores']} cores, {hw['threads']} threads (torch and ONNX Runtime)"
        + (f", GPU {hw['gpu']}" if hw["gpu"] else ", no GPU"),
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        *about,
    ]
    if not report.rows[0].ok:
        lines.append(f"no ratios: the torch fp32 row did not run ({report.rows[0].status})")
    return lines


__all__ = ["BenchContext", "BenchReport", "DeviceStageTimer", "END_TO_END", "REFERENCE", "Row", "SystemBenchOptions",
           "TORCH_DTYPES", "TableLayout", "bench_device", "compare", "footer", "load_model", "onnx_runtime", "row_builders", "stage_key", "tables",
           "tensorrt_row", "torch_runtime"]
