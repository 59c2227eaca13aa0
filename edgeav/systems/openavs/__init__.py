"""OpenAVS: training-free open-vocabulary sounding-object segmentation, a cascade of describers (Pengi,
the Qwen2.5-Omni thinker, or BEATs' AudioSet head), a translator LLM, GroundingDINO and SAM or SAM2
(OPENAVS_SPEC.md). Its presets, checkpoint layouts, task options and wiring live in this package."""

from __future__ import annotations

from edgeav.systems.base import System
from edgeav.systems.openavs.tasks import TASK, TASK_DESCRIPTION


def _recognises(folder):
    from edgeav.systems.openavs.checkpoints import recognises

    return recognises(folder)


def _load(folder, preset=None):
    from edgeav.systems.openavs.checkpoints import load_checkpoint

    return load_checkpoint(folder, preset)


def _synthesize(preset, seed=0, dtype=None):
    import torch

    from edgeav.systems.openavs.checkpoints import synthesize

    return synthesize(preset, seed, dtype or torch.float32)


def _save_converted(loaded, folder):
    from edgeav.systems.openavs.checkpoints import save_converted

    return save_converted(loaded, folder)


def _save_released(loaded, folder):
    from edgeav.systems.openavs.checkpoints import save_released

    return save_released(loaded, folder)


def _pipeline(loaded, **options):
    from edgeav.systems.openavs.pipeline import OpenAVSPipeline

    return OpenAVSPipeline(loaded, **options)


def _check_run(task, **options):
    from edgeav.systems.openavs.pipeline import check_run

    check_run(task, **options)


def _check_stream(task, **options):
    from edgeav.systems.openavs.pipeline import check_stream

    return check_stream(task, **options)


def _bench():
    from edgeav.systems.openavs import bench

    return bench


def _open_engine(folder, threads=None):
    from edgeav.systems.openavs.onnx_engine import OnnxOpenAVS

    return OnnxOpenAVS(folder, threads=threads)


def _export():
    from edgeav.systems.openavs.export import EXPORT

    return EXPORT


def _parameter_counts(preset):
    import torch

    from edgeav.systems.openavs.config import preset as get_preset
    from edgeav.systems.openavs.model import OpenAVSModel

    with torch.device("meta"):
        return OpenAVSModel(get_preset(preset)).parameter_counts()


SYSTEM = System(
    name="openavs",
    title="OpenAVS",
    presets={"openavs": "the paper's components: Pengi, Qwen2.5-Omni-7B's thinker, GroundingDINO SwinT-OGC, SAM "
                        "ViT-H, SAM2.1 hiera-large, fine-tuned BEATs",
             "openavs-small": "real Pengi and BEATs, SAM ViT-B, SAM2.1 hiera-tiny, a small thinker: CPU benchmarks",
             "openavs-tiny": "every component at test size"},
    small_preset="openavs-tiny",
    tasks={TASK: TASK_DESCRIPTION},
    default_task=TASK,
    recognises=_recognises,
    load_checkpoint=_load,
    synthesize=_synthesize,
    save_converted=_save_converted,
    save_released=_save_released,
    pipeline=_pipeline,
    released_layout=("pengi/base.pth with pengi/gpt2/ and pengi/clip/ tokenizers, groundingdino_swint_ogc.pth with "
                     "bert-base-uncased/vocab.txt, sam_vit_h_4b8939.pth (optional: sam2.1_hiera_large.pt, the "
                     "fine-tuned BEATs .pt, qwen2.5-omni/)"),
    check_run=_check_run,
    task_outputs={TASK: frozenset({"mask"})},
    check_stream=_check_stream,
    bench=_bench,
    parameter_counts=_parameter_counts,
    open_engine=_open_engine,
    export=_export,
    run_options=("variant", "translator", "translator_url", "translator_model", "translator_checkpoint",
                 "segmenter"),
)
