"""The schema of an engine's ``manifest.json``: its format name and version, the shape of a
precision row, and :func:`check_manifest`, which refuses in one line (naming the key) a manifest
whose keys, types or values this edgeav cannot run. The generic keys are checked here; the
system's own keys, config and receipt by its :class:`~edgeav.engines.spec.SystemExport`
through a :class:`ManifestCheck`. The precision tables, hashes and files are in
:mod:`edgeav.engines.manifest`.
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


# Engines written before manifests named their system are Crab's (the only system that exported then).
LEGACY_SYSTEM = "crab"


class ManifestCheck:
    """The refusals of one manifest check: each names ``path``, the key and the fix, in one line."""

    def __init__(self, path: Path, files: Mapping[str, str] | None = None) -> None:
        self.path = path
        self.files = files or {}

    def refuse(self, key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {key} {problem}; export the engine again")

    @staticmethod
    def kind(value) -> str:
        return _kind(value)

    def need(self, container: dict, key: str, kind: type | tuple, where: str, *, optional: bool = False):
        """``container[key]``, which must be of ``kind`` (None when ``optional`` and absent)."""
        name = f"{where}.{key}" if where else key
        if key not in container:
            if optional:
                return None
            raise self.refuse(name, "is missing")
        value = container[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise self.refuse(name, f"must be {_kind_name(kind)}, not {_kind(value)}")
        return value

    def listed_file(self, container: dict, key: str, where: str) -> str:
        """``container[key]``: a plain file name that ``files`` lists (so it is verified before use)."""
        name = self.need(container, key, str, where)
        label = f"{where}.{key}" if where else key
        if not is_file_name(name):
            raise self.refuse(label, f"{name!r} is not a file name inside the engine directory (no folders, "
                                     "'..' or absolute paths)")
        if name not in self.files:
            raise self.refuse(label, f"{name!r} is not listed in files, so it cannot be verified")
        return name


def check_manifest(manifest, path: Path, spec=None) -> None:
    """Refuse, in one line naming the key, a manifest whose keys, types or values this edgeav cannot run.

    ``spec``: the :class:`~edgeav.engines.spec.SystemExport` of the manifest's system (default: the one
    its ``system`` field names, Crab's when it has none); its precision table says which backends,
    components and precisions an engine may name, and it checks the system's own keys and receipt.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != ENGINE_FORMAT:
        raise CheckpointError(f"{path}: not an edgeav engine manifest; export the engine again")
    version = manifest.get("format_version")
    if type(version) is not int or version != ENGINE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: engine format version {version!r}, this edgeav reads "
                              f"{ENGINE_FORMAT_VERSION}; export the engine again with this version")
    if spec is None:
        from edgeav.engines.spec import system_export

        spec = system_export(manifest.get("system", LEGACY_SYSTEM), path)
    precisions = spec.precisions
    formats = tuple(dict.fromkeys(fmt for row in precisions.values() for fmt in row.formats))
    known_components = tuple(spec.components)
    check = ManifestCheck(path)
    need = check.need

    backend = need(manifest, "backend", str, "")
    if backend not in formats:
        raise check.refuse("backend", f"{backend!r} is not one of {', '.join(formats)}")
    precision = need(manifest, "precision", str, "")
    if precision not in precisions:
        raise check.refuse("precision", f"{precision!r} is not one of {', '.join(precisions)}")
    if backend not in precisions[precision].formats:
        raise check.refuse("precision", f"{precision} is not offered for backend {backend}")
    components = need(manifest, "components", dict, "")
    if components != precisions[precision].components:
        raise check.refuse("components", f"{components!r} differs from what precision {precision} means "
                                         f"({precisions[precision].components!r})")
    check_config(need(manifest, "config", dict, ""), spec.config_class, spec.config_from_dict, check)

    files = need(manifest, "files", dict, "")
    if not files:
        raise check.refuse("files", "lists no files")
    for name, digest in files.items():
        if not is_file_name(name):
            raise check.refuse(f"files entry {name!r}", "is not a file name inside the engine directory (no "
                                                        "folders, '..' or absolute paths)")
        if not isinstance(digest, str) or len(digest) != 64 or not _SHA256_DIGITS.issuperset(digest):
            raise check.refuse(f"files.{name}", "must be a SHA-256 in 64 lowercase hex digits")
    check.files = files

    check.listed_file(manifest, "tokenizer", "")
    if "tokenizer_config" in manifest:  # engines from before the tokenizer's settings were kept lack it
        check.listed_file(manifest, "tokenizer_config", "")
    graphs = need(manifest, "graphs", dict, "")
    for name, entry in graphs.items():
        where = f"graphs.{name}"
        if not isinstance(entry, dict):
            raise check.refuse(where, f"must be an object, not {_kind(entry)}")
        check.listed_file(entry, "file", where)
        component = need(entry, "component", str, where)
        if component not in known_components:
            raise check.refuse(f"{where}.component", f"{component!r} is not one of {', '.join(known_components)}")
        if need(entry, "precision", str, where) != components[component]:
            raise check.refuse(f"{where}.precision", f"{entry['precision']!r} differs from components.{component} "
                                                     f"({components[component]})")
    spec.check_layout(manifest, check)

    for key in ("tools", "source", "options"):
        need(manifest, key, dict, "", optional=True)
    for key in ("cache_key", "created", "system"):
        need(manifest, key, str, "", optional=True)
    for tool, version in manifest.get("tools", {}).items():
        if not isinstance(version, str):
            raise check.refuse(f"tools.{tool}", f"must be a version string, not {_kind(version)}")
    receipt = need(manifest, "receipt", dict, "", optional=True)
    if receipt is not None:
        if "skipped" in receipt:
            need(receipt, "skipped", str, "receipt")
        else:
            spec.check_receipt(receipt, check)


def check_logit_stats(logits: dict, check: ManifestCheck, where: str = "receipt.logits") -> None:
    """A receipt's logit statistics (:func:`edgeav.export.receipt.logit_stats`): empty when no step was
    compared, else every statistic a number."""
    if logits:
        for key in _RECEIPT_LOGITS:
            check.need(logits, key, (int, float), where)


def check_config(config: dict, config_class: type, from_dict, check: ManifestCheck) -> None:
    """Every part and field of the model config present, with the type of its default (nested parts checked
    field by field; None where the field's annotation allows it), and accepted by ``from_dict``."""
    _check_fields(config, config_class(), "config", check, nested=False)
    try:
        from_dict(config)
    except (OptionError, TypeError, ValueError) as e:
        raise check.refuse("config", f"is not a valid model config ({e})") from None


def _check_fields(values: dict, defaults, where: str, check: ManifestCheck, *, nested: bool) -> None:
    fields = {f.name: f for f in dataclasses.fields(defaults) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise check.refuse(f"{where}.{unknown[0]}", "is not a model config field")
    for name, part in fields.items():
        key = f"{where}.{name}"
        if name not in values:
            raise check.refuse(key, "is missing")
        value, default, annotation = values[name], getattr(defaults, name), str(part.type)
        if value is None and "None" in annotation:  # an optional component the model does not hold
            continue
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise check.refuse(key, f"must be an object, not {_kind(value)}")
            _check_fields(value, default, key, check, nested=True)
        elif not _same_kind(value, default, annotation):
            shown = f" {value!r}" if nested else ""
            raise check.refuse(key, f"must be {_describe_kind(default, annotation)}, not {_kind(value)}{shown}")


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
