"""OpenAVS's configuration (OPENAVS_SPEC.md): which describers, detector and segmenters a model holds, at
which sizes; named presets.

``openavs`` holds the paper's component sizes (Pengi base, Qwen2.5-Omni-7B's thinker, GroundingDINO
SwinT-OGC, SAM ViT-H, SAM2.1 hiera-large, and the fine-tuned BEATs of the ``edge`` variant);
``openavs-small`` the same wiring at a size a CPU benchmark can run; ``openavs-tiny`` every component
at test size.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from edgeav.config import AudioConfig, LLMConfig
from edgeav.errors import OptionError
from edgeav.models.qwen_audio import QwenAudioConfig
from edgeav.models.qwen_vision import QwenVisionConfig
from edgeav.qwen_thinker import ThinkerShapes, qwen_llm

AUDIOSET_CLASSES = 527


@dataclass(frozen=True)
class OpenAVSConfig:
    """The whole cascade. ``thinker`` (Qwen2.5-Omni as image and audio describer and local translator),
    ``beats`` (the ``edge`` variant's AudioSet classifier) and ``sam2`` are optional: None builds none."""

    name: str = "openavs"
    pengi: str = "pengi-base"  # edgeav.models.pengi presets
    grounding: str = "swint_ogc"  # edgeav.models.grounding_dino presets
    grounding_size: tuple[int, int] = (800, 1333)  # GroundingDINO's resize: short side, longest side
    sam: str = "vit_h"  # edgeav.models.sam.SAM_PRESETS
    sam2: str | None = "sam2.1_hiera_large"  # edgeav.models.sam2.SAM2_PRESETS
    beats: AudioConfig | None = field(default_factory=AudioConfig)
    beats_classes: int = AUDIOSET_CLASSES
    thinker: ThinkerShapes | None = field(default_factory=ThinkerShapes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "OpenAVSConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"OpenAVS model config: unknown field {unknown[0]!r}")
        kwargs = dict(data)
        if kwargs.get("beats") is not None:
            kwargs["beats"] = _fields(AudioConfig, kwargs["beats"], "beats")
        if kwargs.get("thinker") is not None:
            parts = {"audio": QwenAudioConfig, "vision": QwenVisionConfig, "llm": LLMConfig}
            thinker = dict(kwargs["thinker"])
            for key, kind in parts.items():
                thinker[key] = _fields(kind, thinker.get(key, {}), f"thinker.{key}")
            kwargs["thinker"] = ThinkerShapes(**thinker)
        if "grounding_size" in kwargs:
            kwargs["grounding_size"] = tuple(kwargs["grounding_size"])
        return cls(**kwargs)


def _fields(kind, values: dict, where: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionError(f"OpenAVS model config: unknown field {where}.{unknown[0]}")
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


_SMALL_THINKER = ThinkerShapes(
    audio=QwenAudioConfig(d_model=384, encoder_layers=6, encoder_attention_heads=6, encoder_ffn_dim=1536,
                          output_dim=512),
    vision=QwenVisionConfig(depth=8, hidden_size=384, num_heads=6, intermediate_size=1024,
                            fullatt_block_indexes=(3, 7), out_hidden_size=512),
    llm=qwen_llm(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408,
                 mrope_section=(8, 12, 12), max_seq_len=4096))

_TINY_THINKER = ThinkerShapes(
    audio=QwenAudioConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64),
    vision=QwenVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, fullatt_block_indexes=(1,),
                            out_hidden_size=64),
    llm=qwen_llm(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 mrope_section=(2, 3, 3), max_seq_len=2048))

_TINY_BEATS = AudioConfig(patch_embed_dim=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=64)

PRESETS: dict[str, OpenAVSConfig] = {
    "openavs": OpenAVSConfig(),
    # Real Pengi and BEATs, the detector and segmenter at their smallest released sizes' shapes, a thinker of
    # a few hundred million parameters: a CPU can run every variant frame by frame.
    "openavs-small": OpenAVSConfig(name="openavs-small", grounding_size=(480, 800), sam="vit_b",
                                   sam2="sam2.1_hiera_tiny", thinker=_SMALL_THINKER),
    # Every component at test size (OPENAVS_SPEC section 9).
    "openavs-tiny": OpenAVSConfig(name="openavs-tiny", pengi="tiny", grounding="tiny", grounding_size=(224, 400),
                                  sam="tiny", sam2="tiny", beats=_TINY_BEATS, thinker=_TINY_THINKER),
}


def preset(name: str) -> OpenAVSConfig:
    """The named preset; an unknown name gets the list and the closest match."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown OpenAVS preset {name!r}; expected one of {', '.join(PRESETS)}.{hint}")


__all__ = ["AUDIOSET_CLASSES", "OpenAVSConfig", "PRESETS", "preset"]
