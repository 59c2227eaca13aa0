"""TensorRT: check ONNX graphs against TensorRT's ONNX parser, build engines.

Two halves, on purpose kept apart:

* :func:`check_graph` runs anywhere (onnx only). It compares every node of an
  exported graph, its subgraphs (``If`` / ``Loop`` / ``Scan`` bodies) and the
  bodies of the model's local functions (TensorRT's parser inlines them) with
  the operator support list that onnx-tensorrt publishes in
  ``docs/operators.md``, kept here as data in ``tensorrt_ops.json`` together
  with the TensorRT version and commit it documents (:func:`load_support`).
* :func:`build_engine` needs the optional ``tensorrt`` package (TensorRT 10) and
  an NVIDIA GPU. It was written against TensorRT 10's documented Python API
  (``trt.Logger``, ``trt.Builder``, ``trt.OnnxParser.parse_from_file``,
  ``IBuilderConfig.set_memory_pool_limit`` / ``set_flag`` /
  ``add_optimization_profile``, ``IOptimizationProfile.set_shape``,
  ``Builder.build_serialized_network``) and has never been executed: TensorRT
  cannot be installed on any machine this project is developed on.

Precisions: ``fp32``; ``fp16`` (``BuilderFlag.FP16``, TensorRT picks fp16
kernels where it is faster); ``int8`` (``BuilderFlag.INT8`` on a graph that
carries QuantizeLinear/DequantizeLinear pairs: explicit quantization, the
scales come from the graph, no calibrator; layers outside Q/DQ pairs stay fp32).
TensorRT 11 removed those builder flags (networks are always strongly typed),
so the build refuses any TensorRT other than 10 rather than guess.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from edgeav.errors import CheckpointError, EdgeavError, OptionError
from edgeav.outputs import atomic_path

log = logging.getLogger("edgeav")

TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")
SUPPORT_FILE = "tensorrt_ops.json"
ONNX_DOMAINS = ("", "ai.onnx")
# How many problems a refused build names; the full list comes from check_graph.
SHOWN_PROBLEMS = 3

Shape = tuple[int, ...]
ShapeProfile = tuple[Shape, Shape, Shape]


@dataclass(frozen=True)
class OperatorSupport:
    """One row of onnx-tensorrt's operator table."""

    supported: bool
    types: tuple[str, ...]  # data types, as the table spells them (FP32, FP16, BF16, INT32, ...)
    notes: str  # the table's restrictions column, verbatim


@dataclass(frozen=True)
class TensorRTSupport:
    """TensorRT's ONNX parser support list, as published for one TensorRT version."""

    source: str  # URL of the operators.md this was taken from, pinned to its commit
    tensorrt_version: str  # e.g. "10.15"
    commit: str  # onnx-tensorrt commit of that operators.md
    opset_range: tuple[int, int]  # inclusive range of default-domain opsets the parser accepts
    operators: Mapping[str, OperatorSupport]


@functools.cache
def load_support() -> TensorRTSupport:
    """Read ``tensorrt_ops.json`` once (it ships next to this module)."""
    resource = files(__package__).joinpath(SUPPORT_FILE)
    try:
        data = json.loads(resource.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeavError(f"{SUPPORT_FILE} is missing from the installed edgeav.export package; "
                          "reinstall edgeav (pip install --force-reinstall edgeav)") from None
    operators = {name: OperatorSupport(bool(row["supported"]), tuple(row["types"]), row["notes"])
                 for name, row in data["operators"].items()}
    low, high = data["opset_range"]
    return TensorRTSupport(data["source"], data["tensorrt_version"], data["commit"], (int(low), int(high)), operators)


def _load_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file; export the graph first")
    try:
        # Weights are irrelevant to operator support; do not read gigabytes of external data.
        return onnx.load(str(path), load_external_data=False)
    except DecodeError:
        raise CheckpointError(f"{path}: not an ONNX model (protobuf decoding failed); re-export it") from None


def _default_opset(opset_imports) -> int | None:
    versions = [entry.version for entry in opset_imports if entry.domain in ONNX_DOMAINS]
    return versions[0] if versions else None


def check_graph(model: onnx.ModelProto | str | Path) -> list[str]:
    """Everything in ``model`` that TensorRT's ONNX parser cannot import, one line each.

    An empty list means every node is an ai.onnx operator that the published list
    marks supported, inside the supported opset range. The list does not cover
    per-node restrictions (its ``notes``: constant inputs, ranks, modes), which
    only the parser itself checks. Each unsupported operator is reported once,
    with how many nodes use it and where the first one is.
    """
    model = _load_model(model)
    support = load_support()
    version = support.tensorrt_version
    low, high = support.opset_range
    problems: list[str] = []

    opset = _default_opset(model.opset_import)
    if opset is None:
        problems.append(f"the model imports no ai.onnx opset; TensorRT {version} parses opsets {low}..{high}: "
                        f"re-export with an opset_version in that range")
    elif not low <= opset <= high:
        problems.append(f"opset {opset} is outside the opsets TensorRT {version} parses ({low}..{high}); "
                        f"re-export with an opset_version in that range")

    functions = {(f.domain, f.name, f.overload): f for f in model.functions}
    # (domain, op_type) -> [reason, node count, where the first node is]
    found: dict[tuple[str, str], list] = {}
    visited_functions: set[tuple[str, str, str]] = set()

    def walk(nodes, where: str) -> None:
        for index, node in enumerate(nodes):
            label = f"{node.name!r}" if node.name else f"#{index}"
            key = (node.domain, node.op_type, node.overload)
            if key in functions:
                if key not in visited_functions:
                    visited_functions.add(key)
                    walk(functions[key].node, f"local function {node.domain}.{node.op_type}")
            else:
                reason = _unsupported_reason(node.domain, node.op_type, support)
                if reason:
                    entry = found.setdefault((node.domain, node.op_type), [reason, 0, f"node {label} in {where}"])
                    entry[1] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g.node, f"{node.op_type} {label}.{attribute.name}")
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for graph in attribute.graphs:
                        walk(graph.node, f"{node.op_type} {label}.{attribute.name}")

    walk(model.graph.node, "the main graph")
    for (domain, op_type), (reason, count, first) in found.items():
        name = f"{domain}::{op_type}" if domain not in ONNX_DOMAINS else op_type
        nodes = f"{count} node{'s' if count > 1 else ''}"
        problems.append(f"{name} ({nodes}, first: {first}): {reason}")
    return problems


def _unsupported_reason(domain: str, op_type: str, support: TensorRTSupport) -> str | None:
    version = support.tensorrt_version
    if domain not in ONNX_DOMAINS:
        return (f"domain {domain!r} is not ai.onnx and TensorRT {version}'s ONNX parser imports only ai.onnx "
                f"operators and local functions (anything else needs a TensorRT plugin); export it with standard ONNX operators")
    row = support.operators.get(op_type)
    if row is None:
        return (f"not in TensorRT {version}'s ONNX operator list; "
                f"rewrite it with supported operators or as a local function built from them")
    if not row.supported:
        return (f"marked unsupported in TensorRT {version}'s ONNX operator list; "
                f"rewrite it with supported operators or as a local function built from them")
    return None


def _graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Real inputs (not initializers) of the main graph: name -> dims, None where dynamic."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return inputs


def _check_profiles(profiles: Mapping[str, ShapeProfile], model: onnx.ModelProto, onnx_path: Path) -> None:
    inputs = _graph_inputs(model)
    for name, shapes in profiles.items():
        if name not in inputs:
            raise OptionError(f"profiles: {onnx_path.name} has no input {name!r}; "
                              f"expected one of {', '.join(inputs) or '(none)'}")
        if len(shapes) != 3:
            raise OptionError(f"profiles[{name!r}]: expected (min, opt, max) shapes, got {len(shapes)} shapes")
        dims = inputs[name]
        for which, shape in zip(("min", "opt", "max"), shapes):
            if len(shape) != len(dims):
                raise OptionError(f"profiles[{name!r}] {which} shape {tuple(shape)} has rank {len(shape)}; "
                                  f"input {name!r} has rank {len(dims)}")
            for axis, (size, fixed) in enumerate(zip(shape, dims)):
                if fixed is not None and size != fixed:
                    raise OptionError(f"profiles[{name!r}] {which} shape {tuple(shape)}: axis {axis} of input "
                                      f"{name!r} is fixed at {fixed} in the graph; use {fixed} there")
        low, opt, high = shapes
        # 0 is allowed: an empty KV cache is a real shape.
        if not all(0 <= a <= b <= c for a, b, c in zip(low, opt, high)):
            raise OptionError(f"profiles[{name!r}]: need 0 <= min <= opt <= max on every axis, "
                              f"got {tuple(low)}, {tuple(opt)}, {tuple(high)}")
    missing = [name for name, dims in inputs.items() if None in dims and name not in profiles]
    if missing:
        raise OptionError(f"profiles: input {missing[0]!r} of {onnx_path.name} has dynamic axes; "
                          f"add profiles[{missing[0]!r}] = (min_shape, opt_shape, max_shape)")


def _uses_quantization(model: onnx.ModelProto) -> bool:
    nodes = list(model.graph.node) + [node for function in model.functions for node in function.node]
    return any(node.op_type == "DequantizeLinear" and node.domain in ONNX_DOMAINS for node in nodes)


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, precision: str,
                 profiles: Mapping[str, ShapeProfile], workspace_gb: float = 4.0) -> Path:
    """Build a serialized TensorRT 10 engine from an ONNX graph and write it atomically.

    ``profiles`` maps each input with dynamic axes to its (min, opt, max) shapes;
    they form one optimization profile. The graph is checked with
    :func:`check_graph` first and refused with its first problems. Needs the
    ``tensorrt`` package (TensorRT 10) and an NVIDIA GPU; written against the
    documented API and never executed (see the module docstring).
    """
    if precision not in TENSORRT_PRECISIONS:
        raise OptionError(f"precision {precision!r} is not a TensorRT build precision; "
                          f"expected one of {', '.join(TENSORRT_PRECISIONS)}")
    if not workspace_gb > 0:
        raise OptionError(f"workspace_gb {workspace_gb!r} must be a positive number of GiB, e.g. 4")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = _load_model(onnx_path)
    problems = check_graph(model)
    if problems:
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
        raise CheckpointError(f"{onnx_path}: TensorRT {load_support().tensorrt_version} cannot parse this graph: "
                              f"{shown}{more}")
    _check_profiles(profiles, model, onnx_path)
    if precision == "int8" and not _uses_quantization(model):
        raise OptionError(f"precision 'int8' builds from Q/DQ graphs (explicit quantization, no calibrator) and "
                          f"{onnx_path.name} has no DequantizeLinear node; quantize the graph first or pick fp16")
    del model  # the parser reads the file itself, external weights included

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise CheckpointError(f"{onnx_path}: TensorRT's ONNX parser refused it: {'; '.join(errors[:SHOWN_PROBLEMS])}; "
                              f"the operators passed check_graph, so see the restrictions in {SUPPORT_FILE}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, tuple(low), tuple(opt), tuple(high))
        config.add_optimization_profile(profile)

    log.info("building a %s TensorRT %s engine from %s", precision, trt.__version__, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckpointError(f"{onnx_path}: TensorRT could not build the {precision} engine (its log above says why); "
                              f"try a larger workspace_gb than {workspace_gb} or precision 'fp32'")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(engine_path) as temporary:  # a reader never sees half an engine
        temporary.write_bytes(serialized)
    return engine_path


def import_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise OptionError(f"building a TensorRT engine needs the 'tensorrt' package, TensorRT 10 ({detail}); "
                          f"on a machine with an NVIDIA GPU run: pip install \"edgeav[tensorrt]\"") from None
    major = trt.__version__.split(".")[0]
    if major != "10":
        raise OptionError(f"building a TensorRT engine needs TensorRT 10 and tensorrt {trt.__version__} is installed; "
                          f"run: pip install \"tensorrt>=10,<11\"")
    return trt


def build_engines(folder: Path, graphs: dict[str, dict], profiles: Callable[[str], dict[str, ShapeProfile]],
                  precision: str, progress=lambda message: None) -> dict[str, dict]:
    """Build ``folder``'s ONNX graphs into TensorRT engines (``.plan``); the ONNX files make way for them.

    ``profiles``: component -> its optimization profile (the system's ``profiles`` for its config)."""
    import_tensorrt()
    built = {}
    for name, entry in graphs.items():
        onnx_path = folder / entry["file"]
        # Per graph: in the int8 row the LLM stays fp32.
        plan = build_engine(onnx_path, onnx_path.with_suffix(".plan"), precision=entry["precision"],
                            profiles=profiles(entry["component"]))
        onnx_path.unlink()
        onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)
        built[name] = {**entry, "file": plan.name}
        progress(f"{name}: TensorRT {precision} engine, {plan.stat().st_size / 1e6:.1f} MB")
    return built
