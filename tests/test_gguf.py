"""GGUF export (edgeav.export.gguf): what the file holds, read back with gguf's own reader, and what llama.cpp
computes from it against edgeav's reference LLM on the same random weights (skipped without llama-cpp-python).

The LLM is a small LLaMA with grouped-query attention and O(1) projection gains: std-0.02 weights would leave
attention near uniform, and a q/k row order that does not match llama.cpp's RoPE would go unseen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import OptionError
from edgeav.models.llama import Llama
from edgeav.systems.crab.config import VOCABULARY, preset
from edgeav.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")

from edgeav.export.gguf import base_llm, write_gguf  # noqa: E402

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "edgeav" / "demo" / "tokenizer.model"
CONFIG = LLMConfig(base_vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=320, max_seq_len=256)


def sharp_llama(cfg: LLMConfig = CONFIG, seed: int = 0) -> Llama:
    """A random LLaMA whose projections have O(1) gains and whose norms vary around 1."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        llm = Llama(cfg, LoRAConfig(targets=())).eval()
        with torch.no_grad():
            for name, param in llm.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * torch.randn_like(param))
                elif "embed_tokens" not in name:
                    param.normal_(std=param.shape[1] ** -0.5)
    return llm


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(DEMO_TOKENIZER.read_bytes(), CONFIG, VOCABULARY)


def rotate_half_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's adjacent RoPE pairs back to HF's rotate_half halves: row 2j -> j, row 2j+1 -> j + head_dim/2."""
    head_dim = weight.shape[0] // heads
    per_head = weight.reshape(heads, head_dim, -1)
    return np.concatenate([per_head[:, 0::2], per_head[:, 1::2]], axis=1).reshape(weight.shape)


def field(reader, key):
    value = reader.fields[key]
    return value.contents()


def test_gguf_round_trip_holds_the_hyperparameters_vocabulary_and_tensors(tmp_path, tokenizer):
    llm = sharp_llama()
    path = write_gguf(llm, tokenizer, tmp_path / "llm.gguf", precision="fp32")
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.architecture") == "llama"
    expected = {"llama.context_length": 256, "llama.embedding_length": 128, "llama.block_count": 2,
                "llama.feed_forward_length": 320, "llama.attention.head_count": 4,
                "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 32, "llama.vocab_size": 529}
    for key, value in expected.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "llama" and len(tokens) == len(types) == 529
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[512:] == list(VOCABULARY.tokens)
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3] == gguf.TokenType.BYTE  # <0x00>: the byte-fallback pieces
    assert types[512] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.USER_DEFINED  # <image>, <mask_5>
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)

    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 3 + 9 * CONFIG.num_layers
    state = llm.state_dict()
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    names.update({f"blk.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                  for i in range(CONFIG.num_layers) for ours, theirs in layer.items()})
    for gguf_name, hf_name in names.items():
        tensor = by_name[gguf_name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        data = np.asarray(tensor.data).reshape(state[hf_name].shape)
        if ".attn_q." in gguf_name:
            data = rotate_half_rows(data, CONFIG.num_heads)
        elif ".attn_k." in gguf_name:
            data = rotate_half_rows(data, CONFIG.num_kv_heads)
        np.testing.assert_array_equal(data, state[hf_name].numpy(), err_msg=gguf_name)


@pytest.mark.parametrize("precision, qtype, tolerance", [("int8", "Q8_0", 0.01), ("int4", "Q4_0", 0.15)])
def test_quantized_gguf_matrices_dequantize_to_the_weights(tmp_path, tokenizer, precision, qtype, tolerance):
    llm = sharp_llama()
    reader = gguf.GGUFReader(write_gguf(llm, tokenizer, tmp_path / "llm.gguf", precision=precision))
    by_name = {t.name: t for t in reader.tensors}
    assert by_name["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    for name, hf_name in (("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                          ("output.weight", "lm_head.weight"), ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight")):
        tensor = by_name[name]
        assert tensor.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
        weights = llm.state_dict()[hf_name].numpy()
        back = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(weights.shape)
        relative = np.abs(back - weights).max() / np.abs(weights).max()
        assert relative < tolerance, (name, relative)


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path, tokenizer):
    crab_llm = Llama(CONFIG, LoRAConfig(rank=4, alpha=8.0))
    with pytest.raises(OptionError, match="I-LoRA"):
        write_gguf(crab_llm, tokenizer, tmp_path / "a.gguf")
    plain = base_llm(crab_llm)
    ours, theirs = plain.model.layers[0].self_attn.q_proj.weight, crab_llm.model.layers[0].self_attn.q_proj.weight
    assert ours.data_ptr() == theirs.data_ptr()  # the base weights shared, not copied
    write_gguf(plain, tokenizer, tmp_path / "b.gguf")
    odd = Llama(preset("crab-tiny").llm, LoRAConfig(targets=()))  # intermediate 344: not in blocks of 32
    crab_tokenizer = Tokenizer(DEMO_TOKENIZER.read_bytes(), odd.cfg, VOCABULARY)
    with pytest.raises(OptionError, match="multiples of 32"):
        write_gguf(odd, crab_tokenizer, tmp_path / "c.gguf", precision="int4")
    assert not (tmp_path / "c.gguf").exists()


# -- llama.cpp on the file --------------------------------------------------------------------------------


def reference_logits(llm: Llama, ids: list[int]) -> np.ndarray:
    llm.setup_caches(1, 128)
    with torch.inference_mode():
        logits, _ = llm(llm.embed(torch.tensor([ids])), torch.arange(len(ids)))
    return logits[0].numpy()


def greedy(contender, ids: list[int], steps: int) -> list[int]:
    token = int(np.argmax(contender.prefill(ids)))
    out = [token]
    for _ in range(steps):
        token = int(np.argmax(contender.step(token)))
        out.append(token)
    return out


@pytest.fixture(scope="module")
def llama_cpp_setup(tmp_path_factory, tokenizer):
    """(the LLM, a folder, llama.cpp's buffer settings on this machine), or a skip without llama-cpp-python."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgeav[bench]')")
    from edgeav.bench.llm_peers import llama_cpp_buffers

    folder = tmp_path_factory.mktemp("gguf")
    llm = sharp_llama()
    repack, _ = llama_cpp_buffers(write_gguf(llm, tokenizer, folder / "probe.gguf", precision="int4"))
    return llm, folder, repack


def test_llama_cpp_f32_computes_the_reference_logits_and_greedy_tokens(llama_cpp_setup, tokenizer):
    from edgeav.bench.llm_peers import LlamaCppLLM, TorchLLM

    llm, folder, _ = llama_cpp_setup
    path = write_gguf(llm, tokenizer, folder / "f32.gguf", precision="fp32")
    ids = [1, *range(7, 40)]
    reference = reference_logits(llm, ids)
    peer = LlamaCppLLM(path, CONFIG.vocab_size, 128, 2, exact=True)
    try:
        last = peer.prefill(ids)
        # every position: a prompt one token longer each time, so position errors anywhere would show
        for n in (1, 5, len(ids)):
            logits = peer.prefill(ids[:n])
            scale = np.abs(reference[n - 1]).max()
            assert np.abs(logits - reference[n - 1]).max() < 1e-3 * scale, n
        np.testing.assert_allclose(last, reference[-1], atol=1e-3 * np.abs(reference[-1]).max())
        assert greedy(peer, ids, 12) == greedy(TorchLLM(llm, 128), ids, 12)
    finally:
        peer.close()


def dequantized_llama(path: Path) -> Llama:
    """The reference LLM holding the weights the GGUF file ``path`` stores, dequantized by gguf's own code
    and put back in HF's row order: what llama.cpp should compute, quantization error and all."""
    llm = sharp_llama()
    state = llm.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    loaded = {}
    for tensor in gguf.GGUFReader(path).tensors:
        if tensor.name in names:
            hf_name = names[tensor.name]
        else:
            _, index, kind, _ = tensor.name.split(".")
            hf_name = f"model.layers.{index}.{layer[kind]}.weight"
        data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(state[hf_name].shape)
        if kind_of(tensor.name) == "attn_q":
            data = rotate_half_rows(data, CONFIG.num_heads)
        elif kind_of(tensor.name) == "attn_k":
            data = rotate_half_rows(data, CONFIG.num_kv_heads)
        loaded[hf_name] = torch.tensor(data)
    llm.load_state_dict(loaded)
    return llm


def kind_of(name: str) -> str:
    return name.split(".")[2] if name.startswith("blk.") else name


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_llama_cpp_reads_the_quantized_files_as_written(llama_cpp_setup, tokenizer, precision):
    """llama.cpp on a Q8_0 or Q4_0 file computes what the reference computes from the file's dequantized weights
    (within llama.cpp's own rounding of activations to 8 bits): the blocks are laid out as llama.cpp reads them."""
    from edgeav.bench.llm_peers import REPACKED_Q4_0, LlamaCppLLM

    llm, folder, repack = llama_cpp_setup
    path = write_gguf(llm, tokenizer, folder / f"{precision}.gguf", precision=precision)
    ids = [1, *range(7, 40)]
    expected = reference_logits(dequantized_llama(path), ids)[-1]
    peer = LlamaCppLLM(path, CONFIG.vocab_size, 128, 2, extra_buffers=repack is None,
                       repack=REPACKED_Q4_0 if repack is not None and precision == "int4" else None)
    try:
        logits = peer.prefill(ids)
    finally:
        peer.close()
    cosine = float(logits @ expected / np.linalg.norm(logits) / np.linalg.norm(expected))
    assert cosine > 0.999
    assert int(np.argmax(logits)) == int(np.argmax(expected))
