"""Quantization of exported graphs: int8 static QDQ (encoders, decoders) and int4 weight-only (LLM).

int8 calibrates on feeds that the system computes with its PyTorch reference
(each system's ``export.py`` says from what inputs): activations are
symmetric and weights per-channel, the QDQ form TensorRT's explicit
quantization reads. The LLM's int4 and int8w replace each of its weight MatMuls by onnxruntime's
``MatMulNBits`` (4 or 8 bits, symmetric blocks of ``block_size``); the I-LoRA's A, B and
router MatMuls stay fp32, found by the names of the initializers they read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from edgeav.errors import EdgeavError
from edgeav.models.ilora import ILoRALinear

# I-LoRA parameters (ILoRALinear): the runtime keeps them, and the router, in full precision.
LORA_PARAMETERS = ("lora_A", "lora_B", "lora_route")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_int8_qdq(source: Path, target: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Static int8 QDQ of the graph ``source`` into ``target``, calibrated (min/max) on ``feeds``: MatMul,
    Gemm and Conv with per-channel symmetric weights and symmetric activations."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise EdgeavError(f"{source}: no calibration inputs, so int8 cannot choose its scales")
    quantize_static(
        str(source), str(target), _Reader(feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"], per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


def lora_matmuls(model: onnx.ModelProto, lora_weights: list[np.ndarray]) -> list[str]:
    """Names of the MatMul nodes whose weight is one of ``lora_weights`` (the I-LoRA's A, B and router).

    The exporter folds each weight's transpose into a fresh, anonymous initializer, so
    they are found by content: an initializer equal to a LoRA weight or its transpose.
    """
    wanted = {}
    for weight in lora_weights:
        for candidate in (weight, weight.T):
            array = np.ascontiguousarray(candidate, np.float32)
            wanted[(array.shape, hashlib.sha256(array.tobytes()).hexdigest())] = True
    produced_by = {out: node for node in model.graph.node for out in node.output}
    initializers = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = node.input[1]
        producer = produced_by.get(weight)
        if producer is not None and producer.op_type == "Transpose":
            weight = producer.input[0]
        if weight in initializers:
            array = np.ascontiguousarray(numpy_helper.to_array(initializers[weight]), np.float32)
            if (array.shape, hashlib.sha256(array.tobytes()).hexdigest()) in wanted:
                found.append(node.name)
    return found


def lora_weights(llm: torch.nn.Module) -> list[np.ndarray]:
    """Every I-LoRA weight of ``llm`` (A, B and router) as fp32 arrays."""
    return [getattr(m, name).detach().float().numpy() for m in llm.modules() if isinstance(m, ILoRALinear)
            for name in LORA_PARAMETERS]


def quantize_weights(source: Path, target: Path, bits: int, block_size: int, llm: torch.nn.Module,
                     accuracy_level: int) -> None:
    """Weight-only ``bits`` (4 or 8: MatMulNBits, symmetric, ``block_size`` per block, activations computed as
    ``accuracy_level`` says: :data:`~edgeav.engines.manifest.INT4_ACCURACY_LEVELS`) of every weight MatMul of
    the exported ``llm`` except its I-LoRA's (an LLM without LoRA: every weight MatMul)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    weights = lora_weights(llm)
    excluded = lora_matmuls(model, weights)
    if len(excluded) != len(weights):
        raise EdgeavError(f"{source}: found {len(excluded)} of the {len(weights)} I-LoRA MatMuls to keep in fp32; "
                          f"{bits}-bit weights would quantize the rest of the LoRA, so it stops here")
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=excluded)
    quantizer.process()
    weights = sum(i.ByteSize() for i in quantizer.model.model.graph.initializer)
    # protobuf caps one file at 2 GB: a 7B graph keeps its weights in target + ".data".
    quantizer.model.save_model_to_file(str(target), use_external_data_format=weights > 1.5e9)
