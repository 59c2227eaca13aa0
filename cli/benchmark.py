"""``edgeav bench``: the options of :func:`edgeav.bench.harness.run_bench`, its tables, JSON and plot."""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from edgeav.bench.roofline import DEVICES as PROJECTION_DEVICES
from edgeav.cli.common import DEFAULT_PRESET, PresetName, TorchDevice, app, stderr
from edgeav.engines import MAX_THREADS
from edgeav.outputs import atomic_path

ProjectName = Enum("ProjectName", {name: name for name in PROJECTION_DEVICES}, type=str)


@app.command("bench")
def bench_command(
    preset: PresetName = typer.Option(DEFAULT_PRESET, "--preset", help="Model preset (crab-tiny without --random-weights: the demo model)."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights of --preset (seed 0), built in memory."),
    formats: str = typer.Option("torch,onnx,tensorrt", "--formats", help="Comma-separated: torch, onnx, tensorrt."),
    precisions: str = typer.Option("fp32,fp16,int8,int4", "--precisions", help="Comma-separated: fp32, bf16, fp16, int8, int4."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart (end-to-end latency, tokens/s)."),
    project: Optional[ProjectName] = typer.Option(None, "--project", help="Add a roofline projection (published specs, not a measurement) for this Jetson."),
    device: TorchDevice = typer.Option("cpu", "--device", help="Where torch rows and the baseline run (onnx rows: CPU only)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per row (after the warm-up)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Warm-up runs per row, excluded from the numbers."),
    row_budget: float = typer.Option(60.0, "--row-budget", help="Seconds of timed runs per row; a slower row keeps fewer runs (at least one)."),
    tokens: int = typer.Option(32, "--tokens", min=2, help="Tokens every row decodes (teacher-forced, so all rows do the same work)."),
    eval_n: int = typer.Option(4, "--eval-n", min=0, help="Demo-suite AVE clips per row for the metric (demo model only; 0: skip)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="torch and ONNX Runtime threads (default: torch's)."),
) -> None:
    """Benchmark every format x precision on one 10-s AVE clip against the transformers baseline."""
    from edgeav.bench.harness import TABLE_WIDTH, BenchOptions, footer, run_bench, tables, write_plot

    options = BenchOptions(preset=preset.value, random_weights=random_weights, formats=formats, precisions=precisions,
                           device=device.value, repeats=repeats, warmup=warmup, row_budget_s=row_budget, tokens=tokens, eval_n=eval_n,
                           threads=threads, project=project.value if project else None, json_path=json_path,
                           plot_path=plot)
    report = run_bench(options, progress=lambda message: stderr.print(message, highlight=False))
    # 100 columns at most (less on a narrower terminal); every number is in --json.
    console = Console(width=min(shutil.get_terminal_size((TABLE_WIDTH, 24)).columns, TABLE_WIDTH))
    for table in tables(report):
        console.print(table)
    for line in footer(report):
        console.print(line, highlight=False)
    if json_path is not None:
        with atomic_path(json_path) as temporary:
            report.write_json(temporary)
        print(f"wrote {json_path}")
    if plot is not None:
        with atomic_path(plot) as temporary:
            write_plot(report, temporary)
        print(f"wrote {plot}")
