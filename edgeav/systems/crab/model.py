"""The whole Crab: CLIP frames and BEATs audio through their Q-Former projectors into
LLaMA with the I-LoRA, and the mask decoder on the ``<mask_i>`` hidden states.

Each method is one arrow of the data flow (DESIGN.md), plain tensors in and out;
the runtime wires them.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeav.systems.crab.config import CrabConfig
from edgeav.models.audio import BeatsEncoder, BeatsEncoderConfig
from edgeav.generate import splice_blocks
from edgeav.systems.crab.features import Encoded, VisualFeatures
from edgeav.models.llama import Llama
from edgeav.models.qformer import QFormerProjector
from edgeav.systems.crab.seg import SegModule, patches_to_grid
from edgeav.models.vision import CLIPVisionTower


def visual_projector(cfg: CrabConfig) -> QFormerProjector:
    """Crab's ``vl_projector``: CLIP features -> visual tokens."""
    return QFormerProjector(cfg.vision.hidden_size, cfg.qformer, cfg.llm.hidden_size, prefix="visual")


def audio_projector(cfg: CrabConfig) -> QFormerProjector:
    """Crab's ``al_projector``: BEATs features -> audio tokens."""
    return QFormerProjector(cfg.audio.hidden_size, cfg.qformer, cfg.llm.hidden_size, prefix="audio")



class CrabModel(nn.Module):
    """Crab's reference model (the mask decoder's binary head; a variant swaps in the AVSS one)."""

    def __init__(self, config: CrabConfig, *, audio: BeatsEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = CLIPVisionTower(config.vision)
        self.audio = BeatsEncoder(audio or config.audio)
        self.visual_projector = visual_projector(config)
        self.audio_projector = audio_projector(config)
        self.llm = Llama(config.llm, config.lora)
        self.seg = SegModule(config)

    def encode_frames(self, pixels: torch.Tensor) -> VisualFeatures:
        """CLIP-normalised pixels [F, 3, 224, 224] -> LLM tokens and the two mask scales."""
        llm_layer, low, high = self.vision(pixels)
        return VisualFeatures(self.visual_projector(llm_layer), patches_to_grid(low), patches_to_grid(high))

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """Crab fbank [S, T, 128] -> audio tokens [S, Q, llm_hidden]."""
        return self.audio_projector(self.audio(fbank))

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        """Token ids with placeholder ids -> input embeddings [1, L, D].

        ``blocks`` maps a placeholder id to its feature rows [n, D]; each occurrence of
        the placeholder is replaced by those rows (the ``*_start``/``*_end`` tokens stay).
        """
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.llm.model.embed_tokens.weight.device)
        return splice_blocks(self.llm.embed(ids[None])[0], token_ids, blocks)

    def mask_logits(self, mask_hidden: torch.Tensor, frame: VisualFeatures) -> torch.Tensor:
        """The 6 ``<mask_i>`` hidden states [6, D] and the frame's CLIP scales -> logits [1, C, 224, 224]."""
        return self.seg(mask_hidden[None], frame.mask_low[:1], frame.mask_high[:1])


__all__ = ["CrabModel", "Encoded", "VisualFeatures", "audio_projector", "visual_projector"]
