"""What every system's graphs share: :class:`GraphSpec` (names and named dynamic axes) and the LLM
with an explicit KV cache (:class:`LLMGraph`, for any :class:`~edgeav.models.llama.Llama`).

A system's own wrappers live in its package (``edgeav/systems/NAME/export.py``). Each wrapper
holds the reference modules themselves (no copied weights, no re-implemented layers) and only
changes the calling convention to what a graph needs: plain tensors in and out, and for the LLM
an explicit KV cache.

LLM cache layout: ``kv`` is ``[positions, layers, 2, batch, kv_heads, head_dim]``
(2 = keys, values). With positions outermost, the cache of the first ``p``
positions is a contiguous prefix of one preallocated buffer, so a runtime can
feed ``buffer[:past]`` as ``past_kv`` and bind ``new_kv`` to
``buffer[past:past + tokens]`` without copying or reallocating anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgeav.models.llama import Llama, rope_tables


@dataclass(frozen=True)
class GraphSpec:
    """Names of a graph's inputs and outputs and the meaning of each dynamic axis.

    ``free_axes``: labels of axes the exporter keeps dynamic without proving the graph valid over their
    whole range (torch.export's ``Dim.DYNAMIC``; it still refuses to pin them to one size). For graphs
    whose shape arithmetic (padding to whole windows, ceil divisions) holds for every size but is more
    than the exporter's symbolic reasoning can prove, e.g. GroundingDINO's image height and width.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]
    free_axes: tuple[str, ...] = ()


LLM = GraphSpec(("inputs_embeds", "past_kv"), ("logits", "hidden", "new_kv"),
                {"inputs_embeds": {1: "tokens"}, "past_kv": {0: "past"}, "new_kv": {0: "tokens"}})


class LLMGraph(nn.Module):
    """One step of the LLM over an explicit cache: prefill (past 0) and decode share it.

    ``inputs_embeds`` [batch, tokens, D] sit at positions ``past .. past + tokens - 1``.
    Returns the logits [batch, vocab] and post-norm hidden state [batch, D] of the
    last position (all generation reads) and ``new_kv`` [tokens, layers, 2, batch,
    kv_heads, head_dim], the cache entries of the new positions. The I-LoRA layers
    run as they are (routed per token), never merged.
    """

    def __init__(self, llm: Llama, max_seq_len: int | None = None) -> None:
        super().__init__()
        self.llm = llm
        cfg = llm.cfg
        cos, sin = rope_tables(cfg.head_dim, max_seq_len or cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, inputs_embeds: Tensor, past_kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        past, tokens = past_kv.shape[0], inputs_embeds.shape[1]
        positions = torch.arange(tokens, device=inputs_embeds.device) + past
        cos = self.rope_cos[positions].to(inputs_embeds.dtype)
        sin = self.rope_sin[positions].to(inputs_embeds.dtype)
        keys = torch.arange(past + tokens, device=inputs_embeds.device)
        mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, tokens, past + tokens]
        hidden = inputs_embeds
        new = []
        for index, layer in enumerate(self.llm.model.layers):
            attention = layer.self_attn
            q, k, v = attention.project(layer.input_layernorm(hidden), cos, sin)
            # [past, 2, batch, kv_heads, hd] -> [batch, kv_heads, past, hd] for each of k and v.
            past_k, past_v = past_kv[:, index].permute(1, 2, 3, 0, 4).unbind(0)
            k_all, v_all = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            hidden = hidden + attention.attend(q, k_all, v_all, mask)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            new.append(torch.stack([k, v]))  # [2, batch, kv_heads, tokens, hd]
        new_kv = torch.stack(new).permute(4, 0, 1, 2, 3, 5)  # [tokens, layers, 2, batch, kv_heads, hd]
        # [batch, 1, D] rather than [batch, D]: the head stays a MatMul, which int4 quantizes (a Gemm it would not).
        last = self.llm.model.norm(hidden[:, -1:])
        return self.llm.lm_head(last)[:, 0], last[:, 0], new_kv


def kv_shape(llm: Llama, positions: int, batch: int = 1) -> tuple[int, ...]:
    cfg = llm.cfg
    return (positions, cfg.num_layers, 2, batch, cfg.num_kv_heads, cfg.head_dim)
