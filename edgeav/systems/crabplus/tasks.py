"""Crab+'s tasks: one table entry per task (the user turn's parts, the instruction, the audio cut,
the output and its parser, the token limit), the audio cuts as pure numpy, and the parsers that
turn what the thinker wrote into a :class:`~edgeav.tasks.TaskResult` or a SAM2 :class:`MaskPrompt`.

What was read in the authors' code (GeWu-Lab/Crab_Plus @ 7ddc56d) and settles the choices below:

- Parts and wording: ``OmniTestDataset`` in ``dataset/qwen2_5_omni/omni_dataset.py`` (the strings
  are :mod:`edgeav.systems.crabplus.prompts`). Every video+audio task leads with "This is a video
  and an audio:" (emotion too, with 4 frames); ARIG, S4, MS3 and Ref-AVS read one 224x224 image.
- Audio cuts: ``process_audio_by_task`` in ``dataset/qwen_omni_utils/v2_5/audio_process.py``
  (see :func:`cut_audio`).
- Segmentation answers: ``extract_coordinates`` in ``seg/scripts/inference_3.py`` (S4, MS3) and
  ``seg/scripts/inference_ref_3.py`` (Ref-AVS) (see :func:`mask_prompt`).
- The reference answers the test set carries: emotion ``<answer>{label}</answer>.``, ARIG
  ``The sounding object is {obj}. Its coordinates are <obj>({x1},{y1})({x2},{y2})</obj>.``, S4/MS3
  ``The object making the sound in the video is {obj}.``. The training targets (``label_content``
  of the AVUIE_2 annotations) are not in the repository. Read leniently instead: AVE as Crab's
  ``<event>..</event> <range>s,e</range>`` or the ``<event>label, (s e)(s e)</event>`` summary that
  closes AVUIE_2's temporal targets (reported for its UnAV split, which shares AVE's instruction),
  AVVP as Crab's ``<audio_event>``/``<visual_event>`` blocks, AVQA as ``<answer>..</answer>``.
  Times are units of the clip (seconds of a 10-s clip), the end exclusive, as in Crab.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeav.errors import OptionError
from edgeav.systems.crabplus import prompts
from edgeav.tasks import (
    AVVP_CLASSES, MODEL_IMAGE_SIZE, NUMBER, Event, TaskResult, box_to_source, class_label, clean_label, clip_events,
    normalise_label, parse_answer, parse_ave, parse_avvp, parse_text, readable,
)

MAX_NEW_TOKENS = 512  # the authors' inference_omni.py, every task
OUTPUT_KINDS = ("ave", "avvp", "answer", "box", "mask", "text")
# How a task's audio is cut (cut_audio): "units" T one-unit segments concatenated; "avqa" ten 2-unit
# windows of a 60-unit clip; "head" the first T seconds; "frame_unit" the one unit of the segmented frame.
AUDIO_PLANS = ("units", "avqa", "head", "frame_unit")
PART_KINDS = ("text", "video", "image", "audio")
AVQA_UNITS, AVQA_WINDOW_STEP = 60, 6
# Qwen's control tokens (<|im_start|>, <|AUDIO|>, ...): user text must not smuggle them into a prompt.
_CONTROL_TOKEN = re.compile(r"<\|[^|<>]*\|>")

Part = tuple[str, str | int | None]  # ("text", words), ("video", frames), ("image" | "audio", None)


@dataclass(frozen=True)
class MaskPrompt:
    """What SAM2 is prompted with for one frame, in pixels of the 224x224 model image.

    Attributes:
        box: ``(x1, y1, x2, y2)``, or None (S4/MS3 without a box need three points).
        points: the ``(x, y)`` foreground points, in the order written (at most three).
    """

    box: tuple[int, int, int, int] | None
    points: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CrabPlusTask:
    """One Crab+ task: the user turn it builds, how it cuts the audio, what it answers and how that is read.

    Attributes:
        name: the task's option value (``--task``), Crab's name where the task is the same.
        description: one line for help texts.
        lead: the text part before the media ("This is a video and an audio:").
        media: the media parts in prompt order: ("video", "audio") or ("image", "audio").
        video_frames: frames of the video part (10; 4 for emotion); 0 for image tasks.
        template: the instruction, the last part; ``{question}`` / ``{expression}`` are filled in.
        requires: the option the instruction needs (``question``, ``expression``) or None.
        audio_plan: one of ``AUDIO_PLANS`` (:func:`cut_audio`).
        audio_units: T, the units the clip is cut into ("head": seconds).
        output: which parser reads the answer, one of ``OUTPUT_KINDS``.
        max_new_tokens: generation limit.
        classes: the labels the task's answers use (AVVP: LLP's 25); empty when there is no list.
    """

    name: str
    description: str
    lead: str
    media: tuple[str, ...]
    video_frames: int
    template: str
    requires: str | None
    audio_plan: str
    audio_units: int
    output: str
    max_new_tokens: int = MAX_NEW_TOKENS
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.audio_plan not in AUDIO_PLANS or self.output not in OUTPUT_KINDS or self.audio_units < 1:
            raise ValueError(f"task {self.name!r}: unknown audio plan or output kind")
        if any(kind not in PART_KINDS for kind in self.media) or ("video" in self.media) != (self.video_frames > 0):
            raise ValueError(f"task {self.name!r}: media {self.media} do not match {self.video_frames} video frames")

    @property
    def reads_image(self) -> bool:
        """The task reads one still frame (ARIG, S4, MS3, Ref-AVS)."""
        return "image" in self.media

    @property
    def cuts_at_frame(self) -> bool:
        """The audio is the one unit of the segmented frame: :func:`cut_audio` takes its ``frame_index``."""
        return self.audio_plan == "frame_unit"

    def check_options(self, *, question: str | None = None, expression: str | None = None) -> None:
        """Raise :class:`OptionError` when the required option is missing, an unused one is given or
        user text holds one of Qwen's control tokens."""
        for option, value in (("question", question), ("expression", expression)):
            if value is not None and _CONTROL_TOKEN.search(value):
                raise OptionError(f"--{option} contains {_CONTROL_TOKEN.search(value).group(0)}, one of the "
                                  "model's control tokens; rephrase it")
            if option == self.requires and (value is None or not value.strip()):
                article = "an" if option[0] in "aeiou" else "a"
                raise OptionError(f'task {self.name!r} needs {article} {option}: pass --{option} "..."')
            if option != self.requires and value is not None:
                users = ", ".join(t.name for t in TASKS.values() if t.requires == option)
                raise OptionError(f"task {self.name!r} takes no --{option}; it is for {users}")

    def instruction(self, *, question: str | None = None, expression: str | None = None) -> str:
        """The instruction part, as the authors built it (Ref-AVS lower-cases the expression)."""
        self.check_options(question=question, expression=expression)
        values = {}
        if question is not None:
            values["question"] = question.strip()
        if expression is not None:
            values["expression"] = expression.strip().lower()
        return self.template.format(**values)

    def parts(self, *, question: str | None = None, expression: str | None = None) -> tuple[Part, ...]:
        """The user turn's parts in order: ``("text", str)``, ``("video", frames)``, ``("image", None)``,
        ``("audio", None)``. The chat template joins them with nothing between."""
        media: list[Part] = [("video", self.video_frames) if kind == "video" else (kind, None) for kind in self.media]
        return (("text", self.lead), *media, ("text", self.instruction(question=question, expression=expression)))

    def cut_audio(self, waveform: np.ndarray, sample_rate: int, *, frame_index: int | None = None) -> np.ndarray:
        """This task's audio cut: :func:`cut_audio`."""
        return cut_audio(self, waveform, sample_rate, frame_index=frame_index)

    def parse(self, text: str, *, clip_start_s: float = 0.0, duration_s: float | None = None,
              source_size: tuple[int, int] | None = None, classes: Sequence[str] | None = None) -> TaskResult:
        """Read the generated ``text``; never raises, keeps ``text`` as is.

        Event times are the model's units of the clip (seconds for the 10-s clips it was trained on),
        shifted by ``clip_start_s`` and cut at ``duration_s``; ``source_size`` (width, height) maps
        boxes from the 224 grid to source pixels; ``classes`` (AVVP) keeps only those labels.
        What cannot be read is in ``notes`` as ``parse_error: ...``.
        """
        if self.output == "ave":
            return parse_ave_events(text, clip_start_s=clip_start_s, duration_s=duration_s, task=self.name)
        if self.output == "avvp":
            return parse_avvp_events(text, clip_start_s=clip_start_s, duration_s=duration_s, classes=classes,
                                     task=self.name)
        if self.output == "answer":
            return parse_short_answer(text, task=self.name)
        if self.output == "box":
            return parse_arig_box(text, source_size=source_size, task=self.name)
        if self.output == "mask":
            return parse_mask_answer(text, task=self.name, source_size=source_size)
        return parse_text(text, task=self.name)


_VA = ("video", "audio")
_IA = ("image", "audio")

TASKS: dict[str, CrabPlusTask] = {
    task.name: task
    for task in (
        CrabPlusTask(
            name="ave", description="audio-visual event localisation: the event and its time range in a 10-s clip",
            lead=prompts.VIDEO_AND_AUDIO, media=_VA, video_frames=10, template=prompts.AVE, requires=None,
            audio_plan="units", audio_units=10, output="ave",
        ),
        CrabPlusTask(
            name="avvp", description="audio-visual video parsing: audio and visual events and their intervals",
            lead=prompts.VIDEO_AND_AUDIO, media=_VA, video_frames=10, template=prompts.AVVP, requires=None,
            audio_plan="units", audio_units=10, output="avvp", classes=AVVP_CLASSES,
        ),
        CrabPlusTask(
            name="avqa", description="audio-visual question answering (MUSIC-AVQA, 60-s clips)",
            lead=prompts.VIDEO_AND_AUDIO, media=_VA, video_frames=10, template=prompts.AVQA, requires="question",
            audio_plan="avqa", audio_units=AVQA_UNITS, output="answer",
        ),
        CrabPlusTask(
            name="emotion", description="the speaker's emotion (MELD, CREMA-D, MAFW, DFEW): 4 frames, the first 4 s",
            lead=prompts.VIDEO_AND_AUDIO, media=_VA, video_frames=4, template=prompts.EMOTION, requires=None,
            audio_plan="head", audio_units=4, output="answer",
        ),
        CrabPlusTask(
            name="arig", description="audio-referred image grounding: the sounding object's name and box",
            lead=prompts.IMAGE_AND_AUDIO, media=_IA, video_frames=0, template=prompts.ARIG, requires=None,
            audio_plan="units", audio_units=5, output="box",
        ),
        CrabPlusTask(
            name="s4", description="single sounding source segmentation (AVSBench S4, 5-s clips)",
            lead=prompts.IMAGE_AND_AUDIO, media=_IA, video_frames=0, template=prompts.SEGMENT, requires=None,
            audio_plan="frame_unit", audio_units=5, output="mask",
        ),
        CrabPlusTask(
            name="ms3", description="multiple sounding sources segmentation (AVSBench MS3, 5-s clips)",
            lead=prompts.IMAGE_AND_AUDIO, media=_IA, video_frames=0, template=prompts.SEGMENT, requires=None,
            audio_plan="frame_unit", audio_units=5, output="mask",
        ),
        CrabPlusTask(
            name="refavs", description="referring audio-visual segmentation: the object an expression names, if any",
            lead=prompts.IMAGE_AND_AUDIO, media=_IA, video_frames=0, template=prompts.REF_AVS,
            requires="expression", audio_plan="frame_unit", audio_units=10, output="mask",
        ),
        # edgeav's own task, not the paper's: the user's question verbatim over AVE's inputs (the
        # ten-unit cut keeps the whole clip, as the authors' open-ended captioning task does).
        CrabPlusTask(
            name="ask", description="a free-form question about the clip, answered in free text",
            lead=prompts.VIDEO_AND_AUDIO, media=_VA, video_frames=10, template=prompts.ASK, requires="question",
            audio_plan="units", audio_units=10, output="text",
        ),
    )
}


def get_task(name: str) -> CrabPlusTask:
    """The task called ``name``; an unknown name raises :class:`OptionError` with the choices."""
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name).lower(), TASKS, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}.{hint}")


# --------------------------------------------------------------------------- audio cuts


def cut_audio(task: CrabPlusTask | str, waveform: np.ndarray, sample_rate: int, *,
              frame_index: int | None = None) -> np.ndarray:
    """The audio ``task`` feeds the Whisper front end, cut from a clip's whole mono ``waveform``: float32.

    As the authors' loader does, in this order:

    1. Audio shorter than one second (``sample_rate`` samples) gets zeros appended up to it.
    2. With ``n`` samples, T = ``audio_units`` and ``u = n // T`` samples per unit (their
       ``int(n / T)``; the clip is assumed T units long, whatever its real length):

       - units (AVE, AVVP, ARIG, ask): the T segments ``[i*u, (i+1)*u)`` concatenated, i.e. the
         first ``T*u`` samples (the last ``n - T*u < T`` samples are dropped).
       - avqa: ten windows ``[t - 0.5, t + 1.5)`` units for t = 0, 6, ..., 54 of a 60-unit clip,
         window bounds ``int(x * u)`` (floor); the first window starts before 0 and gets
         ``2u - floor(1.5u)`` zeros in front, every window is then ``2u`` long: ``20u`` samples.
       - head (emotion): the first T seconds at ``sample_rate``, zeros appended when shorter.
       - frame_unit (S4, MS3: T = 5; Ref-AVS: T = 10): the one unit ``[i*u, (i+1)*u)`` of frame
         ``i = frame_index`` (None: 0, the authors' default).

    Raises :class:`OptionError` for a waveform that is not 1-D, a sample rate below 1 or a frame
    index outside 0..T-1 (the authors' loader would feed silence).
    """
    spec = task if isinstance(task, CrabPlusTask) else get_task(task)
    audio = np.asarray(waveform)
    if audio.ndim != 1:
        raise OptionError(f"audio for task {spec.name!r} must be mono samples (1-D); got shape {audio.shape}")
    if sample_rate < 1:
        raise OptionError(f"audio sample rate {sample_rate} is not a rate; expected samples per second, e.g. 16000")
    audio = audio.astype(np.float32, copy=False)
    if audio.size < sample_rate:
        audio = np.concatenate([audio, np.zeros(sample_rate - audio.size, np.float32)])
    units = spec.audio_units
    if spec.audio_plan == "head":
        head = np.zeros(units * sample_rate, np.float32)
        kept = min(audio.size, head.size)
        head[:kept] = audio[:kept]
        return head
    unit = audio.size // units
    if spec.audio_plan == "units":
        return audio[: units * unit].copy()
    if spec.audio_plan == "frame_unit":
        index = 0 if frame_index is None else int(frame_index)
        if not 0 <= index < units:
            raise OptionError(f"frame {index} is outside task {spec.name!r}'s clip of {units} units; "
                              f"expected 0..{units - 1}")
        return audio[index * unit : (index + 1) * unit].copy()
    windows = []
    for t in range(0, AVQA_UNITS, AVQA_WINDOW_STEP):
        # (t - 0.5) * u and (t + 1.5) * u, floored, in integers: (2t - 1) u / 2 and (2t + 3) u / 2.
        start, end = max(0, ((2 * t - 1) * unit) // 2), ((2 * t + 3) * unit) // 2
        piece = audio[start:end]
        windows.append(np.concatenate([np.zeros(2 * unit - piece.size, np.float32), piece]) if t == 0 else piece)
    return np.concatenate(windows)


# --------------------------------------------------------------------------- parsers

_EVENT_TAG = re.compile(r"<\s*event\s*>", re.I)
# The AVE test set's reference line, "event:Church bell start_time:0 end_time:10".
_AVE_FIELDS = re.compile(rf"event\s*:\s*([^\n<]+?)\s+start_time\s*:\s*({NUMBER})\s+end_time\s*:\s*({NUMBER})", re.I)
_AVVP_BLOCK_TAG = re.compile(r"<\s*(?:audio|visual)(?:_event)?\s*>", re.I)
_ANSWER_TAG = re.compile(r"<\s*/?\s*answer", re.I)
SHORT_ANSWER_WORDS = 4
# The segmentation scripts' coordinates: [x1,y1,x2,y2] boxes and [x,y] points, integers; spaces are read too.
_BRACKETS = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*(?:,\s*(\d+)\s*,\s*(\d+)\s*)?\]")
_BOX_FORMS = (
    re.compile(rf"\[\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*,\s*({NUMBER})\s*\]"),
    # The ARIG test set's <obj>(x1,y1)(x2,y2)</obj>, and two corners written as pairs.
    re.compile(rf"\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)\s*,?\s*(?:and\s*)?\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)", re.I),
    re.compile(rf"top\s*left\s*corner\s*is\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\).*?"
               rf"bottom\s*right\s*corner\s*is\s*\(\s*({NUMBER})\s*,\s*({NUMBER})\s*\)", re.I | re.S),
)
_OBJECT_NAME = (
    # "The object making the sound in the video is guitar." (S4/MS3 reference answers)
    re.compile(r"object\s+(?:making|producing|that\s+(?:makes|produces))\s+the\s+sound[^.\n<\[]*?\bis\s+"
               r"([^.,\n<\[(]+)", re.I),
    # "The sounding object is dog." (ARIG reference answers)
    re.compile(r"sounding\s+object\s+is\s+([^.,\n<\[(]+)", re.I),
    re.compile(r"object(?:'s)?\s+name\s+is\s+([^.,\n<\[(]+)", re.I),
)
_REF_ANSWER = re.compile(r"<\s*answer\s*>\s*(true|false)\s*<\s*/\s*answer\s*>", re.I)


def parse_ave_events(text: str, *, clip_start_s: float = 0.0, duration_s: float | None = None,
                     task: str = "ave") -> TaskResult:
    """AVE: :func:`edgeav.tasks.parse_ave` (``<event> X </event> ... <range> s,e </range>`` and
    ``<event>X, (s e)(s e)</event>``); without any ``<event>`` tag, the test set's own reference
    form ``event:X start_time:s end_time:e`` is read."""
    result = parse_ave(text, clip_start_s=clip_start_s, duration_s=duration_s, task=task)
    body = readable(text)
    fields = _AVE_FIELDS.findall(body)
    if _EVENT_TAG.search(body) or not fields:
        return result
    events, notes = [], []
    for written, start, end in fields:
        label = class_label(clean_label(written), None, notes)
        if label:
            events += clip_events(label, [(float(start), float(end))], "audio-visual", clip_start_s, duration_s,
                                  notes)
    return TaskResult(task=task, text=text, events=tuple(events), notes=tuple(notes))


def parse_avvp_events(text: str, *, clip_start_s: float = 0.0, duration_s: float | None = None,
                      classes: Sequence[str] | None = None, task: str = "avvp") -> TaskResult:
    """AVVP: :func:`edgeav.tasks.parse_avvp` (``<audio_event>Speech,(0 3),(5 10)</audio_event>``,
    ``<visual_event>..``). A text with no audio/visual block but ``<event>`` tags gives those as
    audio-visual events (with a note), kept only when their label is one of ``classes``."""
    result = parse_avvp(text, clip_start_s=clip_start_s, duration_s=duration_s, classes=classes, task=task)
    body = readable(text)
    if _AVVP_BLOCK_TAG.search(body) or not _EVENT_TAG.search(body):
        return result
    read = parse_ave(text, clip_start_s=clip_start_s, duration_s=duration_s, task=task)
    notes = ["no '<audio_event>' or '<visual_event>' block: <event> tags read as audio-visual events",
             *read.notes]
    index = None if classes is None else {normalise_label(c): c for c in classes}
    events = []
    for event in read.events:
        label = class_label(event.label, index, notes)
        if label is not None:
            events.append(Event(label, event.start_s, event.end_s, event.modality))
    return TaskResult(task=task, text=text, events=tuple(events), notes=tuple(dict.fromkeys(notes)))


def parse_short_answer(text: str, *, task: str = "avqa") -> TaskResult:
    """AVQA and emotion: the last ``<answer> X </answer>`` (:func:`edgeav.tasks.parse_answer`). A text
    with no answer tag that is only a few words ("neutral", "two") is taken whole, with a note."""
    result = parse_answer(text, task=task)
    body = readable(text)
    if result.answer is not None or _ANSWER_TAG.search(body):
        return result
    words = clean_label(body)
    if words and len(words.split()) <= SHORT_ANSWER_WORDS and "<" not in words and ">" not in words:
        return TaskResult(task=task, text=text, answer=words,
                          notes=("no '<answer> X </answer>' tag: the whole short text is the answer",))
    return result


def object_name(text: str) -> str | None:
    """The object an ARIG or segmentation answer names ("The sounding object is dog." -> "dog"), or None."""
    body = readable(text)
    for pattern in _OBJECT_NAME:
        found = pattern.search(body)
        if found and clean_label(found.group(1)):
            return clean_label(found.group(1))
    return None


def parse_arig_box(text: str, *, source_size: tuple[int, int] | None = None, task: str = "arig") -> TaskResult:
    """ARIG: the object's name and the first box written, as ``[x1,y1,x2,y2]``, ``(x1,y1)(x2,y2)``
    (the test set's ``<obj>`` form) or "top left corner is (x1,y1) ... bottom right corner is (x2,y2)".

    Coordinates are pixels of the 224x224 model image; with ``source_size=(width, height)`` the box
    comes back in source pixels. A box whose second corner is not right of and below the first
    is no box (a ``parse_error`` note).
    """
    body = readable(text)
    found = [m for m in (form.search(body) for form in _BOX_FORMS) if m is not None]
    box, notes = None, []
    if not found:
        notes.append("parse_error: no box ('[x1,y1,x2,y2]' or '(x1,y1)(x2,y2)') in the text")
    else:
        x1, y1, x2, y2 = (float(v) for v in min(found, key=lambda m: m.start()).groups())
        if x2 <= x1 or y2 <= y1:
            notes.append(f"parse_error: box ({x1:g},{y1:g})-({x2:g},{y2:g}) has its second corner not right of and "
                         "below its first; no box")
        else:
            box = (x1, y1, x2, y2) if source_size is None else box_to_source((x1, y1, x2, y2), *source_size)
    return TaskResult(task=task, text=text, box=box, object_label=object_name(text), notes=tuple(notes))


def _coordinates(body: str, notes: list[str]) -> tuple[list[tuple[int, ...]], list[tuple[int, int]]]:
    """Every ``[x1,y1,x2,y2]`` box and ``[x,y]`` point of ``body``, in order."""
    boxes, points = [], []
    for match in _BRACKETS.finditer(body):
        values = tuple(int(v) for v in match.groups() if v is not None)
        (boxes if len(values) == 4 else points).append(values)
        if re.search(r"\s", match.group(0)) and not any(n.startswith("coordinates written") for n in notes):
            notes.append("coordinates written with spaces: read, though the authors' scorer reads only '[x,y]'")
    return boxes, points


def _inside_grid(box: tuple[int, ...] | None, points: Sequence[tuple[int, int]]) -> bool:
    """The authors' validate_coordinates: inside [0, 224), and a box's corners in order."""
    grid = MODEL_IMAGE_SIZE
    if box is not None and not (0 <= box[0] < box[2] < grid and 0 <= box[1] < box[3] < grid):
        return False
    return all(0 <= x < grid and 0 <= y < grid for x, y in points)


def _read_mask_answer(text: str, task: str) -> tuple[MaskPrompt | None, str | None, list[str]]:
    """The SAM2 prompt (or None), Ref-AVS's true/false and the notes, by the authors' scripts' rules."""
    body = readable(text.split("</s>", 1)[0])  # the scripts read up to the first </s>
    notes: list[str] = []
    verdict = None
    if task == "refavs":
        verdicts = [m.lower() for m in _REF_ANSWER.findall(body)]
        if "false" in verdicts:  # their check for false comes first
            notes.append("the model answered false: the object is absent, so the mask is empty")
            return None, "false", notes
        if "true" not in verdicts:
            notes.append("parse_error: no '<answer>true</answer>' or '<answer>false</answer>' in the text; no mask")
            return None, None, notes
        verdict = "true"
    boxes, points = _coordinates(body, notes)
    if not boxes and not points:
        notes.append("parse_error: no '[x1,y1,x2,y2]' box or '[x,y]' point in the text; no mask")
        return None, verdict, notes
    box = tuple(boxes[0]) if boxes else None
    if task == "refavs":
        use_points = points[-3:]
    elif box is not None and points:
        use_points = points[-3:]
    elif box is None and len(points) >= 3:
        use_points = points[-3:]
    else:
        what = "a box but no point" if box is not None else f"no box and {len(points)} point(s), fewer than 3"
        notes.append(f"parse_error: the text gives {what}; no mask")
        return None, verdict, notes
    if not _inside_grid(box, use_points):
        notes.append(f"parse_error: box {box} / points {use_points} fall outside the 224x224 image or the box's "
                     "corners are out of order; no mask")
        return None, verdict, notes
    return MaskPrompt(box=box, points=tuple(use_points)), verdict, notes


def mask_prompt(text: str, task: CrabPlusTask | str) -> MaskPrompt | None:
    """The box and points SAM2 is prompted with for an S4, MS3 or Ref-AVS answer, or None (no SAM2 run).

    The rules of the authors' scripts: the first ``[x1,y1,x2,y2]`` is the box, the ``[x,y]`` are
    points. S4/MS3: a box with the last three (or fewer, at least one) points, or, with no box, the
    last three of at least three points. Ref-AVS: only after ``<answer>true</answer>`` (a
    ``false`` anywhere wins), the box and/or the last three points, either may be missing.
    Coordinates outside the 224 grid, or a box's corners out of order, give None.
    For Ref-AVS, :func:`parse_mask_answer`'s ``answer == "false"`` means the object is absent (the
    authors score an empty mask); otherwise None means the answer could not be read.
    """
    name = task.name if isinstance(task, CrabPlusTask) else get_task(task).name
    return _read_mask_answer(text, name)[0]


def parse_mask_answer(text: str, *, task: str, source_size: tuple[int, int] | None = None) -> TaskResult:
    """S4, MS3, Ref-AVS: the object named, the prompt box (in source pixels given ``source_size``),
    Ref-AVS's ``true``/``false`` as ``answer``, and notes for what gives no mask."""
    prompt, verdict, notes = _read_mask_answer(text, task)
    box = None
    if prompt is not None and prompt.box is not None:
        box = tuple(float(v) for v in prompt.box)
        if source_size is not None:
            box = box_to_source(box, *source_size)
    return TaskResult(task=task, text=text, box=box, answer=verdict, object_label=object_name(text),
                      notes=tuple(notes))


__all__ = [
    "AUDIO_PLANS", "CrabPlusTask", "MAX_NEW_TOKENS", "MaskPrompt", "OUTPUT_KINDS", "TASKS", "cut_audio",
    "get_task", "mask_prompt", "object_name", "parse_arig_box", "parse_avvp_events", "parse_ave_events",
    "parse_mask_answer", "parse_short_answer",
]
