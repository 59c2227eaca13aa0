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
from edgeav.engines.llm_io import kv_names

from edgeav.models.llama import Llama, apply_rope, mrope_cos_sin, mrope_streams, rms_norm, rope_inv_freq, rope_tables


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
                 cos_cache: Tensor | None, sin_cache: Tensor | None, num_heads: int, kv_heads: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's attention over its cache in standard ops: ``q`` [B, T, heads * hd] and ``k``, ``v``
    [B, T, kv_heads * hd] of the new tokens at positions ``past_length ..``; the cache buffers [B, kv_heads,
    capacity, hd]; ``cos_cache``, ``sin_cache`` [positions, hd / 2]: RoPE's tables, applied here to q and k
    (None: they come rotated). -> attention [B, T, heads * hd] and the buffers with the new keys and values
    written in. Queries attend causally; positions past the new tokens are masked, so their contents never
    count."""
    b, t, _ = q.shape
    head_dim, capacity = past_key.shape[-1], past_key.shape[2]
    positions = torch.arange(t, device=q.device) + past_length  # [T]
    q, k, v = q.view(b, t, num_heads, head_dim), k.view(b, t, kv_heads, head_dim), v.view(b, t, kv_heads, head_dim)
    if cos_cache is not None:
        cos, sin = (torch.cat((table[positions], table[positions]), dim=-1)[:, None] for table in (cos_cache, sin_cache))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    index = positions.view(1, 1, t, 1).expand(b, kv_heads, t, head_dim)
    present_key = past_key.scatter(2, index, k.transpose(1, 2))
    present_value = past_value.scatter(2, index, v.transpose(1, 2))
    keys, values = present_key, present_value
    groups = num_heads // kv_heads
    if groups > 1:  # kv head j serves query heads j*groups .. (j+1)*groups - 1, as HF's repeat_kv
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    mask = torch.arange(capacity, device=q.device)[None, :] <= positions[:, None]  # [T, capacity]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[None, None])
    return out.transpose(1, 2).flatten(-2), present_key, present_value


@torch.library.custom_op("edgeav::cached_attention", mutates_args=())
def cached_attention(q: Tensor, k: Tensor, v: Tensor, past_key: Tensor, past_value: Tensor, seqlens_k: Tensor,
                     total_length: Tensor, cos_cache: Tensor | None, sin_cache: Tensor | None, num_heads: int,
                     kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`attend_cache` as one opaque op, which the exporter writes as onnxruntime's GroupQueryAttention
    (:func:`export_translations`). It takes the lengths as that op does, computed once for all layers:
    ``seqlens_k`` int32 [1], the cache's length after this step less one, and ``total_length`` int32 [], that
    length."""
    past_length = total_length.long().view(1) - q.shape[1]
    return attend_cache(q, k, v, past_key, past_value, past_length, cos_cache, sin_cache, num_heads, kv_heads)


@cached_attention.register_fake
def _(q, k, v, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads, kv_heads):
    return torch.empty_like(q), torch.empty_like(past_key), torch.empty_like(past_value)


def add_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual sum ``x + residual`` RMS-normed with ``weight``, and the sum itself."""
    total = x + residual
    return rms_norm(total, weight, eps), total


@torch.library.custom_op("edgeav::fused_add_norm", mutates_args=())
def fused_add_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """:func:`add_norm` as one opaque op, which the exporter writes as onnxruntime's
    SkipSimplifiedLayerNormalization (:func:`export_translations`)."""
    return add_norm(x, residual, weight, eps)


@fused_add_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@functools.cache
def export_translations() -> dict:
    """The exporter's translation of edgeav's own ops (``custom_translation_table``) into onnxruntime's fused
    contrib ops: :func:`cached_attention` -> ``com.microsoft.GroupQueryAttention`` (RoPE inside it when given
    tables; the present buffers of the past's shape, which onnxruntime shares when the runtime binds both to
    one buffer), :func:`fused_add_norm` -> ``com.microsoft.SkipSimplifiedLayerNormalization``."""
    import onnxscript
    from onnx.defs import OpSchema

    # onnxruntime's contrib schemas are not in onnx's registry; the exporter needs one to call each op.
    def contrib(name: str, inputs: list[tuple[str, str, bool]], outputs: list[str], types, attributes: dict):
        single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
        schema = OpSchema(
            name, "com.microsoft", 1,
            inputs=[OpSchema.FormalParameter(n, kind, param_option=optional if opt else single)
                    for n, kind, opt in inputs],
            outputs=[OpSchema.FormalParameter(n, "T") for n in outputs], type_constraints=types,
            attributes=[OpSchema.Attribute(n, kind, "") for n, kind in attributes.items()])
        return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)

    floats = ("T", ["tensor(float)", "tensor(float16)"], "")
    integer, real = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    group_query_attention = contrib(
        "GroupQueryAttention",
        [("query", "T", False), ("key", "T", False), ("value", "T", False), ("past_key", "T", False),
         ("past_value", "T", False), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
         ("cos_cache", "T", True), ("sin_cache", "T", True)],
        ["output", "present_key", "present_value"], [floats, ("M", ["tensor(int32)"], "")],
        {"num_heads": integer, "kv_num_heads": integer, "do_rotary": integer})
    skip_norm = contrib(
        "SkipSimplifiedLayerNormalization", [("input", "T", False), ("skip", "T", False), ("gamma", "T", False)],
        ["output", "mean", "inv_std_var", "input_skip_bias_sum"], [floats], {"epsilon": real})

    def attention(q, k, v, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads: int,
                  kv_heads: int):
        rotary = {} if cos_cache is None else {"do_rotary": 1}
        return group_query_attention(q, k, v, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache,
                                     num_heads=num_heads, kv_num_heads=kv_heads, **rotary)

    def add_norm_op(x, residual, weight, eps: float):
        normed, _, _, total = skip_norm(x, residual, weight, epsilon=eps)
        return normed, total

    return {torch.ops.edgeav.cached_attention.default: attention,
            torch.ops.edgeav.fused_add_norm.default: add_norm_op}


@functools.cache
def register_torchscript_symbolics() -> None:
    """The same translation as :func:`export_translations` for TorchScript's exporter
    (``torch.onnx.export(dynamo=False)``), registered once per process."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "v", "v", "i", "i")
    def attention(g, q, k, v, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, num_heads,
                  kv_heads):
        rotated_before = symbolic_helper._is_none(cos_cache)  # M-RoPE: q and k come rotated
        tables, options = ((), {}) if rotated_before else ((cos_cache, sin_cache), {"do_rotary_i": 1})
        outputs = g.op("com.microsoft::GroupQueryAttention", q, k, v, past_key, past_value, seqlens_k, total_length,
                       *tables, num_heads_i=num_heads, kv_num_heads_i=kv_heads, outputs=3, **options)
        for output, like in zip(outputs, (q, past_key, past_value)):
            output.setType(like.type())
        return outputs

    @symbolic_helper.parse_args("v", "v", "v", "f")
    def add_norm_op(g, x, residual, weight, eps):
        normed, _, _, total = g.op("com.microsoft::SkipSimplifiedLayerNormalization", x, residual, weight,
                                   epsilon_f=eps, outputs=4)
        normed.setType(x.type())
        total.setType(x.type())
        return normed, total

    torch.onnx.register_custom_op_symbolic("edgeav::cached_attention", attention, 1)
    torch.onnx.register_custom_op_symbolic("edgeav::fused_add_norm", add_norm_op, 1)


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
            # RoPE's tables as attention takes them: [positions, head_dim / 2] (rotate_half repeats the halves)
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos[:, :cfg.head_dim // 2].contiguous(), persistent=False)
            self.register_buffer("rope_sin", sin[:, :cfg.head_dim // 2].contiguous(), persistent=False)
        else:
            self.register_buffer("mrope_streams", mrope_streams(cfg.mrope_section), persistent=False)

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        cfg = self.llm.cfg
        inputs_embeds, past_length = args[:2]
        dtype = inputs_embeds.dtype
        # The runtime's cache is fp32 (as onnxruntime's attention is best on a CPU): an fp16 graph attends in fp32.
        work = torch.float32 if self.fused else dtype
        if cfg.mrope_section is None:
            tables, rotate, cache = (self.rope_cos.to(work), self.rope_sin.to(work)), None, args[2:]
        else:
            # Computed here rather than held as a buffer: an fp16 export halves buffers, and angles of positions
            # in the thousands need fp32 frequencies.
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, inputs_embeds.device)
            cos, sin = mrope_cos_sin(args[2], inv_freq, self.mrope_streams)
            tables, rotate, cache = (None, None), (cos[:, None].to(dtype), sin[:, None].to(dtype)), args[3:]
        if self.fused:  # GroupQueryAttention's lengths, once for every layer
            total = past_length + inputs_embeds.shape[1]
            attend, lengths = torch.ops.edgeav.cached_attention, ((total - 1).int(), total.int().squeeze(0))
        else:
            attend, lengths = attend_cache, (past_length,)
        layers = self.llm.model.layers
        # Each residual sum and the norm after it are one step (the next layer's input norm, or the final norm).
        following = [layer.input_layernorm for layer in layers[1:]] + [self.llm.model.norm]
        norms = [norm for layer, after in zip(layers, following) for norm in (layer.post_attention_layernorm, after)]
        hidden, presents = inputs_embeds, []
        normed = layers[0].input_layernorm(hidden)
        for index, layer in enumerate(layers):
            attention = layer.self_attn
            q, k, v = attention.q_proj(normed), attention.k_proj(normed), attention.v_proj(normed)  # [B, T, heads*hd]
            if rotate is not None:
                q, k = (apply_rope(x.unflatten(-1, (-1, cfg.head_dim)), *rotate).flatten(-2) for x in (q, k))
            out, key, value = attend(q.to(work), k.to(work), v.to(work), cache[2 * index].to(work),
                                     cache[2 * index + 1].to(work), *lengths, *tables, cfg.num_heads,
                                     cfg.num_kv_heads)
            normed, hidden = self._add_norm(hidden, attention.o_proj(out.to(dtype)), norms[2 * index])
            normed, hidden = self._add_norm(hidden, layer.mlp(normed), norms[2 * index + 1])
            presents += [key, value]
        # [batch, 1, D] rather than [batch, D]: the head stays a MatMul, which int4 quantizes (a Gemm it would not).
        last = normed[:, -1:]
        return (self.llm.lm_head(last)[:, 0], last[:, 0], *presents)

    def _add_norm(self, x: Tensor, residual: Tensor, norm: nn.Module) -> tuple[Tensor, Tensor]:
        fn = torch.ops.edgeav.fused_add_norm if self.fused else add_norm
        return fn(x, residual, norm.weight, norm.eps)
