"""The ``onnx`` backend: an engine directory run by ONNX Runtime.

It offers what the reference :class:`~edgeav.checkpoints.LoadedCrab` offers the
runtime (``variant(name)`` -> a model with ``encode_frames``, ``encode_audio``,
``embed_prompt``, ``llm`` and ``mask_logits``), so :class:`~edgeav.runtime.Runtime`
runs either the same way. The LLM's KV cache is one host buffer allocated by
``setup_caches``: each step reads its prefix as ``past_kv`` and ONNX Runtime
writes ``new_kv`` straight into the rows after it (IO binding, no copies, no
reallocation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.systems.crab.config import VOCABULARY, CrabConfig
from edgeav.engines import check_threads
from edgeav.engines.manifest import read_listed_file, read_manifest, verify_files
from edgeav.errors import CheckpointError, OptionError
from edgeav.generate import splice_blocks
from edgeav.systems.crab.model import VisualFeatures
from edgeav.tokenizer import Tokenizer, TokenizerSettings
from edgeav.weight_files import parse_json


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise OptionError("the onnx backend needs onnxruntime; pip install onnxruntime") from None
    return onnxruntime


class OnnxLLM:
    """The exported LLM graph behind :func:`edgeav.generate.generate`'s interface."""

    def __init__(self, session, embed_table: np.ndarray, config: CrabConfig) -> None:
        self.session = session
        self.table = torch.from_numpy(embed_table)
        cfg = config.llm
        self.kv_layout = (cfg.num_layers, 2, 1, cfg.num_kv_heads, cfg.head_dim)
        self.context = cfg.max_seq_len
        self.max_seq_len = 0
        self._kv: np.ndarray | None = None
        self._logits = np.empty((1, cfg.vocab_size), np.float32)
        self._hidden = np.empty((1, cfg.hidden_size), np.float32)
        self._binding = session.io_binding()
        self._bind_output("logits", self._logits)
        self._bind_output("hidden", self._hidden)

    def _bind_output(self, name: str, array: np.ndarray) -> None:
        self._binding.bind_output(name, "cpu", element_type=array.dtype, shape=array.shape,
                                  buffer_ptr=array.ctypes.data)

    def setup_caches(self, max_batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the KV buffer for ``max_seq_len`` positions (batch 1); runs that fit reuse it."""
        if max_batch_size != 1:
            raise OptionError(f"the onnx backend runs batch 1, got max_batch_size={max_batch_size}")
        if not 1 <= max_seq_len <= self.context:
            raise OptionError(f"setup_caches: max_seq_len {max_seq_len} is outside 1..{self.context}")
        if max_seq_len != self.max_seq_len:
            self._kv = np.zeros((max_seq_len, *self.kv_layout), np.float32)
            self.max_seq_len = max_seq_len

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.table)

    def __call__(self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor, kv_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``input_pos`` (consecutive, from the cache's end) -> logits [1, 1, V], hidden [1, 1, D]
        of the last position. ``kv_len`` is implied by the positions (accepted for the shared interface)."""
        if self._kv is None:
            raise RuntimeError("OnnxLLM: no KV cache; call setup_caches first")
        past, tokens = int(input_pos[0]), inputs_embeds.shape[1]
        self._binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds.float().numpy()))
        self._binding.bind_cpu_input("past_kv", self._kv[:past])
        self._bind_output("new_kv", self._kv[past : past + tokens])
        self.session.run_with_iobinding(self._binding)
        # Copies: the next step overwrites the bound buffers, and generate keeps mask hidden states.
        return torch.from_numpy(self._logits.copy())[:, None], torch.from_numpy(self._hidden.copy())[:, None]


class OnnxModel:
    """One weight variant of an ONNX engine, shaped like :class:`~edgeav.models.crab.CrabModel`."""

    def __init__(self, engine: "OnnxEngine", variant: str) -> None:
        self.engine = engine
        self.variant = variant
        self.llm = engine.llm(variant)

    def encode_frames(self, pixels: torch.Tensor) -> VisualFeatures:
        tokens, low, high = self.engine.session("visual").run(None, {"pixels": _numpy(pixels)})
        return VisualFeatures(torch.from_numpy(tokens), torch.from_numpy(low), torch.from_numpy(high))

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        (tokens,) = self.engine.session("audio").run(None, {"fbank": _numpy(fbank)})
        return torch.from_numpy(tokens)

    def embed_prompt(self, token_ids: list[int], blocks: dict[int, torch.Tensor]) -> torch.Tensor:
        return splice_blocks(self.llm.embed(torch.tensor(token_ids)), token_ids, blocks)

    def mask_logits(self, mask_hidden: torch.Tensor, frame: VisualFeatures) -> torch.Tensor:
        name = self.engine.manifest["variants"][self.variant].get("mask")
        if name is None:
            raise CheckpointError(f"{self.engine.folder}: the {self.variant} weights have no mask decoder")
        (logits,) = self.engine.session(name).run(None, {
            "mask_hidden": _numpy(mask_hidden[None]), "mask_low": _numpy(frame.mask_low[:1]),
            "mask_high": _numpy(frame.mask_high[:1])})
        return torch.from_numpy(logits)


class OnnxEngine:
    """An engine directory on ONNX Runtime; sessions open on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    backend = "onnx"
    system = "crab"

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        self.folder = Path(folder)
        check_threads(threads)
        self.manifest = read_manifest(self.folder)
        if self.manifest["backend"] != "onnx":
            raise CheckpointError(f"{self.folder}: a {self.manifest['backend']!r} engine; this backend runs "
                                  "'onnx' engines (TensorRT engines need the tensorrt backend, not built here)")
        verify_files(self.folder, self.manifest)
        self.config = CrabConfig.from_dict(self.manifest["config"])
        self.tokenizer = engine_tokenizer(self.folder, self.manifest, self.config)
        self.source = f"onnx engine {self.folder} ({self.manifest['precision']})"
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self._llms: dict[tuple[str, str], OnnxLLM] = {}
        self._models: dict[str, OnnxModel] = {}

    def to(self, device, dtype) -> "OnnxEngine":
        if torch.device(device).type != "cpu" or dtype != torch.float32:
            raise OptionError("the onnx backend runs on the CPU with fp32 inputs; the precision is the engine's "
                              "(drop --device/--dtype, or export another --precision)")
        return self

    def session(self, name: str):
        if name not in self._sessions:
            ort = _onnxruntime()
            entry = self.manifest["graphs"].get(name)
            if entry is None:
                raise CheckpointError(f"{self.folder}: the engine has no {name} graph; export it again")
            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3  # errors only: fp16 graphs log harmless constant-folding notes
            path = self.folder / entry["file"]
            try:
                self._sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own exception types
                raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]}); "
                                      "export the engine again") from None
        return self._sessions[name]

    def llm(self, variant: str) -> OnnxLLM:
        entry = self._variant(variant)
        key = (entry["llm"], entry["embed"])
        if key not in self._llms:
            table = self._embed_table(entry["embed"])
            self._llms[key] = OnnxLLM(self.session(entry["llm"]), table, self.config)
        return self._llms[key]

    def _embed_table(self, name: str) -> np.ndarray:
        path = self.folder / name
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable embedding table ({e}); export the engine again") from None
        shape = (self.config.llm.vocab_size, self.config.llm.hidden_size)
        if table.shape != shape or table.dtype != np.float32:
            raise CheckpointError(f"{path}: a {table.dtype} table of shape {table.shape}, the model config needs "
                                  f"float32 {shape}; export the engine again")
        return table

    def _variant(self, variant: str) -> dict:
        entry = self.manifest["variants"].get(variant)
        if entry is None:
            raise CheckpointError(f"{self.folder}: has no {variant} weights, which this task needs; export the "
                                  "engine again from a checkpoint with them (and without a variants limit)")
        return entry

    def variant(self, name: str) -> OnnxModel:
        if name not in self._models:
            self._variant(name)
            self._models[name] = OnnxModel(self, name)
        return self._models[name]


def engine_tokenizer(folder: Path, manifest: dict, config: CrabConfig) -> Tokenizer:
    """The tokenizer from the files the manifest lists, each checked against its hash as read.

    Settings come only from a listed ``tokenizer_config``; an engine without one (exported before
    edgeav kept the settings) gets the defaults, never a ``tokenizer_config.json`` lying unverified
    beside the model.
    """
    model_name = manifest["tokenizer"]
    settings = None
    config_name = manifest.get("tokenizer_config")
    if config_name is not None:
        path = folder / config_name
        data = parse_json(read_listed_file(folder, manifest, config_name), path, fix="export the engine again")
        settings = TokenizerSettings.from_config(data, str(path))
    return Tokenizer(read_listed_file(folder, manifest, model_name), config.llm, VOCABULARY, source=str(folder / model_name),
                     settings=settings)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().float().cpu().numpy())
