"""Batch inference over a dataset: ``edgeav batch`` and :meth:`edgeav.runtime.Runtime.batch`.

Inputs become :class:`Item` s (:mod:`edgeav.batch.items`); a :class:`Batch` runs those its JSONL
does not hold yet (:mod:`edgeav.batch.journal`) in this process, in local worker processes
(:mod:`edgeav.batch.pool`) or on Ray (:mod:`edgeav.batch.on_ray`), all through one
:class:`~edgeav.batch.runner.Runner`, and yields an :class:`ItemResult` per item as it finishes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeav.batch.items import MANIFEST_COLUMNS, Item, collect_items
from edgeav.batch.journal import Journal
from edgeav.batch.runner import BatchPlan, Runner, WorkersLost
from edgeav.errors import EdgeavError, OptionError
from edgeav.results import Result


@dataclass
class ItemResult:
    """One item's outcome: ``line`` is its JSONL line (``ok``, and ``result`` as ``edgeav run --json``
    prints it, or ``error``); ``result`` is the :class:`~edgeav.results.Result` itself when the item
    ran in this process (None from worker processes and Ray, and for errors)."""

    item: Item
    line: dict
    result: Result | None = None

    @property
    def ok(self) -> bool:
        return bool(self.line["ok"])

    @property
    def error(self) -> str | None:
        return self.line.get("error")

    def result_or_raise(self) -> Result:
        """The result, or the item's error raised (an :class:`~edgeav.errors.EdgeavError`)."""
        if self.result is None:
            raise EdgeavError(self.error or f"{self.item.source}: ran in another process; its result is in .line")
        return self.result


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Batch:
    """An iterator of :class:`ItemResult`, one per item not already in ``jsonl`` (see
    :meth:`edgeav.runtime.Runtime.batch`). In this process the items run on ``runtime`` (built from
    ``recipe`` when not given); worker processes and Ray actors build theirs from ``recipe``.
    :attr:`skipped` counts what ``jsonl`` already held (:attr:`skipped_errors` of them errors);
    :meth:`summary` says how it went."""

    def __init__(self, items: list[Item], plan: BatchPlan, *, runtime=None,
                 recipe=None, jsonl: str | Path | None = None, retry_failed: bool = False) -> None:
        if plan.workers < 1:
            raise OptionError(f"--workers {plan.workers}: give 1 or more")
        if plan.threads is not None and plan.threads < plan.workers:
            raise OptionError(f"--threads {plan.threads} cannot be split between {plan.workers} workers; give at "
                              f"least {plan.workers}, or fewer --workers")
        if runtime is None and recipe is None:
            raise OptionError("a batch needs a runtime or the recipe of one")
        self.runtime, self.recipe, self.plan = runtime, recipe, plan
        self.journal = Journal(jsonl, plan.task) if jsonl is not None else None
        done = self.journal.done(retry_failed) if self.journal is not None else set()
        self.items = [item for item in items if item.key not in done]
        self.total = len(items)
        self.skipped = self.total - len(self.items)
        self.skipped_errors = sum(1 for item in items if item.key in done and not self.journal.lines[item.key].get("ok"))
        self.failed = 0
        self.wall_s = 0.0
        self._timings: dict[str, list[float]] = {}

    @property
    def threads_each(self) -> int:
        return max(1, (self.plan.threads or usable_cores()) // self.plan.workers)

    def _recipe(self):
        if self.recipe is None:
            raise OptionError("this runtime was built from a loaded model, which worker processes cannot rebuild; "
                              "build it with Runtime.from_checkpoint, from_engine, from_preset or demo")
        return self.recipe

    def _runtime(self):
        """The model this process runs: the one given, or built from the recipe with the threads asked for."""
        return self.runtime if self.runtime is not None else self.recipe.build(self.plan.threads)

    def _lines(self) -> Iterator[tuple[dict, Result | None]]:
        if self.plan.ray or self.plan.workers > 1:
            from edgeav.batch.on_ray import ray_lines
            from edgeav.batch.pool import pool_lines

            lines = (ray_lines if self.plan.ray else pool_lines)(self._recipe(), self.items, self.plan,
                                                                 self.threads_each)
            yield from ((line, None) for line in lines)
        else:
            yield from Runner(self._runtime(), self.plan, "main").lines(self.items)

    def __iter__(self) -> Iterator[ItemResult]:
        by_key = {item.key: item for item in self.items}
        if not self.items:
            return
        started = time.perf_counter()
        with self.journal if self.journal is not None else contextlib.nullcontext():
            try:
                for line, result in self._lines():
                    if self.journal is not None:
                        self.journal.write(line)
                    self.failed += not line["ok"]
                    self._time(line)
                    yield ItemResult(by_key[line["key"]], line, result)
            finally:
                self.wall_s = time.perf_counter() - started

    def _time(self, line: dict) -> None:
        timings = {"item": line["wall_ms"], **(line.get("result") or {}).get("timings_ms", {})}
        for stage, ms in timings.items():
            self._timings.setdefault(stage, []).append(ms)

    def summary(self) -> dict:
        """Items run, failed and skipped, wall time, items per second, and per-stage p50/p95 in ms."""
        ran = len(self._timings.get("item", []))
        return {"items": ran, "failed": self.failed, "skipped": self.skipped, "wall_s": round(self.wall_s, 3),
                "items_per_s": round(ran / self.wall_s, 4) if self.wall_s else None,
                "stages": {stage: {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)),
                                   "p95_ms": float(np.percentile(ms, 95))} for stage, ms in self._timings.items()}}


__all__ = ["MANIFEST_COLUMNS", "Batch", "BatchPlan", "Item", "ItemResult", "WorkersLost", "collect_items",
           "usable_cores"]
