"""Local worker processes: each builds its own model from the runtime's :class:`~edgeav.runtime.Recipe`
and runs a :class:`~edgeav.batch.runner.Runner` over the items it takes from a shared queue.

Processes are spawned (never forked: torch's and ONNX Runtime's threads do not survive a fork) and
ignore Ctrl-C: the batch's own process stops them. A worker that dies (killed, out of memory) has
its items written as errors; the others go on.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from typing import Iterator

from edgeav.batch.items import Item
from edgeav.batch.runner import BatchPlan, Runner, WorkersLost, died_line
from edgeav.errors import EdgeavError


def _serve(recipe, plan: BatchPlan, index: int, threads: int, inbox, outbox) -> None:
    """A worker process: build the model, then run items until the ``None`` that ends the queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runtime = recipe.build(threads)
    except BaseException as e:  # said to the batch, which stops: every worker would fail the same way
        outbox.put(("failed", index, e if isinstance(e, EdgeavError) else repr(e)))
        return

    def taken() -> Iterator[Item]:
        while (row := inbox.get()) is not None:
            outbox.put(("took", index, row["key"]))
            yield Item.from_dict(row)

    for line, _ in Runner(runtime, plan, f"worker-{index}").lines(taken()):
        outbox.put(("line", index, line))
    outbox.put(("done", index, None))


def pool_lines(recipe, items: list[Item], plan: BatchPlan, threads: int) -> Iterator[dict]:
    """Each item's line as a worker finishes it (not in order), from ``plan.workers`` processes of
    ``threads`` threads each."""
    context = multiprocessing.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    for item in items:
        inbox.put(item.to_dict())
    workers = [context.Process(target=_serve, args=(recipe, plan, i, threads, inbox, outbox), daemon=True,
                               name=f"edgeav-batch-{i}") for i in range(plan.workers)]
    for _ in workers:
        inbox.put(None)
    by_key = {item.key: item for item in items}
    running: dict[int, set[str]] = {i: set() for i in range(len(workers))}  # worker -> keys taken, unfinished
    finished: set[int] = set()
    remaining = len(items)
    for worker in workers:
        worker.start()
    try:
        while remaining:
            messages, dead = _receive(outbox), []
            if not messages:
                dead = [i for i, worker in enumerate(workers) if i not in finished and not worker.is_alive()]
                messages = _receive(outbox, wait=False) if dead else []  # what the dead sent before they died
            for kind, index, payload in messages:
                if kind == "failed":
                    if isinstance(payload, EdgeavError):  # the model's files or options: as `run` says it
                        raise payload
                    raise WorkersLost(f"a batch worker could not build the model ({payload}); nothing was run")
                if kind == "took":
                    running[index].add(payload)
                elif kind == "line":
                    running[index].discard(payload["key"])
                    remaining -= 1
                    yield payload
                else:
                    finished.add(index)
            for index in dead:
                finished.add(index)
                for key in sorted(running.pop(index)):
                    remaining -= 1
                    yield died_line(by_key[key], plan.task, f"worker-{index}", f"exited (code {workers[index].exitcode})")
            if len(finished) == len(workers) and remaining:
                raise WorkersLost(f"every batch worker exited with {remaining} items not run; run the batch again "
                                  "to run them")
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(timeout=10)
        for box in (inbox, outbox):  # what the workers never took must not hold this process at exit
            box.cancel_join_thread()
            box.close()


def _receive(outbox, wait: bool = True) -> list[tuple]:
    """The next message (waiting up to half a second), or (``wait`` False) every message already sent."""
    if wait:
        try:
            return [outbox.get(timeout=0.5)]
        except queue.Empty:
            return []
    messages = []
    while True:
        try:
            messages.append(outbox.get_nowait())
        except queue.Empty:
            return messages


__all__ = ["pool_lines"]
