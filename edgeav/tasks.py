"""Crab's tasks: one table entry per task (inputs, instruction, output parser, limits),
the typed results a parser returns, and the metrics the field reports.

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
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Literal, Sequence

import numpy as np

from edgeav.errors import OptionError
from edgeav.media.windows import CRAB_AUDIO_PLANS, AudioPlan, crab_audio_plan

CLIP_SECONDS = 10  # AVE and AVVP clips: ten 1-s segments
MODEL_IMAGE_SIZE = 224  # ARIG coordinates live on this grid
MASK_TOKENS = 6  # <mask_0>..<mask_5>; fewer generated means no mask
AVSS_CLASSES = 71
BACKGROUND = "background"

# The 25 LLP classes of AVVP, in the order of the standard evaluation.
AVVP_CLASSES = (
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce",
    "Fire_alarm", "Chainsaw", "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle",
    "Vacuum_cleaner", "Baby_laughter", "Accordion", "Lawn_mower", "Motorcycle", "Helicopter",
    "Acoustic_guitar", "Telephone_bell_ringing", "Baby_cry_infant_cry", "Blender", "Clapping",
)

Modality = Literal["audio-visual", "audio", "visual"]

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


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Event:
    """An event found in the clip.

    Attributes:
        label: the event class as the model wrote it.
        start_s: start, seconds of the source.
        end_s: end, seconds of the source, exclusive.
        modality: "audio-visual" (AVE), "audio" or "visual" (AVVP).
    """

    label: str
    start_s: float
    end_s: float
    modality: Modality

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskResult:
    """What could be read from one generated text; ``text`` is the text as generated.

    Attributes:
        task: task name.
        text: the generated text, unmodified.
        events: AVE/AVVP events, in the order written.
        box: ARIG box ``(x1, y1, x2, y2)`` in source pixels (the 224x224 model grid
            when the parser was not told the source size).
        answer: AVQA answer, or the free text of ``ask``.
        object_label: the sounding/referred object named by ARIG and mask tasks.
        has_mask_tokens: the text holds the six ``<mask_i>`` tokens that drive the mask decoder.
    """

    task: str
    text: str
    events: tuple[Event, ...] = ()
    box: tuple[float, float, float, float] | None = None
    answer: str | None = None
    object_label: str | None = None
    has_mask_tokens: bool = False

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "text": self.text,
            "events": [event.to_dict() for event in self.events],
            "box": None if self.box is None else list(self.box),
            "answer": self.answer,
            "object_label": self.object_label,
            "has_mask_tokens": self.has_mask_tokens,
        }


# --------------------------------------------------------------------------- parsers

_NUM = r"\d+(?:\.\d+)?"
_DECODER_NOISE = re.compile(r"<s>|</s>|<unk>", re.I)
_AVE_EVENT = re.compile(r"<\s*event\s*>([^<]*)", re.I)
_AVE_RANGE = re.compile(r"<\s*range\s*>([^<]*)", re.I)
# AVVP: <audio_event>..</audio_event>; the README's older <audio>..</audio> is accepted too.
_AVVP_BLOCK = re.compile(
    r"<\s*(audio|visual)(?:_event)?\s*>(.*?)(?=<\s*/?\s*(?:audio|visual)(?:_event)?\s*>|$)", re.I | re.S
)
_AVVP_INTERVAL = re.compile(rf"[(\[]\s*({_NUM})\s*[,;\s]\s*({_NUM})\s*[)\]]")
_ANSWER = re.compile(r"<\s*answer\s*>([^<]*)", re.I)
_ARIG_CORNERS = re.compile(
    rf"top\s*left\s*corner\s*is\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\).*?"
    rf"bottom\s*right\s*corner\s*is\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)",
    re.I | re.S,
)
# The reference answers of Crab's ARIG test set use <obj>(x1,y1)(x2,y2)</obj>.
_ARIG_OBJ = re.compile(
    rf"<\s*obj\s*>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,?\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)", re.I
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


def _readable(text: str) -> str:
    """The text without the decoder's <s>, </s> and <unk> pieces."""
    return _DECODER_NOISE.sub("", text)


def _label(raw: str) -> str:
    return " ".join(raw.split()).strip(" ,;:.\"'")


def parse_ave(text: str, *, clip_start_s: float = 0.0, task: str = "ave") -> TaskResult:
    """``<event> X </event>, and the time range is <range> s,e </range>`` -> audio-visual events.

    Every ``<range>`` between an ``<event>`` and the next one gives an event of that
    label (GeWu-Lab's scorer also reads several ranges); a range without two numbers
    is dropped. Without a range, intervals written inside the tag
    (``<event> Bark,(0 3) </event>``) are read instead. ``s,e`` are seconds of the
    clip, ``e`` exclusive (see the module notes), shifted by ``clip_start_s``.
    """
    body = _readable(text)
    tags = list(_AVE_EVENT.finditer(body))
    ranges = [(m.start(), re.findall(_NUM, m.group(1))) for m in _AVE_RANGE.finditer(body)]
    events = []
    for k, tag in enumerate(tags):
        stop = tags[k + 1].start() if k + 1 < len(tags) else len(body)
        spans = [(float(n[0]), float(n[1])) for pos, n in ranges if tag.start() < pos < stop and len(n) >= 2]
        content = tag.group(1)
        label = _label(content)
        inline = list(_AVVP_INTERVAL.finditer(content))
        if not spans and inline:
            label = _label(content[: inline[0].start()])
            spans = [(float(m.group(1)), float(m.group(2))) for m in inline]
        if label:
            events += [Event(label, clip_start_s + s, clip_start_s + e, "audio-visual") for s, e in spans]
    return TaskResult(task=task, text=text, events=tuple(events))


def parse_avvp(text: str, *, clip_start_s: float = 0.0, task: str = "avvp") -> TaskResult:
    """``<audio_event>Speech,(0 3),(5 10)</audio_event>`` / ``<visual_event>`` -> one event per interval.

    A block may hold several labels, each followed by its intervals; an interval
    with no label before it is dropped.
    """
    events = []
    for block in _AVVP_BLOCK.finditer(_readable(text)):
        modality, content = block.group(1).lower(), block.group(2)
        label, cursor = "", 0
        for interval in _AVVP_INTERVAL.finditer(content):
            written = _label(content[cursor : interval.start()])
            label = written or label
            cursor = interval.end()
            if label:
                start, end = float(interval.group(1)), float(interval.group(2))
                events.append(Event(label, clip_start_s + start, clip_start_s + end, modality))
    return TaskResult(task=task, text=text, events=tuple(events))


def parse_answer(text: str, *, task: str = "avqa") -> TaskResult:
    """``... <answer> X </answer>`` -> answer X (the last answer tag; the closing tag may be cut off)."""
    found = [_label(m.group(1)) for m in _ANSWER.finditer(_readable(text))]
    found = [a for a in found if a]
    return TaskResult(task=task, text=text, answer=found[-1] if found else None)


def parse_arig(
    text: str, *, source_size: tuple[int, int] | None = None, task: str = "arig"
) -> TaskResult:
    """``The sounding object is X. Its coordinate of top left corner is (x1,y1) and
    coordinate of bottom right corner is (x2,y2)`` -> object label and box.

    The numbers are pixels of the 224x224 model image; with ``source_size=(width,
    height)`` the box comes back in source pixels. Corners written in the wrong
    order are sorted so that x1 <= x2 and y1 <= y2.
    """
    body = _readable(text)
    label_match = _SOUNDING_OBJECT.search(body)
    label = _label(label_match.group(1)) if label_match else ""
    corners = _ARIG_CORNERS.search(body) or _ARIG_OBJ.search(body)
    box = None
    if corners:
        x1, y1, x2, y2 = (float(v) for v in corners.groups())
        box = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        if source_size is not None:
            box = box_to_source(box, *source_size)
    return TaskResult(task=task, text=text, box=box, object_label=label or None)


def parse_mask(text: str, *, task: str) -> TaskResult:
    """Mask tasks: are the six ``<mask_i>`` tokens there, and which object is named.

    ``has_mask_tokens`` follows the generator's rule: at least six ``<mask_0..5>``
    tokens (``<mask_start>``/``<mask_end>`` are not required).
    """
    body = _readable(text)
    label = None
    for pattern in _MASK_LABELS:
        found = pattern.search(body)
        if found and _label(found.group(1)):
            label = _label(found.group(1))
            break
    return TaskResult(
        task=task, text=text, object_label=label, has_mask_tokens=len(_MASK_TOKEN.findall(body)) >= MASK_TOKENS
    )


def parse_text(text: str, *, task: str = "ask") -> TaskResult:
    """Free text: the answer is the text without decoder pieces, trimmed."""
    answer = " ".join(_readable(text).split())
    return TaskResult(task=task, text=text, answer=answer or None)


def box_to_source(
    box: Sequence[float], source_width: int, source_height: int, *, grid: int = MODEL_IMAGE_SIZE
) -> tuple[float, float, float, float]:
    """Map an ARIG box from the ``grid`` x ``grid`` model image to source pixels.

    The model image is the source stretched to a square, so x and y scale separately;
    the result is clipped to the source.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = source_width / grid, source_height / grid
    return (
        min(max(x1 * sx, 0.0), source_width),
        min(max(y1 * sy, 0.0), source_height),
        min(max(x2 * sx, 0.0), source_width),
        min(max(y2 * sy, 0.0), source_height),
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
        audio_plan: task name given to :func:`edgeav.media.crab_audio_plan`.
        image_frame: one still frame is needed: the ``<image>`` block and/or the mask decoder's input.
        requires: the option the instruction needs (``question``, ``expression``) or None.
        max_new_tokens: generation limit.
        tail: the instruction after the modality blocks; ``{question}``, ``{expression}``
            and ``{ordinal}`` are filled in.
        output: which parser reads the answer, one of ``OUTPUT_KINDS``.
        mask_classes: mask decoder classes (1 binary, 71 AVSS, 0 no mask).
    """

    name: str
    description: str
    blocks: tuple[str, ...]
    video_frames: int
    frame_policy: str
    audio_plan: str
    image_frame: bool
    requires: str | None
    max_new_tokens: int
    tail: str
    output: str
    mask_classes: int = 0

    def __post_init__(self) -> None:
        if self.frame_policy not in FRAME_POLICIES or (self.frame_policy == "none") != (self.video_frames == 0):
            raise ValueError(f"task {self.name!r}: frame policy {self.frame_policy!r} with {self.video_frames} frames")
        if self.audio_plan not in CRAB_AUDIO_PLANS or self.output not in OUTPUT_KINDS:
            raise ValueError(f"task {self.name!r}: unknown audio plan or output kind")
        if ("video" in self.blocks) != (self.video_frames > 0) or ("image" in self.blocks and not self.image_frame):
            raise ValueError(f"task {self.name!r}: prompt blocks {self.blocks} do not match its inputs")

    @property
    def weights(self) -> str:
        """The checkpoint variant this task runs with: "joint", "avs" (binary masks) or "avss"."""
        return {0: "joint", 1: "avs"}.get(self.mask_classes, "avss")

    def check_options(self, *, question: str | None = None, expression: str | None = None) -> None:
        """Raise :class:`OptionError` when the required option is missing or an unused one is given."""
        for option, value in (("question", question), ("expression", expression)):
            if value is not None and _PLACEHOLDER.search(value):
                raise OptionError(f"--{option} contains {_PLACEHOLDER.search(value).group(0)}, a token edgeav "
                                  "reserves for media and masks; rephrase it")
            if option == self.requires and (value is None or not value.strip()):
                raise OptionError(f'task {self.name!r} needs a {option}: pass --{option} "..."')
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
        if "{ordinal}" in self.tail:
            index = 0 if second is None else second
            if not 0 <= index < len(ORDINALS):
                raise OptionError(
                    f"task {self.name!r}: frame second {index} is out of range; expected 0..{len(ORDINALS) - 1}"
                )
            values["ordinal"] = ORDINALS[index]
        return "".join(PROMPT_BLOCKS[b] for b in self.blocks) + self.tail.format(**values)

    def plan_audio(self, *, duration_s: float | None = None, frame_time_s: float = 0.0) -> AudioPlan:
        """The audio windows this task feeds to BEATs (see :func:`edgeav.media.crab_audio_plan`)."""
        return crab_audio_plan(self.audio_plan, duration_s=duration_s, frame_time_s=frame_time_s)

    def parse(
        self, text: str, *, clip_start_s: float = 0.0, source_size: tuple[int, int] | None = None
    ) -> TaskResult:
        """Read the generated ``text``; never raises, keeps ``text`` as is.

        ``clip_start_s`` places event times in the source; ``source_size`` (width,
        height) maps ARIG boxes to source pixels.
        """
        if self.output == "ave":
            return parse_ave(text, clip_start_s=clip_start_s, task=self.name)
        if self.output == "avvp":
            return parse_avvp(text, clip_start_s=clip_start_s, task=self.name)
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
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="ave", image_frame=False,
            requires=None, max_new_tokens=500, output="ave",
            tail="Please describe the events and time range that occurred in the video.",
        ),
        Task(
            name="avvp", description="audio-visual video parsing: audio and visual events and their intervals",
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="avvp", image_frame=False,
            requires=None, max_new_tokens=500, output="avvp",
            tail="Please determine the events that occur based on the visual and audio information in the video, "
            "as well as the start and end times of these events.",
        ),
        Task(
            name="avqa", description="audio-visual question answering (MUSIC-AVQA, 60-s clips)",
            blocks=_AV, video_frames=10, frame_policy="uniform", audio_plan="avqa", image_frame=False,
            requires="question", max_new_tokens=500, output="answer",
            tail="Please answer this question: {question}",
        ),
        Task(
            name="arig", description="audio-referred image grounding: the sounding object's name and box",
            blocks=_IA, video_frames=0, frame_policy="none", audio_plan="arig", image_frame=True,
            requires=None, max_new_tokens=500, output="box",
            tail="Please recognize the category of object that makes the sound and then output the location "
            "coordinates.",
        ),
        Task(
            name="s4", description="single sounding source segmentation (AVSBench S4, 5-s clips)",
            blocks=_AV, video_frames=5, frame_policy="uniform", audio_plan="s4", image_frame=True,
            requires=None, max_new_tokens=100, output="mask", mask_classes=1, tail=_SEGMENT_AT,
        ),
        Task(
            name="ms3", description="multiple sounding sources segmentation (AVSBench MS3, 5-s clips)",
            blocks=_AV, video_frames=5, frame_policy="uniform", audio_plan="ms3", image_frame=True,
            requires=None, max_new_tokens=100, output="mask", mask_classes=1, tail=_SEGMENT_AT,
        ),
        # 100 tokens: Crab's inference_avs gives that to every mask task; the answer is ~30 tokens.
        Task(
            name="avss", description="audio-visual semantic segmentation: a 71-class mask of one frame",
            blocks=_IA, video_frames=0, frame_policy="none", audio_plan="avss", image_frame=True,
            requires=None, max_new_tokens=100, output="mask", mask_classes=AVSS_CLASSES,
            tail="Please recognize the category of the object making the sound in the image and segment it out.",
        ),
        Task(
            name="refavs", description="referring audio-visual segmentation: the object an expression names",
            blocks=("video", "audio", "image"), video_frames=10, frame_policy="uniform", audio_plan="refavs",
            image_frame=True, requires="expression", max_new_tokens=100, output="mask", mask_classes=1,
            tail="Please segment out the corresponding object in the image based on the referential expression: "
            "{expression}",
        ),
        # Free-form: AVQA's inputs, which spread over any clip length (the avqa plan scales its
        # windows to the duration), the question verbatim, 500 tokens like every open answer.
        Task(
            name="ask", description="a free-form question about the clip, answered in free text",
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


# --------------------------------------------------------------------------- metrics


def _norm(label: str) -> str:
    return " ".join(label.replace("_", " ").lower().split()).strip(" .,;:\"'")


def _covered_seconds(event: Event, n_seconds: int, clip_start_s: float, inclusive_end: bool) -> range:
    start = event.start_s - clip_start_s
    end = event.end_s - clip_start_s + (1.0 if inclusive_end else 0.0)
    first = max(0, math.ceil(start - 0.5))  # second i is covered when its centre i + 0.5 is in [start, end)
    last = min(n_seconds, math.ceil(end - 0.5))
    return range(first, max(first, last))


def ave_second_labels(
    events: Iterable[Event], *, n_seconds: int = CLIP_SECONDS, clip_start_s: float = 0.0, inclusive_end: bool = False
) -> list[str]:
    """Per-second labels of a clip: the (normalised) label of the event covering each
    second, ``BACKGROUND`` where none does; a later event overrides an earlier one.

    With ``inclusive_end`` the end second is covered too, as GeWu-Lab's AVE scorer reads ranges.
    """
    labels = [BACKGROUND] * n_seconds
    for event in events:
        for second in _covered_seconds(event, n_seconds, clip_start_s, inclusive_end):
            labels[second] = _norm(event.label)
    return labels


def ave_accuracy(
    predicted: Iterable[Event],
    truth: Iterable[Event],
    *,
    n_seconds: int = CLIP_SECONDS,
    clip_start_s: float = 0.0,
    inclusive_end: bool = False,
) -> float:
    """AVE accuracy of one clip: the share of its ``n_seconds`` one-second segments whose
    predicted label (event class, or background) equals the true one.

    The field's AVE accuracy pools all segments of the test set; with 10 segments per
    clip that is the mean of this over clips. Labels compare case-, space- and
    underscore-insensitively. ``inclusive_end=True`` reproduces GeWu-Lab's scorer,
    which counts the end second of both ranges as covered.
    """
    pred = ave_second_labels(predicted, n_seconds=n_seconds, clip_start_s=clip_start_s, inclusive_end=inclusive_end)
    true = ave_second_labels(truth, n_seconds=n_seconds, clip_start_s=clip_start_s, inclusive_end=inclusive_end)
    return sum(p == t for p, t in zip(pred, true)) / n_seconds


@dataclass(frozen=True)
class AVVPScores:
    """AVVP F1 scores of one clip or averaged over clips (standard LLP evaluation).

    ``segment_*`` score one-second segments, ``event_*`` score events (runs of
    consecutive seconds) matched at IoU >= 0.5. ``*_av`` is the audio-visual
    modality (a class present in audio and visual in the same second);
    ``*_event_av`` ("Event@AV") pools the audio and visual counts of each class.
    """

    segment_audio: float
    segment_visual: float
    segment_av: float
    segment_event_av: float
    event_audio: float
    event_visual: float
    event_av: float
    event_event_av: float

    @property
    def segment_type_av(self) -> float:
        """"Type@AV": the mean of the audio, visual and audio-visual segment-level F1."""
        return (self.segment_audio + self.segment_visual + self.segment_av) / 3

    @property
    def event_type_av(self) -> float:
        """"Type@AV" at event level."""
        return (self.event_audio + self.event_visual + self.event_av) / 3

    def to_dict(self) -> dict:
        return {**asdict(self), "segment_type_av": self.segment_type_av, "event_type_av": self.event_type_av}


def avvp_matrices(
    events: Iterable[Event],
    classes: Sequence[str],
    *,
    n_seconds: int = CLIP_SECONDS,
    clip_start_s: float = 0.0,
    strict: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Audio and visual activity, each bool[len(classes), n_seconds]: class c is active in
    second i when an event of that class covers the second's centre.

    "audio-visual" events count in both. Labels match ``classes`` case-, space- and
    underscore-insensitively; an unknown label is skipped, or raises ``ValueError``
    when ``strict``.
    """
    index = {_norm(c): i for i, c in enumerate(classes)}
    audio = np.zeros((len(classes), n_seconds), bool)
    visual = np.zeros_like(audio)
    for event in events:
        row = index.get(_norm(event.label))
        if row is None:
            if strict:
                raise ValueError(f"event label {event.label!r} is not one of the {len(classes)} classes given")
            continue
        seconds = list(_covered_seconds(event, n_seconds, clip_start_s, False))
        if event.modality in ("audio", "audio-visual"):
            audio[row, seconds] = True
        if event.modality in ("visual", "audio-visual"):
            visual[row, seconds] = True
    return audio, visual


def _mean_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> float:
    # Classes with nothing predicted and nothing true are skipped; none left scores 1 (all true negatives).
    active = (tp + fp + fn) > 0
    if not active.any():
        return 1.0
    return float(np.mean(2 * tp[active] / (2 * tp[active] + fp[active] + fn[active])))


def _segment_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (pred & truth).sum(1), (pred & ~truth).sum(1), (~pred & truth).sum(1)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate(([0], row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _run_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    overlap = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    return overlap / ((a[1] - a[0]) + (b[1] - b[0]) - overlap)


def _event_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # A predicted event is a hit when some true event of its class overlaps it at IoU >= 0.5;
    # a true event is missed when no predicted event does (matching is not one-to-one).
    n = pred.shape[0]
    tp, fp, fn = np.zeros(n), np.zeros(n), np.zeros(n)
    for c in range(n):
        p_runs, t_runs = _runs(pred[c]), _runs(truth[c])
        hits = sum(any(_run_iou(p, t) >= 0.5 for t in t_runs) for p in p_runs)
        tp[c], fp[c] = hits, len(p_runs) - hits
        fn[c] = sum(not any(_run_iou(t, p) >= 0.5 for p in p_runs) for t in t_runs)
    return tp, fp, fn


def avvp_scores(
    predicted: Iterable[Event],
    truth: Iterable[Event],
    *,
    classes: Sequence[str] | None = None,
    n_seconds: int = CLIP_SECONDS,
    clip_start_s: float = 0.0,
) -> AVVPScores:
    """Segment- and event-level F1 of one clip, as the standard AVVP (LLP) evaluation.

    Per modality, F1 = 2TP / (2TP + FP + FN) per class over ``classes`` x ``n_seconds``
    one-second segments, averaged over the classes with anything predicted or true
    (1.0 when there is none). Audio-visual truth and prediction are the per-second
    AND of audio and visual. Event level counts events (runs of consecutive seconds)
    matched at IoU >= 0.5. ``classes`` defaults to the labels seen in either list,
    which scores the same as the 25 LLP classes when every label is one of them;
    given explicitly, predicted labels outside it are ignored and true ones raise
    ``ValueError``.
    """
    predicted, truth = list(predicted), list(truth)
    if classes is None:
        classes = sorted({_norm(e.label) for e in predicted + truth})
    pa, pv = avvp_matrices(predicted, classes, n_seconds=n_seconds, clip_start_s=clip_start_s)
    ta, tv = avvp_matrices(truth, classes, n_seconds=n_seconds, clip_start_s=clip_start_s, strict=True)
    scores = {}
    for level, count in (("segment", _segment_counts), ("event", _event_counts)):
        a, v, av = count(pa, ta), count(pv, tv), count(pa & pv, ta & tv)
        pooled = [x + y for x, y in zip(a, v)]
        scores[f"{level}_audio"] = _mean_f1(*a)
        scores[f"{level}_visual"] = _mean_f1(*v)
        scores[f"{level}_av"] = _mean_f1(*av)
        scores[f"{level}_event_av"] = _mean_f1(*pooled)
    return AVVPScores(**scores)


def mean_avvp_scores(scores: Sequence[AVVPScores]) -> AVVPScores:
    """The field's dataset score: each F1 averaged over clips."""
    if not scores:
        raise ValueError("no clips to average")
    names = [f.name for f in fields(AVVPScores)]
    return AVVPScores(**{n: float(np.mean([getattr(s, n) for s in scores])) for n in names})


def box_iou(predicted: Sequence[float] | None, truth: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes in the same pixel space;
    a missing prediction scores 0."""
    if predicted is None:
        return 0.0
    px1, py1, px2, py2 = (float(v) for v in predicted)
    tx1, ty1, tx2, ty2 = (float(v) for v in truth)
    inter = max(0.0, min(px2, tx2) - max(px1, tx1)) * max(0.0, min(py2, ty2) - max(py1, ty1))
    union = max(0.0, px2 - px1) * max(0.0, py2 - py1) + max(0.0, tx2 - tx1) * max(0.0, ty2 - ty1) - inter
    return inter / union if union > 0 else 0.0


def iou_share(ious: Sequence[float], threshold: float = 0.5) -> float:
    """The share of samples whose IoU is at least ``threshold`` (ARIG's accuracy at 0.5)."""
    if len(ious) == 0:
        raise ValueError("no samples to score")
    return float(np.mean(np.asarray(ious, float) >= threshold))


def _masks(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"mask shapes differ: predicted {predicted.shape}, truth {truth.shape}")
    return predicted, truth.astype(bool)


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of a binary mask (sigmoid > 0.5 already applied) with the true mask.

    An empty true mask scores on the background, as AVSBench and Crab do: the share of
    pixels predicted as background.
    """
    predicted, truth = _masks(predicted, truth)
    predicted = predicted.astype(bool)
    if not truth.any():
        return float(np.mean(~predicted))
    return float((predicted & truth).sum() / (predicted | truth).sum())


def mask_miou(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """mIoU: :func:`mask_iou` averaged over samples (frames)."""
    if len(predicted) != len(truth) or not predicted:
        raise ValueError(f"need as many predicted as true masks, at least one; got {len(predicted)} and {len(truth)}")
    return float(np.mean([mask_iou(p, t) for p, t in zip(predicted, truth)]))


def mask_fscore(probabilities: np.ndarray, truth: np.ndarray, *, beta2: float = 0.3, n_thresholds: int = 255) -> float:
    """F-measure of one sample: the best over ``n_thresholds`` thresholds t in
    linspace(0, 1 - 1e-10) of F = (1 + beta2) P R / (beta2 P + R), where the mask is
    ``probabilities >= t`` (sigmoid of the mask logits).

    An empty true mask scores 0: AVSBench's Eval_Fmeasure skips it and, called per
    sample as Crab does, returns 0 that still counts in the mean.
    """
    probabilities, truth = _masks(probabilities, truth)
    if not truth.any():
        return 0.0
    thresholds = np.linspace(0.0, 1.0 - 1e-10, n_thresholds)
    ranked = np.sort(probabilities.ravel())
    ranked_true = np.sort(probabilities[truth])
    predicted = ranked.size - np.searchsorted(ranked, thresholds, side="left")  # pixels >= t
    hits = ranked_true.size - np.searchsorted(ranked_true, thresholds, side="left")
    precision, recall = hits / (predicted + 1e-20), hits / (truth.sum() + 1e-20)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
    return float(np.nan_to_num(f, nan=0.0).max())


def null_score(predicted: np.ndarray) -> float:
    """Ref-AVS null split: sqrt of the share of pixels predicted as foreground (lower is better)."""
    return float(math.sqrt(np.mean(np.asarray(predicted, bool))))


def avss_class_iou(predicted: np.ndarray, truth: np.ndarray, *, n_classes: int = AVSS_CLASSES) -> np.ndarray:
    """Per-class IoU of AVSS label maps (int[H, W] or int[N, H, W], class ids 0..n_classes-1).

    For each class, the IoU of every frame where the class is predicted or true,
    averaged over those frames; NaN for a class no frame has. Pixels whose true id
    is outside 0..n_classes-1 (an ignore label such as 255) are left out.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"label map shapes differ: predicted {predicted.shape}, truth {truth.shape}")
    return _avss_iou(predicted, truth, n_classes)


def _avss_iou(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    if predicted.ndim == 2:
        predicted, truth = predicted[None], truth[None]
    iou_sum, frames = np.zeros(n_classes), np.zeros(n_classes)
    for p, t in zip(predicted.astype(np.int64), truth.astype(np.int64)):
        valid_t = (t >= 0) & (t < n_classes)  # pixels without a valid true class are left out
        valid_p = valid_t & (p >= 0) & (p < n_classes)
        area_p = np.bincount(p[valid_p], minlength=n_classes)
        area_t = np.bincount(t[valid_t], minlength=n_classes)
        same = valid_p & (p == t)
        inter = np.bincount(p[same], minlength=n_classes)
        union = area_p + area_t - inter
        seen = union > 0
        iou_sum[seen] += inter[seen] / union[seen]
        frames[seen] += 1
    with np.errstate(invalid="ignore"):
        return iou_sum / np.where(frames > 0, frames, np.nan)


def avss_miou(predicted: np.ndarray, truth: np.ndarray, *, n_classes: int = AVSS_CLASSES) -> float:
    """AVSS mIoU as AVSBench and Crab report it: the mean of :func:`avss_class_iou` over
    all ``n_classes`` classes, a class never seen counting 0."""
    return float(np.mean(np.nan_to_num(avss_class_iou(predicted, truth, n_classes=n_classes), nan=0.0)))


def answers_match(predicted: str | None, truth: str) -> bool:
    """AVQA: the answer equals the true one, ignoring case and spacing."""
    return predicted is not None and " ".join(predicted.lower().split()) == " ".join(truth.lower().split())


def avqa_accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> float:
    """AVQA accuracy: the share of questions whose answer :func:`answers_match` the truth;
    a missing answer is wrong."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many answers as truths, at least one; got {len(predicted)} and {len(truth)}")
    return sum(answers_match(p, t) for p, t in zip(predicted, truth)) / len(truth)


__all__ = [
    "AVSS_CLASSES", "AVVP_CLASSES", "AVVPScores", "BACKGROUND", "CLIP_SECONDS", "Event", "MODEL_IMAGE_SIZE",
    "PROMPT_BLOCKS", "TASKS", "Task", "TaskResult", "answers_match", "ave_accuracy", "ave_second_labels",
    "avqa_accuracy", "avss_class_iou", "avss_miou", "avvp_matrices", "avvp_scores", "box_iou", "box_to_source",
    "get_task", "iou_share", "mask_fscore", "mask_iou", "mask_miou", "mean_avvp_scores", "null_score",
    "parse_answer", "parse_arig", "parse_ave", "parse_avvp", "parse_mask", "parse_text",
]
