"""u-LLaVA on the systems architecture: its run, checkpoints, CLI, and parity of its LLM and prompt ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rig_llm_to_say
from edgeav.errors import OptionError
from edgeav.runtime import Runtime
from edgeav.systems import system_of_checkpoint
from edgeav.systems.ullava.checkpoints import load_checkpoint, save_converted, save_released, synthesize
from edgeav.systems.ullava.config import ADDED_TOKENS, chat_prompt


@pytest.fixture(scope="module")
def tiny():
    return synthesize("ullava-tiny", seed=3)


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(path)
    return path


def test_res_writes_a_mask_at_the_photos_size_and_rec_its_box(photo):
    loaded = synthesize("ullava-tiny", seed=3)
    rig_llm_to_say(loaded, ["[SEG]"])
    runtime = Runtime(loaded)
    res = runtime.run(photo, "res", expression="the red square")
    assert res.text == "[SEG]" and len(res.masks) == 1
    assert res.masks[0].mask.shape == (37, 53) and res.masks[0].mask.dtype == bool
    rec = runtime.run(photo, "rec", expression="the red square")
    ys, xs = np.nonzero(rec.masks[0].mask)
    assert (rec.box == [xs.min(), ys.min(), xs.max(), ys.max()]) if len(xs) else rec.box is None
    assert any("stopped at </s>" in note for note in res.notes)


def test_rec_keeps_the_groundingdino_box_that_best_overlaps_the_mask(photo):
    from edgeav.metrics import box_iou

    loaded = synthesize("ullava-tiny", seed=3)
    rig_llm_to_say(loaded, ["[SEG]", "[tag]", *loaded.tokenizer.encode("red square"), "[/tag]"])
    runtime = Runtime(loaded)
    ground = runtime.run(photo, "ground", expression="the red square")
    assert ground.object_label == "red square" and ground.detections
    ys, xs = np.nonzero(ground.masks[0].mask)
    mask_box = [xs.min(), ys.min(), xs.max(), ys.max()]
    best = max(ground.detections, key=lambda d: box_iou(list(d.box), mask_box))
    assert ground.box == list(best.box)
    rec = runtime.run(photo, "rec", expression="the red square")
    assert rec.box == ground.box and rec.detections == []


def test_a_folder_of_frames_is_read_as_eight_frames(tmp_path, tiny):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(folder / f"{i:03d}.png")
    result = Runtime(tiny).run(folder, "ask", question="What happens?", max_new_tokens=3)
    grid = tiny.config.vision.image_size // tiny.config.vision.patch_size
    assert any(f"8 frames, {8 + grid * grid} visual tokens" in note for note in result.notes)


def test_video_tokens_are_frame_means_then_patch_means(tiny):
    pixels = torch.randn(8, 3, 28, 28)
    (patches,) = tiny.model.vision_encoder(pixels)
    tokens = tiny.model.encode_video(pixels)
    assert tokens.shape == (8 + patches.shape[1], tiny.config.llm.hidden_size)
    expected = tiny.model.vision_projector(torch.cat([patches.mean(1), patches.mean(0)]))
    torch.testing.assert_close(tokens, expected)


def test_released_layout_round_trips_and_is_recognised(tmp_path, tiny, photo):
    save_released(tiny, tmp_path / "released")
    assert system_of_checkpoint(tmp_path / "released").name == "ullava"
    loaded = load_checkpoint(tmp_path / "released")
    save_converted(loaded, tmp_path / "converted")
    assert system_of_checkpoint(tmp_path / "converted").name == "ullava"
    reference = Runtime(tiny).run(photo, "caption", max_new_tokens=6)
    again = Runtime.from_checkpoint(tmp_path / "converted").run(photo, "caption", max_new_tokens=6)
    assert again.text == reference.text


def test_llm_matches_transformers_llama(tiny):
    transformers = pytest.importorskip("transformers")
    llm = tiny.config.llm
    config = transformers.LlamaConfig(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                                      intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                                      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                                      rms_norm_eps=llm.rms_norm_eps, max_position_embeddings=llm.max_seq_len,
                                      rope_theta=llm.rope_theta, tie_word_embeddings=False)
    reference = transformers.LlamaForCausalLM(config).eval()
    reference.load_state_dict(tiny.model.llm.state_dict(), strict=False)
    embeds = torch.randn(1, 12, llm.hidden_size)
    ours = tiny.model.llm
    ours.setup_caches(1, 64)
    with torch.no_grad():
        logits, _ = ours(embeds, torch.arange(12), 12)
        theirs = reference(inputs_embeds=embeds).logits
    assert (logits - theirs).abs().max() <= 1e-4


def test_prompt_ids_match_transformers_llama_tokenizer(tmp_path, tiny):
    transformers = pytest.importorskip("transformers")
    save_released(tiny, tmp_path / "released")
    reference = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "released"))
    message = "<img_beg><image_patch></img_end>\nOutput the segmentation mask of the red square in the image."
    assert reference.convert_tokens_to_ids(list(ADDED_TOKENS)) == [tiny.config.token_id(t) for t in ADDED_TOKENS]
    assert tiny.tokenizer.encode(chat_prompt(message), add_special_tokens=True) == reference(chat_prompt(message)).input_ids


def test_bad_options_are_refused_before_the_model_loads(photo):
    from edgeav.systems import get_system

    check = get_system("ullava").check_run
    with pytest.raises(OptionError, match="needs an expression"):
        check("res", source=photo)
    with pytest.raises(OptionError, match="reserves"):
        check("ask", source=photo, question="what is [SEG]?")
    with pytest.raises(OptionError, match="reads no audio"):
        check("caption", source=photo, audio="a.wav")


def test_stream_runs_video_and_picture_tasks_over_windows(tmp_path):
    from edgeav.media import synth

    path = tmp_path / "clip.mp4"
    synth.write_clip(path, duration_s=6, fps=10, width=64, height=48)
    loaded = synthesize("ullava-tiny", seed=3)
    rig_llm_to_say(loaded, ["[SEG]"])
    runtime = Runtime(loaded)
    video = list(runtime.stream(path, "caption", window=4, stride=2))
    assert [(w.start_s, w.end_s) for w in video] == [(0.0, 4.0), (2.0, 6.0)]
    assert all(any("8 frames" in note for note in w.result.notes) for w in video)
    masks = list(runtime.stream(path, "res", expression="the square"))
    assert [w.start_s for w in masks] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(len(w.result.masks) == 1 and w.result.masks[0].mask.shape == (48, 64) for w in masks)
    assert [w.result.masks[0].time_s for w in masks] == [w.frame_s for w in masks] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("size", [(37, 53), (300, 200), (224, 224), (100, 1000)])
def test_clip_pixels_equal_clip_image_processor(size):
    transformers = pytest.importorskip("transformers")
    from edgeav.preprocess.clip import clip_crop_pixels

    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)()
    reference = processor(images=image, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(clip_crop_pixels(image), reference)


def test_cli_synth_run_convert_and_stream(tmp_path, photo, capsys):
    from test_cli import assert_user_error, cli

    from edgeav.media import synth

    ckpt = tmp_path / "ul"
    assert cli(capsys, "synth", ckpt, "--preset", "ullava-tiny").rc == 0
    r = cli(capsys, "run", photo, "--checkpoint", ckpt, "--task", "ask", "--question", "What is it?",
            "--max-new-tokens", "3", "--json")
    assert r.rc == 0 and '"task": "ask"' in r.out
    assert cli(capsys, "convert", ckpt, tmp_path / "conv").rc == 0
    clip = tmp_path / "clip.mp4"
    synth.write_clip(clip, duration_s=4, fps=10, width=64, height=48)
    r = cli(capsys, "stream", clip, "--checkpoint", tmp_path / "conv", "--task", "caption", "--window", "2",
            "--max-new-tokens", "2")
    assert r.rc == 0 and "8 frames" not in r.err and r.out.count(" s  ") == 3
    assert_user_error(cli(capsys, "run", photo, "--checkpoint", ckpt, "--task", "ave"), "not of u-LLaVA", "caption")
    assert_user_error(cli(capsys, "run", photo, "--checkpoint", ckpt, "--task", "res"), "needs an expression")
    assert_user_error(cli(capsys, "run", photo, "--checkpoint", ckpt, "--task", "res", "--expression", "x",
                          "--audio", photo), "reads no audio")
    assert_user_error(cli(capsys, "run", photo, "--preset", "ullava-tiny", "--system", "crab", "--random-weights"),
                      "ullava-tiny", "crab")


def test_every_seg_gets_its_mask(tiny, tmp_path):
    from edgeav.generate import generate
    from edgeav.results import Mask, Result

    seg, tag = tiny.config.token_id("[SEG]"), tiny.config.token_id("[tag]")
    llm = tiny.model.llm
    llm.setup_caches(1, 64)
    embeds = llm.embed(torch.tensor([[1, 5, 6, 7]]))
    with torch.no_grad():
        generation = generate(llm, embeds, max_new_tokens=8, eos_id=2, mask_token_ids=(seg,), n_mask_tokens=None,
                              forced=[seg, tag, seg])
        assert generation.mask_hidden.shape == (2, tiny.config.llm.hidden_size)
        sam = tiny.model.visual_model.config.img_size
        logits = tiny.model.mask_logits(generation.mask_hidden, torch.zeros(1, 16, 16, 16), (sam, sam), (37, 53))
    assert logits.shape == (2, 37, 53)
    result = Result("res", "", masks=[Mask(0.0, (one > 0).numpy(), "") for one in logits])
    result.save_masks(tmp_path / "masks")
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["mask_000.00s_0.png", "mask_000.00s_1.png"]


def test_broken_checkpoints_and_mismatched_options_get_one_line_errors(tmp_path, tiny, photo, capsys):
    import shutil

    from test_cli import assert_user_error, cli

    from edgeav.errors import CheckpointError
    from edgeav.preprocess.sam import sam_resized_size

    folder = save_released(tiny, tmp_path / "released")
    with pytest.raises(OptionError, match="unknown u-LLaVA preset 'crab-tiny'"):
        load_checkpoint(folder, "crab-tiny")
    with pytest.raises(CheckpointError, match="holds a u-LLaVA checkpoint, not Crab; drop --system crab"):
        system_of_checkpoint(folder, "crab")
    shard = shutil.copytree(folder, tmp_path / "shard")
    (shard / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        load_checkpoint(shard)
    engine_like = tmp_path / "engine"
    engine_like.mkdir()
    (engine_like / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pass it with --engine"):
        system_of_checkpoint(engine_like)
    before = photo.read_bytes()
    assert_user_error(cli(capsys, "run", photo, "--checkpoint", folder, "--task", "res", "--expression", "x",
                          "--overlay", photo), "--overlay names the source itself")
    assert photo.read_bytes() == before
    assert_user_error(cli(capsys, "stream", photo, "--checkpoint", folder, "--task", "res", "--expression", "x",
                          "--silent-audio"), "hears no audio")
    assert sam_resized_size(1, 2049) == (1, 1024)  # a one-pixel strip keeps one row


def test_ullava_7b_has_the_released_shapes_on_the_meta_device():
    from edgeav.systems.ullava.config import preset
    from edgeav.systems.ullava.model import UllavaModel

    with torch.device("meta"):
        model = UllavaModel(preset("ullava-7b"))
    count = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("llm", "vision_encoder", "vision_projector", "visual_model", "text_hidden_fcs")}
    assert count["vision_projector"] == 1024 * 4096 + 4096
    assert count["text_hidden_fcs"] == 4096 * 4096 + 4096 + 4096 * 256 + 256  # 17.8 M
    assert 6.73e9 < count["llm"] < 6.75e9 and model.llm.model.embed_tokens.weight.shape[0] == 32010
    assert 2.90e8 < count["vision_encoder"] < 2.91e8  # ViT-L/14 to block 23: the 24th never runs (303 M with it)
    assert count["visual_model"] == 641_090_608  # SAM ViT-H, as segment-anything builds it (tests/test_sam.py)
