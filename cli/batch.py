"""``edgeav batch``: a task over a whole dataset, resumable, on local workers or Ray."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import edgeav
from edgeav.cli import one_line
from edgeav.cli.common import (AudioOpt, CheckpointOpt, DeviceOpt, DType, DTypeOpt, EngineOpt, ExpressionOpt, FpsOpt,
                               LLMWeightsOpt, MaxNewTokensOpt, PresetOpt, QuestionOpt, RandomWeightsOpt, SamplingName,
                               SamplingOpt, SegmenterOpt, SilentAudioOpt, SystemOpt, TaskName, TorchDevice,
                               TranslatorCheckpointOpt, TranslatorModelOpt, TranslatorOpt, TranslatorUrlOpt,
                               VariantOpt, app, check_out, check_task, resolve_system, runtime_recipe, stderr,
                               system_options)
from edgeav.engines import MAX_THREADS
from edgeav.outputs import check_output_file, nonempty_path

LOG_EVERY_S = 30.0  # without a terminal, a progress line this often


def _check_items(owner, task: str, items, options: dict) -> None:
    """Refuse, before any model loads, options that no item can run with (each item's own question,
    expression, ``at`` and audio counted). Items that fail alone, or whose media is broken, become error
    lines when they run."""
    refused = None
    for item in items:
        checked = {name: value for name, value in {**options, **item.run_options()}.items() if name != "sampling"}
        try:
            owner.check_run(task, source=item.source, **checked)
            return
        except edgeav.OptionError as e:
            refused = refused or e
        except edgeav.EdgeavError:  # this item's file: its line will say so
            continue
    if refused is not None:
        raise refused


class _Progress:
    """Items done, failures, items per second and ETA: a bar on a terminal, else a line every 30 s."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.started = self.logged = time.perf_counter()
        self.bar = Progress(TextColumn("batch"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[failed]} failed"), TextColumn("{task.fields[rate]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=stderr, transient=True,
                            disable=not stderr.is_terminal)
        self.task = self.bar.add_task("batch", total=total, failed=0, rate="")

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.perf_counter()
        rate = self.done / max(now - self.started, 1e-9)
        self.bar.update(self.task, completed=self.done, failed=self.failed, rate=f"{rate:.2f} items/s")
        if not stderr.is_terminal and (now - self.logged >= LOG_EVERY_S or self.done == self.total):
            self.logged = now
            eta = (self.total - self.done) / rate
            stderr.print(f"batch      {self.done}/{self.total} done, {self.failed} failed, {rate:.2f} items/s, "
                         f"ETA {eta:.0f} s", highlight=False)


def _print_summary(batch, jsonl: Path, where: str) -> None:
    s = batch.summary()
    ok = s["items"] - s["failed"]
    held = (f"; {batch.skipped_errors} of them errors (--retry-failed runs them again)"
            if batch.skipped_errors else "")
    print(f"items      {s['items']} run: {ok} ok, {s['failed']} failed; {s['skipped']} skipped (already in "
          f"{one_line(str(jsonl))}{held})")
    if s["items"]:
        print(f"time       {s['wall_s']:.1f} s, {s['items_per_s']:.3f} items/s ({where})")
        print(f"{'stage':<14} {'count':>6} {'p50 ms':>9} {'p95 ms':>9}")
        for name, stats in s["stages"].items():
            print(f"{name:<14} {stats['count']:>6} {stats['p50_ms']:>9.1f} {stats['p95_ms']:>9.1f}")


@app.command()
def batch(
    inputs: list[str] = typer.Argument(..., help="Media files, folders (their videos and images), globs, or manifests (.csv or .jsonl: source, audio, question, expression, at, id)."),
    jsonl: Path = typer.Option(..., "--jsonl", parser=nonempty_path("--jsonl"), help="Results, one JSON line per item, appended; a rerun skips the items already in it."),
    task: Optional[TaskName] = typer.Option(None, "--task", help="What to ask the model of every item (default: the system's first task)."),
    out: Optional[Path] = typer.Option(None, "--out", parser=nonempty_path("--out"), help="Folder for mask PNGs, one folder per item."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes, each with its own model (or Ray actors with --ray)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=MAX_THREADS, help="Threads in all, split between the workers (default: one per core)."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray Data, an actor pool of --workers actors (pip install 'edgeav[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: a running cluster (ray://HOST:10001, or auto); default: $RAY_ADDRESS, else a local cluster started for the batch."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run again the items whose line in --jsonl is an error."),
    system: SystemOpt = None,
    checkpoint: CheckpointOpt = None,
    engine: EngineOpt = None,
    preset: PresetOpt = None,
    random_weights: RandomWeightsOpt = False,
    question: QuestionOpt = None,
    expression: ExpressionOpt = None,
    at: Optional[list[int]] = typer.Option(None, "--at", min=0, help="Second whose frame a mask task segments (repeatable) or ARIG grounds, for items without their own."),
    audio: AudioOpt = None,
    fps: FpsOpt = None,
    silent_audio: SilentAudioOpt = False,
    sampling: SamplingOpt = SamplingName.greedy,
    max_new_tokens: MaxNewTokensOpt = None,
    dtype: DTypeOpt = DType.fp32,
    llm_weights: LLMWeightsOpt = None,
    device: DeviceOpt = TorchDevice.cpu,
    variant: VariantOpt = None,
    translator: TranslatorOpt = None,
    translator_url: TranslatorUrlOpt = None,
    translator_model: TranslatorModelOpt = None,
    translator_checkpoint: TranslatorCheckpointOpt = None,
    segmenter: SegmenterOpt = None,
) -> None:
    """Run a task over many clips: one model load per worker, one JSON line per item, resumable.

    A broken item is a line with its error, and the batch goes on. Exit code 0 when every item ran,
    1 when some failed, 2 for bad options. Ctrl-C stops; every line written stays.
    """
    from edgeav.batch import Batch, BatchPlan, WorkersLost, collect_items

    owner = resolve_system(checkpoint, engine, preset, system, task)
    task_name = check_task(owner, task)
    cascade = system_options(owner, variant=variant, translator=translator, translator_url=translator_url,
                             translator_model=translator_model, translator_checkpoint=translator_checkpoint,
                             segmenter=segmenter)
    check_output_file(jsonl, "--jsonl", in_place=True)
    if out is not None:
        check_out(out, owner, task_name)
    recipe = runtime_recipe(checkpoint, preset, random_weights, dtype, engine, None, llm_weights, device, system)
    options = {"question": question, "expression": expression, "at_seconds": at, "audio": audio, "fps": fps,
               "silent_audio": silent_audio, "sampling": sampling.value, "max_new_tokens": max_new_tokens, **cascade}
    options = {name: value for name, value in options.items() if value not in (None, False)}
    for given in inputs:
        if Path(given).exists() and Path(given).resolve() == jsonl.resolve():
            raise edgeav.OptionError(f"{jsonl}: --jsonl is also an input; results go to a file of their own")
    if ray_address is not None and not ray:
        raise edgeav.OptionError("--ray-address applies to --ray; add --ray, or drop --ray-address")
    items = collect_items(inputs, exclude=[jsonl] + ([out] if out is not None else []))
    _check_items(owner, task_name, items, options)
    plan = BatchPlan(task=task_name, options=options, out=out, workers=workers, threads=threads, ray=ray,
                     ray_address=ray_address)
    job = Batch(items, plan, recipe=recipe, jsonl=jsonl, retry_failed=retry_failed)
    where = (f"Ray, {workers} actor{'s' * (workers > 1)}" if ray else f"{workers} worker{'s' * (workers > 1)}")
    where += f", {job.threads_each} thread{'s' * (job.threads_each > 1)} each"
    print(f"batch      {task_name} on {len(job.items)} of {job.total} items ({job.skipped} already in "
          f"{one_line(str(jsonl))}); {where}", flush=True)
    if job.journal.unreadable:
        n = job.journal.unreadable
        what = f"{n} lines of {one_line(str(jsonl))} are not results" if n > 1 else \
            f"1 line of {one_line(str(jsonl))} is not a result"
        stderr.print(f"note       {what} (cut short, or not written by edgeav batch); they stay as they are and "
                     "count for no item", highlight=False)
    if job.items:
        with _Progress(len(job.items)) as shown:  # counts from the model's load on
            try:
                for done in job:
                    shown.advance(done.ok)
                    if not done.ok:
                        named = "" if done.item.source in done.error else f"{done.item.id}: "
                        stderr.print(f"failed     {one_line(named + done.error)}", highlight=False)
            except WorkersLost as e:
                stderr.print(f"edgeav: {one_line(str(e))}", highlight=False)
                raise typer.Exit(1) from None
    _print_summary(job, jsonl, where)
    if job.failed:
        stderr.print(f"edgeav: {job.failed} of {job.summary()['items']} items failed; their lines in "
                     f"{one_line(str(jsonl))} say why (--retry-failed runs them again)", highlight=False)
        raise typer.Exit(1)
