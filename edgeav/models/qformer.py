"""BLIP-2 Q-Former projector as Crab uses it (CRAB_SPEC section 2, "Projectors").

Per frame or audio segment: LayerNorm over the encoder features; learned
queries through the BERT embedding LayerNorm (no word or position embeddings);
``num_layers`` post-LN BERT layers, each with bidirectional self-attention over
the queries, cross-attention to the encoder features (in layers whose index is a
multiple of ``cross_attention_freq``) and the query FFN (GELU, erf); then the MLP
``Linear(hidden, llm_hidden) -> GELU -> Linear(llm_hidden, llm_hidden)``.

Our parameter names are short; the pre-hook next to :class:`QFormerProjector`
maps Crab's released names (``visual_Qformer.bert.encoder.layer.0...``) onto
them and drops the released parts the queries never use.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from edgeav.config import QFormerConfig
from edgeav.errors import OptionError

__all__ = ["QFormerProjector"]

# Crab builds visual_ln / audio_ln as nn.LayerNorm(width): PyTorch's default eps, not BERT's.
ENCODER_NORM_EPS = 1e-5


class QFormerAttention(nn.Module):
    """Multi-head attention of the queries over a context (themselves, or the encoder features)."""

    def __init__(self, hidden: int, context_width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(context_width, hidden)
        self.v_proj = nn.Linear(context_width, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def heads(states: torch.Tensor) -> torch.Tensor:  # [N, L, W] -> [N, heads, L, W/heads]
            return states.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.q_proj(queries)), heads(self.k_proj(context)),
                                                  heads(self.v_proj(context)))
        return self.out_proj(attended.transpose(1, 2).flatten(2))


class QFormerLayer(nn.Module):
    """One post-LN BERT layer as the query tokens see it."""

    def __init__(self, qcfg: QFormerConfig, encoder_width: int, cross_attention: bool):
        super().__init__()
        hidden, eps = qcfg.hidden_size, qcfg.layer_norm_eps
        self.self_attn = QFormerAttention(hidden, hidden, qcfg.num_heads)
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        if cross_attention:
            self.cross_attn = QFormerAttention(hidden, encoder_width, qcfg.num_heads)
            self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        else:
            self.cross_attn = self.cross_attn_norm = None
        self.fc1 = nn.Linear(hidden, qcfg.intermediate_size)
        self.fc2 = nn.Linear(qcfg.intermediate_size, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries = self.self_attn_norm(queries + self.self_attn(queries, queries))
        if self.cross_attn is not None:  # fixed at construction: no data-dependent branch
            queries = self.cross_attn_norm(queries + self.cross_attn(queries, features))
        return self.ffn_norm(queries + self.fc2(F.gelu(self.fc1(queries))))


class QFormerProjector(nn.Module):
    """Encoder features [N, L, encoder_width] -> LLM tokens [N, num_queries, llm_hidden].

    ``prefix`` is the released name stem: ``"visual"`` for ``vl_projector``,
    ``"audio"`` for ``al_projector``. A state dict in Crab's released layout
    (keys relative to the projector, e.g. ``visual_ln.weight``) loads directly.
    """

    def __init__(self, encoder_width: int, qcfg: QFormerConfig, llm_hidden: int, prefix: str = "visual"):
        super().__init__()
        if qcfg.hidden_size % qcfg.num_heads:
            raise OptionError(f"qformer config: hidden_size {qcfg.hidden_size} is not a multiple of "
                              f"num_heads {qcfg.num_heads}; choose sizes that divide")
        if qcfg.cross_attention_freq < 1:
            raise OptionError(f"qformer config: cross_attention_freq {qcfg.cross_attention_freq} must be >= 1 "
                              "(1 = cross-attention in every layer, as Crab)")
        self.encoder_width = encoder_width
        self.prefix = prefix
        hidden = qcfg.hidden_size
        self.encoder_norm = nn.LayerNorm(encoder_width, eps=ENCODER_NORM_EPS)
        # BLIP-2's init (std 0.02): identical zero queries would sit at the query LayerNorm's singular
        # point (BERT's eps is 1e-12), where training from scratch cannot separate them.
        self.queries = nn.Parameter(torch.randn(1, qcfg.num_queries, hidden) * 0.02)
        self.query_norm = nn.LayerNorm(hidden, eps=qcfg.layer_norm_eps)
        self.layers = nn.ModuleList(QFormerLayer(qcfg, encoder_width, i % qcfg.cross_attention_freq == 0)
                                    for i in range(qcfg.num_layers))
        self.proj_in = nn.Linear(hidden, llm_hidden)
        self.proj_out = nn.Linear(llm_hidden, llm_hidden)
        self.register_load_state_dict_pre_hook(_accept_released_keys)

    def query_states(self, features: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query outputs [N, num_queries, hidden], before the MLP."""
        if features.ndim != 3 or features.shape[-1] != self.encoder_width:
            raise ValueError(f"{self.prefix} features: expected shape [N, tokens, {self.encoder_width}], got "
                             f"{list(features.shape)}; pass one encoder output per frame or audio segment")
        features = self.encoder_norm(features)
        queries = self.query_norm(self.queries).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, features)
        return queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(self.query_states(features))))

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under Crab's released names (without the unused BERT parts)."""
        return {_released_name(name, self.prefix): tensor for name, tensor in self.state_dict().items()}


# Released name (after "{prefix}") -> ours. Per layer, relative to
# "{prefix}_Qformer.bert.encoder.layer.{i}." and "layers.{i}.".
_TOP_NAMES = {
    "_ln.": "encoder_norm.",
    "_query_tokens": "queries",
    "_Qformer.bert.embeddings.LayerNorm.": "query_norm.",
    "_proj.0.": "proj_in.",
    "_proj.2.": "proj_out.",
}
_LAYER_NAMES = {
    "attention.self.query.": "self_attn.q_proj.",
    "attention.self.key.": "self_attn.k_proj.",
    "attention.self.value.": "self_attn.v_proj.",
    "attention.output.dense.": "self_attn.out_proj.",
    "attention.output.LayerNorm.": "self_attn_norm.",
    "crossattention.self.query.": "cross_attn.q_proj.",
    "crossattention.self.key.": "cross_attn.k_proj.",
    "crossattention.self.value.": "cross_attn.v_proj.",
    "crossattention.output.dense.": "cross_attn.out_proj.",
    "crossattention.output.LayerNorm.": "cross_attn_norm.",
    "intermediate_query.dense.": "fc1.",
    "output_query.dense.": "fc2.",
    "output_query.LayerNorm.": "ffn_norm.",
}
# Released parts the queries never use: BERT word/position embeddings, the text-token
# FFN of each layer, and BertLMHeadModel's MLM head (`cls.predictions.*`).
_UNUSED_TOP = ("_Qformer.bert.embeddings.word_embeddings.", "_Qformer.bert.embeddings.position_embeddings.",
               "_Qformer.bert.embeddings.position_ids", "_Qformer.cls.")
_UNUSED_LAYER = ("intermediate.dense.", "output.dense.", "output.LayerNorm.")
_RELEASED_LAYER = re.compile(r"_Qformer\.bert\.encoder\.layer\.(\d+)\.(.*)")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.*)")


def _renamed(released: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if released.startswith(old):
            return new + released[len(old):]
    return None


def _our_name(rest: str) -> str | None:
    """Our name for a released name with its ``{prefix}`` stripped; "" to drop; None if unknown."""
    if rest.startswith(_UNUSED_TOP):
        return ""
    layer = _RELEASED_LAYER.fullmatch(rest)
    if layer is None:
        return _renamed(rest, _TOP_NAMES)
    index, part = layer.groups()
    if part.startswith(_UNUSED_LAYER):
        return ""
    renamed = _renamed(part, _LAYER_NAMES)
    return None if renamed is None else f"layers.{index}.{renamed}"


def _released_name(name: str, prefix: str) -> str:
    layer = _OUR_LAYER.fullmatch(name)
    if layer is not None:
        index, part = layer.groups()
        table, stem = _LAYER_NAMES, f"{prefix}_Qformer.bert.encoder.layer.{index}."
    else:
        part, table, stem = name, _TOP_NAMES, prefix
    for old, new in table.items():
        if part.startswith(new):
            return stem + old + part[len(new):]
    raise KeyError(f"no released name for parameter {name!r}")


def _accept_released_keys(module: QFormerProjector, state_dict, prefix, local_metadata, strict,
                          missing_keys, unexpected_keys, error_msgs) -> None:
    """Rename Crab's released keys onto ours and drop the unused ones; unknown keys stay (and surface)."""
    stem = prefix + module.prefix
    for key in [k for k in state_dict if k.startswith(stem)]:
        ours = _our_name(key[len(stem):])
        if ours == "":
            del state_dict[key]
        elif ours is not None:
            state_dict[prefix + ours] = state_dict.pop(key)
