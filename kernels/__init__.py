"""Fused kernels (Triton) with pure-torch fallbacks, for the LLM's decode step.

- :func:`ilora_delta` / :func:`fused_ilora_forward`: the routed I-LoRA term of ``ILoRALinear`` in one
  launch (router softmax kept exact and per token).
- :class:`WeightOnlyLinear`, :class:`QuantizedILoRALinear`, :func:`quantize_llm_`: int8 (per channel)
  and int4 (grouped, two per byte) weight-only linear layers swapped into a ``Llama`` in place;
  :func:`weight_bytes` counts the weight bytes a decode step reads.

Triton is optional (``pip install "edgeav[gpu]"``) and imported only when a kernel runs: every function
takes ``backend`` (``auto``, ``torch``, ``triton``), and ``auto`` uses Triton for CUDA tensors when it is
installed, pure torch otherwise.
"""

from ._backend import BACKENDS, triton_available
from .ilora import fused_ilora_forward, ilora_delta
from .wquant import (
    GROUP_SIZES,
    MODES,
    QuantizedILoRALinear,
    WeightOnlyLinear,
    WeightQuantization,
    dequantize_weight,
    pack_int4,
    quantize_llm_,
    quantize_weight,
    unpack_int4,
    weight_bytes,
)

__all__ = [
    "BACKENDS", "GROUP_SIZES", "MODES", "QuantizedILoRALinear", "WeightOnlyLinear", "WeightQuantization",
    "dequantize_weight", "fused_ilora_forward", "ilora_delta", "pack_int4", "quantize_llm_", "quantize_weight",
    "triton_available", "unpack_int4", "weight_bytes",
]
