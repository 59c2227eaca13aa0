"""A batch on Ray Data (the ``edgeav[ray]`` extra): the items become a dataset, an actor pool of
``plan.workers`` actors each holds one :class:`~edgeav.runtime.Runtime` built from the recipe, and
the lines stream back to the batch's process, which writes them as a local batch does.

Ray schedules, retries and places the actors; edgeav only says what each one needs (``threads``
CPUs, and a GPU for a CUDA model). On a cluster every node needs edgeav, the model's files and the
media at the same paths, and ``--out`` on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Iterator

from edgeav.batch.items import Item
from edgeav.batch.runner import BatchPlan, Runner
from edgeav.errors import EdgeavError, OptionError



# Items an actor gets per call: within a call the next item decodes while the model runs this one.
ITEMS_PER_CALL = 4


class RuntimeActor:
    """One Ray actor: builds the model once, then runs :data:`ITEMS_PER_CALL` items per call."""

    def __init__(self, recipe, plan: BatchPlan, threads: int) -> None:
        self.runner = Runner(recipe.build(threads), plan, f"ray-{os.uname().nodename}-{os.getpid()}")

    def __call__(self, batch: dict) -> dict:
        items = [Item.from_dict(json.loads(row)) for row in batch["item"]]
        return {"line": [json.dumps(line) for line, _ in self.runner.lines(items)]}


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise OptionError("--ray needs Ray Data, which is not installed: pip install 'edgeav[ray]'") from None
    return ray


def _cause(error: BaseException) -> EdgeavError | None:
    """The edgeav error an actor raised, from inside Ray's wrapping of it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, EdgeavError):
            return error
        seen.add(id(error))
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return None


def _check_reachable(address: str | None) -> None:
    """Refuse in one line a cluster address nothing answers at: Ray itself would retry it for ever."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise OptionError(f"--ray-address {address}: nothing answers there ({getattr(e, 'strerror', None) or e}); "
                          "give a running cluster's HOST:PORT (ray://HOST:10001 for a client), or drop it for a "
                          "local cluster") from None


def ray_lines(recipe, items: list[Item], plan: BatchPlan, threads: int) -> Iterator[dict]:
    """Each item's line as an actor finishes it. Unless this process is already connected to Ray, it
    connects to ``plan.ray_address`` (default ``$RAY_ADDRESS``, else a local cluster started for the
    batch) and lets go at the end."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        _check_reachable(plan.ray_address or os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(address=plan.ray_address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR, configure_logging=True)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = plan.ray_address or os.environ.get("RAY_ADDRESS") or "a local cluster"
            raise OptionError(f"--ray-address {where}: Ray could not start or reach it "
                              f"({' '.join(str(e).split())[:200]}); check the address, or drop it for a local "
                              "cluster") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the batch's own bar counts the items
    context.print_on_execution_start = False
    gpus = 1 if str(recipe.options.get("device", "cpu")).startswith("cuda") else 0
    dataset = ray.data.from_items([{"item": json.dumps(item.to_dict())} for item in items])
    lines = dataset.map_batches(RuntimeActor, fn_constructor_kwargs={"recipe": recipe, "plan": plan, "threads": threads},
                                batch_size=ITEMS_PER_CALL, compute=ray.data.ActorPoolStrategy(size=plan.workers),
                                num_cpus=threads, num_gpus=gpus)
    try:
        for row in lines.iter_rows():
            yield json.loads(row["line"])
    except Exception as e:
        cause = _cause(e)
        if cause is not None:
            raise type(cause)(str(cause)) from None
        raise
    finally:
        if started:
            ray.shutdown()


__all__ = ["RuntimeActor", "ray_lines"]
