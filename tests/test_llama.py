"""The reference LLM: parity with Hugging Face's Llama, the exact I-LoRA, checkpoint keys, the lossy merge."""

import dataclasses

import pytest
import torch

from conftest import crab_llm
from edgeav.config import LLMConfig, LoRAConfig
from edgeav.systems.crab.config import preset
from edgeav.models.ilora import ILoRALinear
from edgeav.models.llama import Llama

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def small_llm(num_kv_heads: int) -> LLMConfig:
    # rope_theta and rms_norm_eps off their defaults so a hard-coded value cannot pass.
    return dataclasses.replace(preset("crab-tiny").llm, base_vocab_size=283, hidden_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=num_kv_heads, intermediate_size=176,
                               rms_norm_eps=1e-6, rope_theta=5000.0, max_seq_len=64)


def hf_llama(cfg: LLMConfig):
    transformers = pytest.importorskip("transformers")  # only the parity tests need it
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    # Projections of O(1) gain (HF's std 0.02 init leaves attention near uniform and hides RoPE or mask
    # errors); small embeddings so that rms_norm_eps visibly matters in the first norm.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.normal_(std=0.01)
            else:
                param.normal_(std=param.shape[1] ** -0.5)
    return model


def randomize_lora(model: torch.nn.Module) -> None:
    # Unit-scale A x, router logits of about one unit, and a LoRA term comparable to the base output.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(std=param.shape[1] ** -0.5)


def plain_ilora(x, weight, lora_a, lora_bs, lora_route, scale):
    """CRAB_SPEC: y = W x + sum_i softmax(R x)_i * B_i(A x) * scale, one head at a time, softmax in fp32."""
    route = torch.softmax((x @ lora_route.T).float(), dim=-1).to(x.dtype)
    y = x @ weight.T
    for i, lora_b in enumerate(lora_bs):
        y = y + route[..., i : i + 1] * ((x @ lora_a.T) @ lora_b.T) * scale
    return y


def random_ilora(in_features=48, out_features=40, rank=4, heads=3, scale=2.0):
    layer = ILoRALinear(in_features, out_features, rank, heads, scale)
    with torch.no_grad():
        layer.weight.normal_(std=in_features**-0.5)
        layer.lora_A.normal_(std=0.5)
        layer.lora_route.normal_(std=0.5)  # router logits of a few units: neither uniform nor one-hot
    lora_bs = [torch.randn(out_features, rank) * 0.5 for _ in range(heads)]
    layer.lora_B.data.copy_(torch.cat(lora_bs, dim=1))
    return layer, lora_bs


def peft_state_dict(layer: ILoRALinear, lora_bs) -> dict:
    """The released checkpoints' spelling of one layer."""
    state = {"weight": layer.weight.detach().clone(), "lora_A.weight": layer.lora_A.detach().clone(),
             "lora_route.weight": layer.lora_route.detach().clone()}
    state.update({f"lora_B{i}.weight": lora_b.clone() for i, lora_b in enumerate(lora_bs)})
    return state


# 1. Parity with transformers' LlamaForCausalLM -------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_matches_hf_llama_prefill_decode_and_last_hidden(num_kv_heads):
    torch.manual_seed(0)
    cfg = small_llm(num_kv_heads)
    hf = hf_llama(cfg)
    ours = Llama.from_config(cfg, LoRAConfig(rank=4, alpha=8.0)).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=False)
    lora_keys = {name for name in ours.state_dict() if "lora_" in name}
    assert set(result.missing_keys) == lora_keys and len(lora_keys) == 3 * 7 * cfg.num_layers
    assert result.unexpected_keys == []
    assert not any(ours.state_dict()[key].any() for key in lora_keys if key.endswith("lora_B"))

    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    captured = {}
    hf.model.layers[-1].register_forward_hook(lambda mod, args, out: captured.update(pre_norm=out))
    with torch.no_grad():
        hf_out = hf(input_ids=tokens, output_hidden_states=True)
        # HF's hidden_states[-1] is the final-norm output, not the last layer's raw output.
        hf_last = hf_out.hidden_states[-1]
        assert len(hf_out.hidden_states) == cfg.num_layers + 1
        torch.testing.assert_close(hf_last, hf.model.norm(captured["pre_norm"]), rtol=0, atol=1e-6)
        assert (hf_last - captured["pre_norm"]).abs().max() > 0.1

        # (a) one prefill of 17 tokens
        ours.setup_caches(max_batch_size=3, max_seq_len=cfg.max_seq_len)  # batch 2 of 3 rows
        logits, last_hidden = ours(ours.embed(tokens), torch.arange(17))
        assert (logits - hf_out.logits).abs().max() <= 1e-4
        assert (last_hidden - hf_last).abs().max() <= 1e-4

        # (b) prefill 10, then 7 decode steps; the cache still holds run (a), whose entries past the
        # current position the mask must hide
        logits, last_hidden = ours(ours.embed(tokens[:, :10]), torch.arange(10))
        steps = [ours(ours.embed(tokens[:, pos : pos + 1]), torch.tensor([pos])) for pos in range(10, 17)]
        logits = torch.cat([logits] + [step[0] for step in steps], dim=1)
        last_hidden = torch.cat([last_hidden] + [step[1] for step in steps], dim=1)
    assert (logits - hf_out.logits).abs().max() <= 1e-4
    assert (last_hidden - hf_last).abs().max() <= 1e-4
    assert hf_out.logits.std() > 0.3  # the tolerance is small against the signal


def test_lora_on_every_target_projection_matches_hf_with_plain_lora_hooks():
    """The whole decoder with non-zero I-LoRA equals HF's Llama with the plain formula added on the 7 targets."""
    torch.manual_seed(1)
    cfg = small_llm(num_kv_heads=2)
    lora = LoRAConfig(rank=4, alpha=8.0)
    hf = hf_llama(cfg)
    ours = Llama.from_config(cfg, lora).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    randomize_lora(ours)
    for name, module in ours.named_modules():
        if isinstance(module, ILoRALinear):
            lora_bs = module.lora_B.detach().chunk(lora.heads, dim=1)

            def add_lora(mod, args, out, m=module, bs=lora_bs):
                x = args[0]
                return plain_ilora(x, mod.weight, m.lora_A.detach(), bs, m.lora_route.detach(), lora.scale)

            hf.get_submodule(name).register_forward_hook(add_lora)
    assert {name.rsplit(".", 1)[-1] for name, m in ours.named_modules() if isinstance(m, ILoRALinear)} == set(
        LORA_TARGETS)
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens).logits
        ours.setup_caches(1, 32)
        logits, _ = ours(ours.embed(tokens[:, :8]), torch.arange(8))
        steps = [ours(ours.embed(tokens[:, p : p + 1]), torch.tensor([p]))[0] for p in range(8, 12)]
    logits = torch.cat([logits] + steps, dim=1)
    assert (logits - hf_logits).abs().max() <= 1e-4
    # The LoRA moves the logits by far more than the tolerance, so the check above sees it.
    hf_no_lora = hf_llama(cfg)
    hf_no_lora.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert (hf_no_lora(input_ids=tokens).logits - hf_logits).abs().max() > 0.1


# 2. ILoRALinear: exact formula and checkpoint keys --------------------------------------------------


def test_ilora_linear_equals_plain_per_head_formula():
    torch.manual_seed(2)
    layer, lora_bs = random_ilora()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        expected = plain_ilora(x, layer.weight, layer.lora_A, lora_bs, layer.lora_route, 2.0)
        got = layer(x)
        base = x @ layer.weight.T
    assert (got - expected).abs().max() <= 1e-5
    assert (expected - base).abs().max() > 1.0  # the LoRA term is really there


def test_peft_style_state_dict_loads_into_fused_layer_and_model():
    torch.manual_seed(3)
    layer, lora_bs = random_ilora()
    x = torch.randn(3, 48)
    with torch.no_grad():
        expected = plain_ilora(x, layer.weight, layer.lora_A, lora_bs, layer.lora_route, 2.0)
    fresh = ILoRALinear(48, 40, 4, 3, 2.0)
    fresh.load_state_dict(peft_state_dict(layer, lora_bs), strict=True)
    with torch.no_grad():
        assert (fresh(x) - expected).abs().max() <= 1e-5
    # Our own fused state dict loads untouched.
    again = ILoRALinear(48, 40, 4, 3, 2.0)
    again.load_state_dict(fresh.state_dict(), strict=True)
    assert torch.equal(again.lora_B, layer.lora_B)

    # The same through a whole model: prefixes are handled at every depth.
    cfg = small_llm(num_kv_heads=2)
    source = Llama.from_config(cfg, LoRAConfig(rank=4, alpha=8.0))
    randomize_lora(source)
    peft = {}
    for key, value in source.state_dict().items():
        stem, _, name = key.rpartition(".")
        if name == "lora_B":
            peft.update({f"{stem}.lora_B{i}.weight": b for i, b in enumerate(value.chunk(3, dim=1))})
        elif name in ("lora_A", "lora_route"):
            peft[f"{stem}.{name}.weight"] = value
        else:
            peft[key] = value
    assert "model.layers.1.mlp.down_proj.lora_B2.weight" in peft
    target = Llama.from_config(cfg, LoRAConfig(rank=4, alpha=8.0))
    target.load_state_dict(peft, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_wrong_shaped_lora_b_is_refused_naming_the_key():
    torch.manual_seed(4)
    layer, lora_bs = random_ilora()
    state = peft_state_dict(layer, lora_bs)
    state["lora_B1.weight"] = torch.randn(40, 5)
    with pytest.raises(RuntimeError, match=r"lora_B1\.weight.*\(40, 5\).*\(40, 4\)"):
        ILoRALinear(48, 40, 4, 3, 2.0).load_state_dict(state)
    del state["lora_B1.weight"]
    with pytest.raises(RuntimeError, match=r"lora_B1\.weight"):
        ILoRALinear(48, 40, 4, 3, 2.0).load_state_dict(state)


# 3. The static merge: exact for a one-hot router, lossy for a real one --------------------------------


def test_merged_weight_one_hot_equals_forced_router_and_is_lossy_otherwise():
    torch.manual_seed(5)
    layer, _ = random_ilora()
    x = torch.randn(6, 48)
    x[:, 0] = 1.0  # a constant feature lets the router force one head for every token
    for head in range(3):
        forced = torch.zeros(3, 48)
        forced[head, 0] = 1e4
        with torch.no_grad():
            layer.lora_route.copy_(forced)
            exact = layer(x)
            merged = x @ layer.merged_weight(torch.nn.functional.one_hot(torch.tensor(head), 3).float()).T
        assert (exact - merged).abs().max() <= 1e-5

    with torch.no_grad():
        layer.lora_route.normal_(std=0.5)
        route = torch.softmax(x @ layer.lora_route.T, dim=-1)
        exact = layer(x)
        # The merge is exact for the one token whose mix it uses ...
        merged_for_token = x[2] @ layer.merged_weight(route[2]).T
        assert (exact[2] - merged_for_token).abs().max() <= 1e-5
        # ... and off for the others, even with the best single mix (the mean route).
        merged = x @ layer.merged_weight(route.mean(0)).T
    assert route.std(0).max() > 0.1  # the router really is token dependent here
    assert (exact - merged).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"mix has shape \(2,\); expected \(3,\)"):
        layer.merged_weight(torch.ones(2))


# 4. Crab-7B shapes ------------------------------------------------------------------------------------


def test_ilora_linear_at_7b_shape_equals_plain_formula():
    torch.manual_seed(6)
    lora = preset("crab-7b").lora
    layer = ILoRALinear(4096, 4096, lora.rank, lora.heads, lora.scale)
    with torch.no_grad():
        layer.weight.normal_(std=4096**-0.5)
        layer.lora_A.normal_(std=4096**-0.5)
        layer.lora_route.normal_(std=2 * 4096**-0.5)
        layer.lora_B.normal_(std=0.5)
    lora_bs = layer.lora_B.detach().chunk(lora.heads, dim=1)
    x = torch.randn(1, 3, 4096)
    with torch.no_grad():
        expected = plain_ilora(x, layer.weight, layer.lora_A, lora_bs, layer.lora_route, lora.scale)
        got = layer(x)
    assert lora.scale == 2.0
    assert (got - expected).abs().max() <= 1e-3
    assert (expected - x @ layer.weight.T).abs().max() > 0.1


def test_crab_7b_parameter_counts_match_the_release():
    """CRAB_SPEC section 5: 6.74 B base parameters (vocab 32017) and 1.41 M I-LoRA parameters a layer."""
    with torch.device("meta"):
        model = crab_llm("crab-7b")
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    base = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    assert lora == 32 * 1_411_328
    assert base == 6_738_415_616 + 17 * 4096 * 2  # Llama-2-7b plus 17 new embedding and lm_head rows
    assert not isinstance(model.lm_head, ILoRALinear)


def test_forward_without_caches_and_oversized_cache_are_refused():
    model = Llama.from_config(small_llm(num_kv_heads=2), LoRAConfig(rank=4, alpha=8.0))
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(torch.zeros(1, 2, 64), torch.arange(2))
    with pytest.raises(Exception, match=r"max_seq_len 65 is outside 1\.\.64"):
        model.setup_caches(1, 65)
