"""u-LLaVA checkpoints: the released layout, edgeav's converted layout, synthetic weights.

Released layout (``jinxu95/ullava``, v1; ULLAVA_SPEC section 3), one folder::

    config.json                    architectures [UllavaForCausalLM], llm_config (the LLM and CLIP shapes)
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json   (or model*.safetensors)
                                   llm.model.*, llm.lm_head.*, llm.vision_encoder.vision_model.*,
                                   llm.vision_projector.*, visual_model.* (SAM), text_hidden_fcs.*
    tokenizer.model, tokenizer_config.json, added_tokens.json
    sam_vit_h_4b8939.pth           (optional) SAM's weights, when the shards hold no visual_model.*
    groundingdino_swint_ogc.pth    (optional) GroundingDINO for ``rec`` and ``ground``, with
    bert-base-uncased/vocab.txt    its caption vocabulary (the original fetches it from the hub)
Pickles are read with ``torch.load(weights_only=True)``; per-layer ``rotary_emb.inv_freq`` buffers
are dropped (RoPE is recomputed).

Converted layout (``edgeav convert``): ``config.json`` (format, ``system: ullava``, the model
config), ``model.safetensors`` under :class:`~edgeav.systems.ullava.model.UllavaModel` names, the
tokenizer files, and GroundingDINO as ``groundingdino.safetensors`` with its vocabulary when the
source had it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from edgeav.errors import CheckpointError, EdgeavError
from edgeav.grounding_files import (
    GROUNDING_CONVERTED, GROUNDING_FILE, GROUNDING_VOCAB, load_grounding, save_grounding, synthetic_grounding,
)
from edgeav.models.grounding_dino import GroundingDINO
from edgeav.models.sam import load_sam_state_dict
from edgeav.preprocess.grounding_dino import GroundingTokenizer
from edgeav.systems.ullava.config import ADDED_TOKENS, PRESETS, VOCABULARY, UllavaConfig, chat_prompt, preset
from edgeav.systems.ullava.model import UllavaModel
from edgeav.tokenizer import (
    TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, AddedToken, Tokenizer, TokenizerSettings, train_sentencepiece,
)
from edgeav.weight_files import (
    read_converted_config,
    CONFIG_FILE, FORMAT, FORMAT_VERSION, converted_system, read_json, read_safetensors, read_weights,
    write_safetensors,
)

ARCHITECTURE = "UllavaForCausalLM"
ADDED_TOKENS_FILE = "added_tokens.json"
SAM_FILE = "sam_vit_h_4b8939.pth"
MODEL_FILE = "model.safetensors"
INDEX_FILE = "pytorch_model.bin.index.json"
SHARDS = 2


@dataclass
class LoadedUllava:
    """A u-LLaVA model with its weights and tokenizer."""

    system: ClassVar[str] = "ullava"
    config: UllavaConfig
    model: UllavaModel
    tokenizer: Tokenizer
    source: str
    # GroundingDINO and its caption tokenizer (rec, ground), when the checkpoint has them.
    grounding: GroundingDINO | None = None
    grounding_tokenizer: GroundingTokenizer | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoadedUllava":
        self.model.to(device=device, dtype=dtype)
        if self.grounding is not None:  # fp32 as released: its deformable sampling is not made for half floats
            self.grounding.to(device=device)
        return self


def recognises(folder: Path) -> bool:
    converted = converted_system(folder)
    if converted is not None:
        return converted == "ullava"
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ARCHITECTURE in (config.get("architectures") or [])


# -- the released layout --------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """The weight files, every shard an index names checked to be there."""
    for index in (folder / INDEX_FILE, folder / "model.safetensors.index.json"):
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: holds no weight_map; copy the file again")
            missing = sorted({name for name in weight_map.values() if not (folder / str(name)).is_file()})
            if missing:
                raise CheckpointError(f"{folder}: the shard {missing[0]} that {index.name} names is missing; "
                                      "copy every shard of the checkpoint")
            return sorted(folder / name for name in set(weight_map.values()))
    files = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no pytorch_model*.bin or model*.safetensors; give the folder holding "
                              "u-LLaVA's released weights")
    return files


def _resolve_preset(config: dict, folder: Path, preset_name: str | None) -> UllavaConfig:
    llm = config.get("llm_config")
    if not isinstance(llm, dict):
        raise CheckpointError(f"{folder / CONFIG_FILE}: no llm_config; not a u-LLaVA stage-2 config")
    if llm.get("projector_type", "mlp") != "mlp":
        raise CheckpointError(f"{folder / CONFIG_FILE}: projector_type {llm.get('projector_type')!r}; edgeav runs "
                              "u-LLaVA's released 'mlp' projector (one Linear) only")
    shape = (llm.get("hidden_size"), llm.get("num_hidden_layers"), llm.get("vocab_size"))
    candidates = [preset(preset_name)] if preset_name else list(PRESETS.values())
    for candidate in candidates:
        if shape == (candidate.llm.hidden_size, candidate.llm.num_layers, candidate.llm.vocab_size):
            return UllavaConfig(**{**candidate.__dict__, "llm": type(candidate.llm)(**{
                **candidate.llm.__dict__, "rms_norm_eps": float(llm.get("rms_norm_eps", candidate.llm.rms_norm_eps)),
                "max_seq_len": int(llm.get("max_position_embeddings", candidate.llm.max_seq_len))})})
    names = preset_name or " or ".join(PRESETS)
    raise CheckpointError(f"{folder / CONFIG_FILE}: LLM of hidden {shape[0]}, {shape[1]} layers, vocabulary {shape[2]} "
                          f"matches no preset ({names}); pass the matching --preset")


def _check_added_tokens(folder: Path, config: UllavaConfig) -> None:
    path = folder / ADDED_TOKENS_FILE
    if not path.is_file():
        return
    added = read_json(path)
    expected = {token: config.token_id(token) for token in ADDED_TOKENS}
    if added != expected:
        raise CheckpointError(f"{path}: added tokens {added} differ from u-LLaVA v1's {expected}; this is not a v1 "
                              "checkpoint (v2's [LOC] layout is not supported)")


def _released_to_ours(key: str) -> str:
    for released, ours in (("llm.vision_encoder.", "vision_encoder."), ("llm.vision_projector.", "vision_projector.")):
        if key.startswith(released):
            return ours + key[len(released):]
    return key


def load_released(folder: str | Path, preset_name: str | None = None) -> LoadedUllava:
    folder = Path(folder)
    config = _resolve_preset(read_json(folder / CONFIG_FILE), folder, preset_name)
    _check_added_tokens(folder, config)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        state.update({_released_to_ours(k): v for k, v in read_weights(path).items()})
    if not any(k.startswith("visual_model.") for k in state):
        sam = folder / SAM_FILE
        if not sam.is_file():
            raise CheckpointError(f"{folder}: the weights hold no SAM (visual_model.*) and there is no {SAM_FILE}; "
                                  "copy SAM's checkpoint into the folder")
        state.update({"visual_model." + k: v for k, v in read_weights(sam).items()})
    model = _build(config, state, str(folder))
    return LoadedUllava(config, model, _tokenizer(folder, config), str(folder),
                        *_grounding(folder, GROUNDING_FILE, config))


def _tokenizer(folder: Path, config: UllavaConfig) -> Tokenizer:
    """The folder's tokenizer with stage 2's ``legacy=False`` where its config does not say (its
    scripts pass it; transformers 4.x would otherwise read an absent key as legacy)."""
    tokenizer = Tokenizer.from_file(folder / TOKENIZER_FILE, config.llm, VOCABULARY)
    settings_file = folder / TOKENIZER_CONFIG_FILE
    if settings_file.is_file() and read_json(settings_file).get("legacy") is not None:
        return tokenizer
    return Tokenizer(tokenizer.model_proto, config.llm, VOCABULARY, source=tokenizer.source,
                     settings=dataclasses.replace(tokenizer.settings, legacy=False))


def _grounding(folder: Path, name: str, config: UllavaConfig) -> tuple:
    """GroundingDINO and its tokenizer from ``folder`` (``name``: the weights file), or (None, None)."""
    path = folder / name
    if not path.is_file():
        return None, None
    return load_grounding(path, folder / GROUNDING_VOCAB, config.grounding)


def _build(config: UllavaConfig, state: dict[str, torch.Tensor], source: str) -> UllavaModel:
    try:
        model = UllavaModel(config).eval()
    except (RuntimeError, ValueError, EdgeavError) as e:  # impossible sizes in a hand-edited config
        raise CheckpointError(f"{source}: its model config cannot build a model ({str(e).splitlines()[0]}); "
                              "convert the released weights again") from None
    sam_state = {k: v for k, v in state.items() if k.startswith("visual_model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("visual_model.")}
    try:
        load_sam_state_dict(model.visual_model, sam_state, prefix="visual_model.", source=source)
    except EdgeavError as e:
        raise CheckpointError(str(e)) from None
    expected = {k for k in model.state_dict() if not k.startswith("visual_model.")}
    result = model.load_state_dict(rest, strict=False)
    missing = sorted(k for k in result.missing_keys if k in expected)
    if missing:
        raise CheckpointError(f"{source}: no weight {missing[0]!r} (and {len(missing) - 1} more); the checkpoint "
                              "is incomplete or not u-LLaVA v1")
    unexpected = sorted(k for k in result.unexpected_keys if "rotary_emb.inv_freq" not in k)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weight {unexpected[0]!r}; it belongs to no part of u-LLaVA v1")
    return model


# -- the converted layout ------------------------------------------------------------


def load_converted(folder: Path, preset_name: str | None = None) -> LoadedUllava:
    config = read_converted_config(folder, UllavaConfig.from_dict, preset_name)
    model = _build(config, read_safetensors(folder / MODEL_FILE), str(folder / MODEL_FILE))
    return LoadedUllava(config, model, _tokenizer(folder, config), str(folder),
                        *_grounding(folder, GROUNDING_CONVERTED, config))


def load_checkpoint(folder: str | Path, preset_name: str | None = None) -> LoadedUllava:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; check the path")
    if converted_system(folder) is not None:
        return load_converted(folder, preset_name)
    return load_released(folder, preset_name)


def save_converted(loaded: LoadedUllava, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, folder / MODEL_FILE)
    loaded.tokenizer.save(folder)
    if loaded.grounding is not None:
        save_grounding(loaded.grounding, loaded.grounding_tokenizer, folder, released=False)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "system": "ullava",
            "config": loaded.config.to_dict(), "converted_from": loaded.source}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


# -- synthetic checkpoints -------------------------------------------------------------


def synthetic_corpus() -> list[str]:
    from edgeav.systems.ullava.tasks import TASKS

    options = {"question": "What is the man holding?", "expression": "the red square on the left"}
    prompts = [chat_prompt(t.instruction(**({t.requires: options[t.requires]} if t.requires else {})))
               for t in TASKS.values()]
    answers = ["Sure. Info: [SEG]; [tag]red square[/tag].", "It is a cat sitting on a sofa.",
               "0123456789 red green blue yellow circle square triangle left right man woman dog"]
    return (prompts + answers) * 4


def _tokenizer_settings(base: int) -> TokenizerSettings:
    """Stage 2's settings: legacy=False, pad = unk, v1's added tokens in the decoder table."""
    special = {"bos_token": AddedToken("<s>"), "eos_token": AddedToken("</s>"), "unk_token": AddedToken("<unk>"),
               "pad_token": AddedToken("<unk>")}
    added = {base + i: AddedToken(token, special=token in VOCABULARY.special) for i, token in enumerate(ADDED_TOKENS)}
    return TokenizerSettings(legacy=False, special=special, added=added)


def synthesize(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedUllava:
    """A model of ``preset_name`` with random weights and a tokenizer trained on :func:`synthetic_corpus`."""
    config = preset(preset_name)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = UllavaModel(config).eval()
            grounding, grounding_tokenizer = synthetic_grounding(config.grounding)
        finally:
            torch.set_default_dtype(default_dtype)
    proto = train_sentencepiece(synthetic_corpus(), config.llm.base_vocab_size)
    tokenizer = Tokenizer(proto, config.llm, VOCABULARY, settings=_tokenizer_settings(config.llm.base_vocab_size))
    return LoadedUllava(config, model, tokenizer, f"{preset_name} (random weights, seed {seed})", grounding,
                        grounding_tokenizer)


def save_released(loaded: LoadedUllava, folder: str | Path) -> Path:
    """Write ``loaded`` in the released layout: two ``.bin`` shards with their index, the stage-2 config,
    the tokenizer with ``added_tokens.json`` (and the per-layer RoPE buffers transformers 4.29 saved)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    state = {}
    for key, value in loaded.model.state_dict().items():
        if key.startswith("vision_encoder."):
            key = "llm.vision_encoder.vision_model." + key[len("vision_encoder."):]
        elif key.startswith("vision_projector."):
            key = "llm." + key
        state[key] = value.contiguous()
    inv_freq = 1.0 / (config.llm.rope_theta ** (torch.arange(0, config.llm.head_dim, 2).float() / config.llm.head_dim))
    for layer in range(config.llm.num_layers):
        state[f"llm.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq
    keys = list(state)
    weight_map = {}
    for shard in range(SHARDS):
        name = f"pytorch_model-{shard + 1:05d}-of-{SHARDS:05d}.bin"
        part = {k: state[k] for k in keys[shard::SHARDS]}
        torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    llm = config.llm
    hf_config = {
        "architectures": [ARCHITECTURE], "model_type": "ullava", "out_dim": loaded.model.visual_model.config.prompt_embed_dim,
        "seg_token_idx": config.token_id("[SEG]"), "ce_weight": 1.0, "bce_weight": 2.0, "dice_weight": 0.5,
        "llm_config": {
            "model_type": "ullava_core", "architectures": ["UllavaCoreForCausalLM"], "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size, "num_attention_heads": llm.num_heads,
            "num_hidden_layers": llm.num_layers, "rms_norm_eps": llm.rms_norm_eps,
            "max_position_embeddings": llm.max_seq_len, "vocab_size": llm.vocab_size, "projector_type": "mlp",
            "bos_token_id": 0, "eos_token_id": 1,  # as released (Vicuna v1.1's config); the runtime stops at </s>
            "mm_token_ids": {name: config.token_id(token) for name, token in (
                ("IMG_PATCH", "<image_patch>"), ("VID_PATCH", "<video_patch>"), ("IMG_START", "<img_beg>"),
                ("IMG_END", "</img_end>"), ("VID_START", "<vid_beg>"), ("VID_END", "</vid_end>"))},
        },
    }
    (folder / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    loaded.tokenizer.save(folder)
    added = {token: config.token_id(token) for token in ADDED_TOKENS}
    (folder / ADDED_TOKENS_FILE).write_text(json.dumps(added, indent=2) + "\n")
    if loaded.grounding is not None:
        save_grounding(loaded.grounding, loaded.grounding_tokenizer, folder, released=True)
    return folder
