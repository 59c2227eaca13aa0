"""Qwen2.5 text models as Hugging Face releases them (Qwen2.5-0.5B to 7B, base or Instruct:
``Qwen2ForCausalLM``) on edgeav's decoder and tokenizer, answering ChatML prompts greedily.

A release folder holds ``config.json``, the weights as ``model.safetensors`` or as shards that
``model.safetensors.index.json`` lists, and the tokenizer (``tokenizer.json`` and/or ``vocab.json`` +
``merges.txt``, with ``tokenizer_config.json``). Only safetensors are read: nothing in the folder runs.

The text model is the Qwen2.5-Omni thinker's (:func:`edgeav.qwen_thinker.qwen_llm`) with plain RoPE over
one position stream instead of M-RoPE. The small releases tie the output head to the token embeddings
and save no ``lm_head.weight``. No system owns it: OpenAVS runs it as its local translator
(``--translator-checkpoint``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import CheckpointError, EdgeavError, OptionError
from edgeav.decoding import ensure_cache
from edgeav.generate import generate
from edgeav.models.llama import Llama
from edgeav.qwen_thinker import qwen_llm
from edgeav.qwen_tokenizer import (
    ENDOFTEXT, IM_END, IM_START, MERGES_FILE, TOKENIZER_FILE, VOCAB_FILE, QwenTokenizer, chat_ids,
)
from edgeav.weight_files import CONFIG_FILE, file_head, parse_json, read_json, read_safetensors

ARCHITECTURE = "Qwen2ForCausalLM"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_RELEASE = "a Qwen2.5 text release (e.g. Qwen2.5-1.5B-Instruct)"

__all__ = ["ARCHITECTURE", "QwenTextConfig", "QwenTextModel", "QwenTextTokenizer", "check_text_checkpoint",
           "load_text_llm", "load_text_model", "read_text_config"]


class QwenTextTokenizer(QwenTokenizer):
    """Qwen2.5's tokenizer: ChatML's three special tokens at Qwen's ids (the Omni thinker's media tokens
    are other tokens there)."""

    required_ids = {"<|endoftext|>": ENDOFTEXT, "<|im_start|>": IM_START, "<|im_end|>": IM_END}
    release = "Qwen2.5"


@dataclass(frozen=True)
class QwenTextConfig:
    """What a release's ``config.json`` fixes: the decoder's shapes and whether the head is the embeddings."""

    llm: LLMConfig
    tie_word_embeddings: bool


def _refuse(path: Path, problem: str, fix: str = "copy config.json again from the release") -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; {fix}")


def read_text_config(folder: str | Path) -> QwenTextConfig:
    """The model ``folder/config.json`` declares, refused in one line unless it is a Qwen2ForCausalLM that
    this decoder computes exactly (full attention, RoPE without scaling, SiLU MLP)."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder; pass the folder of {_RELEASE}")
    if not path.is_file():
        raise CheckpointError(f"{folder}: has no {CONFIG_FILE}; pass the folder of {_RELEASE}, holding its "
                              f"{CONFIG_FILE}, weights and tokenizer")
    hf = read_json(path, "copy config.json again from the release")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        raise _refuse(path, f"architectures is {architectures!r}, not a list")
    if ARCHITECTURE not in architectures and not (not architectures and hf.get("model_type") == "qwen2"):
        named = ", ".join(map(str, architectures)) or f"model_type {hf.get('model_type')!r}"
        raise CheckpointError(f"{path}: a {named} checkpoint; only {ARCHITECTURE} (Qwen2.5 text) checkpoints run "
                              f"as translators: pass the folder of {_RELEASE}")
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise _refuse(path, f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not built (plain RoPE only)",
                      "remove rope_scaling, as the release ships it")
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
        raise _refuse(path, "sliding-window attention is not built (full attention only)",
                      "set use_sliding_window to false, as the release ships it")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(path, f"hidden_act {hf['hidden_act']!r} is not Qwen2's silu")
    try:
        heads = int(hf["num_attention_heads"])
        llm = qwen_llm(hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
                       num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                       intermediate_size=int(hf["intermediate_size"]), base_vocab_size=int(hf["vocab_size"]),
                       rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                       rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
                       max_seq_len=int(hf.get("max_position_embeddings", 32768)), mrope_section=None)
    except KeyError as e:
        raise _refuse(path, f"has no {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise _refuse(path, f"holds a value that is not a number ({e})") from None
    sizes = (llm.hidden_size, llm.num_layers, llm.num_heads, llm.num_kv_heads, llm.intermediate_size,
             llm.base_vocab_size, llm.max_seq_len)
    if min(sizes) < 1 or llm.hidden_size % llm.num_heads or llm.num_heads % llm.num_kv_heads:
        raise _refuse(path, "its sizes cannot build a model (hidden_size must divide by num_attention_heads and "
                            "that by num_key_value_heads, every size at least 1)")
    if hf.get("head_dim") not in (None, llm.head_dim):
        raise _refuse(path, f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads = {llm.head_dim}, "
                            "which this decoder computes")
    return QwenTextConfig(llm, bool(hf.get("tie_word_embeddings", False)))


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights: ``model.safetensors``, or the shards the index lists."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "copy the index again from the release").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map of weight: file; copy the index again from the release")
        names = sorted(set(weight_map.values()), key=str)
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: lists {name!r}, not a .safetensors file beside it; copy the index "
                                      "again from the release")
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing, but {INDEX_FILE} lists it; download every shard "
                                      "of the release")
        return [folder / name for name in names]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    hint = f" ({pickled[0]} is a pickle, which edgeav does not read)" if pickled else ""
    raise CheckpointError(f"{folder}: has no {WEIGHTS_FILE} nor {INDEX_FILE}{hint}; download the release's "
                          "safetensors weights")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as the safetensors header of ``path`` lists it, reading the header only; a file
    whose header does not account for its size exactly (a download cut short) is refused."""
    fix = "the download or copy did not finish: download the file again"
    size, head = file_head(path)  # an empty file and a Git LFS pointer are refused there
    length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else size
    if length > size - 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for its own header; {fix}")
    try:
        with open(path, "rb") as file:
            file.seek(8)
            header = parse_json(file.read(length), path, f"it is not a safetensors file, or {fix}")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check that it is a readable file") from None
    try:
        tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
        shapes = {key: tuple(int(n) for n in entry["shape"]) for key, entry in tensors.items()}
        end = max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(f"{path}: its header lists a tensor without shape or data offsets; {fix}") from None
    if 8 + length + end != size:
        raise CheckpointError(f"{path}: {size} bytes where its header describes {8 + length + end}; {fix}")
    return shapes


def _skipped(key: str, config: QwenTextConfig) -> bool:
    """Weights a release may hold that are not read: RoPE's tables (computed here) and, when tied, the head
    (it is the embeddings, as transformers ties it)."""
    return key.endswith(".rotary_emb.inv_freq") or (key == "lm_head.weight" and config.tie_word_embeddings)


def _check_weights(folder: Path, config: QwenTextConfig, llm: Llama) -> list[Path]:
    """The weight files, refused in one line unless their headers hold every weight of ``llm`` (built from
    ``config``, on the meta device) at its shape, and nothing else."""
    expected = {key: tuple(value.shape) for key, value in llm.state_dict().items() if not _skipped(key, config)}
    files = _weight_files(folder)
    found: set[str] = set()
    for path in files:
        for key, shape in _header_shapes(path).items():
            if _skipped(key, config):
                continue
            if key not in expected:
                raise CheckpointError(f"{path}: holds {key!r}, which the {config.llm.num_layers}-layer "
                                      f"{ARCHITECTURE} of {CONFIG_FILE} has no place for; copy the weights and "
                                      f"{CONFIG_FILE} from one release")
            if shape != expected[key]:
                raise CheckpointError(f"{path}: {key} has shape {list(shape)}, {CONFIG_FILE}'s model needs "
                                      f"{list(expected[key])}; copy the weights and {CONFIG_FILE} from one release")
            found.add(key)
    missing = sorted(set(expected) - found)
    if missing == ["lm_head.weight"]:
        raise CheckpointError(f"{folder / CONFIG_FILE}: says tie_word_embeddings is false, but no weight file holds "
                              "lm_head.weight; copy config.json and the weights from one release")
    if missing:
        raise CheckpointError(f"{folder}: no weight {missing[0]!r} in {', '.join(p.name for p in files)} "
                              f"({len(missing)} missing); the weights are incomplete: download them again")
    return files


def _meta_llm(config: QwenTextConfig) -> Llama:
    with torch.device("meta"):
        return Llama(config.llm, LoRAConfig(targets=()))


def _tokenizer_files(folder: Path) -> None:
    if not (folder / TOKENIZER_FILE).is_file() and not ((folder / VOCAB_FILE).is_file()
                                                        and (folder / MERGES_FILE).is_file()):
        raise CheckpointError(f"{folder}: has no {TOKENIZER_FILE}, nor {VOCAB_FILE} and {MERGES_FILE}; copy the "
                              "release's tokenizer files into it")


def _checked(folder: Path) -> tuple[QwenTextConfig, Llama, list[Path]]:
    """The config, the decoder on the meta device and the weight files, once everything that can be checked
    without reading a weight is: the config, every weight file there and whole (its safetensors header
    against its size and the decoder's shapes), the tokenizer files."""
    config = read_text_config(folder)
    llm = _meta_llm(config)
    files = _check_weights(folder, config, llm)
    _tokenizer_files(folder)
    return config, llm, files


def check_text_checkpoint(folder: str | Path) -> QwenTextConfig:
    """The release's config, once :func:`_checked` found nothing wrong with its files."""
    return _checked(Path(folder))[0]


class QwenTextModel:
    """A Qwen2.5 text model and its tokenizer, answering ChatML prompts greedily."""

    def __init__(self, config: QwenTextConfig, llm: Llama, tokenizer: QwenTextTokenizer, source: str) -> None:
        self.config, self.llm, self.tokenizer, self.source = config, llm, tokenizer, source

    @torch.inference_mode()
    def chat(self, system: str, user: str, *, max_new_tokens: int) -> tuple[str, str]:
        """One greedy answer to the ``system`` prompt and ``user`` turn, at most ``max_new_tokens`` tokens ->
        (text, why it stopped: "eos" at <|im_end|>, "max_new_tokens" or "repetition")."""
        ids = chat_ids(self.tokenizer, [("text", user)], system=system)
        context = self.config.llm.max_seq_len
        if len(ids) >= context:
            raise OptionError(f"{self.source}: the prompt has {len(ids)} tokens, the model's context is {context}; "
                              "shorten it")
        ensure_cache(self.llm, len(ids) + max_new_tokens, context)
        embeds = self.llm.embed(torch.tensor(ids, device=self.llm.lm_head.weight.device))[None]
        generation = generate(self.llm, embeds, max_new_tokens=max_new_tokens, eos_id=self.config.llm.eos_id)
        return self.tokenizer.decode(generation.token_ids, skip_special=True).strip(), generation.stopped_by


def _state(files: list[Path], config: QwenTextConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """The weights of ``files`` (checked by :func:`_check_weights`) on ``device`` in ``dtype``, converted one
    tensor at a time and each read tensor dropped once converted: besides the converted weights, memory holds
    at most what is left of one shard."""
    state = {}
    for path in files:
        tensors = read_safetensors(path)
        for key in list(tensors):
            tensor = tensors.pop(key)
            if not _skipped(key, config):
                state[key] = tensor.to(device=device, dtype=dtype)
    return state


def load_text_llm(folder: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[QwenTextConfig, Llama]:
    """The config and decoder of the Qwen2.5 text release in ``folder`` (its tokenizer unread), on ``device``
    in ``dtype``; every problem with its files is a one-line :class:`CheckpointError` naming the file and
    the fix, found from config.json and the safetensors headers before any weight is read."""
    folder = Path(folder)
    config = read_text_config(folder)
    llm = _meta_llm(config)
    return config, _fill(llm, _check_weights(folder, config, llm), config, torch.device(device), dtype)


def _fill(llm: Llama, files: list[Path], config: QwenTextConfig, device: torch.device, dtype: torch.dtype) -> Llama:
    """The meta-device ``llm`` given the weights of the checked ``files``, the head tied when the config says."""
    state = _state(files, config, device, dtype)
    tied = config.tie_word_embeddings
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    llm.load_state_dict(state, strict=True, assign=True)
    if tied:
        llm.lm_head.weight = llm.model.embed_tokens.weight
    return llm.eval()


def load_text_model(folder: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> QwenTextModel:
    """The Qwen2.5 text release in ``folder`` with its tokenizer (see :func:`load_text_llm`); the files are
    checked, and the tokenizer read, before any weight is."""
    folder = Path(folder)
    config, llm, files = _checked(folder)
    try:
        tokenizer = QwenTextTokenizer.from_dir(folder)
    except EdgeavError as e:
        raise CheckpointError(str(e)) from None
    if tokenizer.vocab_size > config.llm.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has ids up to {tokenizer.vocab_size - 1}, the model's "
                              f"vocabulary ({CONFIG_FILE} vocab_size) {config.llm.vocab_size}; copy the tokenizer "
                              "and the model from one release")
    return QwenTextModel(config, _fill(llm, files, config, torch.device(device), dtype), tokenizer, str(folder))
