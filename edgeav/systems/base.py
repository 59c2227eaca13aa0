"""What a system package gives the runtime: one :class:`System` record of plain callables.

A system package (``edgeav/systems/NAME/``) builds its record in its ``__init__``; the
registry (:mod:`edgeav.systems`) lists the packages; :class:`edgeav.runtime.Runtime`
reads the record and never names a system itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class System:
    """One system edgeav runs.

    Attributes:
        name: the ``--system`` value and the ``system`` field of checkpoints and engine manifests.
        title: how people write it (``u-LLaVA``).
        presets: preset name -> one line saying what it is.
        small_preset: the preset ``--random-weights`` builds when none is named (one small enough for a CPU).
        tasks: task name -> one line saying what it does (the ``--task`` values).
        default_task: what ``edgeav run`` does without ``--task``.
        recognises: does this folder hold one of the system's checkpoints (either layout)?
        load_checkpoint: ``(folder, preset or None) -> loaded model`` (the torch backend).
        synthesize: ``(preset, seed, dtype) -> loaded model`` with random weights, nothing written.
        save_converted: ``(loaded, folder) -> folder``: edgeav's safetensors layout.
        save_released: ``(loaded, folder) -> folder``: the authors' layout (``edgeav synth``).
        open_engine: ``(folder, threads) -> loaded model`` run by ONNX Runtime; None: not exportable yet.
        export: ``() -> SystemExport`` (:class:`edgeav.engines.spec.SystemExport`): the system's graphs,
            calibration, receipt and engine layout for ``edgeav export``; None: not exportable yet.
        pipeline: ``(loaded, device=, dtype=, llm_weights=) -> object`` with ``run(source, task, **options)``,
            ``source``, ``config`` and ``tokenizer``.
        check_run: ``(task, source=, **run options) -> None``: refuses, before any model loads, what a run
            of ``task`` cannot take (a missing question, a bad ``at``, media options that do not fit).
        task_outputs: task name -> what it draws or saves besides text: a subset of {"mask", "box"}.
        evaluate: ``(runtime, suite, n=, tasks=None, progress=) -> SuiteResult`` (:class:`edgeav.metrics.SuiteResult`)
            for ``edgeav eval`` (tasks None: the suite's own); None: no suite yet.
        suites: suite name -> one line saying what it scores (the ``--suite`` values; the first is the default).
        bench: ``() -> module`` for ``edgeav bench``: its ``make_options(**cli options)`` (refusing what the
            system's bench cannot take), ``run_bench(options, progress) -> report`` (``report.write_json(path)``),
            ``tables(report)``, ``footer(report)`` and ``write_plot(report, path)``; None: no benchmark yet.
        hears_audio: whether the system's tasks need sound (a picture then needs ``--audio`` or ``--silent-audio``).
        check_stream: ``(task, window=, stride=, question=, expression=, max_new_tokens=) -> (task spec, window)``
            for a stream, checked before any media is read; None: the system does not stream yet.
        released_layout: one line listing the files of the authors' layout (for error messages).
        run_options: the keyword options beyond the common ones that its ``check_run``, pipeline ``run`` and
            ``check_stream`` take (OpenAVS: ``variant``, ``translator``, ...); the CLI refuses them elsewhere.
        parameter_counts: ``preset -> {part: parameters}`` counted on the meta device (nothing allocated), so
            a preset too large for the machine is refused with its sizes before random weights are drawn;
            None: not counted.
    """

    name: str
    title: str
    presets: Mapping[str, str]
    small_preset: str
    tasks: Mapping[str, str]
    default_task: str
    recognises: Callable[[Path], bool]
    load_checkpoint: Callable[..., Any]
    synthesize: Callable[..., Any]
    save_converted: Callable[..., Path]
    save_released: Callable[..., Path]
    pipeline: Callable[..., Any]
    released_layout: str
    check_run: Callable[..., None]
    task_outputs: Mapping[str, frozenset[str]]
    open_engine: Callable[..., Any] | None = None
    export: Callable[[], Any] | None = None
    check_stream: Callable[..., tuple[Any, int]] | None = None
    hears_audio: bool = True
    evaluate: Callable[..., Any] | None = None
    suites: Mapping[str, str] = field(default_factory=dict)
    bench: Callable[[], Any] | None = None
    parameter_counts: Callable[[str], Mapping[str, int]] | None = None
    run_options: tuple[str, ...] = ()
