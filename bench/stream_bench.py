"""Streaming benchmark: a generated stream played in real time through ``Runtime.stream``.

    python bench/stream_bench.py --minutes 10 [--task ave] [--stride 1] [--engine DIR] [--json FILE]

Writes a clip of the given length (shapes moving over alternating tones), streams it with
``realtime=True`` (a camera's pace: each second is handed over when it is over, and windows
are skipped when the model falls behind) and reports the real-time factor, windows processed
and skipped, window latency p50/p95, and resident memory per minute of wall time: memory is
flat when the last minute's peak lies within 5% of the second minute's (the first minute
holds model loading and warm-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

from edgeav.media import synth
from edgeav.runtime import Runtime
from edgeav.stream import rss_mb

FLAT_TOLERANCE = 0.05


def memory_by_minute(stop: threading.Event, peaks: list[float], period_s: float = 0.5) -> None:
    """Append the peak RSS of each wall-clock minute to ``peaks`` until ``stop`` (the last minute may be partial)."""
    start = time.perf_counter()
    while not stop.wait(period_s):
        minute = int((time.perf_counter() - start) // 60)
        while len(peaks) <= minute:
            peaks.append(0.0)
        peaks[minute] = max(peaks[minute], rss_mb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the generated stream")
    parser.add_argument("--task", default="ave")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--engine", type=Path, default=None, help="engine directory (default: the demo model)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads with --engine")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    runtime = Runtime.from_engine(args.engine, threads=args.threads) if args.engine else Runtime.demo()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "stream.mp4"
        started = time.perf_counter()
        synth.write_clip(clip, duration_s=args.minutes * 60, fps=10, width=320, height=240)
        print(f"wrote a {args.minutes:g}-min clip in {time.perf_counter() - started:.0f} s; streaming it in real time")

        peaks: list[float] = []
        stop = threading.Event()
        sampler = threading.Thread(target=memory_by_minute, args=(stop, peaks), daemon=True)
        sampler.start()
        windows = runtime.stream(clip, args.task, window=args.window, stride=args.stride, realtime=True)
        for result in windows:
            if result.index % 60 == 0:
                print(f"  window at {result.start_s:5.0f} s: latency {result.timings_ms['latency']:.0f} ms, "
                      f"{windows.telemetry.windows_skipped} skipped so far", flush=True)
        stop.set()
        sampler.join()

    telemetry = windows.telemetry.to_dict()
    full = [p for p in peaks[:-1] if p] if len(peaks) > 2 else peaks  # the last minute may be a few seconds
    second, last = (full[1], full[-1]) if len(full) >= 3 else (None, None)
    report = {
        "host": {"machine": platform.machine(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "model": runtime.source,
        "task": args.task,
        "window_s": windows.window,
        "stride_s": args.stride,
        "media_s": telemetry["media_s"],
        "wall_s": telemetry["wall_s"],
        "real_time_factor": telemetry["real_time_factor"],
        "windows_processed": telemetry["windows_processed"],
        "windows_skipped": telemetry["windows_skipped"],
        "segments_dropped": telemetry["segments_dropped"],
        "window_latency_ms": telemetry["stages"]["window"],
        "stages": telemetry["stages"],
        "rss_peak_by_minute_mb": [round(p, 1) for p in peaks],
        "rss_last_over_second_minute": None if second is None else round(last / second, 4),
        "rss_flat": None if second is None else abs(last / second - 1) <= FLAT_TOLERANCE,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
