"""OpenAVS's ``onnx`` backend: an engine directory (``edgeav export``) run by ONNX Runtime.

:class:`OnnxOpenAVS` offers :class:`~edgeav.systems.openavs.pipeline.OpenAVSPipeline` what
:class:`~edgeav.systems.openavs.checkpoints.LoadedOpenAVS` offers it (``config``, the GPT-2, CLIP, BERT
and Qwen tokenizers, ``source``, ``to``, and a ``model`` whose ``pengi``, ``grounding``, ``sam``, ``sam2``,
``beats`` and ``thinker`` answer the calls the pipeline and
:class:`~edgeav.systems.openavs.segment.BoxSegmenter` make), so a run is the same whichever executes it.
A part the exported checkpoint did not hold (BEATs, the thinker, SAM2) is None, and the pipeline refuses
the variants, translator and segmenter that need it.

The thinker is :class:`~edgeav.engines.qwen_onnx.OnnxThinker` over the ``thinker_*`` graphs (the
reference's own chat code; its graphs open and its token table loads when a run first needs it) and SAM2
:class:`~edgeav.engines.qwen_onnx.OnnxSam2`, both shared with Crab+'s engine.

Pengi's beam search is the reference's own :func:`~edgeav.models.pengi_mapper.beam_search`, driving the
exported GPT-2 through :class:`OnnxGPT2`: the KV cache is one host buffer, reordered row by row between
steps as the reference reorders its cache.
"""

from __future__ import annotations

import json
import tempfile
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeav.bpe_tokenizers import CLIPBPE, GPT2BPE
from edgeav.engines.manifest import read_listed_file
from edgeav.engines.manifest_schema import MANIFEST
from edgeav.engines.onnx import OnnxFolder, numpy_of
from edgeav.engines.qwen_onnx import OnnxSam2, OnnxThinker, read_qwen_tokenizer
from edgeav.errors import CheckpointError, EdgeavError, OptionError
from edgeav.models.gpt2 import GPT2Config, check_cache_sizes
from edgeav.models.grounding_dino import GroundingDINOConfig
from edgeav.models.pengi import PengiConfig, describe, pengi_preset
from edgeav.models.sam import SamConfig, postprocess_masks, sam_config
from edgeav.models.sam2 import sam2_config
from edgeav.preprocess.grounding_dino import GroundingTokenizer
from edgeav.systems.openavs.checkpoints import QWEN, TOKENIZER_CONFIG, TOKENIZER_FILES, TokenizerFiles
from edgeav.systems.openavs.config import OpenAVSConfig
from edgeav.systems.openavs.translator import prompt_hashes

EMBED = "gpt2_embed.npy"  # GPT-2's token table: the token embeddings and the tied LM head
TRANSLATOR_PROMPTS = "translator_prompts"  # manifest key: the translator's system prompt files -> SHA-256
THINKER_EMBED = "thinker_embed"  # manifest key: the thinker's token table
THINKER = "thinker_"  # the thinker's graphs: thinker_audio, thinker_vision, thinker_llm


def _int64(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy().astype(np.int64))


class _TokenTable(nn.Module):
    """GPT-2's ``transformer.wte`` as beam search reads it (the engine's table)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.wte = nn.Embedding.from_pretrained(table, freeze=True)


class OnnxGPT2:
    """The ``gpt2`` graph behind the part of :class:`~edgeav.models.gpt2.GPT2Decoder` that beam search drives:
    ``setup_caches``, ``hidden_states`` (of the last position only, all beam search reads), ``reorder_caches``,
    ``transformer.wte`` and the tied ``lm_head``, both from the engine's token table."""

    def __init__(self, session, table: np.ndarray, cfg: GPT2Config) -> None:
        self.session, self.cfg = session, cfg
        weights = torch.from_numpy(table)
        self.transformer = _TokenTable(weights)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False, device="meta")  # tied: no weight of its own
        self.lm_head.weight = self.transformer.wte.weight
        self.kv_layout = (cfg.n_layer, 2, cfg.n_head, cfg.n_embd // cfg.n_head)
        self.max_batch_size = self.max_seq_len = 0
        self._kv: np.ndarray | None = None

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the cache ``[positions, layers, 2, rows, heads, head_dim]`` once for these sizes."""
        check_cache_sizes(self.cfg, max_batch_size, max_seq_len)
        layers, two, heads, head_dim = self.kv_layout
        self._kv = np.zeros((max_seq_len, layers, two, max_batch_size, heads, head_dim), np.float32)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def hidden_states(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor,
                      kv_len: int | None = None) -> torch.Tensor:
        """``inputs_embeds`` [rows, T, n_embd] at consecutive positions ``input_pos`` (from the cache's end) ->
        the final-LayerNorm state of the last one [rows, 1, n_embd]; their keys and values go into the cache."""
        if self._kv is None:
            raise RuntimeError("OnnxGPT2: no KV cache; call setup_caches(max_batch_size, max_seq_len) first")
        past, (rows, tokens) = int(input_pos[0]), inputs_embeds.shape[:2]
        hidden, new_kv = self.session.run(None, {"inputs_embeds": numpy_of(inputs_embeds),
                                                 "past_kv": np.ascontiguousarray(self._kv[:past, :, :, :rows])})
        self._kv[past:past + tokens, :, :, :rows] = new_kv
        return torch.from_numpy(hidden)[:, None]

    def reorder_caches(self, rows: torch.Tensor) -> None:
        """Make cache row ``i`` a copy of the old row ``rows[i]`` (beam search's surviving beams)."""
        order = rows.cpu().numpy()
        self._kv[:, :, :, :len(order)] = self._kv[:, :, :, order]


class OnnxPengi:
    """The ``pengi_*`` graphs and GPT-2 behind :class:`~edgeav.models.pengi.Pengi`'s ``audio_embedding``,
    ``prompt_embedding``, ``prefix`` and ``describe``."""

    def __init__(self, engine: "OnnxOpenAVS", config: PengiConfig, table: np.ndarray) -> None:
        self.engine, self.config = engine, config
        self.gpt = OnnxGPT2(engine.session("gpt2"), table, config.gpt2)

    def _run(self, graph: str, **feeds: np.ndarray) -> torch.Tensor:
        (out,) = self.engine.session(graph).run(None, feeds)
        return torch.from_numpy(out)

    def audio_embedding(self, waveform: torch.Tensor) -> torch.Tensor:
        return self._run("pengi_audio", waveform=numpy_of(waveform))

    def prompt_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run("pengi_prompt", input_ids=_int64(input_ids), attention_mask=_int64(attention_mask))

    def prefix(self, audio_embed: torch.Tensor, prompt_embed: torch.Tensor) -> torch.Tensor:
        return self._run("pengi_prefix", audio_embedding=numpy_of(audio_embed), prompt_embedding=numpy_of(prompt_embed))

    def describe(self, waveform: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 beam_size: int = 3, max_len: int = 30, temperature: float = 1.0) -> list[list[int]]:
        """As the reference's (:func:`edgeav.models.pengi.describe`), through the engine's graphs."""
        return describe(self, waveform, prompt_ids, prompt_mask, beam_size=beam_size, max_len=max_len,
                        temperature=temperature)


class _OnHost:
    """What :class:`~edgeav.systems.openavs.segment.BoxSegmenter` reads of a module's ``parameters()``: the
    device and dtype its inputs go to (the CPU, fp32: the graphs' inputs)."""

    def parameters(self):
        yield torch.zeros((), dtype=torch.float32)


class OnnxGroundingDINO(_OnHost):
    """The ``grounding`` graph, called as :class:`~edgeav.models.grounding_dino.GroundingDINO` is."""

    def __init__(self, engine: "OnnxOpenAVS") -> None:
        self.engine = engine
        self.config = GroundingDINOConfig.from_preset(engine.config.grounding)

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feeds = {"pixel_values": numpy_of(pixel_values), "pixel_mask": _int64(pixel_mask),
                 "input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask),
                 "token_type_ids": _int64(token_type_ids)}
        logits, boxes = self.engine.session("grounding").run(None, feeds)
        return torch.from_numpy(logits), torch.from_numpy(boxes)


class OnnxSam(_OnHost):
    """The ``sam_encoder`` and ``sam_decoder`` graphs behind the :class:`~edgeav.models.sam.Sam` methods a box
    prompt goes through: the prompt "embeddings" are the boxes themselves, which the decoder graph embeds."""

    def __init__(self, engine: "OnnxOpenAVS") -> None:
        self.engine = engine
        self.config: SamConfig = sam_config(engine.config.sam)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        (embedding,) = self.engine.session("sam_encoder").run(None, {"pixels": numpy_of(pixels)})
        return torch.from_numpy(embedding)

    def prompt_embeddings(self, points=None, labels=None, boxes: torch.Tensor | None = None, sparse=None,
                          masks=None) -> tuple[torch.Tensor, None]:
        """Box prompts only (the exported decoder's one prompt kind): -> (the boxes, no dense prompt)."""
        if boxes is None or any(p is not None for p in (points, labels, sparse, masks)):
            raise OptionError("the engine's SAM decoder takes box prompts only (boxes [N, 4]); the points, masks "
                              "or tokens given need the PyTorch model (run the checkpoint)")
        return boxes, None

    def decode_masks(self, image_embeddings: torch.Tensor, sparse: torch.Tensor, dense: None = None,
                     multimask_output: bool = False) -> tuple[torch.Tensor, None]:
        """The boxes from :meth:`prompt_embeddings` and one image embedding -> (low-res logits [N, 1, 4g, 4g],
        None: the graph does not return SAM's IoU estimate)."""
        if multimask_output:
            raise OptionError("the engine's SAM decoder gives one mask per box (multimask_output=False)")
        (low_res,) = self.engine.session("sam_decoder").run(None, {"boxes": numpy_of(sparse),
                                                                   "image_embedding": numpy_of(image_embeddings[:1])})
        return torch.from_numpy(low_res), None

    def postprocess_masks(self, low_res_logits: torch.Tensor, input_size: tuple[int, int],
                          original_size: tuple[int, int]) -> torch.Tensor:
        return postprocess_masks(low_res_logits, input_size, original_size, img_size=self.config.img_size)


class OnnxBoxSam2(_OnHost, OnnxSam2):
    """The ``sam2_encoder`` and ``sam2_decoder`` graphs behind what
    :class:`~edgeav.systems.openavs.segment.BoxSegmenter` calls of :class:`~edgeav.models.sam2.Sam2`
    (``config``, ``image_features``, ``predict``, and ``parameters`` for the inputs' device and dtype)."""


class OnnxBeats:
    """The ``beats`` graph behind :meth:`~edgeav.models.audio.BeatsEncoder.classify`."""

    def __init__(self, engine: "OnnxOpenAVS") -> None:
        self.engine = engine

    def classify(self, fbank: torch.Tensor) -> torch.Tensor:
        """Normalised fbank [1, T, mel_bins] -> AudioSet probabilities [1, classes]."""
        (probabilities,) = self.engine.session("beats").run(None, {"fbank": numpy_of(fbank)})
        return torch.from_numpy(probabilities)


class OnnxOpenAVSModel:
    """The engine's graphs where :class:`~edgeav.systems.openavs.model.OpenAVSModel` holds its components."""

    def __init__(self, engine: "OnnxOpenAVS", table: np.ndarray) -> None:
        self.engine = engine
        self.config = config = engine.config
        self.pengi = OnnxPengi(engine, pengi_preset(config.pengi), table)
        self.grounding = OnnxGroundingDINO(engine)
        self.sam = OnnxSam(engine)
        # the manifest check holds each optional part's graphs exactly when the config has the part
        self.beats = OnnxBeats(engine) if config.beats is not None else None
        self.sam2 = OnnxBoxSam2(engine, sam2_config(config.sam2)) if config.sam2 is not None else None

    @cached_property
    def thinker(self) -> OnnxThinker | None:
        """The thinker, built on first use: the lite and edge variants never load its LLM or token table."""
        shapes = self.config.thinker
        if shapes is None:
            return None
        table = self.engine.embed_table(self.engine.manifest[THINKER_EMBED], shapes)
        return OnnxThinker(self.engine, shapes, table, prefix=THINKER)


class OnnxOpenAVS(OnnxFolder):
    """An OpenAVS engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    system = "openavs"

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        super().__init__(folder, threads=threads)
        self.config = OpenAVSConfig.from_dict(self.manifest["config"])
        if self.manifest[TRANSLATOR_PROMPTS] != prompt_hashes():
            raise CheckpointError(f"{self.folder}: the translator prompts differ from those this engine was exported "
                                  "with (another edgeav version); export the engine again")
        self.gpt2_tokenizer, self.clip_tokenizer, self.grounding_tokenizer = self._tokenizers()
        self.qwen_tokenizer = (read_qwen_tokenizer(self.folder, self.manifest, prefix=QWEN)
                               if self.config.thinker is not None else None)
        self.model = OnnxOpenAVSModel(self, self._token_table())

    @property
    def tokenizer(self) -> TokenizerFiles:
        return TokenizerFiles(self.gpt2_tokenizer, self.clip_tokenizer, self.grounding_tokenizer, self.qwen_tokenizer,
                              str(self.folder))

    def _listed(self, name) -> bytes:
        if not isinstance(name, str) or name not in self.manifest["files"]:
            raise CheckpointError(f"{self.folder / TOKENIZER_CONFIG}: names {name!r}, which {MANIFEST} does not "
                                  "list as a file of the engine; export the engine again")
        return read_listed_file(self.folder, self.manifest, name)

    def _tokenizers(self) -> tuple[GPT2BPE, CLIPBPE, GroundingTokenizer]:
        """The tokenizers from the files :data:`TOKENIZER_CONFIG` names, each checked against its hash as read."""
        where = self.folder / TOKENIZER_CONFIG
        try:
            names = json.loads(self._listed(self.manifest["tokenizer_config"]))
            with tempfile.TemporaryDirectory() as tmp:
                found = []
                for kind, cls in (("gpt2", GPT2BPE), ("clip", CLIPBPE)):
                    vocab, merges = names[kind]
                    (Path(tmp) / kind).mkdir()
                    (Path(tmp) / kind / "vocab.json").write_bytes(self._listed(vocab))
                    (Path(tmp) / kind / "merges.txt").write_bytes(self._listed(merges))
                    found.append(cls.from_dir(Path(tmp) / kind))
            tokens = self._listed(names["bert"][0]).decode("utf-8").splitlines()
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: does not name readable tokenizer files ({type(e).__name__}: {e}); "
                                  "export the engine again") from None
        except CheckpointError:
            raise
        except EdgeavError as e:
            raise CheckpointError(f"{self.folder}: its tokenizer files cannot be read ({e}); export the engine "
                                  "again") from None
        for tokenizer in found:
            tokenizer.source = str(self.folder)
        max_text_len = GroundingDINOConfig.from_preset(self.config.grounding).max_text_len
        return found[0], found[1], GroundingTokenizer.from_tokens(tokens, max_text_len)

    def _token_table(self) -> np.ndarray:
        """GPT-2's token table (a listed .npy), which must be float32 [vocab, n_embd] of the Pengi config."""
        path = self.folder / self.manifest["embed"]
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable token table ({e}); export the engine again") from None
        gpt2 = pengi_preset(self.config.pengi).gpt2
        shape = (gpt2.vocab_size, gpt2.n_embd)
        if table.shape != shape or table.dtype != np.float32:
            raise CheckpointError(f"{path}: a {table.dtype} table of shape {list(table.shape)}, the model config "
                                  f"needs float32 {list(shape)}; export the engine again")
        return table


__all__ = ["EMBED", "OnnxBeats", "OnnxBoxSam2", "OnnxGPT2", "OnnxGroundingDINO", "OnnxOpenAVS", "OnnxOpenAVSModel",
           "OnnxPengi", "OnnxSam", "THINKER", "THINKER_EMBED", "TOKENIZER_CONFIG", "TOKENIZER_FILES",
           "TRANSLATOR_PROMPTS", "TokenizerFiles"]
