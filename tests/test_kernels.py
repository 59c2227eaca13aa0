"""edgeav.kernels: the fused I-LoRA term and weight-only int8/int4 layers, torch paths and Triton kernels.

The Triton kernels run here in Triton's CPU interpreter (TRITON_INTERPRET=1) when triton is installed;
they are compared with the torch paths, which are compared with the reference modules.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import crab_llm
from edgeav.systems.crab.config import preset
from edgeav.errors import OptionError
from edgeav.kernels import (
    QuantizedILoRALinear,
    WeightOnlyLinear,
    WeightQuantization,
    dequantize_weight,
    fused_ilora_forward,
    ilora_delta,
    pack_int4,
    quantize_llm_,
    quantize_weight,
    triton_available,
    unpack_int4,
    weight_bytes,
)
from edgeav.models.ilora import ILoRALinear
from edgeav.models.llama import Llama

TINY_LORA = preset("crab-tiny").lora
TINY_LLM = preset("crab-tiny").llm
# (in, out, rank, heads): crab-tiny's up_proj and down_proj, and sizes that fit no tile or power of two.
ILORA_SHAPES = [
    (TINY_LLM.hidden_size, TINY_LLM.intermediate_size, TINY_LORA.rank, TINY_LORA.heads),
    (TINY_LLM.intermediate_size, TINY_LLM.hidden_size, TINY_LORA.rank, TINY_LORA.heads),
    (37, 53, 5, 2),
]
# Triton kernels against torch paths: two units in the last place of fp16 / bf16 (2^-10 / 2^-8 relative
# each), with an absolute floor near zero; the kernels sum in another order than the torch paths.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton)")


def ilora_layer(in_features, out_features, rank, heads, dtype=torch.float32, seed=0) -> ILoRALinear:
    """An I-LoRA layer whose LoRA term is as large as its base term and whose router is far from uniform."""
    torch.manual_seed(seed)
    layer = ILoRALinear(in_features, out_features, rank, heads, scale=TINY_LORA.scale)
    with torch.no_grad():
        layer.weight.normal_(std=in_features ** -0.5)
        layer.lora_B.normal_(std=(heads * rank) ** -0.5 / TINY_LORA.scale)
        layer.lora_route.mul_(4.0)
    return layer.to(dtype)


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """The matrices here are tiny: on a busy shared CPU, intra-op threads cost more in waiting than they
    save (a 100-fold slowdown was seen), so this file runs single-threaded and restores the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_device(monkeypatch):
    """Where the Triton kernels run: CUDA when there is a GPU, else Triton's CPU interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    triton = sys.modules.get("triton")
    if triton is not None and type(triton.language.cdiv).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with TRITON_INTERPRET=1")
    # The interpreter must be on when triton is first imported; on a machine without a GPU no other mode runs.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton  # noqa: F401
    return "cpu"


def test_importing_the_kernels_does_not_import_triton():
    # The default install is CPU-only: Triton is imported only when a Triton path runs.
    code = "import sys, edgeav.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


# ---------------------------------------------------------------- I-LoRA term, torch path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("shape", ILORA_SHAPES)
def test_torch_ilora_term_equals_ilora_linear_forward(shape, tokens, dtype):
    layer = ilora_layer(*shape, dtype=dtype)
    x = torch.randn(2, tokens, shape[0]).to(dtype)
    with torch.no_grad():
        expected = layer(x)
        base = F.linear(x, layer.weight)
        got = fused_ilora_forward(layer, x, base, backend="torch")
        # The torch path is the reference's own operations: equal to the bit in every dtype.
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got.data_ptr() == base.data_ptr()  # added in place onto the base output
        layer.weight.zero_()
        term = ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, backend="torch")
        torch.testing.assert_close(term, layer(x), rtol=0, atol=0)
    assert term.abs().mean() > 0.1 * expected.abs().mean()  # the LoRA term is not negligible here


def test_ilora_term_rejects_mismatched_parameters():
    layer = ilora_layer(16, 24, 4, 3)
    x = torch.randn(1, 16)
    with pytest.raises(OptionError, match="features"):
        ilora_delta(torch.randn(1, 17), layer.lora_A, layer.lora_B, layer.lora_route, layer.scale)
    with pytest.raises(OptionError, match="heads \\* rank"):
        ilora_delta(x, layer.lora_A, layer.lora_B[:, :-1], layer.lora_route, layer.scale)
    with pytest.raises(OptionError, match="out has shape"):
        ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, out=torch.zeros(1, 23))
    with pytest.raises(OptionError, match="expected one of auto, torch, triton"):
        ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, backend="cuda")


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = ilora_layer(16, 24, 4, 3)
    # Without triton the message says how to install it; with it, that CPU tensors need the interpreter.
    with pytest.raises(OptionError, match="pip install|CUDA"):
        ilora_delta(torch.randn(1, 16), layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, backend="triton")


# ---------------------------------------------------------------- I-LoRA term, Triton kernel


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, tokens", [(ILORA_SHAPES[0], 1), ((130, 77, 5, 3), 3)])
def test_triton_ilora_kernel_matches_torch_path(triton_device, shape, tokens, dtype):
    # Decode (one token) at crab-tiny's shape; then 130 inputs and 77 outputs, which fit neither the
    # 128-wide K loop nor the output tile, rank 5 and 3 heads (padded to 8 and 4 in the kernel), 3 tokens.
    layer = ilora_layer(*shape, dtype=dtype).to(triton_device)
    x = torch.randn(tokens, shape[0]).to(triton_device, dtype)
    with torch.no_grad():
        expected = layer(x)
        base = F.linear(x, layer.weight)
        got = fused_ilora_forward(layer, x, base.clone(), backend="triton")
        term = ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, backend="triton")
        # Non-contiguous base output: the kernel writes the term and it is added afterwards.
        strided = torch.zeros(shape[1], tokens, dtype=dtype, device=triton_device).T
        ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, out=strided, backend="triton")
    reference_term = ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, backend="torch")
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(term, reference_term, rtol=tol, atol=tol)
    torch.testing.assert_close(strided, reference_term, rtol=tol, atol=tol)


# ---------------------------------------------------------------- quantize / dequantize


def test_int4_nibble_order_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0, 7, 8]])
    assert pack_int4(q).tolist() == [[0x21, 0x0F, 0x87]]
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    with pytest.raises(OptionError, match="even"):
        pack_int4(torch.zeros(2, 3))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("in_features", [128, 100])
def test_int4_round_trips_integer_weights_exactly(group_size, in_features):
    # Integers in -8..7 with both ends in every group: scale 1, offset -8, so any slip in nibble order,
    # group indexing or padding changes values. in_features 100 pads the last group.
    torch.manual_seed(1)
    weight = torch.randint(-8, 8, (6, in_features)).float()
    weight[:, ::group_size] = -8.0
    weight[:, 1::group_size] = 7.0
    weight[:, -2:] = torch.tensor([-8.0, 7.0])  # the short last group spans the range too
    buffers = quantize_weight(weight, "int4", group_size)
    groups = -(-in_features // group_size)
    assert buffers["qweight"].dtype == torch.uint8 and buffers["qweight"].shape == (6, groups * group_size // 2)
    assert buffers["scales"].shape == buffers["offsets"].shape == (6, groups)
    assert torch.equal(dequantize_weight(**buffers, in_features=in_features), weight)
    # Stored codes are weight + 8 in feature order, two per byte.
    codes = unpack_int4(buffers["qweight"])[:, :in_features]
    assert torch.equal(codes.float() - 8, weight)


def test_int8_round_trips_scaled_integers_exactly():
    row_scales = torch.tensor([0.5, 0.25, 2.0, 1.0])
    q = torch.randint(-127, 128, (4, 50)).float()
    q[:, 0] = 127.0
    weight = q * row_scales[:, None]
    buffers = quantize_weight(weight, "int8")
    assert buffers["qweight"].dtype == torch.int8
    torch.testing.assert_close(buffers["scales"], row_scales, rtol=0, atol=0)
    assert torch.equal(buffers["qweight"].float(), q)
    assert torch.equal(dequantize_weight(**buffers), weight)


def test_int8_error_is_half_a_step_of_each_row():
    torch.manual_seed(2)
    weight = torch.randn(40, 96) * torch.logspace(-3, 0, 40)[:, None]  # rows of very different size
    restored = dequantize_weight(**quantize_weight(weight, "int8"))
    for row, row_restored in zip(weight, restored):  # independent reference: one row at a time
        step = row.abs().max().item() / 127
        assert (row - row_restored).abs().max().item() <= step / 2 * (1 + 1e-5)
    # A per-tensor scale would break the bound on the small rows.
    assert (weight[0] - restored[0]).abs().max() < 1e-3 * weight.abs().max() / 127


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_error_is_half_a_step_of_each_group(group_size):
    torch.manual_seed(3)
    weight = torch.randn(12, 300) * 0.02 + torch.linspace(-0.05, 0.05, 300)  # offsets differ per group
    restored = dequantize_weight(**quantize_weight(weight, "int4", group_size), in_features=300)
    padded = F.pad(weight, (0, -300 % group_size))
    for start in range(0, 300, group_size):  # independent reference: min/max of each group, zeros in the pad
        group = padded[:, start:start + group_size]
        step = (group.amax(1) - group.amin(1)) / 15
        end = min(start + group_size, 300)
        error = (weight[:, start:end] - restored[:, start:end]).abs().amax(1)
        assert torch.all(error <= step / 2 * (1 + 1e-4) + 1e-7), (start, error, step)


def test_scales_are_stored_in_the_weight_dtype_and_zero_rows_survive():
    weight = torch.randn(8, 64).to(torch.bfloat16)
    weight[3] = 0
    for mode in ("int8", "int4"):
        buffers = quantize_weight(weight, mode, 32)
        assert buffers["scales"].dtype == torch.bfloat16
        restored = dequantize_weight(**buffers, in_features=64)
        assert torch.all(restored[3] == 0) and torch.isfinite(restored).all()
        # Codes are computed from the rounded bf16 scales: within half a step plus bf16 rounding.
        assert (restored.float() - weight.float()).abs().max() < (0.02 if mode == "int8" else 0.3)


def test_bad_mode_and_group_size_are_refused_with_the_choices():
    weight = torch.randn(4, 64)
    with pytest.raises(OptionError, match="expected one of int8, int4.*'int8'"):
        quantize_weight(weight, "in8")
    with pytest.raises(OptionError, match="group_size 48.*32, 64, 128"):
        quantize_weight(weight, "int4", 48)
    with pytest.raises(OptionError, match="expected one of int8, int4"):
        WeightOnlyLinear(64, 4, "fp8")
    with pytest.raises(OptionError, match="group_size"):
        quantize_llm_(crab_llm("crab-tiny"), "int4", group_size=100)


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32), ("int4", 128)])
def test_weight_only_linear_torch_path_is_dequantized_matmul(mode, group_size):
    torch.manual_seed(4)
    linear = nn.Linear(344, 70, bias=False)
    layer = WeightOnlyLinear.from_weight(linear.weight, mode, group_size)
    x = torch.randn(3, 5, 344)
    out = layer(x)
    assert out.shape == (3, 5, 70)
    torch.testing.assert_close(out, x @ layer.dequantize().T, rtol=1e-5, atol=1e-5)
    # And close to the float layer: int8 steps are 1/127 of a row, int4 steps 1/15 of a group.
    rel = (out - linear(x)).norm() / linear(x).norm()
    assert rel < (0.01 if mode == "int8" else 0.12), rel
    with pytest.raises(OptionError, match="expected 344"):
        layer(torch.randn(1, 343))


@needs_triton
@pytest.mark.parametrize("mode, group_size", [("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("dtype, tokens", [(torch.float32, 1), (torch.float16, 3), (torch.bfloat16, 2),
                                           (torch.float32, 20)])
def test_triton_weight_only_kernel_matches_torch_path(triton_device, mode, group_size, dtype, tokens):
    # 344 inputs: a padded last int4 group and a partial int8 K tile; 70 outputs: a partial column tile;
    # 20 tokens: the prefill tiling.
    if dtype == torch.bfloat16 and triton_device == "cpu":
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong (numpy has no bf16); runs on a GPU")
    torch.manual_seed(5)
    weight = (torch.randn(70, 344) * 344 ** -0.5).to(triton_device, dtype)
    layer = WeightOnlyLinear.from_weight(weight, mode, group_size)
    x = torch.randn(tokens, 344).to(triton_device, dtype)
    expected = layer(x)
    layer.backend = "triton"
    got = layer(x)
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@needs_triton
def test_triton_quantized_ilora_layer_matches_reference(triton_device):
    # Both kernels in one layer: the int4 base matmul, then the fused LoRA term added onto it.
    layer = ilora_layer(*ILORA_SHAPES[1]).to(triton_device)
    quantized = QuantizedILoRALinear.from_ilora(layer, "int4", 64)
    x = torch.randn(2, ILORA_SHAPES[1][0], device=triton_device)
    with torch.no_grad():
        expected = F.linear(x, quantized.dequantize()) + ilora_delta(
            x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale, backend="torch")
        quantized.backend = "triton"
        got = quantized(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_quantized_ilora_layer_keeps_the_lora_and_its_forward():
    layer = ilora_layer(*ILORA_SHAPES[0])
    quantized = QuantizedILoRALinear.from_ilora(layer, "int8")
    assert quantized.lora_A is layer.lora_A and quantized.lora_B is layer.lora_B
    assert quantized.lora_route is layer.lora_route
    x = torch.randn(4, ILORA_SHAPES[0][0])
    with torch.no_grad():
        expected = F.linear(x, quantized.dequantize()) + ilora_delta(
            x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale)
        torch.testing.assert_close(quantized(x), expected, rtol=1e-6, atol=1e-6)
        # Close to the float layer (int8 base, exact LoRA).
        rel = (quantized(x) - layer(x)).norm() / layer(x).norm()
    assert rel < 0.01, rel
    keys = set(quantized.state_dict())
    assert {"lora_A", "lora_B", "lora_route", "qweight", "scales"} <= keys and "weight" not in keys


# ---------------------------------------------------------------- the LLM


def tiny_llm(seed: int = 0) -> Llama:
    """crab-tiny's LLM with live LoRA and half-gain projections: logits far from uniform, and a residual
    stream that carries the embeddings past the branches, as in a trained LLM (at full gain every
    branch's error adds at full size)."""
    torch.manual_seed(seed)
    llm = crab_llm("crab-tiny").eval()
    with torch.no_grad():
        for module in llm.modules():
            if isinstance(module, ILoRALinear):
                module.weight.normal_(std=0.5 * module.in_features ** -0.5)
                module.lora_B.normal_(std=0.5 * (module.heads * module.rank) ** -0.5 / module.scale)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(std=module.in_features ** -0.5)
    llm.setup_caches(max_batch_size=2, max_seq_len=32)
    return llm


def prefill_then_decode(llm: Llama, embeds: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Logits of a prefill over ``embeds`` then ``steps`` greedy decode steps, concatenated on T."""
    with torch.no_grad():
        logits, _ = llm(embeds, torch.arange(embeds.shape[1]))
        outputs = [logits]
        for step in range(steps):
            token = outputs[-1][:, -1].argmax(-1)
            position = embeds.shape[1] + step
            logits, _ = llm(llm.embed(token)[:, None], torch.tensor([position]), kv_len=position + 1)
            outputs.append(logits)
    return torch.cat(outputs, dim=1)


@pytest.fixture(scope="module")
def tiny_reference():
    """The fp32 tiny LLM, prompt embeddings and its logits over a prefill and three decode steps."""
    llm = tiny_llm()
    torch.manual_seed(7)
    embeds = torch.randn(2, 12, TINY_LLM.hidden_size)
    return llm, embeds, prefill_then_decode(llm, embeds)


@pytest.mark.parametrize("mode, group_size, max_rel, min_agree", [
    ("int8", 128, 0.03, 0.9),
    ("int4", 32, 0.4, 0.5),
    ("int4", 128, 0.4, 0.5),
])
def test_quantized_tiny_llm_stays_close_to_fp32(tiny_reference, mode, group_size, max_rel, min_agree):
    # Tolerances: an int8 step is 1/127 of a row's largest weight, ~0.7 % rms error on a projection's
    # output; an int4 step is 1/15 of a group's range, ~8 % (32-wide groups) to ~10 % (128). 29
    # quantized projections with independent errors add in quadrature, at most ~sqrt(29) = 5.4 times
    # that where every branch is as large as the residual stream: <= ~4 % (int8), <= ~50 % (int4). This
    # model measures 1 % and 17-25 % (seeds 0-1). Swapped nibbles measure ~140 % with no token agreeing.
    # Greedy tokens: near-ties of a random model flip first, so int4 is asked for half, int8 for 90 %.
    reference, embeds, expected = tiny_reference
    quantized = copy.deepcopy(reference)
    lora_before = {name: p.detach().clone() for name, p in reference.named_parameters() if "lora_" in name}
    assert quantize_llm_(quantized, mode, group_size) is quantized
    got = prefill_then_decode(quantized, embeds)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < max_rel, rel
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree >= min_agree, agree
    # LoRA parameters are untouched, exact and still named as before.
    lora_after = {name: p for name, p in quantized.named_parameters() if "lora_" in name}
    assert lora_after.keys() == lora_before.keys()
    for name, value in lora_before.items():
        assert lora_after[name].dtype == value.dtype and torch.equal(lora_after[name], value), name
    # Independent of the error bounds: the swapped model computes what the float model computes with
    # each projection's weight replaced by its dequantized copy (so every projection was swapped in
    # its place, and the LoRA runs as before).
    dequantized = copy.deepcopy(reference)
    quantized_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in dequantized.named_modules():
            if isinstance(module, (nn.Linear, ILoRALinear)):
                module.weight.copy_(quantized_modules[name].dequantize())
    torch.testing.assert_close(got, prefill_then_decode(dequantized, embeds), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lm_head", [False, True])
def test_quantize_llm_swaps_every_projection_and_records_the_scheme(lm_head):
    # LoRA on two projections only, so that plain nn.Linear projections are swapped too.
    targets = ("q_proj", "down_proj")
    llm = Llama(TINY_LLM, dataclasses.replace(TINY_LORA, targets=targets)).eval()
    llm.setup_caches(max_batch_size=1, max_seq_len=8)
    fp32_bytes = weight_bytes(llm)
    assert quantize_llm_(llm, "int4", 64, lm_head=lm_head) is llm
    assert llm.weight_quantization == WeightQuantization("int4", 64, lm_head)
    for layer in llm.model.layers:
        projections = [(n, m) for n, m in (*layer.self_attn.named_children(), *layer.mlp.named_children())
                       if n.endswith("_proj")]
        assert len(projections) == 7
        for name, proj in projections:
            assert type(proj) is (QuantizedILoRALinear if name in targets else WeightOnlyLinear), name
            assert proj.mode == "int4" and proj.group_size == 64
    assert type(llm.lm_head) is (WeightOnlyLinear if lm_head else nn.Linear)
    assert not any(type(m) in (nn.Linear, ILoRALinear) for m in llm.model.layers.modules())
    with torch.no_grad():  # Llama.forward runs unchanged: prefill, then one decode step
        logits, _ = llm(torch.randn(1, 4, TINY_LLM.hidden_size), torch.arange(4))
        logits, _ = llm(llm.embed(logits[:, -1].argmax(-1))[:, None], torch.tensor([4]), kv_len=5)
    assert logits.shape == (1, 1, TINY_LLM.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(OptionError, match="already quantized"):
        quantize_llm_(llm, "int8")
    # 4 of 32 bits plus fp32 scales and offsets per 64 weights (+ the fp32 LoRA, norms, lm_head if kept).
    assert weight_bytes(llm) < (0.2 if lm_head else 0.45) * fp32_bytes


def test_weight_bytes_counts_quantized_storage_scales_and_one_embedding_row():
    layer = WeightOnlyLinear.from_weight(torch.randn(8, 100), "int4", 32)
    # 8 rows x 128 padded codes / 2 per byte, plus fp32 scales and offsets for 4 groups per row.
    assert weight_bytes(layer) == 8 * 64 + 2 * 8 * 4 * 4
    assert weight_bytes(WeightOnlyLinear.from_weight(torch.randn(8, 100).half(), "int8")) == 8 * 100 + 8 * 2
    ilora = ilora_layer(16, 24, 4, 3)
    assert weight_bytes(QuantizedILoRALinear.from_ilora(ilora, "int8")) == 24 * 16 + 24 * 4 + 4 * (
        4 * 16 + 24 * 12 + 3 * 16)
    llm = tiny_llm()  # the KV cache and RoPE tables are not weights; the embedding counts one row
    expected = sum(p.nbytes for p in llm.parameters()) - llm.model.embed_tokens.weight[1:].nbytes
    assert weight_bytes(llm) == expected
