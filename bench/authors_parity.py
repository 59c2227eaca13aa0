"""How far edgeav's inputs are from the authors', task by task, and what that does to the logits.

    python bench/authors_parity.py [--preset crab-small] [--checkpoint DIR] [--legacy true|false] [--json FILE]

Writes generated media in each dataset's own layout (AVE/AVVP/AVQA: a video plus a
separate 16-bit WAV; S4/MS3 and Ref-AVS: a folder of frames plus ``audio.wav``; ARIG
and AVSS: one frame plus ``audio.wav``; every WAV a few samples past its clip, as the
authors' 160,125-sample AVE example is), then for each task:

- runs ``Runtime.run`` with a :class:`~edgeav.runtime.Trace` (prompt ids, pixels, fbank);
- builds the same inputs the authors' way (:mod:`edgeav.bench.authors_way`);
- feeds the authors' inputs through the same model and compares the first-token logits.

Prints one row per task: prompt ids equal, largest fbank and pixel differences, and
the largest first-token logit difference (absolute and relative to the largest logit).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import wave
from pathlib import Path

import numpy as np

from edgeav.bench import authors_way

SAMPLE_RATE = authors_way.SAMPLE_RATE
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Audio lengths a little past each clip, in samples, per ``tot`` (10, 5 and 60 seconds).
ODD_LENGTH = {10: 160_125, 5: 80_063, 60: 961_234}
OPTIONS = {"avqa": {"question": "How many instruments are sounding?"},
           "refavs": {"expression": "the loudest object on the left"}}
# task -> (layout, frames in the folder or None, --at seconds or None for the task's default)
LAYOUTS = {
    "ave": ("video", None, None),
    "avvp": ("video", None, None),
    "avqa": ("video", None, None),
    "s4": ("frames", 5, None),
    "ms3": ("frames", 5, [1, 3]),
    "refavs": ("frames", 10, [7]),
    "arig": ("image", None, None),
    "avss": ("image", None, [3]),
}


def write_wav(path: Path, n_samples: int, seed: int) -> Path:
    """Stereo 16-bit PCM at 16 kHz, a tone that changes every second plus noise (no resampling to decode)."""
    t = np.arange(n_samples) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    tone = np.sin(2 * np.pi * (300 + 40 * np.floor(t)) * t) * 12000
    channels = [tone + rng.normal(0, 2000, n_samples), 0.5 * tone + rng.normal(0, 2000, n_samples)]
    samples = np.stack(channels, axis=1).round().clip(-32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(SAMPLE_RATE)
        f.writeframes(samples.tobytes())
    return path


def write_frames(folder: Path, n: int, size: tuple[int, int]) -> Path:
    """Frames ``0.png`` .. ``n-1.png`` of the synthetic world at ``size`` (width, height)."""
    from PIL import Image

    from edgeav.media import synth

    folder.mkdir(parents=True, exist_ok=True)
    spec = synth.SynthSpec(width=size[0], height=size[1])
    for i in range(n):
        Image.fromarray(synth.render_frame(spec, i + 0.3)).save(folder / f"{i}.png")
    return folder


def write_media(root: Path) -> dict:
    """Every layout of :data:`LAYOUTS` under ``root``."""
    from edgeav.media import synth

    videos = {}
    for seconds, fps in ((10, 12.0), (60, 5.0)):
        videos[seconds] = root / f"clip{seconds}.mp4"
        synth.write_clip(videos[seconds], duration_s=seconds, fps=fps, width=200, height=150, audio=False)
    return {
        "wav": {tot: write_wav(root / f"audio{tot}.wav", n, seed=tot) for tot, n in ODD_LENGTH.items()},
        "video": videos,
        "frames5": write_frames(root / "frames5", 5, (176, 144)),
        "frames10": write_frames(root / "frames10", 10, (150, 100)),
        "image": write_frames(root / "one", 1, (97, 61)) / "0.png",
    }


def source_of(task: str, media: dict) -> tuple[Path, Path]:
    """(SOURCE, --audio FILE) of ``task`` in ``media`` (written by :func:`write_media`)."""
    layout, n_frames, _ = LAYOUTS[task]
    audio = media["wav"][authors_way.TOT[task]]
    if layout == "video":
        return media["video"][60 if task == "avqa" else 10], audio
    if layout == "frames":
        return media[f"frames{n_frames}"], audio
    return media["image"], audio


def image_seconds(task: str, at_seconds: list[int] | None) -> list[int]:
    """The seconds whose frame ``task`` segments or grounds (``at_seconds``, else the task's default)."""
    from edgeav.systems.crab.tasks import get_task

    if at_seconds:
        return sorted(at_seconds)
    if task in ("s4", "ms3"):
        return list(range(5))
    return [0] if get_task(task).image_frame else []


def layout_of(source: Path) -> str:
    """"frames" (a folder), "image" or "video", as edgeav reads SOURCE."""
    if source.is_dir():
        return "frames"
    return "image" if source.suffix.lower() in IMAGE_SUFFIXES else "video"


def authors_inputs(task: str, source: Path, audio_path: Path, tokenizer,
                   at_seconds: list[int] | None = None) -> tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]:
    """(prompt ids per prompt, pixels per visual encoder call, fbank per audio encoder call), the authors' way."""
    from edgeav.preprocess.fbank import crab_fbank_batch
    from edgeav.systems.crab.tasks import get_task

    layout = layout_of(source)
    spec = get_task(task)
    seconds = image_seconds(task, at_seconds)
    ids = [authors_way.prompt_ids(tokenizer, authors_way.instruction(task, **OPTIONS.get(task, {}), second=t))
           for t in (seconds or [0])]
    if layout == "video":
        video, images = authors_way.video_frames(source, spec.video_frames), []
    elif layout == "frames":
        # The loaders list AVSBench's frames by number: 0.jpg, 1.jpg, ...
        paths = sorted((p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: int(p.stem))
        frames = np.stack([authors_way.image_frame(p) for p in paths])
        video = frames[np.arange(0, len(frames), len(frames) / spec.video_frames).astype(int)]
        images = [frames[t] for t in seconds]
    else:
        frame = authors_way.image_frame(source)
        video = np.stack([frame] * spec.video_frames) if spec.video_frames else None
        images = [frame for _ in seconds]
    pixels = [authors_way.pixels(video)] if video is not None else []
    pixels += [authors_way.pixels(frame[None]) for frame in images]
    waveform = authors_way.read_audio(audio_path)
    cuts = [authors_way.audio_pieces(waveform, task, t) for t in seconds] if task == "avss" else [
        authors_way.audio_pieces(waveform, task)]
    return ids, pixels, [crab_fbank_batch(cut.astype(np.float32)) for cut in cuts]


def compare(runtime, tokenizer, task: str, source: Path, audio: Path, at_seconds: list[int] | None = None) -> dict:
    """One task's differences between edgeav's inputs and the authors', and their first-token logits."""
    import torch

    from edgeav.generate import generate
    from edgeav.stages import Trace
    from edgeav.systems.crab.tasks import get_task

    trace = Trace()
    runtime.run(source, task, audio=audio, at_seconds=at_seconds, max_new_tokens=1, trace=trace,
                **OPTIONS.get(task, {}))
    ids, pixels, fbank = authors_inputs(task, source, audio, tokenizer, at_seconds)

    def largest(ours: list[np.ndarray], theirs: list[np.ndarray]) -> float | None:
        if len(ours) != len(theirs) or any(a.shape != b.shape for a, b in zip(ours, theirs)):
            return None  # the shapes differ: no element-wise difference
        return max((float(np.abs(a - b).max()) for a, b in zip(ours, theirs)), default=0.0)

    spec = get_task(task)
    model = runtime.engine.variant(spec.weights)
    token = runtime.tokenizer.token_id
    with torch.inference_mode():
        def tensor(array):
            return torch.from_numpy(array).to(runtime.device, runtime.dtype)

        blocks = {}
        frames = list(pixels)
        if spec.video_frames:
            blocks[token("<video>")] = model.encode_frames(tensor(frames.pop(0))).tokens.flatten(0, 1)
        if frames and "image" in spec.blocks:
            blocks[token("<image>")] = model.encode_frames(tensor(frames[0])).tokens.flatten(0, 1)
        blocks[token("<audio>")] = model.encode_audio(tensor(fbank[0])).flatten(0, 1)
        logits: list[torch.Tensor] = []
        generate(model.llm, model.embed_prompt(ids[0], blocks), max_new_tokens=1, eos_id=runtime.tokenizer.eos_id,
                 logits_out=logits)
    ours, theirs = trace.logits[0][0].float(), logits[0].reshape(-1).float().cpu()
    scale = float(theirs.abs().max())
    logit_diff = float((ours - theirs).abs().max())
    return {
        "task": task,
        "prompt_ids_equal": trace.prompt_ids == ids,
        "prompt_tokens": [len(p) for p in trace.prompt_ids],
        "fbank_max_diff": largest(trace.fbank, fbank),
        "pixels_max_diff": largest(trace.pixels, pixels),
        "logit_max_diff": logit_diff,
        "logit_rel_diff": logit_diff / scale if scale else None,
    }


def _format(value) -> str:
    if value is None:
        return "shape differs"
    if isinstance(value, bool):
        return "equal" if value else "DIFFER"
    return f"{value:.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="crab-small", help="random weights of this preset (default crab-small)")
    parser.add_argument("--checkpoint", help="a checkpoint folder instead of --preset")
    parser.add_argument("--legacy", choices=("true", "false"), default="true",
                        help="the tokenizer's legacy setting for --preset (a checkpoint brings its own)")
    parser.add_argument("--example", nargs=3, metavar=("TASK", "SOURCE", "AUDIO"),
                        help="compare on this one source and audio file instead of generated media (an mp3 "
                             "is read with librosa, as the authors read it: pip install librosa)")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)

    from edgeav.systems.crab.config import ADDED_TOKENS
    from edgeav.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.checkpoint:
            runtime = Runtime.from_checkpoint(args.checkpoint)
            (tokenizer_dir,) = {p.parent for p in Path(args.checkpoint).glob("*/tokenizer.model")}
        else:
            from edgeav.systems.crab.checkpoints import save_released, synthesize

            save_released(synthesize(args.preset, seed=0), root / "ckpt")
            (config_path,) = (root / "ckpt").glob("*/tokenizer_config.json")
            config = json.loads(config_path.read_text())
            config["legacy"] = args.legacy == "true"
            config_path.write_text(json.dumps(config))
            runtime, tokenizer_dir = Runtime.from_checkpoint(root / "ckpt"), config_path.parent
        tokenizer = authors_way.llama_tokenizer(tokenizer_dir, list(ADDED_TOKENS))
        if args.example:
            task, source, audio = args.example
            rows = [compare(runtime, tokenizer, task, Path(source), Path(audio))]
        else:
            media = write_media(root)
            rows = [compare(runtime, tokenizer, task, *source_of(task, media), LAYOUTS[task][2]) for task in LAYOUTS]
    print(f"model: {runtime.source}")
    header = ("task", "prompt ids", "tokens", "fbank max|d|", "pixels max|d|", "logit max|d|", "relative")
    print("  ".join(f"{h:>13}" for h in header))
    for row in rows:
        cells = (row["task"], _format(row["prompt_ids_equal"]), ",".join(map(str, row["prompt_tokens"])),
                 _format(row["fbank_max_diff"]), _format(row["pixels_max_diff"]), _format(row["logit_max_diff"]),
                 _format(row["logit_rel_diff"]))
        print("  ".join(f"{c:>13}" for c in cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": runtime.source, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
