"""Crab's inputs, end to end: each task's prompt ids, audio pieces and pixels as edgeav's
runtime feeds them equal those built the authors' way (``edgeav.bench.authors_way``:
transformers' tokenizer and image processor, decord, the loaders' audio cut), in both
tokenizer modes (the two give prompts of different lengths: ``tests/test_tokenizer.py``), and the
model's first-token logits from both agree. The authors' instructions are their loaders' own strings
(``authors_way.INSTRUCTIONS``), so the prompt check covers the wording as well as the tokenizer.

Media are laid out as each dataset ships them (``edgeav.bench.authors_parity.LAYOUTS``),
with audio a few samples past each clip, so the authors' pieces are not whole seconds.
"""

from __future__ import annotations

import json
import shutil

import pytest

from edgeav.bench import authors_parity, authors_way
from edgeav.systems.crab.config import ADDED_TOKENS
from edgeav.preprocess.clip import CLIP_STD
from edgeav.runtime import Runtime

pytest.importorskip("decord")
pytest.importorskip("transformers")

# One 8-bit level in normalised units (CLIP's smallest std), plus float rounding.
ONE_LEVEL = 1 / 255 / min(CLIP_STD) + 1e-5


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return authors_parity.write_media(tmp_path_factory.mktemp("authors"))


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def checkpoint(request, tiny_released, tmp_path_factory):
    """The synthetic release with its Llama folder's tokenizer_config.json set to legacy or not."""
    folder = tmp_path_factory.mktemp("ckpt") / "crab"
    shutil.copytree(tiny_released, folder)
    (config_path,) = folder.glob("*/tokenizer_config.json")
    config = json.loads(config_path.read_text())
    config["legacy"] = request.param
    config_path.write_text(json.dumps(config))
    return folder, config_path.parent


@pytest.fixture(scope="module")
def runtime(checkpoint):
    return Runtime.from_checkpoint(checkpoint[0])


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return authors_way.llama_tokenizer(checkpoint[1], list(ADDED_TOKENS))


@pytest.mark.parametrize("task", list(authors_parity.LAYOUTS))
def test_inputs_and_logits_equal_the_authors(task, media, runtime, tokenizer):
    row = authors_parity.compare(runtime, tokenizer, task, *authors_parity.source_of(task, media),
                                 authors_parity.LAYOUTS[task][2])
    assert row["prompt_ids_equal"]
    assert row["fbank_max_diff"] == 0.0
    assert row["pixels_max_diff"] is not None and row["pixels_max_diff"] <= ONE_LEVEL
    assert row["logit_rel_diff"] <= 1e-5

