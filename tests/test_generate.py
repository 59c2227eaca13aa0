"""Generation: greedy and sampled decoding over the real KV-cached LLaMA, the mask rule, and loops stopped."""

import pytest
import torch

from edgeav.systems.crab.checkpoints import synthesize
from edgeav.errors import OptionError
from edgeav.decoding import repetition
from edgeav.generate import generate, next_token
from edgeav.sampling import SAMPLING_PRESETS, Sampling

from conftest import crab_llm, rig_llm_to_say

MASKS = [f"<mask_{i}>" for i in range(6)]


@pytest.fixture()
def tiny():
    loaded = synthesize("crab-tiny", seed=5)
    loaded.model.llm.setup_caches(1, 256)
    return loaded


def prompt_embeds(loaded, text="x"):
    ids = torch.tensor([loaded.tokenizer.encode_chat(text)])
    return loaded.model.llm.embed(ids)


def test_greedy_decode_with_cache_matches_full_recompute(tiny):
    llm = tiny.model.llm
    embeds = prompt_embeds(tiny)
    out = generate(llm, embeds, max_new_tokens=12, eos_id=-1)
    assert len(out.token_ids) == 12 and out.stopped_by == "max_new_tokens"
    # Re-run the whole sequence without the decode loop: every greedy choice must agree.
    ids = torch.tensor([tiny.tokenizer.encode_chat("x") + out.token_ids[:-1]])
    with torch.no_grad():
        logits, _ = llm(llm.embed(ids), torch.arange(ids.shape[1]))
    expected = logits[0, embeds.shape[1] - 1 :].argmax(-1).tolist()
    assert out.token_ids == expected


def test_stops_at_eos_and_captures_mask_states_of_the_producing_steps(tiny):
    said = ["<mask_start>", *MASKS, "<mask_end>"]
    rig_llm_to_say(tiny, said)
    llm, tok = tiny.model.llm, tiny.tokenizer
    out = generate(llm, prompt_embeds(tiny), max_new_tokens=50, eos_id=tok.eos_id,
                   mask_token_ids=tuple(tok.token_id(m) for m in MASKS))
    assert out.stopped_by == "eos"
    assert tok.decode(out.token_ids) == "".join(said)
    # The state that produced <mask_i> is the one of the token before it.
    before = ["<mask_start>", *MASKS[:5]]
    with torch.no_grad():
        ids = torch.tensor([[tok.token_id(t) for t in before]])
        expected = llm.model.norm(llm.embed(ids))[0]
    assert torch.allclose(out.mask_hidden, expected, atol=1e-5)


def test_fewer_than_six_mask_tokens_give_no_mask_states(tiny):
    rig_llm_to_say(tiny, ["<mask_start>", *MASKS[:4], "<mask_end>"])
    tok = tiny.tokenizer
    out = generate(tiny.model.llm, prompt_embeds(tiny), max_new_tokens=50, eos_id=tok.eos_id,
                   mask_token_ids=tuple(tok.token_id(m) for m in MASKS))
    assert out.mask_hidden is None and len(out.token_ids) == 6


def test_sampling_is_seeded_and_differs_from_greedy(tiny):
    llm, embeds = tiny.model.llm, prompt_embeds(tiny)
    hot = Sampling(temperature=5.0, seed=7)
    first = generate(llm, embeds, max_new_tokens=10, eos_id=-1, sampling=hot).token_ids
    again = generate(llm, embeds, max_new_tokens=10, eos_id=-1, sampling=hot).token_ids
    other = generate(llm, embeds, max_new_tokens=10, eos_id=-1, sampling=Sampling(temperature=5.0, seed=8)).token_ids
    greedy = generate(llm, embeds, max_new_tokens=10, eos_id=-1).token_ids
    assert first == again
    assert first != other and first != greedy


def test_top_p_and_top_k_keep_only_the_head_of_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    top_p = Sampling(temperature=1.0, top_p=0.7)
    drawn = {int(next_token(logits, top_p, generator)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    top_k = Sampling(temperature=1.0, top_k=1)
    assert {int(next_token(logits, top_k, generator)) for _ in range(50)} == {0}
    assert SAMPLING_PRESETS["crab"] == Sampling(temperature=0.6, top_p=0.9, top_k=50, seed=42)


def test_bad_sampling_options_and_overlong_prompts_are_refused(tiny):
    with pytest.raises(OptionError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(OptionError, match="temperature"):
        Sampling(temperature=-1.0)
    tiny.model.llm.setup_caches(1, 8)
    with pytest.raises(OptionError, match="KV cache holds 8"):
        generate(tiny.model.llm, prompt_embeds(tiny), max_new_tokens=4, eos_id=2)


def test_forced_generation_scores_every_step_of_a_free_run():
    """Teacher forcing on a free run's answer gives the same distributions, the EOS step included."""
    from edgeav.models.llama import Llama

    torch.manual_seed(0)
    llm = crab_llm("crab-tiny").eval()
    llm.setup_caches(1, 64)
    prompt = torch.randn(1, 6, llm.cfg.hidden_size)
    free_logits, forced_logits = [], []
    free = generate(llm, prompt, max_new_tokens=8, eos_id=-1, logits_out=free_logits)
    forced = generate(llm, prompt, max_new_tokens=8, eos_id=-1, forced=free.token_ids, logits_out=forced_logits)
    assert forced.token_ids == free.token_ids and len(free.token_ids) == 8
    assert len(forced_logits) == len(free.token_ids) + 1 == len(free_logits) + 1
    for a, b in zip(free_logits, forced_logits):
        assert torch.allclose(a, b, atol=1e-5)
    other = [(t + 1) % llm.cfg.vocab_size for t in free.token_ids]
    changed = []
    generate(llm, prompt, max_new_tokens=8, eos_id=-1, forced=other, logits_out=changed)
    assert not torch.allclose(changed[2], forced_logits[2])


# -- loops: a real model made to repeat itself ------------------------------------------------------


def rig_llm_to_cycle(loaded, cycle: list[int]) -> None:
    """Make the LLM answer any chat prompt with ``cycle`` over and over, greedily, through its real forward.

    As conftest's ``rig_llm_to_say``: with attention and MLP outputs zeroed the last hidden state is the
    normed embedding of the current token; the LM-head row of each token is aimed at the embedding of
    the token before it, the cycle's first token at both the prompt's last token and the cycle's last.
    """
    llm = loaded.model.llm
    last_prompt_token = loaded.tokenizer.encode_chat("x")[-1]
    assert last_prompt_token not in cycle and len(set(cycle)) == len(cycle)
    with torch.no_grad():
        for layer in llm.model.layers:
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                module.weight.zero_()
                module.lora_B.zero_()
        embed, head = llm.model.embed_tokens.weight, llm.lm_head.weight
        unit = lambda token: embed[token] / embed[token].norm()  # noqa: E731
        head.zero_()
        for current, following in zip(cycle, cycle[1:]):
            head[following] = 10 * unit(current)
        head[cycle[0]] = 10 * (unit(cycle[-1]) + unit(last_prompt_token))


def test_repetition_finds_the_ngram_a_text_ends_in():
    assert repetition([7] * 32) == [7]
    assert repetition([7] * 31) is None  # fewer tokens than a loop needs
    assert repetition([1, 2, 3] + [4, 5] * 16) == [4, 5]
    assert repetition(list(range(8)) * 4) == list(range(8))  # 8 tokens, 4 times: 32
    assert repetition(list(range(9)) * 10) is None  # a 9-gram is longer than a loop may be
    assert repetition([4, 5] * 16 + [6]) is None  # the end is not the loop
    assert repetition([1, 2] * 8, min_tokens=16) == [1, 2] and repetition([1, 2] * 8) is None


@pytest.mark.parametrize("fast", [False, True], ids=["reference loop", "chunked fast path"])
def test_a_looping_model_is_stopped_with_the_loop_kept(tiny, fast):
    from edgeav.fastpath import FastGenerator

    cycle = [300, 301, 302]
    rig_llm_to_cycle(tiny, cycle)
    llm, embeds = tiny.model.llm, prompt_embeds(tiny)
    endless = generate(llm, embeds, max_new_tokens=60, eos_id=tiny.tokenizer.eos_id, stop_repeats=False)
    assert endless.token_ids == (cycle * 20) and endless.stopped_by == "max_new_tokens"  # the rig loops for real
    if fast:  # the CUDA decode loop, run eagerly on the CPU over the whole cache as its graph does
        out = FastGenerator(llm, chunk=16, cuda_graph=False, full_cache=True).generate(
            embeds, max_new_tokens=60, eos_id=tiny.tokenizer.eos_id)
    else:
        out = generate(llm, embeds, max_new_tokens=60, eos_id=tiny.tokenizer.eos_id)
    # Stopped at the first token where the answer ends in the 3-gram over 32 or more tokens: 11 copies.
    assert out.stopped_by == "repetition" and out.repeated == cycle
    assert out.token_ids == cycle * 11


def test_a_long_cycle_is_not_a_loop(tiny):
    cycle = list(range(300, 309))  # 9 tokens: longer than a loop's n-gram
    rig_llm_to_cycle(tiny, cycle)
    out = generate(tiny.model.llm, prompt_embeds(tiny), max_new_tokens=50, eos_id=tiny.tokenizer.eos_id)
    assert out.stopped_by == "max_new_tokens" and out.repeated is None and len(out.token_ids) == 50
    assert out.token_ids[:18] == cycle * 2


def test_teacher_forcing_feeds_a_loop_whole(tiny):
    forced = [300, 301] * 20
    logits = []
    out = generate(tiny.model.llm, prompt_embeds(tiny), max_new_tokens=60, eos_id=tiny.tokenizer.eos_id,
                   forced=forced, logits_out=logits)
    assert out.token_ids == forced and out.stopped_by == "max_new_tokens" and len(logits) == len(forced) + 1
