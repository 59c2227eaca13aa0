"""Bytes, FLOPs and a roofline projection: what a stage must move and compute, and how long
a device needs for it at best.

- :func:`llm_flops_per_token` and :func:`llm_prefill_flops` count the LLM's work from its
  config (every matmul, the I-LoRA's A, router and B included, attention over the context).
- :func:`decode_bytes_per_token` is what one decode step reads: the LLM's weights once (the
  embedding table counts one row) and the KV cache of every position attended to.
- :func:`project` turns bytes and FLOPs into ``max(bytes / bandwidth, flops / peak)`` on one
  of :data:`DEVICES`: a lower bound from published specifications, a projection, never a
  measurement. :func:`projection_refusal` says when it would mean nothing: a model so small
  that a decode step's time is set by kernel launches and host work, not by its weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeav.config import LLMConfig, LoRAConfig
from edgeav.errors import OptionError


@dataclass(frozen=True)
class DeviceSpec:
    """Published peak figures of one device (dense, no structured sparsity).

    ``peak_flops`` maps a compute precision ("fp32", "fp16", "int8") to operations per second;
    ``sources`` says where each figure comes from and which ones are derived.
    """

    name: str
    bandwidth: float  # bytes per second of the unified LPDDR5 memory
    peak_flops: dict[str, float]
    sources: str


# Spec numbers (not measured here). "Dense" figures halve NVIDIA's sparse headline numbers,
# as structured sparsity does not apply to these models.
DEVICES: dict[str, DeviceSpec] = {
    "orin-nano": DeviceSpec(
        "Jetson Orin Nano 8GB (15 W, original clocks)", 68e9,
        {"fp32": 1.28e12, "fp16": 10e12, "int8": 20e12},
        "68 GB/s and 40 sparse INT8 TOPS: NVIDIA Orin Nano datasheet (before the JetPack 6.1 'Super' clocks: "
        "102 GB/s, 67 TOPS); int8 dense = 40 / 2; fp16 dense = int8 dense / 2 (Ampere tensor cores); "
        "fp32 = 1024 CUDA cores x 2 x 625 MHz (derived)",
    ),
    "orin-agx": DeviceSpec(
        "Jetson AGX Orin 64GB (MAXN)", 204.8e9,
        {"fp32": 5.3e12, "fp16": 42.5e12, "int8": 85e12},
        "204.8 GB/s; GPU 5.3 FP32 TFLOPS and 170 sparse INT8 TOPS: NVIDIA Jetson AGX Orin technical brief "
        "(the 275 TOPS module figure adds the DLAs, which this projection does not use); int8 dense = 170 / 2; "
        "fp16 dense = int8 dense / 2 (derived)",
    ),
    "thor": DeviceSpec(
        "Jetson AGX Thor T5000", 273e9,
        {"fp32": 8.06e12, "fp16": 258.75e12, "int8": 517.5e12},
        "273 GB/s and 2070 sparse FP4 TFLOPS: NVIDIA Jetson Thor announcement; fp8/int8 dense = 2070 / 2 / 2, "
        "fp16 dense = fp8 dense / 2 (derived); fp32 = 2560 CUDA cores x 2 x 1.575 GHz (derived, the clock "
        "is an assumption)",
    ),
}


def device_spec(name: str) -> DeviceSpec:
    if name not in DEVICES:
        raise OptionError(f"--project {name!r}: expected one of {', '.join(DEVICES)}")
    return DEVICES[name]


# -- work of the LLM, from its config ------------------------------------------------------------------


def _linear_shapes(cfg: LLMConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder layer."""
    q_out = cfg.num_heads * cfg.head_dim
    kv_out = cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (cfg.hidden_size, q_out), "k_proj": (cfg.hidden_size, kv_out), "v_proj": (cfg.hidden_size, kv_out),
        "o_proj": (q_out, cfg.hidden_size), "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size), "down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }


def _layer_matmul_flops(cfg: LLMConfig, lora: LoRAConfig) -> int:
    """FLOPs of one layer's projections for one token (2 per multiply-add), the I-LoRA's three matmuls included."""
    flops = 0
    for name, (fan_in, fan_out) in _linear_shapes(cfg).items():
        flops += 2 * fan_in * fan_out
        if name in lora.targets:
            flops += 2 * (fan_in * lora.rank + fan_in * lora.heads + lora.heads * lora.rank * fan_out)
    return flops


def _attention_flops(cfg: LLMConfig, keys: int) -> int:
    """Scores (q . k) and the weighted sum of values for one query over ``keys`` positions, every layer."""
    return cfg.num_layers * 2 * 2 * cfg.num_heads * cfg.head_dim * keys


def llm_flops_per_token(cfg: LLMConfig, lora: LoRAConfig, context: int) -> int:
    """One decode step at ``context`` positions attended to (the new one included): layers, attention, LM head."""
    return (cfg.num_layers * _layer_matmul_flops(cfg, lora) + _attention_flops(cfg, context)
            + 2 * cfg.hidden_size * cfg.vocab_size)


def llm_prefill_flops(cfg: LLMConfig, lora: LoRAConfig, tokens: int) -> int:
    """A causal prefill of ``tokens`` positions; the LM head runs on the last one (all generation reads)."""
    attended = tokens * (tokens + 1) // 2
    return (tokens * cfg.num_layers * _layer_matmul_flops(cfg, lora) + _attention_flops(cfg, 1) * attended
            + 2 * cfg.hidden_size * cfg.vocab_size)


def kv_bytes_per_position(cfg: LLMConfig, element_bytes: int) -> int:
    """Keys and values of one position, every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * element_bytes


def decode_bytes_per_token(weight_bytes: int, cfg: LLMConfig, kv_element_bytes: int, context: int) -> int:
    """What one decode step reads: every LLM weight once (``weight_bytes``, the embedding table counted as
    one row) and the cache of ``context`` positions."""
    return weight_bytes + kv_bytes_per_position(cfg, kv_element_bytes) * context


def mean_decode_context(prompt_tokens: int, steps: int) -> float:
    """Average positions attended to over ``steps`` decode steps after a prompt (step i attends to prompt + i + 1)."""
    return prompt_tokens + (steps + 1) / 2


# -- the projection ----------------------------------------------------------------------------------

# A decode step launches a few hundred kernels (about 15 a layer) at several microseconds each
# on a Jetson's CPU: a millisecond or more the roofline leaves out. A step that reads its bytes
# in less than this is dominated by that overhead, so its projected tokens/s would mean nothing.
MIN_PROJECTED_STEP_S = 5e-3


def projection_refusal(step_bytes: float, device: DeviceSpec) -> str | None:
    """Why a decode step reading ``step_bytes`` (weights + KV cache) is not projected on ``device``
    (None: it is, its bytes dominate)."""
    step_s = step_bytes / device.bandwidth
    if step_s >= MIN_PROJECTED_STEP_S:
        return None
    return (f"not projected: a decode step reads {step_bytes / 1e6:.1f} MB, {step_s * 1e3:.2f} ms at "
            f"{device.bandwidth / 1e9:g} GB/s on {device.name}; under {MIN_PROJECTED_STEP_S * 1e3:g} ms a step's "
            "time is set by kernel launches and host work, which a roofline leaves out (project a preset whose "
            "weights dominate, e.g. crab-7b)")


@dataclass(frozen=True)
class StageWork:
    """What one stage reads and computes, and in which precision it computes."""

    bytes: float
    flops: float
    compute: str  # "fp32", "fp16" or "int8": the key into DeviceSpec.peak_flops


def project(work: StageWork, device: DeviceSpec) -> dict:
    """Roofline lower bound of one stage on ``device``: the slower of moving its bytes and doing its FLOPs."""
    if work.compute not in device.peak_flops:
        raise OptionError(f"no {work.compute} peak for {device.name}; expected one of {', '.join(device.peak_flops)}")
    memory_s = work.bytes / device.bandwidth
    compute_s = work.flops / device.peak_flops[work.compute]
    return {"seconds": max(memory_s, compute_s), "memory_s": memory_s, "compute_s": compute_s,
            "bound": "memory" if memory_s >= compute_s else "compute"}


__all__ = ["DEVICES", "MIN_PROJECTED_STEP_S", "DeviceSpec", "StageWork", "decode_bytes_per_token", "device_spec",
           "kv_bytes_per_position", "llm_flops_per_token", "llm_prefill_flops", "mean_decode_context", "project",
           "projection_refusal"]
