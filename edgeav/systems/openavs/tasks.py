"""OpenAVS's one task and the run options that shape its cascade: which describers run (the variant),
who turns their words into object names (the translator) and which model draws the mask (the segmenter).

``--translator local`` runs the checkpoint's Qwen2.5-Omni thinker as a text model, or, with
``--translator-checkpoint DIR``, the Qwen2.5 text release in DIR (:mod:`edgeav.qwen_text`). The folder
needs ``--translator local`` said explicitly, as ``--translator-url`` needs ``--translator http``: an
option never switches another one silently.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from edgeav.errors import OptionError

TASK = "avs"
TASK_DESCRIPTION = "sounding-object segmentation, open vocabulary: one mask per second with the objects named"

# variant -> (what it runs, the translator strategy it uses: translator.STRATEGIES)
VARIANTS = {
    "lite": ("Pengi with three prompts (the paper's Lite)", "prompt_frame"),
    "default": ("Pengi, and the Qwen2.5-Omni thinker describing the frame (the paper's default)", "model"),
    "large": ("Pengi, the thinker describing the sound and the frame (the paper's Large without Audio Flamingo 3)",
              "model"),
    "edge": ("BEATs' AudioSet labels in place of an audio language model (beyond the paper)", "frame"),
}
TRANSLATORS = ("none", "local", "http")
SEGMENTERS = ("sam", "sam2")
DEFAULTS = {"variant": "lite", "translator": "none", "segmenter": "sam"}
DEFAULT_TRANSLATOR_MODEL = "gpt-4o-mini"  # the paper's


def _choice(option: str, value, choices) -> str:
    if value is None:
        return DEFAULTS[option]
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"--{option} {value!r}: expected one of {', '.join(choices)}.{hint}")


def check_options(*, variant: str | None = None, translator: str | None = None, translator_url: str | None = None,
                  translator_model: str | None = None, translator_checkpoint: str | Path | None = None,
                  segmenter: str | None = None) -> dict:
    """The cascade's options with their defaults, refused in one line when they do not fit together (nothing
    is loaded, reached or read here). ``translator_checkpoint`` comes back as a Path, or None: the thinker."""
    options = {"variant": _choice("variant", variant, VARIANTS),
               "translator": _choice("translator", translator, TRANSLATORS),
               "segmenter": _choice("segmenter", segmenter, SEGMENTERS),
               "translator_url": translator_url, "translator_model": translator_model or DEFAULT_TRANSLATOR_MODEL,
               "translator_checkpoint": None}
    for name, value in (("translator-url", translator_url), ("translator-model", translator_model)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise OptionError(f"--{name} {value!r}: give a non-empty text")
    if translator_checkpoint is not None:
        if not isinstance(translator_checkpoint, (str, Path)) or not str(translator_checkpoint).strip():
            raise OptionError(f"--translator-checkpoint {translator_checkpoint!r}: give the folder of a Qwen2.5 "
                              "text model")
        if options["translator"] != "local":
            raise OptionError(f"--translator-checkpoint is for --translator local, not {options['translator']}; "
                              "add --translator local or drop --translator-checkpoint")
        options["translator_checkpoint"] = Path(translator_checkpoint)
    if options["translator"] == "http" and not translator_url:
        raise OptionError("--translator http needs --translator-url URL (an OpenAI-compatible endpoint)")
    for name, value in (("url", translator_url), ("model", translator_model)):
        if options["translator"] != "http" and value:
            raise OptionError(f"--translator-{name} is for --translator http, not {options['translator']}; add "
                              f"--translator http or drop --translator-{name}")
    if options["translator"] == "none" and options["variant"] in ("default", "large"):
        raise OptionError(f"--variant {options['variant']} describes the frame with the thinker, which only a "
                          "translator reads: add --translator local or http, or use --variant lite")
    return options


__all__ = ["DEFAULTS", "DEFAULT_TRANSLATOR_MODEL", "SEGMENTERS", "TASK", "TASK_DESCRIPTION", "TRANSLATORS", "VARIANTS", "check_options"]
