"""What every ``edgeav`` command shares: the typer app, the options run and stream both take, loading a model.

Torch-free at import: --version and --help must not wait for torch, onnx or onnxruntime. The commands
live in the modules :mod:`edgeav.cli.app` imports.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

import edgeav
from edgeav.engines import MAX_THREADS
from edgeav.outputs import check_output_folder, nonempty_path
from edgeav.sampling import SAMPLING_PRESETS
from edgeav.systems import SYSTEMS, get_system

app = typer.Typer(
    name="edgeav",
    help="Run audio-visual scene-understanding models (Crab, Crab+, u-LLaVA, OpenAVS) on the edge.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"edgeav {edgeav.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Run audio-visual scene-understanding models (Crab, Crab+, u-LLaVA, OpenAVS) on the edge."""


@contextlib.contextmanager
def media_progress(total_s: float | None, label: str) -> Iterator:
    """A progress bar over seconds of media on stderr, shown only on a terminal."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeRemainingColumn(),
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )
    with progress:
        task = progress.add_task(label, total=total_s or None)
        yield lambda seconds: progress.update(task, completed=seconds)


# --task and --preset list every system's; the system that runs checks that it has the one given.
TaskName = Enum("TaskName", {name: name for system in SYSTEMS for name in get_system(system).tasks}, type=str)
SamplingName = Enum("SamplingName", {name: name for name in SAMPLING_PRESETS}, type=str)
PresetName = Enum("PresetName", {name: name for system in SYSTEMS for name in get_system(system).presets}, type=str)
SystemName = Enum("SystemName", {name: name for name in SYSTEMS}, type=str)


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DType = Enum("DType", {name: name for name in TORCH_DTYPES}, type=str)

# Options that run and stream share.
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="Checkpoint folder of any system (released or converted); default: the demo model.")]
SystemOpt = Annotated[Optional[SystemName], typer.Option("--system", help="Which system: needed with --preset names two systems share, or a folder two systems could read (default: read from the checkpoint or engine).")]
EngineOpt = Annotated[Optional[Path], typer.Option("--engine", help="Engine directory from `edgeav export` (instead of a checkpoint).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, max=MAX_THREADS, help="ONNX Runtime threads for --engine (default: one per core).")]
PresetOpt = Annotated[Optional[PresetName], typer.Option("--preset", help="Model preset (with --random-weights, or to check a checkpoint).")]
RandomWeightsOpt = Annotated[bool, typer.Option("--random-weights", help="Random weights of --preset, built in memory.")]
QuestionOpt = Annotated[Optional[str], typer.Option("--question", help="The question (avqa, ask).")]
ExpressionOpt = Annotated[Optional[str], typer.Option("--expression", help="The referring expression (refavs).")]
SamplingOpt = Annotated[SamplingName, typer.Option("--sampling", help="greedy, or crab (temperature 0.6, top-p 0.9, seed 42).")]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Cap on generated tokens (default: the task's).")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Weights and compute precision (Crab's scripts run fp32).")]
TorchDevice = Enum("TorchDevice", {name: name for name in ("cpu", "cuda")}, type=str)
DeviceOpt = Annotated[TorchDevice, typer.Option("--device", help="Where the PyTorch engine runs; cuda: fp16/bf16 with --dtype, the decode step as a CUDA graph.")]
LLMWeights = Enum("LLMWeights", {name: name for name in ("int8", "int4")}, type=str)
AudioOpt = Annotated[Optional[str], typer.Option("--audio", help="Audio file heard instead of SOURCE's own track (AVSBench's audio.wav, AVE's .mp3).")]
FpsOpt = Annotated[Optional[float], typer.Option("--fps", help="Frames per second of a folder of frames (default 1; above 0, at most 240).")]
SilentAudioOpt = Annotated[bool, typer.Option("--silent-audio", help="The model hears silence: lets an image or frames run without --audio; drops a video's own track.")]
VariantOpt = Annotated[Optional[str], typer.Option("--variant", help="OpenAVS describers: lite (Pengi, default), default (+ the thinker on the frame), large (+ the thinker on the sound), edge (BEATs' AudioSet labels).")]
TranslatorOpt = Annotated[Optional[str], typer.Option("--translator", help="OpenAVS: who turns descriptions into object names: none (default: Pengi's caption), local (the checkpoint's thinker, or --translator-checkpoint's model), http (--translator-url).")]
TranslatorUrlOpt = Annotated[Optional[str], typer.Option("--translator-url", help="OpenAVS --translator http: an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1); the key is read from EDGEAV_TRANSLATOR_KEY.")]
TranslatorModelOpt = Annotated[Optional[str], typer.Option("--translator-model", help="OpenAVS --translator http: the model name the server knows (default gpt-4o-mini, the paper's).")]
TranslatorCheckpointOpt = Annotated[Optional[Path], typer.Option("--translator-checkpoint", parser=nonempty_path("--translator-checkpoint"), help="OpenAVS --translator local: a Qwen2.5 text model's Hugging Face folder (Qwen2ForCausalLM, e.g. Qwen2.5-1.5B-Instruct: config.json, safetensors, tokenizer) translates instead of the thinker.")]
SegmenterOpt = Annotated[Optional[str], typer.Option("--segmenter", help="OpenAVS: sam (default) or sam2 draws each box's mask.")]
LLMWeightsOpt = Annotated[Optional[LLMWeights], typer.Option("--llm-weights", help="Store the LLM's projections weight-only quantized (PyTorch engine; the I-LoRA stays exact).")]


def resolve_system(checkpoint: Optional[Path], engine: Optional[Path], preset: Optional[PresetName],
                   system: Optional[SystemName], task: Optional["TaskName"] = None):
    """The system a command runs, known before any model loads: ``--system``, else what the engine's
    manifest, the checkpoint's files or the preset say; the demo model's system without any of them.

    A checkpoint folder that does not exist is reported when the model loads, after the options are
    checked: until then the system is the one whose task ``--task`` names."""
    from edgeav.systems import demo_system, system_of_checkpoint, system_of_preset

    name = system.value if system is not None else None
    if engine is not None:
        from edgeav.engines.manifest import manifest_system, read_manifest

        named = manifest_system(read_manifest(engine))
        if name is not None and name != named:
            raise edgeav.OptionError(f"{engine}: a {named} engine; drop --system {name}")
        return get_system(named)
    if checkpoint is not None and (checkpoint.is_dir() or name is not None):
        return system_of_checkpoint(checkpoint, name)
    if checkpoint is not None:
        owners = [s for s in SYSTEMS if task is not None and task.value in get_system(s).tasks]
        return get_system(owners[0]) if len(owners) == 1 else demo_system()
    if preset is not None:
        return system_of_preset(preset.value, name)
    return get_system(name) if name is not None else demo_system()


def check_task(system, task: Optional["TaskName"]) -> str:
    """``--task`` as the system knows it (its default when not given), or a one-line error naming its tasks."""
    if task is None:
        return system.default_task
    if task.value not in system.tasks:
        owners = [get_system(s).title for s in SYSTEMS if task.value in get_system(s).tasks]
        raise edgeav.OptionError(f"--task {task.value} is a task of {' and '.join(owners)}, not of {system.title}; "
                                 f"{system.title}'s tasks: {', '.join(system.tasks)}")
    return task.value


def check_out(out: Path, system, task: str) -> None:
    """``--out``: a task that makes masks and a writable folder."""
    if "mask" not in system.task_outputs[task]:
        masked = [name for name, outputs in system.task_outputs.items() if "mask" in outputs]
        raise edgeav.OptionError(f"--out saves masks; task {task!r} makes none (use it with {', '.join(masked)})")
    check_output_folder(out, "--out")


def system_options(system, **given) -> dict:
    """The options only some systems take (``System.run_options``), those given: refused in one line by a
    system that does not take them."""
    given = {name: value for name, value in given.items() if value is not None}
    for name in given:
        if name not in system.run_options:
            owners = [get_system(s).title for s in SYSTEMS if name in get_system(s).run_options]
            flag = "--" + name.replace("_", "-")
            raise edgeav.OptionError(f"{flag} applies to {' and '.join(owners)}, not {system.title}; drop {flag}")
    return given


def runtime_recipe(checkpoint: Optional[Path], preset: Optional[PresetName], random_weights: bool, dtype: DType,
                   engine: Optional[Path] = None, threads: Optional[int] = None,
                   llm_weights: Optional[LLMWeights] = None, device: TorchDevice = TorchDevice.cpu,
                   system: Optional[SystemName] = None):
    """The :class:`~edgeav.runtime.Recipe` the model options name, refused in one line where they do not fit;
    nothing is loaded."""
    from edgeav.runtime import Recipe

    if engine is not None:
        if checkpoint is not None or preset is not None or random_weights:
            raise edgeav.OptionError("--engine runs an exported engine; drop --checkpoint, --preset and --random-weights")
        if dtype != DType.fp32 or llm_weights is not None or device != TorchDevice.cpu:
            raise edgeav.OptionError("--dtype, --llm-weights and --device apply to the PyTorch reference; an "
                                     "engine's precision is fixed at export (edgeav export --precision) and it "
                                     "runs on the CPU")
        return Recipe("engine", {"path": engine, "threads": threads})
    if threads is not None:
        raise edgeav.OptionError("--threads applies to --engine (ONNX Runtime); set torch's with OMP_NUM_THREADS")
    import torch  # only the PyTorch reference needs it: an engine's run never imports it

    if llm_weights is not None and device == TorchDevice.cpu:
        raise edgeav.OptionError(f"--llm-weights {llm_weights.value} on the CPU: torch's weight-only layers "
                                 "dequantize on every call and decode slower than fp32 there; export an engine "
                                 f"(edgeav export MODEL -o DIR --precision {llm_weights.value}) and run it with "
                                 "--engine DIR, or drop --llm-weights")
    if device == TorchDevice.cuda and not torch.cuda.is_available():
        raise edgeav.OptionError(f"--device cuda: torch {torch.__version__} sees no CUDA device; install a CUDA "
                                 "build of torch on a machine with an NVIDIA GPU, or drop --device")
    options = {"device": device.value, "dtype": getattr(torch, TORCH_DTYPES[dtype.value]),
               "llm_weights": llm_weights.value if llm_weights is not None else None}
    if checkpoint is not None:
        if random_weights:
            raise edgeav.OptionError("--random-weights and --checkpoint exclude each other; pass one")
        return Recipe("checkpoint", {"path": checkpoint, "preset": preset.value if preset else None,
                                     "system": system.value if system else None, **options})
    if preset is None and not random_weights and system is None:
        return Recipe("demo", options)
    from edgeav.systems import demo_system

    owner = get_system(system.value) if system is not None else demo_system()
    name = preset.value if preset else owner.small_preset
    if not random_weights and preset is None:
        raise edgeav.OptionError(f"--system {owner.name} names no weights; pass --checkpoint DIR, --engine DIR, or "
                                 f"--random-weights (with --preset, default {name})")
    if not random_weights:
        raise edgeav.OptionError(f"--preset {name} has no weights of its own; add --random-weights or pass --checkpoint")
    return Recipe("preset", {"name": name, "random_weights": True, "system": system.value if system else None,
                             **options})


def load_runtime(*args, **kwargs):
    """The model the options name (:func:`runtime_recipe`), built with a status line on a terminal."""
    recipe = runtime_recipe(*args, **kwargs)
    with status(recipe.describe()):
        return recipe.build()


def model_line(runtime, checkpoint: Optional[Path], random_weights: bool, engine: Optional[Path] = None) -> str:
    if random_weights:
        return f"{runtime.source}: random weights, the text is noise"
    return runtime.source if checkpoint or engine else f"{runtime.source} (no --checkpoint given)"


@contextlib.contextmanager
def status(message: str) -> Iterator:
    if stderr.is_terminal:
        with stderr.status(message):
            yield
    else:
        yield
