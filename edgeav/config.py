"""Component configurations shared by the systems: one frozen dataclass per reusable
component (CLIP vision tower, BEATs, Q-Former, LLaMA-family LLM, routed LoRA).

Every size lives in a config; model code hard-codes none. Each system's own config
ties these together with its presets (``edgeav/systems/NAME/config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """LLaMA-family decoder (LLaMA-2, Vicuna, Qwen2.5). ``vocab_size`` = base vocabulary + the system's added tokens.

    ``bos_id``, ``eos_id``, ``pad_id``: the ids the checkpoint's config names. A SentencePiece tokenizer
    must give its BOS and EOS tokens these ids; generation stops at ``eos_id``; written Hugging Face
    configs carry them. Whether a BOS is prepended is the tokenizer's setting, not the model's: Qwen2.5
    prepends none, so its ``bos_id`` is only the id its config names.
    """

    base_vocab_size: int = 32000
    # Crab's 17 by default: configs written before systems other than Crab existed lack the field.
    num_added_tokens: int = 17
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
    # Qwen2: q, k and v projections carry a bias; o_proj and the MLP do not.
    attention_bias: bool = False
    # M-RoPE (Qwen2.5-Omni: (16, 24, 24)): how many frequency pairs the temporal, height and width position
    # streams own, in that order, summing to head_dim // 2. None: plain RoPE over one position stream.
    mrope_section: tuple[int, int, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.num_added_tokens

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
