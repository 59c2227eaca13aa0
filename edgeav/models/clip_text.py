"""CLIP's text tower, Pengi's prompt encoder: token and learned position embeddings, pre-LN blocks
with quick-GELU under a causal mask (and the prompt's padding mask), a final LayerNorm, and the pooled
state of the end token.

Parameter names are those of Hugging Face's ``CLIPTextModel`` (``text_model.*`` of a ``CLIPModel``,
without that prefix): ``embeddings.token_embedding``, ``embeddings.position_embedding``,
``encoder.layers.{i}.self_attn.q_proj``, ..., ``final_layer_norm``. Older transformers (Pengi
pinned 4.28.1) also saved ``embeddings.position_ids``; the pre-hook next to :class:`CLIPTextTower`
drops it.

Pooling: the state at the first position of the highest id in each row. CLIP's end token is its highest
id and its padding repeats it, so that is the end of the prompt; transformers picks the same position
both ways it knows (the argmax of the ids for configs whose ``eos_token_id`` is the legacy 2, the first
``eos_token_id`` otherwise).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.models.vision import CLIPMLP

__all__ = ["CLIPTextConfig", "CLIPTextTower", "CLIP_TEXT_PRESETS"]


@dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower's shape (Hugging Face's names, ``num_layers`` for ``num_hidden_layers``)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    num_layers: int = 12
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise OptionError(f"CLIP text config: hidden_size {self.hidden_size} is not a multiple of num_heads "
                              f"{self.num_heads}; choose sizes that divide")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CLIPTextConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise OptionError(f"CLIP text config: unknown field {unknown[0]!r}")
        return cls(**data)


CLIP_TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    "clip-vit-b-16": CLIPTextConfig(),  # openai/clip-vit-base-patch16's text tower
    "tiny": CLIPTextConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),  # spec section 9
}


class CLIPTextAttention(nn.Module):
    """Multi-head self-attention under a mask (True = may attend)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        q, k, v = (proj(hidden).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(attended.transpose(1, 2).flatten(2))


class CLIPTextLayer(nn.Module):
    """One pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPTextAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), mask)
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPTextEncoder(nn.Module):
    """Holds the blocks under ``encoder.layers.{i}`` as Hugging Face names them."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPTextLayer(cfg) for _ in range(cfg.num_layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[:input_ids.shape[1]]


class CLIPTextTower(nn.Module):
    """CLIP's text transformer: ids -> (last hidden state [B, L, hidden], pooled end-token state [B, hidden])."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPTextEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``input_ids`` [B, L] (L <= max_position_embeddings), ``attention_mask`` [B, L] (1 = token,
        0 = padding; None = no padding)."""
        length = input_ids.shape[-1]
        if input_ids.dim() != 2 or not 1 <= length <= self.cfg.max_position_embeddings:
            raise OptionError(f"CLIP text ids: expected shape [batch, 1..{self.cfg.max_position_embeddings}], got "
                              f"{list(input_ids.shape)}; encode prompts with edgeav.bpe_tokenizers.CLIPBPE")
        mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
        hidden = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            hidden = layer(hidden, mask)
        hidden = self.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]
        return hidden, pooled


def _drop_position_ids(module: CLIPTextTower, state_dict, prefix, *_) -> None:
    """Older transformers saved the position index buffer ``embeddings.position_ids``."""
    state_dict.pop(prefix + "embeddings.position_ids", None)
