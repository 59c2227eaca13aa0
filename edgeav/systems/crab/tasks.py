"""Crab's tasks: one table entry per task (inputs, instruction, output parser, limits),
its ARIG and mask parsers, and the label sets answers are checked against (the metrics
the field reports are in :mod:`edgeav.metrics`; the AVE, AVVP, answer and free-text
parsers, shared with Crab+, are :mod:`edgeav.tasks`').

Parsers are strict: what does not parse (a label that is not one of the model's
classes, a reversed range or box, a missing tag) gives a ``parse_error: ...`` note
and no invented event; event ranges are cut at the clip's end.

What was read in Crab's public code (GeWu-Lab/Crab @ 8c8f505) and settles the choices below:

- Instructions are the evaluation wording of ``UnifiedTestDataset`` in
  ``dataset/unified_dataset.py`` (CRAB_SPEC section 4). Ref-AVS is evaluated with
  three blocks: video, audio, then the image to segment.
- Time ranges. AVE ``<range> s,e </range>`` and AVVP ``(s e)`` are time boundaries
  in seconds of the 10-s clip with ``e`` EXCLUSIVE: whole-clip events are written
  ``0,10`` (the model's own outputs kept in GeWu-Lab/MokA
  ``AudioVisualText/scripts/evaluation/inference_ave.jsonl``: "from 0 to 10
  seconds ... <range> 0,10 </range>"), AVE annotates them ``0&10`` over ten 1-s
  segments 0..9, and the LLP ground truth of AVVP is filled as ``GT[cls, onset:offset]``.
  So ``<range> 2,5 </range>`` is [2 s, 5 s): seconds 2, 3 and 4, and
  ``Event.end_s`` is exclusive. GeWu-Lab's own AVE scorer
  (MokA ``scripts/evaluation/ave_eval.py``: ``pred_start <= i <= pred_end``) counts
  the end second as covered for both prediction and truth; ``ave_accuracy``
  reproduces that with ``inclusive_end=True``.
- ARIG boxes are pixel coordinates of the 224x224 model image (the frame is resized
  to 224x224 without keeping its aspect before CLIP). Crab's grounding data is
  written on that grid (``add_grounded_vqa_samples`` rescales ``x * 224 / width``)
  and its ARIG loader treats ``x1 == 1000`` as "no sounding object", a value outside
  a 224 grid that rules out 0-1 and 0-1000 normalised coordinates.
  :func:`box_to_source` maps them to source pixels.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

from edgeav.errors import OptionError
from edgeav.tasks import (
    AVSS_CLASS_NAMES, AVSS_CLASSES, AVVP_CLASSES, BACKGROUND, MODEL_IMAGE_SIZE, NUMBER, SEGMENTS_PER_CLIP, Event,
    TaskResult, box_to_source, clean_label, normalise_label, parse_answer, parse_ave, parse_avvp, parse_text, readable,
)
from edgeav.media.windows import AudioPlan
from edgeav.systems.crab.audio_cut import CRAB_AUDIO_PLANS, crab_audio_plan

MASK_TOKENS = 6  # <mask_0>..<mask_5>; fewer generated means no mask
# The synthetic world's classes (edgeav.bench.world.CLASSES, in that order): what the demo model names.
DEMO_WORLD_CLASSES = ("bell", "drum", "flute", "horn", "siren", "whistle")

# Models trained on other labels than Crab's data, by preset: crab-tiny is the demo model's size (test
# models of that preset have random weights, whose answers are noise whatever the labels).
MODEL_CLASSES: dict[str, dict[str, tuple[str, ...]]] = {
    "crab-tiny": {"avvp": DEMO_WORLD_CLASSES, "avss": (BACKGROUND, *DEMO_WORLD_CLASSES)},
}


# Modality blocks of the instruction; the placeholders are swapped for feature blocks later.
PROMPT_BLOCKS = {
    "video": "This is a video:\n<video_start><video><video_end>\n",
    "audio": "This is an audio:\n<audio_start><audio><audio_end>\n",
    "image": "This is an image:\n<image_start><image><image_end>\n",
}
ORDINALS = ("first", "second", "third", "fourth", "fifth")

# Frame policies: "uniform" is Crab's offline sampling (n frames spread uniformly by
# frame count over the clip, see edgeav.media); "none" takes no video frames.
FRAME_POLICIES = ("uniform", "none")
OUTPUT_KINDS = ("ave", "avvp", "answer", "box", "mask", "text")


# --------------------------------------------------------------------------- parsers

_ARIG_CORNERS = re.compile(
    rf"top\s*left\s*corner\s*is\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\).*?"
    rf"bottom\s*right\s*corner\s*is\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)",
    re.I | re.S,
)
# The reference answers of Crab's ARIG test set use <obj>(x1,y1)(x2,y2)</obj>.
_ARIG_OBJ = re.compile(
    rf"<\s*obj\s*>\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)\s*,?\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)", re.I
)
_SOUNDING_OBJECT = re.compile(r"sounding\s+object\s+is\s+([^.\n<]+)", re.I)
_MASK_TOKEN = re.compile(r"<\s*mask_[0-5]\s*>", re.I)
# Crab's added tokens: user text must not smuggle them into a prompt.
_PLACEHOLDER = re.compile(r"<(?:image|video|audio)(?:_start|_end)?>|<mask_(?:start|end|[0-5])>")
_MASK_LABELS = (
    # S4/MS3: "The object making the sound in the video is {obj}. The mask ..."
    re.compile(r"object\s+(?:making|that\s+makes)\s+the\s+sound\s+in\s+the\s+(?:video|image)\s+is\s+([^.\n<]+)", re.I),
    _SOUNDING_OBJECT,
    # Ref-AVS: "At the {nth} second in the video, {expression} is {obj}. Its mask is ..."
    re.compile(r"\bis\s+([^.,\n<]+?)\s*\.\s*its\s+mask\s+is", re.I),
)


def parse_arig(
    text: str, *, source_size: tuple[int, int] | None = None, task: str = "arig"
) -> TaskResult:
    """``The sounding object is X. Its coordinate of top left corner is (x1,y1) and
    coordinate of bottom right corner is (x2,y2)`` -> object label and box.

    The numbers are pixels of the 224x224 model image; with ``source_size=(width,
    height)`` the box comes back in source pixels. Corners in the wrong order
    (x2 < x1 or y2 < y1) are not a box: no box and a ``parse_error`` note.
    """
    body = readable(text)
    label_match = _SOUNDING_OBJECT.search(body)
    label = clean_label(label_match.group(1)) if label_match else ""
    corners = _ARIG_CORNERS.search(body) or _ARIG_OBJ.search(body)
    box, notes = None, []
    if corners is None:
        notes.append("parse_error: no 'top left corner is (x1,y1) ... bottom right corner is (x2,y2)' in the text")
    else:
        x1, y1, x2, y2 = (float(v) for v in corners.groups())
        if x2 < x1 or y2 < y1:
            notes.append(f"parse_error: box ({x1:g},{y1:g})-({x2:g},{y2:g}) has its bottom-right corner left of "
                         "or above its top-left one; no box")
        else:
            box = (x1, y1, x2, y2) if source_size is None else box_to_source((x1, y1, x2, y2), *source_size)
    return TaskResult(task=task, text=text, box=box, object_label=label or None, notes=tuple(notes))


def parse_mask(text: str, *, task: str) -> TaskResult:
    """Mask tasks: are the six ``<mask_i>`` tokens there, and which object is named.

    ``has_mask_tokens`` follows the generator's rule: at least six ``<mask_0..5>``
    tokens (``<mask_start>``/``<mask_end>`` are not required). The runtime notes a
    missing mask, as only the generated tokens (not this text) decide it.
    """
    body = readable(text)
    label = None
    for pattern in _MASK_LABELS:
        found = pattern.search(body)
        if found and clean_label(found.group(1)):
            label = clean_label(found.group(1))
            break
    return TaskResult(
        task=task, text=text, object_label=label, has_mask_tokens=len(_MASK_TOKEN.findall(body)) >= MASK_TOKENS
    )


# --------------------------------------------------------------------------- the task table


@dataclass(frozen=True)
class Task:
    """One Crab task: what it reads, what it asks, how long it may answer, how to read the answer.

    Attributes:
        name: the task's option value (``--task``).
        description: one line for help texts.
        blocks: modality blocks of the instruction, in prompt order.
        video_frames: frames for the ``<video>`` block (0 when there is none).
        frame_policy: how those frames are picked, one of ``FRAME_POLICIES``.
        audio_plan: how its loader cuts the audio, one of ``CRAB_AUDIO_PLANS`` (:func:`edgeav.systems.crab.audio_cut.crab_audio_plan`).
        clip_s: the length of Crab's clips for the task, seconds: its loader cuts a clip's audio over this
            many seconds (their ``tot``), and a mask task segments each of them by default.
        fixed_clip: every clip of the task lasts ``clip_s`` in Crab's data, so only the first ``clip_s``
            seconds of a longer source are read (AVQA's windows spread over any length; AVSS segments any second).
        default_window_s: a stream's window by default (``--window``): ``clip_s``, except AVSS (one frame and
            its second of audio) and the question tasks (a stream answers about the last 10 s).
        image_frame: one still frame is needed: the ``<image>`` block and/or the mask decoder's input.
        requires: the option the instruction needs (``question``, ``expression``) or None.
        max_new_tokens: generation limit.
        tail: the instruction after the modality blocks; ``{question}``, ``{expression}``
            and ``{ordinal}`` are filled in.
        output: which parser reads the answer, one of ``OUTPUT_KINDS``.
        mask_classes: mask decoder classes (1 binary, 71 AVSS, 0 no mask).
        classes: the labels of Crab's data the task's answers use (AVVP: LLP's 25; AVSS: AVSBench's
            71 by class id); empty when it has no class list. :func:`task_classes` gives a model's.
    """

    name: str
    description: str
    blocks: tuple[str, ...]
    video_frames: int
    frame_policy: str
    audio_plan: str
    clip_s: int
    fixed_clip: bool
    default_window_s: int
    image_frame: bool
    requires: str | None
    max_new_tokens: int
    tail: str
    output: str
    mask_classes: int = 0
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.frame_policy not in FRAME_POLICIES or (self.frame_policy == "none") != (self.video_frames == 0):
            raise ValueError(f"task {self.name!r}: frame policy {self.frame_policy!r} with {self.video_frames} frames")
        if self.audio_plan not in CRAB_AUDIO_PLANS or self.output not in OUTPUT_KINDS:
            raise ValueError(f"task {self.name!r}: unknown audio plan or output kind")
        if ("video" in self.blocks) != (self.video_frames > 0) or ("image" in self.blocks and not self.image_frame):
            raise ValueError(f"task {self.name!r}: prompt blocks {self.blocks} do not match its inputs")
        if self.clip_s < 1 or self.default_window_s < 1:
            raise ValueError(f"task {self.name!r}: clip and window last at least 1 s")

    @property
    def weights(self) -> str:
        """The checkpoint variant this task runs with: "joint", "avs" (binary masks) or "avss"."""
        return {0: "joint", 1: "avs"}.get(self.mask_classes, "avss")

    @property
    def names_second(self) -> bool:
        """The instruction names the segmented second ("at the third second": S4, MS3)."""
        return "{ordinal}" in self.tail

    def check_options(self, *, question: str | None = None, expression: str | None = None) -> None:
        """Raise :class:`OptionError` when the required option is missing or an unused one is given."""
        for option, value in (("question", question), ("expression", expression)):
            if value is not None and _PLACEHOLDER.search(value):
                raise OptionError(f"--{option} contains {_PLACEHOLDER.search(value).group(0)}, a token edgeav "
                                  "reserves for media and masks; rephrase it")
            if option == self.requires and (value is None or not value.strip()):
                article = "an" if option[0] in "aeiou" else "a"
                raise OptionError(f'task {self.name!r} needs {article} {option}: pass --{option} "..."')
            if option != self.requires and value is not None:
                users = ", ".join(t.name for t in TASKS.values() if t.requires == option)
                raise OptionError(f"task {self.name!r} takes no --{option}; only {users} use it")

    def instruction(
        self, *, question: str | None = None, expression: str | None = None, second: int | None = None
    ) -> str:
        """The user instruction, byte for byte as Crab was evaluated with.

        ``second`` is the 0-based second of the frame to segment (S4/MS3: 0..4, written
        "first".."fifth"; default 0); other tasks ignore it.
        """
        self.check_options(question=question, expression=expression)
        values = {}
        if question is not None:
            values["question"] = question.strip()
        if expression is not None:
            values["expression"] = expression.strip()
        if self.names_second:
            index = 0 if second is None else second
            if not 0 <= index < len(ORDINALS):
                raise OptionError(
                    f"task {self.name!r}: frame second {index} is out of range; expected 0..{len(ORDINALS) - 1}"
                )
            values["ordinal"] = ORDINALS[index]
        return "".join(PROMPT_BLOCKS[b] for b in self.blocks) + self.tail.format(**values)

    def plan_audio(self, *, duration_s: float | None = None, frame_time_s: float = 0.0) -> AudioPlan:
        """The audio windows this task feeds to BEATs (see :func:`edgeav.systems.crab.audio_cut.crab_audio_plan`)."""
        return crab_audio_plan(self.audio_plan, clip_s=self.clip_s, duration_s=duration_s,
                               frame_time_s=frame_time_s)

    def parse(
        self, text: str, *, clip_start_s: float = 0.0, source_size: tuple[int, int] | None = None,
        duration_s: float | None = None, classes: Sequence[str] | None = None,
    ) -> TaskResult:
        """Read the generated ``text``; never raises, keeps ``text`` as is.

        ``clip_start_s`` places event times in the source; ``duration_s`` (the clip's
        length, seconds) cuts events at its end; ``source_size`` (width, height) maps
        ARIG boxes to source pixels. ``classes``: the labels the model may write (the
        runtime passes :func:`task_classes` of its model); None only refuses labels
        that hold markup. What cannot be read is in ``notes`` as ``parse_error: ...``.
        """
        if self.output == "ave":
            return parse_ave(text, clip_start_s=clip_start_s, duration_s=duration_s, task=self.name)
        if self.output == "avvp":
            return parse_avvp(text, clip_start_s=clip_start_s, duration_s=duration_s, classes=classes,
                              task=self.name)
        if self.output == "answer":
            return parse_answer(text, task=self.name)
        if self.output == "box":
            return parse_arig(text, source_size=source_size, task=self.name)
        if self.output == "mask":
            return parse_mask(text, task=self.name)
        return parse_text(text, task=self.name)


_AV = ("video", "audio")
_IA = ("image", "audio")
_SEGMENT_AT = (
    "Please recognize the category of object making sound in the video, and then segment out the object that "
    "makes the sound at the {ordinal} second of the video."
)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="ave", description="audio-visual event localisation: the event and its time range in a 10-s clip",
            clip_s=SEGMENTS_PER_CLIP, fixed_clip=True, default_window_s=10,
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="seconds", image_frame=False,
            requires=None, max_new_tokens=500, output="ave",
            tail="Please describe the events and time range that occurred in the video.",
        ),
        Task(
            name="avvp", description="audio-visual video parsing: audio and visual events and their intervals",
            clip_s=SEGMENTS_PER_CLIP, fixed_clip=True, default_window_s=10,
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="seconds", image_frame=False,
            requires=None, max_new_tokens=500, output="avvp", classes=AVVP_CLASSES,
            tail="Please determine the events that occur based on the visual and audio information in the video, "
            "as well as the start and end times of these events.",
        ),
        Task(
            name="avqa", description="audio-visual question answering (MUSIC-AVQA, 60-s clips)",
            clip_s=60, fixed_clip=False, default_window_s=10,
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="avqa", image_frame=False,
            requires="question", max_new_tokens=500, output="answer",
            tail="Please answer this question: {question}",
        ),
        Task(
            name="arig", description="audio-referred image grounding: the sounding object's name and box",
            clip_s=5, fixed_clip=True, default_window_s=5,
            blocks=_IA, video_frames=0, frame_policy="none", audio_plan="seconds", image_frame=True,
            requires=None, max_new_tokens=500, output="box",
            tail="Please recognize the category of object that makes the sound and then output the location "
            "coordinates.",
        ),
        Task(
            name="s4", description="single sounding source segmentation (AVSBench S4, 5-s clips)",
            clip_s=5, fixed_clip=True, default_window_s=5,
            blocks=_AV, video_frames=5, frame_policy="uniform", audio_plan="seconds", image_frame=True,
            requires=None, max_new_tokens=100, output="mask", mask_classes=1, tail=_SEGMENT_AT,
        ),
        Task(
            name="ms3", description="multiple sounding sources segmentation (AVSBench MS3, 5-s clips)",
            clip_s=5, fixed_clip=True, default_window_s=5,
            blocks=_AV, video_frames=5, frame_policy="uniform", audio_plan="seconds", image_frame=True,
            requires=None, max_new_tokens=100, output="mask", mask_classes=1, tail=_SEGMENT_AT,
        ),
        # 100 tokens: Crab's inference_avs gives that to every mask task; the answer is ~30 tokens.
        Task(
            name="avss", description="audio-visual semantic segmentation: a 71-class mask of one frame",
            clip_s=10, fixed_clip=False, default_window_s=1,
            blocks=_IA, video_frames=0, frame_policy="none", audio_plan="avss", image_frame=True,
            requires=None, max_new_tokens=100, output="mask", mask_classes=AVSS_CLASSES, classes=AVSS_CLASS_NAMES,
            tail="Please recognize the category of the object making the sound in the image and segment it out.",
        ),
        Task(
            name="refavs", description="referring audio-visual segmentation: the object an expression names",
            clip_s=10, fixed_clip=True, default_window_s=10,
            blocks=("video", "audio", "image"), video_frames=10, frame_policy="uniform", audio_plan="seconds",
            image_frame=True, requires="expression", max_new_tokens=100, output="mask", mask_classes=1,
            tail="Please segment out the corresponding object in the image based on the referential expression: "
            "{expression}",
        ),
        # Free-form: AVQA's inputs, which spread over any clip length (the avqa plan scales its
        # windows to the duration), the question verbatim, 500 tokens like every open answer.
        Task(
            name="ask", description="a free-form question about the clip, answered in free text",
            clip_s=60, fixed_clip=False, default_window_s=10,
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="avqa", image_frame=False,
            requires="question", max_new_tokens=500, output="text", tail="{question}",
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name raises :class:`OptionError` with the choices."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name).lower(), TASKS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}.{hint}")


def task_classes(task: Task | str, model: str | None = None) -> tuple[str, ...]:
    """The labels ``task``'s answers use with a model of preset ``model`` (:data:`MODEL_CLASSES`, else the
    task's own ``classes``); empty when the task has no class list."""
    spec = get_task(task) if isinstance(task, str) else task
    return MODEL_CLASSES.get(model or "", {}).get(spec.name, spec.classes)


__all__ = [
    "AVSS_CLASSES", "AVSS_CLASS_NAMES", "AVVP_CLASSES", "BACKGROUND", "DEMO_WORLD_CLASSES", "Event",
    "MODEL_CLASSES", "MODEL_IMAGE_SIZE", "PROMPT_BLOCKS", "TASKS", "Task", "TaskResult", "box_to_source", "get_task",
    "normalise_label", "parse_answer", "parse_arig", "parse_ave", "parse_avvp", "parse_mask", "parse_text",
    "SEGMENTS_PER_CLIP", "task_classes",
]
