"""Crab+'s ``onnx`` backend: an engine directory (``edgeav export``) run by ONNX Runtime.

:class:`OnnxCrabPlus` offers :class:`~edgeav.systems.crabplus.pipeline.CrabPlusPipeline` what
:class:`~edgeav.systems.crabplus.checkpoints.LoadedCrabPlus` offers it (``config``, ``tokenizer``,
``source``, ``to`` and a ``model`` with ``encode_audio``, ``encode_vision``, ``embed_prompt``, ``llm``
and ``sam2``), so a run is the same whichever executes it.

Two encoders run their graph piece by piece, because the reference computes those pieces apart:

- audio: every 2-s chunk of log-mel (``2 * n_window`` frames, the last one shorter) is encoded alone
  up to the pair pooling, and a full chunk has an even number of tokens, so no pair straddles two
  chunks: the ``audio`` graph encodes one chunk of any length and the tokens are concatenated;
- vision: no ViT block attends across temporal slices (two frames each), so the ``vision`` graph
  encodes one 224x224 slice and an image's or video's tokens are the slices' in order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeav.engines.manifest import read_listed_file
from edgeav.engines.onnx import OnnxFolder, OnnxLLM, numpy_of
from edgeav.errors import CheckpointError, EdgeavError, OptionError
from edgeav.generate import fill_placeholders
from edgeav.models.qwen_audio import QwenAudioConfig
from edgeav.models.sam2 import Sam2Config, Sam2Features, sam2_config
from edgeav.preprocess.qwen_vision import QWEN_VISION_SIZE, vision_grid
from edgeav.qwen_tokenizer import QwenTokenizer
from edgeav.systems.crabplus.config import CrabPlusConfig

# The manifest keys naming the tokenizer's files (``tokenizer_merges`` only for vocab.json + merges.txt).
TOKENIZER_KEYS = ("tokenizer", "tokenizer_merges", "tokenizer_config")
SLICE_GRID = vision_grid(1)  # one temporal slice of a 224x224 frame pair: (1, 16, 16)


def audio_chunks(mel: torch.Tensor, audio: QwenAudioConfig) -> list[torch.Tensor]:
    """One audio's log-mel ``[n_mels, L]`` -> the chunks the tower encodes apart (``2 * n_window`` frames, the
    last shorter), leaving out a last chunk too short to add a token (its one token is the odd one the
    pooling drops)."""
    if mel.ndim != 2 or mel.shape[0] != audio.num_mel_bins:
        raise OptionError(f"audio: mel has shape {tuple(mel.shape)}; pass one audio as [{audio.num_mel_bins}, "
                          "frames]")
    if mel.shape[1] < 3:
        raise OptionError(f"audio: mel has {mel.shape[1]} frames, too few for one token; pass at least 3 (0.02 s "
                          "of audio)")
    size, frames = 2 * audio.n_window, mel.shape[1]
    return [mel[:, start:start + size] for start in range(0, frames, size) if min(size, frames - start) >= 3]


def vision_slices(patches: torch.Tensor, grid_thw, patch_dim: int) -> list[torch.Tensor]:
    """Patch rows of a (t, 16, 16) grid ``[t * 256, patch_dim]`` -> the t slices' rows ``[256, patch_dim]``
    (patchify orders rows by slice first)."""
    t, h, w = (int(v) for v in grid_thw)
    if (h, w) != SLICE_GRID[1:]:
        raise OptionError(f"vision: grid {(t, h, w)} is not of {QWEN_VISION_SIZE}x{QWEN_VISION_SIZE} frames; the "
                          f"engine's ViT reads frames resized to {QWEN_VISION_SIZE} (image_pixels, "
                          "video_frame_pixels)")
    rows = h * w
    if tuple(patches.shape) != (t * rows, patch_dim):
        raise OptionError(f"vision: patches of shape {tuple(patches.shape)} do not fit grid {(t, h, w)}: expected "
                          f"[{t * rows}, {patch_dim}]; pass patchify's patches with its grid")
    return list(patches.split(rows))


class OnnxQwenLLM(OnnxLLM):
    """The ``llm`` graph (:class:`~edgeav.export.graphs.MRopeLLMGraph`) behind the interface
    :class:`~edgeav.qwen_thinker.PositionedLLM` drives: the M-RoPE ``positions`` [3, T] of the
    new tokens are one more input."""

    def __call__(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_pos.expand(3, -1) if positions is None else positions
        self._binding.bind_cpu_input("positions", np.ascontiguousarray(ids.cpu().numpy().astype(np.int64)))
        return super().__call__(inputs_embeds, input_pos, kv_len)


class OnnxSam2:
    """The ``sam2_encoder`` and ``sam2_decoder`` graphs behind :class:`~edgeav.models.sam2.Sam2`'s
    ``image_features`` and ``predict``."""

    def __init__(self, engine: "OnnxCrabPlus") -> None:
        self.engine = engine
        self.config: Sam2Config = sam2_config(engine.config.sam2)

    def image_features(self, pixels: torch.Tensor) -> Sam2Features:
        """Normalised pixels ``[1, 3, S, S]`` -> the features every prompt on this image reuses."""
        outputs = self.engine.session("sam2_encoder").run(None, {"pixels": numpy_of(pixels)})
        return Sam2Features(*(torch.from_numpy(o) for o in outputs))

    def predict(self, features: Sam2Features, points: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """points ``[1, P, 2]``, labels ``[1, P]`` -> low-res logits ``[1, 1, 4g, 4g]``, IoU ``[1, 1]``, object
        score ``[1, 1]`` (the single mask, with the stability fallback inside the graph)."""
        feeds = {name: numpy_of(t) for name, t in features._asdict().items()}
        feeds["points"] = numpy_of(points)
        feeds["labels"] = np.ascontiguousarray(labels.cpu().numpy().astype(np.int64))
        return tuple(torch.from_numpy(o) for o in self.engine.session("sam2_decoder").run(None, feeds))


class OnnxCrabPlusModel:
    """The engine's graphs behind :class:`~edgeav.systems.crabplus.model.CrabPlusModel`'s methods."""

    def __init__(self, engine: "OnnxCrabPlus") -> None:
        self.engine = engine
        self.config = engine.config
        if self.config.audio.n_window % 2:
            raise CheckpointError(f"{engine.folder}: audio n_window {self.config.audio.n_window} is odd, so token "
                                  "pairs would straddle chunks; the engine encodes whole chunks (Qwen2.5-Omni: 100)")
        self.llm = OnnxQwenLLM(engine.session("llm"), engine.embed_table(engine.manifest["embed"], self.config),
                               self.config)
        self.sam2 = OnnxSam2(engine)

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``[128, L]`` of one audio -> its tokens ``[n, D]``, one chunk per graph run."""
        session = self.engine.session("audio")
        tokens = [session.run(None, {"mel": numpy_of(chunk)})[0] for chunk in audio_chunks(mel, self.config.audio)]
        return torch.from_numpy(np.concatenate(tokens))

    def encode_vision(self, patches: torch.Tensor, grid_thw) -> torch.Tensor:
        """Patch rows ``[N, 1176]`` of one image or video -> its tokens ``[N / 4, D]``, one slice per graph run."""
        session = self.engine.session("vision")
        slices = vision_slices(patches, grid_thw, self.config.vision.patch_dim)
        return torch.from_numpy(np.concatenate([session.run(None, {"patches": numpy_of(s)})[0] for s in slices]))

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        """Token ids, each placeholder id once per row of its block -> embeddings ``[1, L, D]`` with the
        placeholder rows replaced by the block's rows, in order (as the reference model does)."""
        return fill_placeholders(self.llm.embed(torch.tensor(token_ids, dtype=torch.long)), token_ids, blocks)


class OnnxCrabPlus(OnnxFolder):
    """A Crab+ engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    system = "crabplus"

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.config = CrabPlusConfig.from_dict(self.manifest["config"])
        self.tokenizer = self._tokenizer()
        self.model = OnnxCrabPlusModel(self)

    def _tokenizer(self) -> QwenTokenizer:
        """The Qwen tokenizer from the files the manifest lists, each checked against its hash as read."""
        names = [self.manifest[key] for key in TOKENIZER_KEYS if key in self.manifest]
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                (Path(tmp) / name).write_bytes(read_listed_file(self.folder, self.manifest, name))
            try:
                tokenizer = QwenTokenizer.from_dir(tmp)
            except EdgeavError as e:
                raise CheckpointError(f"{self.folder}: its tokenizer files cannot be read ({e}); export the "
                                      "engine again") from None
        tokenizer.source = str(self.folder)
        return tokenizer


__all__ = ["OnnxCrabPlus", "OnnxCrabPlusModel", "OnnxQwenLLM", "OnnxSam2", "audio_chunks", "vision_slices"]
