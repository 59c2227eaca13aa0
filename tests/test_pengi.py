"""Pengi's text side against transformers (GPT-2, CLIP's text tower, both tokenizers), its mapper and beam
search against a transcription of Pengi's own code, and the whole model's checkpoint and captioning.

No independent implementation of Pengi's prefix mapper or of its wrapper's beam search exists, so both
are checked against direct, minimal transcriptions of Pengi's ``TransformerMapper`` and
``_generate_beam`` written below (the beam search one on transformers' GPT-2, re-running the whole
sequence at every step as the original does). fp32 throughout; max abs difference <= 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers

from edgeav.bpe_tokenizers import CLIPBPE, GPT2BPE, write_synthetic_bpe
from edgeav.errors import CheckpointError
from edgeav.models.clip_text import CLIP_TEXT_PRESETS, CLIPTextTower
from edgeav.models.gpt2 import GPT2_PRESETS, GPT2Decoder
from edgeav.models.pengi_mapper import PrefixMapper, Projection, beam_search

TOL = 1e-4
TEXTS = ["generate audio caption", "This is a sound of", "Generate  METADATA", "a dog barks, then a car passes.",
         "It isn't loud; they're far away!", "café naïve 12°C — ok?", " <|endoftext|>", "x" * 60]


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from transformers' tiny init, so a wrong wiring shows above the tolerance."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(1.0)


def _hf_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    cfg = GPT2_PRESETS["tiny"]
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon)).eval()
    _randomise(hf, seed)
    return hf


def _our_gpt2(hf: transformers.GPT2LMHeadModel) -> GPT2Decoder:
    gpt = GPT2Decoder(GPT2_PRESETS["tiny"]).eval()
    state = dict(hf.state_dict())
    # The causal-mask buffers older transformers (Pengi's 4.28.1) saved: accepted and dropped.
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 128, 128, dtype=torch.bool).tril()
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    gpt.load_state_dict(state, strict=True)
    return gpt


@torch.no_grad()
def test_gpt2_prefill_and_cached_decode_match_transformers():
    hf = _hf_gpt2()
    gpt = _our_gpt2(hf)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight
    prefix = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(2))
    reference = hf(inputs_embeds=torch.cat((prefix, hf.transformer.wte(tokens)), dim=1)).logits
    gpt.setup_caches(2, 15)
    logits = [gpt(prefix, torch.arange(10), kv_len=10)]
    # Swap the rows in the cache, then decode the swapped tokens: row 0 must now follow sequence 1.
    gpt.reorder_caches(torch.tensor([1, 0]))
    swapped = tokens.flip(0)
    for step in range(5):
        logits.append(gpt(gpt.transformer.wte(swapped[:, step:step + 1]), torch.tensor([10 + step]),
                          kv_len=11 + step).flip(0))
    diff = (torch.cat(logits, dim=1) - reference).abs().max().item()
    assert reference.abs().max() > 1.0
    assert diff <= TOL, diff


def _hf_clip_text(eos_token_id: int, seed: int) -> transformers.CLIPTextModel:
    cfg = CLIP_TEXT_PRESETS["tiny"]
    hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act="quick_gelu", eos_token_id=eos_token_id)).eval()
    _randomise(hf, seed)
    return hf


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return write_synthetic_bpe(root / "gpt2", "gpt2"), write_synthetic_bpe(root / "clip", "clip")


@pytest.mark.parametrize("eos_token_id", [2, 49407], ids=["legacy-eos-argmax", "eos-49407"])
@torch.no_grad()
def test_clip_text_tower_matches_transformers(bpe_dirs, eos_token_id):
    hf = _hf_clip_text(eos_token_id, seed=3)
    tower = CLIPTextTower(CLIP_TEXT_PRESETS["tiny"]).eval()
    state = dict(hf.state_dict())
    state["embeddings.position_ids"] = torch.arange(77)[None]  # saved by older transformers; dropped
    tower.load_state_dict(state, strict=True)
    ids, mask = CLIPBPE.from_dir(bpe_dirs[1]).encode_prompts(TEXTS, 40)
    assert (mask == 0).any() and (mask == 1).all(dim=1).any()  # padded rows and a truncated one
    expected = hf(input_ids=ids, attention_mask=mask)
    hidden, pooled = tower(ids, mask)
    diff_hidden = (hidden - expected.last_hidden_state).abs().max().item()
    diff_pooled = (pooled - expected.pooler_output).abs().max().item()
    assert diff_hidden <= TOL and diff_pooled <= TOL, (diff_hidden, diff_pooled)


def test_tokenizers_match_transformers(bpe_dirs):
    gpt2_dir, clip_dir = bpe_dirs
    ours_gpt2, ours_clip = GPT2BPE.from_dir(gpt2_dir), CLIPBPE.from_dir(clip_dir)
    theirs_gpt2 = transformers.GPT2Tokenizer.from_pretrained(str(gpt2_dir))
    theirs_clip = transformers.CLIPTokenizer.from_pretrained(str(clip_dir))
    for text in TEXTS:
        ids = ours_gpt2.encode(text)
        assert ids == theirs_gpt2.encode(text), text
        assert ours_gpt2.decode(ids) == theirs_gpt2.decode(ids, clean_up_tokenization_spaces=True), text
        assert ours_clip.encode(text) == theirs_clip(text)["input_ids"], text
    # Pengi stops at the first id of " <|endoftext|>": the lone-space token, as in GPT-2's vocabulary.
    assert ours_gpt2.stop_token_id == theirs_gpt2.encode(" <|endoftext|>")[0] == 220
    spaced = ours_gpt2.encode("A dog is barking . It isn't loud !")
    assert ours_gpt2.decode(spaced) == "A dog is barking. It isn't loud!"
    ids, mask = ours_clip.encode_prompts(TEXTS, 40)
    expected = theirs_clip(TEXTS, max_length=40, padding="max_length", truncation=True)
    assert ids.tolist() == expected["input_ids"] and mask.tolist() == expected["attention_mask"]
    vocab = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))
    assert max(vocab.values()) < 50257 and vocab["!"] == 0


def _wrapper_projection(state: dict, x: torch.Tensor) -> torch.Tensor:
    """Pengi's Projection: e1 = W1 x; LayerNorm(e1 + W2 gelu(e1))."""
    first = x @ state["linear1.weight"].T
    return F.layer_norm(first + F.gelu(first) @ state["linear2.weight"].T, first.shape[-1:],
                        state["layer_norm.weight"], state["layer_norm.bias"])


def _wrapper_mapper(state: dict, x: torch.Tensor, clip_length: int, heads: int, layers: int) -> torch.Tensor:
    """Pengi's TransformerMapper, transcribed with its einsum attention."""
    batch = x.shape[0]
    hidden = F.linear(x, state["linear.weight"], state["linear.bias"]).view(batch, clip_length, -1)
    constants = state["prefix_const"]
    hidden = torch.cat((hidden, constants.unsqueeze(0).expand(batch, *constants.shape)), dim=1)
    _, tokens, width = hidden.shape
    for i in range(layers):
        p = f"transformer.layers.{i}."
        normed = F.layer_norm(hidden, (width,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        queries = (normed @ state[p + "attn.to_queries.weight"].T).reshape(batch, tokens, heads, width // heads)
        keys_values = (normed @ state[p + "attn.to_keys_values.weight"].T).reshape(batch, tokens, 2, heads, -1)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = (torch.einsum("bnhd,bmhd->bnmh", queries, keys) * (width // heads) ** -0.5).softmax(dim=2)
        attended = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(batch, tokens, width)
        hidden = hidden + F.linear(attended, state[p + "attn.project.weight"], state[p + "attn.project.bias"])
        normed = F.layer_norm(hidden, (width,), state[p + "norm2.weight"], state[p + "norm2.bias"])
        hidden = hidden + F.linear(F.relu(F.linear(normed, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                                   state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    return hidden[:, clip_length:]


@torch.no_grad()
def test_projection_and_mapper_match_pengi_transcription():
    torch.manual_seed(4)
    projection = Projection(24, 48)
    mapper = PrefixMapper(d_in=48, width=32, prefix_length=6, clip_length=5, num_layers=2, num_heads=8, mlp_ratio=2.0)
    for module in (projection, mapper):
        _randomise(module, seed=5)
    x = torch.randn(3, 24)
    projected = projection(x)
    diff_projection = (projected - _wrapper_projection(projection.state_dict(), x)).abs().max().item()
    prefix = mapper(projected)
    assert prefix.shape == (3, 6, 32)
    diff_mapper = (prefix - _wrapper_mapper(mapper.state_dict(), projected, 5, 8, 2)).abs().max().item()
    assert diff_projection <= TOL and diff_mapper <= TOL, (diff_projection, diff_mapper)


@torch.no_grad()
def _wrapper_beam_search(hf, embed, beam_size, max_len, temperature, stop):
    """Pengi's _generate_beam, transcribed: the whole sequence re-run through GPT-2 at every step."""
    tokens = scores = None
    lengths = torch.ones(beam_size)
    stopped = torch.zeros(beam_size, dtype=torch.bool)
    generated = embed
    for _ in range(max_len):
        logits = hf(inputs_embeds=generated).logits[:, -1, :] / (temperature if temperature > 0 else 1.0)
        logits = logits.softmax(-1).log()
        if scores is None:
            scores, next_tokens = logits.topk(beam_size, -1)
            generated = generated.expand(beam_size, *generated.shape[1:])
            next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
            tokens = next_tokens
        else:
            logits[stopped] = -float("inf")
            logits[stopped, 0] = 0
            summed = scores[:, None] + logits
            lengths[~stopped] += 1
            averaged, flat = (summed / lengths[:, None]).view(-1).topk(beam_size, -1)
            source = flat // summed.shape[1]
            lengths = lengths[source]
            next_tokens = (flat % summed.shape[1]).unsqueeze(1)
            tokens = torch.cat((tokens[source], next_tokens), dim=1)
            generated = generated[source]
            scores = averaged * lengths
            stopped = stopped[source]
        embedded = hf.transformer.wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
        generated = torch.cat((generated, embedded), dim=1)
        stopped = stopped + next_tokens.eq(stop).squeeze()
        if stopped.all():
            break
    scores = scores / lengths
    return [(tokens[i, :int(lengths[i])].tolist(), float(scores[i])) for i in scores.argsort(descending=True)]


def _assert_same_beams(ours, theirs):
    assert [list(beam.ids) for beam in ours] == [ids for ids, _ in theirs]
    diff = max(abs(beam.score - score) for beam, (_, score) in zip(ours, theirs))
    assert diff <= TOL, diff


def test_beam_search_matches_pengi_transcription():
    hf = _hf_gpt2(seed=6)
    gpt = _our_gpt2(hf)
    prefix = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(7))
    free = _wrapper_beam_search(hf, prefix, 3, 8, 1.0, stop=-1)  # no stop: every beam runs max_len
    assert all(len(ids) == 8 for ids, _ in free)
    _assert_same_beams(beam_search(gpt, prefix, stop_token_id=-1, beam_size=3, max_len=8), free)
    # Stop on tokens of the best free beam: some beams stop mid-way (then ride along on token 0 at no
    # cost, their lengths frozen) while others run on; then every beam stops, which ends the search.
    for position, expect_all_stopped in ((2, False), (4, True)):
        stop = free[0][0][position]
        stopping = _wrapper_beam_search(hf, prefix, 3, 8, 1.0, stop)
        ended = [ids[-1] == stop and len(ids) < 8 for ids, _ in stopping]
        assert any(ended) and all(ended) == expect_all_stopped
        _assert_same_beams(beam_search(gpt, prefix, stop_token_id=stop, beam_size=3, max_len=8), stopping)
    # Temperature and a wider beam; a single (greedy) beam.
    warm = _wrapper_beam_search(hf, prefix, 4, 6, 0.7, stop)
    _assert_same_beams(beam_search(gpt, prefix, stop_token_id=stop, beam_size=4, max_len=6, temperature=0.7), warm)
    greedy = _wrapper_beam_search(hf, prefix, 1, 8, 1.0, free[0][0][3])
    _assert_same_beams(beam_search(gpt, prefix, stop_token_id=free[0][0][3], beam_size=1, max_len=8), greedy)


# -- the whole model (needs the HTSAT encoder) ------------------------------------------------------------

EXPECTED_GROUPS = ("audio_encoder.base.", "audio_encoder.projection.", "caption_encoder.base.",
                   "caption_encoder.clip_text_projection.weight", "caption_encoder.projection.",
                   "caption_decoder.gpt.", "caption_decoder.audio_project.", "caption_decoder.text_project.")


def test_pengi_checkpoint_round_trip(tmp_path):
    from edgeav.models.pengi import Pengi, PengiConfig, pengi_preset, read_pengi_checkpoint, write_pengi_checkpoint

    config = pengi_preset("tiny")
    assert PengiConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    torch.manual_seed(8)
    model = Pengi(config)
    state = model.state_dict()
    assert all(key.startswith(EXPECTED_GROUPS) for key in state)
    assert all(any(key.startswith(group) for key in state) for group in EXPECTED_GROUPS)
    assert state["caption_decoder.gpt.transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # [in, out]
    assert "caption_decoder.gpt.lm_head.weight" in state and "caption_encoder.base.final_layer_norm.weight" in state
    assert "caption_decoder.audio_project.transformer.layers.1.attn.to_keys_values.weight" in state
    path = write_pengi_checkpoint(model, tmp_path / "base.pth")
    fresh = Pengi(config)
    fresh.load_state_dict(read_pengi_checkpoint(path), strict=True)
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in state.items())
    # A DataParallel copy with the buffers older transformers saved loads too.
    legacy = {"module." + key: value for key, value in state.items()}
    legacy["module.caption_decoder.gpt.transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    legacy["module.caption_encoder.base.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"model": legacy, "epoch": 3}, tmp_path / "legacy.pth")
    Pengi(config).load_state_dict(read_pengi_checkpoint(tmp_path / "legacy.pth"), strict=True)
    torch.save({"state_dict": state}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Pengi checkpoint") as refused:
        read_pengi_checkpoint(tmp_path / "other.pth")
    assert "\n" not in str(refused.value)


@torch.no_grad()
def test_pengi_describe_is_deterministic_and_follows_the_wrapper(bpe_dirs):
    from edgeav.models.pengi import Pengi, pengi_preset

    config = pengi_preset("tiny")
    torch.manual_seed(9)
    model = Pengi(config).eval()
    hf = _hf_gpt2()
    hf.load_state_dict(model.caption_decoder.gpt.state_dict())
    waveform = torch.randn(1, 44100, generator=torch.Generator().manual_seed(10)) * 0.1
    ids, mask = CLIPBPE.from_dir(bpe_dirs[1]).encode_prompts(["generate audio caption"], config.enc_text_len)
    audio, prompt = model.audio_embedding(waveform), model.prompt_embedding(ids, mask)
    assert audio.shape == prompt.shape == (1, config.d_proj)
    prefix = model.prefix(audio, prompt)
    # The wrapper: audio embedding L2-normalised, prompt embedding as it comes, audio tokens first.
    decoder = model.caption_decoder
    expected = torch.cat((decoder.audio_project(audio / audio.norm()), decoder.text_project(prompt)), dim=1)
    assert prefix.shape == (1, 2 * config.prefix_length, config.gpt2.n_embd)
    assert (prefix - expected).abs().max() <= TOL
    (caption,) = model.describe(waveform, ids, mask, beam_size=3, max_len=10)
    assert [caption] == model.describe(waveform, ids, mask, beam_size=3, max_len=10)
    best = _wrapper_beam_search(hf, prefix, 3, 10, 1.0, config.stop_token_id)[0][0]
    assert caption == (best[:-1] if best[-1] == config.stop_token_id else best)
    assert all(0 <= i < config.gpt2.vocab_size for i in caption)
    # Several prompts at once: the audio encoded once, each prompt's caption as if alone.
    two_ids, two_mask = CLIPBPE.from_dir(bpe_dirs[1]).encode_prompts(["generate metadata", "generate audio caption"],
                                                                    config.enc_text_len)
    both = model.describe(waveform, two_ids, two_mask, beam_size=3, max_len=10)
    assert both[1] == caption and both[0] == model.describe(waveform, two_ids[:1], two_mask[:1], beam_size=3,
                                                            max_len=10)[0]
