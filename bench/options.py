"""What ``edgeav bench`` measures for Crab: its rows' formats and precisions, the clip, and :class:`BenchOptions`;
and the option checks every system's bench shares (:func:`parse_choices`, :func:`check_output_path`)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edgeav.bench import roofline
from edgeav.engines import check_threads
from edgeav.errors import OptionError
from edgeav.outputs import check_output_file

FORMATS = ("torch", "onnx", "tensorrt")
LLM_ONLY_FORMAT = "llama.cpp"  # a --formats value of the LLM-only bench (--llm-only) alone
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8", "int4")  # bf16 on request: on a CPU it is as slow as fp16
DEVICES = ("cpu", "cuda")
STAGE_NAMES = ("decode", "visual", "audio", "prefill", "per_token", "mask")
TASK = "ave"
CLIP_SEED = 7  # the world clip export_bench also runs
INT_GROUP_SIZE = 32  # int4 block / group size, the exporter's default
BASELINE = "baseline"
Progress = Callable[[str], None]
CLIP_SECONDS = 10  # seconds of the clip every row runs


# -- options ---------------------------------------------------------------------------------------


def parse_choices(value: str | tuple[str, ...] | list[str], allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each checked against ``allowed`` (an unknown one gets the closest match)."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [v.strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise OptionError(f"{option}: empty; expected some of {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            close = difflib.get_close_matches(item, allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise OptionError(f"{option} {item!r}: expected some of {', '.join(allowed)} (comma-separated).{hint}")
    return tuple(dict.fromkeys(items))


def options_json(options) -> dict:
    """A bench's options (a dataclass) as the report's JSON fields: every path as a string."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in asdict(options).items()}


def check_output_path(path: Path | None, option: str, suffix: str | None = None) -> None:
    """A file the run will write (replaced whole, see :func:`edgeav.outputs.atomic_path`): writable now, with
    ``suffix`` when one is given, so a bad path fails before the benchmark rather than after it."""
    if path is None:
        return
    check_output_file(path, option)
    if suffix and path.suffix.lower() != suffix:
        raise OptionError(f"{path}: {option} must be a {suffix} file name")


def check_preset(preset: str, random_weights: bool) -> None:
    """A Crab preset with weights to run: random ones, or crab-tiny's demo model; else a one-line OptionError."""
    from edgeav.systems.crab.config import PRESETS

    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        raise OptionError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}"
                          + (f". Did you mean {close[0]!r}?" if close else ""))
    if not random_weights and preset != "crab-tiny":
        raise OptionError(f"--preset {preset} has no weights of its own; add --random-weights "
                          "(crab-tiny without it runs the demo model)")


@dataclass(frozen=True)
class BenchOptions:
    """What ``edgeav bench`` measures; checked on creation, before any model loads.

    ``threads``: torch and ONNX Runtime intra-op threads (None: torch's current setting for both).
    ``eval_n``: demo-suite AVE clips per row for the metric (only with the demo model's weights).
    ``row_budget_s``: seconds of timed runs per row after which a slow row (fp16 on a CPU) stops short of
    ``repeats``; its ``runs`` say how many it kept.
    """

    preset: str = "crab-tiny"
    random_weights: bool = False
    formats: tuple[str, ...] = FORMATS
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    device: str = "cpu"
    repeats: int = 3
    row_budget_s: float = 60.0
    warmup: int = 1
    tokens: int = 32
    eval_n: int = 4
    threads: int | None = None
    project: str | None = None
    json_path: Path | None = None
    plot_path: Path | None = None

    def __post_init__(self) -> None:
        named = self.formats.split(",") if isinstance(self.formats, str) else self.formats
        if LLM_ONLY_FORMAT in (name.strip() for name in named):
            raise OptionError(f"--formats {LLM_ONLY_FORMAT}: the llama.cpp peer runs the LLM alone; add --llm-only")
        object.__setattr__(self, "formats", parse_choices(self.formats, FORMATS, "--formats"))
        object.__setattr__(self, "precisions", parse_choices(self.precisions, PRECISIONS, "--precisions"))
        check_preset(self.preset, self.random_weights)
        if self.device not in DEVICES:
            raise OptionError(f"--device {self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.project is not None:
            roofline.device_spec(self.project)
        for name, value, least in (("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0),
                                   ("--tokens", self.tokens, 2), ("--eval-n", self.eval_n, 0)):
            if value < least:
                raise OptionError(f"{name} must be at least {least}, got {value}")
        if self.row_budget_s <= 0:
            raise OptionError(f"--row-budget must be positive, got {self.row_budget_s}")
        check_threads(self.threads)
        check_output_path(self.json_path, "--json")
        check_output_path(self.plot_path, "--plot", ".png")

    @property
    def demo_weights(self) -> bool:
        return self.preset == "crab-tiny" and not self.random_weights
