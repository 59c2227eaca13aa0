"""BERT text encoder of GroundingDINO (``bert.*`` of the release) and its phrase masks.

GroundingDINO encodes a caption of "."-separated phrases ("cat . red dog .")
with BERT-base, but a token attends only to the tokens of its own phrase (the
closing "." included) and position ids restart at 0 in every phrase, so each
phrase is encoded as if it stood alone. :func:`phrase_attention` builds that
mask and those positions from the token ids alone, with tensor ops only (no
loop over delimiters), so it runs inside an exported graph.

Parameter names follow Hugging Face ``BertModel`` (``embeddings.*``,
``encoder.layer.{i}.*``), which is how the release stores them under ``bert.``.
The pooler is not part of the encoder: GroundingDINO never uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BertTextEncoder", "phrase_attention"]


def phrase_attention(input_ids: torch.Tensor, special_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] -> (mask [B, L, L] bool, True = may attend; position_ids [B, L] int64).

    ``special_ids`` are the delimiters ([CLS], [SEP], ".", "?"). A phrase is the
    run of tokens that a delimiter closes, the delimiter included. Tokens that no
    delimiter before the last token closes (the [SEP] and anything after the last
    ".") attend only to themselves and take position 0.
    """
    is_special = (input_ids[..., None] == special_ids).any(-1).long()
    # phrase index of each token = delimiters strictly before it
    phrase = torch.cumsum(is_special, 1) - is_special
    closed = phrase != phrase[:, -1:]
    same = (phrase[:, :, None] == phrase[:, None, :]) & closed[:, :, None]
    length = input_ids.shape[1]
    eye = torch.eye(length, dtype=torch.bool, device=input_ids.device)
    earlier = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril(-1)
    position_ids = (same & earlier).long().sum(-1)
    return same | eye, position_ids


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab_size: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor):
        embedded = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                    + self.position_embeddings(position_ids))
        return self.LayerNorm(embedded)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (proj(hidden).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


class BertDenseNorm(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's post-LN output of a sub-block)."""

    def __init__(self, in_features: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(hidden, num_heads)
        self.output = BertDenseNorm(hidden, hidden, eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, bias), hidden)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, intermediate: int, eps: float):
        super().__init__()
        self.attention = BertAttention(hidden, num_heads, eps)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertDenseNorm(intermediate, hidden, eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, bias)
        return self.output(self.intermediate(hidden), hidden)


class BertEncoderStack(nn.Module):
    def __init__(self, num_layers: int, hidden: int, num_heads: int, intermediate: int, eps: float):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, num_heads, intermediate, eps) for _ in range(num_layers))

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, bias)
        return hidden


class BertTextEncoder(nn.Module):
    """(input_ids, token_type_ids, position_ids, mask [B, L, L]) -> last hidden state [B, L, hidden]."""

    def __init__(self, vocab_size: int, hidden: int, num_layers: int, num_heads: int, intermediate: int,
                 max_positions: int, type_vocab_size: int, eps: float):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden, max_positions, type_vocab_size, eps)
        self.encoder = BertEncoderStack(num_layers, hidden, num_heads, intermediate, eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids, token_type_ids, position_ids)
        # BERT's extended mask: a large negative number, not -inf, where attention is not allowed
        bias = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(~mask, torch.finfo(hidden.dtype).min)[:, None]
        return self.encoder(hidden, bias)
