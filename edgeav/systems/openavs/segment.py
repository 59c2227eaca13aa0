"""OpenAVS's last stage (OPENAVS_SPEC section 2, "GroundingDINO" and "SAM and SAM2"): a caption of object
names -> GroundingDINO's boxes above the box threshold -> one SAM (or SAM2) mask per box; the pipeline
takes their union as the frame's mask (no box: an empty mask).

SAM as its predictor runs a box: longest side resized to its input, padded, the box's two corners as the
prompt, one mask, logits upsampled to the frame, ``> 0``. SAM2 as its image predictor: the frame resized to
its square input without keeping the aspect, the box corners (labels 2, 3) and a padding point, the
dynamic single-mask choice, logits upsampled to the frame, ``> 0``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.models.grounding_dino import GroundingDINO, detect
from edgeav.models.sam import Sam
from edgeav.models.sam2 import Sam2
from edgeav.preprocess.grounding_dino import GroundingTokenizer, grounding_dino_pixels
from edgeav.preprocess.sam import sam_coords, sam_pixels
from edgeav.preprocess.sam2 import sam2_pixels, sam2_prompt
from edgeav.results import Detection

# The paper's box threshold (chosen from a 0.25-0.35 sweep); the text threshold of Grounded-SAM's demos.
BOX_THRESHOLD = 0.25
TEXT_THRESHOLD = 0.25
MASK_BATCH = 16  # boxes SAM decodes at once (a random-weight detector can pass hundreds of its 900 queries)


def inside(box, width: int, height: int) -> tuple[float, float, float, float]:
    """A box cut to the picture (GroundingDINO's may reach past its edges)."""
    x1, y1, x2, y2 = box
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width),
            min(max(y2, 0.0), height))


class BoxSegmenter:
    """GroundingDINO then SAM or SAM2, on one device; GroundingDINO runs in fp32 whatever the dtype. Each part
    is the reference's module or an engine's stand-in for it (the same calls, and ``parameters()`` giving
    the device and dtype its inputs go to)."""

    def __init__(self, grounding: GroundingDINO, tokenizer: GroundingTokenizer, grounding_size: tuple[int, int],
                 *, sam: Sam | None = None, sam2: Sam2 | None = None, box_threshold: float = BOX_THRESHOLD,
                 text_threshold: float = TEXT_THRESHOLD) -> None:
        if (sam is None) == (sam2 is None):
            raise ValueError("BoxSegmenter: give exactly one of sam and sam2")
        self.grounding, self.tokenizer, self.grounding_size = grounding, tokenizer, grounding_size
        self.sam, self.sam2 = sam, sam2
        self.box_threshold, self.text_threshold = box_threshold, text_threshold

    def boxes(self, picture: np.ndarray, caption: str) -> list[Detection]:
        """GroundingDINO's boxes for ``caption`` (pixels of ``picture``, cut to it), in query order."""
        device = next(self.grounding.parameters()).device
        short, longest = self.grounding_size
        pixels = grounding_dino_pixels(picture, short, longest)
        tokens = self.tokenizer.encode(caption)
        tensors = [torch.from_numpy(a).to(device) for a in (pixels.pixel_values, pixels.pixel_mask,
                   tokens.input_ids, tokens.attention_mask, tokens.token_type_ids)]
        logits, boxes = self.grounding(*tensors)
        height, width = picture.shape[:2]
        found = detect(logits, boxes, tokens.input_ids, pixels.image_size, self.tokenizer.decode,
                       box_threshold=self.box_threshold, text_threshold=self.text_threshold)
        return [Detection(inside(f.box_xyxy, width, height), f.score,
                          " ".join(w for w in f.phrase.split() if w not in ("[CLS]", "[SEP]")))
                for f in found]

    def masks(self, picture: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """One bool mask [N, H, W] per box, at the picture's size."""
        height, width = picture.shape[:2]
        if not boxes:
            return np.zeros((0, height, width), bool)
        model = self.sam if self.sam is not None else self.sam2
        weight = next(model.parameters())
        device, dtype = weight.device, weight.dtype
        if self.sam is not None:
            pixels, resized = sam_pixels(picture, self.sam.config.img_size)
            embedding = self.sam.encode_image(torch.from_numpy(pixels).to(device, dtype))
            prompts = torch.from_numpy(sam_coords(np.asarray(boxes, np.float64), (height, width),
                                                  self.sam.config.img_size)).to(device, dtype)
            masks = []
            for start in range(0, len(boxes), MASK_BATCH):  # boxes a batch at a time: memory stays bounded
                sparse, dense = self.sam.prompt_embeddings(boxes=prompts[start:start + MASK_BATCH])
                logits, _ = self.sam.decode_masks(embedding, sparse, dense, multimask_output=False)
                masks.append((self.sam.postprocess_masks(logits, resized, (height, width))[:, 0] > 0).cpu().numpy())
            return np.concatenate(masks)
        size = self.sam2.config.image_size
        features = self.sam2.image_features(sam2_pixels(picture, pre_size=None, resolution=size).to(device, dtype))
        masks = []
        for box in boxes:
            points, labels = sam2_prompt(box, [], space=(height, width), resolution=size)
            logits, _, _ = self.sam2.predict(features, points.to(device, dtype), labels.to(device))
            at_frame = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
            masks.append((at_frame[0, 0] > 0).cpu().numpy())
        return np.stack(masks)


__all__ = ["BOX_THRESHOLD", "BoxSegmenter", "TEXT_THRESHOLD", "inside"]
