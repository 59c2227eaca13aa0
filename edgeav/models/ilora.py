"""Interaction-aware LoRA (I-LoRA), the routed LoRA of Crab and Crab+, kept exact.

Each wrapped projection keeps its base weight and bias and adds ``heads`` low-rank branches that share
one ``A`` and are mixed per token by a router: ``y = W x + b + scale * sum_i softmax(R x)_i B_i (A x)``.
Because the mix depends on the token, the LoRA is never merged into ``W`` silently (CRAB_SPEC section 2):
:meth:`ILoRALinear.merged_weight` is the explicit, lossy static merge that export offers as an option.

Crab's LLaMA builds its I-LoRA projections directly; Crab+ wraps the projections of the Qwen2.5-Omni
thinker after it is built, by name, as the authors' PEFT wrapper does (:func:`wrap_ilora`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ILoRALinear", "wrap_ilora"]


class ILoRALinear(nn.Module):
    """Linear layer (bias optional) with the per-token routed LoRA:
    ``y = W x + b + scale * sum_i softmax(R x)_i * B_i (A x)``.

    ``lora_B`` holds the ``heads`` B matrices side by side, ``[B_0 | B_1 | ...]`` ([out, heads * rank]),
    so the whole LoRA is two thin matmuls per token: ``a = A x``, then ``[B_0|B_1|B_2] (softmax(R x) ⊗ a)``.
    Released checkpoints name the parts PEFT-style (``lora_A.weight``, ``lora_B{i}.weight``,
    ``lora_route.weight``); a load_state_dict pre-hook fuses them. ``weight`` and ``bias`` keep the base
    layer's names, so a base checkpoint loads unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, heads: int, scale: float,
                 bias: bool = False, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.heads, self.scale = rank, heads, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, heads * rank, **factory))
        self.lora_route = nn.Parameter(torch.empty(heads, in_features, **factory))
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._fuse_peft_keys)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, heads: int, scale: float) -> "ILoRALinear":
        """``linear`` with a fresh I-LoRA beside it: the very same weight and bias tensors, LoRA parameters
        in their dtype and on their device, B zero so the new layer computes what ``linear`` did."""
        base = linear.weight
        # Built on the meta device so no throwaway base weight is allocated and initialised.
        layer = cls(linear.in_features, linear.out_features, rank, heads, scale, bias=linear.bias is not None,
                    device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        for name in ("lora_A", "lora_B", "lora_route"):
            shape = getattr(layer, name).shape
            setattr(layer, name, nn.Parameter(torch.empty(shape, device=base.device, dtype=base.dtype)))
        layer.reset_lora_parameters()
        return layer

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # The authors' LoRA init: A and the router as nn.Linear does, B zero so a fresh layer is the base layer.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_route, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Inference on a GPU: one fused launch for A x, the router softmax and the mixed B product
            # (edgeav.kernels; pure torch where Triton is missing). Training keeps autograd's path below.
            from edgeav.kernels import ilora_delta

            return ilora_delta(x, self.lora_A, self.lora_B, self.lora_route, self.scale,
                               out=F.linear(x, self.weight, self.bias))
        # Router logits in the compute dtype, softmax in fp32, as the authors' layer computes them.
        route = torch.softmax(F.linear(x, self.lora_route), dim=-1, dtype=torch.float32).to(x.dtype)
        low_rank = F.linear(x, self.lora_A)
        # Head-major outer product [..., heads * rank] lines up with the column blocks of lora_B.
        routed = (route[..., :, None] * low_rank[..., None, :]).flatten(-2)
        return F.linear(x, self.weight, self.bias) + F.linear(routed * self.scale, self.lora_B)

    @torch.no_grad()
    def merged_weight(self, mix: Tensor) -> Tensor:
        """``W + scale * sum_i mix_i B_i A`` ([out, in]) for one fixed head mix; the bias stays separate.

        Lossy: the real router picks a different mix for every token. Only export's explicit
        ``--merge-lora`` uses this, and its receipt reports the error.
        """
        if tuple(mix.shape) != (self.heads,):
            raise ValueError(
                f"merged_weight: mix has shape {tuple(mix.shape)}; expected ({self.heads},), one weight per LoRA head"
            )
        per_head = self.lora_B.unflatten(1, (self.heads, self.rank))  # [out, heads, rank]
        mixed_b = (per_head * mix.to(per_head)[:, None]).sum(1)  # [out, rank]
        return self.weight + self.scale * (mixed_b @ self.lora_A)

    def peft_state_dict(self) -> dict[str, Tensor]:
        """The LoRA parts under the released PEFT-style names (relative to this layer), B split per head."""
        per_head = self.lora_B.detach().split(self.rank, dim=1)
        return {
            "lora_A.weight": self.lora_A.detach(),
            **{f"lora_B{i}.weight": b.contiguous() for i, b in enumerate(per_head)},
            "lora_route.weight": self.lora_route.detach(),
        }

    def _fuse_peft_keys(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Rename the PEFT-style keys to ours and concatenate the B heads; fused keys pass untouched.

        Where both spellings are present the fused one wins and strict loading reports the other as unexpected.
        """
        for name in ("lora_A", "lora_route"):
            if prefix + name + ".weight" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + name + ".weight")
        b_keys = [f"{prefix}lora_B{i}.weight" for i in range(self.heads)]
        present = [key for key in b_keys if key in state_dict]
        if not present or prefix + "lora_B" in state_dict:
            return
        if len(present) < self.heads:
            absent = sorted(set(b_keys) - set(present))
            error_msgs.append(
                f"{prefix}lora_B: the checkpoint has {', '.join(present)} but not {', '.join(absent)}; "
                f"this layer has {self.heads} LoRA heads (LoRAConfig.heads): use a checkpoint with one B per head"
            )
            return
        for key in b_keys:
            if tuple(state_dict[key].shape) != (self.out_features, self.rank):
                error_msgs.append(
                    f"size mismatch for {key}: the checkpoint has shape {tuple(state_dict[key].shape)}, this layer "
                    f"expects [out_features, rank] = {(self.out_features, self.rank)}; "
                    f"check LoRAConfig.rank and the model size against the checkpoint"
                )
                return
        state_dict[prefix + "lora_B"] = torch.cat([state_dict.pop(key) for key in b_keys], dim=1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, heads={self.heads}, scale={self.scale}")


def wrap_ilora(module: nn.Module, suffixes: tuple[str, ...], *, rank: int, heads: int, scale: float,
               prefix_filter: str | tuple[str, ...] | None = None) -> int:
    """Replace, in place, every ``nn.Linear`` in ``module``'s tree whose attribute name is one of
    ``suffixes`` with an :class:`ILoRALinear` holding the same weight and bias tensors; return how many.

    This is the authors' PEFT target match (``q_proj`` catches ``model.layers.3.self_attn.q_proj`` at any
    depth); on the Qwen2.5-Omni thinker it picks exactly the layers PEFT's ``key.endswith(target)`` does.
    ``prefix_filter``: wrap only layers whose dotted name (relative to ``module``) starts with it (or one
    of them). Names do not change, so base state dicts still load and only ``lora_*`` keys are new.
    """
    prefixes = (prefix_filter,) if isinstance(prefix_filter, str) else prefix_filter
    found = []
    for parent_name, parent in module.named_modules():
        for name, child in parent.named_children():
            qualified = f"{parent_name}.{name}" if parent_name else name
            if (isinstance(child, nn.Linear) and name in suffixes
                    and (prefixes is None or qualified.startswith(prefixes))):
                found.append((parent, name, child))
    for parent, name, child in found:
        setattr(parent, name, ILoRALinear.from_linear(child, rank, heads, scale))
    return len(found)
