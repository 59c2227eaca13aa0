"""Crab+: the Qwen2.5-Omni thinker with the routed I-LoRA in all three towers, and SAM2.1 prompted by the
boxes and points it writes (CRABPLUS_SPEC.md). Its presets, checkpoint layouts, tasks and wiring live in
this package."""

from __future__ import annotations

from edgeav.systems.base import System
from edgeav.systems.crabplus.tasks import TASKS


def _recognises(folder):
    from edgeav.systems.crabplus.checkpoints import recognises

    return recognises(folder)


def _load(folder, preset=None):
    from edgeav.systems.crabplus.checkpoints import load_checkpoint

    return load_checkpoint(folder, preset)


def _synthesize(preset, seed=0, dtype=None):
    import torch

    from edgeav.systems.crabplus.checkpoints import synthesize

    return synthesize(preset, seed, dtype or torch.float32)


def _save_converted(loaded, folder):
    from edgeav.systems.crabplus.checkpoints import save_converted

    return save_converted(loaded, folder)


def _save_released(loaded, folder):
    from edgeav.systems.crabplus.checkpoints import save_released

    return save_released(loaded, folder)


def _pipeline(loaded, **options):
    from edgeav.systems.crabplus.pipeline import CrabPlusPipeline

    return CrabPlusPipeline(loaded, **options)


def _open_engine(folder, threads=None):
    from edgeav.systems.crabplus.onnx_engine import OnnxCrabPlus

    return OnnxCrabPlus(folder, threads=threads)


def _export():
    from edgeav.systems.crabplus.export import EXPORT

    return EXPORT


def _check_run(task, **options):
    from edgeav.systems.crabplus.pipeline import check_run

    check_run(task, **options)


def _check_stream(task, **options):
    from edgeav.systems.crabplus.pipeline import check_stream

    return check_stream(task, **options)


def _bench():
    from edgeav.systems.crabplus import bench

    return bench


def _parameter_counts(preset):
    import torch

    from edgeav.systems.crabplus.config import preset as get_preset
    from edgeav.systems.crabplus.model import CrabPlusModel

    with torch.device("meta"):
        return CrabPlusModel(get_preset(preset)).parameter_counts()


SYSTEM = System(
    name="crabplus",
    title="Crab+",
    presets={"crabplus-7b": "Crab+'s released shapes: Qwen2.5-Omni-7B's thinker, I-LoRA r 128, SAM2.1 hiera-large",
             "crabplus-small": "Crab+'s wiring at a CPU benchmarking scale (about 0.3 B parameters)",
             "crabplus-tiny": "Crab+'s wiring at test size"},
    small_preset="crabplus-tiny",
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
    released_layout=("Qwen2.5-Omni's config.json + model*.safetensors + vocab.json/merges.txt, Crab+'s "
                     "finetune_weights.bin and sam2.1_hiera_large.pt"),
    check_run=_check_run,
    task_outputs={name: frozenset({"mask"} if task.output == "mask" else {"box"} if task.output == "box" else ())
                  for name, task in TASKS.items()},
    check_stream=_check_stream,
    bench=_bench,
    parameter_counts=_parameter_counts,
)
