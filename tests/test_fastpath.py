"""The chunked, host-sync-free decode loop: the same answers and mask states as generate(), one host read per chunk."""

import copy
import dataclasses
import gc
import math
import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

from edgeav.systems.crab.checkpoints import load_converted, synthesize
from edgeav.systems.crab.config import preset
from edgeav.errors import OptionError
from edgeav.fastpath import FastGenerator, fast_generator, generate_fast
from edgeav.generate import generate
from edgeav.models.llama import Llama
from edgeav.runtime import DEMO_DIR
from edgeav.sampling import SAMPLING_PRESETS, Sampling

from conftest import crab_llm, rig_llm_to_say

MASKS = [f"<mask_{i}>" for i in range(6)]
# Everything that copies a tensor's values to the host (and so waits for a GPU).
HOST_READS = {"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph path needs a CUDA device")


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += getattr(func, "__name__", "") in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.fixture()
def tiny():
    loaded = synthesize("crab-tiny", seed=5)
    loaded.model.llm.setup_caches(1, 256)
    return loaded


@pytest.fixture(scope="module")
def demo():
    return load_converted(DEMO_DIR)


def prompt_embeds(loaded, text="x"):
    ids = torch.tensor([loaded.tokenizer.encode_chat(text)])
    return loaded.model.llm.embed(ids)


def mask_ids(tok):
    return tuple(tok.token_id(m) for m in MASKS)


def assert_same_generation(fast, ref):
    assert fast.token_ids == ref.token_ids
    assert fast.stopped_by == ref.stopped_by
    if ref.mask_hidden is None:
        assert fast.mask_hidden is None
    else:
        assert fast.mask_hidden is not None and torch.allclose(fast.mask_hidden, ref.mask_hidden, atol=1e-5)


@pytest.mark.parametrize("full_cache", [False, True], ids=["kv_len", "graph_step"])
@pytest.mark.parametrize("answer_len", [0, 3, 4, 8, 11], ids=lambda n: f"eos_at_{n}")
def test_rigged_answer_stops_at_the_first_eos_wherever_it_falls_in_a_chunk(tiny, answer_len, full_cache):
    """EOS as the first token, mid-chunk, on a chunk boundary (chunk 4): same answer, read back once per chunk."""
    said = ["<mask_start>", *MASKS, "<mask_end>", 100, 101, 102][:answer_len]  # distinct: the rig maps each to the next
    rig_llm_to_say(tiny, said)
    llm, tok = tiny.model.llm, tiny.tokenizer
    embeds = prompt_embeds(tiny)
    options = dict(max_new_tokens=50, eos_id=tok.eos_id, mask_token_ids=mask_ids(tok))
    ref = generate(llm, embeds, **options)
    fast_gen = FastGenerator(llm, chunk=4, full_cache=full_cache)
    with CountHostReads() as counter:
        fast = fast_gen.generate(embeds, **options)
    assert_same_generation(fast, ref)
    assert fast.stopped_by == "eos" and len(fast.token_ids) == answer_len
    assert (fast.mask_hidden is not None) == (answer_len >= 7)
    # The chunks up to and including the one holding EOS, each read once.
    assert counter.reads == fast_gen.host_reads == math.ceil((answer_len + 1) / 4)


@pytest.mark.parametrize("max_new_tokens", [0, 1, 4, 10])
def test_max_new_tokens_not_a_multiple_of_the_chunk_stops_exactly_there(tiny, max_new_tokens):
    llm, embeds = tiny.model.llm, prompt_embeds(tiny)
    ref = generate(llm, embeds, max_new_tokens=max_new_tokens, eos_id=-1)
    steps = []
    hook = llm.register_forward_hook(lambda *_: steps.append(1))
    fast_gen = FastGenerator(llm, chunk=4)
    with CountHostReads() as counter:
        fast = fast_gen.generate(embeds, max_new_tokens=max_new_tokens, eos_id=-1)
    hook.remove()
    assert fast.token_ids == ref.token_ids and len(fast.token_ids) == max_new_tokens
    assert fast.stopped_by == ref.stopped_by == "max_new_tokens"
    assert counter.reads == math.ceil(max_new_tokens / 4)
    assert len(steps) == max(1, max_new_tokens)  # the prefill, then no step past the last token


def test_answer_that_fills_the_cache_stops_at_its_end(tiny):
    llm, embeds = tiny.model.llm, prompt_embeds(tiny)
    llm.setup_caches(1, embeds.shape[1] + 7)
    ref = generate(llm, embeds, max_new_tokens=50, eos_id=-1)
    fast = FastGenerator(llm, chunk=4, full_cache=True).generate(embeds, max_new_tokens=50, eos_id=-1)
    assert fast.token_ids == ref.token_ids and len(fast.token_ids) == 7


@pytest.mark.parametrize("full_cache", [False, True], ids=["kv_len", "graph_step"])
@pytest.mark.parametrize("sampling", [Sampling(temperature=5.0, seed=7), SAMPLING_PRESETS["crab"]],
                         ids=["hot", "crab"])
def test_seeded_sampling_gives_the_reference_tokens_and_stops_at_a_mid_chunk_eos(tiny, sampling, full_cache):
    llm, embeds = tiny.model.llm, prompt_embeds(tiny)
    free = generate(llm, embeds, max_new_tokens=24, eos_id=-1, sampling=sampling)
    fast = FastGenerator(llm, chunk=8, full_cache=full_cache).generate(embeds, max_new_tokens=24, eos_id=-1,
                                                                        sampling=sampling)
    assert fast.token_ids == free.token_ids and len(set(free.token_ids)) > 3  # sampled, not stuck on one token
    # Stop at a token whose first appearance is mid-chunk: the steps launched after it must not leak out.
    first_seen = {}
    for i, token in enumerate(free.token_ids):
        first_seen.setdefault(token, i)
    eos_id, at = next((t, i) for t, i in first_seen.items() if i % 8 not in (0, 7) and i > 8)
    ref = generate(llm, embeds, max_new_tokens=24, eos_id=eos_id, sampling=sampling)
    fast = FastGenerator(llm, chunk=8, full_cache=full_cache).generate(embeds, max_new_tokens=24, eos_id=eos_id,
                                                                        sampling=sampling)
    assert fast.token_ids == ref.token_ids == free.token_ids[:at] and fast.stopped_by == "eos"


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp32", "bf16"])  # bf16 matmuls are slow on CPUs without bf16 units
def test_demo_model_answers_and_mask_states_match_generate(demo, dtype):
    """A trained model writing its six <mask_i> tokens unprompted, in fp32 and bf16, through the graph's step."""
    llm = copy.deepcopy(demo.model.llm).to(dtype)
    llm.setup_caches(1, 160)
    tok = demo.tokenizer
    embeds = llm.embed(torch.tensor([tok.encode_chat("Where is the dog in the video?")]))
    options = dict(max_new_tokens=60, eos_id=tok.eos_id, mask_token_ids=mask_ids(tok))
    ref = generate(llm, embeds, **options)
    assert ref.mask_hidden is not None and ref.stopped_by == "eos"
    # fp32 checks both steps; bf16 (slow on CPUs) only the one the CUDA graph holds.
    for full_cache in (False, True) if dtype == torch.float32 else (True,):
        fast = FastGenerator(llm, chunk=16, full_cache=full_cache).generate(embeds, **options)
        assert fast.token_ids == ref.token_ids and fast.stopped_by == "eos"
        assert fast.mask_hidden.dtype == dtype
        if full_cache:  # a different attention length: rounding may differ in the last place
            # bf16 keeps 8 significant bits: a last-place flip is 0.4% of an element; 2% of the norm allows a few.
            error = (fast.mask_hidden.float() - ref.mask_hidden.float()).norm() / ref.mask_hidden.float().norm()
            assert error < (1e-6 if dtype == torch.float32 else 2e-2)
        else:  # the same kernels in the same order as generate()
            assert torch.equal(fast.mask_hidden, ref.mask_hidden)


def test_grouped_query_attention_over_the_whole_cache_matches_generate():
    cfg = dataclasses.replace(preset("crab-tiny").llm, num_kv_heads=2, max_seq_len=96)
    torch.manual_seed(1)
    llm = Llama(cfg, preset("crab-tiny").lora).eval()
    with torch.no_grad():  # O(1) projections, so attention is far from uniform and the mask matters
        for name, param in llm.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(std=param.shape[1] ** -0.5)
    llm.setup_caches(1, 96)
    prompt = torch.randn(1, 9, cfg.hidden_size)
    ref = generate(llm, prompt, max_new_tokens=24, eos_id=-1)
    fast = FastGenerator(llm, chunk=16, full_cache=True).generate(prompt, max_new_tokens=24, eos_id=-1)
    assert fast.token_ids == ref.token_ids and len(set(ref.token_ids)) > 3


def test_generate_fast_uses_the_chunked_loop_and_keeps_teacher_forcing(tiny):
    rig_llm_to_say(tiny, ["<mask_start>", *MASKS, "<mask_end>"])
    llm, tok = tiny.model.llm, tiny.tokenizer
    embeds = prompt_embeds(tiny)
    options = dict(max_new_tokens=50, eos_id=tok.eos_id, mask_token_ids=mask_ids(tok))
    ref = generate(llm, embeds, **options)
    with CountHostReads() as counter:
        fast = generate_fast(llm, embeds, **options)
    assert_same_generation(fast, ref)
    assert counter.reads == 1  # nine tokens (EOS included) fit one chunk of 16
    assert fast_generator(llm) is fast_generator(llm)  # captures are kept with the model
    with CountHostReads() as counter:
        slow = generate_fast(llm, embeds, fast=False, **options)
    assert_same_generation(slow, ref)
    assert counter.reads >= len(ref.token_ids)  # the reference loop reads every token back
    logits = []
    forced = generate_fast(llm, embeds, forced=ref.token_ids, logits_out=logits, **options)
    assert forced.token_ids == ref.token_ids and len(logits) == len(ref.token_ids) + 1


def test_cached_generator_does_not_keep_its_model_alive():
    llm = crab_llm("crab-tiny")
    fast_generator(llm)
    alive = [True]
    weakref.finalize(llm, alive.clear)
    del llm
    gc.collect()
    assert not alive


def test_bad_options_are_refused_with_the_fix(tiny):
    llm = tiny.model.llm
    with pytest.raises(OptionError, match="chunk 0"):
        FastGenerator(llm, chunk=0)
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA device"):
            FastGenerator(llm, cuda_graph=True)
    with pytest.raises(OptionError, match="KV cache holds 8"):
        llm.setup_caches(1, 8)
        FastGenerator(llm).generate(prompt_embeds(tiny), max_new_tokens=4, eos_id=2)
    with pytest.raises(OptionError, match="one prompt"):
        FastGenerator(llm).generate(torch.zeros(2, 3, llm.cfg.hidden_size), max_new_tokens=4, eos_id=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_llm_picks_the_fp32_next_token(demo, dtype):
    """bf16 keeps 8 significant bits: a rounding error of 2**-9 relative per op. Over the demo model's four
    layers the logits (|logit| up to ~15) move by about 1% of their largest magnitude; 3% bounds that
    with room, and wherever fp32's top-1 leads by more than twice the bound no rounding can flip it."""
    tok = demo.tokenizer
    reference = copy.deepcopy(demo.model.llm)
    half = copy.deepcopy(demo.model.llm).to(dtype)
    reference.setup_caches(1, 64)
    half.setup_caches(1, 64)
    decided = total = 0
    with torch.inference_mode():
        for text in ["What is making the sound?", "Where is the dog in the video?", "Describe the events.", "x"]:
            ids = torch.tensor([tok.encode_chat(text)])
            positions = torch.arange(ids.shape[1])
            logits32, _ = reference(reference.embed(ids), positions)
            logits16, hidden16 = half(half.embed(ids), positions)
            assert logits16.dtype == hidden16.dtype == dtype
            bound = 0.03 * logits32.abs().max()
            assert (logits16.float() - logits32).abs().max() < bound
            top2 = logits32[0].topk(2, dim=-1).values
            clear = top2[:, 0] - top2[:, 1] > 2 * bound
            agree = logits16[0].argmax(-1) == logits32[0].argmax(-1)
            assert agree[clear].all()
            assert agree[-1]  # the first answer token of every prompt
            decided, total = decided + int(clear.sum()), total + len(clear)
    assert decided > total // 3  # the margin rule covered a real share of the positions


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_graph_replay_matches_generate(demo, dtype):
    llm = copy.deepcopy(demo.model.llm).to("cuda", dtype)
    llm.setup_caches(1, 160)
    tok = demo.tokenizer
    embeds = llm.embed(torch.tensor([tok.encode_chat("Where is the dog in the video?")], device="cuda"))
    options = dict(max_new_tokens=60, eos_id=tok.eos_id, mask_token_ids=mask_ids(tok))
    ref = generate(llm, embeds, **options)
    fast_gen = FastGenerator(llm, chunk=8)
    assert fast_gen.cuda_graph and fast_gen.full_cache
    with CountHostReads() as counter:
        fast = fast_gen.generate(embeds, **options)
    assert fast.token_ids == ref.token_ids and fast.stopped_by == "eos"
    assert counter.reads == math.ceil((len(ref.token_ids) + 1) / 8)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(fast.mask_hidden.float(), ref.mask_hidden.float(), atol=tolerance)
    again = fast_gen.generate(embeds, **options)  # the same capture replayed for a second prompt
    assert again.token_ids == ref.token_ids and fast_gen.captured_graphs == 1
    llm.setup_caches(1, 200)  # new cache tensors: the old graph would write into freed memory
    moved = fast_gen.generate(embeds, **options)
    assert moved.token_ids == ref.token_ids and fast_gen.captured_graphs == 1
    sampled = SAMPLING_PRESETS["crab"]
    assert (fast_gen.generate(embeds, sampling=sampled, **options).token_ids
            == generate(llm, embeds, sampling=sampled, **options).token_ids)
