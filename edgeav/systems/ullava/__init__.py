"""u-LLaVA (v1): CLIP + one Linear -> Vicuna-7B; SAM ViT-H prompted by the ``[SEG]`` state
(ULLAVA_SPEC.md). Its presets, checkpoint layouts, tasks and wiring live in this package."""

from __future__ import annotations

from edgeav.systems.base import System
from edgeav.systems.ullava.tasks import TASKS


def _recognises(folder):
    from edgeav.systems.ullava.checkpoints import recognises

    return recognises(folder)


def _load(folder, preset=None):
    from edgeav.systems.ullava.checkpoints import load_checkpoint

    return load_checkpoint(folder, preset)


def _synthesize(preset, seed=0, dtype=None):
    import torch

    from edgeav.systems.ullava.checkpoints import synthesize

    return synthesize(preset, seed, dtype or torch.float32)


def _save_converted(loaded, folder):
    from edgeav.systems.ullava.checkpoints import save_converted

    return save_converted(loaded, folder)


def _save_released(loaded, folder):
    from edgeav.systems.ullava.checkpoints import save_released

    return save_released(loaded, folder)


def _pipeline(loaded, **options):
    from edgeav.systems.ullava.pipeline import UllavaPipeline

    return UllavaPipeline(loaded, **options)


def _open_engine(folder, threads=None):
    from edgeav.systems.ullava.onnx_engine import OnnxUllava

    return OnnxUllava(folder, threads=threads)


def _export():
    from edgeav.systems.ullava.export import EXPORT

    return EXPORT


def _check_run(task, **options):
    from edgeav.systems.ullava.pipeline import check_run

    check_run(task, **options)


def _check_stream(task, **options):
    from edgeav.systems.ullava.pipeline import check_stream

    return check_stream(task, **options)


def _evaluate(runtime, suite, *, n, tasks=None, progress=None):
    from edgeav.systems.ullava.evaluate import evaluate

    return evaluate(runtime, suite, n=n, tasks=tasks, progress=progress)


def _bench():
    from edgeav.systems.ullava import bench

    return bench


SYSTEM = System(
    name="ullava",
    title="u-LLaVA",
    presets={"ullava-7b": "u-LLaVA v1's released shapes, about 31 GB of fp32 weights",
             "ullava-tiny": "u-LLaVA v1's wiring at test size"},
    small_preset="ullava-tiny",
    tasks={name: task.description for name, task in TASKS.items()},
    default_task="caption",
    recognises=_recognises,
    load_checkpoint=_load,
    synthesize=_synthesize,
    save_converted=_save_converted,
    save_released=_save_released,
    pipeline=_pipeline,
    open_engine=_open_engine,
    export=_export,
    released_layout="config.json of UllavaForCausalLM + pytorch_model-*.bin or model*.safetensors + tokenizer.model",
    check_run=_check_run,
    task_outputs={name: task.outputs for name, task in TASKS.items()},
    check_stream=_check_stream,
    hears_audio=False,
    evaluate=_evaluate,
    suites={"shapes": "generated pictures of coloured shapes: res (cIoU, gIoU) and rec (Prec@0.5, mean box IoU)"},
    bench=_bench,
)
