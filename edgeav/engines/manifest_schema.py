"""The schema of an engine's ``manifest.json``: its format name and version, the shape of a
precision row, and :func:`check_manifest`, which refuses in one line (naming the key) a manifest
whose keys, types or values this edgeav cannot run. The precision table itself, hashes and files
are in :mod:`edgeav.engines.manifest`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from edgeav.errors import CheckpointError, OptionError

MANIFEST = "manifest.json"
ENGINE_FORMAT = "edgeav-engine"
ENGINE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Precision:
    """One ``--precision``: what each component runs in and which formats offer it."""

    name: str
    components: dict[str, str]
    formats: tuple[str, ...]
    summary: str


_SHA256_DIGITS = frozenset("0123456789abcdef")
_RECEIPT_LOGITS = ("max_abs_logit_diff", "mean_abs_logit_diff", "kl_mean", "kl_max", "top1_agreement", "steps")


def is_file_name(name) -> bool:
    """A plain file name: no folder part, no '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST) and "/" not in name
            and "\\" not in name and "\x00" not in name)


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def check_manifest(manifest, path: Path, precisions: Mapping[str, Precision]) -> None:
    """Refuse, in one line naming the key, a manifest whose keys, types or values this edgeav cannot run.

    ``precisions``: the precision table (:data:`edgeav.engines.manifest.PRECISIONS`); the backends and
    components an engine may name are those its rows name.
    """
    formats = tuple(dict.fromkeys(fmt for row in precisions.values() for fmt in row.formats))
    known_components = tuple(next(iter(precisions.values())).components)

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
    if backend not in formats:
        raise refuse("backend", f"{backend!r} is not one of {', '.join(formats)}")
    precision = need(manifest, "precision", str, "")
    if precision not in precisions:
        raise refuse("precision", f"{precision!r} is not one of {', '.join(precisions)}")
    if backend not in precisions[precision].formats:
        raise refuse("precision", f"{precision} is not offered for backend {backend}")
    components = need(manifest, "components", dict, "")
    if components != precisions[precision].components:
        raise refuse("components", f"{components!r} differs from what precision {precision} means "
                                   f"({precisions[precision].components!r})")
    _check_config(need(manifest, "config", dict, ""), refuse)

    files = need(manifest, "files", dict, "")
    if not files:
        raise refuse("files", "lists no files")
    for name, digest in files.items():
        if not is_file_name(name):
            raise refuse(f"files entry {name!r}", "is not a file name inside the engine directory (no folders, "
                                                  "'..' or absolute paths)")
        if not isinstance(digest, str) or len(digest) != 64 or not _SHA256_DIGITS.issuperset(digest):
            raise refuse(f"files.{name}", "must be a SHA-256 in 64 lowercase hex digits")

    def listed_file(container: dict, key: str, where: str) -> str:
        name = need(container, key, str, where)
        if not is_file_name(name):
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
        if component not in known_components:
            raise refuse(f"{where}.component", f"{component!r} is not one of {', '.join(known_components)}")
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
    from edgeav.systems.crab.config import CrabConfig

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
