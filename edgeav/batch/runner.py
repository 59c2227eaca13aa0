"""One worker's loop: items in, journal lines out, the next item decoding while the model runs this one.

The same :class:`Runner` serves the batch's own process, each local worker process
(:mod:`edgeav.batch.pool`) and each Ray actor (:mod:`edgeav.batch.on_ray`), so every way of running
a batch writes the same lines.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from edgeav.batch.items import Item
from edgeav.errors import EdgeavError
from edgeav.results import Result



class WorkersLost(Exception):
    """The batch could not go on after it started: its workers died or could not build the model (not a
    problem of the options; the command says it in one line and exits 1)."""


@dataclass(frozen=True)
class BatchPlan:
    """What a batch asks of every item: ``task`` with the run ``options`` (an item's own question,
    expression, ``at`` and audio replace them), masks under ``out/ITEM/``, and where it runs:
    ``workers`` local processes, or an actor pool of that size on Ray (``ray``, ``ray_address``), with
    ``threads`` split between them (default: every core)."""

    task: str
    options: dict = field(default_factory=dict)
    out: str | Path | None = None
    workers: int = 1
    threads: int | None = None
    ray: bool = False
    ray_address: str | None = None


def _line(item: Item, task: str, worker: str, wall_s: float) -> dict:
    own = {name: value for name, value in item.to_dict().items()
           if name in ("audio", "question", "expression", "at") and value is not None}
    return {"id": item.id, "key": item.key, "source": item.source, "task": task, **own, "worker": worker,
            "wall_ms": round(wall_s * 1000, 3)}


class Runner:
    """Runs items on one :class:`~edgeav.runtime.Runtime` as ``plan`` says; ``worker`` names it in the lines."""

    def __init__(self, runtime, plan: BatchPlan, worker: str) -> None:
        self.runtime, self.plan, self.worker = runtime, plan, worker

    def _prepare(self, item: Item):
        """(what runs the model, or the exception that stopped the decode; the seconds it took)."""
        started = time.perf_counter()
        try:
            answer = self.runtime.prepare(item.source, self.plan.task, **{**self.plan.options, **item.run_options()})
        except Exception as e:
            answer = e
        return answer, time.perf_counter() - started

    def _finish(self, item: Item, decoding: Future) -> tuple[dict, Result | None]:
        """The item's line (and its result, when it ran): the model's run of what ``decoding`` decoded, or
        the one-line error of whatever failed; a batch goes on past a broken item."""
        started, decode_s, result = time.perf_counter(), 0.0, None
        try:
            answer, decode_s = decoding.result()
            if isinstance(answer, Exception):
                raise answer
            result = answer()
            if self.plan.out is not None and result.masks:
                result.save_masks(Path(self.plan.out) / item.folder)
            outcome = {"ok": True, "result": result.to_dict()}
        except EdgeavError as e:
            outcome = {"ok": False, "error": str(e)}
        except Exception as e:  # a bug of edgeav's: the item fails, the batch goes on, the line says so
            outcome = {"ok": False, "error": f"internal error ({type(e).__name__}: {e}); please report it"}
        wall_s = decode_s + time.perf_counter() - started
        return {**_line(item, self.plan.task, self.worker, wall_s), **outcome}, result

    def lines(self, items: Iterable[Item]) -> Iterator[tuple[dict, Result | None]]:
        """``(line, result)`` per item in order; item i+1 decodes on a thread while the model runs item i."""
        with ThreadPoolExecutor(1, thread_name_prefix="edgeav-decode") as decoder:
            pending = None
            for item in items:
                upcoming = (item, decoder.submit(self._prepare, item))
                if pending is not None:
                    yield self._finish(*pending)
                pending = upcoming
            if pending is not None:
                yield self._finish(*pending)


def died_line(item: Item, task: str, worker: str, why: str) -> dict:
    """The line of an item whose worker went away while running it."""
    return {**_line(item, task, worker, 0.0), "ok": False, "error": f"{worker} {why} while running this item; "
            "run the batch again with --retry-failed to try it again"}


__all__ = ["BatchPlan", "Runner", "WorkersLost", "died_line"]
