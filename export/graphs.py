"""What every system's graphs share: :class:`GraphSpec` (names and named dynamic axes) and the LLM
step over an explicit KV cache (:class:`LLMGraph`, for any :class:`~edgeav.models.llama.Llama`, M-RoPE
included).

A system's own wrappers live in its package (``edgeav/systems/NAME/export.py``). Each wrapper
holds the reference modules themselves (no copied weights, no re-implemented layers) and only
changes the calling convention to what a graph needs: plain tensors in and out, and for the LLM
an explicit KV cache.

LLM cache layout: one ``past_key_L`` and one ``past_value_L`` per layer, each
``[batch, kv_heads, capacity, head_dim]``, of which the first ``past_length`` positions are
filled. The step writes its tokens' keys and values at ``past_length ..`` and returns the whole
buffers as ``present_key_L`` / ``present_value_L``. A runtime binds each present output to its
past input: the cache is preallocated once and written in place, and attention reads it as it
lies (heads outermost), with no per-step copy. In an ``onnx`` engine each layer's attention is
onnxruntime's fused ``GroupQueryAttention`` (which detects the shared buffer); a ``tensorrt``
engine, whose parser knows no contrib ops, gets the same computation in standard ops (a scatter
into the buffer and attention over the whole capacity, masked).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgeav.config import LLMConfig

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
    # The graph's LLM attention is onnxruntime's GroupQueryAttention (LLM graphs of onnx engines only).
    fused_attention: bool = False


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



# -- the LLM step ----------------------------------------------------------------------------------------


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """The cache's input names (``past_key_0``, ``past_value_0``, ...) and output names (``present_...``)."""
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_", "present_", 1) for name in past]


def llm_spec(cfg: LLMConfig, *, fused: bool) -> GraphSpec:
    """The LLM step's names and axes for ``cfg`` (M-RoPE's ``positions`` input when it has an mrope_section);
    ``fused``: attention as onnxruntime's GroupQueryAttention (onnx engines) or in standard ops (TensorRT)."""
    past, present = kv_names(cfg.num_layers)
    mrope = ("positions",) if cfg.mrope_section is not None else ()
    dynamic = {"inputs_embeds": {1: "tokens"}, **{name: {2: "capacity"} for name in past + present}}
    if mrope:
        dynamic["positions"] = {1: "tokens"}
    return GraphSpec(("inputs_embeds", "past_length", *mrope, *past), ("logits", "hidden", *present), dynamic,
                     fused_attention=fused)


def llm_example(cfg: LLMConfig, tokens: int = 3, past: int = 5) -> tuple[Tensor, ...]:
    """Example inputs of the LLM step: ``tokens`` new tokens after ``past`` cached ones, in a cache of two more
    positions than they fill."""
    past_length = torch.tensor([past])
    mrope = (torch.arange(past, past + tokens).expand(3, -1).contiguous(),) if cfg.mrope_section is not None else ()
    buffer = (1, cfg.num_kv_heads, past + tokens + 2, cfg.head_dim)
    return (torch.randn(1, tokens, cfg.hidden_size), past_length, *mrope,
            *(torch.zeros(buffer) for _ in range(2 * cfg.num_layers)))


def llm_shapes(cfg: LLMConfig) -> dict[str, tuple]:
    """The LLM step's input/output shapes under ``cfg`` (None: a dynamic axis), for the manifest's check."""
    past, present = kv_names(cfg.num_layers)
    buffer = (1, cfg.num_kv_heads, None, cfg.head_dim)
    shapes = {"inputs_embeds": (1, None, cfg.hidden_size), "past_length": (1,), "logits": (1, cfg.vocab_size),
              "hidden": (1, cfg.hidden_size), **{name: buffer for name in past + present}}
    if cfg.mrope_section is not None:
        shapes["positions"] = (3, None)
    return shapes


def llm_profiles(cfg: LLMConfig, typical: int) -> dict[str, tuple]:
    """TensorRT's (min, opt, max) shapes of the LLM step: one token up to the whole context, in a cache of
    ``typical`` positions at best and the context at most."""
    longest = cfg.max_seq_len
    buffers = tuple((1, cfg.num_kv_heads, positions, cfg.head_dim) for positions in (1, min(typical, longest), longest))
    profiles = {"inputs_embeds": ((1, 1, cfg.hidden_size), (1, 1, cfg.hidden_size), (1, longest, cfg.hidden_size)),
                **{name: buffers for name in kv_names(cfg.num_layers)[0]}}
    if cfg.mrope_section is not None:
        profiles["positions"] = ((3, 1), (3, 1), (3, longest))
    return profiles


def llm_graph(llm: Llama, fmt: str) -> tuple[LLMGraph, GraphSpec]:
    """The LLM step of ``llm`` and its spec for an engine of format ``fmt``: fused attention for ``onnx``,
    standard ops for ``tensorrt``."""
    fused = fmt == "onnx"
    return LLMGraph(llm, fused=fused), llm_spec(llm.cfg, fused=fused)


def attend_cache(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, past_length: Tensor,
                 num_heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's attention over its cache in standard ops: ``q`` [B, T, heads * hd] and ``k``, ``v``
    [B, T, kv_heads * hd] of the new tokens at positions ``past_length ..``; the cache buffers [B, kv_heads,
    capacity, hd]. -> attention [B, T, heads * hd] and the buffers with the new keys and values written in.
    Queries attend causally; positions past the new tokens are masked, so their contents never count."""
    b, t, _ = q.shape
    head_dim, capacity = past_key.shape[-1], past_key.shape[2]
    positions = torch.arange(t, device=q.device) + past_length  # [T]
    index = positions.view(1, 1, t, 1).expand(b, kv_heads, t, head_dim)
    present_key = past_key.scatter(2, index, k.view(b, t, kv_heads, head_dim).transpose(1, 2))
    present_value = past_value.scatter(2, index, v.view(b, t, kv_heads, head_dim).transpose(1, 2))
    keys, values = present_key, present_value
    groups = num_heads // kv_heads
    if groups > 1:  # kv head j serves query heads j*groups .. (j+1)*groups - 1, as HF's repeat_kv
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    mask = torch.arange(capacity, device=q.device)[None, :] <= positions[:, None]  # [T, capacity]
    out = F.scaled_dot_product_attention(q.view(b, t, num_heads, head_dim).transpose(1, 2), keys, values,
                                         attn_mask=mask[None, None])
    return out.transpose(1, 2).flatten(-2), present_key, present_value


@torch.library.custom_op("edgeav::cached_attention", mutates_args=())
def cached_attention(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, past_length: Tensor,
                     num_heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`attend_cache` as one opaque op, which the exporter writes as onnxruntime's GroupQueryAttention
    (:func:`export_translations`)."""
    return attend_cache(q, k, v, past_key, past_value, past_length, num_heads, kv_heads)


@cached_attention.register_fake
def _(q, k, v, past_key, past_value, past_length, num_heads, kv_heads):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


@functools.cache
def export_translations() -> dict:
    """The exporter's translation of edgeav's own ops (``custom_translation_table``): :func:`cached_attention`
    -> ``com.microsoft.GroupQueryAttention`` with the present buffers of the past's shape (onnxruntime shares
    them when the runtime binds both to one buffer)."""
    import onnxscript
    from onnx import TensorProto
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    # onnxruntime's contrib schemas are not in onnx's registry; the exporter needs one to call the op.
    formal = OpSchema.FormalParameter
    schema = OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[formal(name, kind) for name, kind in (("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"),
                                                        ("past_value", "T"), ("seqlens_k", "M"),
                                                        ("total_sequence_length", "M"))],
        outputs=[formal(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("num_heads", "kv_num_heads")])
    group_query_attention = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention",
                                                 schema)

    def translate(q, k, v, past_key, past_value, past_length, num_heads: int, kv_heads: int):
        total = op.Add(past_length, op.Shape(q, start=1, end=2))  # [1]: the cache's length after this step
        seqlens_k = op.Cast(op.Sub(total, op.Constant(value_ints=[1])), to=TensorProto.INT32)
        return group_query_attention(q, k, v, past_key, past_value, seqlens_k,
                                     op.Cast(op.Squeeze(total), to=TensorProto.INT32), num_heads=num_heads,
                                     kv_num_heads=kv_heads)

    return {torch.ops.edgeav.cached_attention.default: translate}


class LLMGraph(nn.Module):
    """One step of the LLM over the cache (the layout above): prefill (``past_length`` 0) and decode share it.

    Inputs: ``inputs_embeds`` [1, tokens, D] at positions ``past_length .. past_length + tokens - 1``;
    ``past_length`` int64 [1]; for an LLM with M-RoPE, ``positions`` [3, tokens] (the temporal, height and
    width ids of the new tokens, which the runtime computes); then the cache buffers. Returns the logits
    [1, vocab] and post-norm hidden state [1, D] of the last position (all generation reads) and the cache
    buffers with the new tokens written in. The I-LoRA layers run as they are (routed per token), never
    merged. ``fused``: attention as :func:`cached_attention` (onnxruntime's fused op) or :func:`attend_cache`.
    """

    def __init__(self, llm: Llama, *, fused: bool) -> None:
        super().__init__()
        self.llm = llm
        self.fused = fused
        cfg = llm.cfg
        if cfg.mrope_section is None:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.register_buffer("mrope_streams", mrope_streams(cfg.mrope_section), persistent=False)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        cfg = self.llm.cfg
        inputs_embeds, past_length = args[:2]
        dtype = inputs_embeds.dtype
        if cfg.mrope_section is None:
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length
            cos, sin = self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)
            cache = args[2:]
        else:
            # Computed here rather than held as a buffer: an fp16 export halves buffers, and angles of positions
            # in the thousands need fp32 frequencies.
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, inputs_embeds.device)
            cos, sin = mrope_cos_sin(args[2], inv_freq, self.mrope_streams)
            cos, sin, cache = cos.to(dtype), sin.to(dtype), args[3:]
        attend = torch.ops.edgeav.cached_attention if self.fused else attend_cache
        hidden, presents = inputs_embeds, []
        for index, layer in enumerate(self.llm.model.layers):
            attention = layer.self_attn
            heads_major = attention.project(layer.input_layernorm(hidden), cos, sin)
            q, k, v = (x.transpose(1, 2).flatten(-2) for x in heads_major)  # -> [B, T, heads * hd]
            if self.fused:  # onnxruntime's CPU kernel is fp32 only: an fp16 graph's cache stays fp32 around it
                q, k, v = q.float(), k.float(), v.float()
            out, key, value = attend(q, k, v, cache[2 * index].to(q.dtype), cache[2 * index + 1].to(q.dtype),
                                     past_length, cfg.num_heads, cfg.num_kv_heads)
            hidden = hidden + attention.o_proj(out.to(dtype))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += [key, value]
        # [batch, 1, D] rather than [batch, D]: the head stays a MatMul, which int4 quantizes (a Gemm it would not).
        last = self.llm.model.norm(hidden[:, -1:])
        return (self.llm.lm_head(last)[:, 0], last[:, 0], *presents)
