"""The LLM-only bench's contenders (:mod:`edgeav.bench.llm_bench`), each behind one small interface, and the
files they run from.

A contender holds one LLM and a KV cache for ``context`` positions: :meth:`prefill` runs a prompt of token ids
on an empty cache and returns the fp32 logits [vocab] of its last position; :meth:`step` appends one token
and returns the next logits. The contenders:

- :class:`TorchLLM`: edgeav's reference :class:`~edgeav.models.llama.Llama` (its forward returns every
  position's logits, as the runtime's prefill computes them);
- :class:`TransformersLLM`: transformers' ``LlamaForCausalLM`` holding the very same tensors (``assign``, no
  copy), its default attention, a ``DynamicCache``, only the last position's logits;
- :class:`OnnxRuntimeLLM`: edgeav's exported LLM graph (:class:`~edgeav.export.graphs.LLMGraph`) on ONNX
  Runtime through :class:`~edgeav.engines.onnx.OnnxLLM`, the runtime's own IO-bound cache;
- :class:`LlamaCppLLM`: a GGUF file (:mod:`edgeav.export.gguf`) on llama.cpp through llama-cpp-python's C
  API (``llama_decode`` on one sequence; its defaults: flash attention auto, an F16 KV cache).

The files (:func:`onnx_graph`, :func:`gguf_file`) are kept in ``$EDGEAV_CACHE/llm-bench`` under a key of the
weights, the precision and the tools, so a second run traces, quantizes and writes nothing.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from edgeav.engines.manifest import DEFAULT_INT4_ACCURACY
from edgeav.errors import OptionError
from edgeav.export.exporter import cache_dir, code_digest
from edgeav.models.llama import Llama
from edgeav.outputs import usual_folder_mode

Progress = Callable[[str], None]
LLAMA_CPP_INSTALL = "pip install 'edgeav[bench]' (or pip install llama-cpp-python gguf)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise OptionError(f"llama-cpp-python not installed; {LLAMA_CPP_INSTALL}") from None
    return llama_cpp


# -- contenders --------------------------------------------------------------------------------------------


class _Contender:
    """What the bench times: ``prefill(ids)`` on an empty cache, then one ``step(token)`` at a time, each
    returning the last position's logits; a contender gives ``_reset`` and ``_run``."""

    def _reset(self) -> None:
        raise NotImplementedError

    def _run(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._reset()
        return self._run(ids)

    def step(self, token: int) -> np.ndarray:
        return self._run([token])


class TorchLLM(_Contender):
    """edgeav's reference LLM (fp32 or the dtype its weights have)."""

    def __init__(self, llm: Llama, context: int) -> None:
        self.llm = llm.eval()
        self.llm.setup_caches(1, context)
        self.position = 0

    @torch.inference_mode()
    def _run(self, ids: list[int]) -> np.ndarray:
        positions = torch.arange(self.position, self.position + len(ids))
        logits, _ = self.llm(self.llm.embed(torch.tensor([ids])), positions, self.position + len(ids))
        self.position += len(ids)
        return logits[0, -1].float().numpy()

    def _reset(self) -> None:
        self.position = 0

    def close(self) -> None:
        for layer in self.llm.model.layers:
            layer.self_attn.kv_cache = None


class TransformersLLM(_Contender):
    """transformers' ``LlamaForCausalLM`` on ``llm``'s own tensors (shared, not copied), fp32."""

    def __init__(self, llm: Llama, context: int) -> None:
        import transformers

        cfg = llm.cfg
        config = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_seq_len, bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id,
            pad_token_id=cfg.pad_id, tie_word_embeddings=False)
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        state = {k: v for k, v in llm.state_dict().items() if k.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_route")}
        model.load_state_dict(state, strict=True, assign=True)
        # Built on the meta device: the rotary buffers (not in any state dict) are made again on the CPU.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        self.model = model.eval()
        self.cache = None
        self.cache_class = transformers.DynamicCache
        self.attention = model.config._attn_implementation
        # transformers 5.2x names the cache argument and output "cache", earlier releases "past_key_values".
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def _run(self, ids: list[int]) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1,
                         **{self.cache_name: self.cache})
        self.cache = getattr(out, self.cache_name)
        return out.logits[0, -1].float().numpy()

    def _reset(self) -> None:
        self.cache = self.cache_class()

    def close(self) -> None:
        self.cache = None


class OnnxRuntimeLLM(_Contender):
    """An exported LLM graph on ONNX Runtime's CPU provider with ``threads`` intra-op threads (as
    :class:`edgeav.engines.onnx.OnnxFolder` opens its sessions) behind the runtime's :class:`OnnxLLM`."""

    def __init__(self, graph: Path, embed_table: np.ndarray, llm_config, context: int, threads: int) -> None:
        from edgeav.engines.onnx import OnnxLLM, onnxruntime

        ort = onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.llm = OnnxLLM(session, embed_table, SimpleNamespace(llm=llm_config))
        self.llm.setup_caches(1, context)
        self.position = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        embeds = self.llm.embed(torch.tensor([ids]))
        logits, _ = self.llm(embeds, torch.arange(self.position, self.position + len(ids)))
        self.position += len(ids)
        return logits[0, -1].numpy()

    def _reset(self) -> None:
        self.position = 0

    def close(self) -> None:
        self.llm = None


@functools.cache
def _silence_llama_cpp() -> None:
    """Route llama.cpp's log (hundreds of lines per model load) nowhere; errors surface as return codes."""
    llama_cpp = import_llama_cpp()
    callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
    _silence_llama_cpp.callback = callback  # the C side keeps only a pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


class LlamaCppLLM(_Contender):
    """A GGUF file on llama.cpp's CPU backend: ``n_threads`` = ``n_threads_batch`` = ``threads``, a context of
    ``context`` positions, llama.cpp's default batch (2048), micro-batch (512), flash attention (auto) and KV
    cache type (F16). ``extra_buffers`` False turns llama.cpp's extra weight buffers (AMX, CPU_REPACK) off;
    ``repack`` then names the tensors (a regular expression) that go on CPU_REPACK all the same. ``exact``:
    an F32 KV cache and no flash attention (whose CPU kernel rounds q to F16), so that an F32 file computes
    in fp32 throughout (parity checks)."""

    def __init__(self, path: Path, vocab_size: int, context: int, threads: int, *, extra_buffers: bool = True,
                 repack: str | None = None, exact: bool = False) -> None:
        llama_cpp = import_llama_cpp()
        _silence_llama_cpp()
        self.api, self.vocab_size = llama_cpp, vocab_size
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = extra_buffers
        self._overrides = None  # held: llama.cpp reads the list while it loads
        if repack is not None:
            self._overrides = _repack_overrides(repack)
            params.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise OptionError(f"{path}: llama.cpp cannot load it; write it again (edgeav.export.gguf)")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context
        context_params.n_threads = context_params.n_threads_batch = threads
        if exact:
            context_params.type_k = context_params.type_v = 0  # GGML_TYPE_F32
            context_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.context = llama_cpp.llama_init_from_model(self.model, context_params)
        if not self.context:
            llama_cpp.llama_model_free(self.model)
            raise OptionError(f"{path}: llama.cpp cannot make a context of {context} positions for it")
        self.memory = llama_cpp.llama_get_memory(self.context)

    def _run(self, ids: list[int]) -> np.ndarray:
        tokens = (self.api.llama_token * len(ids))(*ids)
        status = self.api.llama_decode(self.context, self.api.llama_batch_get_one(tokens, len(ids)))
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} for {len(ids)} tokens")
        logits = self.api.llama_get_logits_ith(self.context, -1)
        return np.ctypeslib.as_array(logits, shape=(self.vocab_size,)).copy()

    def _reset(self) -> None:
        self.api.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self.context:
            self.api.llama_free(self.context)
            self.context = None
        if self.model:
            self.api.llama_model_free(self.model)
            self.model = None


class _BufferOverride(ctypes.Structure):
    """llama.cpp's ``llama_model_tensor_buft_override``: tensors whose name matches ``pattern`` go to ``buft``."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _repack_overrides(pattern: str) -> ctypes.Array:
    """A NULL-terminated override list sending the tensors matching ``pattern`` to the CPU backend's
    CPU_REPACK buffer type (found through ggml's backend registry)."""
    from llama_cpp import _ggml

    ggml = _ggml.libggml
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_backend_buft_name.restype = ctypes.c_char_p
    ggml.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    device = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    address = ggml.ggml_backend_reg_get_proc_address(ggml.ggml_backend_dev_backend_reg(device),
                                                     b"ggml_backend_dev_get_extra_bufts")
    extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(device)
    found = {}
    index = 0
    while extra[index]:
        found[ggml.ggml_backend_buft_name(extra[index]).decode()] = extra[index]
        index += 1
    if "CPU_REPACK" not in found:
        raise RuntimeError(f"llama.cpp's CPU backend has no CPU_REPACK buffers (it has {', '.join(found) or 'none'})")
    return (_BufferOverride * 2)(_BufferOverride(pattern.encode(), found["CPU_REPACK"]), _BufferOverride(None, None))


# llama.cpp repacks Q4_0 matrices for AVX2/AVX-512 (rows in multiples of 8: every projection here); Q8_0, F16
# and F32 stay on its plain CPU buffers on x86 whatever the extra buffers.
REPACKED_Q4_0 = r"blk\.[0-9]+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight"

_PROBE = textwrap.dedent("""
    import ctypes, sys
    import llama_cpp as L
    quiet = L.llama_log_callback(lambda *a: None)  # held: llama.cpp keeps only the pointer
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    model = L.llama_model_load_from_file(sys.argv[1].encode(), L.llama_model_default_params())
    params = L.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 64, 1, 1
    context = L.llama_init_from_model(model, params)
    tokens = (L.llama_token * 8)(*range(3, 11))
    sys.exit(L.llama_decode(context, L.llama_batch_get_one(tokens, 8)))
""")


@functools.cache
def llama_cpp_buffers(probe_gguf: Path) -> tuple[str | None, str]:
    """Whether llama.cpp's default weight buffers run here: a child process decodes 8 tokens of the small
    Q4_0 file ``probe_gguf`` with the defaults. -> (``buffers`` for :class:`LlamaCppLLM`, a note). Where the
    defaults crash (a CPU that reports AMX to a VM that does not enable it: ggml's AMX kernels fault on
    their first tile load), the weights go where llama.cpp puts them on a CPU without AMX: Q4_0 matrices
    on CPU_REPACK, the rest on plain CPU buffers."""
    child = subprocess.run([sys.executable, "-c", _PROBE, str(probe_gguf)], capture_output=True, timeout=300)
    if child.returncode == 0:
        return None, "llama.cpp's default weight buffers"
    return REPACKED_Q4_0, (f"llama.cpp's default weight buffers crash here (a probe died, exit {child.returncode}; "
                           "on a VM that reports AMX but does not enable it, ggml's AMX kernels fault), so its "
                           "extra buffers are off but CPU_REPACK, which holds the Q4_0 matrices as on a CPU "
                           "without AMX")


# -- the files, cached -------------------------------------------------------------------------------------


def cache_root() -> Path:
    return cache_dir().parent / "llm-bench"


def weights_key(llm: Llama, tokenizer) -> str:
    """SHA-256 over the LLM's config, every tensor and the tokenizer's files (what every cached file depends on)."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(llm.cfg), sort_keys=True).encode())
    for name, data in sorted(tokenizer.files().items()):
        digest.update(f"tokenizer/{name}/{len(data)}".encode())
        digest.update(data)
    for name, tensor in sorted(llm.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_file(key: dict, name: str, build: Callable[[Path], None], progress: Progress) -> Path:
    """The file ``name`` of the cache entry of ``key`` (a JSON-able dict with the ``code`` digest), built by
    ``build(folder)`` into a fresh folder first when the entry is missing; an entry appears whole (a folder
    renamed into place), and entries of the file built by other code go."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    entry = cache_root() / f"{name}-{digest}"
    if (entry / name).is_file():
        progress(f"  {name}: from the cache ({entry})")
        return entry / name
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        build(work)
        (work / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
        work.chmod(usual_folder_mode())  # mkdtemp makes it private
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(work, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _drop_other_code(name, key["code"])
    return entry / name


def _drop_other_code(name: str, code: str) -> None:
    """Drop the cache entries of the file ``name`` that an other version of edgeav's code built (each code change
    re-keys them, and a 7 B model's files are gigabytes)."""
    for folder in cache_root().glob(f"{name}-*"):  # entries being built are hidden (".name-..."), not matched
        try:
            stale = json.loads((folder / "key.json").read_text()).get("code") != code
        except (OSError, ValueError):
            stale = True
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _tools() -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


def onnx_graph(llm: Llama, weights: str, precision: str, progress: Progress, block_size: int) -> Path:
    """edgeav's LLM graph of ``llm`` (weights digest ``weights``) with the LLM at ``precision``: fp32 or fp16
    (traced), or a weight-only one (:data:`~edgeav.engines.manifest.WEIGHT_ONLY_BITS`: MatMulNBits in blocks of
    ``block_size``, accuracy level :data:`DEFAULT_INT4_ACCURACY`) quantized from the cached fp32 graph, with the exporter's
    own functions."""
    from edgeav.engines.manifest import WEIGHT_ONLY_BITS
    from edgeav.export.exporter import heartbeat
    from edgeav.export.trace import Float16IO, export_graph, quiet_loggers
    from edgeav.export.graphs import LLMGraph, llm_example, llm_spec

    def trace(folder: Path) -> None:
        module = LLMGraph(llm, fused=True)
        module = module if precision == "fp32" else Float16IO(module)
        with heartbeat(progress, f"  onnx {precision}: tracing the LLM graph"), torch.no_grad():
            export_graph(module, llm_spec(llm.cfg, fused=True), llm_example(llm.cfg), folder / "llm.onnx")

    def quantize(folder: Path) -> None:
        from edgeav.export.quantize import quantize_weights

        source = onnx_graph(llm, weights, "fp32", progress, block_size)  # fp32: no blocks, one graph
        with heartbeat(progress, f"  onnx {precision}: quantizing the LLM graph (MatMulNBits)"), quiet_loggers():
            quantize_weights(source, folder / "llm.onnx", WEIGHT_ONLY_BITS[precision], block_size, llm,
                             DEFAULT_INT4_ACCURACY)

    key = {"weights": weights, "precision": precision, "tools": _tools(), "code": code_digest()}
    if precision in WEIGHT_ONLY_BITS:
        key.update(block_size=block_size, accuracy_level=DEFAULT_INT4_ACCURACY)
        return cached_file(key, "llm.onnx", quantize, progress)
    return cached_file(key, "llm.onnx", trace, progress)


def gguf_file(llm: Llama, tokenizer, weights: str, precision: str, progress: Progress) -> Path:
    """``llm`` as a GGUF file at ``precision`` (:data:`edgeav.export.gguf.GGML_TYPES`)."""
    from edgeav.export.exporter import heartbeat
    from edgeav.export.gguf import GGML_TYPES, write_gguf

    def write(folder: Path) -> None:
        with heartbeat(progress, f"  llama.cpp {precision}: writing the {GGML_TYPES[precision][0]} GGUF"):
            write_gguf(llm, tokenizer, folder / "llm.gguf", precision=precision)

    key = {"weights": weights, "precision": precision, "gguf": package_version("gguf"), "code": code_digest()}
    return cached_file(key, "llm.gguf", write, progress)


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of weights one decode step of ``path``'s model reads: every tensor, of the embedding one row."""
    import gguf

    reader = gguf.GGUFReader(path)
    total = 0
    for tensor in reader.tensors:
        rows = int(tensor.shape[-1]) if tensor.name == "token_embd.weight" else 1
        total += int(tensor.n_bytes) // rows
    return total
