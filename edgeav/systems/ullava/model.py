"""u-LLaVA's wiring of shared components: CLIP -> one Linear -> Vicuna (LLaMA), the ``[SEG]`` state ->
``text_hidden_fcs`` -> SAM's prompt encoder and mask decoder over SAM's own image embedding.

Module names are the released checkpoint's (``vision_encoder``, ``vision_projector``, ``llm``,
``visual_model``, ``text_hidden_fcs``) so the converted layout reads like the original.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgeav.config import LoRAConfig
from edgeav.models.llama import Llama
from edgeav.models.sam import Sam, sam_config
from edgeav.models.vision import CLIPVisionTower
from edgeav.generate import splice_blocks
from edgeav.systems.ullava.config import UllavaConfig

NO_LORA = LoRAConfig(targets=())  # the released model is a full fine-tune


class UllavaModel(nn.Module):
    def __init__(self, config: UllavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_encoder = CLIPVisionTower(config.vision, indexes=(config.vision.llm_layer,))
        self.vision_projector = nn.Linear(config.vision.hidden_size, config.llm.hidden_size)
        self.llm = Llama(config.llm, NO_LORA)
        self.visual_model = Sam(sam_config(config.sam))
        hidden, prompt = config.llm.hidden_size, self.visual_model.config.prompt_embed_dim
        # Dropout(0) at index 3 in the original: no weights, nothing at inference.
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, prompt))

    def encode_image(self, pixels: Tensor) -> Tensor:
        """CLIP pixels [1, 3, S, S] -> visual tokens [P, D] (P = 256 at 224 px)."""
        (patches,) = self.vision_encoder(pixels)
        return self.vision_projector(patches[0])

    def encode_video(self, pixels: Tensor) -> Tensor:
        """CLIP pixels of T frames [T, 3, S, S] -> [T + P, D]: per-frame means first, then per-patch means."""
        (patches,) = self.vision_encoder(pixels)
        pooled = torch.cat([patches.mean(dim=1), patches.mean(dim=0)], dim=0)
        return self.vision_projector(pooled)

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, Tensor]) -> Tensor:
        """Token ids with one placeholder id per visual block -> input embeddings [1, L, D] (the block's rows
        replace the placeholder; the begin and end tokens around it stay)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.llm.model.embed_tokens.weight.device)
        return splice_blocks(self.llm.embed(ids[None])[0], token_ids, blocks)

    def encode_sam(self, pixels: Tensor) -> Tensor:
        """SAM pixels [1, 3, 1024, 1024] -> the image embedding [1, 256, 64, 64]."""
        return self.visual_model.encode_image(pixels)

    def mask_logits(self, seg_hidden: Tensor, image_embedding: Tensor, input_size: tuple[int, int],
                    original_size: tuple[int, int]) -> Tensor:
        """The states that produced each ``[SEG]`` [N, D] -> mask logits [N, H, W] at the source's size."""
        prompt = self.text_hidden_fcs(seg_hidden)[:, None, :]
        sparse, dense = self.visual_model.prompt_embeddings(sparse=prompt)
        low_res, _ = self.visual_model.decode_masks(image_embedding, sparse, dense, multimask_output=False)
        return self.visual_model.postprocess_masks(low_res, input_size, original_size)[:, 0]
