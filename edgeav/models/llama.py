"""LLaMA-2 decoder with Crab's interaction-aware LoRA (I-LoRA) kept exact, gpt-fast style.

Module and parameter names mirror Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj``, ..., ``lm_head``), so a Llama-2 state dict loads unchanged and
only the LoRA parameters stay missing. The KV cache is allocated once by :meth:`Llama.setup_caches`
and written in place by position; forward passes hold no data-dependent Python control flow, so
``torch.export`` and the ONNX exporter can trace prefill and decode as they are.

The router of I-LoRA mixes its three heads per token, so the LoRA is never merged into the base
weight silently (CRAB_SPEC section 2): :meth:`ILoRALinear.merged_weight` is the explicit, lossy
static merge that export offers as an option.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import OptionError

__all__ = ["ILoRALinear", "KVCache", "Llama", "RMSNorm"]


class ILoRALinear(nn.Module):
    """Bias-free linear layer with Crab's per-token routed LoRA:
    ``y = W x + scale * sum_i softmax(R x)_i * B_i (A x)``.

    ``lora_B`` holds the ``heads`` B matrices side by side, ``[B_0 | B_1 | ...]`` ([out, heads * rank]),
    so the whole LoRA is two thin matmuls per token: ``a = A x``, then ``[B_0|B_1|B_2] (softmax(R x) ⊗ a)``.
    Released checkpoints name the parts PEFT-style (``lora_A.weight``, ``lora_B{i}.weight``,
    ``lora_route.weight``); a load_state_dict pre-hook fuses them.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, heads: int, scale: float):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.heads, self.scale = rank, heads, scale
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, heads * rank))
        self.lora_route = nn.Parameter(torch.empty(heads, in_features))
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._fuse_peft_keys)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)
        # Crab's own LoRA init: A and the router as nn.Linear does, B zero so a fresh layer is the base layer.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_route, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # Inference on a GPU: one fused launch for A x, the router softmax and the mixed B product
            # (edgeav.kernels; pure torch where Triton is missing). Training keeps autograd's path below.
            from edgeav.kernels import ilora_delta

            return ilora_delta(x, self.lora_A, self.lora_B, self.lora_route, self.scale, out=F.linear(x, self.weight))
        # Router logits in the compute dtype, softmax in fp32, as Crab's layer computes them.
        route = torch.softmax(F.linear(x, self.lora_route), dim=-1, dtype=torch.float32).to(x.dtype)
        low_rank = F.linear(x, self.lora_A)
        # Head-major outer product [..., heads * rank] lines up with the column blocks of lora_B.
        routed = (route[..., :, None] * low_rank[..., None, :]).flatten(-2)
        return F.linear(x, self.weight) + F.linear(routed * self.scale, self.lora_B)

    @torch.no_grad()
    def merged_weight(self, mix: Tensor) -> Tensor:
        """``W + scale * sum_i mix_i B_i A`` ([out, in]) for one fixed head mix.

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
        """Rename Crab's PEFT-style keys to ours and concatenate the B heads; fused keys pass untouched.

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
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, heads={self.heads}, scale={self.scale}")


def _projection(name: str, in_features: int, out_features: int, lora: LoRAConfig) -> nn.Module:
    """An I-LoRA layer for every projection ``lora.targets`` names, a plain bias-free linear otherwise."""
    if name in lora.targets:
        return ILoRALinear(in_features, out_features, lora.rank, lora.heads, lora.scale)
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the compute dtype, then scale in it, as HF's LlamaRMSNorm does.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin [max_seq_len, head_dim] in HF's rotate_half layout (frequencies repeated, not interleaved)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(max_seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class KVCache(nn.Module):
    """Keys and values of one layer, [max_batch_size, kv_heads, max_seq_len, head_dim], written in place by position."""

    def __init__(self, max_batch_size: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, kv_heads, T, head_dim] at ``input_pos`` [T]; return the first B rows of the whole cache."""
        batch = k.shape[0]
        k_all, v_all = self.k_cache[:batch], self.v_cache[:batch]
        k_all.index_copy_(2, input_pos, k)
        v_all.index_copy_(2, input_pos, v)
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoRAConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _projection("q_proj", cfg.hidden_size, cfg.num_heads * cfg.head_dim, lora)
        self.k_proj = _projection("k_proj", cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, lora)
        self.v_proj = _projection("v_proj", cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, lora)
        self.o_proj = _projection("o_proj", cfg.num_heads * cfg.head_dim, cfg.hidden_size, lora)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None = None) -> Tensor:
        q, k, v = self.project(x, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)
        return self.attend(q, k[:, :, :kv_len], v[:, :, :kv_len], mask)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, D] -> q [B, heads, T, hd] and k, v [B, kv_heads, T, hd], RoPE applied to q and k."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Attention of q over every key in k, v (``mask`` [.., T, keys], True = may attend), then o_proj."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # GQA: kv head j serves query heads j*groups .. (j+1)*groups - 1, as HF's repeat_kv
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoRAConfig):
        super().__init__()
        self.gate_proj = _projection("gate_proj", cfg.hidden_size, cfg.intermediate_size, lora)
        self.up_proj = _projection("up_proj", cfg.hidden_size, cfg.intermediate_size, lora)
        self.down_proj = _projection("down_proj", cfg.intermediate_size, cfg.hidden_size, lora)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, lora: LoRAConfig):
        super().__init__()
        self.self_attn = Attention(cfg, lora)
        self.mlp = MLP(cfg, lora)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, input_pos: Tensor,
                kv_len: int | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LLaMA-2 decoder with I-LoRA on ``lora.targets``; call :meth:`setup_caches` before the first forward."""

    def __init__(self, cfg: LLMConfig, lora: LoRAConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise OptionError(
                f"LLM config: hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads}, num_kv_heads "
                f"{cfg.num_kv_heads}; hidden_size must divide by num_heads and num_heads by num_kv_heads"
            )
        self.cfg, self.lora = cfg, lora
        # The same tree as HF's LlamaForCausalLM (model.*, lm_head), so its state dict keys match ours.
        self.model = nn.ModuleDict({
            "embed_tokens": nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            "layers": nn.ModuleList(DecoderLayer(cfg, lora) for _ in range(cfg.num_layers)),
            "norm": RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        })
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        self.max_batch_size = self.max_seq_len = 0
        self._register_load_state_dict_pre_hook(_drop_rotary_tables)
        self.register_buffer("causal_mask", None, persistent=False)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    @classmethod
    def from_config(cls, cfg: LLMConfig, lora: LoRAConfig) -> "Llama":
        return cls(cfg, lora)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate every layer's KV cache, the causal mask and the RoPE tables once; later calls replace them.

        ``dtype`` and ``device`` default to those of the model's weights.
        """
        if not 1 <= max_seq_len <= self.cfg.max_seq_len:
            raise OptionError(
                f"setup_caches: max_seq_len {max_seq_len} is outside 1..{self.cfg.max_seq_len} "
                f"(LLMConfig.max_seq_len, the context the model was trained for); ask for a shorter cache"
            )
        if max_batch_size < 1:
            raise OptionError(f"setup_caches: max_batch_size {max_batch_size} must be at least 1")
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, self.cfg.num_kv_heads, max_seq_len,
                                               self.cfg.head_dim, dtype, device)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()
        self.rope_cos, self.rope_sin = rope_tables(self.cfg.head_dim, max_seq_len, self.cfg.rope_theta, device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def embed(self, token_ids: Tensor) -> Tensor:
        """Token embeddings [..., hidden_size] of ``token_ids``."""
        return self.model.embed_tokens(token_ids)

    def forward(self, inputs_embeds: Tensor, input_pos: Tensor, kv_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Run ``inputs_embeds`` [B, T, D] at positions ``input_pos`` [T] through the KV cache.

        Prefill: ``input_pos = arange(T)``; decode: T = 1 and ``input_pos = [pos]``. Sequences are
        right-aligned with no padding. ``kv_len`` (a Python int, so traced graphs stay static when it is
        None) limits attention to the first ``kv_len`` cache positions: eager decoding then reads only
        what was written instead of the whole cache. Returns logits [B, T, vocab] and the
        post-final-norm hidden state [B, T, D] that the mask decoder reads.
        """
        if self.causal_mask is None:
            raise RuntimeError("Llama.forward: no KV cache; call setup_caches(max_batch_size, max_seq_len) first")
        mask = self.causal_mask[input_pos, :kv_len][None, None]  # [1, 1, T, kv_len or max_seq_len]
        # RoPE angles stay fp32; like HF, cos and sin are rounded to the compute dtype only here.
        cos = self.rope_cos[input_pos].to(inputs_embeds.dtype)
        sin = self.rope_sin[input_pos].to(inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, mask, input_pos, kv_len)
        last_hidden = self.model.norm(hidden)
        return self.lm_head(last_hidden), last_hidden


def _drop_rotary_tables(state_dict, prefix, *_) -> None:
    """Older Hugging Face Llama-2 files carry each layer's RoPE ``inv_freq`` buffer; RoPE is computed here."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".rotary_emb.inv_freq")]:
        del state_dict[key]
