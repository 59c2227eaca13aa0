"""M-RoPE position ids of a Qwen2.5-Omni prompt (CRABPLUS_SPEC section 2, "LLM"), without a tokenizer.

Every prompt token carries three positions, temporal, height and width. A prompt is described, in
order, as blocks: runs of text (special tokens such as ``<|vision_bos|>`` and ``<|audio_eos|>``
included), image and video token grids, and audio runs. Each block starts at ``s`` = the previous
block's largest position + 1 (0 for the first):

- text and audio: token ``k`` sits at ``s + k`` on all three streams (plain 1-D positions);
- an image grid: row ``r``, column ``c`` at (``s``, ``s + r``, ``s + c``);
- a video grid: temporal slice ``i`` adds ``int(i * seconds_per_slice * tokens_per_second)`` to the
  temporal stream, so time advances by real seconds rather than by slices.

Grids are the merged token grids the vision encoder emits (after its 2x2 merge), tokens in slice-major,
then row-major order. Decoding continues every stream at ``cache position + delta`` with
``delta = max position + 1 - prompt length`` (negative when vision grids pack many tokens into few
positions), computed once at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from edgeav.errors import OptionError

__all__ = ["AudioRun", "ImageGrid", "PromptBlock", "TextRun", "VideoGrid", "TOKENS_PER_SECOND", "rope_positions"]

# Qwen2.5-Omni's temporal positions per second of video (thinker config ``position_id_per_seconds``).
TOKENS_PER_SECOND = 25


@dataclass(frozen=True)
class TextRun:
    """``length`` text tokens, special tokens included; zero is allowed (an empty instruction)."""

    length: int

    @property
    def tokens(self) -> int:
        return self.length


@dataclass(frozen=True)
class AudioRun:
    """The ``length`` tokens of one audio (25 per second): positions advance as text's do."""

    length: int

    @property
    def tokens(self) -> int:
        return self.length


@dataclass(frozen=True)
class ImageGrid:
    """One image's merged token grid, ``height`` x ``width`` (64 tokens = 8 x 8 for a 224-px image); the
    temporal position stays at the block start."""

    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class VideoGrid:
    """One video's merged token grid: ``slices`` temporal slices (two frames each) of ``height`` x
    ``width`` tokens; ``seconds_per_slice`` = 2 frames / the sampling fps (Crab+: 2.0, from fps 1.0)."""

    slices: int
    height: int
    width: int
    seconds_per_slice: float

    @property
    def tokens(self) -> int:
        return self.slices * self.height * self.width


PromptBlock = TextRun | AudioRun | ImageGrid | VideoGrid


def rope_positions(blocks: list[PromptBlock], *, tokens_per_second: int = TOKENS_PER_SECOND) -> tuple[Tensor, int]:
    """The M-RoPE position ids [3, T] (int64; rows temporal, height, width) of a prompt of ``blocks``
    in order, T = the blocks' total token count, and ``delta``: decode step ``k`` (cache position
    ``T + k``) sits at ``T + k + delta`` on all three streams."""
    pieces = []
    start = 0
    for block in blocks:
        relative = _block_positions(block, tokens_per_second)
        if relative.shape[1]:
            pieces.append(relative + start)
            start = int(pieces[-1].max()) + 1
    if not pieces:
        raise OptionError("rope_positions: the prompt has no tokens; pass at least one non-empty block")
    positions = torch.cat(pieces, dim=1)
    return positions, start - positions.shape[1]


def _block_positions(block: PromptBlock, tokens_per_second: int) -> Tensor:
    """Positions [3, tokens] of one block, counted from 0."""
    if isinstance(block, (TextRun, AudioRun)):
        if block.length < 0:
            raise OptionError(f"rope_positions: {block} has a negative length; count the block's tokens")
        return torch.arange(block.length).expand(3, -1)
    if isinstance(block, ImageGrid):
        return _grid_positions(torch.zeros(1, dtype=torch.long), block.height, block.width, block)
    if isinstance(block, VideoGrid):
        if block.slices < 1 or block.seconds_per_slice <= 0:
            raise OptionError(f"rope_positions: {block} needs at least one slice and a positive seconds_per_slice")
        # fp32 and truncated toward zero, as the reference computes it: at 0.7 s a slice, slice 6 sits
        # at t = 104, not 105, since 6 * 0.7 * 25 lands just below 105 in fp32.
        seconds = torch.arange(block.slices) * torch.tensor(block.seconds_per_slice, dtype=torch.float32)
        return _grid_positions((seconds * tokens_per_second).long(), block.height, block.width, block)
    raise OptionError(f"rope_positions: unknown block {block!r}; expected TextRun, AudioRun, ImageGrid or VideoGrid")


def _grid_positions(times: Tensor, height: int, width: int, block: PromptBlock) -> Tensor:
    """(t, row, column) of every token of a grid with slice offsets ``times``, slice-major then row-major."""
    if height < 1 or width < 1:
        raise OptionError(f"rope_positions: {block} has an empty grid; height and width must be at least 1")
    shape = (len(times), height, width)
    t = times.view(-1, 1, 1).expand(shape)
    rows = torch.arange(height).view(1, -1, 1).expand(shape)
    cols = torch.arange(width).view(1, 1, -1).expand(shape)
    return torch.stack([t, rows, cols]).flatten(1)
