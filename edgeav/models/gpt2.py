"""GPT-2, the caption decoder of Pengi: fed embeddings (the audio and prompt prefixes, then the
embeddings of the tokens chosen so far) through a KV cache, with the LM head tied to the token
embeddings.

Module and parameter names mirror Hugging Face's ``GPT2LMHeadModel`` (``transformer.wte``,
``transformer.h.{i}.attn.c_attn``, ..., ``lm_head``); GPT-2's projections keep their on-disk layout,
weight [in, out] (:class:`TransposedLinear`). Files written by older transformers (Pengi pinned
4.28.1) also hold each layer's causal-mask buffers ``attn.bias`` and ``attn.masked_bias``; the
pre-hook next to :class:`GPT2Attention` drops them.

The KV cache is allocated once by :meth:`GPT2Decoder.setup_caches`, written in place by position and
reordered in place by :meth:`GPT2Decoder.reorder_caches` (beam search keeps each surviving beam's
keys and values).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.models.llama import KVCache

__all__ = ["GPT2Config", "GPT2Decoder", "GPT2_PRESETS", "TransposedLinear", "check_cache_sizes"]


@dataclass(frozen=True)
class GPT2Config:
    """GPT-2's shape (the names of Hugging Face's config); the MLP is 4 x ``n_embd`` wide."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise OptionError(f"GPT-2 config: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}; "
                              "choose sizes that divide")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPT2Config:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise OptionError(f"GPT-2 config: unknown field {unknown[0]!r}")
        return cls(**data)


GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "tiny": GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2),  # spec section 9
}


class TransposedLinear(nn.Module):
    """GPT-2's ``Conv1D``: ``x @ weight + bias`` with weight stored [in, out], as its checkpoints hold it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).normal_(std=0.02))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = TransposedLinear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = TransposedLinear(cfg.n_embd, cfg.n_embd)
        self.kv_cache: KVCache | None = None
        self.register_load_state_dict_pre_hook(_drop_mask_buffers)

    def forward(self, x: Tensor, mask: Tensor, input_pos: Tensor, kv_len: int | None) -> Tensor:
        # c_attn's output is [q | k | v], each split into heads: [B, T, C] -> [B, heads, T, C/heads]
        q, k, v = (part.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for part in self.c_attn(x).chunk(3, dim=-1))
        k, v = self.kv_cache.update(input_pos, k, v)
        out = F.scaled_dot_product_attention(q, k[:, :, :kv_len], v[:, :, :kv_len], attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).flatten(-2))


def _drop_mask_buffers(module: GPT2Attention, state_dict, prefix, *_) -> None:
    """Older transformers saved GPT-2's causal mask (``bias``) and its fill value (``masked_bias``)."""
    for name in ("bias", "masked_bias"):
        state_dict.pop(prefix + name, None)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = TransposedLinear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = TransposedLinear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class GPT2Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor, input_pos: Tensor, kv_len: int | None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, input_pos, kv_len)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    """Token and position embeddings, the blocks, the final LayerNorm (Hugging Face's ``GPT2Model``)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)


def check_cache_sizes(cfg: GPT2Config, max_batch_size: int, max_seq_len: int) -> None:
    """Refuse a KV cache GPT-2 cannot fill: longer than its learned positions, or with no row."""
    if not 1 <= max_seq_len <= cfg.n_positions:
        raise OptionError(f"GPT-2 setup_caches: max_seq_len {max_seq_len} is outside 1..{cfg.n_positions} "
                          "(n_positions, GPT-2's learned positions); ask for a shorter sequence")
    if max_batch_size < 1:
        raise OptionError(f"GPT-2 setup_caches: max_batch_size {max_batch_size} must be at least 1")


class GPT2Decoder(nn.Module):
    """GPT-2 with its tied LM head; call :meth:`setup_caches` before the first forward."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.transformer = GPT2Transformer(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, and saved under both names as GPT-2 does
        self.register_buffer("causal_mask", None, persistent=False)
        self.max_batch_size = self.max_seq_len = 0

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate every layer's KV cache and the causal mask once (in the weights' dtype and device)."""
        check_cache_sizes(self.cfg, max_batch_size, max_seq_len)
        weight = self.transformer.wte.weight
        head_dim = self.cfg.n_embd // self.cfg.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(max_batch_size, self.cfg.n_head, max_seq_len, head_dim, weight.dtype,
                                          weight.device)
        self.causal_mask = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=weight.device).tril()
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def reorder_caches(self, rows: Tensor) -> None:
        """Make cache row ``i`` a copy of the old row ``rows[i]`` for each i (beam search's surviving beams)."""
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            for buffer in (cache.k_cache, cache.v_cache):
                buffer[:rows.shape[0]] = buffer.index_select(0, rows)

    def hidden_states(self, inputs_embeds: Tensor, input_pos: Tensor, kv_len: int | None = None) -> Tensor:
        """Final-LayerNorm states [B, T, n_embd] of ``inputs_embeds`` [B, T, n_embd] at cache positions
        ``input_pos`` [T] (prefill: ``arange(T)``; decode: ``[pos]``). ``kv_len`` (a Python int) limits
        attention to the first ``kv_len`` cache positions, those written so far."""
        if self.causal_mask is None:
            raise RuntimeError("GPT2Decoder: no KV cache; call setup_caches(max_batch_size, max_seq_len) first")
        mask = self.causal_mask[input_pos, :kv_len][None, None]
        hidden = inputs_embeds + self.transformer.wpe(input_pos)
        for block in self.transformer.h:
            hidden = block(hidden, mask, input_pos, kv_len)
        return self.transformer.ln_f(hidden)

    def forward(self, inputs_embeds: Tensor, input_pos: Tensor, kv_len: int | None = None) -> Tensor:
        """Logits [B, T, vocab] of :meth:`hidden_states`."""
        return self.lm_head(self.hidden_states(inputs_embeds, input_pos, kv_len))
