"""What ``edgeav bench`` produces and how it is shown: :class:`Row` and :class:`BenchReport` (JSON),
tables that fit :data:`TABLE_WIDTH` columns, their footnotes, and the PNG plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeav.bench.options import BASELINE, CLIP_SECONDS, STAGE_NAMES, TASK, BenchOptions, options_json

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
        return {
            "benchmark": f"edgeav bench: one {CLIP_SECONDS} s {TASK.upper()} clip, {self.options.tokens} forced "
                         f"tokens, p50/p95 of {self.options.repeats} runs after {self.options.warmup} warm-up "
                         "run(s) (warm-up excluded)",
            "options": options_json(self.options), "model": self.model, "clip": self.clip,
            "prompt_tokens": self.prompt_tokens,
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
