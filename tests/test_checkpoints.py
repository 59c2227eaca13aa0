"""Checkpoints: the released layout, conversion, synthetic weights and every way a file can be wrong."""

import json
import re
import shutil

import pytest
import torch

from edgeav.systems.crab.checkpoints import (
    ADDED_TOKENS, BEATS_FILE, CLIP_FOLDER, JOINT_FILE, LLAMA_FOLDER, VARIANT_FILES, extra_token_rows, load_checkpoint, save_converted, synthesize,
)
from edgeav.systems.crab.config import preset
from edgeav.errors import CheckpointError
from edgeav.systems.crab.seg import FOURIER_KEYS, RELEASED_KEY_PREFIX, fourier_matrices
from edgeav.tokenizer import TOKENIZER_CONFIG_FILE


def joint_state(loaded):
    return {k: v for k, v in loaded.variant("joint").state_dict().items() if not k.startswith("seg.")}


def assert_same_weights(a, b):
    sa, sb = joint_state(a), joint_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert a.variants.keys() == b.variants.keys()
    for name in a.variants:
        for key, tensor in a.variants[name].items():
            assert torch.equal(tensor, b.variants[name][key]), (name, key)


@torch.no_grad()
def model_outputs(loaded, variant):
    """Every component's output on fixed inputs, through the variant's weights."""
    model = loaded.variant(variant)
    gen = torch.Generator().manual_seed(0)
    frames = model.encode_frames(torch.randn(2, 3, 224, 224, generator=gen))
    audio = model.encode_audio(torch.randn(2, 98, 128, generator=gen))
    model.llm.setup_caches(1, 64)
    ids = loaded.tokenizer.encode_chat("This is a video:\n<video_start><video><video_end>\nhello")
    embeds = model.embed_prompt(ids, {loaded.tokenizer.token_id("<video>"): frames.tokens.flatten(0, 1)})
    logits, hidden = model.llm(embeds, torch.arange(embeds.shape[1]))
    masks = model.mask_logits(hidden[0, -6:], frames) if variant != "joint" else torch.zeros(0)
    return [frames.tokens, frames.mask_low, audio, logits, masks]


def test_synth_load_convert_load_round_trip(tiny_released, tmp_path):
    original = synthesize("crab-tiny", seed=3)
    released = load_checkpoint(tiny_released)
    assert released.config == preset("crab-tiny")
    assert_same_weights(original, released)
    save_converted(released, tmp_path / "converted")
    converted = load_checkpoint(tmp_path / "converted")
    assert_same_weights(released, converted)
    assert converted.tokenizer.model_proto == released.tokenizer.model_proto
    for variant in ("joint", "avs", "avss"):
        for a, b in zip(model_outputs(released, variant), model_outputs(converted, variant)):
            assert torch.equal(a, b), variant


def test_variants_swap_embeddings_head_and_mask_decoder(tiny_released):
    loaded = load_checkpoint(tiny_released)
    joint = loaded.variant("joint").llm.lm_head.weight.clone()
    avs = loaded.variant("avs")
    assert not torch.equal(avs.llm.lm_head.weight, joint) and avs.seg.num_classes == 1
    assert loaded.variant("avss").seg.num_classes == 71
    assert torch.equal(loaded.variant("joint").llm.lm_head.weight, joint)


def test_added_token_rows_come_from_the_documented_seed(tiny_released):
    loaded = load_checkpoint(tiny_released)
    embed, head = extra_token_rows(loaded.config)
    base = loaded.config.llm.base_vocab_size
    model = loaded.variant("joint")
    assert embed.shape == (len(ADDED_TOKENS), loaded.config.llm.hidden_size)
    assert torch.equal(model.llm.model.embed_tokens.weight[base:], embed)
    assert torch.equal(model.llm.lm_head.weight[base:], head)


def copy_checkpoint(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def edit_joint(folder, edit):
    path = folder / JOINT_FILE
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


LORA_B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B0.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(LORA_B0), "lora_B"),
        (lambda s: s.update({"base_model.model.model.layers.0.extra.weight": torch.zeros(2)}), "unexpected key"),
        (lambda s: s.update({LORA_B0: torch.zeros(3, 3)}), "size mismatch"),
        (lambda s: s.pop("base_model.model.model.vl_projector.visual_query_tokens"), "missing key"),
        (lambda s: s.update({"model.layers.0.x": torch.zeros(1)}), "start with 'base_model.model.'"),
    ],
    ids=["missing-lora-head", "extra-key", "wrong-shape", "missing-projector-key", "foreign-prefix"],
)
def test_bad_keys_name_the_file_component_and_key(tiny_released, tmp_path, edit, message):
    folder = copy_checkpoint(tiny_released, tmp_path)
    edit_joint(folder, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(folder)
    text = str(error.value)
    assert JOINT_FILE in text and "\n" not in text


def test_llama_files_with_rope_buffers_load(tiny_released, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tiny_released, tmp_path)
    weights = folder / "Llama-2-7b-chat-hf" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # older Hugging Face Llama-2 files
    save_file(state, str(weights))
    assert load_checkpoint(folder).config.name == "crab-tiny"


WEIGHT_FILES = [JOINT_FILE, VARIANT_FILES["avs"], BEATS_FILE, f"{LLAMA_FOLDER}/model.safetensors",
                f"{CLIP_FOLDER}/model.safetensors"]
BROKEN = {
    "empty": (lambda data: b"", "is empty \\(0 bytes\\)"),
    "truncated": (lambda data: data[: len(data) * 2 // 3], "truncated"),
    "garbage": (lambda data: bytes(range(256)) * 8, "not a PyTorch weight file|not a complete safetensors file"),
    "lfs-pointer": (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n",
                    "Git LFS pointer"),
}


@pytest.mark.parametrize("kind", BROKEN)
@pytest.mark.parametrize("name", WEIGHT_FILES)
def test_broken_weight_files_are_refused_in_one_line(tiny_released, tmp_path, name, kind):
    folder = copy_checkpoint(tiny_released, tmp_path)
    path = folder / name
    damage, message = BROKEN[kind]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(folder)
    text = str(error.value)
    assert str(path) in text and "again" in text and "\n" not in text


BROKEN_TEXT = {
    "config.json": {"garbled": (b"{not json", "not readable JSON"), "a list": (b"[1, 2]", "holds a JSON list"),
                    "nested too deep": (b"[" * 100_000, "not readable JSON")},
    TOKENIZER_CONFIG_FILE: {"garbled": (b"{not json", "not readable JSON")},
    "tokenizer.model": {"lfs-pointer": (BROKEN["lfs-pointer"][0](b""), "Git LFS pointer"),
                        "empty": (b"", "is empty \\(0 bytes\\)")},
}


@pytest.mark.parametrize("name, kind", [(name, kind) for name, kinds in BROKEN_TEXT.items() for kind in kinds])
def test_broken_config_and_tokenizer_files_are_refused_in_one_line(tiny_released, tmp_path, name, kind):
    folder = copy_checkpoint(tiny_released, tmp_path)
    path = folder / LLAMA_FOLDER / name
    data, message = BROKEN_TEXT[name][kind]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(folder)
    text = str(error.value)
    assert str(path) in text and "again" in text and "\n" not in text


def test_converted_files_that_are_broken_are_refused(tiny_released, tmp_path):
    save_converted(load_checkpoint(tiny_released), tmp_path / "converted")
    for name in ("model.safetensors", "avs.safetensors"):
        folder = copy_checkpoint(tmp_path / "converted", tmp_path / name)
        (folder / name).write_bytes(b"")
        with pytest.raises(CheckpointError, match=f"{name}: is empty"):
            load_checkpoint(folder)


def test_a_broken_weight_file_exits_2_from_the_cli(tiny_released, tmp_path, capsys):
    from edgeav.cli import main

    folder = copy_checkpoint(tiny_released, tmp_path)
    (folder / JOINT_FILE).write_bytes(b"")
    capsys.readouterr()
    rc = main(["run", "--checkpoint", str(folder)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [f"edgeav: error: {folder / JOINT_FILE}: is empty (0 bytes); the download or "
                                        "copy did not finish: copy the file again"]


def test_pickles_holding_more_than_tensors_are_refused(tiny_released, tmp_path):
    folder = copy_checkpoint(tiny_released, tmp_path)
    torch.save({"weights": torch.zeros(1), "not_a_tensor": ArithmeticError("code")}, folder / JOINT_FILE)
    with pytest.raises(CheckpointError, match="more than tensors.*ArithmeticError"):
        load_checkpoint(folder)
    torch.save({"base_model.model.model.vl_projector.x": [1, 2]}, folder / JOINT_FILE)
    with pytest.raises(CheckpointError, match="holds a list, not a tensor"):
        load_checkpoint(folder)


def test_a_plain_pickle_is_refused_in_one_clean_line_without_torch_warnings(tiny_released, tmp_path):
    """pickle.dump output (not torch.save's) used to print torch's UserWarning and quote its advice cut mid-word."""
    import pickle
    import warnings

    folder = copy_checkpoint(tiny_released, tmp_path)
    with open(folder / JOINT_FILE, "wb") as file:
        pickle.dump({"weights": [1.0, 2.0], "name": "mine"}, file, protocol=4)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError) as error:
        warnings.simplefilter("always")
        load_checkpoint(folder)
    assert [str(w.message) for w in caught] == []
    text = str(error.value)
    assert text.startswith(f"{folder / JOINT_FILE}: holds more than tensors, or is not a torch.save file")
    assert "\n" not in text and "Weights only load failed" not in text and text.endswith("or safetensors")


@pytest.mark.parametrize("edit, message", [
    ({"hidden_size": "128"}, "hidden_size must be a positive whole number, got '128'"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers must be a positive whole number, got 4.0"),
    ({"vocab_size": True}, "vocab_size must be a positive whole number, got True"),
    ({"hidden_size": "x"}, "hidden_size must be a positive whole number, got 'x'"),
    ({"vocab_size": None}, "vocab_size must be a positive whole number, got None"),
])
def test_llama_config_numbers_of_the_wrong_type_name_the_key(tiny_released, tmp_path, edit, message):
    """A string "128" used to read as a shape mismatch against the very preset that has 128."""
    folder = copy_checkpoint(tiny_released, tmp_path)
    path = folder / LLAMA_FOLDER / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    for preset_name in ("crab-tiny", None):
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: {message}; use the Llama model's own")):
            load_checkpoint(folder, preset_name)


def test_a_config_without_model_type_is_named(tiny_released, tmp_path):
    folder = copy_checkpoint(tiny_released, tmp_path)
    path = folder / LLAMA_FOLDER / "config.json"
    path.write_text(json.dumps({"hidden_size": "x"}))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: has no model_type string, so no llama model")):
        load_checkpoint(folder)


def test_wrong_preset_is_refused(tiny_released, tmp_path):
    with pytest.raises(CheckpointError, match="preset 'crab-small'"):
        load_checkpoint(tiny_released, "crab-small")
    save_converted(load_checkpoint(tiny_released), tmp_path / "converted")
    with pytest.raises(CheckpointError, match="is a crab-tiny checkpoint, not crab-small"):
        load_checkpoint(tmp_path / "converted", "crab-small")


def test_missing_parts_are_named(tiny_released, tmp_path):
    folder = copy_checkpoint(tiny_released, tmp_path)
    (folder / JOINT_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {JOINT_FILE}"):
        load_checkpoint(folder)
    folder = copy_checkpoint(tiny_released, tmp_path / "b")
    for name in VARIANT_FILES.values():
        (folder / name).unlink()
    loaded = load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="mask tasks need that file"):
        loaded.variant("avs")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_crab_7b_shapes_without_allocating():
    from edgeav.systems.crab.model import CrabModel

    with torch.device("meta"):
        model = CrabModel(preset("crab-7b"))
    llm = sum(p.numel() for p in model.llm.parameters())
    lora = sum(p.numel() for n, p in model.llm.named_parameters() if "lora" in n)
    assert llm - lora == 6_738_415_616 + 2 * 17 * 4096  # Llama-2-7B plus the 17 added rows of embeddings and head
    assert lora == 32 * 1_411_328


# ---- synthetic checkpoints hold what the release holds ------------------------------------------

def test_synthetic_release_holds_the_keys_the_runtime_drops(tiny_released):
    from safetensors.torch import load_file

    config = preset("crab-tiny")
    clip = load_file(tiny_released / CLIP_FOLDER / "model.safetensors")
    last = config.vision.num_layers - 1  # after layer llm_layer, which is the last one Crab reads
    assert last >= config.vision.llm_layer
    assert {f"vision_model.encoder.layers.{last}.mlp.fc2.weight", "vision_model.post_layernorm.weight",
            "vision_model.embeddings.position_ids", "text_model.final_layer_norm.weight", "logit_scale"} <= set(clip)
    beats = torch.load(tiny_released / BEATS_FILE, weights_only=True)
    tables = [k for k in beats["model"] if k.endswith("self_attn.relative_attention_bias.weight")]
    assert len(tables) == config.audio.num_layers
    assert "predictor.weight" in beats["model"] and beats["cfg"]["finetuned_model"] is True

    loaded = load_checkpoint(tiny_released)  # strict loading: the hooks must drop all of the above
    assert len(loaded.model.vision.encoder.layers) == config.vision.llm_layer
    assert not any("post_layernorm" in k or "position_ids" in k for k in loaded.model.vision.state_dict())
    table = loaded.model.audio.encoder.layers[0].self_attn.relative_attention_bias.weight
    assert torch.equal(table, beats["model"][tables[0]])
    assert not any(k.startswith("predictor.") for k in loaded.model.audio.state_dict())


def test_transformers_opens_the_synthetic_folders(tiny_released):
    transformers = pytest.importorskip("transformers")
    from edgeav.models.vision import default_indexes

    loaded = load_checkpoint(tiny_released)
    config = loaded.config
    clip, info = transformers.CLIPModel.from_pretrained(tiny_released / CLIP_FOLDER, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every key of a whole CLIPModel
    vision, info = transformers.CLIPVisionModel.from_pretrained(tiny_released / CLIP_FOLDER, output_loading_info=True)
    assert not info["missing_keys"]
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = loaded.model.vision(pixels)
    for index, features in zip(default_indexes(config.vision), ours):
        assert (hidden[index][:, 1:] - features).abs().max() < 1e-5, index

    llama, info = transformers.LlamaForCausalLM.from_pretrained(tiny_released / LLAMA_FOLDER, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    base = config.llm.base_vocab_size
    assert torch.equal(llama.lm_head.weight, loaded.variant("joint").llm.lm_head.weight[:base])
    tokenizer = transformers.LlamaTokenizer.from_pretrained(tiny_released / LLAMA_FOLDER)
    assert len(tokenizer) == base and tokenizer.legacy is loaded.tokenizer.settings.legacy


def test_written_files_get_the_usual_mode(tiny_released, tmp_path):
    import os

    umask = os.umask(0o027)
    try:
        save_converted(load_checkpoint(tiny_released), tmp_path / "converted")
    finally:
        os.umask(umask)
    converted = [p for p in (tmp_path / "converted").rglob("*") if p.is_file()]
    assert {p.stat().st_mode & 0o777 for p in converted} == {0o640}
    released = [p for p in tiny_released.rglob("*") if p.is_file()]
    assert {p.stat().st_mode & 0o777 for p in released} == {0o666 & ~umask}
    assert any(p.suffix == ".safetensors" for p in converted + released)


# ---- the mask decoder's Fourier matrices ------------------------------------------------------------

FOURIER_RELEASED = [f"{RELEASED_KEY_PREFIX}{key}" for key in FOURIER_KEYS]


def test_fourier_matrices_load_from_a_mask_file_that_holds_them(tiny_released, tmp_path):
    folder = copy_checkpoint(tiny_released, tmp_path)
    path = folder / VARIANT_FILES["avs"]
    state = torch.load(path, weights_only=True)
    assert not set(FOURIER_RELEASED) & set(state)  # Crab's trainer saved parameters only
    half = preset("crab-tiny").seg.prompt_dim // 2
    known = {key: torch.arange(2 * half, dtype=torch.float32).reshape(2, half) / (i + 7)
             for i, key in enumerate(FOURIER_RELEASED)}
    torch.save({**state, **known}, path)

    loaded = load_checkpoint(folder)
    buffers = dict(loaded.variant("avs").seg.named_buffers())
    for key, released_key in zip(FOURIER_KEYS, FOURIER_RELEASED):
        assert torch.equal(buffers[key], known[released_key])
    seeded = dict(loaded.variant("avss").seg.named_buffers())  # avss file: no matrices, the seeded ones
    for key, matrix in zip(FOURIER_KEYS, fourier_matrices(half)):
        assert torch.equal(seeded[key], matrix)
    # Conversion keeps the loaded values.
    save_converted(loaded, tmp_path / "converted")
    again = dict(load_checkpoint(tmp_path / "converted").variant("avs").seg.named_buffers())
    assert all(torch.equal(again[key], buffers[key]) for key in FOURIER_KEYS)


# ---- the tokenizer's settings travel with the checkpoint ------------------------------------------

def test_tokenizer_settings_survive_release_and_conversion(tiny_released, tmp_path):
    folder = copy_checkpoint(tiny_released, tmp_path)
    config_path = folder / LLAMA_FOLDER / TOKENIZER_CONFIG_FILE
    settings = json.loads(config_path.read_text())
    assert settings["legacy"] is True
    config_path.write_text(json.dumps({**settings, "legacy": False}))
    released = load_checkpoint(folder)
    assert released.tokenizer.settings.legacy is False
    save_converted(released, tmp_path / "converted")
    converted = load_checkpoint(tmp_path / "converted")
    assert converted.tokenizer.settings == released.tokenizer.settings
    instruction = "This is a video:\n<video_start><video><video_end>\nPlease describe the events."
    assert converted.tokenizer.encode_chat(instruction) == released.tokenizer.encode_chat(instruction)
    assert converted.tokenizer.encode_chat(instruction) != load_checkpoint(tiny_released).tokenizer.encode_chat(
        instruction)
