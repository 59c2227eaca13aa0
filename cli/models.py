"""Checkpoint and engine commands: ``synth``, ``convert``, ``eval``, ``export`` and ``info``."""

from __future__ import annotations

import contextlib
import json
import shutil
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

import edgeav
from edgeav.cli.common import (CheckpointOpt, DType, EngineOpt, PresetName, PresetOpt, SystemOpt, TaskName, ThreadsOpt,
                               app, load_runtime, resolve_system, status, stderr)
from edgeav.engines.manifest import DEFAULT_BLOCK_SIZE, FORMATS, PRECISIONS, precision_help
from edgeav.systems import SYSTEMS, get_system


LARGE_PRESET = 2e9  # parameters: synth writes a preset this large only with --force


@app.command("synth")
def synth_checkpoint(
    out_dir: Path = typer.Argument(..., help="Folder to write (must not exist or be empty)."),
    preset: PresetName = typer.Option(..., "--preset", help="Model preset (its system writes its own released layout)."),
    system: SystemOpt = None,
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", help="Write a preset of billions of parameters (tens of GB) anyway."),
) -> None:
    """Write a random-weight checkpoint in its system's released layout, with a tokenizer."""
    owner = resolve_system(None, None, preset, system)
    counts = owner.parameter_counts(preset.value) if owner.parameter_counts is not None else None
    large = sum(counts.values()) > LARGE_PRESET if counts else preset.value.endswith("-7b")
    if large and not force:
        raise edgeav.OptionError(f"{preset.value} is {owner.presets[preset.value]}; use `edgeav run --preset "
                                 f"{preset.value} --random-weights` (in memory), or add --force")
    with _fresh_folder(out_dir) as partial, status(f"writing {preset.value}"):
        owner.save_released(owner.synthesize(preset.value, seed), partial)
    print(f"wrote a random-weight {preset.value} checkpoint (seed {seed}) in {owner.title}'s released layout "
          f"to {out_dir}")


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder in its system's released layout."),
    out_dir: Path = typer.Argument(..., help="Folder to write (must not exist or be empty)."),
    preset: Optional[PresetName] = typer.Option(None, "--preset", help="Preset to check the checkpoint against."),
    system: SystemOpt = None,
) -> None:
    """Convert released weights to edgeav's layout: safetensors, a config file, the tokenizer."""
    owner = resolve_system(checkpoint, None, None, system)
    with status(f"loading {checkpoint}"):
        loaded = owner.load_checkpoint(checkpoint, preset.value if preset else None)
    with _fresh_folder(out_dir) as partial, status(f"writing {out_dir}"):
        owner.save_converted(loaded, partial)
    print(f"converted {checkpoint} ({loaded.config.name}) to {out_dir}")


@contextlib.contextmanager
def _fresh_folder(folder: Path) -> Iterator[Path]:
    """Write into ``folder.partial`` and rename at the end: a failure leaves nothing half written."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise edgeav.OptionError(f"{folder}: already exists and is not an empty folder; pick a new output folder")
    if not folder.parent.is_dir():
        raise edgeav.OptionError(f"{folder}: folder {folder.parent} does not exist; create it first")
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        raise edgeav.OptionError(f"{partial}: exists (an interrupted write?); remove it first")
    try:
        yield partial
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# --suite lists every system's suites; the system that runs checks that it has the one given.
SuiteName = Enum("SuiteName", {name: name for system in SYSTEMS for name in get_system(system).suites}, type=str)
SUITES_HELP = "; ".join(f"{name}: {line}" for system in SYSTEMS for name, line in get_system(system).suites.items())


@app.command("eval")
def eval_command(
    suite: Optional[SuiteName] = typer.Option(None, "--suite", help="Held-out suite to score (default: the "
                                              f"system's first). {SUITES_HELP}."),
    checkpoint: CheckpointOpt = None,
    engine: EngineOpt = None,
    preset: PresetOpt = None,
    random_weights: bool = typer.Option(False, "--random-weights", help="Random weights of --preset, built in "
                                        "memory: real numbers near 0, a check of the pipeline, not of a model."),
    system: SystemOpt = None,
    threads: ThreadsOpt = None,
    n: int = typer.Option(200, "--n", min=1, help="Cases (clips or pictures) per task."),
    task: Optional[list[TaskName]] = typer.Option(None, "--task", help="Score only these tasks (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Score a model on a held-out suite: the field's metric for every task."""
    if checkpoint is not None and not checkpoint.is_dir():
        raise edgeav.CheckpointError(f"{checkpoint}: no such checkpoint folder; check the path")
    owner = resolve_system(checkpoint, engine, preset, system)
    if owner.evaluate is None or not owner.suites:
        raise edgeav.OptionError(f"{owner.title} has no evaluation suite yet; systems with one: "
                                 + ", ".join(get_system(s).title for s in SYSTEMS if get_system(s).suites))
    suite_name = suite.value if suite is not None else next(iter(owner.suites))
    if suite_name not in owner.suites:
        raise edgeav.OptionError(f"--suite {suite_name} is not a suite of {owner.title}; {owner.title}'s suites: "
                                 f"{', '.join(owner.suites)}")
    runtime = load_runtime(checkpoint, preset, random_weights, DType.fp32, engine, threads, system=system)
    tasks = tuple(t.value for t in task) if task else None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=stderr, transient=True, disable=not stderr.is_terminal)
    with progress:
        bars = {}

        def advance(name: str, done: int) -> None:
            if name not in bars:
                bars[name] = progress.add_task(name, total=n)
            progress.update(bars[name], completed=done)

        result = runtime.system.evaluate(runtime, suite_name, n=n, tasks=tasks, progress=advance)
    if as_json:
        print(json.dumps({"model": runtime.source, **result.to_dict()}, indent=2))
        return
    print(f"suite {result.suite}, {result.n} per task, model {runtime.source}")
    for task_name, metrics in result.metrics.items():
        print(f"{task_name:<6} " + "  ".join(f"{metric} {value:.3f}" for metric, value in metrics.items()))
    for note in result.notes:
        print(f"note: {note}")


FormatName = Enum("FormatName", {name: name for name in FORMATS}, type=str)
PrecisionName = Enum("PrecisionName", {name: name for name in PRECISIONS}, type=str)
CalibrationName = Enum("CalibrationName", {"demo": "demo"}, type=str)


@app.command(help="Export a checkpoint to an engine directory: ONNX graphs (or TensorRT engines), quantized, with "
                  "a fidelity receipt.\n\nPrecisions:\n\n" + precision_help())
def export(
    model: str = typer.Argument(..., help="Checkpoint folder, 'demo' (the bundled demo model) or a preset name "
                                          "(random weights, seed 0)."),
    out: Path = typer.Option(..., "-o", "--out", help="Engine directory to write (replaced only when complete)."),
    fmt: FormatName = typer.Option("onnx", "--format", help="onnx (ONNX Runtime) or tensorrt (needs TensorRT 10)."),
    precision: PrecisionName = typer.Option("fp32", "--precision", help="See the table above."),
    block_size: int = typer.Option(DEFAULT_BLOCK_SIZE, "--block-size", help="Block size of the LLM's 8- or 4-bit weights (int8, int4): 32, 64 or 128 (fastest; 32 is the most accurate)."),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="int8 and int4 LLMs: what their MatMulNBits compute the activations in: "
                                       "4 int8 (fastest on a CPU), 1 fp32, 2 fp16, 3 bf16; the receipt shows its cost."),
    calibration: CalibrationName = typer.Option("demo", "--calibration", help="int8 calibration inputs: the system's "
                                                "synthetic demo inputs."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="Merge the I-LoRA with a uniform head mix (lossy; the receipt reports it)."),
    receipt_n: int = typer.Option(4, "--receipt-n", min=0, help="Demo inputs for the fidelity receipt, as the "
                                                             "system counts them: clips per task or pictures (0: none)."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Serve a repeated export from $EDGEAV_CACHE (~/.cache/edgeav)."),
) -> None:
    """Export a checkpoint to an engine directory."""
    from edgeav.engines.manifest import check_export_options

    check_export_options(fmt.value, precision.value, block_size, accuracy_level)
    with status(f"loading {model}"):
        loaded = _load_for_export(model)
    from edgeav.export.exporter import export_engine

    result = export_engine(loaded, out, fmt=fmt.value, precision=precision.value, block_size=block_size,
                           accuracy_level=accuracy_level,
                           calibration=calibration.value, merge_lora=merge_lora, receipt_n=receipt_n,
                           use_cache=cache, progress=lambda message: stderr.print(message, highlight=False))
    print(f"wrote {fmt.value} {precision.value} engine to {result}; see it with: edgeav info {result}")


def _load_for_export(model: str):
    from edgeav.runtime import DEMO_DIR
    from edgeav.systems import SYSTEMS, get_system, system_of_checkpoint, system_of_preset

    if model == "demo":
        loaded = system_of_checkpoint(DEMO_DIR).load_checkpoint(DEMO_DIR, None)
        loaded.source = "edgeav demo model"
    elif not Path(model).exists():
        presets = [p for name in SYSTEMS for p in get_system(name).presets]
        if model not in presets:
            raise edgeav.OptionError(f"{model}: no such checkpoint folder, and not 'demo' or a preset "
                                     f"({', '.join(presets)})")
        loaded = system_of_preset(model).synthesize(model, 0)
    else:
        loaded = system_of_checkpoint(Path(model)).load_checkpoint(Path(model), None)
    owner = get_system(loaded.system)
    if owner.open_engine is None or owner.export is None:
        raise edgeav.OptionError(f"{model}: exporting {owner.title} is not built yet; "
                                 "run it from its checkpoint (edgeav run --checkpoint)")
    return loaded


@app.command()
def info(
    engine: Path = typer.Argument(..., help="Engine directory from `edgeav export`."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Print an engine's manifest and fidelity receipt (hashes are checked)."""
    from edgeav.engines.manifest import manifest_system, read_manifest, verify_files
    from edgeav.engines.spec import system_export

    manifest = read_manifest(engine)
    verify_files(engine, manifest)
    if as_json:
        print(json.dumps(manifest, indent=2))
        return
    source = manifest.get("source", {})
    print(f"engine     {engine} ({manifest.get('backend')}, {manifest.get('precision')}, format v{manifest['format_version']})")
    print(f"model      {manifest.get('config', {}).get('name')} from {source.get('checkpoint')} "
          f"(digest {str(source.get('digest', ''))[:16]})")
    spec = system_export(manifest_system(manifest), engine)
    print(f"system     {spec.system}")
    if "lora" in manifest:
        print(f"lora       {manifest['lora'].get('mix')}")
    print("tools      " + ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items()))
    print("files      hashes match the manifest")
    graphs = manifest.get("graphs", {})
    wide = max([10, *map(len, graphs)])
    kind = max([9, *(len(g["component"]) for g in graphs.values())])
    print(f"\n{'graph':<{wide}} {'component':<{kind}} {'precision':<9} {'MB':>7}")
    for name, graph in graphs.items():
        size = (engine / graph["file"]).stat().st_size / 1e6
        print(f"{name:<{wide}} {graph['component']:<{kind}} {graph['precision']:<9} {size:>7.2f}")
    receipt = manifest.get("receipt")
    if not receipt or "skipped" in receipt:
        print(f"\nno fidelity receipt: {receipt['skipped'] if receipt else 'exported with --receipt-n 0'}")
        return
    print()
    for line in spec.receipt_lines(receipt):
        print(line)
