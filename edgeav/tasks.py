"""What every system's tasks share: the datasets' label sets, the typed pieces a parser
returns (:class:`Event`, :class:`TaskResult`), how labels compare, and the parsers of the
answer formats two systems share (Crab and Crab+ were trained on the same AVE, AVVP and
AVQA target formats): :func:`parse_ave`, :func:`parse_avvp`, :func:`parse_answer`,
:func:`parse_text`, and :func:`box_to_source` for boxes on the 224x224 model image.

Parsers are strict: what does not parse (a label that is not one of the model's
classes, a reversed range or box, a missing tag) gives a ``parse_error: ...`` note
and no invented event; event ranges are cut at the clip's end.

Each system's own task table, prompts and parsers live in ``edgeav/systems/NAME/tasks.py``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal, Sequence

MODEL_IMAGE_SIZE = 224  # Crab's and Crab+'s box coordinates live on this grid
SEGMENTS_PER_CLIP = 10  # AVE and AVVP label each clip in ten 1-s segments (what their metrics score)
AVSS_CLASSES = 71
BACKGROUND = "background"

# The 25 LLP classes of AVVP, in the order of the standard evaluation.
AVVP_CLASSES = (
    "Speech", "Car", "Cheering", "Dog", "Cat", "Frying_(food)", "Basketball_bounce",
    "Fire_alarm", "Chainsaw", "Cello", "Banjo", "Singing", "Chicken_rooster", "Violin_fiddle",
    "Vacuum_cleaner", "Baby_laughter", "Accordion", "Lawn_mower", "Motorcycle", "Helicopter",
    "Acoustic_guitar", "Telephone_bell_ringing", "Baby_cry_infant_cry", "Blender", "Clapping",
)

# AVSBench-semantic's classes by class id (0 background): the order of its label2idx.json (ids 1..71 there).
AVSS_CLASS_NAMES = (
    BACKGROUND, "accordion", "airplane", "axe", "baby", "bassoon", "bell", "bird", "boat", "boy", "bus", "car", "cat",
    "cello", "clarinet", "clipper", "clock", "dog", "donkey", "drum", "duck", "elephant", "emergency-car", "erhu",
    "flute", "frying-food", "girl", "goose", "guitar", "gun", "guzheng", "hair-dryer", "handpan", "harmonica", "harp",
    "helicopter", "hen", "horse", "keyboard", "leopard", "lion", "man", "marimba", "missile-rocket", "motorcycle",
    "mower", "parrot", "piano", "pig", "pipa", "saw", "saxophone", "sheep", "sitar", "sorna", "squirrel", "tabla",
    "tank", "tiger", "tractor", "train", "trombone", "truck", "trumpet", "tuba", "ukulele", "utv", "vacuum-cleaner",
    "violin", "wolf", "woman",
)

Modality = Literal["audio-visual", "audio", "visual"]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Event:
    """An event found in the clip.

    Attributes:
        label: the event class: as the model wrote it, or in the task's spelling when the
            parser was given the classes (``Speech`` for ``speech``).
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
        notes: what could not be read (``parse_error: ...``) or was changed (an event cut at
            the clip's end); nothing is invented in its place.
    """

    task: str
    text: str
    events: tuple[Event, ...] = ()
    box: tuple[float, float, float, float] | None = None
    answer: str | None = None
    object_label: str | None = None
    has_mask_tokens: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "text": self.text,
            "events": [event.to_dict() for event in self.events],
            "box": None if self.box is None else list(self.box),
            "answer": self.answer,
            "object_label": self.object_label,
            "has_mask_tokens": self.has_mask_tokens,
            "notes": list(self.notes),
        }


def normalise_label(label: str) -> str:
    """A label as labels compare: case, spaces and underscores ignored (``Frying_(food)`` = ``frying (food)``)."""
    return " ".join(label.replace("_", " ").lower().split()).strip(" .,;:\"'")


# --------------------------------------------------------------------------- shared parsers

NUMBER = r"\d+(?:\.\d+)?"
_DECODER_NOISE = re.compile(r"<s>|</s>|<unk>", re.I)
_AVE_EVENT = re.compile(r"<\s*event\s*>([^<]*)", re.I)
_AVE_RANGE = re.compile(r"<\s*range\s*>([^<]*)", re.I)
# AVVP: <audio_event>..</audio_event>; the README's older <audio>..</audio> is accepted too.
_AVVP_BLOCK = re.compile(
    r"<\s*(audio|visual)(?:_event)?\s*>(.*?)(?=<\s*/?\s*(?:audio|visual)(?:_event)?\s*>|$)", re.I | re.S
)
_AVVP_INTERVAL = re.compile(rf"[(\[]\s*({NUMBER})\s*[,;\s]\s*({NUMBER})\s*[)\]]")
_ANSWER = re.compile(r"<\s*answer\s*>([^<]*)", re.I)
# <answer> and </answer>, whole or cut off by the token limit: markup, never part of an answer.
_ANSWER_MARKUP = re.compile(r"<\s*/?\s*answer\s*>?|/\s*answer\s*>", re.I)
# A label holding either is a piece of a tag (the demo model once wrote "</visualhorn"), never a class.
_MARKUP = re.compile(r"[<>]")


def readable(text: str) -> str:
    """The text without the decoder's <s>, </s> and <unk> pieces."""
    return _DECODER_NOISE.sub("", text)


def clean_label(raw: str) -> str:
    """A label as written, with runs of spaces joined and surrounding punctuation and quotes trimmed."""
    return " ".join(raw.split()).strip(" ,;:.\"'")


def class_label(written: str, classes: dict[str, str] | None, notes: list[str]) -> str | None:
    """``written`` in the task's spelling (``classes``: normalised label -> spelling), or None (with a
    ``parse_error`` note) when it is not a class or holds markup."""
    if _MARKUP.search(written):
        notes.append(f"parse_error: label {written!r} holds markup, not a class name; its events are dropped")
        return None
    if classes is None:
        return written
    canonical = classes.get(normalise_label(written))
    if canonical is None:
        notes.append(f"parse_error: label {written!r} is not one of the task's {len(classes)} classes; "
                     "its events are dropped")
    return canonical


def clip_events(label: str, spans: list[tuple[float, float]], modality: Modality, clip_start_s: float,
                duration_s: float | None, notes: list[str]) -> list[Event]:
    """Events of ``label`` over clip-time ``spans``: reversed or empty ranges dropped, ranges cut at the clip's end."""
    events = []
    for start, end in spans:
        written = f"{label!r} {clip_start_s + start:g}-{clip_start_s + end:g} s"
        if end <= start:
            notes.append(f"parse_error: event {written} ends before it starts; dropped")
            continue
        if duration_s is not None and start >= duration_s:
            notes.append(f"event {written} starts after the clip's end at {clip_start_s + duration_s:g} s; dropped")
            continue
        if duration_s is not None and end > duration_s:
            notes.append(f"event {written} runs past the clip's end; cut to "
                         f"{clip_start_s + start:g}-{clip_start_s + duration_s:g} s")
            end = duration_s
        events.append(Event(label, clip_start_s + start, clip_start_s + end, modality))
    return events


def parse_ave(text: str, *, clip_start_s: float = 0.0, duration_s: float | None = None,
              task: str = "ave") -> TaskResult:
    """``<event> X </event>, and the time range is <range> s,e </range>`` -> audio-visual events.

    Every ``<range>`` between an ``<event>`` and the next one gives an event of that
    label (GeWu-Lab's scorer also reads several ranges). Without a range, intervals
    written inside the tag (``<event> Bark,(0 3)(7 10) </event>``) are read instead. ``s,e``
    are seconds of the clip, ``e`` exclusive, shifted by ``clip_start_s``; with
    ``duration_s`` (the clip's length) a range is cut at the clip's end. A range without
    two numbers, a reversed range and a label holding markup give a ``parse_error`` note
    and no event.
    """
    body = readable(text)
    tags = list(_AVE_EVENT.finditer(body))
    ranges = [(m.start(), m.group(1)) for m in _AVE_RANGE.finditer(body)]
    events, notes = [], []
    if not tags:
        notes.append("parse_error: no '<event> X </event> ... <range> s,e </range>' in the text")
    for k, tag in enumerate(tags):
        stop = tags[k + 1].start() if k + 1 < len(tags) else len(body)
        spans = []
        for pos, raw in ranges:
            numbers = re.findall(NUMBER, raw)
            if not tag.start() < pos < stop:
                continue
            if len(numbers) < 2:
                notes.append(f"parse_error: <range> {clean_label(raw)!r} holds no 's,e' pair")
                continue
            spans.append((float(numbers[0]), float(numbers[1])))
        content = tag.group(1)
        label = clean_label(content)
        inline = list(_AVVP_INTERVAL.finditer(content))
        if not spans and inline:
            label = clean_label(content[: inline[0].start()])
            spans = [(float(m.group(1)), float(m.group(2))) for m in inline]
        if not label:
            notes.append("parse_error: an <event> tag names no event")
            continue
        if not spans:
            notes.append(f"parse_error: event {label!r} has no time range")
            continue
        if class_label(label, None, notes) is not None:
            events += clip_events(label, spans, "audio-visual", clip_start_s, duration_s, notes)
    return TaskResult(task=task, text=text, events=tuple(events), notes=tuple(notes))


def parse_avvp(text: str, *, clip_start_s: float = 0.0, duration_s: float | None = None,
               classes: Sequence[str] | None = None, task: str = "avvp") -> TaskResult:
    """``<audio_event>Speech,(0 3),(5 10)</audio_event>`` / ``<visual_event>`` -> one event per interval.

    A block may hold several labels, each followed by its intervals. With ``classes``
    a label must be one of them (compared case-, space- and underscore-insensitively,
    returned in their spelling); without, it must at least hold no markup. A label
    that is not a class, an interval with no label before it and a reversed interval
    give a ``parse_error`` note and no event; ``duration_s`` cuts intervals at the
    clip's end as :func:`parse_ave` does.
    """
    index = None if classes is None else {normalise_label(c): c for c in classes}
    events, notes = [], []
    blocks = list(_AVVP_BLOCK.finditer(readable(text)))
    if not blocks:
        notes.append("parse_error: no '<audio_event>' or '<visual_event>' block in the text")
    for block in blocks:
        modality, content = block.group(1).lower(), block.group(2)
        label, named, cursor = None, False, 0
        for interval in _AVVP_INTERVAL.finditer(content):
            written = clean_label(content[cursor : interval.start()])
            cursor = interval.end()
            if written:
                label, named = class_label(written, index, notes), True
            elif not named:
                notes.append(f"parse_error: interval {interval.group(0)!r} of a {modality} block has no label; "
                             "dropped")
            if label is not None:
                start, end = float(interval.group(1)), float(interval.group(2))
                events += clip_events(label, [(start, end)], modality, clip_start_s, duration_s, notes)
        if not named and not _AVVP_INTERVAL.search(content):
            article = "an" if modality == "audio" else "a"
            notes.append(f"parse_error: {article} {modality} block holds no 'Label,(start end)'")
    return TaskResult(task=task, text=text, events=tuple(events), notes=tuple(notes))


def parse_answer(text: str, *, task: str = "avqa") -> TaskResult:
    """``... <answer> X </answer>`` -> answer X (the last answer tag; the closing tag may be cut off).
    No answer gives a ``parse_error`` note."""
    found = [clean_label(_ANSWER_MARKUP.sub(" ", m.group(1))) for m in _ANSWER.finditer(readable(text))]
    found = [a for a in found if a]
    notes = () if found else ("parse_error: no '<answer> X </answer>' in the text",)
    return TaskResult(task=task, text=text, answer=found[-1] if found else None, notes=notes)


def parse_text(text: str, *, task: str = "ask") -> TaskResult:
    """Free text: the answer is the text without decoder pieces and ``<answer>`` markup, trimmed."""
    answer = " ".join(_ANSWER_MARKUP.sub(" ", readable(text)).split())
    notes = () if answer else ("parse_error: the model wrote no text",)
    return TaskResult(task=task, text=text, answer=answer or None, notes=notes)


def box_to_source(
    box: Sequence[float], source_width: int, source_height: int, *, grid: int = MODEL_IMAGE_SIZE
) -> tuple[float, float, float, float]:
    """Map a box from the ``grid`` x ``grid`` model image to source pixels.

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
