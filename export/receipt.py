"""Fidelity receipts and calibration inputs, both from the demo world run through the reference.

A receipt runs the PyTorch reference and the exported engine on the demo
suite's held-out clips and records how far the engine drifts:

- next-token distributions, teacher-forced on the reference's own answer: max and
  mean absolute logit difference, KL(reference || engine), top-1 agreement;
- greedy outputs: the share of runs whose text is identical;
- masks: IoU of the engine's masks against the reference's;
- the task metrics of ``edgeav eval`` for both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from edgeav.systems.crab.checkpoints import LoadedCrab
from edgeav.errors import OptionError
from edgeav.systems.crab.evaluate import DEMO_TASKS, score, suite_cases, summarise
from edgeav.runtime import Runtime
from edgeav.stages import Trace
from edgeav.metrics import mask_iou

# Calibration clips come from their own seeds: neither training's nor the held-out suite's.
CALIBRATION_SEED = 2_000_000
# Encoders calibrate on joint-weight tasks (video and single frames), so no mask variant is needed.
_CALIBRATION_TASKS = {"visual": ("ave", "arig"), "audio": ("ave", "avqa"), "mask_avs": ("s4", "ms3"),
                      "mask_avss": ("avss",)}


def calibration_inputs(loaded: LoadedCrab, graph: str, n: int,
                       traces: dict[str, list[Trace]] | None = None) -> list[dict[str, np.ndarray]]:
    """Feeds for ``graph`` (visual, audio, mask_avs or mask_avss) from ``n`` demo clips per task.

    Mask feeds come from generation teacher-forced on the world's answer, so the six
    ``<mask_i>`` states exist even for a model that would not write them itself.
    ``traces`` (task -> traces) keeps the reference's runs for the next graph's call.
    """
    if graph not in _CALIBRATION_TASKS:
        raise OptionError(f"no calibration inputs for {graph!r}; expected one of {', '.join(_CALIBRATION_TASKS)}")
    traces = {} if traces is None else traces
    feeds: list[dict[str, np.ndarray]] = []
    for task in _CALIBRATION_TASKS[graph]:
        if task not in traces:
            traces[task] = _calibration_traces(loaded, task, n)
        for trace in traces[task]:
            if graph == "visual":
                feeds += [{"pixels": p} for p in trace.pixels]
            elif graph == "audio":
                feeds += [{"fbank": f} for f in trace.fbank]
            else:
                feeds += trace.mask_inputs
    return feeds


def _calibration_traces(loaded: LoadedCrab, task: str, n: int) -> list[Trace]:
    runtime = Runtime(loaded)
    traces = []
    for case in suite_cases(task, n, first_seed=CALIBRATION_SEED):
        answer = runtime.tokenizer.encode(case.truth.text)
        trace = Trace(forced=[answer] * len(case.at_seconds or [0]))
        runtime.run(case.path, task, question=case.truth.question, at_seconds=case.at_seconds, trace=trace)
        traces.append(trace)
    return traces


def _logit_stats(reference: list[torch.Tensor], engine: list[torch.Tensor]) -> dict[str, float]:
    diffs, kls, agree = [], [], []
    for ref, eng in zip(reference, engine):
        steps = min(len(ref), len(eng))
        if not steps:
            continue
        ref, eng = ref[:steps].double(), eng[:steps].double()
        diffs.append((ref - eng).abs())
        log_p, log_q = ref.log_softmax(-1), eng.log_softmax(-1)
        kls.append((log_p.exp() * (log_p - log_q)).sum(-1))
        agree.append(ref.argmax(-1) == eng.argmax(-1))
    if not diffs:
        return {}
    diff, kl, top1 = torch.cat([d.flatten() for d in diffs]), torch.cat(kls), torch.cat(agree)
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(top1.double().mean()),
            "steps": int(top1.numel())}


def compare(reference: Runtime, engine: Runtime, *, n: int, tasks: tuple[str, ...] = DEMO_TASKS,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt of ``engine`` against ``reference`` on ``n`` held-out clips per task."""
    ref_logits, eng_logits = [], []
    same_text, ious = [], []
    ref_scores: dict[str, dict[str, list]] = {t: {} for t in tasks}
    eng_scores: dict[str, dict[str, list]] = {t: {} for t in tasks}
    for task in tasks:
        for case in suite_cases(task, n):
            options = {"question": case.truth.question, "at_seconds": case.at_seconds}
            ref_trace = Trace()
            ref = reference.run(case.path, task, trace=ref_trace, **options)
            eng = engine.run(case.path, task, **options)
            forced = Trace(forced=ref_trace.tokens)
            engine.run(case.path, task, trace=forced, **options)
            ref_logits += ref_trace.logits
            eng_logits += forced.logits
            same_text.append(ref.text == eng.text)
            by_time = {m.time_s: m.mask for m in eng.masks}  # a mask the engine did not write counts 0
            ious += [mask_iou(by_time[m.time_s], m.mask) if m.time_s in by_time else 0.0 for m in ref.masks]
            score(case, ref, ref_scores[task])
            score(case, eng, eng_scores[task])
        progress(f"receipt: {task} done")
    return {
        "clips_per_task": n,
        "logits": _logit_stats(ref_logits, eng_logits),
        "greedy_text_agreement": float(np.mean(same_text)),
        "mask_iou_vs_reference": float(np.mean(ious)) if ious else None,
        "metrics": {t: {"reference": summarise(t, ref_scores[t]), "engine": summarise(t, eng_scores[t])}
                    for t in tasks},
    }


def fidelity_receipt(loaded: LoadedCrab, engine_dir, *, n: int, tasks: tuple[str, ...] = DEMO_TASKS,
                     progress: Callable[[str], None] = lambda message: None) -> dict:
    """:func:`compare` of the engine in ``engine_dir`` against ``loaded`` run by the reference."""
    from edgeav.systems.crab.onnx_engine import OnnxEngine

    return compare(Runtime(loaded), Runtime(OnnxEngine(engine_dir)), n=n, tasks=tasks, progress=progress)
