"""Output files and folders: checked before the work that fills them, written whole or not at all.

- :func:`check_output_file` / :func:`check_output_folder` refuse, in one line, an output that
  cannot be written, without creating or truncating anything, so a run finds out before its
  model loads rather than after minutes of inference. Writability is probed with a temporary file
  or folder, removed at once; an empty path is refused (:func:`nonempty_path` for options).
- :func:`atomic_path` gives a temporary name beside the target; the target appears (or is
  replaced) only when the writer finished, so a reader never sees half a file and a failure
  leaves the old one. The file gets the usual mode (umask), not a private temporary one.
- :func:`usual_file_mode` / :func:`usual_folder_mode`: the mode a new file or folder gets from
  the umask, for what tools create private (``mkstemp``, ``mkdtemp``, safetensors' writer).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterator

from edgeav.errors import OptionError


def _writable_folder(folder: Path, *, make_folder: bool = False) -> bool:
    """Whether a file (or, ``make_folder``, a folder) can be made in ``folder``: tried for real, then removed,
    since the mode bits can say yes where the filesystem says no (/proc, a read-only mount)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        if make_folder:
            os.rmdir(tempfile.mkdtemp(prefix=".edgeav-probe-", dir=folder))
        else:
            handle, name = tempfile.mkstemp(prefix=".edgeav-probe-", dir=folder)
            os.close(handle)
            os.unlink(name)
    except OSError:
        return False
    return True


def _refuse_empty(path: str | Path, option: str) -> Path:
    if not str(path).strip():
        raise OptionError(f"{option} is empty; give a file or folder name (\".\" for the current folder)")
    return Path(path)


def nonempty_path(option: str):
    """A command-line parser for ``option`` that keeps an empty value from becoming the current folder
    (``Path("")`` is ``.``): ``typer.Option(..., parser=nonempty_path("--out"))``."""
    return lambda value: _refuse_empty(value, option)


def check_output_file(path: str | Path, option: str, *, in_place: bool = False) -> Path:
    """``path`` can be written by ``option`` (e.g. ``--jsonl``); nothing is left behind.

    ``in_place``: an existing file is opened and rewritten (then only the file must be writable);
    otherwise it is replaced through :func:`atomic_path`, which needs a writable folder.
    """
    path = _refuse_empty(path, option)
    parent = path.parent
    if path.is_dir():
        raise OptionError(f"{path}: {option} is a folder; give a file name")
    if not parent.is_dir():
        raise OptionError(f"{path}: {option} goes into a folder that does not exist ({parent}); create it first")
    if path.exists() and not os.access(path, os.W_OK):
        raise OptionError(f"{path}: {option} cannot be written (the file is not writable); pick a writable {option}")
    if not (in_place and path.exists()) and not _writable_folder(parent):
        raise OptionError(f"{path}: {option} cannot be written ({parent} is not writable); pick a writable {option}")
    return path


def check_output_folder(path: str | Path, option: str) -> Path:
    """``path`` is a writable folder, or a new one that can be made in a writable folder; nothing is left."""
    path = _refuse_empty(path, option)
    if path.exists():
        if not path.is_dir():
            raise OptionError(f"{path}: {option} must be a folder, and this is a file")
        if not _writable_folder(path):
            raise OptionError(f"{path}: {option} is not writable; pick a writable folder")
        return path
    if not path.parent.is_dir():
        raise OptionError(f"{path}: {option} must be a folder, or a new one inside an existing folder "
                          f"({path.parent} does not exist)")
    if not _writable_folder(path.parent, make_folder=True):
        raise OptionError(f"{path}: {option} cannot be created ({path.parent} is not writable); "
                          "pick a writable folder")
    return path


def _umask_from_proc() -> int | None:
    """The process umask as Linux (4.7 and later) shows it, without changing it; None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    # Elsewhere os.umask reads the umask only by setting it: once, at import, not while other threads make files.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK_AT_IMPORT = _umask_from_proc()
if _UMASK_AT_IMPORT is None:
    _UMASK_AT_IMPORT = _umask_by_setting()


def _umask() -> int:
    """The umask now where /proc shows it, else as it was when edgeav was imported."""
    live = _umask_from_proc()
    return _UMASK_AT_IMPORT if live is None else live


def usual_file_mode() -> int:
    """``0666`` less the umask: the mode ``open()`` gives a new file."""
    return 0o666 & ~_umask()


def usual_folder_mode() -> int:
    """``0777`` less the umask: the mode ``mkdir`` gives a new folder."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers that pick a format from it still
    work); when the block ends without an error it replaces ``path``, otherwise it is removed."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


__all__ = ["atomic_path", "check_output_file", "check_output_folder", "nonempty_path", "usual_file_mode", "usual_folder_mode"]
