"""The ``onnx`` backend's shared parts: an engine directory on ONNX Runtime and its LLM.

A system's engine class (``edgeav/systems/NAME/onnx_engine.py``) builds on :class:`OnnxFolder`
(the checked manifest, one ONNX Runtime session per graph, the embedding tables, the tokenizer)
and offers its pipeline what the system's torch model offers. :class:`OnnxLLM` is the exported
LLM, numpy in and out (:func:`edgeav.decoding.generate_numpy`), or behind
:func:`edgeav.generate.generate`'s torch interface: the KV cache is one host buffer
allocated by ``setup_caches``, a ``[batch, kv_heads, capacity, head_dim]`` block per layer for keys and
one for values; each step binds every block as both its past input and its present output, and ONNX
Runtime's fused attention writes the new positions into it in place (IO binding, no copies, no
reallocation).

Nothing here imports torch: an engine whose system computes in numpy (Crab's) runs with ONNX Runtime
and numpy alone. Torch tensors are taken and given back only where a caller passes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeav.engines import check_threads
from edgeav.engines.llm_io import kv_names
from edgeav.engines.manifest import manifest_system, read_listed_file, read_manifest, verify_files
from edgeav.errors import CheckpointError, OptionError
from edgeav.tokenizer import AddedVocabulary, Tokenizer, TokenizerSettings
from edgeav.weight_files import parse_json

if TYPE_CHECKING:
    import torch


def onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise OptionError("the onnx backend needs onnxruntime; pip install onnxruntime") from None
    return onnxruntime


class OnnxLLM:
    """The exported LLM graph (:class:`edgeav.export.graphs.LLMGraph`): numpy in and out (:meth:`embed_ids`,
    :meth:`step`), and behind :func:`edgeav.generate.generate`'s torch interface (:meth:`embed`, calling it).
    ``config`` is the system's model config (its ``llm`` part sizes the cache)."""

    def __init__(self, session, embed_table: np.ndarray, config) -> None:
        self.session = session
        self.table = embed_table
        self.cfg = cfg = config.llm
        self.context = cfg.max_seq_len
        self.max_seq_len = 0
        self._kv: np.ndarray | None = None
        self._past_length = np.zeros(1, np.int64)
        self._embeds: np.ndarray | None = None  # the step's input, held while the binding points into it
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
            # Zeros, not empty: attention masks the unfilled positions, and a NaN there would still spread.
            cfg = self.cfg
            self._kv = np.zeros((cfg.num_layers, 2, 1, cfg.num_kv_heads, max_seq_len, cfg.head_dim), np.float32)
            self.max_seq_len = max_seq_len
            past, present = kv_names(cfg.num_layers)
            for past_name, present_name, block in zip(past, present, self._kv.reshape(-1, *self._kv.shape[2:])):
                self._binding.bind_cpu_input(past_name, block)
                self._bind_output(present_name, block)

    def embed_ids(self, token_ids) -> np.ndarray:
        """Token ids [n] -> their embeddings [n, D]."""
        return self.table[np.asarray(token_ids, np.int64)]

    def step(self, inputs_embeds: np.ndarray, past: int) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [1, T, D] at positions ``past`` .. ``past + T - 1`` (the cache holds the ``past`` before
        them) -> logits [1, V] and hidden state [1, D] of the last position."""
        if self._kv is None:
            raise RuntimeError("OnnxLLM: no KV cache; call setup_caches first")
        tokens = inputs_embeds.shape[1]
        if past + tokens > self.max_seq_len:
            raise OptionError(f"the LLM step reaches position {past + tokens}, past the cache's {self.max_seq_len} "
                              "(setup_caches with a longer max_seq_len)")
        self._embeds = np.ascontiguousarray(inputs_embeds, np.float32)
        self._binding.bind_cpu_input("inputs_embeds", self._embeds)
        self._past_length[0] = past
        self._binding.bind_cpu_input("past_length", self._past_length)
        self.session.run_with_iobinding(self._binding)
        # Copies: the next step overwrites the bound buffers, and generation keeps mask hidden states.
        return self._logits.copy(), self._hidden.copy()

    def embed(self, token_ids: "torch.Tensor") -> "torch.Tensor":
        """Token ids (a torch tensor of any shape) -> their embeddings, a torch tensor [..., D]."""
        import torch

        return torch.from_numpy(self.table)[token_ids]

    def __call__(self, inputs_embeds: "torch.Tensor", input_pos: "torch.Tensor", kv_len: int | None = None
                 ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """:meth:`step` for torch tensors: positions ``input_pos`` (consecutive, from the cache's end) -> logits
        [1, 1, V], hidden [1, 1, D] of the last position. ``kv_len`` is implied by the positions (accepted for the
        shared interface)."""
        import torch

        logits, hidden = self.step(inputs_embeds.detach().float().cpu().numpy(), int(input_pos[0]))
        return torch.from_numpy(logits)[:, None], torch.from_numpy(hidden)[:, None]


class OnnxFolder:
    """An engine directory of the system ``system`` on ONNX Runtime: its manifest and files checked,
    sessions opened on first use.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per core).
    """

    backend = "onnx"
    system: str = ""  # a subclass names its system

    def __init__(self, folder: str | Path, *, threads: int | None = None) -> None:
        self.folder = Path(folder)
        check_threads(threads)
        self.manifest = read_manifest(self.folder)
        if self.manifest["backend"] != "onnx":
            raise CheckpointError(f"{self.folder}: a {self.manifest['backend']!r} engine; this backend runs "
                                  "'onnx' engines (TensorRT engines need the tensorrt backend, not built here)")
        named = manifest_system(self.manifest)
        if named != self.system:
            raise CheckpointError(f"{self.folder}: an engine of system {named!r}, not {self.system!r}; open it "
                                  "with Runtime.from_engine (edgeav run --engine), which picks the system")
        verify_files(self.folder, self.manifest)
        self.source = f"onnx engine {self.folder} ({self.manifest['precision']})"
        self.threads = threads
        self._sessions: dict[str, object] = {}

    def to(self, device, dtype=None) -> "OnnxFolder":
        """Itself: the engine runs on the CPU with fp32 inputs (``dtype`` None, or torch's float32)."""
        if str(device).split(":")[0] != "cpu" or dtype is not None and str(dtype) != "torch.float32":
            raise OptionError("the onnx backend runs on the CPU with fp32 inputs; the precision is the engine's "
                              "(drop --device/--dtype, or export another --precision)")
        return self

    def session(self, name: str):
        if name not in self._sessions:
            ort = onnxruntime()
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

    def embed_table(self, name: str, config) -> np.ndarray:
        """The embedding table ``name`` (a listed .npy), which must be float32 [vocab, hidden] of ``config.llm``."""
        path = self.folder / name
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable embedding table ({e}); export the engine again") from None
        shape = (config.llm.vocab_size, config.llm.hidden_size)
        if table.shape != shape or table.dtype != np.float32:
            raise CheckpointError(f"{path}: a {table.dtype} table of shape {table.shape}, the model config needs "
                                  f"float32 {shape}; export the engine again")
        return table

    def read_tokenizer(self, config, vocabulary: AddedVocabulary) -> Tokenizer:
        """The engine's tokenizer (:func:`engine_tokenizer`)."""
        return engine_tokenizer(self.folder, self.manifest, config, vocabulary)


def engine_tokenizer(folder: Path, manifest: dict, config, vocabulary: AddedVocabulary) -> Tokenizer:
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
    return Tokenizer(read_listed_file(folder, manifest, model_name), config.llm, vocabulary,
                     source=str(folder / model_name), settings=settings)


def numpy_of(array) -> np.ndarray:
    """A contiguous fp32 host array of ``array``, a numpy array or a torch tensor (what the graphs take)."""
    if not isinstance(array, np.ndarray):
        array = array.detach().float().cpu().numpy()
    return np.ascontiguousarray(array, np.float32)


def like(template, array: np.ndarray):
    """A graph's output ``array`` in the kind of ``template``, the input it came from: itself when that was a
    numpy array, else a torch tensor (callers on torch's interface get torch back)."""
    if isinstance(template, np.ndarray):
        return array
    import torch

    return torch.from_numpy(array)


__all__ = ["OnnxFolder", "OnnxLLM", "engine_tokenizer", "like", "numpy_of", "onnxruntime"]
