"""Engine directories: the formats and precisions table, ``manifest.json``, hashes.

An engine directory holds one file per component graph, the token embedding
tables, the tokenizer and ``manifest.json``: format version, model config,
backend, precision per component, the digest of the source checkpoint, the
SHA-256 of every file, tool versions and the fidelity receipt. Loading checks
all of it and refuses a mismatch with one line naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
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
    """The manifest of an engine directory, its schema checked (not yet the files' hashes: see verify_files)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such engine directory; build one with `edgeav export`")
    if not path.is_file():
        raise CheckpointError(f"{folder}: has no {MANIFEST}, so it is not an engine directory; "
                              "build one with `edgeav export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); export the engine again") from None
    check_manifest(manifest, path)
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file ``files`` lists is inside ``folder`` and has its recorded SHA-256.

    ``manifest`` is one :func:`read_manifest` returned, so every file the engine names is listed. ONNX
    graphs are also read for the external data files they name (ONNX Runtime would open those too):
    each must be listed as well.
    """
    folder = Path(folder)
    files = manifest["files"]
    root = folder.resolve()
    for name, expected in files.items():
        path = folder / name
        if path.is_symlink() and path.resolve().parent != root:
            raise CheckpointError(f"{path}: a link to {path.resolve()}, outside the engine directory; "
                                  "copy the file in, or export the engine again")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the engine; export the engine again")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: its SHA-256 does not match {MANIFEST} (corrupted, or the manifest "
                                  "comes from another export); export the engine again")
    for entry in manifest["graphs"].values():
        if entry["file"].endswith(".onnx"):
            for name in _external_data(folder / entry["file"]):
                if not _is_file_name(name) or name not in files:
                    raise CheckpointError(f"{folder / entry['file']}: reads external data {name!r}, which "
                                          f"{MANIFEST} does not list as a file of the engine; export the engine again")


def read_listed_file(folder: Path, manifest: dict, name: str) -> bytes:
    """The bytes of ``name``, a file the manifest lists, checked against its SHA-256 as read (so what was
    verified is what is used)."""
    path = Path(folder) / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); export the engine again") from None
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]:
        raise CheckpointError(f"{path}: its SHA-256 does not match {MANIFEST} (corrupted, or the manifest "
                              "comes from another export); export the engine again")
    return data


def _external_data(path: Path) -> list[str]:
    """Locations of the external data an ONNX graph refers to (its weights stay unread)."""
    import onnx  # only engine loading pays for it
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable ONNX graph ({e}); export the engine again") from None
    locations = []

    def tensors_of(graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            yield from nodes_tensors(node)

    def nodes_tensors(node):
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from tensors_of(attribute.g)
            for graph in attribute.graphs:
                yield from tensors_of(graph)

    functions = (tensor for function in model.functions for node in function.node for tensor in nodes_tensors(node))
    for tensor in (*tensors_of(model.graph), *functions):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations += [entry.value for entry in tensor.external_data if entry.key == "location"]
    return list(dict.fromkeys(locations))


# -- the manifest's schema ----------------------------------------------------------------------

_SHA256_DIGITS = frozenset("0123456789abcdef")
_RECEIPT_LOGITS = ("max_abs_logit_diff", "mean_abs_logit_diff", "kl_mean", "kl_max", "top1_agreement", "steps")


def _is_file_name(name) -> bool:
    """A plain file name: no folder part, no '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name
            and "\\" not in name and "\x00" not in name)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def check_manifest(manifest, path: Path) -> None:
    """Refuse, in one line naming the key, a manifest whose keys, types or values this edgeav cannot run."""

    def refuse(key: str, problem: str):
        return CheckpointError(f"{path}: {key} {problem}; export the engine again")

    def need(container: dict, key: str, kind: type | tuple, where: str, *, optional: bool = False):
        name = f"{where}.{key}" if where else key
        if key not in container:
            if optional:
                return None
            raise refuse(name, "is missing")
        value = container[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise refuse(name, f"must be {_kind_name(kind)}, not {_kind(value)}")
        return value

    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path}: not an edgeav engine manifest; export the engine again")
    version = manifest.get("format_version")
    if type(version) is not int or version != ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: engine format version {version!r}, this edgeav reads "
                              f"{ENGINE_FORMAT_VERSION}; export the engine again with this version")
    backend = need(manifest, "backend", str, "")
    if backend not in FORMATS:
        raise refuse("backend", f"{backend!r} is not one of {', '.join(FORMATS)}")
    precision = need(manifest, "precision", str, "")
    if precision not in PRECISIONS:
        raise refuse("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if backend not in PRECISIONS[precision].formats:
        raise refuse("precision", f"{precision} is not offered for backend {backend}")
    components = need(manifest, "components", dict, "")
    if components != PRECISIONS[precision].components:
        raise refuse("components", f"{components!r} differs from what precision {precision} means "
                                   f"({PRECISIONS[precision].components!r})")
    _check_config(need(manifest, "config", dict, ""), refuse)

    files = need(manifest, "files", dict, "")
    if not files:
        raise refuse("files", "lists no files")
    for name, digest in files.items():
        if not _is_file_name(name):
            raise refuse(f"files entry {name!r}", "is not a file name inside the engine directory (no folders, "
                                                  "'..' or absolute paths)")
        if not isinstance(digest, str) or len(digest) != 64 or not _SHA256_DIGITS.issuperset(digest):
            raise refuse(f"files.{name}", "must be a SHA-256 in 64 lowercase hex digits")

    def listed_file(container: dict, key: str, where: str) -> str:
        name = need(container, key, str, where)
        if not _is_file_name(name):
            raise refuse(f"{where}.{key}" if where else key, f"{name!r} is not a file name inside the engine "
                                                             "directory (no folders, '..' or absolute paths)")
        if name not in files:
            raise refuse(f"{where}.{key}" if where else key, f"{name!r} is not listed in files, so it cannot "
                                                             "be verified")
        return name

    listed_file(manifest, "tokenizer", "")
    if "tokenizer_config" in manifest:  # engines from before the tokenizer's settings were kept lack it
        listed_file(manifest, "tokenizer_config", "")
    graphs = need(manifest, "graphs", dict, "")
    for name, entry in graphs.items():
        where = f"graphs.{name}"
        if not isinstance(entry, dict):
            raise refuse(where, f"must be an object, not {_kind(entry)}")
        listed_file(entry, "file", where)
        component = need(entry, "component", str, where)
        if component not in COMPONENTS:
            raise refuse(f"{where}.component", f"{component!r} is not one of {', '.join(COMPONENTS)}")
        if need(entry, "precision", str, where) != components[component]:
            raise refuse(f"{where}.precision", f"{entry['precision']!r} differs from components.{component} "
                                               f"({components[component]})")
    for name in ("visual", "audio"):
        if graphs.get(name, {}).get("component") != name:
            raise refuse("graphs", f"has no {name} graph")
    variants = need(manifest, "variants", dict, "")
    if "joint" not in variants:
        raise refuse("variants", "has no joint entry")
    for name, entry in variants.items():
        where = f"variants.{name}"
        if not isinstance(entry, dict):
            raise refuse(where, f"must be an object, not {_kind(entry)}")
        listed_file(entry, "embed", where)
        for key, component in (("llm", "llm"), ("mask", "mask")):
            graph = need(entry, key, str, where, optional=key == "mask")
            if graph is not None and graphs.get(graph, {}).get("component") != component:
                raise refuse(f"{where}.{key}", f"{graph!r} names no {component} graph in graphs")

    for key in ("lora", "tools", "source", "options"):
        need(manifest, key, dict, "", optional=True)
    for key in ("cache_key", "created"):
        need(manifest, key, str, "", optional=True)
    for tool, version in manifest.get("tools", {}).items():
        if not isinstance(version, str):
            raise refuse(f"tools.{tool}", f"must be a version string, not {_kind(version)}")
    receipt = need(manifest, "receipt", dict, "", optional=True)
    if receipt is not None:
        _check_receipt(receipt, need, refuse)


def _check_receipt(receipt: dict, need, refuse) -> None:
    if "skipped" in receipt:
        need(receipt, "skipped", str, "receipt")
        return
    number = (int, float)
    need(receipt, "clips_per_task", int, "receipt")
    need(receipt, "greedy_text_agreement", number, "receipt")
    need(receipt, "mask_iou_vs_reference", (*number, type(None)), "receipt")
    logits = need(receipt, "logits", dict, "receipt")
    if logits:  # empty when no step was compared
        for key in _RECEIPT_LOGITS:
            need(logits, key, number, "receipt.logits")
    for task, pair in need(receipt, "metrics", dict, "receipt").items():
        where = f"receipt.metrics.{task}"
        if not isinstance(pair, dict):
            raise refuse(where, f"must be an object, not {_kind(pair)}")
        reference, engine = need(pair, "reference", dict, where), need(pair, "engine", dict, where)
        if not reference or set(reference) != set(engine):
            raise refuse(where, "must hold the same metrics for reference and engine")
        for side, values in (("reference", reference), ("engine", engine)):
            for metric in values:
                need(values, metric, number, f"{where}.{side}")


def _check_config(config: dict, refuse) -> None:
    """Every part and field of the model config present, with the type of its default."""
    from edgeav.config import CrabConfig

    defaults = CrabConfig()
    expected = {f.name for f in dataclasses.fields(CrabConfig)}
    unknown = sorted(set(config) - expected)
    if unknown:
        raise refuse(f"config.{unknown[0]}", "is not a model config field")
    for part in dataclasses.fields(CrabConfig):
        where = f"config.{part.name}"
        if part.name not in config:
            raise refuse(where, "is missing")
        value, default = config[part.name], getattr(defaults, part.name)
        if not dataclasses.is_dataclass(default):
            if not isinstance(value, str):
                raise refuse(where, f"must be a string, not {_kind(value)}")
            continue
        if not isinstance(value, dict):
            raise refuse(where, f"must be an object, not {_kind(value)}")
        fields = {f.name: (getattr(default, f.name), str(f.type)) for f in dataclasses.fields(default)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise refuse(f"{where}.{unknown[0]}", "is not a model config field")
        for key, (example, annotation) in fields.items():
            if key not in value:
                raise refuse(f"{where}.{key}", "is missing")
            if not _same_kind(value[key], example, annotation):
                raise refuse(f"{where}.{key}", f"must be {_describe_kind(example, annotation)}, not "
                                               f"{_kind(value[key])} {value[key]!r}")
    try:
        CrabConfig.from_dict(config)
    except (OptionError, TypeError, ValueError) as e:
        raise refuse("config", f"is not a valid model config ({e})") from None


def _same_kind(value, example, annotation: str) -> bool:
    """``value`` (from JSON) has the kind of the config default ``example`` (annotated ``annotation``)."""
    if isinstance(example, bool):
        return isinstance(value, bool)
    if isinstance(example, int):
        return type(value) is int and value >= 0
    if isinstance(example, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(example, tuple):
        # tuple[int, int] has a fixed length; tuple[str, ...] any.
        if not isinstance(value, list) or ("..." not in annotation and len(value) != len(example)):
            return False
        return all(_same_kind(item, example[0], "") for item in value) if example else True
    return isinstance(value, type(example))


def _describe_kind(example, annotation: str) -> str:
    if isinstance(example, bool):
        return "true or false"
    if isinstance(example, int):
        return "a whole number >= 0"
    if isinstance(example, float):
        return "a finite number"
    if isinstance(example, tuple):
        item = _describe_kind(example[0], "") if example else "anything"
        return f"a list of {len(example)} ({item})" if "..." not in annotation else f"a list ({item})"
    return _kind_name(type(example))


def _as_tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind) -> str:
    if isinstance(kind, str):
        return kind
    names = {dict: "an object", str: "a string", int: "a whole number", float: "a number", bool: "true or false",
             list: "a list", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _as_tuple(kind)))
