"""Files of the base models Crab builds on, written with every key their owners ship.

Synthetic checkpoints (:func:`edgeav.systems.crab.checkpoints.save_released`) use these so that a
synthetic folder looks like the real one to edgeav's loader and to transformers:

- the Llama folder: ``LlamaForCausalLM`` weights (base vocabulary only), ``config.json``,
  ``tokenizer.model`` and ``tokenizer_config.json``;
- the CLIP folder: a whole ``CLIPModel`` (text tower, projections, ``logit_scale``) whose
  vision tower holds ALL its blocks, ``post_layernorm`` and the ``position_ids`` buffer old
  files carry, none of which Crab reads: the runtime's load hooks drop them;
- the BEATs ``.pt``: the encoder with a copy of the shared relative position table in
  every layer (as BEATs' state dict lists it), the AudioSet classifier head
  (``predictor.*``, 527 classes) and a ``cfg`` with the training-only keys.

Parts Crab never reads get random values from :data:`UNUSED_SEED`. Safetensors files
are written by :func:`edgeav.weight_files.write_safetensors` (``{"format": "pt"}``
metadata, the usual file mode).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgeav.config import LLMConfig, VisionConfig
from edgeav.models.audio import BeatsEncoderConfig, beats_checkpoint_cfg
from edgeav.models.vision import CLIPEncoderLayer
from edgeav.tokenizer import Tokenizer
from edgeav.weight_files import write_safetensors

UNUSED_SEED = 0
INIT_STD = 0.02
AUDIOSET_CLASSES = 527
# Training-only keys of the released BEATs cfg (BEATsConfig's fields); the runtime ignores them,
# and forces encoder_layerdrop to 0 as Crab does.
BEATS_TRAINING_CFG = {"layer_wise_gradient_decay_ratio": 0.6, "dropout": 0.0, "attention_dropout": 0.0,
                      "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0,
                      "finetuned_model": True, "predictor_dropout": 0.0, "predictor_class": AUDIOSET_CLASSES}
# openai/clip-vit-large-patch14's text tower; smaller presets get a one-layer tower of their vision width.
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768}
TEXT_POSITIONS, SMALL_TEXT_VOCAB = 77, 512


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _random(shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * INIT_STD).to(dtype)


def write_llama_folder(folder: Path, llm: LLMConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer) -> None:
    """A Hugging Face Llama folder: ``state`` holds ``LlamaForCausalLM`` keys over the base vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(state, folder / "model.safetensors")
    dtype = state["model.embed_tokens.weight"].dtype
    _write_json({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_attention_heads": llm.num_heads,
        "num_hidden_layers": llm.num_layers, "num_key_value_heads": llm.num_kv_heads, "hidden_act": "silu",
        "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta, "vocab_size": llm.base_vocab_size,
        "max_position_embeddings": llm.max_seq_len, "bos_token_id": llm.bos_id, "eos_token_id": llm.eos_id,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }, folder / "config.json")
    tokenizer.save(folder)


def _clip_text_config(vision: VisionConfig) -> dict:
    if vision == VisionConfig():
        return dict(CLIP_L_TEXT)
    return {"hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": vision.num_heads, "max_position_embeddings": TEXT_POSITIONS,
            "vocab_size": SMALL_TEXT_VOCAB, "projection_dim": vision.hidden_size}


def _layer_state(width: int, heads: int, intermediate: int, eps: float, generator: torch.Generator,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One CLIP encoder block's keys with random weights."""
    layer = CLIPEncoderLayer(VisionConfig(hidden_size=width, num_heads=heads, intermediate_size=intermediate,
                                          layer_norm_eps=eps))
    return {key: _random(tuple(t.shape), generator, dtype) for key, t in layer.state_dict().items()}


def write_clip_folder(folder: Path, vision: VisionConfig, tower: dict[str, torch.Tensor]) -> None:
    """A Hugging Face ``CLIPModel`` folder around ``tower`` (the vision tower's state dict, HF names
    without ``vision_model.``, the blocks it runs); the blocks beyond them and the rest are random."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(UNUSED_SEED)
    dtype = tower["pre_layrnorm.weight"].dtype
    text = _clip_text_config(vision)
    vision_state = dict(tower)
    built = 1 + max((int(key.split(".")[2]) for key in tower if key.startswith("encoder.layers.")), default=-1)
    for index in range(built, vision.num_layers):  # blocks after the last hidden state Crab reads
        block = _layer_state(vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.layer_norm_eps,
                             generator, dtype)
        vision_state.update({f"encoder.layers.{index}.{key}": t for key, t in block.items()})
    vision_state["post_layernorm.weight"] = torch.ones(vision.hidden_size, dtype=dtype)
    vision_state["post_layernorm.bias"] = torch.zeros(vision.hidden_size, dtype=dtype)
    vision_state["embeddings.position_ids"] = torch.arange(vision.num_patches + 1)[None]

    width = text["hidden_size"]
    text_state = {"embeddings.token_embedding.weight": _random((text["vocab_size"], width), generator, dtype),
                  "embeddings.position_embedding.weight": _random((TEXT_POSITIONS, width), generator, dtype),
                  "embeddings.position_ids": torch.arange(TEXT_POSITIONS)[None],
                  "final_layer_norm.weight": torch.ones(width, dtype=dtype),
                  "final_layer_norm.bias": torch.zeros(width, dtype=dtype)}
    for index in range(text["num_hidden_layers"]):
        block = _layer_state(width, text["num_attention_heads"], text["intermediate_size"], vision.layer_norm_eps,
                             generator, dtype)
        text_state.update({f"encoder.layers.{index}.{key}": t for key, t in block.items()})

    state = {**{f"vision_model.{k}": t for k, t in vision_state.items()},
             **{f"text_model.{k}": t for k, t in text_state.items()},
             "visual_projection.weight": _random((text["projection_dim"], vision.hidden_size), generator, dtype),
             "text_projection.weight": _random((text["projection_dim"], width), generator, dtype),
             "logit_scale": torch.tensor(2.6592, dtype=dtype)}
    write_safetensors(state, folder / "model.safetensors")
    vision_config = {"hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
                     "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads,
                     "image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_act": "quick_gelu",
                     "layer_norm_eps": vision.layer_norm_eps, "projection_dim": text["projection_dim"]}
    text_config = {**text, "hidden_act": "quick_gelu", "layer_norm_eps": vision.layer_norm_eps, "pad_token_id": 1,
                   "bos_token_id": text["vocab_size"] - 2, "eos_token_id": text["vocab_size"] - 1}
    _write_json({"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": text["projection_dim"],
                 "logit_scale_init_value": 2.6592, "text_config": text_config, "vision_config": vision_config,
                 "torch_dtype": str(dtype).removeprefix("torch.")}, folder / "config.json")


def write_beats_file(path: Path, cfg: BeatsEncoderConfig, encoder: dict[str, torch.Tensor]) -> None:
    """The released BEATs ``.pt``: ``{"cfg": ..., "model": ...}`` around the encoder's state dict."""
    generator = torch.Generator().manual_seed(UNUSED_SEED)
    state = dict(encoder)
    table = state.get("encoder.layers.0.self_attn.relative_attention_bias.weight")
    if table is not None:  # BEATs shares one table module, so its state dict lists it under every layer
        for index in range(1, cfg.audio.num_layers):
            state[f"encoder.layers.{index}.self_attn.relative_attention_bias.weight"] = table
    dtype = state["layer_norm.weight"].dtype
    state["predictor.weight"] = _random((AUDIOSET_CLASSES, cfg.audio.hidden_size), generator, dtype)
    state["predictor.bias"] = torch.zeros(AUDIOSET_CLASSES, dtype=dtype)
    torch.save({"cfg": {**beats_checkpoint_cfg(cfg), **BEATS_TRAINING_CFG}, "model": state}, path)
