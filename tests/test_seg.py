"""Crab's mask decoder (edgeav.systems.crab.seg): SAM parity, Crab's quirks, checkpoint layout."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgeav.systems.crab.config import preset
from edgeav.errors import OptionError
from edgeav.systems.crab.seg import (
    FOURIER_KEYS, FOURIER_SEED, RELEASED_KEY_PREFIX, SegModule, TwoWayTransformer, patches_to_grid,
)

TINY = preset("crab-tiny")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: extra threads only spin, and on a busy machine they cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sam_two_way_transformer_cls():
    """segment_anything's TwoWayTransformer, loaded by file path: its package __init__ needs torchvision."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("segment-anything is not installed (pip install -e '.[dev]')")
    modeling = Path(spec.submodule_search_locations[0]) / "modeling"
    package = "_edgeav_sam_modeling"
    if f"{package}.transformer" not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [str(modeling)]
        sys.modules[package] = stub
        for name in ("common", "transformer"):  # common first: transformer imports `.common`
            file_spec = importlib.util.spec_from_file_location(f"{package}.{name}", modeling / f"{name}.py")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[f"{package}.{name}"] = module
            file_spec.loader.exec_module(module)
    return sys.modules[f"{package}.transformer"].TwoWayTransformer


def _assert_close(actual, expected, atol):
    # Not torch.testing.assert_close: its first call imports sympy, seconds of a fast suite.
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol:g}"


def _model(avss=False, seed=0, config=TINY):
    torch.manual_seed(seed)
    return SegModule(config, avss=avss).eval()


def _inputs(batch=2, seed=1, config=TINY):
    g = torch.Generator().manual_seed(seed)
    grid, width = config.vision.grid, config.vision.hidden_size
    hidden = torch.randn(batch, config.seg.num_mask_tokens, config.llm.hidden_size, generator=g)
    low = torch.randn(batch, width, grid, grid, generator=g)
    high = torch.randn(batch, width, grid, grid, generator=g)
    return hidden, low, high


# ---- SAM's two-way transformer -------------------------------------------------------------

@pytest.mark.parametrize("preset_name", ["crab-tiny", "crab-7b"])
@pytest.mark.parametrize("grid", [16, 32])
def test_two_way_transformer_matches_segment_anything(preset_name, grid):
    seg = preset(preset_name).seg
    torch.manual_seed(0)
    reference = _sam_two_way_transformer_cls()(
        depth=seg.transformer_depth, embedding_dim=seg.prompt_dim, num_heads=seg.num_heads,
        mlp_dim=seg.mlp_dim, attention_downsample_rate=seg.attention_downsample).eval()
    ours = TwoWayTransformer(seg.transformer_depth, seg.prompt_dim, seg.num_heads, seg.mlp_dim,
                             seg.attention_downsample).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)  # same names, same shapes

    batch = 2 if preset_name == "crab-tiny" else 1  # full-size rows are slow on a busy CPU
    g = torch.Generator().manual_seed(grid)
    image = torch.randn(batch, seg.prompt_dim, grid, grid, generator=g)
    pe = torch.randn(batch, seg.prompt_dim, grid, grid, generator=g)
    tokens = torch.randn(batch, seg.num_queries, seg.prompt_dim, generator=g)
    with torch.no_grad():
        ref_queries, ref_keys = reference(image, pe, tokens)
        queries, keys = ours(image, pe, tokens)
    assert queries.shape == ref_queries.shape and keys.shape == ref_keys.shape
    assert (queries - ref_queries).abs().max().item() < 1e-5
    assert (keys - ref_keys).abs().max().item() < 1e-5


# ---- random-Fourier positional matrices ----------------------------------------------------

def test_fourier_matrices_are_seeded_and_saved_like_crabs_buffers():
    torch.manual_seed(123)
    first = SegModule(TINY)
    torch.manual_seed(456)  # the global RNG must not matter
    second = SegModule(TINY)
    half = TINY.seg.prompt_dim // 2
    buffers_1, buffers_2 = dict(first.named_buffers()), dict(second.named_buffers())
    for name in FOURIER_KEYS:
        assert buffers_1[name].shape == (2, half)
        assert torch.equal(buffers_1[name], buffers_2[name])
        assert name in first.state_dict()  # persistent, as in Crab's module
    assert not torch.equal(buffers_1[FOURIER_KEYS[0]], buffers_1[FOURIER_KEYS[1]])

    # Documented contract: level 0 is the first draw of a generator seeded FOURIER_SEED, level 1 the second.
    g = torch.Generator().manual_seed(FOURIER_SEED)
    assert torch.equal(buffers_1[FOURIER_KEYS[0]], torch.randn(2, half, generator=g))
    assert torch.equal(buffers_1[FOURIER_KEYS[1]], torch.randn(2, half, generator=g))


def test_fourier_matrices_load_when_present_and_stay_seeded_when_absent():
    seeded = {k: v.clone() for k, v in _model(seed=1).named_buffers()}
    source = _model(seed=9).state_dict()
    known = {key: torch.full_like(source[key], 0.25 * (i + 1)) for i, key in enumerate(FOURIER_KEYS)}
    inputs = _inputs(batch=1)

    with_buffers = _model(seed=4)
    with_buffers.load_state_dict({**source, **known}, strict=True)
    without = _model(seed=4)
    without.load_state_dict({k: v for k, v in source.items() if k not in FOURIER_KEYS}, strict=True)
    for key in FOURIER_KEYS:
        assert torch.equal(dict(with_buffers.named_buffers())[key], known[key])
        assert torch.equal(dict(without.named_buffers())[key], seeded[key])
    with torch.no_grad():  # the matrices reach the logits
        assert (with_buffers(*inputs) - without(*inputs)).abs().max() > 1e-4


# ---- end to end ----------------------------------------------------------------------------

@pytest.mark.parametrize("avss,classes", [(False, 1), (True, TINY.seg.avss_classes)])
def test_logit_shape_and_values(avss, classes):
    model = _model(avss=avss)
    with torch.no_grad():
        logits = model(*_inputs(batch=2))
    assert logits.shape == (2, classes, TINY.seg.out_res, TINY.seg.out_res)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0


def test_binary_and_avss_share_weights_and_differ_only_in_classifier():
    binary, avss = _model(avss=False), _model(avss=True)
    assert binary.state_dict().keys() == avss.state_dict().keys()
    avss.load_state_dict(binary.state_dict())
    inputs = _inputs(batch=1)
    with torch.no_grad():
        # Set the AVSS classifier's first row to the binary one: class 0 must equal the binary logits.
        avss.mask_decoder.avss_classifier.weight[0] = binary.mask_decoder.ms3_s4_classfier.weight[0]
        b_levels = binary.level_logits(*inputs)
        a_levels = avss.level_logits(*inputs)
    _assert_close(a_levels[0][:, :1], b_levels[0], atol=1e-6)


def test_mask_hidden_states_drive_the_logits():
    model = _model()
    hidden, low, high = _inputs(batch=1)
    with torch.no_grad():
        base = model(hidden, low, high)
        changed = model(hidden + torch.randn_like(hidden), low, high)
        image_changed = model(hidden, low, high + torch.randn_like(high))
    # Far above float noise (~1e-7) whatever the preset's sizes; random weights damp the effect.
    assert (base - changed).abs().max() > 1e-5
    assert (base - image_changed).abs().max() > 1e-5


def test_three_tokens_of_a_scale_are_averaged():
    model = _model()
    hidden, low, high = _inputs(batch=1)
    within = hidden[:, [2, 0, 1, 5, 3, 4]]  # permute inside each scale: the mean is unchanged
    across = hidden[:, [3, 1, 2, 0, 4, 5]]  # swap a token between scales: the prompts change
    with torch.no_grad():
        base = model(hidden, low, high)
        permuted = model(within, low, high)
        swapped = model(across, low, high)
        prompts = model.sparse_prompts(hidden)
        projected = model.text_hidden_fcs[0](hidden)
    _assert_close(permuted, base, atol=1e-5)
    assert (swapped - base).abs().max() > 1e-3
    _assert_close(prompts, projected.reshape(1, 2, 3, -1).mean(dim=2), atol=1e-6)


def test_query_generator_earlier_layers_have_no_effect():
    model = _model()
    inputs = _inputs(batch=1)
    layers = model.mask_decoder.query_generator.layers
    with torch.no_grad():
        base = model(*inputs)
        for p in layers[0].parameters():
            p.add_(torch.randn_like(p))
        after_first = model(*inputs)
        for p in layers[-1].parameters():
            p.add_(0.5 * torch.randn_like(p))
        after_last = model(*inputs)
    assert torch.equal(after_first, base)  # Crab feeds the original queries to every layer
    assert (after_last - base).abs().max() > 1e-3


def test_batch_rows_are_independent():
    model = _model(avss=True)
    hidden, low, high = _inputs(batch=3)
    with torch.no_grad():
        batched = model(hidden, low, high)
        single = torch.cat([model(hidden[i:i + 1], low[i:i + 1], high[i:i + 1]) for i in range(3)])
    _assert_close(batched, single, atol=1e-5)


def _force_level0(monkeypatch, model, forced):
    """Replace level 0's logits by ``forced``; return the list that receives level 1's transformer input."""
    original = model.mask_decoder.predict_masks

    def predict_masks(level, *args, **kwargs):
        return forced if level == 0 else original(level, *args, **kwargs)

    monkeypatch.setattr(model.mask_decoder, "predict_masks", predict_masks)
    captured = []
    handle = model.mask_decoder.transformer[1].register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    return captured, handle


@pytest.mark.parametrize("avss", [False, True])
def test_level1_source_is_gated_by_level0_logits(monkeypatch, avss):
    model = _model(avss=avss)
    hidden, low, high = _inputs(batch=2)
    classes, size = model.num_classes, 2 * model.grid
    forced = 3 * torch.randn(2, classes, size, size, generator=torch.Generator().manual_seed(5))
    captured, _ = _force_level0(monkeypatch, model, forced)
    with torch.no_grad():
        model(hidden, low, high)
        upsampled = model.mask_decoder.upsample_2x(model.image_feature_neck(high))
        dense = model.no_mask_embed.weight.reshape(1, -1, 1, 1)
    (src,) = captured
    gate = torch.sigmoid(forced.mean(dim=1, keepdim=True)) + 1  # mean over the classes, then sigmoid + 1
    assert src.shape == upsampled.shape == (2, TINY.seg.prompt_dim, size, size)
    # Crab adds the (resized) dense prompt at level 1 too, after the gate.
    _assert_close(src, upsampled * gate + dense, atol=1e-5)


def test_level1_gate_spans_one_to_two(monkeypatch):
    model = _model()
    inputs = _inputs(batch=1)
    size = 2 * model.grid
    dense = model.no_mask_embed.weight.detach().reshape(1, -1, 1, 1)
    gated = {}
    for value in (-1e4, 1e4):
        with monkeypatch.context() as patch:
            captured, handle = _force_level0(patch, model, torch.full((1, 1, size, size), value))
            with torch.no_grad():
                model(*inputs)
            handle.remove()
        gated[value] = captured[0] - dense
    _assert_close(gated[1e4], 2 * gated[-1e4], atol=1e-5)


def test_levels_are_resized_to_low_res_averaged_then_resized_to_output(monkeypatch):
    model = _model()
    g = torch.Generator().manual_seed(7)
    level0 = torch.randn(1, 1, 2 * model.grid, 2 * model.grid, generator=g)
    level1 = torch.randn(1, 1, 4 * model.grid, 4 * model.grid, generator=g)
    monkeypatch.setattr(model, "level_logits", lambda *args: [level0, level1])
    with torch.no_grad():
        logits = model(*_inputs(batch=1))

    def resize(x, s):
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)

    low, out = TINY.seg.low_res, TINY.seg.out_res
    expected = resize(0.5 * resize(level0, low) + 0.5 * resize(level1, low), out)
    _assert_close(logits, expected, atol=1e-6)
    assert (logits - resize(0.5 * level0, out) - resize(0.5 * level1, out)).abs().max() > 1e-4


# ---- checkpoint layout ---------------------------------------------------------------------

def _expected_released_keys(depth=2, qg_layers=2, levels=2):
    """Crab's SegModule state-dict names (GeWu-Lab/Crab models/multimodal_encoder.py)."""
    keys = ["text_hidden_fcs.0.0.weight", "text_hidden_fcs.0.0.bias", "text_hidden_fcs.0.2.weight",
            "text_hidden_fcs.0.2.bias", "no_mask_embed.weight", "image_feature_neck.0.weight",
            "image_feature_neck.1.weight", "image_feature_neck.1.bias", "image_feature_neck.2.weight",
            "image_feature_neck.3.weight", "image_feature_neck.3.bias"]
    d = "mask_decoder."
    wb = (".weight", ".bias")
    attn = [f"{p}_proj{s}" for p in "qkv" for s in wb] + [f"out_proj{s}" for s in wb]
    for t in range(levels):
        tr = f"{d}transformer.{t}."
        for i in range(depth):
            block = f"{tr}layers.{i}."
            for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
                keys += [f"{block}{a}.{x}" for x in attn]
            keys += [f"{block}norm{n}{s}" for n in range(1, 5) for s in wb]
            keys += [f"{block}mlp.lin{n}{s}" for n in (1, 2) for s in wb]
        keys += [f"{tr}final_attn_token_to_image.{x}" for x in attn]
        keys += [f"{tr}norm_final_attn{s}" for s in wb]
    keys.append(f"{d}avs_query_tokens.weight")
    for i in range(qg_layers):
        layer = f"{d}query_generator.layers.{i}."
        for a in ("self_attn", "cross_attn"):
            keys += [f"{layer}{a}.in_proj_weight", f"{layer}{a}.in_proj_bias",
                     f"{layer}{a}.out_proj.weight", f"{layer}{a}.out_proj.bias"]
        keys += [f"{layer}ffn.{n}{s}" for n in (0, 2) for s in wb]
        keys += [f"{layer}norm{n}{s}" for n in (1, 2, 3) for s in wb]
    for mlp in ("hyper_mlp_out", "hyper_mlp"):
        keys += [f"{d}{mlp}.layers.{n}{s}" for n in range(3) for s in wb]
    for seq in ("output_upscaling", "upsample_2x"):
        keys += [f"{d}{seq}.{n}{s}" for n in (0, 1) for s in wb]
    keys += [f"{d}level_embed.weight", f"{d}ms3_s4_classfier.weight", f"{d}avss_classifier.weight"]
    # Persistent buffers of Crab's PositionEmbeddingRandom (in its state dict, not among its parameters).
    keys += ["pe_layer.positional_encoding_gaussian_matrix", f"{d}pe1.positional_encoding_gaussian_matrix"]
    return keys


def test_parameter_names_and_sizes_match_the_released_layout():
    model = SegModule(preset("crab-7b"))
    state = model.state_dict()
    expected = _expected_released_keys()
    assert len(expected) == len(set(expected))
    assert set(state) == set(expected)
    shapes = {
        "text_hidden_fcs.0.0.weight": (4096, 4096), "text_hidden_fcs.0.2.weight": (256, 4096),
        "image_feature_neck.0.weight": (256, 1024, 1, 1), "image_feature_neck.2.weight": (256, 256, 3, 3),
        "mask_decoder.avs_query_tokens.weight": (300, 256),
        "mask_decoder.transformer.1.layers.0.cross_attn_image_to_token.q_proj.weight": (128, 256),
        "mask_decoder.query_generator.layers.1.ffn.0.weight": (2048, 256),
        "mask_decoder.hyper_mlp_out.layers.0.weight": (256, 300, 1, 1),
        "mask_decoder.hyper_mlp_out.layers.2.weight": (32, 256, 1, 1),
        "mask_decoder.output_upscaling.0.weight": (256, 32, 2, 2),
        "mask_decoder.level_embed.weight": (2, 256),
        "mask_decoder.ms3_s4_classfier.weight": (1, 32, 1, 1),
        "mask_decoder.avss_classifier.weight": (71, 32, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # CRAB_SPEC section 5: mask decoder 29.1 M parameters.
    assert abs(sum(p.numel() for p in model.parameters()) - 29.1e6) < 0.05e6


def test_released_state_dict_loads_without_renaming():
    source = _model(seed=3)
    released = {RELEASED_KEY_PREFIX + k: v.clone() for k, v in source.state_dict().items()}
    target = _model(seed=4)
    stripped = {k[len(RELEASED_KEY_PREFIX):]: v for k, v in released.items() if k.startswith(RELEASED_KEY_PREFIX)}
    target.load_state_dict(stripped, strict=True)
    inputs = _inputs(batch=1)
    with torch.no_grad():
        assert torch.equal(target(*inputs), source(*inputs))


# ---- inputs --------------------------------------------------------------------------------

def test_patches_to_grid_is_row_major():
    patches = torch.randn(2, 16 * 16, 5)
    grid = patches_to_grid(patches)
    assert grid.shape == (2, 5, 16, 16)
    assert torch.equal(grid[:, :, 3, 7], patches[:, 3 * 16 + 7])
    with pytest.raises(ValueError, match="CLS"):
        patches_to_grid(torch.randn(1, 257, 5))


def test_bad_inputs_and_configs_are_rejected_clearly():
    model = _model()
    hidden, low, high = _inputs(batch=1)
    with pytest.raises(ValueError, match="mask_hidden"):
        model(hidden[:, :5], low, high)
    with pytest.raises(ValueError, match="feats_high.*patches_to_grid"):
        model(hidden, low, high[:, :, :-1])  # a grid one row short
    bad = preset("crab-tiny")
    bad = type(bad)(name="bad", vision=bad.vision, llm=bad.llm, seg=type(bad.seg)(num_scales=3, prompt_dim=32))
    with pytest.raises(OptionError, match="2 scales"):
        SegModule(bad)

