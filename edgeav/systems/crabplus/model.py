"""Crab+'s wiring of shared components: the Qwen2.5-Omni thinker (audio tower, windowed ViT, Qwen2.5
LLM with M-RoPE) with the routed I-LoRA in all three towers, and SAM2.1 for masks.

Module names follow the thinker's on-disk names with the ``thinker.`` prefix dropped (``audio_tower``,
``visual``; the LLM's ``model.*`` and ``lm_head`` under ``llm``), so released weights load by prefix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeav.config import LoRAConfig
from edgeav.generate import fill_placeholders
from edgeav.models.ilora import wrap_ilora
from edgeav.models.llama import Llama
from edgeav.models.qwen_audio import QwenAudioEncoder
from edgeav.models.qwen_vision import QwenVisionEncoder
from edgeav.models.sam2 import Sam2, sam2_config
from edgeav.systems.crabplus.config import AUDIO_LORA_TARGETS, VISION_LORA_TARGETS, CrabPlusConfig

NO_LORA = LoRAConfig(targets=())


class CrabPlusModel(nn.Module):
    def __init__(self, config: CrabPlusConfig) -> None:
        super().__init__()
        self.config = config
        self.audio_tower = QwenAudioEncoder(config.audio)
        self.visual = QwenVisionEncoder(config.vision)
        self.llm = Llama(config.llm, NO_LORA)
        self.sam2 = Sam2(sam2_config(config.sam2))
        lora = config.lora
        kwargs = dict(rank=lora.rank, heads=lora.heads, scale=lora.scale)
        self.lora_layers = (wrap_ilora(self.llm.model, lora.targets, **kwargs)
                            + wrap_ilora(self.audio_tower, AUDIO_LORA_TARGETS, **kwargs)
                            + wrap_ilora(self.visual, VISION_LORA_TARGETS, **kwargs))

    def thinker_modules(self) -> dict[str, nn.Module]:
        """The thinker's parts by their on-disk prefix (``thinker.`` + key)."""
        return {"audio_tower.": self.audio_tower, "visual.": self.visual, "model.": self.llm.model,
                "lm_head.": self.llm.lm_head}

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: the thinker's own, the I-LoRA's, SAM2's (the spec's 8.93 B, 0.87 B, 224 M at 7B)."""
        lora = sum(p.numel() for name, p in self.named_parameters() if ".lora_" in name)
        sam2 = sum(p.numel() for p in self.sam2.parameters())
        return {"thinker": sum(p.numel() for p in self.parameters()) - lora - sam2, "I-LoRA": lora, "SAM2": sam2}

    def encode_audio(self, mel: Tensor) -> Tensor:
        """Log-mel [128, L] of one audio -> its tokens [n, D]."""
        return self.audio_tower(mel)

    def encode_vision(self, patches: Tensor, grid_thw: tuple[int, int, int]) -> Tensor:
        """Patch rows [N, 1176] of one image or video -> its tokens [N / 4, D]."""
        return self.visual(patches, grid_thw)

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, Tensor]) -> Tensor:
        """Token ids where each placeholder id stands repeated once per row of its block -> embeddings [1, L, D]
        with the placeholder rows replaced by the block's rows, in order."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.llm.model.embed_tokens.weight.device)
        return fill_placeholders(self.llm.embed(ids), token_ids, blocks)


__all__ = ["CrabPlusModel"]
