"""Reading and writing the files a checkpoint or an engine is made of: one-line errors for
what a failed download or copy leaves behind, and files written the way other tools expect them.

Weight readers refuse an empty file, a Git LFS pointer, a truncated zip, a file that is not a
``torch.save`` pickle or safetensors at all, and a pickle that holds more than tensors
(``torch.load(weights_only=True)`` only: nothing in a file is executed). :func:`read_json` and
:func:`parse_json` refuse what is not a JSON object. Each error is a
:class:`~edgeav.errors.CheckpointError` naming the file and the fix.

:func:`write_safetensors` adds ``{"format": "pt"}`` metadata (transformers'
``from_pretrained`` refuses files without it) and gives the file the usual mode
(``0666`` less the umask; safetensors itself leaves ``0600``).

torch loads only when weights do: engine manifests are read through this module by
commands that never load a model.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from edgeav.errors import CheckpointError, EdgeavError
from edgeav.outputs import usual_file_mode

if TYPE_CHECKING:
    import torch

_LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts: the weights were never fetched
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"  # torch.save's pre-zip format starts with a pickle protocol mark
# What torch.load raises on a damaged file (it has no exception of its own for that).
_DAMAGED = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, struct.error,
            zipfile.BadZipFile, UnicodeDecodeError, MemoryError)


def refuse_unfetched(head: bytes, size: int, source: str | Path) -> None:
    """Refuse what a download or copy that did not finish leaves: an empty file, or the Git LFS pointer
    that stands in for a file never fetched (``head``: the file's first bytes, ``size``: its length)."""
    if size == 0:
        raise CheckpointError(f"{source}: is empty (0 bytes); the download or copy did not finish: copy the file again")
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(f"{source}: is a Git LFS pointer ({size} bytes), not the file itself; "
                              "fetch the file itself (git lfs pull) or download it again")


def file_head(path: Path) -> tuple[int, bytes]:
    """Size and first bytes of a weight file, refusing what a failed download or copy leaves behind."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror}); check that it exists and is readable"
                              ) from None
    refuse_unfetched(head, size, path)
    return size, head


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import torch

    _, head = file_head(path)
    is_zip = head.startswith(_ZIP_MAGIC)
    if is_zip and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: is truncated or damaged (its zip directory is missing); copy the file again")
    if not is_zip and not head.startswith(_PICKLE_PROTOCOL):
        raise CheckpointError(f"{path}: is not a PyTorch weight file (torch.save writes a zip or a pickle); "
                              "check that it is the right file, or copy it again")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the refusal below says what matters.
            warnings.simplefilter("ignore", UserWarning)
            # Zip-format files (torch >= 1.6) are memory-mapped; the older format cannot be.
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: holds more than tensors, or is not a torch.save file (the weights-only reader says: "
            f"{_first_line(e)}); edgeav reads weights only: save a dict of tensors with torch.save or safetensors"
        ) from None
    except _DAMAGED as e:
        raise CheckpointError(
            f"{path}: cannot be read ({_first_line(e)}); the file is corrupted or truncated: copy it again"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    return data


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error)
    # torch's weights-only refusal opens with advice about torch.load; the reason follows this marker.
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    reason = lines[0]
    if len(reason) > limit:  # cut at a word, marked, never mid-word
        reason = reason[:limit].rsplit(" ", 1)[0] + " ..."
    return reason


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    size, head = file_head(path)
    header = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    if header is None or header > size - 8:
        raise CheckpointError(f"{path}: is not a complete safetensors file ({size} bytes, the header "
                              f"{'is cut off' if header is None else f'claims {header}'}); copy the file again")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot be read ({_first_line(e)}); the file is corrupted or truncated: copy it again"
        ) from None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path)


def parse_json(text: bytes | str, source: str | Path, fix: str = "copy the file again") -> dict:
    """The JSON object in ``text`` (read from ``source``); anything else is a one-line CheckpointError that
    names ``source`` and ends with ``fix``."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{source}: not readable JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def read_json(path: Path, fix: str = "copy the file again") -> dict:
    """The JSON object in the file ``path``; see :func:`parse_json`."""
    try:
        text = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); {fix}") from None
    return parse_json(text, path, fix)


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file transformers opens, with the usual file mode."""
    from safetensors.torch import save_file

    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, usual_file_mode())  # safetensors writes through a private (0600) temporary file


# -- edgeav's converted checkpoints: config.json says the format and the system ------------

CONFIG_FILE = "config.json"
FORMAT = "edgeav-checkpoint"
FORMAT_VERSION = 1


def converted_system(folder: Path) -> str | None:
    """The ``system`` an edgeav-converted folder's ``config.json`` names (Crab's, written before the field
    existed, say nothing: "crab"); None when ``folder`` holds no edgeav-converted checkpoint."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return str(meta.get("system", "crab"))

def read_converted_config(folder: Path, from_dict, preset_name: str | None = None):
    """The model config of the edgeav-converted checkpoint ``folder`` (``from_dict`` builds it from the
    config.json's ``config``); refused in one line when the format, the config or ``preset_name`` does not fit."""
    meta = read_json(folder / CONFIG_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not an edgeav checkpoint of format version {FORMAT_VERSION}; "
                              "convert the released weights again with `edgeav convert`")
    try:
        config = from_dict(meta["config"])
    except (EdgeavError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad model config ({e}); convert the weights again") from None
    if preset_name is not None and preset_name != config.name:
        raise CheckpointError(f"{folder}: is a {config.name} checkpoint, not {preset_name}; drop --preset")
    return config
