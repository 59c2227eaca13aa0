"""GroundingDINO front ends: the image resize/normalise and the caption tokenizer.

Image: shorter side to 800 unless the longer side would pass 1333, sizes
rounded as the release's ``RandomResize([800], max_size=1333)`` rounds them,
PIL bilinear on uint8, /255, ImageNet mean/std.

Caption: lower-cased, stripped, ending with "." ("cat . red dog ."); BERT
uncased WordPiece from a ``vocab.txt`` through the ``tokenizers`` library,
``[CLS] ... [SEP]``, cut to ``max_text_len`` tokens as the release cuts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgeav.errors import CheckpointError, MediaError, OptionError

__all__ = ["CaptionTokens", "GroundingPixels", "GroundingTokenizer", "PhraseSpan", "grounding_dino_pixels",
           "prepare_caption", "resized_size"]

SHORT_SIDE = 800
MAX_SIZE = 1333
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DELIMITERS = ("[CLS]", "[SEP]", ".", "?")  # tokens that end a phrase for GroundingDINO's text encoder


def resized_size(height: int, width: int, short_side: int = SHORT_SIDE,
                 max_size: int | None = MAX_SIZE) -> tuple[int, int]:
    """(height, width) after the release's resize; may pass ``max_size`` by a pixel or two, as the release does."""
    if height < 1 or width < 1:
        raise MediaError(f"GroundingDINO image of size {height}x{width} is empty: pass an image with pixels.")
    if short_side < 1 or (max_size is not None and max_size < 1):
        raise OptionError(f"GroundingDINO resize short_side={short_side}, max_size={max_size}: "
                          "pass positive sizes.")
    size = short_side
    if max_size is not None:
        shorter, longer = float(min(height, width)), float(max(height, width))
        if longer / shorter * size > max_size:
            size = int(round(max_size * shorter / longer))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class GroundingPixels(NamedTuple):
    pixel_values: np.ndarray  # float32 [1, 3, h, w], ImageNet-normalised
    pixel_mask: np.ndarray  # int64 [1, h, w], all ones (one image, no padding)
    image_size: tuple[int, int]  # (height, width) of the original image, for boxes in its pixels


def grounding_dino_pixels(image: np.ndarray, short_side: int = SHORT_SIDE,
                          max_size: int | None = MAX_SIZE) -> GroundingPixels:
    """uint8 RGB [H, W, 3] -> the model's pixels and mask."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise MediaError(f"GroundingDINO expects a uint8 RGB image [H, W, 3], got dtype={image.dtype} "
                         f"shape={tuple(image.shape)}: decode the image to RGB bytes first.")
    height, width = image.shape[:2]
    new_h, new_w = resized_size(height, width, short_side, max_size)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR))
    pixels = (resized.astype(np.float32) / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    return GroundingPixels(np.ascontiguousarray(pixels.transpose(2, 0, 1)[None]),
                           np.ones((1, new_h, new_w), dtype=np.int64), (height, width))


def prepare_caption(text: str) -> str:
    """The release's caption form: lower case, stripped, ending with "."."""
    caption = text.lower().strip()
    return caption if caption.endswith(".") else caption + "."


class CaptionTokens(NamedTuple):
    caption: str  # the prepared caption the ids encode
    input_ids: np.ndarray  # int64 [1, L]
    attention_mask: np.ndarray  # int64 [1, L], ones
    token_type_ids: np.ndarray  # int64 [1, L], zeros


class PhraseSpan(NamedTuple):
    phrase: str  # the caption text of the phrase
    start: int  # first token index (0 is [CLS])
    end: int  # one past the last token of the phrase, i.e. the index of its closing delimiter


class GroundingTokenizer:
    """BERT uncased WordPiece over a ``vocab.txt`` (one token a line, the line number is the id)."""

    def __init__(self, vocab_path: str | Path, max_text_len: int = 256):
        vocab_path = Path(vocab_path)
        if not vocab_path.is_file():
            raise CheckpointError(f"GroundingDINO vocabulary {vocab_path} does not exist: pass the "
                                  "bert-base-uncased vocab.txt.")
        tokens = vocab_path.read_text(encoding="utf-8").splitlines()
        self._init(tokens, max_text_len, str(vocab_path))

    @classmethod
    def from_tokens(cls, tokens: list[str], max_text_len: int = 256) -> "GroundingTokenizer":
        """A tokenizer over ``tokens`` (the id is the index), as a ``vocab.txt`` of those lines gives."""
        tokenizer = cls.__new__(cls)
        tokenizer._init(list(tokens), max_text_len, "the vocabulary given")
        return tokenizer

    def _init(self, tokens: list[str], max_text_len: int, source: str) -> None:
        from tokenizers.implementations import BertWordPieceTokenizer

        if max_text_len < 2:
            raise OptionError(f"max_text_len={max_text_len} leaves no room for [CLS] and [SEP]: pass >= 2.")
        self.max_text_len = max_text_len
        self._tokens = tokens
        self._tokenizer = BertWordPieceTokenizer({token: i for i, token in enumerate(tokens)}, lowercase=True)
        ids = [self._tokenizer.token_to_id(token) for token in DELIMITERS]
        missing = [token for token, i in zip(DELIMITERS, ids) if i is None]
        if missing or self._tokenizer.token_to_id("[UNK]") is None:
            raise CheckpointError(f"GroundingDINO vocabulary {source} lacks {missing or ['[UNK]']}: "
                                  "pass the bert-base-uncased vocab.txt.")
        self.special_token_ids: tuple[int, ...] = tuple(ids)  # [CLS], [SEP], ".", "?"

    def encode(self, text: str) -> CaptionTokens:
        caption = prepare_caption(text)
        ids = self._tokenizer.encode(caption).ids[:self.max_text_len]
        input_ids = np.array([ids], dtype=np.int64)
        return CaptionTokens(caption, input_ids, np.ones_like(input_ids), np.zeros_like(input_ids))

    def phrase_spans(self, text: str) -> list[PhraseSpan]:
        """Each "."-separated phrase of the prepared caption with its token range (within max_text_len)."""
        caption = prepare_caption(text)
        encoding = self._tokenizer.encode(caption)
        ids, offsets = encoding.ids[:self.max_text_len], encoding.offsets
        spans, start = [], None
        for index, token_id in enumerate(ids):
            if token_id in self.special_token_ids:
                if start is not None:
                    spans.append(PhraseSpan(caption[offsets[start][0]:offsets[index - 1][1]], start, index))
                start = None
            elif start is None:
                start = index
        return spans

    def vocabulary(self) -> list[str]:
        """The tokens by id (the lines of ``vocab.txt``)."""
        return list(self._tokens)

    def decode(self, ids) -> str:
        """Token ids -> text, word pieces joined, special tokens kept (as the release's phrase decoding)."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
