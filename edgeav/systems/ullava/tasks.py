"""u-LLaVA's tasks: what each reads, its instruction and how its answer is read (ULLAVA_SPEC section 6).

The released evaluation is teacher-forced on benchmark answers; a runtime generates. Instructions:
``res`` and ``rec`` use the benchmark's RES prompt (REC in v1 is the RES answer's mask plus a
GroundingDINO box chosen by overlap); ``ground`` uses the training templates' "segment and
locate"; ``caption`` has no released prompt and uses edgeav's wording; ``ask`` is the question
as written. Answers look like ``Sure. Info: [SEG]; [tag]cat[/tag].``
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from edgeav.errors import OptionError

_TAG = re.compile(r"\[tag\](.*?)\[/tag\]", re.S)
_RESERVED = re.compile(r"\[(?:SEG|tag|/tag|PAD)\]|<image_patch>|<video_patch>|<img_beg>|</img_end>|<vid_beg>|</vid_end>"
                       r"|</?s>|<unk>")


@dataclass(frozen=True)
class Task:
    """One u-LLaVA task.

    Attributes:
        name: the ``--task`` value.
        description: one line for help texts.
        template: the instruction; ``{question}`` or ``{expression}`` filled in.
        requires: the option the template needs, or None.
        video: whether a video source is read as a video (8 frames); otherwise its first frame is the image.
        outputs: what the answer drives besides text: "mask" (SAM on the [SEG] state), "box" (GroundingDINO).
        max_new_tokens: generation limit (the authors' evaluate default is 32; the chat CLI's 512).
    """

    name: str
    description: str
    template: str
    requires: str | None
    video: bool
    outputs: frozenset[str]
    max_new_tokens: int

    def check_options(self, *, question: str | None = None, expression: str | None = None) -> None:
        for option, value in (("question", question), ("expression", expression)):
            if value is not None and not isinstance(value, str):
                raise OptionError(f"{option} (--{option}) takes a string, not a {type(value).__name__}")
            if value is not None and _RESERVED.search(value):
                raise OptionError(f"--{option} contains {_RESERVED.search(value).group(0)}, a token u-LLaVA "
                                  "reserves for images, masks and the prompt's start and end; rephrase it")
            if option == self.requires and (value is None or not value.strip()):
                raise OptionError(f'task {self.name!r} needs {"an" if option[0] in "aeiou" else "a"} {option}: '
                                  f'pass --{option} "..."')
            if option != self.requires and value is not None:
                users = ", ".join(t.name for t in TASKS.values() if t.requires == option)
                raise OptionError(f"task {self.name!r} takes no --{option}; only {users} use it")

    def instruction(self, *, question: str | None = None, expression: str | None = None, video: bool = False) -> str:
        self.check_options(question=question, expression=expression)
        text = self.template.format(question=(question or "").strip(), expression=(expression or "").strip(),
                                    medium="video" if video else "image")
        return text


def tags(text: str) -> list[str]:
    """The texts between ``[tag]`` and ``[/tag]``, in order, stripped."""
    return [t.strip() for t in _TAG.findall(text) if t.strip()]


def readable(text: str) -> str:
    """The answer without u-LLaVA's markup tokens (what a person reads)."""
    return " ".join(_RESERVED.sub(" ", text).split())


_MASK, _BOX = frozenset({"mask"}), frozenset({"mask", "box"})
_SEGMENT = "Output the segmentation mask of the {expression} in the image."

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("caption", "describe the image or video", "Please describe the {medium} in detail.", None, True,
             frozenset(), 512),
        Task("ask", "answer a question about the image or video", "{question}", "question", True, frozenset(), 512),
        Task("res", "referring expression segmentation: the mask of what the expression names", _SEGMENT,
             "expression", False, _MASK, 32),
        Task("rec", "referring expression comprehension: the box of what the expression names", _SEGMENT,
             "expression", False, _BOX, 32),
        Task("ground", "phrase grounding: boxes for what the answer tags", "Please segment and locate the "
             "{expression} in the image.", "expression", False, _BOX, 32),
    )
}


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name).lower(), TASKS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown u-LLaVA task {name!r}; expected one of {', '.join(TASKS)}.{hint}")
