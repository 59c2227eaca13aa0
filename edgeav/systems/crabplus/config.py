"""Crab+'s configuration (CRABPLUS_SPEC.md): the Qwen2.5-Omni thinker's three towers, the routed I-LoRA
and SAM2.1; named presets.

``crabplus-7b`` holds the released shapes (Qwen2.5-Omni-7B's thinker, I-LoRA r 128 on 3 heads,
SAM2.1 hiera-large); ``crabplus-small`` the same wiring at a CPU benchmarking scale;
``crabplus-tiny`` the smallest useful random-weights model (spec section 9), for tests.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import OptionError
from edgeav.models.qwen_audio import QwenAudioConfig
from edgeav.models.qwen_vision import QwenVisionConfig
from edgeav.qwen_thinker import qwen_llm

# I-LoRA's reach (spec section 2): PEFT's suffix match over each tower. The audio tower's out_proj, the
# ViT's attention and merger and the LM head are not matched.
LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUDIO_LORA_TARGETS = ("q_proj", "k_proj", "v_proj")
VISION_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class CrabPlusConfig:
    """The whole model.

    ``video_fps``: the frame rate M-RoPE assumes for video positions; the authors' vendored processor
    defaults it to 1.0, so one temporal slice (2 frames) spans 2 s and advances t by 50 (spec section 2).
    """

    name: str = "crabplus-7b"
    audio: QwenAudioConfig = field(default_factory=QwenAudioConfig)
    vision: QwenVisionConfig = field(default_factory=QwenVisionConfig)
    llm: LLMConfig = field(default_factory=lambda: qwen_llm(
        hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944, max_seq_len=32768))
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=128, alpha=256.0, heads=3,
                                                                 targets=LLM_LORA_TARGETS))
    sam2: str = "sam2.1_hiera_large"  # edgeav.models.sam2.SAM2_PRESETS
    tokens_per_second: int = 25
    video_fps: float = 1.0

    @property
    def seconds_per_slice(self) -> float:
        return self.vision.temporal_patch_size / self.video_fps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CrabPlusConfig":
        parts = {"audio": QwenAudioConfig, "vision": QwenVisionConfig, "llm": LLMConfig, "lora": LoRAConfig}
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                known = {f.name for f in dataclasses.fields(parts[key])}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise OptionError(f"Crab+ model config: unknown field {key}.{unknown[0]}")
                kwargs[key] = parts[key](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise OptionError(f"Crab+ model config: unknown field {key!r}")
        return cls(**kwargs)


PRESETS: dict[str, CrabPlusConfig] = {
    "crabplus-7b": CrabPlusConfig(),
    # A few hundred million parameters (half of them the 152k-row embedding and head): CPU benchmarking.
    "crabplus-small": CrabPlusConfig(
        name="crabplus-small",
        audio=QwenAudioConfig(d_model=384, encoder_layers=6, encoder_attention_heads=6, encoder_ffn_dim=1536,
                              output_dim=512),
        vision=QwenVisionConfig(depth=8, hidden_size=384, num_heads=6, intermediate_size=1024,
                                fullatt_block_indexes=(3, 7), out_hidden_size=512),
        llm=qwen_llm(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                      mrope_section=(8, 12, 12), max_seq_len=4096),
        lora=LoRAConfig(rank=16, alpha=32.0, heads=3, targets=LLM_LORA_TARGETS),
        sam2="tiny",
    ),
    # Spec section 9: every tower at test size, Qwen's real vocabulary (the special ids sit near its end).
    "crabplus-tiny": CrabPlusConfig(
        name="crabplus-tiny",
        audio=QwenAudioConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                              output_dim=64),
        vision=QwenVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64,
                                fullatt_block_indexes=(1,), out_hidden_size=64),
        llm=qwen_llm(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                      mrope_section=(2, 3, 3), max_seq_len=2048),
        lora=LoRAConfig(rank=4, alpha=8.0, heads=3, targets=LLM_LORA_TARGETS),
        sam2="tiny",
    ),
}


def preset(name: str) -> CrabPlusConfig:
    """The named preset; an unknown name gets the list and the closest match."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown Crab+ preset {name!r}; expected one of {', '.join(PRESETS)}.{hint}")
