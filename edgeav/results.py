"""What one run produced: :class:`Result` and its :class:`Mask` objects.

``Result.to_dict()`` is the JSON the command line prints; ``Result.plot()`` is the
source frame with the mask painted (AVSS: AVSBench's class palette and a legend of
the classes present) and the ARIG box drawn, as a uint8 array at the source's size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeav.errors import OptionError
from edgeav.outputs import atomic_path
from edgeav.tasks import Event

MASK_COLOR = (255, 40, 40)  # binary masks
BOX_COLOR = (255, 220, 0)
DETECTION_COLOR = (0, 200, 255)  # every detector box; the answer's box is BOX_COLOR
MASK_ALPHA = 0.5


def avss_palette(n_classes: int = 71) -> np.ndarray:
    """AVSBench's colour of each class id, uint8 [n_classes, 3]: the bits of the id dealt out to
    R, G, B in turn from the high bit down (id 0, the background, is black)."""
    palette = np.zeros((n_classes, 3), np.uint8)
    for class_id in range(n_classes):
        label, bit = class_id, 7
        while label:
            for channel in range(3):
                palette[class_id, channel] |= ((label >> channel) & 1) << bit
            label >>= 3
            bit -= 1
    return palette


@dataclass
class Mask:
    """A mask at the source's size: bool [H, W] (binary tasks) or uint8 class ids (AVSS)."""

    time_s: float
    mask: np.ndarray
    text: str
    path: str | None = None

    def overlay(self, frame: np.ndarray, color: tuple[int, int, int] = MASK_COLOR,
                alpha: float = MASK_ALPHA) -> np.ndarray:
        """``frame`` (uint8 [H, W, 3] at the source's size) with the mask painted over it: a binary
        mask in ``color``, AVSS class ids in :func:`avss_palette` colours (the background left as is)."""
        if frame.shape[:2] != self.mask.shape:
            raise OptionError(f"the frame is {frame.shape[1]}x{frame.shape[0]}, the mask "
                              f"{self.mask.shape[1]}x{self.mask.shape[0]}; pass the source frame of {self.time_s:g} s")
        painted = frame.astype(np.float32)
        if self.mask.dtype == bool:
            where = self.mask
            colors = np.asarray(color, np.float32)
        else:
            where = self.mask > 0
            colors = avss_palette(int(self.mask.max()) + 1)[self.mask[where]].astype(np.float32)
        painted[where] = (1 - alpha) * painted[where] + alpha * colors
        return painted.round().astype(np.uint8)

    def class_ids(self) -> list[int]:
        """AVSS: the class ids the mask shows, background left out; binary: [1] when any pixel is set."""
        if self.mask.dtype == bool:
            return [1] if self.mask.any() else []
        return [int(c) for c in np.unique(self.mask) if c]

    def save_png(self, path: Path) -> None:
        from PIL import Image

        array = self.mask.astype(np.uint8) * 255 if self.mask.dtype == bool else self.mask
        with atomic_path(path) as temporary:  # a reader never sees half a PNG
            Image.fromarray(array).save(temporary)
        self.path = str(path)


@dataclass(frozen=True)
class Detection:
    """A box a detector found: ``box`` (x1, y1, x2, y2) in source pixels, its ``score`` and the ``label``
    (the phrase it was matched to)."""

    box: tuple[float, float, float, float]
    score: float
    label: str
    time_s: float | None = None  # the second whose frame it was found in (None: the result's one frame)

    def to_dict(self) -> dict:
        found = {"box": [round(v, 2) for v in self.box], "score": round(self.score, 4), "label": self.label}
        return found if self.time_s is None else {"time_s": self.time_s, **found}


@dataclass
class Description:
    """What one describer said about one second (OpenAVS): ``describer`` names the model and its prompt."""

    time_s: float
    describer: str
    text: str

    def to_dict(self) -> dict:
        return {"time_s": self.time_s, "describer": self.describer, "text": self.text}


@dataclass
class Result:
    """What one run produced; ``to_dict`` is the command line's JSON, ``plot`` its ``--overlay`` picture.

    ``model`` and ``source`` say what ran on what (set by the runtime). ``frames`` holds the
    source frames (uint8 [H, W, 3], source size) of the seconds a box or mask is of, keyed by
    second, so ``plot`` can draw on them; ``classes`` names AVSS class ids for the legend.
    """

    task: str
    text: str
    events: list[Event] = field(default_factory=list)
    box: list[float] | None = None
    answer: str | None = None
    object_label: str | None = None
    masks: list[Mask] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)  # every box a detector found (u-LLaVA's ground)
    descriptions: list[Description] = field(default_factory=list)  # what OpenAVS's describers said, per second
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_size: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)  # what the caller should know (clip length, missing masks)
    model: str | None = None
    source: str | None = None
    frames: dict[float, np.ndarray] = field(default_factory=dict, repr=False)
    classes: tuple[str, ...] = field(default=(), repr=False)

    def save_masks(self, folder: str | Path) -> None:
        """Write each mask as ``mask_{time}s.png`` under ``folder`` (``mask_{time}s_{k}.png`` when a frame has
        several, as when u-LLaVA writes several ``[SEG]``)."""
        folder = Path(folder)
        per_time = Counter(mask.time_s for mask in self.masks)
        seen: Counter = Counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for mask in self.masks:
                suffix = f"_{seen[mask.time_s]}" if per_time[mask.time_s] > 1 else ""
                seen[mask.time_s] += 1
                mask.save_png(folder / f"mask_{mask.time_s:06.2f}s{suffix}.png")
        except OSError as e:
            raise OptionError(f"{folder}: cannot write masks ({e.strerror or e}); pick a writable --out") from None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "source": self.source,
            "task": self.task,
            "text": self.text,
            "events": [e.to_dict() for e in self.events],
            "box": self.box,
            "answer": self.answer,
            "object_label": self.object_label,
            "masks": [{"time_s": m.time_s, "path": m.path, "text": m.text} for m in self.masks],
            "detections": [d.to_dict() for d in self.detections],
            "descriptions": [d.to_dict() for d in self.descriptions],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "notes": self.notes,
        }

    # -- pictures -------------------------------------------------------------

    def plot(self, time_s: float | None = None) -> np.ndarray:
        """The source frame with the masks painted and the box drawn, uint8 [H, W, 3] at the source's size.

        A result with several frames (a mask task over several seconds) gives them side by side in
        time order; ``time_s`` picks one.
        """
        if not self.frames:
            raise OptionError(f"task {self.task!r}: this result keeps no source frame to draw on; arig and the "
                              "mask tasks keep theirs (Runtime.run)")
        if time_s is not None and float(time_s) not in self.frames:
            raise OptionError(f"no frame at {time_s:g} s in this result; it has "
                              f"{', '.join(f'{t:g}' for t in sorted(self.frames))} s")
        times = sorted(self.frames) if time_s is None else [float(time_s)]
        return np.concatenate([self._drawn(t) for t in times], axis=1)

    def _drawn(self, time_s: float) -> np.ndarray:
        from PIL import Image, ImageDraw

        frame = self.frames[time_s]
        masks = [m for m in self.masks if m.time_s == time_s]
        for mask in masks:
            frame = mask.overlay(frame)
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        font = _font(max(12, min(image.size) // 30))
        width = max(2, round(max(image.size) / 200))
        for detection in self.detections:
            if detection.time_s is not None and detection.time_s != time_s:
                continue
            draw.rectangle(list(detection.box), outline=DETECTION_COLOR, width=max(1, width // 2))
            draw.text((detection.box[0] + width, detection.box[3] - width - font.getbbox("Ag")[3]), detection.label,
                      fill=DETECTION_COLOR, font=font)
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOR, width=width)
            if self.object_label:
                draw.text((x1 + width, y1 + width), self.object_label, fill=BOX_COLOR, font=font)
        ids = sorted({c for m in masks if m.mask.dtype != bool for c in m.class_ids()})
        if ids:
            _legend(draw, ids, self.classes, font)
        return np.asarray(image)

    def save_overlay(self, path: str | Path) -> list[Path]:
        """Write :meth:`plot` as PNG: to ``path`` when it names a ``.png`` file, else one
        ``overlay_{time}s.png`` per frame into the folder ``path``. Returns the files written."""
        from PIL import Image

        path = Path(path)
        if path.suffix.lower() == ".png":
            pictures = {path: self.plot()}
        else:
            pictures = {path / f"overlay_{t:06.2f}s.png": self.plot(t) for t in sorted(self.frames)}
        try:
            if path.suffix.lower() != ".png":
                path.mkdir(parents=True, exist_ok=True)
            for target, picture in pictures.items():
                with atomic_path(target) as temporary:  # a reader never sees half a PNG
                    Image.fromarray(picture).save(temporary, format="PNG")
        except OSError as e:
            raise OptionError(f"{path}: cannot write the overlay ({e.strerror or e}); pick a writable --overlay") \
                from None
        return list(pictures)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _legend(draw, class_ids: list[int], names: tuple[str, ...], font) -> None:
    """A box in the top-left corner: a swatch of each class's palette colour and its name."""
    palette = avss_palette(max(class_ids) + 1)
    line = max(font.getbbox("Ag")[3], 10) + 4
    labels = [names[c] if c < len(names) else f"class {c}" for c in class_ids]
    width = line + 8 + max(draw.textlength(label, font=font) for label in labels) + 8
    draw.rectangle([0, 0, width, line * len(labels) + 6], fill=(0, 0, 0))
    for row, (class_id, label) in enumerate(zip(class_ids, labels)):
        top = 3 + row * line
        draw.rectangle([4, top + 1, 4 + line - 4, top + line - 3], fill=tuple(int(v) for v in palette[class_id]),
                       outline=(255, 255, 255))
        draw.text((line + 8, top), label, fill=(255, 255, 255), font=font)


__all__ = ["Detection", "Mask", "Result", "avss_palette"]
