"""Runtime: load a model once, then ``run(source, task)`` -> :class:`~edgeav.results.Result`.

The runtime never names a system: the checkpoint's or engine's own ``system`` field (or
``--system`` for a preset or an ambiguous folder) picks one from :mod:`edgeav.systems`,
and that system's pipeline does the run.

torch is imported where a model needs it, never here: a Crab engine's runs (``from_engine``, ``run``,
``stream``) import none (see :mod:`edgeav.numpy_ops`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from edgeav.engines import check_threads
from edgeav.engines.manifest import manifest_system, read_manifest
from edgeav.errors import CheckpointError, OptionError
from edgeav.media import PushSource, check_media_options
from edgeav.results import Result
from edgeav.sampling import Sampling, resolve_sampling
from edgeav.systems import DEMO_CLIP, DEMO_DIR, demo_system, get_system, system_of_checkpoint, system_of_preset

if TYPE_CHECKING:
    import torch

    from edgeav.batch import Batch, Item
    from edgeav.stream import Stream, StreamSession


def available_memory_bytes() -> int | None:
    """The memory the kernel says a new process can take without swapping (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def _refuse_what_does_not_fit(preset: str, counts, dtype: torch.dtype | None) -> None:
    """Refuse random weights that would not fit in memory as ``dtype`` (None: float32), saying the preset's sizes
    (counted, not allocated)."""
    import torch

    dtype = dtype or torch.float32
    available = available_memory_bytes()
    total = sum(counts.values())
    need = total * torch.empty(0, dtype=dtype).element_size()
    if available is None or need <= 0.8 * available:
        return
    parts = ", ".join(f"{part} {_count(n)}" for part, n in counts.items())
    halves = " (--dtype bf16 halves it)" if torch.empty(0, dtype=dtype).element_size() == 4 else ""
    raise OptionError(f"--preset {preset}: {_count(total)} parameters ({parts}) need {need / 1e9:.1f} GB as "
                      f"{str(dtype).removeprefix('torch.')}; this machine has {available / 1e9:.1f} GB available: run "
                      f"it on a larger machine{halves}, or pick a smaller --preset")


@dataclass(frozen=True)
class Recipe:
    """How a :class:`Runtime` is built: which constructor (``checkpoint``, ``engine``, ``preset`` or ``demo``)
    with which keyword options. A batch's worker processes and Ray actors build their own from it."""

    how: str
    options: dict

    def describe(self) -> str:
        """What building it does, for a status line."""
        if self.how in ("checkpoint", "engine"):
            return f"loading {self.options['path']}"
        if self.how == "preset":
            return f"building {self.options['name']} with random weights"
        return "loading the demo model"

    def with_threads(self, threads: int) -> "Recipe":
        """The same model with ``threads`` ONNX Runtime threads (an engine's; the torch backend's are the
        process's, ``torch.set_num_threads``)."""
        return Recipe(self.how, {**self.options, "threads": threads}) if self.how == "engine" else self

    def build(self, threads: int | None = None) -> "Runtime":
        """The runtime; ``threads``: an engine's ONNX Runtime threads, and this process's torch threads when
        the model computes with torch (a Crab engine does not: it never imports torch)."""
        if threads is not None:
            runtime = self.with_threads(threads).build()
            if "torch" in sys.modules:
                import torch

                torch.set_num_threads(threads)
            return runtime
        constructor = {"checkpoint": Runtime.from_checkpoint, "engine": Runtime.from_engine,
                       "preset": Runtime.from_preset, "demo": Runtime.demo}[self.how]
        return constructor(**self.options)


class Runtime:
    """One model of one system on one device. Build with :meth:`from_checkpoint`, :meth:`from_preset`,
    :meth:`from_engine` or :meth:`demo`; ``Runtime(loaded)`` wraps a model a system already loaded.

    ``runtime.system`` says which system runs (:class:`edgeav.systems.System`); ``runtime.pipeline``
    is that system's run of it.
    """

    def __init__(self, engine, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 llm_weights: str | None = None) -> None:
        """``dtype``: the torch model's (None: the pipeline's default, float32). ``llm_weights`` ("int8" or
        "int4"): store the LLM's projections weight-only quantized (the PyTorch engine only; see the system's
        pipeline)."""
        self.system = get_system(engine.system)
        options = {} if dtype is None else {"dtype": dtype}
        self.pipeline = self.system.pipeline(engine, device=device, llm_weights=llm_weights, **options)
        self.recipe: Recipe | None = None  # set by the named constructors; None for a model loaded elsewhere

    def _made_by(self, how: str, **options) -> "Runtime":
        self.recipe = Recipe(how, options)
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, preset: str | None = None, system: str | None = None,
                        **options) -> "Runtime":
        """A checkpoint folder in the authors' layout or edgeav's converted one; its system is recognised
        from its files (``system`` settles a folder that two systems could read)."""
        owner = system_of_checkpoint(path, system)
        return cls(owner.load_checkpoint(Path(path), preset), **options)._made_by(
            "checkpoint", path=path, preset=preset, system=system, **options)

    @classmethod
    def from_engine(cls, path: str | Path, *, threads: int | None = None) -> "Runtime":
        """An engine directory written by ``edgeav export`` (its manifest and hashes are checked)."""
        check_threads(threads)
        manifest = read_manifest(Path(path))
        owner = get_system(manifest_system(manifest))
        if manifest["backend"] != "onnx":
            raise CheckpointError(f"{path}: a {manifest['backend']!r} engine; edgeav runs onnx engine directories "
                                  "(a TensorRT runtime backend is not built yet: export --format onnx)")
        if owner.open_engine is None:
            raise CheckpointError(f"{path}: {owner.title} engines cannot be run yet; run the checkpoint instead")
        return cls(owner.open_engine(Path(path), threads=threads))._made_by("engine", path=path, threads=threads)

    @classmethod
    def demo(cls, **options) -> "Runtime":
        """edgeav's demo model: crab-tiny trained on the synthetic world (``bench/train_demo.py``)."""
        loaded = demo_system().load_checkpoint(DEMO_DIR, None)
        loaded.source = f"edgeav demo model ({DEMO_DIR})"
        return cls(loaded, **options)._made_by("demo", **options)

    @classmethod
    def from_preset(cls, name: str, *, random_weights: bool = False, seed: int = 0, system: str | None = None,
                    **options) -> "Runtime":
        """A model of a named preset; only random weights exist for a bare preset (nothing is written to disk)."""
        owner = system_of_preset(name, system)
        if not random_weights:
            raise OptionError(f"preset {name!r} has no weights of its own; pass random_weights=True "
                              "(--random-weights) or a --checkpoint")
        if owner.parameter_counts is not None:
            _refuse_what_does_not_fit(name, owner.parameter_counts(name), options.get("dtype"))
        return cls(owner.synthesize(name, seed, options.get("dtype")), **options)._made_by(
            "preset", name=name, random_weights=True, seed=seed, system=system, **options)

    # -- what is loaded ------------------------------------------------------

    @property
    def engine(self):
        """The loaded model the pipeline runs (the system's torch model or its exported engine)."""
        return self.pipeline.engine

    @property
    def config(self):
        return self.pipeline.config

    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    @property
    def source(self) -> str:
        return self.pipeline.source

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.dtype

    # -- runs ---------------------------------------------------------------

    def run(self, source: str | Path, task: str | None = None, **options) -> Result:
        """Run ``task`` (default: the system's) on ``source``; ``options`` are the system pipeline's
        (Crab: :meth:`edgeav.systems.crab.pipeline.CrabPipeline.prepare`)."""
        return self.pipeline.run(source, task or self.system.default_task, **options)

    def prepare(self, source: str | Path, task: str | None = None, **options) -> Callable[[], Result]:
        """:meth:`run` in two steps: this checks the options and decodes ``source``; calling what it returns
        runs the model. Decode the next clip while the model runs this one."""
        return self.pipeline.prepare(source, task or self.system.default_task, **options)

    def batch(self, inputs: Iterable[str | Path | Item], task: str | None = None, *,
              jsonl: str | Path | None = None, out: str | Path | None = None, workers: int = 1,
              threads: int | None = None, ray: bool = False, ray_address: str | None = None,
              retry_failed: bool = False, **options) -> "Batch":
        """Run ``task`` over a dataset: files, folders, globs or manifests (CSV or JSONL), or
        :class:`~edgeav.batch.Item` s; returns a :class:`~edgeav.batch.Batch`, an iterator of
        :class:`~edgeav.batch.ItemResult` (a broken item is a result with its ``error``).

        ``jsonl``: append one line per item and skip the items it already holds (errors too, unless
        ``retry_failed``). ``out``: a folder for each item's masks (``out/ITEM/``). ``workers`` > 1 runs
        processes that build their own copy of this model (from :attr:`recipe`), ``threads`` split between
        them; ``ray`` runs an actor pool on Ray Data instead (``ray_address``: a running cluster; default a
        local one). ``options`` are :meth:`run`'s, an item's own question, expression, ``at`` and audio first.
        """
        from edgeav.batch import Batch, BatchPlan, collect_items

        plan = BatchPlan(task=task or self.system.default_task, options=options, out=out, workers=workers,
                         threads=threads, ray=ray, ray_address=ray_address)
        return Batch(collect_items(inputs), plan, runtime=self, recipe=self.recipe, jsonl=jsonl,
                     retry_failed=retry_failed)

    def stream(
        self,
        source: str | Path | PushSource,
        task: str | None = None,
        *,
        window: int | None = None,
        stride: int = 1,
        question: str | None = None,
        expression: str | None = None,
        sampling: str | Sampling = "greedy",
        max_new_tokens: int | None = None,
        realtime: bool = False,
        reconnect: int = 5,
        reconnect_backoff_s: float = 0.5,
        audio: str | Path | None = None,
        fps: float | None = None,
        silent_audio: bool = False,
        **system_options,
    ) -> "Stream":
        """Run ``task`` on every ``window``-second window of ``source``, one every ``stride`` seconds.

        Returns a :class:`~edgeav.stream.Stream`: an iterator of
        :class:`~edgeav.stream.WindowResult` that starts the work on its first ``next()``.
        ``window`` defaults to the task's (Crab: :attr:`~edgeav.systems.crab.tasks.Task.default_window_s`).
        A file is read completely; ``realtime`` paces it at its own speed and treats it as
        live. A live URL that drops is reopened up to ``reconnect`` times in a row, waiting
        ``reconnect_backoff_s`` doubled each attempt; the gap is reported. A
        :class:`~edgeav.media.PushSource` is live (see :meth:`push_session`).
        A file source may be an image or a folder of frames (``fps`` per second, default 1);
        ``audio`` (a separate file) or ``silent_audio`` replaces its audio, as in :meth:`run`.
        ``system_options`` are the system's own (:attr:`edgeav.systems.System.run_options`: OpenAVS's
        ``variant``, ``translator``, ``translator_url``, ``segmenter``).
        """
        from edgeav.stream import Stream

        if self.system.check_stream is None:
            raise OptionError(f"{self.system.title} does not stream yet; run it on files with `edgeav run`")
        if not isinstance(source, PushSource):
            check_media_options(source, audio=audio, fps=fps, silent_audio=silent_audio,
                                hears_audio=self.system.hears_audio)

        spec, window = self.system.check_stream(task or self.system.default_task, window=window, stride=stride,
                                                question=question, expression=expression,
                                                max_new_tokens=max_new_tokens, **system_options)
        return Stream(self.pipeline, source, spec, window=window, stride=stride, question=question, expression=expression,
                      sampling=resolve_sampling(sampling), max_new_tokens=max_new_tokens, realtime=realtime,
                      reconnect=reconnect, reconnect_backoff_s=reconnect_backoff_s,
                      media={"audio": audio, "fps": fps, "silent_audio": silent_audio, "image_s": window,
                             "hears_audio": self.system.hears_audio})

    def push_session(
        self,
        task: str | None = None,
        *,
        window: int | None = None,
        stride: int = 1,
        question: str | None = None,
        expression: str | None = None,
        sampling: str | Sampling = "greedy",
        max_new_tokens: int | None = None,
        max_pending_segments: int = 30,
    ) -> "StreamSession":
        """A :class:`~edgeav.stream.StreamSession` to push frames and audio into (camera software).

        The model starts at once in background threads; ``session.results()`` yields the
        window results. Times pushed are seconds on the caller's clock; the first becomes 0.
        """
        from edgeav.stream import StreamSession

        source = PushSource(max_pending_segments=max_pending_segments)
        stream = self.stream(source, task, window=window, stride=stride, question=question, expression=expression,
                             sampling=sampling, max_new_tokens=max_new_tokens, reconnect=0)
        return StreamSession(stream, source)

    # -- stages -------------------------------------------------------------


__all__ = ["DEMO_CLIP", "DEMO_DIR", "Recipe", "Runtime"]
