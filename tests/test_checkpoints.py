"""Checkpoints: the released layout, conversion, synthetic weights and every way a file can be wrong."""

import shutil

import pytest
import torch

from edgeav.checkpoints import (
    ADDED_TOKENS,
    JOINT_FILE,
    VARIANT_FILES,
    extra_token_rows,
    load_checkpoint,
    save_converted,
    synthesize,
)
from edgeav.config import preset
from edgeav.errors import CheckpointError


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


def test_truncated_and_foreign_files_are_refused(tiny_released, tmp_path):
    folder = copy_checkpoint(tiny_released, tmp_path)
    data = (folder / VARIANT_FILES["avs"]).read_bytes()
    (folder / VARIANT_FILES["avs"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(folder)

    folder = copy_checkpoint(tiny_released, tmp_path / "b")
    torch.save({"weights": torch.zeros(1), "not_a_tensor": ArithmeticError("code")}, folder / JOINT_FILE)
    with pytest.raises(CheckpointError, match="more than tensors"):
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
    from edgeav.models.crab import CrabModel

    with torch.device("meta"):
        model = CrabModel(preset("crab-7b"))
    llm = sum(p.numel() for p in model.llm.parameters())
    lora = sum(p.numel() for n, p in model.llm.named_parameters() if "lora" in n)
    assert llm - lora == 6_738_415_616 + 2 * 17 * 4096  # Llama-2-7B plus the 17 added rows of embeddings and head
    assert lora == 32 * 1_411_328
