"""Decode throughput and memory of the media layer.

    python bench/decode.py [--seconds 60] [--long-minutes 60] [--json out.json]

Generates a 720p H.264 + AAC clip and a long low-resolution clip, then runs each
measurement in a fresh process (so peak RSS belongs to that measurement alone):

- ``pyav-decode``: PyAV demux + decode of every frame and audio packet, nothing
  else: the ceiling any segment reader on this machine can approach;
- ``segments-stream`` / ``segments-clip``: ``edgeav.media.segments`` with each policy;
- ``segments-stream-224``: the stream policy scaling kept frames to 224x224 in
  the decoder, as the runtime will;
- ``long-stream``: the stream policy over the long clip, sampling RSS every
  minute of media to show memory stays flat.

Throughput is seconds of media per second of wall time; each row also gives
its ratio to ``pyav-decode`` measured in the same run.
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


def measure(kind: str, path: str) -> dict:
    """Run one measurement in this process and return its figures."""
    import av
    import psutil

    from edgeav.media import segments

    process = psutil.Process()
    rss_by_minute: list[float] = []
    peak_rss = process.memory_info().rss
    start = time.perf_counter()
    if kind == "pyav-decode":
        with av.open(path) as container:
            container.streams.video[0].thread_type = "AUTO"
            last = 0.0
            for n, packet in enumerate(container.demux()):
                for frame in packet.decode():
                    last = max(last, frame.time or 0.0)
                if n % 50 == 0:
                    peak_rss = max(peak_rss, process.memory_info().rss)
        media_s = last
    else:
        policy = "clip" if kind == "segments-clip" else "stream"
        size = (224, 224) if kind.endswith("-224") else None
        media_s = 0.0
        for segment in segments(path, policy, frame_size=size):
            media_s = segment.end_s
            rss = process.memory_info().rss
            peak_rss = max(peak_rss, rss)
            if segment.index % 60 == 59:
                rss_by_minute.append(rss / 2**20)
    wall = time.perf_counter() - start
    return {
        "kind": kind,
        "media_s": round(media_s, 2),
        "wall_s": round(wall, 3),
        "media_s_per_wall_s": round(media_s / wall, 2),
        # Sampled: ru_maxrss would include the parent's memory (it survives fork + exec).
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "rss_by_minute_mib": [round(r, 1) for r in rss_by_minute],
    }


def run_child(kind: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, str(path)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the 720p clip")
    parser.add_argument("--long-minutes", type=float, default=60.0, help="length of the low-resolution clip (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    from edgeav.media import synth

    with tempfile.TemporaryDirectory(prefix="edgeav-bench-") as folder:
        hd = Path(folder) / "720p.mp4"
        t0 = time.perf_counter()
        synth.write_clip(hd, duration_s=args.seconds, width=1280, height=720, fps=25.0, bit_rate=4_000_000, gop=50)
        print(f"generated {args.seconds:.0f} s of 1280x720 25 fps H.264 + AAC in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows = [run_child(kind, hd) for kind in ("pyav-decode", "segments-stream", "segments-clip", "segments-stream-224")]
        if args.long_minutes > 0:
            long = Path(folder) / "long.mp4"
            t0 = time.perf_counter()
            synth.write_clip(long, duration_s=args.long_minutes * 60, width=160, height=120, fps=5.0, sample_rate=16000)
            print(f"generated {args.long_minutes:.0f} min of 160x120 in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            rows.append(run_child("long-stream", long))

    baseline = rows[0]["media_s_per_wall_s"]
    print(f"{'measurement':<22} {'media s':>8} {'wall s':>8} {'media s/s':>10} {'vs pyav':>8} {'peak RSS MiB':>13}")
    for row in rows:
        ratio = row["media_s_per_wall_s"] / baseline if row["kind"] != "long-stream" else float("nan")
        row["ratio_to_pyav_decode"] = round(ratio, 3)
        print(f"{row['kind']:<22} {row['media_s']:>8.1f} {row['wall_s']:>8.2f} {row['media_s_per_wall_s']:>10.1f} "
              f"{ratio:>8.2f} {row['peak_rss_mib']:>13.1f}")
    long_rows = [r for r in rows if r["kind"] == "long-stream" and len(r["rss_by_minute_mib"]) >= 3]
    for row in long_rows:
        rss = row["rss_by_minute_mib"]
        print(f"long-stream RSS: minute 2 {rss[1]:.1f} MiB, last minute {rss[-1]:.1f} MiB "
              f"(ratio {rss[-1] / rss[1]:.3f}, max {max(rss):.1f} MiB over {len(rss)} minutes)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
