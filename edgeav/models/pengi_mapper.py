"""Pengi's text-side glue: the projection heads into its 1024-d joint space, the prefix mappers that
turn one embedding into GPT-2 prefix tokens, and the beam search of its wrapper.

- :class:`Projection`: ``LayerNorm(h + Linear(GELU(h)))`` with ``h = Linear(x)``, both linears bias-free.
- :class:`PrefixMapper` (ClipCap's "transformer" mapping): ``Linear(d_in -> clip_length x width)``,
  ``prefix_length`` learned constant tokens appended, a pre-LN transformer (ReLU MLP of ``mlp_ratio`` x
  width, bias-free query and key/value projections, the key/value projection's outputs laid out
  [keys | values], each split into heads), and the last ``prefix_length`` tokens kept. Pengi builds it
  with 8 heads, MLP ratio 2 and half the layers its config names (``num_layers`` 8 -> 4 layers).
- :func:`beam_search`: the wrapper's ``_generate_beam``, decoding through GPT-2's KV cache instead of
  re-running the whole sequence at each step (see its docstring for the semantics kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.errors import OptionError
from edgeav.models.gpt2 import GPT2Decoder

__all__ = ["Beam", "PrefixMapper", "Projection", "beam_search"]


class Projection(nn.Module):
    """Pengi's projection of an encoder's embedding into the joint space."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x: Tensor) -> Tensor:
        first = self.linear1(x)
        return self.layer_norm(first + self.linear2(F.gelu(first)))


class MapperAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(width, width, bias=False)
        self.to_keys_values = nn.Linear(width, 2 * width, bias=False)
        self.project = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q = self.to_queries(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = self.to_keys_values(x).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.project(attended.transpose(1, 2).flatten(2))


class MapperMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class MapperLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = MapperAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MapperMLP(width, int(width * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MapperTransformer(nn.Module):
    """Holds the layers under ``transformer.layers.{i}`` as Pengi's checkpoint names them."""

    def __init__(self, width: int, num_heads: int, num_layers: int, mlp_ratio: float):
        super().__init__()
        self.layers = nn.ModuleList(MapperLayer(width, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class PrefixMapper(nn.Module):
    """One embedding [B, d_in] -> ``prefix_length`` GPT-2 input tokens [B, prefix_length, width]."""

    def __init__(self, d_in: int, width: int, prefix_length: int, clip_length: int, num_layers: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__()
        if width % num_heads:
            raise OptionError(f"Pengi mapper: GPT-2 width {width} is not a multiple of the mapper's {num_heads} "
                              "heads; choose sizes that divide")
        self.clip_length = clip_length
        self.linear = nn.Linear(d_in, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        self.transformer = MapperTransformer(width, num_heads, num_layers, mlp_ratio)

    def forward(self, embedding: Tensor) -> Tensor:
        tokens = self.linear(embedding).unflatten(-1, (self.clip_length, -1))
        constants = self.prefix_const.expand(embedding.shape[0], -1, -1)
        return self.transformer(torch.cat((tokens, constants), dim=1))[:, self.clip_length:]


@dataclass(frozen=True)
class Beam:
    """One finished beam: its ids as Pengi's wrapper cuts them (the stop token kept when it was reached)
    and its score, the summed log-probability divided by the length."""

    ids: tuple[int, ...]
    score: float


@torch.no_grad()
def beam_search(gpt: GPT2Decoder, prefix: Tensor, *, stop_token_id: int, beam_size: int = 3, max_len: int = 30,
                temperature: float = 1.0) -> list[Beam]:
    """Pengi's beam search over ``prefix`` [1, P, n_embd]; the beams, best first.

    Kept from the wrapper's ``_generate_beam``: log-probabilities as ``log(softmax(logits / t))`` (t = 1 when
    ``temperature`` <= 0); the first step takes the top ``beam_size`` tokens of the single prefix; then each
    step ranks all beam x vocabulary continuations by (score + log p) / length, lengths counting only the
    tokens up to a beam's stop; a stopped beam continues only with token 0 at no cost, its length frozen;
    ``topk`` over the flattened candidates, beam-major, picks them; decoding ends when every beam has
    stopped or after ``max_len`` tokens. The beams are ordered by final score with ``argsort`` (descending).
    """
    if prefix.dim() != 3 or prefix.shape[0] != 1:
        raise OptionError(f"beam search prefix: expected shape [1, tokens, width], got {list(prefix.shape)}; "
                          "search one prefix at a time")
    if beam_size < 1 or max_len < 1:
        raise OptionError(f"beam search: beam_size {beam_size} and max_len {max_len} must be at least 1")
    device, prefix_len = prefix.device, prefix.shape[1]
    needed = prefix_len + max_len - 1  # the last chosen token is never run
    if gpt.max_batch_size < beam_size or gpt.max_seq_len < needed:
        gpt.setup_caches(beam_size, needed)
    divisor = temperature if temperature > 0 else 1.0

    def log_probs(embeds: Tensor, start: int) -> Tensor:
        positions = torch.arange(start, start + embeds.shape[1], device=device)
        hidden = gpt.hidden_states(embeds, positions, kv_len=start + embeds.shape[1])
        return (gpt.lm_head(hidden[:, -1]) / divisor).softmax(-1).log()

    logits = log_probs(prefix, 0)
    scores, next_tokens = logits.topk(beam_size, -1)
    scores, next_tokens = scores.squeeze(0), next_tokens.permute(1, 0)  # [beam], [beam, 1]
    tokens = next_tokens
    gpt.reorder_caches(torch.zeros(beam_size, dtype=torch.long, device=device))
    lengths = torch.ones(beam_size, device=device)
    stopped = next_tokens.squeeze(1).eq(stop_token_id)
    for step in range(1, max_len):
        if stopped.all():
            break
        logits = log_probs(gpt.transformer.wte(next_tokens), prefix_len + step - 1)
        logits[stopped] = -float("inf")
        logits[stopped, 0] = 0
        summed = scores[:, None] + logits
        lengths[~stopped] += 1
        averaged, flat = (summed / lengths[:, None]).view(-1).topk(beam_size, -1)
        source = flat // summed.shape[1]
        next_tokens = (flat % summed.shape[1]).unsqueeze(1)
        lengths = lengths[source]
        tokens = torch.cat((tokens[source], next_tokens), dim=1)
        scores = averaged * lengths
        stopped = stopped[source] | next_tokens.squeeze(1).eq(stop_token_id)
        gpt.reorder_caches(source)
    final = scores / lengths
    return [Beam(tuple(tokens[i, :int(lengths[i])].tolist()), float(final[i]))
            for i in final.argsort(descending=True).tolist()]
