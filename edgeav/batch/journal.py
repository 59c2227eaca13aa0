"""A batch's JSONL: one complete line per item, appended and flushed, never rewritten.

A line is ``{"id", "key", "source", "task", "ok", "result" | "error", "worker", "wall_ms"}`` (plus
the item's own ``audio``, ``question``, ``expression`` and ``at`` when it has them). A rerun reads the
file first and skips every key it holds, results and errors alike (``retry_failed``: errors run
again; the last line of a key counts). A line cut short (the machine died mid-write) is not a line:
its item runs again, and the next line starts on a line of its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

from edgeav.errors import OptionError


class Journal:
    """``path``, holding the results of ``task``: :meth:`done` says what a rerun skips, :meth:`write`
    appends a line. Open it with ``with``."""

    def __init__(self, path: str | Path, task: str) -> None:
        self.path = Path(path)
        self.task = task
        self.lines: dict[str, dict] = {}  # key -> its last complete line
        self.unreadable = 0
        self._file: IO[str] | None = None
        self._ends_cut = False
        self._read()

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise OptionError(f"{self.path}: cannot read it ({e.strerror}); pick a readable --jsonl") from None
        self._ends_cut = bool(data) and not data.endswith(b"\n")
        for raw in data.splitlines():
            try:
                line = json.loads(raw)
                key, task = line["key"], line["task"]
            except (ValueError, TypeError, KeyError):
                self.unreadable += bool(raw.strip())
                continue
            if task != self.task:
                raise OptionError(f"{self.path}: holds results of --task {task}, not {self.task}; give this batch "
                                  "its own --jsonl")
            self.lines[key] = line

    def done(self, retry_failed: bool = False) -> set[str]:
        """The keys a rerun skips."""
        return {key for key, line in self.lines.items() if line.get("ok") or not retry_failed}

    def __enter__(self) -> "Journal":
        try:
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise OptionError(f"{self.path}: cannot write it ({e.strerror}); pick a writable --jsonl") from None
        if self._ends_cut:
            self._file.write("\n")
        return self

    def write(self, line: dict) -> None:
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.lines[line["key"]] = line

    def __exit__(self, *exc) -> None:
        self._file.close()


__all__ = ["Journal"]
