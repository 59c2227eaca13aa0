"""Crab+'s whole thinker against transformers' Qwen2.5-Omni thinker (CRABPLUS_SPEC sections 2, 8, 9).

transformers' ``Qwen2_5OmniThinkerForConditionalGeneration`` at the tiny config of section 9 gets large
random weights and, on every linear PEFT's suffix match picks, a re-implementation of the authors' routed
I-LoRA. Those weights are written in the released layout (``thinker.*`` safetensors, PEFT-named
``finetune_weights.bin``) and read back by our loader as ``crabplus-tiny``. Then, fp32: the audio tower,
the ViT on a 10-frame video, the M-RoPE ids of the AVE prompt the pipeline builds, the prefill logits and
17 greedy steps of the whole thinker.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from edgeav.decoding import ensure_cache
from edgeav.generate import generate
from edgeav.media import SAMPLE_RATE
from edgeav.models.ilora import ILoRALinear
from edgeav.models.mrope import rope_positions
from edgeav.models.sam2 import Sam2, sam2_config
from edgeav.preprocess.qwen_vision import patchify
from edgeav.preprocess.whisper_mel import log_mel
from edgeav.qwen_tokenizer import AUDIO, VIDEO, VISION_BOS, chat_ids, write_synthetic_tokenizer
from edgeav.systems.crabplus.checkpoints import load_released
from edgeav.systems.crabplus.config import preset
from edgeav.qwen_thinker import PositionedLLM
from edgeav.qwen_thinker import position_blocks
from edgeav.systems.crabplus.tasks import get_task
from edgeav.weight_files import write_safetensors

TOL = 1e-4
RANK, HEADS, SCALE = 4, 3, 2.0  # crabplus-tiny's I-LoRA: r 4, alpha 8, 3 heads
PEFT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The transformers-5 module prefixes and the released (transformers-4.51) thinker names they stand for.
RELEASED_PREFIX = {"model.language_model.": "model.", "model.audio_tower.": "audio_tower.",
                   "model.visual.": "visual.", "lm_head.": "lm_head."}
STEPS = 17  # the prefill's next token, then 16 decode steps


def released_name(name: str) -> str:
    """A transformers-5 thinker parameter or module name -> its on-disk name without ``thinker.``."""
    for current, released in RELEASED_PREFIX.items():
        if name.startswith(current):
            return released + name[len(current):]
    raise KeyError(name)


class RoutedLoRA(nn.Module):
    """The authors' peft_hyper ``Linear.forward`` around a transformers linear: ``y = W x + b``, then one head
    at a time ``y = y + w_i * B_i(A x) * scale`` with ``w = softmax(route(x))`` in fp32."""

    def __init__(self, base: nn.Linear, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base

        def noise(*shape, std):
            return torch.randn(shape, generator=generator) * std

        fan_in, out = base.in_features, base.out_features
        self.lora_A = noise(RANK, fan_in, std=fan_in**-0.5)
        self.lora_Bs = [noise(out, RANK, std=0.5 * RANK**-0.5) for _ in range(HEADS)]
        self.lora_route = noise(HEADS, fan_in, std=2 * fan_in**-0.5)  # router logits of a few units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = torch.softmax(F.linear(x, self.lora_route), dim=-1, dtype=torch.float32).to(x.dtype)
        low_rank = F.linear(x, self.lora_A)
        y = self.base(x)
        for i, lora_b in enumerate(self.lora_Bs):
            y = y + route[..., i : i + 1] * F.linear(low_rank, lora_b) * SCALE
        return y

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, **{f"lora_B{i}.weight": b for i, b in enumerate(self.lora_Bs)},
                "lora_route.weight": self.lora_route}


def tiny_thinker():
    """Spec section 9's thinker with Qwen's vocabulary and special ids (attention in eager fp32)."""
    config = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          n_window=100, output_dim=64),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, window_size=112,
                           fullatt_block_indexes=[1], out_hidden_size=64),
        text_config=dict(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
        attn_implementation="eager",
    )
    config.vision_start_token_id = VISION_BOS  # transformers 5 leaves it None; get_rope_index needs it
    return transformers.Qwen2_5OmniThinkerForConditionalGeneration(config).eval()


@torch.no_grad()
def randomise(thinker, generator: torch.Generator) -> None:
    """Weights of O(1) gain, norms away from 1 and sizeable biases, so a wrong op shows far above TOL."""
    for name, param in thinker.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        is_norm = any(key in name for key in ("norm", "ln_q", "ln_post", "layer_norm"))
        if is_norm:
            param.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
        elif name.endswith("bias"):
            param.copy_(0.5 * noise if "language_model" in name else 0.2 * noise)
        elif "embed_tokens" in name or "audio_bos_eos" in name:
            param.copy_(noise)
        elif "patch_embed" in name or "conv" in name:
            param.copy_(0.3 * noise)  # audio and vision input layers: inputs of O(1), a few hundred taps
        else:
            param.copy_(noise * param.shape[-1] ** -0.5)


def wrap_like_peft(thinker, generator: torch.Generator) -> dict[str, RoutedLoRA]:
    """Wrap every linear whose name ends with a target, as PEFT's suffix match does over the thinker;
    return the wrappers by their released name."""
    found = [(name, module) for name, module in thinker.model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PEFT_TARGETS]
    wrapped = {}
    for name, linear in found:
        parent_name, child = ("model." + name).rsplit(".", 1)
        wrapper = RoutedLoRA(linear, generator)
        setattr(thinker.get_submodule(parent_name), child, wrapper)
        wrapped[released_name(f"model.{name}")] = wrapper
    return wrapped


def released_config(thinker) -> dict:
    """config.json as Qwen2.5-Omni ships it (4.51's field names: ``rope_scaling`` holds the mrope_section)."""
    config = thinker.config
    text = config.text_config.to_dict()
    text["rope_theta"] = text["rope_parameters"]["rope_theta"]
    text["rope_scaling"] = {"type": "default", "mrope_section": list(text["rope_parameters"]["mrope_section"])}
    return {"architectures": ["Qwen2_5OmniForConditionalGeneration"], "model_type": "qwen2_5_omni",
            "thinker_config": {"audio_config": config.audio_config.to_dict(),
                               "vision_config": config.vision_config.to_dict(), "text_config": text,
                               "position_id_per_seconds": config.position_id_per_seconds}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers' thinker with the routed LoRA, our Crab+ loaded from the released files it wrote)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    thinker = tiny_thinker()
    randomise(thinker, generator)
    base = {"thinker." + released_name(k): v.clone() for k, v in thinker.state_dict().items()}
    wrapped = wrap_like_peft(thinker, generator)
    folder = tmp_path_factory.mktemp("crabplus-release")
    write_safetensors(base, folder / "model.safetensors")
    torch.save({f"base_model.model.{name}.{part}": tensor for name, layer in wrapped.items()
                for part, tensor in layer.peft_tensors().items()}, folder / "finetune_weights.bin")
    torch.save({"model": Sam2(sam2_config("tiny")).state_dict()}, folder / "sam2.1_hiera_large.pt")
    (folder / "config.json").write_text(json.dumps(released_config(thinker)))
    write_synthetic_tokenizer(folder)
    loaded = load_released(folder, "crabplus-tiny")  # refuses a folder whose shapes are not crabplus-tiny's
    # Ours by released name (the LLM sits under llm.).
    ours_wrapped = {name.removeprefix("llm."): m for name, m in loaded.model.named_modules()
                    if isinstance(m, ILoRALinear)}
    # PEFT's suffix match over transformers' thinker and our wrap_ilora pick the same linears.
    assert set(ours_wrapped) == set(wrapped) and len(wrapped) == 2 * 7 + 2 * 3 + 2 * 3
    # Our fused head-major lora_B splits back into the very B_i the file holds.
    for name, layer in ours_wrapped.items():
        released = wrapped[name].peft_tensors()
        assert all(torch.equal(value, released[part]) for part, value in layer.peft_state_dict().items())
    return thinker, loaded


def test_tiny_preset_has_spec_section_9_shapes():
    config = preset("crabplus-tiny")
    audio, vision, llm = config.audio, config.vision, config.llm
    assert (audio.d_model, audio.encoder_layers, audio.encoder_attention_heads, audio.encoder_ffn_dim,
            audio.output_dim) == (32, 2, 2, 64, 64)
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size,
            tuple(vision.fullatt_block_indexes), vision.out_hidden_size) == (2, 32, 2, 64, (1,), 64)
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads, llm.intermediate_size,
            tuple(llm.mrope_section), llm.rope_theta) == (64, 2, 4, 2, 128, (2, 3, 3), 1e6)
    assert (config.lora.rank, config.lora.heads, config.lora.scale) == (RANK, HEADS, SCALE)


def _waveform(seconds: float, seed: int) -> np.ndarray:
    """A tone over noise: log-mel frames that differ from one another."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, t.shape)
    return 0.5 * np.sin(2 * np.pi * (300 + 200 * t) * t) + noise


def _reference_audio(thinker, mel: np.ndarray) -> torch.Tensor:
    features = torch.from_numpy(mel)[None]
    mask = torch.ones(1, mel.shape[1], dtype=torch.long)
    return thinker.get_audio_features(features, feature_attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("seconds", [1.0, 2.5])
def test_audio_tower_matches(models, seconds):
    thinker, loaded = models
    mel = log_mel(_waveform(seconds, seed=int(seconds * 10)))
    with torch.no_grad():
        expected = _reference_audio(thinker, mel)
        got = loaded.model.encode_audio(torch.from_numpy(mel))
    assert got.shape == expected.shape == (int(seconds * 25), 64)
    diff = (got - expected).abs().max().item()
    print(f"audio {seconds} s: max abs diff {diff:.2e}, output std {expected.std():.2f}")
    assert diff <= TOL and expected.std() > 0.3


def _video() -> tuple[np.ndarray, tuple[int, int, int]]:
    frames = np.random.default_rng(3).integers(0, 256, (10, 224, 224, 3), dtype=np.uint8)
    return patchify(frames)


def test_vit_on_a_10_frame_video_matches(models):
    thinker, loaded = models
    patches, grid = _video()
    assert grid == (5, 16, 16)
    with torch.no_grad():
        (expected,) = thinker.get_video_features(torch.from_numpy(patches), torch.tensor([grid])).pooler_output
        got = loaded.model.encode_vision(torch.from_numpy(patches), grid)
    assert got.shape == expected.shape == (320, 64)
    diff = (got - expected).abs().max().item()
    print(f"ViT 10 frames: max abs diff {diff:.2e}, output std {expected.std():.2f}")
    assert diff <= TOL and expected.std() > 0.3


@pytest.fixture(scope="module")
def ave_prompt(models):
    """The AVE prompt as the pipeline builds it: the task's 10-s audio cut, 10 frames, the chat template
    with each placeholder repeated to its block's token count; our embeddings and M-RoPE ids, and the
    reference's inputs (``video_second_per_grid`` 2.0 = 2 frames a slice / fps 1.0)."""
    thinker, loaded = models
    task = get_task("ave")
    mel = log_mel(task.cut_audio(_waveform(10.0, seed=5), SAMPLE_RATE))
    patches, grid = _video()
    with torch.no_grad():
        audio_tokens = loaded.model.encode_audio(torch.from_numpy(mel))
        vision_tokens = loaded.model.encode_vision(torch.from_numpy(patches), grid)
    counts = {"audio": audio_tokens.shape[0], "video": vision_tokens.shape[0]}
    parts = [(kind, counts.get(kind, value)) for kind, value in task.parts()]
    ids = chat_ids(loaded.tokenizer, parts)
    embeds = loaded.model.embed_prompt(ids, {VIDEO: vision_tokens, AUDIO: audio_tokens})
    positions, delta = rope_positions(position_blocks(ids, grid, loaded.config.seconds_per_slice),
                                      tokens_per_second=loaded.config.tokens_per_second)
    input_ids = torch.tensor([ids])
    reference_inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        input_features=torch.from_numpy(mel)[None],
        feature_attention_mask=torch.ones(1, mel.shape[1], dtype=torch.long),
        pixel_values_videos=torch.from_numpy(patches), video_grid_thw=torch.tensor([grid]),
        video_second_per_grid=torch.tensor([loaded.config.seconds_per_slice]), use_audio_in_video=False)
    return ids, embeds, positions, delta, reference_inputs


def test_ave_prompt_positions_match_get_rope_index(models, ave_prompt):
    thinker, loaded = models
    ids, _, positions, delta, inputs = ave_prompt
    assert loaded.config.seconds_per_slice == 2.0
    expected, expected_delta = thinker.get_rope_index(
        inputs["input_ids"], video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"],
        use_audio_in_video=False, audio_seqlens=inputs["feature_attention_mask"].sum(-1),
        second_per_grids=inputs["video_second_per_grid"])
    assert ids.count(VIDEO) == 320 and ids.count(AUDIO) == 250
    assert torch.equal(positions, expected[:, 0])
    assert delta == int(expected_delta) < 0
    video_t = positions[0, torch.tensor(ids) == VIDEO]
    assert (video_t.unique() - video_t.min()).tolist() == [0, 50, 100, 150, 200]  # 2 s a slice at 25 ids/s


def reference_greedy(thinker, inputs: dict, steps: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """transformers' thinker: the prefill's logits [L, V], then ``steps`` greedy tokens and each one's logits
    [steps, V]. Decode steps feed the new token alone, so the thinker places it itself: its cache length
    + the rope delta it kept from the prefill. (With an attention mask it would rotate the one token at
    every position of the mask: its generate() slices position ids that a bare forward does not.)"""
    output = thinker(**inputs, use_cache=True)
    prefill, cache = output.logits[0], output.cache
    step_logits, tokens = [prefill[-1]], []
    for _ in range(steps - 1):
        tokens.append(int(step_logits[-1].argmax()))
        output = thinker(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
        step_logits.append(output.logits[0, -1])
    tokens.append(int(step_logits[-1].argmax()))
    return prefill, tokens, torch.stack(step_logits)


def test_prefill_and_greedy_decode_match(models, ave_prompt):
    """Prefill logits at every prompt position, then 17 greedy tokens (16 decode steps) with the logits of
    every step; eos -1 so that our loop cannot stop early."""
    thinker, loaded = models
    ids, embeds, positions, delta, inputs = ave_prompt
    llm = loaded.model.llm
    ensure_cache(llm, len(ids) + STEPS, loaded.config.llm.max_seq_len)
    positioned = PositionedLLM(llm, positions, delta)
    with torch.no_grad():
        expected, reference_tokens, reference_logits = reference_greedy(thinker, inputs, STEPS)
        got, _ = positioned(embeds, torch.arange(len(ids)), len(ids))
    our_logits: list[torch.Tensor] = []
    generation = generate(positioned, embeds, max_new_tokens=STEPS, eos_id=-1, logits_out=our_logits,
                          stop_repeats=False)

    prefill_diff = (got[0] - expected).abs().max().item()
    step_diffs = (torch.stack(our_logits) - reference_logits).abs().amax(dim=-1)
    print(f"prefill logits ({len(ids)} positions): max abs diff {prefill_diff:.2e}, std {expected.std():.2f}; "
          f"decode: max abs diff {step_diffs.max():.2e} over {len(step_diffs)} steps")
    assert prefill_diff <= TOL and expected.std() > 0.3
    assert generation.token_ids == reference_tokens and len(set(reference_tokens)) > 1
    assert len(our_logits) == STEPS and step_diffs.max() <= TOL
