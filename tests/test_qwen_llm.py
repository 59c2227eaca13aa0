"""Qwen2.5's text model on our decoder: M-RoPE position ids and prefill/decode parity with the
Qwen2.5-Omni thinker of transformers (spec section 9's tiny thinker, the same random weights, fp32)."""

from __future__ import annotations

import pytest
import torch

from conftest import sharpen_qwen_
from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import OptionError
from edgeav.models.llama import Llama
from edgeav.models.mrope import AudioRun, ImageGrid, TextRun, VideoGrid, rope_positions

# Qwen2.5-Omni's ids (CRABPLUS_SPEC section 4)
ENDOFTEXT, IM_END = 151643, 151645
AUDIO, AUDIO_BOS, AUDIO_EOS = 151646, 151647, 151648
VISION_BOS, VISION_EOS, IMAGE, VIDEO = 151652, 151653, 151655, 151656
QWEN_VOCAB = 152064
MROPE_SECTION = (2, 3, 3)  # head_dim 16: 8 frequency pairs


def tiny_thinker(vocab_size: int = QWEN_VOCAB):
    """Spec section 9's thinker: every tower tiny, Qwen's special ids (and by default its real vocabulary)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          n_window=100, output_dim=64),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=112,
                           fullatt_block_indexes=[1], out_hidden_size=64),
        text_config=dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": list(MROPE_SECTION)}),
        attn_implementation="eager",
    )
    config.vision_start_token_id = VISION_BOS  # transformers 5 leaves it None; get_rope_index needs it
    return transformers.Qwen2_5OmniThinkerForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def thinker():
    torch.manual_seed(0)
    model = tiny_thinker()
    sharpen_qwen_(model.model.language_model.named_parameters())
    with torch.no_grad():
        model.lm_head.weight.normal_(std=64**-0.5)
    return model


def qwen_llm_config() -> LLMConfig:
    """Qwen2.5's text model at spec section 9's size."""
    return LLMConfig(base_vocab_size=QWEN_VOCAB, num_added_tokens=0, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1e6, max_seq_len=128,
                     bos_id=ENDOFTEXT, eos_id=IM_END, pad_id=ENDOFTEXT, attention_bias=True,
                     mrope_section=MROPE_SECTION)


def thinker_prompt(parts: list) -> tuple[list, torch.Tensor, dict]:
    """Our blocks, the thinker's input ids and get_rope_index's media arguments for ``parts``: an int is
    that many text tokens, a media block gets its begin/end markers (as the chat template writes them)."""
    blocks, ids, text = [], [], 0
    grids: dict[str, list] = {"image_grid_thw": [], "video_grid_thw": [], "second_per_grids": [], "audio_seqlens": []}

    def add_text(tokens: list[int]) -> None:
        nonlocal text
        ids.extend(tokens)
        text += len(tokens)

    for part in parts:
        if isinstance(part, int):
            add_text(list(range(1000, 1000 + part)))
            continue
        vision = isinstance(part, (ImageGrid, VideoGrid))
        add_text([VISION_BOS if vision else AUDIO_BOS])
        blocks += [TextRun(text), part]
        text = 0
        if isinstance(part, ImageGrid):
            ids.extend([IMAGE] * part.tokens)
            grids["image_grid_thw"].append([1, 2 * part.height, 2 * part.width])  # the unmerged patch grid
        elif isinstance(part, VideoGrid):
            ids.extend([VIDEO] * part.tokens)
            grids["video_grid_thw"].append([part.slices, 2 * part.height, 2 * part.width])
            grids["second_per_grids"].append(part.seconds_per_slice)
        else:
            ids.extend([AUDIO] * part.length)
            grids["audio_seqlens"].append(4 * part.length)  # 4 n mel frames give n audio tokens
        add_text([VISION_EOS if vision else AUDIO_EOS])
    blocks.append(TextRun(text))
    kwargs = {key: torch.tensor(value) if value else None for key, value in grids.items()}
    return blocks, torch.tensor([ids]), kwargs


PROMPTS = {
    # A2V's order (audio first), 2-s slices as Crab+ runs video (t advances 50 a slice)
    "audio-video-text": [7, AudioRun(25), VideoGrid(3, 2, 2, 2.0), 6],
    # ARIG's order; a non-square grid so rows and columns cannot trade places unnoticed
    "image-audio-text": [5, ImageGrid(3, 4), AudioRun(25), 4],
    # 0.7 s a slice: fp32 truncation puts slice 6 at t = 104, not 105
    "video-fractional-seconds": [3, VideoGrid(7, 2, 3, 0.7), 2],
}


@pytest.mark.parametrize("name", PROMPTS)
def test_rope_positions_match_the_thinkers_rope_index(thinker, name):
    blocks, input_ids, media = thinker_prompt(PROMPTS[name])
    positions, delta = rope_positions(blocks)
    expected, expected_delta = thinker.get_rope_index(input_ids, attention_mask=torch.ones_like(input_ids),
                                                      use_audio_in_video=False, **media)
    assert positions.shape == (3, input_ids.shape[1]) == tuple(expected[:, 0].shape)
    assert torch.equal(positions, expected[:, 0])
    assert delta == int(expected_delta) != 0


def test_rope_positions_spec_example_and_refusals():
    # Spec section 2: a 10-frame video (5 slices of 8x8 at 2 s a slice) spans t = s .. s + 200.
    positions, delta = rope_positions([TextRun(3), VideoGrid(5, 8, 8, 2.0), TextRun(2)])
    video = positions[:, 3:323]
    assert video[0].unique().tolist() == [3, 53, 103, 153, 203]
    assert video[1].max() == video[2].max() == 3 + 7
    assert positions[:, 323:].tolist() == [[204, 205]] * 3
    assert delta == 206 - 325
    text_only, delta = rope_positions([TextRun(4), AudioRun(3)])
    assert torch.equal(text_only, torch.arange(7).expand(3, -1)) and delta == 0
    with pytest.raises(OptionError, match="no tokens"):
        rope_positions([TextRun(0)])
    with pytest.raises(OptionError, match="empty grid"):
        rope_positions([ImageGrid(0, 8)])


def test_llm_matches_the_thinkers_language_model_prefill_and_greedy_decode(thinker):
    """Prefill at the M-RoPE ids of an audio + video + text prompt, then 16 greedy steps at cache position
    + delta, through our KV cache against the thinker's language model and head."""
    blocks, _, _ = thinker_prompt(PROMPTS["audio-video-text"])
    positions, delta = rope_positions(blocks)
    prompt_len = positions.shape[1]
    cfg = qwen_llm_config()
    ours = Llama(cfg, LoRAConfig(rank=4, alpha=8.0, heads=3)).eval()  # I-LoRA on all 7 projections, B zero
    # The on-disk names: thinker.model.* -> model.*, thinker.lm_head -> lm_head
    state = {f"model.{key}": value for key, value in thinker.model.language_model.state_dict().items()}
    state["lm_head.weight"] = thinker.lm_head.weight
    result = ours.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {key for key in ours.state_dict() if ".lora_" in key}
    assert ours.model.layers[0].self_attn.q_proj.bias is not None and ours.model.layers[0].self_attn.o_proj.bias is None
    assert positions.max() >= cfg.max_seq_len  # angles past the cache length

    transformers = pytest.importorskip("transformers")
    language_model = thinker.model.language_model
    embeds = torch.randn(1, prompt_len, cfg.hidden_size)
    steps = 16
    with torch.no_grad():
        cache = transformers.DynamicCache(config=language_model.config)
        hidden = language_model(inputs_embeds=embeds, position_ids=positions[:, None], cache=cache,
                                use_cache=True).last_hidden_state
        hf_logits = [thinker.lm_head(hidden)]
        hf_tokens = []
        for step in range(steps):
            hf_tokens.append(int(hf_logits[-1][0, -1].argmax()))
            position = torch.full((3, 1, 1), prompt_len + step + delta)
            hidden = language_model(inputs_embeds=language_model.embed_tokens(torch.tensor([[hf_tokens[-1]]])),
                                    position_ids=position, cache=cache, use_cache=True).last_hidden_state
            hf_logits.append(thinker.lm_head(hidden))

        ours.setup_caches(1, cfg.max_seq_len)
        logits, _ = ours(embeds, torch.arange(prompt_len), positions=positions)
        our_logits, our_tokens = [logits], []
        for step in range(steps):
            our_tokens.append(int(our_logits[-1][0, -1].argmax()))
            input_pos = torch.tensor([prompt_len + step])
            logits, _ = ours(ours.embed(torch.tensor([[our_tokens[-1]]])), input_pos, prompt_len + step + 1,
                             positions=(input_pos + delta).expand(3, -1))
            our_logits.append(logits)
        plain, _ = ours(embeds, torch.arange(prompt_len))  # input_pos on every stream: plain RoPE
    hf_all, ours_all = torch.cat(hf_logits, dim=1), torch.cat(our_logits, dim=1)
    assert our_tokens == hf_tokens and len(set(hf_tokens)) > 1
    assert (ours_all - hf_all).abs().max() <= 1e-4
    assert hf_all.std() > 0.3  # the tolerance is small against the signal
    # The M-RoPE ids matter: plain positions move the logits far past the tolerance.
    assert (plain - hf_logits[0]).abs().max() > 0.1


def test_positions_are_refused_where_they_cannot_apply():
    crab_like = Llama(LLMConfig(base_vocab_size=64, num_added_tokens=0, hidden_size=32, num_layers=1, num_heads=2,
                                num_kv_heads=2, intermediate_size=64, max_seq_len=16), LoRAConfig(targets=()))
    crab_like.setup_caches(1, 16)
    with pytest.raises(OptionError, match="no mrope_section"):
        crab_like(torch.zeros(1, 2, 32), torch.arange(2), positions=torch.zeros(3, 2, dtype=torch.long))
    qwen = Llama(qwen_llm_config(), LoRAConfig(targets=()))
    qwen.setup_caches(1, 16)
    with pytest.raises(OptionError, match=r"expected \[3, 2\]"):
        qwen(torch.zeros(1, 2, 64), torch.arange(2), positions=torch.zeros(2, dtype=torch.long))
    with pytest.raises(OptionError, match=r"summing to head_dim // 2 = 8"):
        Llama(LLMConfig(hidden_size=64, num_heads=4, num_kv_heads=2, mrope_section=(2, 3, 4)), LoRAConfig())


def test_qwen25_7b_parameter_counts():
    """Qwen2.5-7B has 7,615,616,512 parameters; Crab+'s LLM I-LoRA (r 128, 3 heads, 7 projections) 682.4 M."""
    cfg = LLMConfig(base_vocab_size=QWEN_VOCAB, num_added_tokens=0, hidden_size=3584, num_layers=28, num_heads=28,
                    num_kv_heads=4, intermediate_size=18944, rms_norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768,
                    bos_id=ENDOFTEXT, eos_id=IM_END, pad_id=ENDOFTEXT, attention_bias=True, mrope_section=(16, 24, 24))
    with torch.device("meta"):
        model = Llama(cfg, LoRAConfig(rank=128, alpha=256.0, heads=3))
    lora = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
    base = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
    assert base == 7_615_616_512
    assert lora == 682_350_592
