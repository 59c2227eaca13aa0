"""Crab's configuration: :class:`CrabConfig` ties the shared component configs together
with Crab's own mask decoder (:class:`SegConfig`); named presets.

``crab-7b`` holds the shapes of the released Crab (CRAB_SPEC section 2).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from edgeav.config import AudioConfig, LLMConfig, LoRAConfig, QFormerConfig, VisionConfig
from edgeav.errors import OptionError
from edgeav.tokenizer import AddedVocabulary

# Crab's added tokens, in id order after the base vocabulary (CRAB_SPEC section 2).
ADDED_TOKENS = (
    "<image>", "<image_start>", "<image_end>",
    "<video>", "<video_start>", "<video_end>",
    "<audio>", "<audio_start>", "<audio_end>",
    "<mask_start>", "<mask_end>",
    "<mask_0>", "<mask_1>", "<mask_2>", "<mask_3>", "<mask_4>", "<mask_5>",
)


SYSTEM_PROMPT = "You are a helpful assistant."


def chat_prompt(instruction: str, system: str = SYSTEM_PROMPT) -> str:
    """The Llama-2 chat prompt without the BOS text (:meth:`Tokenizer.encode_chat` adds it).

    As the Llama-2 chat template renders one system and one user message: the
    system block and the instruction are joined, then stripped of outer whitespace.
    """
    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{instruction}"
    return f"[INST] {content.strip()} [/INST]"


# Crab's add_tokens: the first 11 as special tokens, <mask_0..5> as ordinary ones.
VOCABULARY = AddedVocabulary(tokens=ADDED_TOKENS, special=frozenset(ADDED_TOKENS[:11]), chat=chat_prompt)


@dataclass(frozen=True)
class SegConfig:
    """Crab's SegModule: SAM-style mask decoder over two CLIP scales."""

    prompt_dim: int = 256
    num_scales: int = 2
    tokens_per_scale: int = 3
    num_queries: int = 300
    low_res: int = 112
    out_res: int = 224
    transformer_depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    attention_downsample: int = 2
    query_generator_layers: int = 2
    query_ffn_dim: int = 2048
    hyper_dim: int = 32
    avss_classes: int = 71

    @property
    def num_mask_tokens(self) -> int:
        return self.num_scales * self.tokens_per_scale


@dataclass(frozen=True)
class CrabConfig:
    """The whole model."""

    name: str = "crab-7b"
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seg: SegConfig = field(default_factory=SegConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CrabConfig":
        """Inverse of :meth:`to_dict` (lists from JSON become tuples)."""
        kwargs = {}
        for key, value in data.items():
            if key == "name":
                kwargs[key] = value
            elif key in _PART_CLASSES:
                kwargs[key] = _PART_CLASSES[key](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            else:
                raise OptionError(f"model config: unknown field {key!r}; expected name, {', '.join(_PART_CLASSES)}")
        return cls(**kwargs)


_PART_CLASSES = {
    "vision": VisionConfig,
    "audio": AudioConfig,
    "qformer": QFormerConfig,
    "llm": LLMConfig,
    "lora": LoRAConfig,
    "seg": SegConfig,
}

PRESETS: dict[str, CrabConfig] = {
    "crab-7b": CrabConfig(),
    # About 100 M parameters: a CPU benchmarking scale with Crab's wiring.
    "crab-small": CrabConfig(
        name="crab-small",
        vision=VisionConfig(hidden_size=384, num_layers=8, num_heads=6, intermediate_size=1536, llm_layer=7, mask_layers=(4, 6)),
        audio=AudioConfig(patch_embed_dim=256, hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536,
                          conv_pos=64, num_buckets=160, max_distance=400),
        qformer=QFormerConfig(hidden_size=384, num_heads=6, intermediate_size=1536),
        llm=LLMConfig(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1408, max_seq_len=2048),
        seg=SegConfig(prompt_dim=128, num_queries=100, mlp_dim=512, query_ffn_dim=512),
    ),
    # A few million parameters with a small vocabulary: tests and the demo model.
    "crab-tiny": CrabConfig(
        name="crab-tiny",
        # 28-px patches (an 8x8 grid): a quarter of ViT-L/14's tokens, so it trains on a CPU.
        vision=VisionConfig(patch_size=28, hidden_size=96, num_layers=4, num_heads=4, intermediate_size=256,
                            llm_layer=3, mask_layers=(1, 2)),
        audio=AudioConfig(patch_embed_dim=64, hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256,
                          conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64),
        qformer=QFormerConfig(hidden_size=96, num_layers=2, num_heads=4, intermediate_size=256, num_queries=8),
        llm=LLMConfig(base_vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                      intermediate_size=344, max_seq_len=1024),
        lora=LoRAConfig(rank=4, alpha=8.0),
        seg=SegConfig(prompt_dim=32, num_queries=16, transformer_depth=2, num_heads=4, mlp_dim=64,
                      query_ffn_dim=64, hyper_dim=8),
    ),
}


# crab-small's encoders around a LLaMA of about 1 B parameters (hidden 2048, 16 layers, head dim 128): large
# enough that a CPU's decode is bound by weight reads, as the released 7 B's is.
PRESETS["crab-1b"] = dataclasses.replace(
    PRESETS["crab-small"], name="crab-1b",
    llm=LLMConfig(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16, intermediate_size=5632,
                  max_seq_len=2048))


def preset(name: str) -> CrabConfig:
    """The named preset; an unknown name gets the list and the closest match."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}.{hint}")
