"""OpenAVS's components in one module: Pengi, GroundingDINO, SAM, and the optional SAM2, fine-tuned BEATs
(the ``edge`` variant's AudioSet classifier) and Qwen2.5-Omni thinker (image and audio describer, local
translator). Each keeps its own released parameter names under its attribute, so a converted checkpoint
is one safetensors file keyed ``pengi.*``, ``grounding.*``, ``sam.*``, ``sam2.*``, ``beats.*``, ``thinker.*``.
"""

from __future__ import annotations

from torch import nn

from edgeav.models.audio import BeatsEncoder
from edgeav.models.grounding_dino import GroundingDINO, GroundingDINOConfig
from edgeav.models.pengi import Pengi, pengi_preset
from edgeav.models.sam import Sam, sam_config
from edgeav.models.sam2 import Sam2, sam2_config
from edgeav.qwen_thinker import QwenThinker
from edgeav.systems.openavs.config import OpenAVSConfig


class OpenAVSModel(nn.Module):
    def __init__(self, config: OpenAVSConfig) -> None:
        super().__init__()
        self.config = config
        self.pengi = Pengi(pengi_preset(config.pengi))
        self.grounding = GroundingDINO(GroundingDINOConfig.from_preset(config.grounding))
        self.sam = Sam(sam_config(config.sam))
        self.sam2 = Sam2(sam2_config(config.sam2)) if config.sam2 is not None else None
        self.beats = BeatsEncoder(config.beats, classes=config.beats_classes) if config.beats is not None else None
        self.thinker = QwenThinker(config.thinker) if config.thinker is not None else None

    def parts(self) -> dict[str, nn.Module]:
        """The components this model holds, by attribute name."""
        return {name: module for name, module in self.named_children() if module is not None}

    def parameter_counts(self) -> dict[str, int]:
        return {name: sum(p.numel() for p in module.parameters()) for name, module in self.parts().items()}


__all__ = ["OpenAVSModel"]
