"""OpenAVS's one task and the run options that shape its cascade: which describers run (the variant),
who turns their words into object names (the translator) and which model draws the mask (the segmenter).
"""

from __future__ import annotations

import difflib
from urllib.parse import urlsplit

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


def _choice(option: str, value: str, choices) -> str:
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"--{option} {value!r}: expected one of {', '.join(choices)}.{hint}")


def check_options(*, variant: str | None = None, translator: str | None = None, translator_url: str | None = None,
                  segmenter: str | None = None) -> dict:
    """The cascade's options with their defaults, refused in one line when they do not fit together (nothing
    is loaded or reached here)."""
    options = {"variant": _choice("variant", variant or DEFAULTS["variant"], VARIANTS),
               "translator": _choice("translator", translator or DEFAULTS["translator"], TRANSLATORS),
               "segmenter": _choice("segmenter", segmenter or DEFAULTS["segmenter"], SEGMENTERS),
               "translator_url": translator_url}
    if options["translator"] == "http" and not translator_url:
        raise OptionError("--translator http needs --translator-url URL (an OpenAI-compatible endpoint)")
    if options["translator"] != "http" and translator_url:
        raise OptionError(f"--translator-url is for --translator http, not {options['translator']}; add --translator "
                          "http or drop the URL")
    if translator_url:
        parts = urlsplit(translator_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise OptionError(f"--translator-url {translator_url!r}: give an http(s) URL with a host, e.g. "
                              "http://localhost:8000/v1")
    return options


__all__ = ["DEFAULTS", "SEGMENTERS", "TASK", "TASK_DESCRIPTION", "TRANSLATORS", "VARIANTS", "check_options"]
