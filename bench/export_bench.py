"""Backends and precisions side by side on one AVE clip: torch eager fp32 against ONNX Runtime engines.

    python bench/export_bench.py [--preset crab-small] [--precisions fp32 int8 int4] [--repeats 3] [--json FILE]

Builds the preset with random weights (seed 0), exports one ONNX engine per
precision (served from the export cache on later runs), writes one 10-s clip of
the synthetic world and runs the AVE task on it with every backend, all in this
one process. Generation is teacher-forced on the same 32 tokens everywhere, so
each backend decodes exactly as many tokens whatever its weights make of them.
One warm-up run per backend is excluded; the table gives the median of
``--repeats`` runs per stage, tokens per second, and each row's speed-up over
torch eager fp32 measured in the same run (this machine is shared: compare
ratios, not absolute times).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edgeav.bench import world
from edgeav.systems.crab.checkpoints import synthesize
from edgeav.export.exporter import cache_dir, export_engine
from edgeav.systems.crab.pipeline import STAGES
from edgeav.runtime import Runtime
from edgeav.stages import Trace

FORCED_TOKENS = 32


def measure(runtime: Runtime, clip: Path, forced: list[int], repeats: int) -> dict:
    """Median stage times (ms) and end-to-end seconds of ``repeats`` runs after one warm-up."""
    runs = []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        result = runtime.run(clip, "ave", trace=Trace(forced=[forced]))
        wall = time.perf_counter() - start
        if attempt:  # the first run warms caches and sessions
            runs.append({**result.timings_ms, "end_to_end_s": wall})
    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    row["ms_per_token"] = row["decode_tokens"] / (FORCED_TOKENS - 1)
    row["tokens_per_s"] = 1000 / row["ms_per_token"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="crab-small")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (the same for both)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = synthesize(args.preset, 0)
    reference = Runtime(loaded)
    forced = (reference.tokenizer.encode("the time range is") * FORCED_TOKENS)[:FORCED_TOKENS]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        clip = world.write_clip(world.sample_clip(7, "ave"), Path(folder) / "ave.mp4")
        rows["torch eager fp32"] = measure(reference, clip, forced, args.repeats)
        for precision in args.precisions:
            start = time.perf_counter()
            engine = export_engine(loaded, Path(folder) / precision, precision=precision, receipt_n=0,
                                   variants=("joint",), progress=lambda message: print(f"  {message}", flush=True))
            print(f"{precision}: engine ready in {time.perf_counter() - start:.0f} s", flush=True)
            size = sum(p.stat().st_size for p in engine.iterdir()) / 1e6
            rows[f"onnx {precision}"] = {**measure(Runtime.from_engine(engine, threads=args.threads), clip, forced,
                                                   args.repeats),
                                         "size_mb": size}

    base = rows["torch eager fp32"]
    header = ["backend", *STAGES, "ms/token", "tok/s", "end-to-end s", "speed-up", "size MB"]
    print(f"\n{args.preset}, random weights, one 10-s AVE clip, {FORCED_TOKENS} forced tokens, median of "
          f"{args.repeats} runs after a warm-up; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads for torch and ONNX Runtime, torch {torch.__version__}")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, row in rows.items():
        cells = [f"{row[s]:.0f}" for s in STAGES] + [f"{row['ms_per_token']:.1f}", f"{row['tokens_per_s']:.0f}",
                                                     f"{row['end_to_end_s']:.2f}",
                                                     f"{base['end_to_end_s'] / row['end_to_end_s']:.2f}x",
                                                     f"{row['size_mb']:.0f}" if "size_mb" in row else "-"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("stage columns are milliseconds per clip (prefill and decode_tokens: the LLM)")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "rows": rows, "cache": str(cache_dir())}, indent=1))


if __name__ == "__main__":
    main()
