"""The Qwen2.5-Omni thinker's towers and SAM2 on ONNX Runtime, for every system that exports them (the
graphs are :mod:`edgeav.export.qwen_graphs`'): Crab+ (graphs ``audio``, ``vision``, ``llm``) and OpenAVS
(the same under ``thinker_``), both with ``sam2_encoder`` and ``sam2_decoder``.

Two encoders run their graph piece by piece, because the reference computes those pieces apart:

- audio: every 2-s chunk of log-mel (``2 * n_window`` frames, the last one shorter) is encoded alone
  up to the pair pooling, and a full chunk has an even number of tokens, so no pair straddles two
  chunks: the audio graph encodes one chunk of any length and the tokens are concatenated;
- vision: no ViT block attends across temporal slices (two frames each), so the vision graph
  encodes one 224x224 slice and an image's or video's tokens are the slices' in order.

:class:`OnnxThinker` answers chats with the reference's own code (:class:`~edgeav.qwen_thinker.ThinkerChat`).
The Qwen tokenizer's files sit in the engine directory under manifest keys (:func:`tokenizer_entries`,
:func:`read_qwen_tokenizer`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeav.engines.manifest import read_listed_file
from edgeav.engines.onnx import OnnxLLM, numpy_of
from edgeav.errors import CheckpointError, EdgeavError, OptionError
from edgeav.generate import fill_placeholders
from edgeav.models.qwen_audio import QwenAudioConfig
from edgeav.models.sam2 import Sam2Config, Sam2Features
from edgeav.preprocess.qwen_vision import QWEN_VISION_SIZE, vision_grid
from edgeav.qwen_thinker import ThinkerChat, ThinkerShapes
from edgeav.qwen_tokenizer import QwenTokenizer

SLICE_GRID = vision_grid(1)  # one temporal slice of a 224x224 frame pair: (1, 16, 16)
# The tokenizer's manifest keys (before a system's prefix) and the file each names: ``tokenizer`` is
# tokenizer.json, or vocab.json with ``tokenizer_merges`` beside it.
TOKENIZER_KEYS = ("tokenizer", "tokenizer_merges", "tokenizer_config")


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
    """The thinker's LLM graph (:class:`~edgeav.export.graphs.LLMGraph` with M-RoPE) behind the interface
    :class:`~edgeav.qwen_thinker.PositionedLLM` drives: the M-RoPE ``positions`` [3, T] of the
    new tokens are one more input."""

    def __call__(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_pos.expand(3, -1) if positions is None else positions
        self._binding.bind_cpu_input("positions", np.ascontiguousarray(ids.cpu().numpy().astype(np.int64)))
        return super().__call__(inputs_embeds, input_pos, kv_len)


class OnnxQwenTowers:
    """The thinker's audio, vision and LLM graphs of ``engine`` (an :class:`~edgeav.engines.onnx.OnnxFolder`),
    named ``prefix`` + ``audio``, ``vision``, ``llm``, behind the reference's ``encode_audio``,
    ``encode_vision``, ``embed_prompt`` and ``llm``. ``shapes``: anything with the thinker's ``audio``,
    ``vision`` and ``llm`` configs; ``table``: the LLM's token embeddings."""

    def __init__(self, engine, shapes, table: np.ndarray, *, prefix: str = "") -> None:
        if shapes.audio.n_window % 2:
            raise CheckpointError(f"{engine.folder}: audio n_window {shapes.audio.n_window} is odd, so token pairs "
                                  "would straddle chunks; the engine encodes whole chunks (Qwen2.5-Omni: 100)")
        self.engine, self.prefix = engine, prefix
        self.llm = OnnxQwenLLM(engine.session(prefix + "llm"), table, shapes)
        self._audio, self._patch_dim = shapes.audio, shapes.vision.patch_dim

    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``[128, L]`` of one audio -> its tokens ``[n, D]``, one chunk per graph run."""
        session = self.engine.session(self.prefix + "audio")
        tokens = [session.run(None, {"mel": numpy_of(chunk)})[0] for chunk in audio_chunks(mel, self._audio)]
        return torch.from_numpy(np.concatenate(tokens))

    def encode_vision(self, patches: torch.Tensor, grid_thw) -> torch.Tensor:
        """Patch rows ``[N, 1176]`` of one image or video -> its tokens ``[N / 4, D]``, one slice per graph run."""
        session = self.engine.session(self.prefix + "vision")
        slices = vision_slices(patches, grid_thw, self._patch_dim)
        return torch.from_numpy(np.concatenate([session.run(None, {"patches": numpy_of(s)})[0] for s in slices]))

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        """Token ids, each placeholder id once per row of its block -> embeddings ``[1, L, D]`` with the
        placeholder rows replaced by the block's rows, in order (as the reference model does)."""
        return fill_placeholders(self.llm.embed(torch.tensor(token_ids, dtype=torch.long)), token_ids, blocks)


class OnnxThinker(ThinkerChat, OnnxQwenTowers):
    """The plain thinker (:class:`~edgeav.qwen_thinker.QwenThinker`) from an engine's graphs: the same
    ``chat``, ``chat_prompt`` and ``answer``, its media encoded slice by slice and chunk by chunk."""

    def __init__(self, engine, shapes: ThinkerShapes, table: np.ndarray, *, prefix: str = "") -> None:
        super().__init__(engine, shapes, table, prefix=prefix)
        self.shapes = shapes


class OnnxSam2:
    """The SAM2 encoder and decoder graphs of ``engine`` (``encoder``, ``decoder``: their names) behind
    :class:`~edgeav.models.sam2.Sam2`'s ``config``, ``image_features`` and ``predict``."""

    def __init__(self, engine, config: Sam2Config, *, encoder: str = "sam2_encoder",
                 decoder: str = "sam2_decoder") -> None:
        self.engine, self.config = engine, config
        self.encoder, self.decoder = encoder, decoder

    def image_features(self, pixels: torch.Tensor) -> Sam2Features:
        """Normalised pixels ``[1, 3, S, S]`` -> the features every prompt on this image reuses."""
        outputs = self.engine.session(self.encoder).run(None, {"pixels": numpy_of(pixels)})
        return Sam2Features(*(torch.from_numpy(o) for o in outputs))

    def predict(self, features: Sam2Features, points: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """points ``[1, P, 2]``, labels ``[1, P]`` -> low-res logits ``[1, 1, 4g, 4g]``, IoU ``[1, 1]``, object
        score ``[1, 1]`` (the single mask, with the stability fallback inside the graph)."""
        feeds = {name: numpy_of(t) for name, t in features._asdict().items()}
        feeds["points"] = numpy_of(points)
        feeds["labels"] = np.ascontiguousarray(labels.cpu().numpy().astype(np.int64))
        return tuple(torch.from_numpy(o) for o in self.engine.session(self.decoder).run(None, feeds))


def tokenizer_entries(tokenizer: QwenTokenizer, source: str, *, prefix: str = "") -> dict[str, tuple[str, bytes]]:
    """The Qwen tokenizer's files as an engine holds them: manifest key (``prefix`` + one of
    :data:`TOKENIZER_KEYS`) -> (file name, ``prefix`` + the name it was read from; its bytes). ``source``
    names the checkpoint in the one-line errors."""
    files = tokenizer.files()
    if "tokenizer.json" in files:
        names = {"tokenizer": "tokenizer.json"}
    elif {"vocab.json", "merges.txt"} <= set(files):
        names = {"tokenizer": "vocab.json", "tokenizer_merges": "merges.txt"}
    else:
        raise EdgeavError(f"{source}: the tokenizer was not read from tokenizer.json or vocab.json + merges.txt, "
                          "so the engine cannot hold it; load the checkpoint from its folder")
    if "tokenizer_config.json" not in files:
        raise EdgeavError(f"{source}: the tokenizer has no tokenizer_config.json, which the engine lists; copy "
                          "Qwen2.5-Omni's tokenizer_config.json into the checkpoint folder")
    names["tokenizer_config"] = "tokenizer_config.json"
    return {prefix + key: (prefix + name, files[name]) for key, name in names.items()}


def read_qwen_tokenizer(folder: Path, manifest: dict, *, prefix: str = "") -> QwenTokenizer:
    """The Qwen tokenizer from the files the manifest's ``prefix`` + :data:`TOKENIZER_KEYS` name, each checked
    against its hash as read and given back its own name (``prefix`` dropped)."""
    names = [manifest[prefix + key] for key in TOKENIZER_KEYS if prefix + key in manifest]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            (Path(tmp) / name.removeprefix(prefix)).write_bytes(read_listed_file(folder, manifest, name))
        try:
            tokenizer = QwenTokenizer.from_dir(tmp)
        except EdgeavError as e:
            raise CheckpointError(f"{folder}: its tokenizer files cannot be read ({e}); export the engine "
                                  "again") from None
    tokenizer.source = str(folder)
    return tokenizer


__all__ = ["OnnxQwenLLM", "OnnxQwenTowers", "OnnxSam2", "OnnxThinker", "SLICE_GRID", "TOKENIZER_KEYS",
           "audio_chunks", "read_qwen_tokenizer", "tokenizer_entries", "vision_slices"]
