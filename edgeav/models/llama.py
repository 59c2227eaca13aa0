"""The LLaMA-family decoder of every system (LLaMA-2 for Crab, Vicuna for u-LLaVA, Qwen2.5 for Crab+),
with the routed I-LoRA (:mod:`edgeav.models.ilora`) kept exact, gpt-fast style.

Module and parameter names mirror Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj``, ..., ``lm_head``), so a Llama-2 state dict loads unchanged and
only the LoRA parameters stay missing; Qwen2.5's text model has the same tree (the Qwen2.5-Omni
thinker's ``thinker.model.*`` and ``thinker.lm_head`` load after stripping ``thinker.``). Qwen2.5 differs
in two switches of :class:`LLMConfig`: ``attention_bias`` (q, k, v with bias) and ``mrope_section``
(M-RoPE: three position streams, temporal, height and width, each owning a share of the frequencies).

The KV cache is allocated once by :meth:`Llama.setup_caches` and written in place by position; forward
passes hold no data-dependent Python control flow, so ``torch.export`` and the ONNX exporter can trace
prefill and decode as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import OptionError
from edgeav.models.ilora import ILoRALinear

__all__ = ["KVCache", "Llama", "RMSNorm", "apply_rope", "mrope_cos_sin", "mrope_streams", "rms_norm", "rope_inv_freq",
           "rope_tables"]


def _projection(name: str, in_features: int, out_features: int, lora: LoRAConfig, bias: bool = False) -> nn.Module:
    """An I-LoRA layer for every projection ``lora.targets`` names, a plain linear otherwise."""
    if name in lora.targets:
        return ILoRALinear(in_features, out_features, lora.rank, lora.heads, lora.scale, bias=bias)
    return nn.Linear(in_features, out_features, bias=bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in fp32 whatever the compute dtype, then scale in it, as HF's LlamaRMSNorm does.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """fp32 inverse frequencies [head_dim // 2] of RoPE."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin [max_seq_len, head_dim] in HF's rotate_half layout (frequencies repeated, not interleaved)."""
    inv_freq = rope_inv_freq(head_dim, theta, device)
    angles = torch.arange(max_seq_len, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def mrope_streams(section: tuple[int, int, int], device=None) -> Tensor:
    """The position stream (0 temporal, 1 height, 2 width) owning each frequency pair, [sum(section)].

    (16, 24, 24) gives pairs 0-15 to time, 16-39 to height, 40-63 to width; rotate_half repeats the
    pairs over the second half, so dims 64-79, 80-103 and 104-127 follow the same streams.
    """
    return torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(section, device=device))


def mrope_cos_sin(positions: Tensor, inv_freq: Tensor, streams: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin [T, head_dim] for M-RoPE position ids ``positions`` [3, T]: frequency pair ``j``
    turns by the position of stream ``streams[j]``. Angles come from the positions themselves, so
    positions past the cache length (long videos) need no table."""
    angles = positions[streams].t().float() * inv_freq  # [T, head_dim // 2]
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
        bias = cfg.attention_bias
        self.q_proj = _projection("q_proj", cfg.hidden_size, cfg.num_heads * cfg.head_dim, lora, bias)
        self.k_proj = _projection("k_proj", cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, lora, bias)
        self.v_proj = _projection("v_proj", cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, lora, bias)
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
    """LLaMA-family decoder with I-LoRA on ``lora.targets``; call :meth:`setup_caches` before the first forward."""

    def __init__(self, cfg: LLMConfig, lora: LoRAConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
            raise OptionError(
                f"LLM config: hidden_size {cfg.hidden_size}, num_heads {cfg.num_heads}, num_kv_heads "
                f"{cfg.num_kv_heads}; hidden_size must divide by num_heads and num_heads by num_kv_heads"
            )
        if cfg.mrope_section is not None and (len(cfg.mrope_section) != 3
                                              or sum(cfg.mrope_section) != cfg.head_dim // 2):
            raise OptionError(
                f"LLM config: mrope_section {tuple(cfg.mrope_section)} must be three numbers summing to "
                f"head_dim // 2 = {cfg.head_dim // 2} (Qwen2.5-Omni-7B: (16, 24, 24) for head_dim 128)"
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
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.max_batch_size = self.max_seq_len = 0
        self._register_load_state_dict_pre_hook(_drop_rotary_tables)
        self.register_buffer("causal_mask", None, persistent=False)
        # Plain RoPE reads cos/sin tables; M-RoPE computes them from the positions of each call.
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("rope_inv_freq", None, persistent=False)
        self.register_buffer("mrope_streams", None, persistent=False)

    @classmethod
    def from_config(cls, cfg: LLMConfig, lora: LoRAConfig) -> "Llama":
        return cls(cfg, lora)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate every layer's KV cache, the causal mask and the RoPE tables (M-RoPE: its frequencies)
        once; later calls replace them.

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
        if self.cfg.mrope_section is None:
            self.rope_cos, self.rope_sin = rope_tables(self.cfg.head_dim, max_seq_len, self.cfg.rope_theta, device)
        else:
            self.rope_inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device)
            self.mrope_streams = mrope_streams(self.cfg.mrope_section, device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def embed(self, token_ids: Tensor) -> Tensor:
        """Token embeddings [..., hidden_size] of ``token_ids``."""
        return self.model.embed_tokens(token_ids)

    def forward(self, inputs_embeds: Tensor, input_pos: Tensor, kv_len: int | None = None,
                positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Run ``inputs_embeds`` [B, T, D] at cache positions ``input_pos`` [T] through the KV cache.

        Prefill: ``input_pos = arange(T)``; decode: T = 1 and ``input_pos = [pos]``. Sequences are
        right-aligned with no padding. ``kv_len`` (a Python int, so traced graphs stay static when it is
        None) limits attention to the first ``kv_len`` cache positions: eager decoding then reads only
        what was written instead of the whole cache. ``positions`` [3, T]: the M-RoPE position ids
        (temporal, height, width) of the new tokens, for a config with ``mrope_section`` only
        (:func:`edgeav.models.mrope.rope_positions`; decode: ``input_pos + delta`` on all three); None
        rotates by ``input_pos``. Returns logits [B, T, vocab] and the post-final-norm hidden state
        [B, T, D] that the mask decoder reads.
        """
        if self.causal_mask is None:
            raise RuntimeError("Llama.forward: no KV cache; call setup_caches(max_batch_size, max_seq_len) first")
        mask = self.causal_mask[input_pos, :kv_len][None, None]  # [1, 1, T, kv_len or max_seq_len]
        # RoPE angles stay fp32; like HF, cos and sin are rounded to the compute dtype only here.
        cos, sin = self._rope(input_pos, positions)
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, mask, input_pos, kv_len)
        last_hidden = self.model.norm(hidden)
        return self.lm_head(last_hidden), last_hidden

    def _rope(self, input_pos: Tensor, positions: Tensor | None) -> tuple[Tensor, Tensor]:
        """fp32 cos and sin [T, head_dim] of the new tokens."""
        if self.cfg.mrope_section is None:
            if positions is not None:
                raise OptionError("Llama.forward: positions are M-RoPE ids, but this LLM config has no "
                                  "mrope_section (plain RoPE); pass input_pos alone")
            return self.rope_cos[input_pos], self.rope_sin[input_pos]
        if positions is None:
            positions = input_pos.expand(3, -1)
        elif positions.dim() != 2 or positions.shape[0] != 3 or positions.shape[1] != input_pos.shape[0]:
            raise OptionError(f"Llama.forward: positions has shape {tuple(positions.shape)}; expected "
                              f"[3, {input_pos.shape[0]}], the temporal, height and width ids of each new token")
        return mrope_cos_sin(positions, self.rope_inv_freq, self.mrope_streams)


def _drop_rotary_tables(state_dict, prefix, *_) -> None:
    """Older Hugging Face Llama-2 files carry each layer's RoPE ``inv_freq`` buffer; RoPE is computed here."""
    for key in [k for k in state_dict if k.startswith(prefix) and k.endswith(".rotary_emb.inv_freq")]:
        del state_dict[key]
