"""Model configuration: one dataclass per component, one :class:`CrabConfig` tying
them together, and named presets.

Every size lives here; model code reads it from the config and hard-codes
none. ``crab-7b`` holds the shapes of the released Crab (CRAB_SPEC section 2).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from edgeav.errors import OptionError

# Crab's added tokens, in id order after the base vocabulary (CRAB_SPEC section 2).
ADDED_TOKENS = (
    "<image>", "<image_start>", "<image_end>",
    "<video>", "<video_start>", "<video_end>",
    "<audio>", "<audio_start>", "<audio_end>",
    "<mask_start>", "<mask_end>",
    "<mask_0>", "<mask_1>", "<mask_2>", "<mask_3>", "<mask_4>", "<mask_5>",
)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT vision tower (pre-LN, quick-GELU, CLS token dropped from outputs)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    # Hidden-state indexes as in Hugging Face ``hidden_states`` (0 = embeddings after pre-LN).
    llm_layer: int = 23
    mask_layers: tuple[int, int] = (14, 22)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass(frozen=True)
class AudioConfig:
    """BEATs audio encoder; the released checkpoint carries its own ``cfg`` and overrides this."""

    mel_bins: int = 128
    patch_size: int = 16
    patch_embed_dim: int = 512
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    deep_norm: bool = True
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class QFormerConfig:
    """BLIP-2 style Q-Former (BERT-base shaped) plus the MLP into the LLM width."""

    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    num_queries: int = 32
    layer_norm_eps: float = 1e-12
    cross_attention_freq: int = 1


@dataclass(frozen=True)
class LoRAConfig:
    """Interaction-aware LoRA: one shared A, ``heads`` B matrices, a per-token router."""

    rank: int = 8
    alpha: float = 16.0
    heads: int = 3
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LLMConfig:
    """LLaMA-2 decoder. ``vocab_size`` = base vocabulary + Crab's 17 added tokens."""

    base_vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 2

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(ADDED_TOKENS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def token_id(self, token: str) -> int:
        """Id of one of Crab's added tokens."""
        return self.base_vocab_size + ADDED_TOKENS.index(token)


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


def preset(name: str) -> CrabConfig:
    """The named preset; an unknown name gets the list and the closest match."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}.{hint}")
