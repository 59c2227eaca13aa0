"""Engine directories: the formats and precisions table, ``manifest.json``, hashes.

An engine directory holds one file per component graph, the token embedding
tables, the tokenizer and ``manifest.json``: format version, model config,
backend, precision per component, the digest of the source checkpoint, the
SHA-256 of every file, tool versions and the fidelity receipt. Loading checks
all of it and refuses a mismatch with one line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgeav.errors import CheckpointError, OptionError

MANIFEST = "manifest.json"
ENGINE_FORMAT = "edgeav-engine"
ENGINE_FORMAT_VERSION = 1
COMPONENTS = ("visual", "audio", "llm", "mask")


@dataclass(frozen=True)
class Precision:
    """One ``--precision``: what each component runs in and which formats offer it."""

    name: str
    components: dict[str, str]
    formats: tuple[str, ...]
    summary: str


# The one table that drives validation, --help and the README's table.
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", dict.fromkeys(COMPONENTS, "fp32"), ("onnx", "tensorrt"),
              "every component in fp32: the reference's numbers"),
    Precision("fp16", dict.fromkeys(COMPONENTS, "fp16"), ("onnx", "tensorrt"),
              "every component in fp16 (inputs and outputs stay fp32)"),
    Precision("int8", {"visual": "int8", "audio": "int8", "llm": "fp32", "mask": "int8"}, ("onnx", "tensorrt"),
              "encoders and mask decoder int8 (static QDQ, calibrated on the demo world), LLM fp32"),
    Precision("int4", {"visual": "fp32", "audio": "fp32", "llm": "int4", "mask": "fp32"}, ("onnx",),
              "LLM weights int4 (MatMulNBits), I-LoRA and router fp32; the rest fp32"),
)}
FORMATS = ("onnx", "tensorrt")
INT4_BLOCK_SIZES = (32, 128)


def check_export_options(fmt: str, precision: str, block_size: int = 32) -> Precision:
    """The precision row for ``--format``/``--precision``/``--block-size``, or a one-line OptionError."""
    if fmt not in FORMATS:
        raise OptionError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise OptionError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    row = PRECISIONS[precision]
    if fmt not in row.formats:
        offered = [p.name for p in PRECISIONS.values() if fmt in p.formats]
        raise OptionError(f"--precision {precision} is not offered for --format {fmt}; "
                          f"it offers {', '.join(offered)}")
    if block_size not in INT4_BLOCK_SIZES:
        raise OptionError(f"--block-size {block_size}: expected one of {', '.join(map(str, INT4_BLOCK_SIZES))}")
    return row


def precision_table() -> str:
    """The formats and precisions table in Markdown (README and ``edgeav export --help``)."""
    lines = ["| precision | visual | audio | llm | mask | formats | what it is |", "|---|---|---|---|---|---|---|"]
    for p in PRECISIONS.values():
        parts = " | ".join(p.components[c] for c in COMPONENTS)
        lines.append(f"| {p.name} | {parts} | {', '.join(p.formats)} | {p.summary} |")
    return "\n".join(lines)


def precision_help() -> str:
    """One line per precision, for ``edgeav export --help``."""
    return "\n\n".join(f"{p.name} ({', '.join(p.formats)}): {p.summary}" for p in PRECISIONS.values())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict:
    """The manifest of an engine directory, checked for format and version (not yet for hashes)."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such engine directory; build one with `edgeav export`")
    if not path.is_file():
        raise CheckpointError(f"{folder}: has no {MANIFEST}, so it is not an engine directory; "
                              "build one with `edgeav export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); export the engine again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path}: not an edgeav engine manifest; export the engine again")
    if manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: engine format version {manifest.get('format_version')!r}, this edgeav reads "
                              f"{ENGINE_FORMAT_VERSION}; export the engine again with this version")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and has its recorded SHA-256."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{folder / MANIFEST}: lists no files; export the engine again")
    for name, expected in files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{folder / MANIFEST}: file entry {name!r} points outside the engine directory")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the engine; export the engine again")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: its SHA-256 does not match {MANIFEST} (corrupted, or the manifest "
                                  "comes from another export); export the engine again")
