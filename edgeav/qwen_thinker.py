"""The Qwen2.5-Omni thinker as more than one system runs it (CRABPLUS_SPEC sections 2-4): its text
model's shapes, its config.json and weight names as released, M-RoPE prompt blocks, the LLM driven at
M-RoPE positions, and :class:`QwenThinker` (the three towers, no LoRA) answering chat prompts through
:class:`ThinkerChat`, which an engine's thinker (:class:`edgeav.engines.qwen_onnx.OnnxThinker`) shares.

Crab+ wraps the same towers with its I-LoRA; OpenAVS asks the plain thinker to describe a picture or a
sound and to translate descriptions into object names.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import CheckpointError, OptionError
from edgeav.decoding import Generation, ensure_cache
from edgeav.generate import fill_placeholders, generate
from edgeav.models.llama import Llama
from edgeav.models.mrope import AudioRun, ImageGrid, TextRun, VideoGrid, rope_positions
from edgeav.models.qwen_audio import QwenAudioConfig, QwenAudioEncoder
from edgeav.models.qwen_vision import QwenVisionConfig, QwenVisionEncoder
from edgeav.preprocess.qwen_vision import image_pixels, patchify
from edgeav.preprocess.whisper_mel import log_mel
from edgeav.qwen_tokenizer import AUDIO, IMAGE, QWEN_OMNI_SYSTEM, VIDEO, QwenTokenizer, chat_ids
from edgeav.weight_files import CONFIG_FILE

# The thinker's special ids (CRABPLUS_SPEC section 4); the tokenizer is checked against them when it loads.
IM_END_ID = 151645
ENDOFTEXT_ID = 151643
QWEN_VOCAB = 152064
THINKER_PREFIX = "thinker."
# What fixes a tower's shapes in Qwen2.5-Omni's config.json (text_config's are read one by one).
_SHAPE_KEYS = {
    "audio_config": ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "output_dim"),
    "vision_config": ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size"),
}


def qwen_llm(**shape) -> LLMConfig:
    """Qwen2.5's text model: q/k/v biases, M-RoPE 16/24/24, theta 1e6, no BOS, <|im_end|> ends an answer."""
    base = dict(base_vocab_size=QWEN_VOCAB, num_added_tokens=0, rms_norm_eps=1e-6, rope_theta=1e6,
                attention_bias=True, mrope_section=(16, 24, 24), bos_id=ENDOFTEXT_ID, eos_id=IM_END_ID,
                pad_id=ENDOFTEXT_ID)
    return LLMConfig(**{**base, **shape})


@dataclass(frozen=True)
class ThinkerShapes:
    """The thinker's three towers and its M-RoPE time scale, as Qwen2.5-Omni's config.json gives them."""

    audio: QwenAudioConfig = field(default_factory=QwenAudioConfig)
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    llm: LLMConfig = field(default_factory=lambda: qwen_llm(
        hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944, max_seq_len=32768))
    tokens_per_second: int = 25


def thinker_shapes_from_hf(hf: dict, folder: Path) -> ThinkerShapes:
    """The shapes Qwen2.5-Omni's ``config.json`` (read from ``folder``) declares; one-line errors name what lacks."""
    thinker = hf.get("thinker_config")
    if not isinstance(thinker, dict) or not all(isinstance(thinker.get(k), dict)
                                                for k in ("audio_config", "vision_config", "text_config")):
        raise CheckpointError(f"{folder / CONFIG_FILE}: no thinker_config with audio_config, vision_config and "
                              "text_config; copy Qwen2.5-Omni's config.json again")
    for section, keys in _SHAPE_KEYS.items():
        absent = [key for key in keys if key not in thinker[section]]
        if absent:  # the towers' configs would fall back to the 7B's sizes and meet weights of another shape
            raise CheckpointError(f"{folder / CONFIG_FILE}: thinker_config.{section} has no {absent[0]}; copy "
                                  "Qwen2.5-Omni's config.json again")
    text = thinker["text_config"]
    # transformers 4.51 (the release) writes rope_scaling and rope_theta; transformers 5 rope_parameters.
    rope = {**(text.get("rope_parameters") or {}), **(text.get("rope_scaling") or {})}
    try:
        llm = qwen_llm(hidden_size=int(text["hidden_size"]), num_layers=int(text["num_hidden_layers"]),
                       num_heads=int(text["num_attention_heads"]), num_kv_heads=int(text["num_key_value_heads"]),
                       intermediate_size=int(text["intermediate_size"]), base_vocab_size=int(text["vocab_size"]),
                       rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
                       rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 1e6))),
                       max_seq_len=int(text.get("max_position_embeddings", 32768)),
                       mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))))
        audio = QwenAudioConfig.from_hf(thinker["audio_config"])
        vision = QwenVisionConfig.from_hf(thinker["vision_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: thinker_config lacks or garbles {e}; copy Qwen2.5-Omni's "
                              "config.json again") from None
    return ThinkerShapes(audio, vision, llm, int(thinker.get("position_id_per_seconds", 25)))


def hf_config(shapes: ThinkerShapes, architecture: str = "Qwen2_5OmniForConditionalGeneration") -> dict:
    """A Qwen2.5-Omni config.json for ``shapes`` (the fields the loader reads, named as released)."""
    llm = shapes.llm
    text = {"hidden_size": llm.hidden_size, "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads, "intermediate_size": llm.intermediate_size,
            "vocab_size": llm.base_vocab_size, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
            "max_position_embeddings": llm.max_seq_len,
            "rope_scaling": {"type": "default", "mrope_section": list(llm.mrope_section)}}
    return {"architectures": [architecture], "model_type": "qwen2_5_omni", "enable_audio_output": False,
            "thinker_config": {"audio_config": shapes.audio.to_hf(), "vision_config": shapes.vision.to_hf(),
                               "text_config": text, "position_id_per_seconds": shapes.tokens_per_second}}


def released_thinker_key(key: str) -> str | None:
    """The runtime's name of a released weight (``llm.model.*``, ``llm.lm_head.*``, ``audio_tower.*``,
    ``visual.*``); None for what it never reads (the talker, token2wav)."""
    if not key.startswith(THINKER_PREFIX):
        return None
    key = key[len(THINKER_PREFIX):]
    if key.startswith(("model.", "lm_head.")):
        return "llm." + key
    if key.startswith(("audio_tower.", "visual.")):
        return key
    return None


def position_blocks(token_ids: list[int], grid: tuple[int, int, int] | None, seconds_per_slice: float) -> list:
    """The prompt as M-RoPE's blocks: runs of text, the image or video placeholder run with its patch grid
    ``grid`` (t, h, w), the audio placeholder run."""
    blocks = []
    for token, run in itertools.groupby(token_ids, key=lambda t: t if t in (AUDIO, IMAGE, VIDEO) else None):
        n = sum(1 for _ in run)
        if token is None:
            blocks.append(TextRun(n))
        elif token == AUDIO:
            blocks.append(AudioRun(n))
        elif token == IMAGE:
            blocks.append(ImageGrid(grid[1] // 2, grid[2] // 2))
        else:
            blocks.append(VideoGrid(grid[0], grid[1] // 2, grid[2] // 2, seconds_per_slice=seconds_per_slice))
    return blocks


@dataclass
class PositionedLLM:
    """The LLM as :func:`edgeav.generate.generate` drives it, with Qwen's M-RoPE positions: the prefill at
    the prompt's three position streams, every decode step at ``cache position + delta`` on all three
    (``delta`` is computed once at prefill and kept here, CRABPLUS_SPEC section 2)."""

    llm: Llama
    positions: Tensor  # [3, prompt length]
    delta: int

    @property
    def max_seq_len(self) -> int:
        return self.llm.max_seq_len

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.llm.embed(token_ids)

    def __call__(self, inputs_embeds: Tensor, input_pos: Tensor, kv_len: int | None = None):
        if inputs_embeds.shape[1] == self.positions.shape[1]:
            positions = self.positions.to(input_pos.device)
        else:
            positions = (input_pos + self.delta).expand(3, -1)
        return self.llm(inputs_embeds, input_pos, kv_len, positions=positions)


@dataclass(frozen=True)
class ChatPrompt:
    """A chat prompt ready for the LLM: its token ids, their embeddings ``[1, L, D]`` (media rows filled in)
    and the M-RoPE positions ``[3, L]`` with the decode offset ``delta``."""

    token_ids: list[int]
    embeds: Tensor
    positions: Tensor
    delta: int


class ThinkerChat:
    """The thinker's chat on whatever holds its parts, so the PyTorch reference and an engine answer with the
    same code. A subclass provides ``shapes`` (:class:`ThinkerShapes`), ``encode_vision(patches, grid)`` and
    ``encode_audio(mel)`` (fp32 host tensors in, token blocks out), ``embed_prompt(token_ids, blocks)`` and
    ``llm``, driven through :class:`PositionedLLM` (``embed``, ``setup_caches``, ``max_seq_len``, a call
    taking ``positions``)."""

    def chat_prompt(self, tokenizer: QwenTokenizer, parts: list[tuple[str, str]], *,
                    system: str = QWEN_OMNI_SYSTEM, picture: np.ndarray | None = None,
                    waveform: np.ndarray | None = None) -> ChatPrompt:
        """The chat ``parts`` ((kind, text) with kind "text", "image" or "audio"; the media parts take ``picture``
        (uint8 [H, W, 3]) and ``waveform`` (16 kHz mono)) -> the prompt, each medium encoded once."""
        blocks, counts, grid = {}, {}, None
        for kind, _ in parts:
            if kind == "image":
                patches, grid = patchify(image_pixels(picture)[None])
                blocks[IMAGE] = self.encode_vision(torch.from_numpy(patches), grid)
                counts["image"] = blocks[IMAGE].shape[0]
            elif kind == "audio":
                blocks[AUDIO] = self.encode_audio(torch.from_numpy(log_mel(waveform)))
                counts["audio"] = blocks[AUDIO].shape[0]
            elif kind != "text":
                raise OptionError(f"thinker prompt part {kind!r}: expected text, image or audio")
        ids = chat_ids(tokenizer, [(kind, counts.get(kind, value)) for kind, value in parts], system=system)
        context = self.shapes.llm.max_seq_len
        if len(ids) >= context:
            raise OptionError(f"the thinker's prompt has {len(ids)} tokens; its context is {context}: shorten it")
        positions, delta = rope_positions(position_blocks(ids, grid, 2.0),
                                          tokens_per_second=self.shapes.tokens_per_second)
        return ChatPrompt(ids, self.embed_prompt(ids, blocks), positions, delta)

    def answer(self, prompt: ChatPrompt, *, max_new_tokens: int, forced: list[int] | None = None,
               logits_out: list[Tensor] | None = None) -> Generation:
        """Greedy generation from ``prompt`` (or teacher-forced on ``forced``, for receipts; ``logits_out``
        gains each step's next-token logits)."""
        room = max(max_new_tokens, len(forced) + 1 if forced is not None else 0)
        ensure_cache(self.llm, len(prompt.token_ids) + room, self.shapes.llm.max_seq_len)
        return generate(PositionedLLM(self.llm, prompt.positions, prompt.delta), prompt.embeds,
                        max_new_tokens=max_new_tokens, eos_id=self.shapes.llm.eos_id, forced=forced,
                        logits_out=logits_out)

    def chat(self, tokenizer: QwenTokenizer, parts: list[tuple[str, str]], *, system: str = QWEN_OMNI_SYSTEM,
             picture: np.ndarray | None = None, waveform: np.ndarray | None = None, max_new_tokens: int = 128,
             timings: dict[str, float] | None = None) -> tuple[str, str]:
        """One greedy answer to the chat ``parts`` (:meth:`chat_prompt`) -> (text, why it stopped).
        ``timings`` gains the milliseconds of "prefill" and "decode_tokens"."""
        prompt = self.chat_prompt(tokenizer, parts, system=system, picture=picture, waveform=waveform)
        generation = self.answer(prompt, max_new_tokens=max_new_tokens)
        if timings is not None:
            timings["prefill"] = timings.get("prefill", 0.0) + generation.prefill_s * 1000
            timings["decode_tokens"] = timings.get("decode_tokens", 0.0) + generation.decode_s * 1000
        return tokenizer.decode(generation.token_ids, skip_special=True).strip(), generation.stopped_by


class QwenThinker(ThinkerChat, nn.Module):
    """The thinker without LoRA: audio tower, windowed ViT, Qwen2.5 text model (names as released with
    ``thinker.`` dropped and the text model under ``llm``); media go to the LM head's device and dtype."""

    def __init__(self, shapes: ThinkerShapes) -> None:
        super().__init__()
        self.shapes = shapes
        self.audio_tower = QwenAudioEncoder(shapes.audio)
        self.visual = QwenVisionEncoder(shapes.vision)
        self.llm = Llama(shapes.llm, LoRAConfig(targets=()))

    def encode_vision(self, patches: Tensor, grid_thw: tuple[int, int, int]) -> Tensor:
        """Patch rows [N, 1176] of one image or video -> its tokens [N / 4, D]."""
        weight = self.llm.lm_head.weight
        return self.visual(patches.to(weight.device, weight.dtype), grid_thw)

    def encode_audio(self, mel: Tensor) -> Tensor:
        """Log-mel [128, L] of one audio -> its tokens [n, D]."""
        weight = self.llm.lm_head.weight
        return self.audio_tower(mel.to(weight.device, weight.dtype))

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, Tensor]) -> Tensor:
        """Token ids, each placeholder once per row of its block -> embeddings [1, L, D], the blocks' rows in."""
        ids = torch.tensor(token_ids, device=self.llm.lm_head.weight.device)
        return fill_placeholders(self.llm.embed(ids), token_ids, blocks)


__all__ = ["ChatPrompt", "ENDOFTEXT_ID", "IM_END_ID", "PositionedLLM", "QWEN_VOCAB", "QwenThinker", "THINKER_PREFIX",
           "ThinkerChat", "ThinkerShapes", "hf_config", "position_blocks", "qwen_llm", "released_thinker_key",
           "thinker_shapes_from_hf"]
