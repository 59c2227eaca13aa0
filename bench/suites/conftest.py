"""Shared models and inputs for the component suites (``python -m pytest bench/suites --benchmark-only``).

``EDGEAV_BENCH_PRESET`` (default crab-tiny) picks the preset, built with random weights (seed 0);
``EDGEAV_BENCH_PRECISION`` (default fp32) the ONNX engine's precision. The engine comes from the
export cache (``$EDGEAV_CACHE``) when the same weights were exported before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from edgeav.systems.crab.checkpoints import LoadedCrab, synthesize

PRESET = os.environ.get("EDGEAV_BENCH_PRESET", "crab-tiny")
PRECISION = os.environ.get("EDGEAV_BENCH_PRECISION", "fp32")
FRAMES = 10  # an AVE clip: ten frames, ten 1-s audio windows
FBANK_FRAMES = 98  # one second of audio


@dataclass
class Inputs:
    """One AVE clip's worth of encoder inputs and a prompt of its length."""

    pixels: torch.Tensor  # [10, 3, 224, 224]
    fbank: torch.Tensor  # [10, 98, 128]
    prompt: torch.Tensor  # [1, T, D]
    mask_hidden: torch.Tensor  # [6, D]


@pytest.fixture(scope="session")
def loaded() -> LoadedCrab:
    return synthesize(PRESET, 0)


@pytest.fixture(scope="session")
def inputs(loaded) -> Inputs:
    cfg = loaded.config
    generator = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    # The prompt: both media blocks plus about 60 text tokens of instruction and chat template.
    tokens = 2 * FRAMES * cfg.qformer.num_queries + 60
    return Inputs(
        pixels=torch.randn(FRAMES, 3, size, size, generator=generator),
        fbank=torch.randn(FRAMES, FBANK_FRAMES, 128, generator=generator),
        prompt=torch.randn(1, tokens, cfg.llm.hidden_size, generator=generator) * 0.02,
        mask_hidden=torch.randn(cfg.seg.num_mask_tokens, cfg.llm.hidden_size, generator=generator),
    )


@pytest.fixture(scope="session")
def engine(loaded, tmp_path_factory):
    from edgeav.systems.crab.onnx_engine import OnnxEngine
    from edgeav.export.exporter import export_engine

    folder = export_engine(loaded, tmp_path_factory.mktemp("engine") / PRECISION, precision=PRECISION, receipt_n=0,
                           variants=("joint", "avs"))
    return OnnxEngine(folder, threads=torch.get_num_threads())


@pytest.fixture(scope="session", params=["torch", "onnx"])
def backend(request, loaded):
    """(name, joint model, avs model): the reference modules or the engine's runners, same interface."""
    if request.param == "torch":
        reference = lambda variant: loaded.variant(variant)  # noqa: E731
        return "torch", reference
    engine = request.getfixturevalue("engine")
    return "onnx", engine.variant
