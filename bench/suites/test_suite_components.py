"""pytest-benchmark suites, one per component and backend (torch reference, ONNX Runtime engine).

    python -m pytest bench/suites --benchmark-only                   # crab-tiny, fp32 engine
    EDGEAV_BENCH_PRESET=crab-small python -m pytest bench/suites --benchmark-only --benchmark-group-by=group

Each benchmark group is one component (visual, audio, llm prefill, decode step, mask) with a row per
backend, so pytest-benchmark's table compares them directly. Not part of the test run (pyproject's
testpaths is tests/).
"""

from __future__ import annotations

import torch


def _llm(backend, length: int):
    """The backend's LLM with a KV cache of ``length`` positions (both backends take the same call)."""
    llm = backend[1]("joint").llm
    llm.setup_caches(1, length)
    return llm


def test_visual(benchmark, backend, inputs):
    benchmark.group = "visual: 10 frames"
    model = backend[1]("joint")
    with torch.inference_mode():
        benchmark(model.encode_frames, inputs.pixels)


def test_audio(benchmark, backend, inputs):
    benchmark.group = "audio: 10 one-second windows"
    model = backend[1]("joint")
    with torch.inference_mode():
        benchmark(model.encode_audio, inputs.fbank)


def test_llm_prefill(benchmark, backend, inputs):
    tokens = inputs.prompt.shape[1]
    benchmark.group = f"llm prefill: {tokens} tokens"
    llm = _llm(backend, tokens + 8)
    positions = torch.arange(tokens)
    with torch.inference_mode():
        benchmark(llm, inputs.prompt, positions, tokens)


def test_decode_step(benchmark, backend, inputs):
    tokens = inputs.prompt.shape[1]
    benchmark.group = f"llm decode step after {tokens} tokens"
    llm = _llm(backend, tokens + 8)
    step = inputs.prompt[:, :1]
    with torch.inference_mode():
        llm(inputs.prompt, torch.arange(tokens), tokens)
        # Every call writes the same next position, so the context stays the prompt's length.
        benchmark(llm, step, torch.tensor([tokens]), tokens + 1)


def test_mask(benchmark, backend, inputs):
    benchmark.group = "mask decoder: one frame"
    model = backend[1]("avs")
    with torch.inference_mode():
        features = model.encode_frames(inputs.pixels[:1])
        benchmark(model.mask_logits, inputs.mask_hidden, features)
    backend[1]("joint")
