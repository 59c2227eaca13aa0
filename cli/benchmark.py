"""``edgeav bench``: the options of a system's benchmark (its System record's ``bench``), its tables, JSON and plot."""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import edgeav
from edgeav.bench.roofline import DEVICES as PROJECTION_DEVICES
from edgeav.cli.common import PresetName, SystemOpt, TorchDevice, app, resolve_system, stderr
from edgeav.engines import MAX_THREADS
from edgeav.outputs import atomic_path
from edgeav.systems import SYSTEMS, get_system

ProjectName = Enum("ProjectName", {name: name for name in PROJECTION_DEVICES}, type=str)
TABLE_WIDTH = 100  # columns the printed tables fit in (less on a narrower terminal); every number is in --json


@app.command("bench")
def bench_command(
    preset: Optional[PresetName] = typer.Option(None, "--preset", help="Model preset; picks the system (default: the demo model, or with --random-weights the system's small preset)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint folder to benchmark (a system whose bench reads one); picks the system."),
    system: SystemOpt = None,
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights of --preset (seed 0), built in memory."),
    formats: Optional[str] = typer.Option(None, "--formats", help="Comma-separated: torch, onnx, tensorrt; with --llm-only also llama.cpp (default: the system's rows)."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Comma-separated: fp32, bf16, fp16, int8, int4 (default: the system's rows)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart (end-to-end latency, tokens/s)."),
    project: Optional[ProjectName] = typer.Option(None, "--project", help="Add a roofline projection (published specs, not a measurement) for this Jetson."),
    device: TorchDevice = typer.Option("cpu", "--device", help="Where torch rows and the baseline run (onnx rows: CPU only)."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per row (after the warm-up)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Warm-up runs per row, excluded from the numbers."),
    row_budget: float = typer.Option(60.0, "--row-budget", help="Seconds of timed runs per row; a slower row keeps fewer runs (at least one)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=2, help="Tokens every row decodes (teacher-forced, so all rows do the same work; default 32, with --llm-only 16 greedy steps)."),
    eval_n: int = typer.Option(4, "--eval-n", min=0, help="Held-out suite cases per row for the quality column (0: skip)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="torch and ONNX Runtime threads (default: torch's)."),
    llm_only: bool = typer.Option(False, "--llm-only", help="The LLM alone: decode and prefill tokens/s of each format against llama.cpp at the same bits (llama-cpp-python: pip install 'edgeav[bench]')."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="With --llm-only: block size of the onnx rows' 8- and 4-bit LLM weights, 32, 64 or 128 (default 128, as edgeav export; llama.cpp's Q8_0 and Q4_0 are blocks of 32)."),
) -> None:
    """Benchmark a model's formats x precisions in one run: stage latency, tokens/s, size and a quality number per row."""
    if checkpoint is not None and not checkpoint.is_dir():
        raise edgeav.CheckpointError(f"{checkpoint}: no such checkpoint folder; check the path")
    owner = resolve_system(checkpoint, None, preset, system)
    if owner.bench is None:
        raise edgeav.OptionError(f"{owner.title} has no benchmark yet; systems with one: "
                                 + ", ".join(get_system(s).title for s in SYSTEMS if get_system(s).bench))
    if block_size is not None and not llm_only:
        raise edgeav.OptionError(f"--block-size {block_size}: only the LLM-only bench takes it (the full bench's "
                                 "engines are exported at the default, 32); add --llm-only or drop it")
    bench = owner.bench()
    if llm_only and not getattr(bench, "LLM_ONLY", False):
        raise edgeav.OptionError(f"--llm-only: {owner.title}'s bench has no LLM-only rows yet; systems with them: "
                                 + ", ".join(get_system(s).title for s in SYSTEMS
                                             if get_system(s).bench and getattr(get_system(s).bench(), "LLM_ONLY", False)))
    options = bench.make_options(preset=preset.value if preset else None, checkpoint=checkpoint,
                                 random_weights=random_weights, formats=formats, precisions=precisions,
                                 device=device.value, repeats=repeats, warmup=warmup, row_budget_s=row_budget,
                                 tokens=tokens, eval_n=eval_n, threads=threads,
                                 project=project.value if project else None, json_path=json_path, plot_path=plot,
                                 **({"llm_only": True} if llm_only else {}),
                                 **({"block_size": block_size} if block_size is not None else {}))
    report = bench.run_bench(options, progress=lambda message: stderr.print(message, highlight=False))
    console = Console(width=min(shutil.get_terminal_size((TABLE_WIDTH, 24)).columns, TABLE_WIDTH))
    for table in bench.tables(report):
        console.print(table)
    for line in bench.footer(report):
        console.print(line, highlight=False)
    if json_path is not None:
        with atomic_path(json_path) as temporary:
            report.write_json(temporary)
        print(f"wrote {json_path}")
    if plot is not None:
        with atomic_path(plot) as temporary:
            bench.write_plot(report, temporary)
        print(f"wrote {plot}")
