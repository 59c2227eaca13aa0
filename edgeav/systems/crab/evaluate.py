"""Task metrics on a held-out suite: ``edgeav eval --suite demo``.

The demo suite draws clips from the synthetic world (``edgeav.bench.world``)
with a seed that training never uses, writes each as an mp4, runs the task
through the full runtime (decode, preprocessing, model, parsing; as a batch, :mod:`edgeav.batch`) and scores the
result against the world's ground truth with the field's metrics.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from edgeav.errors import OptionError
from edgeav.metrics import (
    SuiteResult,
    ave_accuracy,
    avqa_accuracy,
    avss_class_iou,
    avss_miou,
    avvp_scores,
    box_iou,
    mask_fscore,
    mask_iou,
    mean_avvp_scores,
)
from edgeav.systems.crab.tasks import box_to_source

if TYPE_CHECKING:
    from edgeav.runtime import Runtime

SUITES = ("demo",)
# Training draws from seeds below this; the held-out suite starts here.
DEMO_EVAL_SEED = 1_000_000
DEMO_TASKS = ("ave", "avvp", "arig", "s4", "ms3", "avss", "avqa")


def evaluate(runtime: Runtime, suite: str = "demo", *, n: int = 200, tasks: tuple[str, ...] = DEMO_TASKS,
             progress: Callable[[str, int], None] | None = None) -> SuiteResult:
    """Run ``n`` held-out clips per task and return the metrics per task."""
    if suite not in SUITES:
        raise OptionError(f"unknown suite {suite!r} for Crab; expected one of {', '.join(SUITES)}")
    if n < 1:
        raise OptionError(f"--n must be at least 1, got {n}")
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown:
        raise OptionError(f"task {unknown[0]!r} is not in the demo suite; expected some of {', '.join(DEMO_TASKS)}")
    from edgeav.batch import Item

    result = SuiteResult(suite, n)
    for task in tasks:
        scores: dict[str, list] = {}
        with written_suite(task, n) as cases:
            items = [Item.make(str(case.path), question=case.truth.question, at=case.at_seconds) for case in cases]
            for i, (case, done) in enumerate(zip(cases, runtime.batch(items, task))):
                score(case, done.result_or_raise(), scores)
                if progress:
                    progress(task, i + 1)
        result.metrics[task] = summarise(task, scores)
    return result


@dataclass
class Case:
    """One held-out clip of the demo suite, written to ``path`` for as long as the caller iterates."""

    task: str
    clip: object  # edgeav.bench.world.WorldClip
    truth: object  # edgeav.bench.world.Truth
    path: Path
    at_seconds: list[int] | None


def _write_case(task: str, i: int, first_seed: int, folder: Path) -> Case:
    from edgeav.bench import world

    if task not in DEMO_TASKS:
        raise OptionError(f"task {task!r} is not in the demo suite; expected some of {', '.join(DEMO_TASKS)}")
    seed = first_seed + DEMO_TASKS.index(task) * 100_000 + i
    clip = world.sample_clip(seed, task)
    second = frame_second(task, clip.duration_s, np.random.default_rng(seed))
    truth = world.truth(clip, task, second=second)
    path = folder / f"{task}_{i}.mp4"
    world.write_clip(clip, path)
    return Case(task, clip, truth, path, [second] if task in ("s4", "ms3", "avss", "arig") else None)


def suite_cases(task: str, n: int, first_seed: int = DEMO_EVAL_SEED) -> Iterator[Case]:
    """The demo suite's first ``n`` clips of ``task`` (seeds never used in training), each an mp4 for as
    long as the caller is on it."""
    with tempfile.TemporaryDirectory(prefix="edgeav-eval-") as folder:
        for i in range(n):
            case = _write_case(task, i, first_seed, Path(folder))
            yield case
            case.path.unlink()


@contextlib.contextmanager
def written_suite(task: str, n: int, first_seed: int = DEMO_EVAL_SEED) -> Iterator[list[Case]]:
    """:func:`suite_cases` all written at once (a batch runs them), removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="edgeav-eval-") as folder:
        yield [_write_case(task, i, first_seed, Path(folder)) for i in range(n)]


def frame_second(task: str, duration_s: int, rng: np.random.Generator) -> int:
    """The second a mask task segments (S4/MS3 clips: 0-4; AVSS any); 0 for the rest."""
    if task in ("s4", "ms3"):
        return int(rng.integers(0, 5))
    return int(rng.integers(0, duration_s)) if task == "avss" else 0


def score(case: Case, answer, scores: dict[str, list]) -> None:
    """Add ``answer``'s scores on ``case`` to ``scores`` (metric name -> values), as :func:`summarise` reads them."""
    task, truth, clip = case.task, case.truth, case.clip
    add = lambda name, value: scores.setdefault(name, []).append(value)  # noqa: E731
    if task == "ave":
        add("accuracy", ave_accuracy(answer.events, truth.events, n_seconds=clip.duration_s))
    elif task == "avvp":
        add("avvp", avvp_scores(answer.events, truth.events, n_seconds=clip.duration_s))
    elif task == "arig":
        add("iou", box_iou(answer.box, box_to_source(truth.box, clip.width, clip.height)))
    elif task in ("s4", "ms3"):
        predicted = answer.masks[0].mask if answer.masks else np.zeros_like(truth.mask)
        add("iou", mask_iou(predicted, truth.mask))
        add("fscore", mask_fscore(predicted.astype(np.float32), truth.mask))
    elif task == "avss":
        predicted = answer.masks[0].mask if answer.masks else np.zeros_like(truth.mask)
        add("pairs", (predicted, truth.mask))
    elif task == "avqa":
        add("answers", (answer.answer, truth.answer))


def summarise(task: str, scores: dict[str, list]) -> dict[str, float]:
    """The task's metrics from the scores :func:`score` collected."""
    if task == "ave":
        return {"accuracy": float(np.mean(scores["accuracy"]))}
    if task == "avvp":
        mean = mean_avvp_scores(scores["avvp"]).to_dict()
        return {"segment_f1": mean["segment_type_av"], **{k: float(v) for k, v in mean.items()}}
    if task == "arig":
        ious = np.array(scores["iou"])
        return {"iou_at_0.5": float((ious >= 0.5).mean()), "mean_iou": float(ious.mean())}
    if task in ("s4", "ms3"):
        return {"miou": float(np.mean(scores["iou"])), "fscore": float(np.mean(scores["fscore"]))}
    if task == "avss":
        predicted, truth = (np.stack(x) for x in zip(*scores["pairs"]))
        per_class = avss_class_iou(predicted, truth)
        # The field averages over all 71 classes (unseen ones count 0); the world has 6.
        return {"miou_seen_classes": float(np.nanmean(per_class[1:])), "miou_71": avss_miou(predicted, truth)}
    predicted, truth = zip(*scores["answers"])
    return {"accuracy": float(avqa_accuracy(predicted, truth))}
