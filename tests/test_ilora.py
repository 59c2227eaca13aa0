"""I-LoRA with the base layer's bias (Crab+): the exact routed formula against the authors' per-head
sequential form, wrapping a built model by projection name, and the released PEFT keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeav.models.ilora import ILoRALinear, wrap_ilora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sequential_ilora(x, weight, bias, lora_a, lora_bs, lora_route, scale):
    """The authors' layer (peft_hyper's Linear.forward): ``y = W x + b``, then one head at a time
    ``y = y + w_i * B_i(A x) * scale`` with ``w = softmax(route(x))`` in fp32, cast to the compute dtype."""
    route = torch.softmax(F.linear(x, lora_route), dim=-1, dtype=torch.float32).to(x.dtype)
    low_rank = F.linear(x, lora_a)
    y = F.linear(x, weight, bias)
    for i, lora_b in enumerate(lora_bs):
        y = y + route[..., i].unsqueeze(-1) * F.linear(low_rank, lora_b) * scale
    return y


def random_biased_ilora(in_features=48, out_features=40, rank=4, heads=3, scale=2.0) -> ILoRALinear:
    layer = ILoRALinear(in_features, out_features, rank, heads, scale, bias=True)
    with torch.no_grad():
        layer.weight.normal_(std=in_features**-0.5)
        layer.bias.normal_(std=0.5)
        layer.lora_A.normal_(std=in_features**-0.5)
        layer.lora_route.normal_(std=2 * in_features**-0.5)  # router logits of a few units
        layer.lora_B.normal_(std=0.5 * rank**-0.5)
    return layer


def reference(layer: ILoRALinear, x):
    return sequential_ilora(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B.split(layer.rank, dim=1),
                            layer.lora_route, layer.scale)


def test_biased_layer_equals_the_sequential_form_in_fp32():
    torch.manual_seed(0)
    layer = random_biased_ilora()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = reference(layer, x)
        got = layer(x)
        without_lora = F.linear(x, layer.weight, layer.bias)
    assert (got - expected).abs().max() <= 1e-5
    assert (expected - without_lora).abs().max() > 1.0  # the LoRA term is really there ...
    assert (without_lora - F.linear(x, layer.weight)).abs().max() > 0.5  # ... and so is the bias


def test_biased_layer_in_bf16_is_as_close_to_fp32_as_the_sequential_form():
    """The fused form rounds differently from the authors' three sequential bf16 adds; it stays within two
    bf16 steps of them and no further from the fp32 result."""
    torch.manual_seed(1)
    layer = random_biased_ilora(256, 192, rank=16)
    x = torch.randn(4, 7, 256)
    with torch.no_grad():
        exact = reference(layer, x)
        layer = layer.to(torch.bfloat16)
        got = layer(x.bfloat16()).float()
        expected = reference(layer, x.bfloat16()).float()
    bf16_step = 2**-7 * exact.abs().max()
    assert (got - expected).abs().max() <= 2 * bf16_step
    assert (got - exact).abs().mean() <= 1.25 * (expected - exact).abs().mean()


def test_fused_term_added_onto_the_biased_base_output_is_the_layer():
    """The GPU path adds the kernel's routed term onto ``F.linear(x, W, b)``; its pure-torch twin shows
    the composition on any machine."""
    from edgeav.kernels import ilora_delta

    torch.manual_seed(6)
    layer = random_biased_ilora()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        fused = ilora_delta(x, layer.lora_A, layer.lora_B, layer.lora_route, layer.scale,
                            out=F.linear(x, layer.weight, layer.bias), backend="torch")
        assert torch.equal(fused, layer(x))


def test_bias_free_layer_keeps_crabs_state_dict():
    layer = ILoRALinear(48, 40, 4, 3, 2.0)
    assert layer.bias is None
    assert set(layer.state_dict()) == {"weight", "lora_A", "lora_B", "lora_route"}


def test_peft_keys_with_bias_load_and_round_trip():
    torch.manual_seed(2)
    source = random_biased_ilora()
    released = {"weight": source.weight.detach().clone(), "bias": source.bias.detach().clone(),
                **{key: value.clone() for key, value in source.peft_state_dict().items()}}
    assert set(released) == {"weight", "bias", "lora_A.weight", "lora_B0.weight", "lora_B1.weight",
                             "lora_B2.weight", "lora_route.weight"}
    target = ILoRALinear(48, 40, 4, 3, 2.0, bias=True)
    target.load_state_dict(released, strict=True)
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert (target(x) - reference(source, x)).abs().max() <= 1e-5
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_wrap_ilora_on_the_qwen_thinker_matches_peft_and_keeps_the_base():
    """Crab+'s suffixes over the whole (tiny) Qwen2.5-Omni thinker: the LLM's 7 projections, the audio
    tower's q/k/v and the ViT's MLP, the layers PEFT's ``key.endswith(target)`` picks; with B zero every
    wrapped layer computes exactly what it did."""
    from test_qwen_llm import tiny_thinker

    torch.manual_seed(3)
    thinker = tiny_thinker(vocab_size=64)  # the vocabulary plays no part here
    linears = {name: module for name, module in thinker.named_modules() if isinstance(module, nn.Linear)}
    peft_picks = {name for name in linears if any(name.endswith(target) for target in TARGETS)}
    base_keys = set(thinker.state_dict())
    inputs = {name: torch.randn(3, module.in_features) for name, module in linears.items() if name in peft_picks}
    with torch.no_grad():
        before = {name: linears[name](x) for name, x in inputs.items()}
        count = wrap_ilora(thinker, TARGETS, rank=4, heads=3, scale=2.0)
    wrapped = {name: module for name, module in thinker.named_modules() if isinstance(module, ILoRALinear)}
    assert count == len(wrapped) == 2 * 7 + 2 * 3 + 2 * 3
    assert set(wrapped) == peft_picks
    assert {name.split(".")[1] for name in wrapped} == {"language_model", "audio_tower", "visual"}
    for name, layer in wrapped.items():
        assert layer.weight is linears[name].weight and layer.bias is linears[name].bias, name
        with torch.no_grad():
            assert torch.equal(layer(inputs[name]), before[name]), name
    assert wrapped["model.audio_tower.layers.0.self_attn.k_proj"].bias is None  # Whisper's k_proj has none
    assert wrapped["model.language_model.layers.0.self_attn.q_proj"].bias is not None
    lora_keys = set(thinker.state_dict()) - base_keys
    assert base_keys <= set(thinker.state_dict()) and len(lora_keys) == 3 * count
    assert all(key.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lora_route") for key in lora_keys)
    # Wrapping again finds nothing left to wrap; a prefix keeps to one tower.
    assert wrap_ilora(thinker, TARGETS, rank=4, heads=3, scale=2.0) == 0
    fresh = tiny_thinker(vocab_size=64)
    assert wrap_ilora(fresh, TARGETS, rank=4, heads=3, scale=2.0, prefix_filter="model.audio_tower.") == 6


def test_wrapped_layer_follows_the_base_dtype_and_loads_released_keys():
    torch.manual_seed(4)
    parent = nn.Module()
    parent.q_proj = nn.Linear(48, 40, bias=True).to(torch.bfloat16)
    parent.proj = nn.Linear(48, 40)
    assert wrap_ilora(parent, TARGETS, rank=4, heads=3, scale=2.0) == 1
    assert isinstance(parent.proj, nn.Linear)
    layer = parent.q_proj
    assert {p.dtype for p in layer.parameters()} == {torch.bfloat16}
    assert not layer.lora_B.any()
    source = random_biased_ilora()
    state = {f"q_proj.{key}": value for key, value in source.peft_state_dict().items()}
    state.update({"q_proj.weight": source.weight.detach(), "q_proj.bias": source.bias.detach(),
                  "proj.weight": parent.proj.weight.detach(), "proj.bias": parent.proj.bias.detach()})
    parent.float().load_state_dict(state, strict=True)
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert (parent.q_proj(x) - reference(source, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("bias", [False, True])
def test_merged_weight_leaves_the_bias_separate(bias):
    torch.manual_seed(5)
    layer = random_biased_ilora()
    if not bias:
        layer.bias = None
    x = torch.randn(6, 48)
    x[:, 0] = 1.0  # a constant feature lets the router force head 1 for every token
    with torch.no_grad():
        layer.lora_route.zero_()
        layer.lora_route[1, 0] = 1e4
        merged = F.linear(x, layer.merged_weight(torch.tensor([0.0, 1.0, 0.0])), layer.bias)
        assert (layer(x) - merged).abs().max() <= 1e-5
