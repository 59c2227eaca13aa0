"""Crab: CLIP + BEATs -> Q-Formers -> LLaMA-2 with the per-token routed I-LoRA -> mask decoder
(CRAB_SPEC.md). Its presets, checkpoint layouts, tasks and wiring live in this package."""

from __future__ import annotations

import json
from pathlib import Path

from edgeav.systems.base import System
from edgeav.weight_files import CONFIG_FILE, converted_system
from edgeav.systems.crab.tasks import TASKS

RELEASED_MARKERS = ("finetune_weights.bin", "avs_finetune_weights.bin", "avss_finetune_weights.bin")
# A config.json beside the finetune files can only be the Llama's or CLIP's folder (any other model's
# finetune_weights.bin is not Crab's).
OWN_CONFIG_TYPES = ("llama", "clip", "clip_vision_model")


def _recognises(folder: Path) -> bool:
    converted = converted_system(folder)
    if converted is not None:
        return converted == "crab"
    if not any((folder / name).is_file() for name in RELEASED_MARKERS):
        return False
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in OWN_CONFIG_TYPES


def _load(folder, preset=None):
    from edgeav.systems.crab.checkpoints import load_checkpoint

    return load_checkpoint(folder, preset)


def _synthesize(preset, seed=0, dtype=None):
    import torch

    from edgeav.systems.crab.checkpoints import synthesize

    return synthesize(preset, seed, dtype or torch.float32)


def _save_converted(loaded, folder):
    from edgeav.systems.crab.checkpoints import save_converted

    return save_converted(loaded, folder)


def _save_released(loaded, folder):
    from edgeav.systems.crab.checkpoints import save_released

    return save_released(loaded, folder)


def _open_engine(folder, threads=None):
    from edgeav.systems.crab.onnx_engine import OnnxEngine

    return OnnxEngine(folder, threads=threads)


def _export():
    # The reading half imports no torch (engines are checked on every load); the writing half comes with export.
    from edgeav.systems.crab.engine_layout import SYSTEM_EXPORT

    return SYSTEM_EXPORT


def _pipeline(loaded, **options):
    from edgeav.systems.crab.pipeline import CrabPipeline

    return CrabPipeline(loaded, **options)


def _check_run(task, *, source=None, question=None, expression=None, max_new_tokens=None, at_seconds=None,
               audio=None, fps=None, silent_audio=False) -> None:
    from edgeav.systems.crab.inputs import check_inputs
    from edgeav.systems.crab.pipeline import check_run_options
    from edgeav.systems.crab.tasks import get_task

    check_run_options(get_task(task), question=question, expression=expression, max_new_tokens=max_new_tokens,
                      at_seconds=at_seconds)
    check_inputs(source, audio=audio, fps=fps, silent_audio=silent_audio)


def _check_stream(task, **options):
    from edgeav.systems.crab.pipeline import check_stream_options

    return check_stream_options(task, **options)


def _evaluate(runtime, suite, *, n, tasks=None, progress=None):
    from edgeav.systems.crab.evaluate import DEMO_TASKS, evaluate

    return evaluate(runtime, suite, n=n, tasks=tasks or DEMO_TASKS, progress=progress)


def _bench():
    from edgeav.bench import harness

    return harness


def _outputs(task) -> frozenset[str]:
    if task.mask_classes:
        return frozenset({"mask"})
    return frozenset({"box"}) if task.output == "box" else frozenset()


SYSTEM = System(
    name="crab",
    title="Crab",
    presets={"crab-7b": "Crab's released shapes, about 30 GB of fp32 weights",
             "crab-small": "about 100 M parameters at Crab's wiring (CPU benchmarking)",
             "crab-1b": "crab-small's encoders around a 965 M LLaMA (CPU benchmarks bound by weight reads)",
             "crab-tiny": "a few M parameters (tests, the demo model)"},
    small_preset="crab-tiny",
    tasks={name: task.description for name, task in TASKS.items()},
    default_task="ave",
    recognises=_recognises,
    load_checkpoint=_load,
    synthesize=_synthesize,
    save_converted=_save_converted,
    save_released=_save_released,
    pipeline=_pipeline,
    open_engine=_open_engine,
    export=_export,
    check_run=_check_run,
    task_outputs={name: _outputs(task) for name, task in TASKS.items()},
    check_stream=_check_stream,
    evaluate=_evaluate,
    suites={"demo": "held-out clips of the synthetic world the demo model learned (bench/world.py), every task"},
    bench=_bench,
    released_layout="finetune_weights.bin + a Llama folder + a CLIP folder + the BEATs .pt",
)
