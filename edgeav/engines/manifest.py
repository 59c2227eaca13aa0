"""Engine directories: the formats and precisions table, ``manifest.json``, hashes.

An engine directory holds one file per component graph, the token embedding
tables, the tokenizer and ``manifest.json``: format version, the system, model
config, backend, precision per component, the digest of the source checkpoint,
the SHA-256 of every file, tool versions and the fidelity receipt. Loading checks
all of it (the keys and types through :mod:`edgeav.engines.manifest_schema`, the
system's own keys, config and graph shapes through its
:class:`~edgeav.engines.spec.SystemExport`) and refuses a mismatch with one line
naming the file and the fix. Engines without a ``system`` field are Crab's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgeav.engines.manifest_schema import LEGACY_SYSTEM, MANIFEST, Precision, check_manifest, is_file_name
from edgeav.engines.spec import ROLE_LLM, ROLE_REST, ROLES, system_export
from edgeav.errors import CheckpointError, OptionError
from edgeav.outputs import atomic_path
from edgeav.weight_files import read_json

FORMATS = ("onnx", "tensorrt")
INT4_BLOCK_SIZES = (32, 64, 128)
# Blocks of 128 (GPTQ's and AWQ's usual group): 4.25 bits a weight with MatMulNBits' fp32 scales, against
# Q4_0's 4.5 and blocks of 32's 5; onnxruntime's CPU kernels decode fastest with them.
DEFAULT_BLOCK_SIZE = 128
# MatMulNBits' accuracy_level: what its activations are computed in (1 fp32, 2 fp16, 3 bf16, 4 int8, the
# weights dequantized block by block into that type). 4 decodes fastest on a CPU; the receipt shows its cost.
INT4_ACCURACY_LEVELS = {1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}
DEFAULT_INT4_ACCURACY = 4
# The LLM's weight-only precisions (MatMulNBits) and their bits; "int8w" is the int8 row's LLM.
WEIGHT_ONLY_BITS = {"int8w": 8, "int4": 4}

# The generic precisions, by role: what the LLM runs in, what every other component (encoders and
# decoders) runs in. A system's table (:func:`precision_rows`) spells them out over its components.
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", {ROLE_LLM: "fp32", ROLE_REST: "fp32"}, ("onnx", "tensorrt"),
              "every component in fp32: the reference's numbers"),
    Precision("fp16", {ROLE_LLM: "fp16", ROLE_REST: "fp16"}, ("onnx", "tensorrt"),
              "every component in fp16 (inputs and outputs stay fp32)"),
    Precision("int8", {ROLE_LLM: "int8w", ROLE_REST: "int8"}, ("onnx", "tensorrt"),
              "encoders and decoders int8 (static QDQ, calibrated on the system's demo inputs); LLM weights 8-bit "
              "(int8w: MatMulNBits, a LoRA and its router fp32; fp32 in a TensorRT engine, whose parser has no "
              "MatMulNBits)"),
    Precision("int4", {ROLE_LLM: "int4", ROLE_REST: "fp32"}, ("onnx",),
              "LLM weights int4 (MatMulNBits; a LoRA and its router stay fp32); the rest fp32"),
)}


def precision_rows(components: dict[str, str], summaries: dict[str, str] | None = None) -> dict[str, Precision]:
    """A system's precision table: each generic precision spelled out over ``components`` (name -> role),
    with the system's own one-line ``summaries`` where given."""
    for name, role in components.items():
        if role not in ROLES:
            raise ValueError(f"component {name!r}: role {role!r} is not one of {', '.join(ROLES)}")
    summaries = summaries or {}
    return {p.name: Precision(p.name, {name: p.components[role] for name, role in components.items()}, p.formats,
                              summaries.get(p.name, p.summary)) for p in PRECISIONS.values()}


def check_export_options(fmt: str, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                         accuracy_level: int = DEFAULT_INT4_ACCURACY) -> Precision:
    """The generic precision row for ``--format``/``--precision``/``--block-size``/``--accuracy-level``, or a
    one-line OptionError."""
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
    if accuracy_level not in INT4_ACCURACY_LEVELS:
        levels = ", ".join(f"{level} ({kind})" for level, kind in INT4_ACCURACY_LEVELS.items())
        raise OptionError(f"--accuracy-level {accuracy_level}: expected one of {levels}")
    return row


def precision_table(precisions: dict[str, Precision]) -> str:
    """A system's formats and precisions table in Markdown (README and docs)."""
    components = list(next(iter(precisions.values())).components)
    lines = ["| precision | " + " | ".join(components) + " | formats | what it is |",
             "|---" * (len(components) + 3) + "|"]
    for p in precisions.values():
        parts = " | ".join(p.components[c] for c in components)
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
    """``data`` as indented JSON at ``path``, written whole or not at all (see :func:`edgeav.outputs.atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=1) + "\n")


def read_manifest(folder: Path) -> dict:
    """The manifest of an engine directory, its schema checked (not yet the files' hashes: see verify_files)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such engine directory; build one with `edgeav export`")
    if not path.is_file():
        raise CheckpointError(f"{folder}: has no {MANIFEST}, so it is not an engine directory; "
                              "build one with `edgeav export`")
    manifest = read_json(path, fix="export the engine again")
    check_manifest(manifest, path)
    return manifest


def manifest_system(manifest: dict) -> str:
    """The system an engine belongs to (engines from before the ``system`` field are Crab's)."""
    return manifest.get("system", LEGACY_SYSTEM)


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
    spec = system_export(manifest_system(manifest), folder / MANIFEST)
    config = spec.config_from_dict(manifest["config"])
    for entry in manifest["graphs"].values():
        if entry["file"].endswith(".onnx"):
            path = folder / entry["file"]
            model = _load_graph(path)
            for name in _external_data(model):
                if not is_file_name(name) or name not in files:
                    raise CheckpointError(f"{path}: reads external data {name!r}, which "
                                          f"{MANIFEST} does not list as a file of the engine; export the engine again")
            _check_graph_shapes(model, spec.expected_shapes(entry["component"], config), path)
    for table in spec.embed_tables(manifest):
        _check_embed_table(folder / table, config)


def _dims(dims: tuple) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _check_graph_shapes(model, expected: dict[str, tuple], path: Path) -> None:
    """Refuse a graph whose declared shapes disagree with ``expected``, what the manifest's config
    says (an edited manifest)."""
    declared = {}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        declared[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    for name, want in expected.items():
        have = declared.get(name)
        if have is None:
            raise CheckpointError(f"{path}: the manifest's config does not match its graphs (it needs a {name!r} input "
                                  "or output the graph lacks: an edited manifest, or an engine of an older edgeav); "
                                  "export the engine again")
        if len(have) != len(want) or any(w is not None and h is not None and h != w for h, w in zip(have, want)):
            raise CheckpointError(f"{path}: the manifest's config does not match its graphs ({name} is "
                                  f"{_dims(have)}, the config needs {_dims(want)}); export the engine again")
    unexpected = sorted(set(declared) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: the manifest's config does not match its graphs (the graph has a "
                              f"{unexpected[0]!r} input or output the config does not give); export the engine again")


def _check_embed_table(path: Path, config) -> None:
    """The embedding table's header against the config (the table itself stays unread)."""
    import numpy as np

    want = (config.llm.vocab_size, config.llm.hidden_size)
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable embedding table ({e}); export the engine again") from None
    if table.shape != want:
        raise CheckpointError(f"{path}: the manifest's config does not match its graphs (embedding table "
                              f"{list(table.shape)}, the config needs {list(want)}); export the engine again")


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


def _load_graph(path: Path):
    """An ONNX graph without its external data (its weights stay unread)."""
    import onnx  # only engine loading pays for it
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable ONNX graph ({e}); export the engine again") from None


def _external_data(model) -> list[str]:
    """Locations of the external data a loaded ONNX graph refers to."""
    import onnx

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
