"""u-LLaVA's held-out suite: ``edgeav eval --suite shapes``.

Each case is a generated picture (:func:`shapes_case`): two or three coloured shapes (square, circle,
triangle; every colour once) on a dark background, one of them named by a referring expression
("red square") with its true mask and box. Two tasks are scored with the RES and REC benchmarks'
metrics (:mod:`edgeav.metrics`), each in two ways:

- generated: the picture goes through the whole runtime (``runtime.run``: decode, pre-processing, greedy
  generation, the ``[SEG]`` mask, GroundingDINO's box or the mask's box); ``res`` scores cIoU and gIoU,
  ``rec`` Prec@0.5 and the mean box IoU. A missing mask or box counts as empty.
- forced: the benchmarks' own protocol. The trained answer ``Sure. Info: [SEG]; [tag]...[/tag].`` is fed
  (teacher forcing) and SAM decodes the state that produced its ``[SEG]``; ``rec`` boxes that mask
  (the REC script's "mask2box" number).

``caption`` and ``ask`` have no ground truth here and are not scored. Random weights score near 0
when generating (they never write ``[SEG]``); their forced masks are real but random.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from edgeav.errors import OptionError
from edgeav.decoding import Generation, ensure_cache
from edgeav.generate import generate
from edgeav.metrics import SuiteResult, box_iou, box_precision, mask_box, mask_ciou, mask_giou
from edgeav.models.sam import sam_config
from edgeav.preprocess.clip import clip_crop_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.systems.ullava.config import prompt_ids
from edgeav.systems.ullava.tasks import get_task

if TYPE_CHECKING:
    from edgeav.runtime import Runtime

SUITES = ("shapes",)
SHAPES_TASKS = ("res", "rec")
SHAPES_SEED = 5_000_000  # seeds of their own: export receipts and int8 calibration draw from others
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (235, 235, 235)}
SHAPE_KINDS = ("square", "circle", "triangle")
NOTES = (
    "generated: the runtime's greedy answer (mask of its [SEG]; box from GroundingDINO or the mask); forced: the "
    "trained answer 'Sure. Info: [SEG]; [tag]<expression>[/tag].' fed as the RES/REC benchmarks do, SAM on its "
    "[SEG] state, rec boxing that mask",
    "a model with random weights (edgeav synth, --random-weights) scores near 0 generated, as it never writes [SEG]; "
    "its forced masks are real but random",
)


@dataclass(frozen=True)
class ShapesCase:
    """One picture of the suite: ``mask`` (bool [H, W]) and ``box`` (x1, y1, x2, y2: first and last covered
    pixel, as the REC scripts box a mask) are the shape ``expression`` names."""

    seed: int
    picture: np.ndarray  # uint8 [H, W, 3]
    expression: str
    mask: np.ndarray
    box: tuple[float, float, float, float]


def _shape_mask(kind: str, side: int) -> np.ndarray:
    """Bool [side, side]: the pixels whose centres the shape covers."""
    u = (np.arange(side) + 0.5) / side * 2 - 1
    u, v = u[None, :], u[:, None]
    if kind == "square":
        return np.ones((side, side), bool)
    if kind == "circle":
        return u * u + v * v <= 1
    if kind == "triangle":  # apex up
        return (v >= 2 * np.abs(u) - 1) & (v <= 1)
    raise ValueError(f"unknown shape {kind!r}; expected one of {', '.join(SHAPE_KINDS)}")


def shapes_case(seed: int) -> ShapesCase:
    """The picture ``seed`` draws: 96-224 px a side, 2-3 shapes of distinct colours that never touch;
    the first one drawn is the one the expression names."""
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(96, 225, 2))
    picture = np.empty((height, width, 3), np.uint8)
    picture[:] = rng.integers(0, 70, 3)
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[: int(rng.integers(2, 4))]]
    placed: list[tuple[int, int, int]] = []  # top, left, side
    masks = []
    for colour in colours:
        for _ in range(200):
            side = int(rng.integers(min(height, width) // 5, min(height, width) * 2 // 5 + 1))
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            # Boxes at least 2 px apart: every shape is whole and alone.
            if all(top + side + 2 <= t or t + s + 2 <= top or left + side + 2 <= x or x + s + 2 <= left
                   for t, x, s in placed):
                break
        else:
            continue  # no room left: fewer shapes
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        mask = np.zeros((height, width), bool)
        mask[top:top + side, left:left + side] = _shape_mask(kind, side)
        picture[mask] = COLOURS[colour]
        placed.append((top, left, side))
        masks.append((f"{colour} {kind}", mask))
    expression, mask = masks[0]
    return ShapesCase(seed, picture, expression, mask, mask_box(mask))


@contextlib.contextmanager
def written_suite(n: int, first_seed: int = SHAPES_SEED) -> Iterator[list[tuple[ShapesCase, Path]]]:
    """The suite's first ``n`` cases, each with its picture written as a PNG, removed when the block ends."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="edgeav-eval-") as folder:
        cases = []
        for i in range(n):
            case = shapes_case(first_seed + i)
            path = Path(folder) / f"shapes_{i}.png"
            Image.fromarray(case.picture).save(path)
            cases.append((case, path))
        yield cases


# -- the benchmarks' protocol: the trained answer fed, SAM on its [SEG] state ----------------------------


def trained_answer(expression: str) -> str:
    """What u-LLaVA v1 was trained to answer a segmentation request (ULLAVA_SPEC section 6)."""
    return f"Sure. Info: [SEG]; [tag]{expression}[/tag]."


@dataclass
class ForcedRun:
    generation: Generation
    prompt_tokens: int
    mask: np.ndarray | None  # bool [H, W]; None: no [SEG] among the forced tokens


def run_forced(runtime: Runtime, picture: np.ndarray, expression: str, *, forced: list[int] | None = None,
               stage: Callable[[str], object] | None = None) -> ForcedRun:
    """The ``res`` prompt on ``picture``, generation teacher-forced on ``forced`` (default: the trained
    answer's ids), then SAM on the state that produced the last ``[SEG]``: what the runtime's pipeline runs,
    stage by stage, on whatever model ``runtime`` holds (checkpoint or engine).

    ``stage(name)``, when given, is a context manager timing "visual", "llm" and "mask".
    """
    stage = stage or (lambda name: contextlib.nullcontext())
    config, tokenizer, model = runtime.config, runtime.tokenizer, runtime.engine.model
    tensor = lambda array: torch.from_numpy(array).to(runtime.device, runtime.dtype)  # noqa: E731
    with torch.inference_mode():
        with stage("visual"):
            tokens = model.encode_image(tensor(clip_crop_pixels(picture, config.vision.image_size)))
        instruction = get_task("res").instruction(expression=expression)
        ids = prompt_ids(tokenizer, instruction)
        embeds = model.embed_prompt(ids, {config.token_id("<image_patch>"): tokens})
        forced = tokenizer.encode(trained_answer(expression)) if forced is None else forced
        llm = model.llm
        ensure_cache(llm, embeds.shape[1] + len(forced) + 1, config.llm.max_seq_len)
        with stage("llm"):
            generation = generate(llm, embeds, max_new_tokens=len(forced), eos_id=tokenizer.eos_id,
                                  mask_token_ids=(config.token_id("[SEG]"),), n_mask_tokens=1, forced=forced)
        mask = None
        if generation.mask_hidden is not None:
            with stage("mask"):
                pixels, resized = sam_pixels(picture, sam_config(config.sam).img_size)
                embedding = model.encode_sam(tensor(pixels))
                logits = model.mask_logits(generation.mask_hidden.to(runtime.device, runtime.dtype), embedding,
                                           resized, picture.shape[:2])
                mask = (logits[0] > 0).cpu().numpy()
    return ForcedRun(generation, int(embeds.shape[1]), mask)


# -- the suite ------------------------------------------------------------------------------------------


def evaluate(runtime: Runtime, suite: str = "shapes", *, n: int = 200, tasks: tuple[str, ...] | None = None,
             progress: Callable[[str, int], None] | None = None) -> SuiteResult:
    """Score ``n`` pictures per task (default: res and rec), generated and forced (see the module docstring)."""
    if suite not in SUITES:
        raise OptionError(f"unknown suite {suite!r} for u-LLaVA; expected one of {', '.join(SUITES)}")
    if n < 1:
        raise OptionError(f"--n must be at least 1, got {n}")
    tasks = tuple(tasks) if tasks else SHAPES_TASKS
    unknown = [t for t in tasks if t not in SHAPES_TASKS]
    if unknown:
        raise OptionError(f"task {unknown[0]!r} is not scored by the shapes suite (no ground truth for it); "
                          f"expected some of {', '.join(SHAPES_TASKS)}")
    from edgeav.batch import Item

    result = SuiteResult(suite, n, notes=list(NOTES))
    for task in tasks:
        scores: dict[str, list] = {}
        with written_suite(n) as cases:
            items = [Item.make(str(path), expression=case.expression) for case, path in cases]
            for i, ((case, _), done) in enumerate(zip(cases, runtime.batch(items, task))):
                forced = run_forced(runtime, case.picture, case.expression).mask
                score(task, case, done.result_or_raise(), forced, scores)
                if progress:
                    progress(task, i + 1)
        result.metrics[task] = summarise(task, scores)
    return result


def score(task: str, case: ShapesCase, answer, forced_mask: np.ndarray | None, scores: dict[str, list]) -> None:
    """Add one case's scores to ``scores`` (what :func:`summarise` reads): ``answer`` is the runtime's
    Result, ``forced_mask`` the mask of the forced ``[SEG]`` (None: none)."""
    add = lambda name, value: scores.setdefault(name, []).append(value)  # noqa: E731
    empty = np.zeros_like(case.mask)
    forced_mask = empty if forced_mask is None else forced_mask
    if task == "res":
        # One expression, one mask: the first [SEG]'s (the one rec boxes), should the answer write more.
        add("generated", (answer.masks[0].mask if answer.masks else empty, case.mask))
        add("forced", (forced_mask, case.mask))
    elif task == "rec":
        add("generated", box_iou(answer.box, case.box))
        add("forced", box_iou(mask_box(forced_mask), case.box))
    else:
        raise OptionError(f"task {task!r} is not scored by the shapes suite; expected one of {', '.join(SHAPES_TASKS)}")


def summarise(task: str, scores: dict[str, list]) -> dict[str, float]:
    """The task's metrics: res cIoU and gIoU, rec Prec@0.5 and mean IoU; ``_forced`` for the forced protocol."""
    metrics = {}
    for way, suffix in (("generated", ""), ("forced", "_forced")):
        if task == "res":
            predicted, truth = zip(*scores[way])
            metrics[f"ciou{suffix}"] = mask_ciou(predicted, truth)
            metrics[f"giou{suffix}"] = mask_giou(predicted, truth)
        else:
            metrics[f"prec_at_0.5{suffix}"] = box_precision(scores[way])
            metrics[f"mean_iou{suffix}"] = float(np.mean(scores[way]))
    return metrics


__all__ = ["SHAPES_TASKS", "SUITES", "ForcedRun", "ShapesCase", "evaluate", "run_forced",
           "shapes_case", "trained_answer", "written_suite"]
