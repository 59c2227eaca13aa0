"""The metrics the field reports: for Crab's tasks AVE accuracy, AVVP segment/event F1,
box IoU, AVS mask IoU and F-score, AVSS per-class IoU, AVQA accuracy; for referring
segmentation and comprehension (u-LLaVA) cIoU, gIoU and Prec@0.5; and :class:`SuiteResult`,
what ``edgeav eval`` reports for any system.

Each scorer takes what :mod:`edgeav.tasks` parsers return (events, boxes) or plain arrays (masks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Sequence

import numpy as np

from edgeav.tasks import AVSS_CLASSES, BACKGROUND, SEGMENTS_PER_CLIP, Event
from edgeav.tasks import normalise_label as _norm

def _covered_seconds(event: Event, n_seconds: int, clip_start_s: float, inclusive_end: bool) -> range:
    start = event.start_s - clip_start_s
    end = event.end_s - clip_start_s + (1.0 if inclusive_end else 0.0)
    first = max(0, math.ceil(start - 0.5))  # second i is covered when its centre i + 0.5 is in [start, end)
    last = min(n_seconds, math.ceil(end - 0.5))
    return range(first, max(first, last))


def ave_second_labels(
    events: Iterable[Event], *, n_seconds: int = SEGMENTS_PER_CLIP, clip_start_s: float = 0.0,
    inclusive_end: bool = False,
) -> list[str]:
    """Per-second labels of a clip: the (normalised) label of the event covering each
    second, ``BACKGROUND`` where none does; a later event overrides an earlier one.

    With ``inclusive_end`` the end second is covered too, as GeWu-Lab's AVE scorer reads ranges.
    """
    labels = [BACKGROUND] * n_seconds
    for event in events:
        for second in _covered_seconds(event, n_seconds, clip_start_s, inclusive_end):
            labels[second] = _norm(event.label)
    return labels


def ave_accuracy(
    predicted: Iterable[Event],
    truth: Iterable[Event],
    *,
    n_seconds: int = SEGMENTS_PER_CLIP,
    clip_start_s: float = 0.0,
    inclusive_end: bool = False,
) -> float:
    """AVE accuracy of one clip: the share of its ``n_seconds`` one-second segments whose
    predicted label (event class, or background) equals the true one.

    The field's AVE accuracy pools all segments of the test set; with 10 segments per
    clip that is the mean of this over clips. Labels compare case-, space- and
    underscore-insensitively. ``inclusive_end=True`` reproduces GeWu-Lab's scorer,
    which counts the end second of both ranges as covered.
    """
    pred = ave_second_labels(predicted, n_seconds=n_seconds, clip_start_s=clip_start_s, inclusive_end=inclusive_end)
    true = ave_second_labels(truth, n_seconds=n_seconds, clip_start_s=clip_start_s, inclusive_end=inclusive_end)
    return sum(p == t for p, t in zip(pred, true)) / n_seconds


@dataclass(frozen=True)
class AVVPScores:
    """AVVP F1 scores of one clip or averaged over clips (standard LLP evaluation).

    ``segment_*`` score one-second segments, ``event_*`` score events (runs of
    consecutive seconds) matched at IoU >= 0.5. ``*_av`` is the audio-visual
    modality (a class present in audio and visual in the same second);
    ``*_event_av`` ("Event@AV") pools the audio and visual counts of each class.
    """

    segment_audio: float
    segment_visual: float
    segment_av: float
    segment_event_av: float
    event_audio: float
    event_visual: float
    event_av: float
    event_event_av: float

    @property
    def segment_type_av(self) -> float:
        """"Type@AV": the mean of the audio, visual and audio-visual segment-level F1."""
        return (self.segment_audio + self.segment_visual + self.segment_av) / 3

    @property
    def event_type_av(self) -> float:
        """"Type@AV" at event level."""
        return (self.event_audio + self.event_visual + self.event_av) / 3

    def to_dict(self) -> dict:
        return {**asdict(self), "segment_type_av": self.segment_type_av, "event_type_av": self.event_type_av}


def avvp_matrices(
    events: Iterable[Event],
    classes: Sequence[str],
    *,
    n_seconds: int = SEGMENTS_PER_CLIP,
    clip_start_s: float = 0.0,
    strict: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Audio and visual activity, each bool[len(classes), n_seconds]: class c is active in
    second i when an event of that class covers the second's centre.

    "audio-visual" events count in both. Labels match ``classes`` case-, space- and
    underscore-insensitively; an unknown label is skipped, or raises ``ValueError``
    when ``strict``.
    """
    index = {_norm(c): i for i, c in enumerate(classes)}
    audio = np.zeros((len(classes), n_seconds), bool)
    visual = np.zeros_like(audio)
    for event in events:
        row = index.get(_norm(event.label))
        if row is None:
            if strict:
                raise ValueError(f"event label {event.label!r} is not one of the {len(classes)} classes given")
            continue
        seconds = list(_covered_seconds(event, n_seconds, clip_start_s, False))
        if event.modality in ("audio", "audio-visual"):
            audio[row, seconds] = True
        if event.modality in ("visual", "audio-visual"):
            visual[row, seconds] = True
    return audio, visual


def _mean_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    # Classes with nothing predicted and nothing true are skipped; none left scores 1 (all true negatives).
    active = (tp + fp + fn) > 0
    if not active.any():
        return 1.0
    return float(np.mean(2 * tp[active] / (2 * tp[active] + fp[active] + fn[active])))


def _segment_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _run_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    overlap = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    return overlap / ((a[1] - a[0]) + (b[1] - b[0]) - overlap)


def _event_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # A predicted event is a hit when some true event of its class overlaps it at IoU >= 0.5;
    # a true event is missed when no predicted event does (matching is not one-to-one).
    n = pred.shape[0]
    tp, fp, fn = np.zeros(n), np.zeros(n), np.zeros(n)
    for c in range(n):
        p_runs, t_runs = _runs(pred[c]), _runs(truth[c])
        hits = sum(any(_run_iou(p, t) >= 0.5 for t in t_runs) for p in p_runs)
        tp[c], fp[c] = hits, len(p_runs) - hits
        fn[c] = sum(not any(_run_iou(t, p) >= 0.5 for p in p_runs) for t in t_runs)
    return tp, fp, fn


def avvp_scores(
    predicted: Iterable[Event],
    truth: Iterable[Event],
    *,
    classes: Sequence[str] | None = None,
    n_seconds: int = SEGMENTS_PER_CLIP,
    clip_start_s: float = 0.0,
) -> AVVPScores:
    """Segment- and event-level F1 of one clip, as the standard AVVP (LLP) evaluation.

    Per modality, F1 = 2TP / (2TP + FP + FN) per class over ``classes`` x ``n_seconds``
    one-second segments, averaged over the classes with anything predicted or true
    (1.0 when there is none). Audio-visual truth and prediction are the per-second
    AND of audio and visual. Event level counts events (runs of consecutive seconds)
    matched at IoU >= 0.5. ``classes`` defaults to the labels seen in either list,
    which scores the same as the 25 LLP classes when every label is one of them;
    given explicitly, predicted labels outside it are ignored and true ones raise
    ``ValueError``.
    """
    predicted, truth = list(predicted), list(truth)
    if classes is None:
        classes = sorted({_norm(e.label) for e in predicted + truth})
    pa, pv = avvp_matrices(predicted, classes, n_seconds=n_seconds, clip_start_s=clip_start_s)
    ta, tv = avvp_matrices(truth, classes, n_seconds=n_seconds, clip_start_s=clip_start_s, strict=True)
    scores = {}
    for level, count in (("segment", _segment_counts), ("event", _event_counts)):
        a, v, av = count(pa, ta), count(pv, tv), count(pa & pv, ta & tv)
        pooled = [x + y for x, y in zip(a, v)]
        scores[f"{level}_audio"] = _mean_f1(*a)
        scores[f"{level}_visual"] = _mean_f1(*v)
        scores[f"{level}_av"] = _mean_f1(*av)
        scores[f"{level}_event_av"] = _mean_f1(*pooled)
    return AVVPScores(**scores)


def mean_avvp_scores(scores: Sequence[AVVPScores]) -> AVVPScores:
    """The field's dataset score: each F1 averaged over clips."""
    if not scores:
        raise ValueError("no clips to average")
    names = [f.name for f in fields(AVVPScores)]
    return AVVPScores(**{n: float(np.mean([getattr(s, n) for s in scores])) for n in names})


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) of a bool mask's first and last covered pixel (as ``masks_to_boxes``); None when it
    covers none."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


def box_iou(predicted: Sequence[float] | None, truth: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes in the same pixel space;
    a missing prediction scores 0."""
    if predicted is None:
        return 0.0
    px1, py1, px2, py2 = (float(v) for v in predicted)
    tx1, ty1, tx2, ty2 = (float(v) for v in truth)
    inter = max(0.0, min(px2, tx2) - max(px1, tx1)) * max(0.0, min(py2, ty2) - max(py1, ty1))
    union = max(0.0, px2 - px1) * max(0.0, py2 - py1) + max(0.0, tx2 - tx1) * max(0.0, ty2 - ty1) - inter
    return inter / union if union > 0 else 0.0


def iou_share(ious: Sequence[float], threshold: float = 0.5) -> float:
    """The share of samples whose IoU is at least ``threshold`` (ARIG's accuracy at 0.5)."""
    if len(ious) == 0:
        raise ValueError("no samples to score")
    return float(np.mean(np.asarray(ious, float) >= threshold))


def _masks(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: predicted {predicted.shape}, truth {truth.shape}")
    return predicted, truth.astype(bool)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of a binary mask (sigmoid > 0.5 already applied) with the true mask.

    An empty true mask scores on the background, as AVSBench and Crab do: the share of
    pixels predicted as background.
    """
    predicted, truth = _masks(predicted, truth)
    predicted = predicted.astype(bool)
    if not truth.any():
        return float(np.mean(~predicted))
    return float((predicted & truth).sum() / (predicted | truth).sum())


def mask_miou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """mIoU: :func:`mask_iou` averaged over samples (frames)."""
    if len(predicted) != len(truth) or not predicted:
        raise ValueError(f"need as many predicted as true masks, at least one; got {len(predicted)} and {len(truth)}")
    return float(np.mean([mask_iou(p, t) for p, t in zip(predicted, truth)]))


def fg_bg_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """OpenAVS's per-frame mIoU (its Eq. 9): the mean of the foreground IoU and the background IoU of a
    binary mask. A class absent from both masks scores 1 (nothing to get wrong)."""
    predicted, truth = _masks(predicted, truth)
    predicted = predicted.astype(bool)
    scores = []
    for p, t in ((predicted, truth), (~predicted, ~truth)):
        union = (p | t).sum()
        scores.append(1.0 if union == 0 else float((p & t).sum() / union))
    return float(np.mean(scores))


def mask_fscore(probabilities: np.ndarray, truth: np.ndarray, *, beta2: float = 0.3, n_thresholds: int = 255) -> float:
    """F-measure of one sample: the best over ``n_thresholds`` thresholds t in
    linspace(0, 1 - 1e-10) of F = (1 + beta2) P R / (beta2 P + R), where the mask is
    ``probabilities >= t`` (sigmoid of the mask logits).

    An empty true mask scores 0: AVSBench's Eval_Fmeasure skips it and, called per
    sample as Crab does, returns 0 that still counts in the mean.
    """
    probabilities, truth = _masks(probabilities, truth)
    if not truth.any():
        return 0.0
    thresholds = np.linspace(0.0, 1.0 - 1e-10, n_thresholds)
    ranked = np.sort(probabilities.ravel())
    ranked_true = np.sort(probabilities[truth])
    predicted = ranked.size - np.searchsorted(ranked, thresholds, side="left")  # pixels >= t
    hits = ranked_true.size - np.searchsorted(ranked_true, thresholds, side="left")
    precision, recall = hits / (predicted + 1e-20), hits / (truth.sum() + 1e-20)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
    return float(np.nan_to_num(f, nan=0.0).max())


def null_score(predicted: np.ndarray) -> float:
    """Ref-AVS null split: sqrt of the share of pixels predicted as foreground (lower is better)."""
    return float(math.sqrt(np.mean(np.asarray(predicted, bool))))


def avss_class_iou(predicted: np.ndarray, truth: np.ndarray, *, n_classes: int = AVSS_CLASSES) -> np.ndarray:
    """Per-class IoU of AVSS label maps (int[H, W] or int[N, H, W], class ids 0..n_classes-1).

    For each class, the IoU of every frame where the class is predicted or true,
    averaged over those frames; NaN for a class no frame has. Pixels whose true id
    is outside 0..n_classes-1 (an ignore label such as 255) are left out.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"label map shapes differ: predicted {predicted.shape}, truth {truth.shape}")
    return _avss_iou(predicted, truth, n_classes)


def _avss_iou(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    if predicted.ndim == 2:
        predicted, truth = predicted[None], truth[None]
    iou_sum, frames = np.zeros(n_classes), np.zeros(n_classes)
    for p, t in zip(predicted.astype(np.int64), truth.astype(np.int64)):
        valid_t = (t >= 0) & (t < n_classes)  # pixels without a valid true class are left out
        valid_p = valid_t & (p >= 0) & (p < n_classes)
        area_p = np.bincount(p[valid_p], minlength=n_classes)
        area_t = np.bincount(t[valid_t], minlength=n_classes)
        same = valid_p & (p == t)
        inter = np.bincount(p[same], minlength=n_classes)
        union = area_p + area_t - inter
        seen = union > 0
        iou_sum[seen] += inter[seen] / union[seen]
        frames[seen] += 1
    with np.errstate(invalid="ignore"):
        return iou_sum / np.where(frames > 0, frames, np.nan)


def avss_miou(predicted: np.ndarray, truth: np.ndarray, *, n_classes: int = AVSS_CLASSES) -> float:
    """AVSS mIoU as AVSBench and Crab report it: the mean of :func:`avss_class_iou` over
    all ``n_classes`` classes, a class never seen counting 0."""
    return float(np.mean(np.nan_to_num(avss_class_iou(predicted, truth, n_classes=n_classes), nan=0.0)))


def mask_intersection_union(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """Foreground pixels in both masks and in either (binary masks of one size)."""
    predicted, truth = _masks(predicted, truth)
    predicted = predicted.astype(bool)
    return int((predicted & truth).sum()), int((predicted | truth).sum())


def mask_giou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """gIoU of referring segmentation: the mean of each mask's foreground IoU.

    A pair with no foreground in either mask (nothing to find, nothing found) scores 1, as the
    RES benchmark scripts count a "no-object target"; an empty target with a predicted mask scores 0.
    """
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many predicted as true masks, at least one; got {len(predicted)} and {len(truth)}")
    ious = []
    for p, t in zip(predicted, truth):
        inter, union = mask_intersection_union(p, t)
        ious.append(inter / union if union else 1.0)
    return float(np.mean(ious))


def mask_ciou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """cIoU of referring segmentation: foreground intersections summed over all masks, over their unions
    summed; 0 when no mask of either side has foreground (the benchmark scripts divide by 1e-10)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many predicted as true masks, at least one; got {len(predicted)} and {len(truth)}")
    inter, union = np.sum([mask_intersection_union(p, t) for p, t in zip(predicted, truth)], axis=0)
    return float(inter / union) if union else 0.0


def box_precision(ious: Sequence[float], threshold: float = 0.5) -> float:
    """REC Prec@0.5: the share of boxes whose IoU with the true box is above ``threshold`` (strictly, as
    u-LLaVA's REC script counts); a missing box counts with IoU 0."""
    if len(ious) == 0:
        raise ValueError("no boxes to score")
    return float(np.mean(np.asarray(ious, float) > threshold))


@dataclass
class SuiteResult:
    """What ``edgeav eval`` reports: ``n`` cases per task of ``suite``; ``metrics``: task -> metric -> value;
    ``notes``: what a reader needs to read the numbers (how they were made, what they cannot say)."""

    suite: str
    n: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"suite": self.suite, "n": self.n, "metrics": self.metrics, "notes": self.notes}


def answers_match(predicted: str | None, truth: str) -> bool:
    """AVQA: the answer equals the true one, ignoring case and spacing."""
    return predicted is not None and " ".join(predicted.lower().split()) == " ".join(truth.lower().split())


def avqa_accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """AVQA accuracy: the share of questions whose answer :func:`answers_match` the truth;
    a missing answer is wrong."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many answers as truths, at least one; got {len(predicted)} and {len(truth)}")
    return sum(answers_match(p, t) for p, t in zip(predicted, truth)) / len(truth)


__all__ = [
    "AVVPScores", "answers_match", "ave_accuracy", "ave_second_labels", "avqa_accuracy", "avss_class_iou",
    "avss_miou", "avvp_matrices", "avvp_scores", "box_iou", "box_precision", "iou_share", "mask_ciou", "mask_fscore",
    "mask_giou", "mask_intersection_union", "mask_iou", "mask_miou", "mean_avvp_scores", "null_score", "SuiteResult",
]
