"""What every system's graphs share: :class:`GraphSpec` (names and named dynamic axes) and the LLM
with an explicit KV cache (:class:`LLMGraph`, for any :class:`~edgeav.models.llama.Llama`;
:class:`MRopeLLMGraph` for one with M-RoPE, whose position ids are an input).

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

from edgeav.models.llama import Llama, mrope_cos_sin, mrope_streams, rope_inv_freq, rope_tables


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


# GroundingDINO (u-LLaVA's and OpenAVS's): pixels at any size and a caption of any length -> logits and boxes.
# Height, width and caption length are free axes: the Swin's window padding is ceil arithmetic the exporter
# cannot prove.
GROUNDING = GraphSpec(
    ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids"), ("pred_logits", "pred_boxes"),
    {"pixel_values": {2: "height", 3: "width"}, "pixel_mask": {1: "height", 2: "width"}, "input_ids": {1: "tokens"},
     "attention_mask": {1: "tokens"}, "token_type_ids": {1: "tokens"}},
    free_axes=("height", "width", "tokens"))


def grounding_example_size(grounding) -> tuple[int, int]:
    """(height, width) of the traced example for a :class:`~edgeav.models.grounding_dino.GroundingDINOConfig`:
    every Swin stage at least two windows on each side and the two sides different, so the exporter pins no
    stage to one window and never ties height to width."""
    cell = grounding.swin_patch_size * 2 ** (len(grounding.swin_depths) - 1)
    return cell * (2 * grounding.swin_window_size + 1), cell * (2 * grounding.swin_window_size + 3)


LLM = GraphSpec(("inputs_embeds", "past_kv"), ("logits", "hidden", "new_kv"),
                {"inputs_embeds": {1: "tokens"}, "past_kv": {0: "past"}, "new_kv": {0: "tokens"}})
# The same step with M-RoPE (a config with ``mrope_section``): the position ids of the new tokens are an input.
LLM_MROPE = GraphSpec(("inputs_embeds", "past_kv", "positions"), ("logits", "hidden", "new_kv"),
                      {"inputs_embeds": {1: "tokens"}, "past_kv": {0: "past"}, "positions": {1: "tokens"},
                       "new_kv": {0: "tokens"}})


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
        return cached_step(self.llm, inputs_embeds, past_kv, positions, cos, sin)


class MRopeLLMGraph(nn.Module):
    """:class:`LLMGraph` for an LLM with M-RoPE (Qwen2.5's three position streams), with one more input:
    ``positions`` [3, tokens], the temporal, height and width ids of the new tokens, which the runtime
    computes (prefill: the prompt's layout; decode: ``cache position + delta`` on all three). The causal
    mask still follows the cache positions ``past .. past + tokens - 1``."""

    def __init__(self, llm: Llama) -> None:
        super().__init__()
        cfg = llm.cfg
        if cfg.mrope_section is None:
            raise ValueError("MRopeLLMGraph: the LLM config has no mrope_section; export it with LLMGraph")
        self.llm = llm
        self.register_buffer("mrope_streams", mrope_streams(cfg.mrope_section), persistent=False)

    def forward(self, inputs_embeds: Tensor, past_kv: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg, device = self.llm.cfg, inputs_embeds.device
        cache_positions = torch.arange(inputs_embeds.shape[1], device=device) + past_kv.shape[0]
        # Computed here rather than held as a buffer: an fp16 export halves buffers, and angles of positions in
        # the thousands need fp32 frequencies.
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, device)
        cos, sin = mrope_cos_sin(positions, inv_freq, self.mrope_streams)
        return cached_step(self.llm, inputs_embeds, past_kv, cache_positions, cos.to(inputs_embeds.dtype),
                           sin.to(inputs_embeds.dtype))


def cached_step(llm: Llama, inputs_embeds: Tensor, past_kv: Tensor, positions: Tensor, cos: Tensor,
                sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``llm``'s layers over the cache ``past_kv``: the new tokens sit at cache ``positions`` [tokens] and are
    rotated by ``cos``, ``sin`` [tokens, head_dim]; -> what :class:`LLMGraph` returns."""
    past, tokens = past_kv.shape[0], inputs_embeds.shape[1]
    keys = torch.arange(past + tokens, device=inputs_embeds.device)
    mask = (keys[None, :] <= positions[:, None])[None, None]  # [1, 1, tokens, past + tokens]
    hidden = inputs_embeds
    new = []
    for index, layer in enumerate(llm.model.layers):
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
    last = llm.model.norm(hidden[:, -1:])
    return llm.lm_head(last)[:, 0], last[:, 0], new_kv


def kv_shape(llm: Llama, positions: int, batch: int = 1) -> tuple[int, ...]:
    cfg = llm.cfg
    return (positions, cfg.num_layers, 2, batch, cfg.num_kv_heads, cfg.head_dim)
