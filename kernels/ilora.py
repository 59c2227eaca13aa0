"""The I-LoRA term of :class:`edgeav.models.ilora.ILoRALinear` in one fused kernel.

Per token, ``delta = scale * [B_0|B_1|...] (softmax(R x) ⊗ (A x))``: the router logits and the
low-rank activations are two reductions over the input features, the softmax mixes ``heads``
numbers, and the mixed product is one thin matmul with ``lora_B``. Unfused that is five small kernel
launches per projection per decode step; the Triton kernel does all of it, plus the add onto the base
projection's output, in one. The router stays exact and per token (DESIGN "Contracts").

The pure-torch path runs the very operations of ``ILoRALinear.forward``, so on the CPU the result is
the reference's to the bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from edgeav.errors import OptionError

from ._backend import import_triton, triton_kernels, use_triton

__all__ = ["fused_ilora_forward", "ilora_delta"]


def ilora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_route: Tensor, scale: float,
                out: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """The routed LoRA term of ``x`` [..., in], added in place onto ``out`` when given.

    ``lora_A`` [rank, in], ``lora_B`` [out_features, heads * rank] (head-major column blocks),
    ``lora_route`` [heads, in]: the parameters of an ``ILoRALinear``. Without ``out`` the result is the
    term alone, [..., out_features] in ``x``'s dtype; with ``out`` (the base projection's output, same
    shape and dtype) the term is added onto it and ``out`` is returned, which is
    ``ILoRALinear.forward(x)`` when ``out = x @ W.T + b`` (the bias, if the layer has one).

    ``backend``: ``auto`` runs the fused Triton kernel on CUDA tensors when Triton is installed and
    pure torch otherwise; ``torch`` or ``triton`` force one. The Triton path is for inference: it
    records no autograd graph.
    """
    rank, in_features = lora_A.shape
    heads = lora_route.shape[0]
    _check_shapes(x, lora_A, lora_B, lora_route, out)
    if not use_triton("ilora_delta", x, backend):
        delta = _ilora_delta_torch(x, lora_A, lora_B, lora_route, scale)
        return delta if out is None else out.add_(delta)
    return _ilora_delta_triton(x, lora_A, lora_B, lora_route, float(scale), out, rank, heads)


def fused_ilora_forward(layer, x: Tensor, base_out: Tensor, *, backend: str = "auto") -> Tensor:
    """``layer(x)`` for an ``ILoRALinear`` (or a quantized one) whose base output ``base_out`` = W x + b is
    already computed: adds the routed LoRA term onto ``base_out`` in place and returns it."""
    return ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, out=base_out, backend=backend)


def _check_shapes(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_route: Tensor, out: Tensor | None) -> None:
    rank, in_features = lora_A.shape
    heads = lora_route.shape[0]
    if x.shape[-1] != in_features or lora_route.shape[1] != in_features:
        raise OptionError(
            f"ilora_delta: x has {x.shape[-1]} features, lora_A {tuple(lora_A.shape)} and lora_route "
            f"{tuple(lora_route.shape)} expect {in_features}; pass the input of the layer these parameters belong to"
        )
    if lora_B.shape[1] != heads * rank:
        raise OptionError(
            f"ilora_delta: lora_B has shape {tuple(lora_B.shape)}; expected [out_features, heads * rank] with "
            f"heads {heads} (lora_route rows) and rank {rank} (lora_A rows)"
        )
    expected = (*x.shape[:-1], lora_B.shape[0])
    if out is not None and (tuple(out.shape) != expected or out.dtype != x.dtype):
        raise OptionError(
            f"ilora_delta: out has shape {tuple(out.shape)} and dtype {out.dtype}; expected {expected} in {x.dtype}, "
            f"the base projection's output for x"
        )


def _ilora_delta_torch(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_route: Tensor, scale: float) -> Tensor:
    # The operations of ILoRALinear.forward, in its order and dtypes, so the two agree to the bit.
    route = torch.softmax(F.linear(x, lora_route), dim=-1, dtype=torch.float32).to(x.dtype)
    low_rank = F.linear(x, lora_A)
    routed = (route[..., :, None] * low_rank[..., None, :]).flatten(-2)
    return F.linear(routed * scale, lora_B)


def _ilora_delta_triton(x: Tensor, lora_A: Tensor, lora_B: Tensor, lora_route: Tensor, scale: float,
                        out: Tensor | None, rank: int, heads: int) -> Tensor:
    triton, _ = import_triton()
    kernel = triton_kernels().ilora_kernel
    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    x2 = x.reshape(-1, in_features).contiguous()
    tokens = x2.shape[0]
    dtype = x.dtype
    # Parameters in the compute dtype, as F.linear would need them; contiguous so rows are K apart.
    lora_A, lora_route, lora_B = (p.detach().to(dtype).contiguous() for p in (lora_A, lora_route, lora_B))
    if out is not None and out.is_contiguous():
        target, add_to_out = out, True
    else:
        target = torch.empty(*x.shape[:-1], out_features, dtype=dtype, device=x.device)
        add_to_out = False
    block_n = 64 if out_features <= 4096 else 128
    grid = (tokens, triton.cdiv(out_features, block_n))
    with torch.no_grad():
        kernel[grid](
            x2, lora_A, lora_route, lora_B, target, tokens, out_features, in_features, scale,
            RANK=rank, HEADS=heads, BLOCK_R=triton.next_power_of_2(rank), BLOCK_H=triton.next_power_of_2(heads),
            BLOCK_K=128, BLOCK_N=block_n, ADD_TO_OUT=add_to_out,
        )
    if out is None:
        return target
    if target is not out:  # a strided base output: the kernel wrote the term alone
        out.add_(target)
    return out
