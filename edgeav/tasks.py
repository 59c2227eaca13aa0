"""What every system's tasks share: the datasets' label sets, the typed pieces a parser
returns (:class:`Event`, :class:`TaskResult`) and how labels compare.

Each system's own task table, prompts and parsers live in ``edgeav/systems/NAME/tasks.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

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
