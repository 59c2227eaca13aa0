"""Reading and writing weight files: one-line errors for what a failed download or copy
leaves behind, and files written the way other tools expect them.

Readers refuse an empty file, a Git LFS pointer, a truncated zip, a file that is not a
``torch.save`` pickle or safetensors at all, and a pickle that holds more than tensors
(``torch.load(weights_only=True)`` only: nothing in a file is executed). Each error is a
:class:`~edgeav.errors.CheckpointError` naming the file and the fix.

:func:`write_safetensors` adds ``{"format": "pt"}`` metadata (transformers'
``from_pretrained`` refuses files without it) and gives the file the usual mode
(``0666`` less the umask; safetensors itself leaves ``0600``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgeav.errors import CheckpointError

_LFS_POINTER = b"version https://git-lfs"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"  # torch.save's pre-zip format starts with a pickle protocol mark
# What torch.load raises on a damaged file (it has no exception of its own for that).
_DAMAGED = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, struct.error,
            zipfile.BadZipFile, UnicodeDecodeError, MemoryError)


def _file_head(path: Path) -> tuple[int, bytes]:
    """Size and first bytes of a weight file, refusing what a failed download or copy leaves behind."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror}); check that it exists and is readable"
                              ) from None
    if size == 0:
        raise CheckpointError(f"{path}: is empty (0 bytes); the download or copy did not finish: copy the file again")
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path}: is a Git LFS pointer ({size} bytes), not the weights; "
                              "fetch the file itself (git lfs pull) or download it again")
    return size, head


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    _, head = _file_head(path)
    is_zip = head.startswith(_ZIP_MAGIC)
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: is truncated or damaged (its zip directory is missing); copy the file again")
    if not is_zip and not head.startswith(_PICKLE_PROTOCOL):
        raise CheckpointError(f"{path}: is not a PyTorch weight file (torch.save writes a zip or a pickle); "
                              "check that it is the right file, or copy it again")
    try:
        # Zip-format files (torch >= 1.6) are memory-mapped; the older format cannot be.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: holds more than tensors ({_first_line(e)}); edgeav reads weights only"
        ) from None
    except _DAMAGED as e:
        raise CheckpointError(
            f"{path}: cannot be read ({_first_line(e)}); the file is corrupted or truncated: copy it again"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    # torch's weights-only refusal opens with advice about torch.load; the reason is on a later line.
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
    return reason.removeprefix("WeightsUnpickler error:").strip()[:160]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    size, head = _file_head(path)
    header = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    if header is None or header > size - 8:
        raise CheckpointError(f"{path}: is not a complete safetensors file ({size} bytes, the header "
                              f"{'is cut off' if header is None else f'claims {header}'}); copy the file again")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot be read ({_first_line(e)}); the file is corrupted or truncated: copy it again"
        ) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path)


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a one-line CheckpointError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); copy the file again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(data).__name__}, not an object; copy the file again")
    return data


def usual_file_mode() -> int:
    """``0666`` less the process umask: the mode ``open()`` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file transformers opens, with the usual file mode."""
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, usual_file_mode())  # safetensors writes through a private (0600) temporary file
