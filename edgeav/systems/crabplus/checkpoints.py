"""Crab+ checkpoints: the released layout, edgeav's converted layout, synthetic weights.

Released layout (CRABPLUS_SPEC section 3), one folder::

    config.json                      Qwen2.5-Omni's (thinker_config: audio_config, vision_config, text_config)
    model*.safetensors (+ model.safetensors.index.json)
                                     thinker.audio_tower.*, thinker.visual.*, thinker.model.*, thinker.lm_head.*
                                     (talker.* and token2wav.* are skipped: the runtime never speaks)
    vocab.json + merges.txt or tokenizer.json (+ tokenizer_config.json)
    finetune_weights.bin             the routed I-LoRA: 1940 tensors for the 7B (5 per wrapped linear)
    sam2.1_hiera_large.pt            SAM2.1 ({"model": ...}); the image predictor's parts are read

Every ``.bin``/``.pt`` is read with ``torch.load(weights_only=True)``. The authors load the LoRA with
``strict=False``, so a prefix mismatch silently loads nothing; here every wrapped linear must find
its five tensors, or the file is refused in one line.

Converted layout (``edgeav convert``): ``config.json`` (format, ``system: crabplus``, the model
config), ``model.safetensors`` under :class:`~edgeav.systems.crabplus.model.CrabPlusModel` names
(SAM2 included), and the tokenizer's files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from edgeav.errors import CheckpointError, EdgeavError
from edgeav.models.ilora import ILoRALinear
from edgeav.models.sam2 import SAM2_PRESETS, Sam2, load_sam2_state_dict, sam2_config
from edgeav.qwen_thinker import THINKER_PREFIX, ThinkerShapes, hf_config, released_thinker_key, thinker_shapes_from_hf
from edgeav.qwen_tokenizer import QwenTokenizer, write_synthetic_tokenizer
from edgeav.systems.crabplus.config import PRESETS, CrabPlusConfig, preset
from edgeav.systems.crabplus.model import CrabPlusModel
from edgeav.weight_files import (
    read_converted_config,
    CONFIG_FILE, FORMAT, FORMAT_VERSION, converted_system, read_json, read_safetensors, read_weights,
    write_safetensors,
)

ARCHITECTURES = ("Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration")
LORA_FILE = "finetune_weights.bin"
LORA_PREFIX = "base_model.model."
SAM2_FILE = "sam2.1_hiera_large.pt"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LORA_PART_NAMES = ("lora_A.weight", "lora_B0.weight", "lora_B1.weight", "lora_B2.weight", "lora_route.weight")
LORA_PARTS = len(_LORA_PART_NAMES)  # per wrapped linear (3 heads)


@dataclass
class LoadedCrabPlus:
    """A Crab+ model with its weights and tokenizer."""

    system: ClassVar[str] = "crabplus"
    config: CrabPlusConfig
    model: CrabPlusModel
    tokenizer: QwenTokenizer
    source: str

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoadedCrabPlus":
        self.model.to(device=device, dtype=dtype)
        return self


def recognises(folder: Path) -> bool:
    converted = converted_system(folder)
    if converted is not None:
        return converted == "crabplus"
    if (folder / LORA_FILE).is_file() and (folder / SAM2_FILE).is_file():
        return True  # the released layout's own files, whatever state its config.json is in
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and any(a in ARCHITECTURES for a in config.get("architectures") or [])


# -- the released layout --------------------------------------------------------------


def _lora_ours(key: str) -> str | None:
    if not key.startswith(LORA_PREFIX):
        return None
    key = key[len(LORA_PREFIX):]
    return "llm." + key if key.startswith("model.") else key


def _config_from_release(hf: dict, folder: Path, lora_rank: int, sam2: str,
                          preset_name: str | None) -> CrabPlusConfig:
    shapes = thinker_shapes_from_hf(hf, folder)
    base = preset(preset_name) if preset_name else PRESETS["crabplus-7b"]
    lora = replace(base.lora, rank=lora_rank, alpha=2.0 * lora_rank)  # alpha 256 at r 128: scale 2
    config = replace(base, audio=shapes.audio, vision=shapes.vision, llm=shapes.llm, lora=lora, sam2=sam2,
                     tokens_per_second=shapes.tokens_per_second)
    same_shapes = [p.name for p in PRESETS.values() if replace(config, name=p.name) == p]
    if preset_name is not None and preset_name not in same_shapes:
        raise CheckpointError(f"{folder}: its shapes are not those of --preset {preset_name}; drop --preset")
    return replace(config, name=same_shapes[0] if same_shapes else "crabplus-custom")


def _sam2_preset(weights: dict[str, torch.Tensor], path: Path) -> str:
    """The SAM2.1 size whose image predictor has exactly the shapes of ``weights``."""
    for name in SAM2_PRESETS:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Sam2(sam2_config(name)).state_dict().items()}
        if all(k in weights and tuple(weights[k].shape) == shape for k, shape in shapes.items()):
            return name
    raise CheckpointError(f"{path}: matches none of the SAM2.1 models edgeav builds ({', '.join(SAM2_PRESETS)}); "
                          f"copy SAM2.1's {SAM2_FILE} again")


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: holds no weight_map; copy the file again")
        # Only the shards holding the thinker: the talker's are never read.
        names = sorted({str(f) for k, f in weight_map.items() if released_thinker_key(k) is not None})
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: the shard {missing[0]} that {INDEX_FILE} names is missing; copy every "
                                  "shard of Qwen2.5-Omni")
        return [folder / n for n in names]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors; give the folder holding Qwen2.5-Omni's weights "
                              f"with Crab+'s {LORA_FILE} and {SAM2_FILE}")
    return files


def _lora_rank(lora: dict[str, torch.Tensor], path: Path) -> int:
    ranks = {v.shape[0] for k, v in lora.items() if k.endswith("lora_A.weight") and v.dim() == 2}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: no single LoRA rank in its lora_A weights ({sorted(ranks) or 'none'}); "
                              "copy Crab+'s finetune_weights.bin again")
    return ranks.pop()


def load_released(folder: str | Path, preset_name: str | None = None) -> LoadedCrabPlus:
    folder = Path(folder)
    for name in (LORA_FILE, SAM2_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name}; Crab+ needs Qwen2.5-Omni's weights with Crab+'s {LORA_FILE} "
                                  f"and SAM2.1's {SAM2_FILE} in one folder")
    lora_path = folder / LORA_FILE
    lora = {}
    for key, value in read_weights(lora_path).items():
        ours = _lora_ours(key)
        if ours is None:
            raise CheckpointError(f"{lora_path}: key {key!r} is not under {LORA_PREFIX}; not Crab+'s LoRA file")
        lora[ours] = value
    sam2 = read_weights(folder / SAM2_FILE)
    sam2 = sam2.get("model", sam2) if isinstance(sam2.get("model"), dict) else sam2
    config = _config_from_release(read_json(folder / CONFIG_FILE), folder, _lora_rank(lora, lora_path),
                                  _sam2_preset(sam2, folder / SAM2_FILE), preset_name)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        state.update({ours: v for k, v in read_weights(path).items() if (ours := released_thinker_key(k)) is not None})
    model = _build(config, state, str(folder), lora=lora, lora_source=lora_path, sam2=sam2,
                   sam2_source=folder / SAM2_FILE)
    return LoadedCrabPlus(config, model, _tokenizer(folder), str(folder))


def _tokenizer(folder: Path) -> QwenTokenizer:
    try:
        return QwenTokenizer.from_dir(folder)
    except EdgeavError as e:
        raise CheckpointError(str(e)) from None


def _build(config: CrabPlusConfig, state: dict[str, torch.Tensor], source: str, *, lora=None, lora_source=None,
           sam2=None, sam2_source=None) -> CrabPlusModel:
    """The model with every weight loaded; ``lora`` and ``sam2`` come in their own files in the released layout
    (``state`` then holds the thinker's base weights), or inside ``state`` in the converted one."""
    try:
        model = CrabPlusModel(config).eval()
    except (RuntimeError, ValueError, EdgeavError) as e:  # impossible sizes in a hand-edited config
        raise CheckpointError(f"{source}: its model config cannot build a model ({str(e).splitlines()[0]}); "
                              "convert the released weights again") from None
    if sam2 is not None:
        try:
            load_sam2_state_dict(model.sam2, sam2, source=str(sam2_source))
        except EdgeavError as e:
            raise CheckpointError(str(e)) from None
    else:
        sam2_state = {k[len("sam2."):]: v for k, v in state.items() if k.startswith("sam2.")}
        state = {k: v for k, v in state.items() if not k.startswith("sam2.")}
        try:
            load_sam2_state_dict(model.sam2, sam2_state, source=source)
        except EdgeavError as e:
            raise CheckpointError(str(e)) from None
    if lora is not None:
        _check_lora(model, lora, lora_source)
        state = {**state, **lora}
    own = model.state_dict()
    expected = {k for k in own if not k.startswith("sam2.")}
    for key, value in state.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape) and ".lora_B" not in key:
            raise CheckpointError(f"{source}: weight {key!r} has shape {tuple(value.shape)}, the model config says "
                                  f"{tuple(own[key].shape)}; the config.json and the weights do not belong together")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a per-head LoRA B of the wrong shape (fused by the layer's load hook)
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"{source}: {detail}") from None
    missing = sorted(k for k in result.missing_keys if k in expected)
    if missing:
        raise CheckpointError(f"{source}: no weight {missing[0]!r} (and {len(missing) - 1} more); the checkpoint "
                              "is incomplete or not Crab+")
    unexpected = sorted(result.unexpected_keys)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weight {unexpected[0]!r}; it belongs to no part of Crab+")
    model.llm.setup_caches(1, min(256, config.llm.max_seq_len))
    return model


def _check_lora(model: CrabPlusModel, lora: dict[str, torch.Tensor], path) -> None:
    """Every wrapped linear finds its LoRA_PARTS tensors (the original's strict=False would load none silently)."""
    layers = {name for name, m in model.named_modules() if isinstance(m, ILoRALinear)}
    wanted = len(layers) * LORA_PARTS
    matched = sum(1 for k in lora if k.rsplit(".lora_", 1)[0] in layers)
    if matched < wanted or len(lora) != wanted:
        expected = {f"{layer}.{part}" for layer in layers for part in _LORA_PART_NAMES}
        absent = sorted(expected - set(lora))
        first = f" (first missing: {absent[0]})" if absent else ""
        raise CheckpointError(f"{path}: {matched} of its {len(lora)} tensors match the {wanted} LoRA weights this "
                              f"model wraps ({len(layers)} linears x {LORA_PARTS}){first}; use Crab+'s own {LORA_FILE} "
                              "with the base model it was trained on")


# -- the converted layout ------------------------------------------------------------


def load_converted(folder: Path, preset_name: str | None = None) -> LoadedCrabPlus:
    config = read_converted_config(folder, CrabPlusConfig.from_dict, preset_name)
    model = _build(config, read_safetensors(folder / MODEL_FILE), str(folder / MODEL_FILE))
    return LoadedCrabPlus(config, model, _tokenizer(folder), str(folder))


def load_checkpoint(folder: str | Path, preset_name: str | None = None) -> LoadedCrabPlus:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; check the path")
    if converted_system(folder) is not None:
        return load_converted(folder, preset_name)
    return load_released(folder, preset_name)


def save_converted(loaded: LoadedCrabPlus, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, folder / MODEL_FILE)
    loaded.tokenizer.save(folder)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "system": "crabplus",
            "config": loaded.config.to_dict(), "converted_from": loaded.source}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


# -- synthetic checkpoints -------------------------------------------------------------


def synthesize(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedCrabPlus:
    """A model of ``preset_name`` with random weights (every LoRA head active) and a small real byte-level
    BPE tokenizer whose special tokens sit at Qwen's ids; nothing stays on disk."""
    import tempfile

    config = preset(preset_name)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = CrabPlusModel(config).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, ILoRALinear):
                    nn.init.normal_(module.lora_B, std=0.02)  # zero B would hide the LoRA
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_tokenizer(tmp)
        tokenizer = QwenTokenizer.from_dir(tmp)
    with torch.no_grad():
        # The head rows of ids the small tokenizer lacks score 0: the noise is written in tokens that decode.
        unknown = torch.ones(config.llm.vocab_size, dtype=torch.bool)
        unknown[sorted(i for i in tokenizer.known_ids() if i < config.llm.vocab_size)] = False
        model.llm.lm_head.weight[unknown] = 0
    model.llm.setup_caches(1, min(256, config.llm.max_seq_len))
    return LoadedCrabPlus(config, model, tokenizer, f"{preset_name} (random weights, seed {seed})")


def _hf_config(config: CrabPlusConfig) -> dict:
    return hf_config(ThinkerShapes(config.audio, config.vision, config.llm, config.tokens_per_second),
                     ARCHITECTURES[1])


def save_released(loaded: LoadedCrabPlus, folder: str | Path) -> Path:
    """Write ``loaded`` in the released layout: the thinker's safetensors under ``thinker.*``, the LoRA as
    ``finetune_weights.bin`` under PEFT's names, SAM2 as ``sam2.1_hiera_large.pt``, the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    thinker, lora = {}, {}
    wrapped = {name: m for name, m in loaded.model.named_modules() if isinstance(m, ILoRALinear)}
    for prefix, module in loaded.model.thinker_modules().items():
        for key, value in module.state_dict().items():
            thinker[THINKER_PREFIX + prefix + key] = value.contiguous()
    for key in [k for k in thinker if ".lora_" in k]:
        del thinker[key]
    for name, layer in wrapped.items():
        released = name[len("llm."):] if name.startswith("llm.") else name
        for part, value in layer.peft_state_dict().items():
            lora[f"{LORA_PREFIX}{released}.{part}"] = value.contiguous()
    write_safetensors(thinker, folder / "model-00001-of-00001.safetensors")
    (folder / INDEX_FILE).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in thinker}}, indent=2) + "\n")
    torch.save(lora, folder / LORA_FILE)
    torch.save({"model": loaded.model.sam2.state_dict()}, folder / SAM2_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(_hf_config(loaded.config), indent=2) + "\n")
    loaded.tokenizer.save(folder)
    return folder
