"""Model configs: presets, serialisation, errors."""

import json

import pytest

from edgeav.systems.crab.config import PRESETS, CrabConfig, preset
from edgeav.errors import OptionError


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    assert CrabConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_crab_7b_has_the_released_shapes():
    cfg = preset("crab-7b")
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.intermediate_size, cfg.llm.vocab_size) == (4096, 32, 11008, 32017)
    assert (cfg.vision.hidden_size, cfg.vision.grid, cfg.vision.llm_layer, cfg.vision.mask_layers) == (1024, 16, 23, (14, 22))
    assert (cfg.lora.rank, cfg.lora.heads, cfg.lora.scale) == (8, 3, 2.0)
    assert (cfg.qformer.num_queries, cfg.seg.num_queries, cfg.seg.num_mask_tokens) == (32, 300, 6)


def test_unknown_preset_and_field_are_option_errors():
    with pytest.raises(OptionError, match="Did you mean 'crab-tiny'"):
        preset("crab-tny")
    with pytest.raises(OptionError, match="unknown field 'vison'"):
        CrabConfig.from_dict({"vison": {}})
