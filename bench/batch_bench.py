"""Batch benchmark: items per second of ``edgeav batch`` against ``edgeav run`` in a loop, in one run.

    python bench/batch_bench.py [--clips 12] [--seconds 5] [--task ave] [--engine DIR] [--no-ray] [--json FILE]

Writes ``--clips`` generated clips, then times on the same clips, one after the other:

- ``edgeav run CLIP`` once per clip, each a new process (what a shell loop does);
- ``edgeav batch`` with 1 and 2 local workers, and on Ray Data with 2 actors (a local cluster started
  for it), each a new process with a new JSONL.

Every figure is wall time from the command's start to its end (model loads, worker start-up and the
Ray cluster included): items per second, and the ratios to the loop. ``steady items/s`` counts from
the first line written to the last, which leaves out start-up. The per-item overhead of the loop is
its seconds per clip less the batch's (1 worker).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeav.media import synth


def _edgeav(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeav", *args]


def _timed(command: list[str], jsonl: Path | None = None) -> dict:
    """Run ``command``: its wall seconds and, for a batch, its lines per second from the first line it wrote
    to the last (start-up left out)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = last = None  # (time, lines then)
    while process.poll() is None:
        count = jsonl.read_bytes().count(b"\n") if jsonl is not None and jsonl.exists() else 0
        if count and (last is None or count > last[1]):
            last = (time.perf_counter(), count)
            first = first or last
        time.sleep(0.02)
    wall = time.perf_counter() - started
    if process.returncode not in (0, 1):  # 1: some items failed, which the caller checks
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {process.stderr.read().strip()}")
    steady = (last[1] - first[1]) / (last[0] - first[0]) if first and last[0] > first[0] else None
    lines = jsonl.read_bytes().count(b"\n") if jsonl is not None else None
    return {"wall_s": wall, "lines": lines, "steady_items_per_s": steady}


def run(clips: int, seconds: float, task: str, engine: Path | None, ray: bool) -> dict:
    model = ["--engine", str(engine)] if engine else []
    with tempfile.TemporaryDirectory(prefix="edgeav-batch-bench-") as folder:
        folder = Path(folder)
        media = folder / "clips"
        media.mkdir()
        for i in range(clips):
            synth.write_clip(media / f"clip{i:03d}.mp4", duration_s=seconds, noise=0.01 * (i % 5), seed=i)
        paths = sorted(media.iterdir())
        rows = {}
        started = time.perf_counter()
        for path in paths:
            _timed(_edgeav("run", str(path), "--task", task, *model))
        rows["run loop"] = {"wall_s": time.perf_counter() - started, "lines": None, "steady_items_per_s": None}
        setups = {"batch, 1 worker": ["--workers", "1"], "batch, 2 workers": ["--workers", "2"]}
        if ray:
            setups["batch, Ray 2 actors"] = ["--ray", "--workers", "2"]
        for name, extra in setups.items():
            jsonl = folder / f"{len(rows)}.jsonl"
            rows[name] = _timed(_edgeav("batch", str(media), "--task", task, "--jsonl", str(jsonl), *model, *extra),
                                jsonl)
            if rows[name]["lines"] != clips:
                raise SystemExit(f"{name}: {rows[name]['lines']} lines for {clips} clips")
    loop = rows["run loop"]["wall_s"] / clips
    for row in rows.values():
        row["items_per_s"] = clips / row["wall_s"]
        row["vs_run_loop"] = loop * clips / row["wall_s"]
    return {"clips": clips, "clip_seconds": seconds, "task": task, "model": str(engine) if engine else "demo",
            "cores": len(os.sched_getaffinity(0)), "machine": platform.processor() or platform.machine(),
            "run_loop_s_per_item": loop,
            "overhead_s_per_item": loop - rows["batch, 1 worker"]["wall_s"] / clips, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each generated clip")
    parser.add_argument("--task", default="ave")
    parser.add_argument("--engine", type=Path, help="an engine directory instead of the demo checkpoint")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = run(args.clips, args.seconds, args.task, args.engine, not args.no_ray)
    print(f"{report['clips']} clips of {report['clip_seconds']:g} s, task {report['task']}, model {report['model']}, "
          f"{report['cores']} cores")
    print(f"{'':<22} {'wall s':>8} {'items/s':>8} {'vs loop':>8} {'steady items/s':>15}")
    for name, row in report["rows"].items():
        steady = "" if row["steady_items_per_s"] is None else f"{row['steady_items_per_s']:.2f}"
        print(f"{name:<22} {row['wall_s']:>8.1f} {row['items_per_s']:>8.2f} {row['vs_run_loop']:>7.2f}x {steady:>15}")
    print(f"edgeav run costs {report['run_loop_s_per_item']:.2f} s per clip in a loop; "
          f"{report['overhead_s_per_item']:.2f} s of it is start-up a batch pays once")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
