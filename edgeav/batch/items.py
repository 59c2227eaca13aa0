"""What a batch runs: its inputs (files, folders, globs, manifests) as :class:`Item` s.

- A folder stands for the media files under it (videos and images, sorted, hidden files left out); a
  folder of frames that is one clip is named by a manifest row instead.
- A glob (``clips/**/*.mp4``) stands for the media files it matches, and those under folders it matches.
- A manifest is a ``.csv`` (with a header) or ``.jsonl`` file, one row per item, with the columns
  of :data:`MANIFEST_COLUMNS`; relative paths are read from the manifest's folder.
- A URL (``scheme://...``) is one item.

Each item has a :attr:`Item.key`: its ``id`` when the manifest gives one, else its path, size and
modification time with its own options, so a rerun knows what already ran and a file rewritten
since runs again.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from edgeav.errors import OptionError
from edgeav.media.stills import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".mts", ".3gp")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
MANIFEST_COLUMNS = ("source", "audio", "question", "expression", "at", "id")


@dataclass(frozen=True)
class Item:
    """One clip of a batch: ``source`` and, from its manifest row, what its run asks (``at``: the seconds a
    mask task segments or ARIG grounds). ``folder`` is where its masks go under ``--out``."""

    id: str
    source: str
    key: str
    folder: str = ""
    audio: str | None = None
    question: str | None = None
    expression: str | None = None
    at: tuple[int, ...] | None = None

    @classmethod
    def make(cls, source: str, *, id: str | None = None, audio: str | None = None, question: str | None = None,
             expression: str | None = None, at: Iterable[int] | None = None) -> "Item":
        """An item keyed by ``id``, or (none given) by its file and options; ``id`` defaults to ``source``."""
        at = tuple(at) if at is not None else None
        if id is not None:
            key = f"id:{id}"
        else:
            parts = [_stamp(source)] + (["audio=" + _stamp(audio)] if audio is not None else [])
            parts += [f"{name}={json.dumps(value)}" for name, value in
                      (("question", question), ("expression", expression), ("at", at)) if value is not None]
            key = "path:" + "|".join(parts)
        return cls(id=id if id is not None else str(source), source=str(source), key=key, audio=audio,
                   question=question, expression=expression, at=at)

    def run_options(self) -> dict:
        """Its own options as :meth:`edgeav.runtime.Runtime.run` takes them (those set)."""
        options = {"audio": self.audio, "question": self.question, "expression": self.expression,
                   "at_seconds": list(self.at) if self.at is not None else None}
        return {name: value for name, value in options.items() if value is not None}

    def to_dict(self) -> dict:
        return {**asdict(self), "at": list(self.at) if self.at is not None else None}

    @classmethod
    def from_dict(cls, row: dict) -> "Item":
        return cls(**{**row, "at": tuple(row["at"]) if row.get("at") is not None else None})


def _is_url(text: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text) is not None


def _stamp(source: str) -> str:
    """Path, size and modification time (a URL as it is; a missing file as missing: its run says why)."""
    if _is_url(source):
        return source
    path = Path(source)
    try:
        stat = path.stat()
    except OSError:
        return f"{path.absolute()}|missing"
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _is_media(path: Path) -> bool:
    """A video or image file by its suffix, not hidden (``.DS_Store``, macOS' ``._clip.mp4``)."""
    return path.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _media_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_media(p))


def _at(value, where: str) -> tuple[int, ...] | None:
    """``at`` of a row: a whole number or a list of them, or text ``"2"`` / ``"1;4"`` / ``"1 4"`` (CSV)."""
    if value is None or value == "":
        return None
    values = re.split(r"[;,\s]+", value.strip()) if isinstance(value, str) else (
        value if isinstance(value, list) else [value])
    seconds = []
    for v in values:
        if isinstance(v, str) and v.isascii() and v.isdigit():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise OptionError(f"{where}: at {value!r} is not a second or a list of seconds (0 or more); fix the row")
        seconds.append(v)
    if not seconds:
        raise OptionError(f"{where}: at {value!r} names no second; fix the row")
    return tuple(seconds)


def _manifest_rows(manifest: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a CSV or JSONL manifest, its columns checked, empty cells None."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{manifest}: cannot read the manifest ({getattr(e, 'strerror', None) or e}); "
                          "check the file") from None
    rows = _csv_rows(manifest, text) if manifest.suffix.lower() == ".csv" else _jsonl_rows(manifest, text)
    for where, row in rows:
        yield where, {name: (value if value != "" else None) for name, value in row.items()}


def _csv_rows(manifest: Path, text: str) -> Iterator[tuple[str, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _check_columns(manifest, reader.fieldnames or [])
    for row in reader:
        where = f"{manifest}:{reader.line_num}"
        if None in row:
            raise OptionError(f"{where}: more cells than the header has columns; fix the row")
        yield where, row


def _jsonl_rows(manifest: Path, text: str) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise OptionError(f"{where}: not JSON ({e.msg}); fix the line") from None
        if not isinstance(row, dict):
            raise OptionError(f"{where}: a row is a JSON object with a \"source\"; fix the line")
        _check_columns(where, list(row))
        yield where, row


def _check_columns(where, columns: list) -> None:
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown or "source" not in columns:
        what = f"unknown column {unknown[0]!r}" if unknown else "no \"source\" column"
        raise OptionError(f"{where}: {what}; a manifest's columns are {', '.join(MANIFEST_COLUMNS)} (source required)")


def _text(row: dict, name: str, where: str) -> str | None:
    value = row.get(name)
    if name == "id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is not None and not isinstance(value, str):
        raise OptionError(f"{where}: {name} is text; fix the row")
    return value


def _from_manifest(manifest: Path) -> Iterator["Item"]:
    base = manifest.parent
    for where, row in _manifest_rows(manifest):
        source = _text(row, "source", where)
        if source is None or not source.strip():
            raise OptionError(f"{where}: no source; every row names its file")
        paths = {name: _text(row, name, where) for name in ("source", "audio")}
        for name, value in paths.items():
            if value is not None and not _is_url(value) and not Path(value).is_absolute():
                paths[name] = str(base / value)
        yield Item.make(paths["source"], id=_text(row, "id", where), audio=paths["audio"],
                        question=_text(row, "question", where), expression=_text(row, "expression", where),
                        at=_at(row.get("at"), where))


def _expand(text: str) -> Iterator["Item"]:
    """The items an input names."""
    path = Path(text)
    if _is_url(text) or (path.is_file() and path.suffix.lower() not in MANIFEST_SUFFIXES):
        yield Item.make(text)
    elif path.is_file():
        yield from _from_manifest(path)
    elif path.is_dir():
        found = _media_under(path)
        if not found:
            raise OptionError(f"{text}: the folder holds no media files ({', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)});"
                              " give files, a folder of them, or a manifest")
        yield from (Item.make(str(p)) for p in found)
    elif glob.has_magic(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise OptionError(f"{text}: the pattern matches nothing; check it (quote it so the shell leaves it)")
        for match in matches:  # media files, and those under matched folders
            found = _media_under(Path(match)) if Path(match).is_dir() else [Path(match)]
            yield from (Item.make(str(p)) for p in found if _is_media(p))
    else:
        raise OptionError(f"{text}: no such file or folder; give media files, folders, globs or a manifest "
                          f"({', '.join(MANIFEST_SUFFIXES)})")


def _folder_name(item_id: str, taken: set[str]) -> str:
    """A folder name for the item's masks: its id with anything but letters, digits, ``.``, ``-`` and ``_``
    turned to ``_``, numbered when two ids come out the same."""
    base = re.sub(r"[^\w.-]+", "_", item_id).strip("._")[-120:] or "item"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def collect_items(inputs: Iterable[str | os.PathLike | Item], exclude: Iterable[str | os.PathLike] = ()) -> list[Item]:
    """The items ``inputs`` name (module docstring), in order, each key once (a repeated file runs once;
    manifest ids must be unique). :class:`Item` s pass through. Files at or under an ``exclude`` path (the
    batch's own results file and mask folder) are left out."""
    items: list[Item] = []
    keys: set[str] = set()
    folders: set[str] = set()
    excluded = [Path(p).resolve() for p in exclude]
    for given in inputs:
        for item in [given] if isinstance(given, Item) else _expand(os.fspath(given)):
            if not _is_url(item.source) and any(_inside(Path(item.source).resolve(), p) for p in excluded):
                continue
            if item.key in keys:
                if item.key.startswith("id:"):
                    raise OptionError(f"{given}: id {item.id!r} names two items; give each item its own id")
                continue
            keys.add(item.key)
            items.append(dataclasses.replace(item, folder=_folder_name(item.id, folders)))
    if not items:
        raise OptionError("no items to run: the inputs name no media; give files, folders, globs or a manifest")
    return items


__all__ = ["MANIFEST_COLUMNS", "Item", "collect_items"]
