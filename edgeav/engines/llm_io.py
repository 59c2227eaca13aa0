"""The exported LLM step's inputs and outputs, by name and shape: what the exporter writes
(:mod:`edgeav.export.graphs`), what :class:`~edgeav.engines.onnx.OnnxLLM` binds and what the manifest
checks hold a graph to. Free of torch, so an engine is checked and run without it."""

from __future__ import annotations

from edgeav.config import LLMConfig


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """The cache's input names (``past_key_0``, ``past_value_0``, ...) and output names (``present_...``)."""
    past = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past_", "present_", 1) for name in past]


def llm_shapes(cfg: LLMConfig) -> dict[str, tuple]:
    """The LLM step's input/output shapes under ``cfg`` (None: a dynamic axis), for the manifest's check."""
    past, present = kv_names(cfg.num_layers)
    buffer = (1, cfg.num_kv_heads, None, cfg.head_dim)
    shapes = {"inputs_embeds": (1, None, cfg.hidden_size), "past_length": (1,), "logits": (1, cfg.vocab_size),
              "hidden": (1, cfg.hidden_size), **{name: buffer for name in past + present}}
    if cfg.mrope_section is not None:
        shapes["positions"] = (3, None)
    return shapes


__all__ = ["kv_names", "llm_shapes"]
