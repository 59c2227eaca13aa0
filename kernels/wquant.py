"""Weight-only int8 / int4 linear layers for the LLM, and the step that swaps them into a :class:`Llama`.

Schemes (activations stay in the compute dtype; only the stored weights shrink):

``int8``
    per-output-channel symmetric: ``w[n, k] ≈ q[n, k] * scale[n]``, ``q`` int8 in [-127, 127].
``int4``
    group-wise asymmetric (``group_size`` input features per group, 32, 64 or 128):
    ``w[n, k] ≈ q[n, k] * scale[n, g] + offset[n, g]``, ``q`` in [0, 15], ``g = k // group_size``;
    ``offset`` is the group minimum, so each group spends all 16 levels on its own range. Two ``q``
    share a byte: feature ``2j`` in the low nibble, ``2j + 1`` in the high nibble of byte ``j``. Rows
    are zero-padded to a whole number of groups (crab-tiny's MLP has 344 features), and the padding
    never reaches the output because the matching inputs count as zero.

Scales and offsets are stored in the dtype of the weight they were computed from (they follow later
``module.to(dtype)`` calls like any floating buffer), and the integers are computed from the stored,
rounded scales, so the dequantized weight is exactly what the kernels use.

On CUDA with Triton the forward is a skinny-GEMM kernel that reads the integers and dequantizes them
in registers, so a decode step moves a quarter (int8: half) of the fp16 weight bytes. Elsewhere the
forward dequantizes the whole weight on every call and runs ``F.linear``: the memory saving is kept
(no dequantized copy is cached) at the cost of extra CPU work per call.

For :class:`ILoRALinear` projections only the base weight is quantized; the LoRA parameters (``lora_A``,
``lora_B``, ``lora_route``) are kept, the very same tensors, in the compute dtype, and the routed term is
added by :func:`edgeav.kernels.ilora_delta` exactly as the reference computes it.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError

from ._backend import import_triton, triton_kernels, use_triton
from .ilora import ilora_delta

if TYPE_CHECKING:  # imported where used, so that edgeav.models.llama may itself import edgeav.kernels
    from edgeav.models.ilora import ILoRALinear
    from edgeav.models.llama import Llama

__all__ = [
    "GROUP_SIZES", "MODES", "QuantizedILoRALinear", "WeightOnlyLinear", "WeightQuantization",
    "dequantize_weight", "pack_int4", "quantize_llm_", "quantize_weight", "unpack_int4", "weight_bytes",
]

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class WeightQuantization:
    """How a model's weights were quantized; :func:`quantize_llm_` records it as ``llm.weight_quantization``.

    ``mode``: ``int8`` or ``int4``. ``group_size``: input features per int4 scale (None for int8,
    whose scales are per output channel). ``lm_head``: whether the output projection is quantized too.
    """

    mode: str
    group_size: int | None
    lm_head: bool


def check_scheme(mode: str, group_size: int) -> None:
    """Refuse an unknown mode or an int4 group size the kernels do not support, with the fix."""
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"weight quantization mode {mode!r} is unknown; expected one of {', '.join(MODES)}.{hint}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise OptionError(
            f"int4 group_size {group_size!r} is not supported; expected one of {', '.join(map(str, GROUP_SIZES))} "
            f"(input features per scale)"
        )


def pack_int4(q: Tensor) -> Tensor:
    """[..., 2m] integers in 0..15 -> [..., m] uint8, feature 2j in the low nibble of byte j, 2j+1 in the high."""
    if q.shape[-1] % 2:
        raise OptionError(f"pack_int4: the last dimension is {q.shape[-1]}; it must be even (two values per byte)")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: [..., m] uint8 -> [..., 2m] uint8 in 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_weight(weight: Tensor, mode: str, group_size: int = 128) -> dict[str, Tensor]:
    """Quantize a [out, in] weight; returns the buffers of a :class:`WeightOnlyLinear`.

    int8: ``qweight`` int8 [out, in], ``scales`` [out]. int4: ``qweight`` uint8 [out, padded_in / 2],
    ``scales`` and ``offsets`` [out, padded_in / group_size], ``padded_in`` the next multiple of
    ``group_size``. Scales and offsets have ``weight``'s dtype.
    """
    check_scheme(mode, group_size)
    if weight.dim() != 2:
        raise OptionError(
            f"quantize_weight: weight has shape {tuple(weight.shape)}; expected [out_features, in_features]"
        )
    store = weight.dtype
    w = weight.detach().float()
    if mode == "int8":
        scales = (w.abs().amax(dim=1) / 127).to(store)
        q = torch.round(w / _nonzero(scales.float())[:, None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    out_features, in_features = w.shape
    padded = math.ceil(in_features / group_size) * group_size
    groups = F.pad(w, (0, padded - in_features)).view(out_features, padded // group_size, group_size)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scales, offsets = ((high - low) / 15).to(store), low.to(store)
    q = torch.round((groups - offsets.float()[..., None]) / _nonzero(scales.float())[..., None]).clamp_(0, 15)
    return {"qweight": pack_int4(q.view(out_features, padded)), "scales": scales, "offsets": offsets}


def dequantize_weight(qweight: Tensor, scales: Tensor, offsets: Tensor | None = None, *,
                      in_features: int | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The [out, in] weight that :func:`quantize_weight`'s buffers stand for, in ``dtype`` (default: the
    scales' dtype). int4 is recognised by its ``offsets``; ``in_features`` cuts off its padding."""
    dtype = dtype or scales.dtype
    if offsets is None:
        return (qweight.float() * scales.float()[:, None]).to(dtype)
    out_features, groups = scales.shape
    q = unpack_int4(qweight).view(out_features, groups, -1).float()
    weight = (q * scales.float()[..., None] + offsets.float()[..., None]).view(out_features, -1)
    return weight[:, :in_features].to(dtype)


def _nonzero(scales: Tensor) -> Tensor:
    # An all-zero row or group has scale 0; any divisor gives q = 0 there.
    return torch.where(scales == 0, torch.ones_like(scales), scales)


class WeightOnlyLinear(nn.Module):
    """Bias-free linear layer holding an int8 or int4 weight (see the module docstring for the schemes).

    Buffers: ``qweight``, ``scales`` and, for int4, ``offsets``. ``backend`` (``auto``, ``torch``,
    ``triton``) picks the forward's implementation; ``auto`` uses the Triton kernel on CUDA when Triton
    is installed.
    """

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        check_scheme(mode, group_size)
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.group_size = group_size if mode == "int4" else None
        self.backend = "auto"
        if mode == "int8":
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.zeros(out_features, dtype=dtype, device=device))
            self.register_buffer("offsets", None)
        else:
            groups = math.ceil(in_features / group_size)
            self.register_buffer("qweight", torch.zeros(out_features, groups * group_size // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("offsets", torch.zeros(out_features, groups, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: Tensor, mode: str, group_size: int = 128) -> "WeightOnlyLinear":
        """A layer computing ``x @ weight.T`` from the quantized ``weight`` [out, in]."""
        layer = cls(weight.shape[1], weight.shape[0], mode, group_size, dtype=weight.dtype, device=weight.device)
        layer._load_quantized(weight)
        return layer

    def _load_quantized(self, weight: Tensor) -> None:
        for name, tensor in quantize_weight(weight, self.mode, self.group_size or 128).items():
            setattr(self, name, tensor)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized [out, in] weight (a fresh tensor; the layer keeps only the integers)."""
        return dequantize_weight(self.qweight, self.scales, self.offsets, in_features=self.in_features, dtype=dtype)

    def __getattr__(self, name: str):
        if name == "weight":  # callers that read layer.weight for its dtype or device land here
            raise AttributeError(
                f"{type(self).__name__} holds no float weight, only {self.mode} codes (qweight) and scales; "
                f"use dequantize() for the weight, scales.dtype and qweight.device for its dtype and device"
            )
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise OptionError(f"{type(self).__name__}: input has {x.shape[-1]} features; expected {self.in_features}")
        if use_triton(type(self).__name__, x, self.backend):
            return _weight_only_matmul_triton(x, self)
        # Dequantized per call, never cached: a cached copy would undo the memory saving.
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}"


class QuantizedILoRALinear(WeightOnlyLinear):
    """An :class:`ILoRALinear` whose base weight is int8/int4 and whose I-LoRA and bias stay exact.

    Same forward as the original: ``W_q x + b + scale * lora_B (softmax(lora_route x) ⊗ lora_A x)`` (``b``
    only when the layer has a bias, as Qwen2.5's q, k and v projections do); the LoRA parameters and the
    bias keep their names, so their state dict keys do not change.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, heads: int, scale: float, mode: str,
                 group_size: int = 128, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 bias: bool = False):
        super().__init__(in_features, out_features, mode, group_size, dtype, device)
        self.rank, self.heads, self.scale = rank, heads, scale
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, heads * rank, dtype=dtype, device=device))
        self.lora_route = nn.Parameter(torch.zeros(heads, in_features, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_ilora(cls, layer: ILoRALinear, mode: str, group_size: int = 128) -> "QuantizedILoRALinear":
        """Quantize ``layer.weight``; the new layer shares ``layer``'s LoRA parameters and bias (the same
        tensors)."""
        weight = layer.weight
        quantized = cls(layer.in_features, layer.out_features, layer.rank, layer.heads, layer.scale, mode,
                        group_size, dtype=weight.dtype, device=weight.device, bias=layer.bias is not None)
        quantized._load_quantized(weight)
        quantized.lora_A, quantized.lora_B, quantized.lora_route = layer.lora_A, layer.lora_B, layer.lora_route
        if layer.bias is not None:
            quantized.bias = layer.bias
        return quantized

    def forward(self, x: Tensor) -> Tensor:
        base = super().forward(x)
        if self.bias is not None:
            base = base + self.bias
        return ilora_delta(x, self.lora_A, self.lora_B, self.lora_route, self.scale, out=base, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, heads={self.heads}, scale={self.scale}"


def quantize_llm_(llm: Llama, mode: str, group_size: int = 128, *, lm_head: bool = True) -> Llama:
    """Replace, in place, every projection of ``llm``'s decoder layers (and ``lm_head`` unless
    ``lm_head=False``) with its weight-only ``mode`` version; returns ``llm``.

    ``nn.Linear`` becomes :class:`WeightOnlyLinear`, ``ILoRALinear`` becomes :class:`QuantizedILoRALinear`
    with the same LoRA tensors. ``Llama.forward`` runs unchanged. The output projection is quantized by
    default: it is the largest single matrix (vocab x hidden) read every decode step, and with
    per-channel int8 or 128-wide int4 groups its error stays small next to the decoder's; pass
    ``lm_head=False`` to keep it exact. Embeddings, norms and the KV cache are untouched. The scheme is
    recorded as ``llm.weight_quantization`` (a :class:`WeightQuantization`).
    """
    from edgeav.models.ilora import ILoRALinear

    check_scheme(mode, group_size)
    if getattr(llm, "weight_quantization", None) is not None:
        raise OptionError(
            f"quantize_llm_: this model is already quantized ({llm.weight_quantization.mode}); "
            f"quantize a model loaded from its floating-point checkpoint"
        )
    with torch.no_grad():
        for layer in llm.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, ILoRALinear):
                        setattr(parent, name, QuantizedILoRALinear.from_ilora(child, mode, group_size))
                    elif isinstance(child, nn.Linear):
                        setattr(parent, name, _from_linear(child, mode, group_size))
        if lm_head:
            llm.lm_head = _from_linear(llm.lm_head, mode, group_size)
    llm.weight_quantization = WeightQuantization(mode, group_size if mode == "int4" else None, lm_head)
    return llm


def _from_linear(linear: nn.Linear, mode: str, group_size: int) -> WeightOnlyLinear:
    if linear.bias is not None:
        raise OptionError(f"weight-only quantization covers bias-free linear layers; {linear} has a bias")
    return WeightOnlyLinear.from_weight(linear.weight, mode, group_size)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of weights one decode step reads from ``module``: every parameter and persistent buffer
    (quantized integers, scales, offsets, LoRA, norms), except that an ``nn.Embedding`` counts one row,
    the one a token looks up. The KV cache, RoPE tables and masks are not weights and are left out."""
    total, seen = 0, set()
    for submodule in module.modules():
        if isinstance(submodule, nn.Embedding):
            total += submodule.weight[0].nbytes
            seen.add(id(submodule.weight))
            continue
        tensors = [*submodule.parameters(recurse=False),
                   *(b for name, b in submodule.named_buffers(recurse=False)
                     if name not in submodule._non_persistent_buffers_set)]
        for tensor in tensors:
            if id(tensor) not in seen:  # a tied tensor is read once
                seen.add(id(tensor))
                total += tensor.nbytes
    return total


def _weight_only_matmul_triton(x: Tensor, layer: WeightOnlyLinear) -> Tensor:
    triton, _ = import_triton()
    kernels = triton_kernels()
    in_features, out_features = layer.in_features, layer.out_features
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    tokens = x2.shape[0]
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    # Decode (a few tokens) pads the token tile to 16, the smallest tensor-core tile; the cost is
    # compute, which a memory-bound step has to spare. Narrow column tiles keep every SM streaming.
    block_m = 16 if tokens <= 16 else 64
    block_n = 32 if tokens <= 16 else 64
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(out_features, block_n))
    ieee = x.dtype == torch.float32  # fp32 models get fp32 products, not tf32
    with torch.no_grad():
        if layer.mode == "int8":
            kernels.int8_kernel[grid](x2, layer.qweight, layer.scales, out, tokens, out_features, in_features,
                                      x2.stride(0), layer.qweight.stride(0),
                                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, IEEE=ieee)
        else:
            kernels.int4_kernel[grid](x2, layer.qweight, layer.scales, layer.offsets, out, tokens, out_features,
                                      in_features, x2.stride(0), layer.qweight.stride(0), layer.scales.stride(0),
                                      GROUP_SIZE=layer.group_size, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee)
    return out.view(*x.shape[:-1], out_features)
