"""A LLaMA-family LLM (:class:`~edgeav.models.llama.Llama`) as a GGUF file that llama.cpp runs (arch ``llama``).

    write_gguf(base_llm(loaded.model.llm), loaded.tokenizer, "crab-llm-q4_0.gguf", precision="int4")

What llama.cpp reads: the hyperparameters (context, widths, block count, heads, RoPE base, RMSNorm
epsilon, vocabulary size), the SentencePiece vocabulary with each piece's score and type (the system's
added tokens after it: special ones as control tokens, the rest user-defined), and the tensors under
llama.cpp's names. Precisions map to GGML types: fp32 F32, fp16 F16, bf16 BF16, int8 Q8_0, int4 Q4_0
(blocks of 32, one scale each), applied to every matrix, the embedding and the LM head included (what
``llama-quantize --pure`` does); the RMSNorm weights stay F32.

Hugging Face (and edgeav) rotate q and k with ``rotate_half`` (the pair of dimension ``j`` is ``j + head_dim/2``);
llama.cpp's llama arch rotates adjacent pairs ``(2j, 2j+1)``. The rows of ``q_proj`` and ``k_proj`` are
reordered per head so that llama.cpp's pairs are HF's (:func:`to_interleaved`); the attention scores are
unchanged because q and k are reordered alike.

The routed I-LoRA has no llama.cpp counterpart: an LLM with I-LoRA layers is refused, and
:func:`base_llm` gives its base weights as a plain LLaMA (the LoRA dropped, not merged).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeav.config import LoRAConfig
from edgeav.errors import OptionError
from edgeav.export.trace import quiet_loggers
from edgeav.models.ilora import ILoRALinear
from edgeav.models.llama import Llama
from edgeav.outputs import atomic_path

ARCH = "llama"
# edgeav precision -> (GGML tensor type of the matrices, llama.cpp's file type), by name in the gguf package.
GGML_TYPES = {"fp32": ("F32", "ALL_F32"), "fp16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "int8": ("Q8_0", "MOSTLY_Q8_0"), "int4": ("Q4_0", "MOSTLY_Q4_0")}
# HF parameter name (after ``model.layers.{i}.``) -> llama.cpp tensor name (after ``blk.{i}.``).
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
MODEL_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def import_gguf():
    try:
        import gguf
    except ImportError:
        raise OptionError("writing GGUF files needs the gguf package; pip install gguf") from None
    return gguf


def to_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection [heads * head_dim, in] from rotate_half order to llama.cpp's adjacent
    pairs: within each head, row ``j`` and row ``j + head_dim/2`` become rows ``2j`` and ``2j + 1``."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def from_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`to_interleaved`."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def base_llm(llm: Llama) -> Llama:
    """``llm`` without its I-LoRA: a plain LLaMA of the same config whose every tensor is ``llm``'s base tensor
    (shared, not copied). An LLM without LoRA comes back as it is."""
    if not any(isinstance(m, ILoRALinear) for m in llm.modules()):
        return llm
    with torch.device("meta"):
        plain = Llama(llm.cfg, LoRAConfig(targets=()))
    state = {k: v for k, v in llm.state_dict().items() if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_route")}
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval()


def gguf_tensors(llm: Llama) -> dict[str, np.ndarray]:
    """``llm``'s tensors under llama.cpp's names as fp32 arrays, q and k reordered (:func:`to_interleaved`)."""
    cfg = llm.cfg
    out: dict[str, np.ndarray] = {}
    for name, tensor in llm.state_dict().items():
        array = tensor.detach().cpu().float().numpy()
        if name in MODEL_TENSORS:
            out[MODEL_TENSORS[name]] = array
            continue
        _, _, index, rest = name.split(".", 3)  # model.layers.{i}.{rest}
        if rest.endswith("q_proj.weight"):
            array = to_interleaved(array, cfg.num_heads)
        elif rest.endswith("k_proj.weight"):
            array = to_interleaved(array, cfg.num_kv_heads)
        out[f"blk.{index}.{LAYER_TENSORS[rest]}"] = array
    return out


def check_exportable(llm: Llama, tokenizer, precision: str) -> None:
    """One-line OptionErrors for what llama.cpp's llama arch or this writer cannot hold."""
    cfg = llm.cfg
    if precision not in GGML_TYPES:
        raise OptionError(f"precision {precision!r}: GGUF files here are {', '.join(GGML_TYPES)}")
    if any(isinstance(m, ILoRALinear) for m in llm.modules()):
        raise OptionError("the LLM has I-LoRA layers, which llama.cpp's llama arch cannot run; export "
                          "edgeav.export.gguf.base_llm(llm) (the base weights) instead")
    if cfg.attention_bias or cfg.mrope_section is not None:
        raise OptionError("the LLM has q/k/v biases or M-RoPE (a Qwen2 model); this writer writes LLaMA "
                          "(arch llama) only")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise OptionError(f"the tokenizer has {tokenizer.vocab_size} tokens, the LLM {cfg.vocab_size}; pass the "
                          "tokenizer that comes with the model")
    if precision in ("int8", "int4"):
        widths = {cfg.hidden_size, cfg.intermediate_size}
        if any(w % 32 for w in widths):
            raise OptionError(f"{precision}: Q8_0/Q4_0 quantize rows in blocks of 32; hidden {cfg.hidden_size} "
                              f"and intermediate {cfg.intermediate_size} must be multiples of 32")


def vocabulary(tokenizer) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, GGUF token types) of ``tokenizer`` (an :class:`edgeav.tokenizer.Tokenizer`): its
    SentencePiece model's pieces as they are, then the system's added tokens (score 0; control when special,
    user-defined otherwise, as llama.cpp's own converter marks a Hugging Face tokenizer's added tokens)."""
    from sentencepiece import sentencepiece_model_pb2

    gguf = import_gguf()
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(tokenizer.model_proto)
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
    pieces = [p.piece for p in model.pieces]
    scores = [float(p.score) for p in model.pieces]
    types = [int(gguf.TokenType[kinds.Name(p.type)]) for p in model.pieces]
    for text in tokenizer.vocabulary.tokens:
        pieces.append(text)
        scores.append(0.0)
        special = text in tokenizer.vocabulary.special
        types.append(int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED))
    return pieces, scores, types


def write_gguf(llm: Llama, tokenizer, path: str | Path, *, precision: str = "fp32", name: str = "edgeav LLM") -> Path:
    """Write ``llm`` (no I-LoRA: see :func:`base_llm`) and ``tokenizer`` as the GGUF file ``path`` with its
    matrices in ``precision`` (:data:`GGML_TYPES`); the file appears whole or not at all."""
    gguf = import_gguf()
    check_exportable(llm, tokenizer, precision)
    cfg = llm.cfg
    matrix_type, file_type = (getattr(gguf.GGMLQuantizationType, GGML_TYPES[precision][0]),
                              getattr(gguf.LlamaFileType, GGML_TYPES[precision][1]))
    path = Path(path)
    with atomic_path(path) as temporary, quiet_loggers("gguf.gguf_writer"):  # it logs each file it writes
        writer = gguf.GGUFWriter(temporary, ARCH)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        if precision in ("int8", "int4"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_head_count(cfg.num_heads)
        writer.add_head_count_kv(cfg.num_kv_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_vocab_size(cfg.vocab_size)
        pieces, scores, types = vocabulary(tokenizer)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(cfg.bos_id)
        writer.add_eos_token_id(cfg.eos_id)
        writer.add_unk_token_id(0)
        writer.add_pad_token_id(cfg.pad_id)
        writer.add_add_bos_token(tokenizer.settings.add_bos_token)
        writer.add_add_eos_token(tokenizer.settings.add_eos_token)
        for tensor_name, array in gguf_tensors(llm).items():
            if array.ndim == 1 or matrix_type == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(tensor_name, np.ascontiguousarray(array, np.float32))
            else:
                writer.add_tensor(tensor_name, gguf.quants.quantize(array, matrix_type), raw_dtype=matrix_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


__all__ = ["GGML_TYPES", "base_llm", "from_interleaved", "gguf_tensors", "to_interleaved", "write_gguf"]
