"""Trace one module into an ONNX graph: fast where a check proves the fast way right, torch.export otherwise.

:func:`export_graph` first tries TorchScript's tracer (``torch.onnx.export(dynamo=False)``, seconds where
torch.export takes tens of seconds for the same graph). That tracer records one run at the example's shapes
and freezes a Python number taken from a size or a value (``float(x.shape[1])``, ``math.sqrt(n)``) into a
constant, so its graph is kept only when onnxruntime, run on a second input whose dynamic axes are twice as
long and whose float values differ, gives what the module gives (:func:`_agrees`). Otherwise, and for modules
of :data:`TORCHSCRIPT_MAX_BYTES` or more, the graph comes from ``torch.onnx.export(dynamo=True)``, whose
symbolic shapes need no such check. edgeav's fused ops have a translation for each tracer
(:func:`~edgeav.export.graphs.export_translations`, :func:`~edgeav.export.graphs.register_torchscript_symbolics`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeav.errors import EdgeavError, OptionError
from edgeav.export.graphs import GraphSpec, export_translations, register_torchscript_symbolics

OPSET = 18
TOOL_LOGGERS = ("torch.onnx", "torch._export", "onnxscript", "onnx_ir", "onnxruntime.quantization.matmul_nbits_quantizer",
                "root")
# ||onnxruntime - torch|| / ||torch|| a TorchScript trace may show on the check input, by the module's dtype
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
# TorchScript's exporter writes a graph past protobuf's 2 GB as one file per weight: larger modules go to
# torch.export, which writes one beside the graph.
TORCHSCRIPT_MAX_BYTES = 1_500_000_000


class Float16IO(nn.Module):
    """Runs ``inner`` in fp16 with fp32 inputs and outputs (the casts are part of the graph)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, *args: torch.Tensor):
        outputs = self.inner(*(a.half() if a.is_floating_point() else a for a in args))
        return tuple(o.float() for o in outputs) if isinstance(outputs, tuple) else outputs.float()


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """The loggers ``names`` (default: the export tools', :data:`TOOL_LOGGERS`) at ERROR while the block runs:
    they narrate every step, and the caller reports progress itself."""
    loggers = [logging.getLogger(name) for name in names or TOOL_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _silenced():
    """The exporters narrate every phase on stdout, warn and log; the caller reports progress itself."""
    with warnings.catch_warnings(), quiet_loggers(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


TRACERS = ("auto", "torchscript", "torch.export")


def export_graph(module: nn.Module, spec: GraphSpec, example: tuple[torch.Tensor, ...], path: Path, *,
                 tracer: str = "auto") -> str:
    """``module`` as the ONNX graph ``path`` with ``spec``'s names and named dynamic axes; -> the tracer that
    wrote it. ``tracer``: ``auto`` (the module docstring's rule), or one of the two (``torchscript`` fails
    when its check does)."""
    if tracer not in TRACERS:
        raise OptionError(f"tracer {tracer!r}: expected one of {', '.join(TRACERS)}")
    module = module.eval()
    if spec.fused_attention:
        register_torchscript_symbolics()
    if tracer == "torchscript" or tracer == "auto" and _bytes(module) < TORCHSCRIPT_MAX_BYTES:
        if _trace_torchscript(module, spec, example, path):
            return "torchscript"
        if tracer == "torchscript":
            raise EdgeavError(f"{path.stem}: TorchScript's trace failed or does not generalise; trace it with "
                              "torch.export")
    _trace_dynamo(module, spec, example, path)
    return "torch.export"


def _trace_dynamo(module: nn.Module, spec: GraphSpec, example: tuple[torch.Tensor, ...], path: Path) -> None:
    dims: dict[str, torch.export.Dim | str] = {}
    # a free axis goes to torch.onnx as its name: Dim.DYNAMIC, renamed to the label in the graph
    dynamic_shapes = tuple({axis: dims.setdefault(label, label if label in spec.free_axes else _dim(label))
                            for axis, label in spec.dynamic.get(name, {}).items()} or None for name in spec.inputs)
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(module.forward).parameters.values()):
        dynamic_shapes = {"args": dynamic_shapes}  # Float16IO.forward(*args)
    with _silenced():
        try:
            program = torch.onnx.export(module, example, dynamo=True, input_names=list(spec.inputs),
                                        output_names=list(spec.outputs), dynamic_shapes=dynamic_shapes,
                                        opset_version=OPSET, verbose=False,
                                        custom_translation_table=export_translations() if spec.fused_attention else None)
        except Exception as e:  # the exporter raises many types; keep the line that says what went wrong
            raise EdgeavError(f"torch.onnx.export failed for {path.stem}: {_summary(e)}") from e
    program.save(str(path))


def _trace_torchscript(module: nn.Module, spec: GraphSpec, example: tuple[torch.Tensor, ...], path: Path) -> bool:
    """Write ``path`` with TorchScript's tracer; False (and no file) when it fails or its graph does not
    generalise (:func:`_agrees`)."""
    with _silenced():
        try:
            torch.onnx.export(module, example, str(path), dynamo=False, input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=spec.dynamic, opset_version=OPSET)
            with torch.no_grad():
                shapes = [tuple(output.shape) for output in _as_tuple(module(*example))]
            kept = _agrees(module, path, spec, _check_input(spec, example), shapes)
            if kept:
                _declare_fixed_axes(path, spec, shapes)
        except Exception:  # an op the tracer cannot write, or a check input the module refuses
            kept = False
    if not kept:
        for file in (path, path.with_name(path.name + ".data")):
            file.unlink(missing_ok=True)
    return kept


def _check_input(spec: GraphSpec, example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``example`` with every dynamic axis twice as long (the example tiled, so ids, masks and lengths stay
    valid) and every float scaled elementwise by a factor in [0.5, 1.5), so that a size or a value the tracer
    froze into a constant shows."""
    generator = torch.Generator().manual_seed(0)
    check = []
    for name, tensor in zip(spec.inputs, example):
        repeats = [1] * tensor.ndim
        for axis in spec.dynamic.get(name, {}):
            repeats[axis] = 2
        tiled = tensor.repeat(*repeats) if tensor.ndim else tensor.clone()
        if tiled.is_floating_point():
            tiled = tiled * (0.5 + torch.rand(tiled.shape, generator=generator)).to(tiled.dtype)
        check.append(tiled)
    return tuple(check)


def _agrees(module: nn.Module, path: Path, spec: GraphSpec, check: tuple[torch.Tensor, ...],
            example_shapes: list[tuple[int, ...]]) -> bool:
    """Whether onnxruntime running ``path`` on ``check`` gives ``module``'s outputs (the same shapes, a
    relative error within :data:`CHECK_TOLERANCE`), and every output axis ``spec`` does not call dynamic
    keeps its size from the example (``example_shapes``)."""
    import onnxruntime

    with torch.no_grad():
        expected = _as_tuple(module(*check))
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: check[spec.inputs.index(i.name)].numpy() for i in session.get_inputs()}
    got = session.run(list(spec.outputs), feeds)
    tolerance = CHECK_TOLERANCE.get(_dtype(module), CHECK_TOLERANCE[torch.float32])
    if not len(expected) == len(got) == len(example_shapes):
        return False
    for name, want, have, example_shape in zip(spec.outputs, expected, got, example_shapes):
        want = want.detach().float().numpy()
        have = np.asarray(have, dtype=np.float32)
        dynamic = spec.dynamic.get(name, {})
        if want.shape != have.shape or any(want.shape[axis] != size for axis, size in enumerate(example_shape)
                                           if axis not in dynamic):
            return False
        if np.linalg.norm(want - have) > tolerance * max(float(np.linalg.norm(want)), 1e-12):
            return False
    return True


def _declare_fixed_axes(path: Path, spec: GraphSpec, shapes: list[tuple[int, ...]]) -> None:
    """Write each output axis that ``spec`` does not call dynamic as its size (TorchScript's tracer leaves
    sizes computed from a dynamic input's shape unnamed), so that the graph's declared shapes say what an
    engine's config is checked against."""
    graph_file = onnx.load(str(path), load_external_data=False)
    for output, shape in zip(graph_file.graph.output, shapes):
        dims = output.type.tensor_type.shape.dim
        dynamic = spec.dynamic.get(output.name, {})
        for axis, size in enumerate(shape):
            if axis not in dynamic and axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_value = size
    onnx.save(graph_file, str(path))


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _summary(error: Exception) -> str:
    """The exporter's own summary of ``error`` (its messages put it under '## Exception summary')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(error).__name__


def _dim(label: str) -> torch.export.Dim:
    # "past" may be 0 (prefill); every other axis has at least one element.
    return torch.export.Dim(label, min=0 if label == "past" else 1, max=1 << 16)


__all__ = ["OPSET", "TRACERS", "Float16IO", "export_graph", "quiet_loggers"]
