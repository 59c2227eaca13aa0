"""u-LLaVA's configuration (v1, the layout of the released ``jinxu95/ullava``; ULLAVA_SPEC.md):
the shared CLIP and LLaMA configs, the projector, the SAM and GroundingDINO presets, the added
tokens and the ``conv_sep2`` chat template; named presets.

``ullava-7b`` holds the released shapes (CLIP ViT-L/14 at 224, Vicuna-7B v1.1, SAM ViT-H,
GroundingDINO SwinT-OGC); ``ullava-tiny`` is the smallest useful random-weights model for tests.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from edgeav.config import LLMConfig, VisionConfig
from edgeav.errors import OptionError
from edgeav.tokenizer import AddedVocabulary

# v1's added tokens in id order after the 32000-piece base vocabulary (ULLAVA_SPEC section 4).
ADDED_TOKENS = (
    "[PAD]", "<image_patch>", "<video_patch>", "<img_beg>", "</img_end>", "<vid_beg>", "</vid_end>",
    "[SEG]", "[tag]", "[/tag]",
)
PROJECTOR_TYPES = ("mlp",)  # one Linear; the code's 'mlp2x' is refused (no released checkpoint uses it)
VIDEO_FRAMES = 8

SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions.")


def chat_prompt(instruction: str) -> str:
    """``conv_sep2`` with one user turn and the assistant's turn open, without the BOS text."""
    return f"{SYSTEM_PROMPT} USER: {instruction} ASSISTANT:"


IMAGE_BLOCK = "<img_beg><image_patch></img_end>"  # one <image_patch> stands for the image's rows (spliced in)
VIDEO_BLOCK = "<vid_beg><video_patch></vid_end>"


def prompt_ids(tokenizer, instruction: str, *, video: bool = False) -> list[int]:
    """The prompt's ids as u-LLaVA's scripts make them: the image block first with a newline, a video block
    appended to the message (ULLAVA_SPEC section 4); ``tokenizer(prompt).input_ids``, the BOS id added."""
    message = f"{instruction}{VIDEO_BLOCK}" if video else f"{IMAGE_BLOCK}\n{instruction}"
    return tokenizer.encode(chat_prompt(message), add_special_tokens=True)


# transformers adds u-LLaVA's tokens with add_tokens (not special) except the [PAD] pad token.
VOCABULARY = AddedVocabulary(tokens=ADDED_TOKENS, special=frozenset({"[PAD]"}), chat=chat_prompt)


@dataclass(frozen=True)
class UllavaConfig:
    """The whole model. ``vision.llm_layer`` is the CLIP hidden state the projector reads (``hidden_states[-2]``)."""

    name: str = "ullava-7b"
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(llm_layer=23, mask_layers=(23, 23)))
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(
        rms_norm_eps=1e-6, max_seq_len=2048, num_added_tokens=len(ADDED_TOKENS), pad_id=0))
    projector_type: str = "mlp"
    sam: str = "vit_h"  # edgeav.models.sam.SAM_PRESETS
    grounding: str = "swint_ogc"  # edgeav.models.grounding_dino presets
    grounding_size: tuple[int, int] = (800, 1333)  # GroundingDINO's resize: short side, longest side
    video_frames: int = VIDEO_FRAMES

    def __post_init__(self) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise OptionError(f"u-LLaVA projector_type {self.projector_type!r} is not supported; expected "
                              f"{' or '.join(PROJECTOR_TYPES)} (the released v1 weights use 'mlp')")
        if self.llm.num_added_tokens != len(ADDED_TOKENS):
            raise OptionError(f"u-LLaVA v1 adds {len(ADDED_TOKENS)} tokens, the config {self.llm.num_added_tokens}; "
                              "the v2 layout ([LOC]) is not supported")

    def token_id(self, token: str) -> int:
        return self.llm.base_vocab_size + ADDED_TOKENS.index(token)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UllavaConfig":
        parts = {"vision": VisionConfig, "llm": LLMConfig}
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = parts[key](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise OptionError(f"u-LLaVA model config: unknown field {key!r}")
        return cls(**kwargs)


PRESETS: dict[str, UllavaConfig] = {
    "ullava-7b": UllavaConfig(),
    # ULLAVA_SPEC section 10, with a 512-piece base vocabulary so a tokenizer trains in a second.
    "ullava-tiny": UllavaConfig(
        name="ullava-tiny",
        vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, num_layers=3, num_heads=2,
                            intermediate_size=64, llm_layer=2, mask_layers=(2, 2)),
        llm=LLMConfig(base_vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                      intermediate_size=128, rms_norm_eps=1e-6, max_seq_len=512, num_added_tokens=len(ADDED_TOKENS),
                      pad_id=0),
        sam="tiny",
        grounding="tiny",
        grounding_size=(224, 400),
    ),
}


def preset(name: str) -> UllavaConfig:
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"unknown u-LLaVA preset {name!r}; expected one of {', '.join(PRESETS)}.{hint}")
