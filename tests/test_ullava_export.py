"""u-LLaVA export: ONNX graphs against the PyTorch reference, engine directories, receipts, the CLI.

Two exports of ullava-tiny are shared by the module: the random-weight model without GroundingDINO
with a receipt (about half a minute on a CPU), and a model rigged to answer
``[SEG] [tag]red square[/tag]`` exported with its GroundingDINO through the CLI from its released
layout, with a one-picture receipt (about three minutes on 2 cores: the grounding graph's dynamic
height and width make the exporter's symbolic shapes slow). The tests of the second are ``slow``, out of
the default run (``python -m pytest -m slow``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import engine_graphs, llm_tensorrt_problems, rig_llm_to_say
from edgeav.cli import main
from edgeav.engines.manifest import read_manifest
from edgeav.engines.manifest_schema import MANIFEST
from edgeav.errors import CheckpointError, OptionError
from edgeav.export.exporter import export_engine
from edgeav.engines.llm_io import kv_names
from edgeav.export.tensorrt import check_graph
from edgeav.models.sam import sam_config
from edgeav.preprocess.clip import clip_crop_pixels, clip_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.runtime import Runtime
from edgeav.systems.ullava.checkpoints import save_released, synthesize
from edgeav.metrics import mask_box
from edgeav.systems.ullava.export import PRECISIONS, grounding_example_size
from edgeav.systems.ullava.onnx_engine import OnnxUllava
from edgeav.systems.ullava.pipeline import UllavaPipeline

from test_cli import assert_user_error, cli

EXPRESSION = "the red square"
GRAPHS = {"vision", "llm", "sam_encoder", "sam_decoder"}


@pytest.fixture(scope="module")
def tiny():
    return synthesize("ullava-tiny", seed=3)


@pytest.fixture(scope="module")
def plain(tiny):
    """ullava-tiny as a checkpoint without GroundingDINO (the same LLM, CLIP and SAM)."""
    return dataclasses.replace(tiny, grounding=None, grounding_tokenizer=None)


@pytest.fixture(scope="module")
def engine(plain, tmp_path_factory):
    """ullava-tiny without GroundingDINO (random weights) exported to fp32 ONNX with a receipt over two
    generated pictures."""
    return export_engine(plain, tmp_path_factory.mktemp("engines") / "ullava-fp32", receipt_n=2)


@pytest.fixture(scope="module")
def rigged():
    loaded = synthesize("ullava-tiny", seed=3)
    rig_llm_to_say(loaded, ["[SEG]", "[tag]", *loaded.tokenizer.encode("red square"), "[/tag]"])
    return loaded


@pytest.fixture(scope="module")
def rigged_engine(rigged, tmp_path_factory):
    """The rigged model with its GroundingDINO written in the released layout and exported by ``edgeav export``
    with a one-picture receipt."""
    folder = tmp_path_factory.mktemp("ullava")
    save_released(rigged, folder / "checkpoint")
    assert main(["export", str(folder / "checkpoint"), "-o", str(folder / "engine"), "--receipt-n", "1"]) == 0
    return folder / "engine"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    picture = np.full((61, 83, 3), 30, np.uint8)
    picture[12:40, 20:55] = (220, 40, 40)
    Image.fromarray(picture).save(path)
    return path


def test_fp32_receipt_matches_the_reference(engine):
    receipt = read_manifest(engine)["receipt"]
    assert receipt["logits"]["max_abs_logit_diff"] <= 1e-4
    assert receipt["logits"]["steps"] > 50 and receipt["logits"]["top1_agreement"] == 1.0
    assert receipt["greedy_text_agreement"] == 1.0
    assert receipt["mask_iou_vs_reference"] == 1.0
    assert receipt["pictures"] == 2 and receipt["prompts"] == ["caption", "ask", "res"]
    assert receipt["grounding"] is None  # the checkpoint had no GroundingDINO


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_fp32_grounding_receipt_matches_the_reference(rigged_engine):
    grounding = read_manifest(rigged_engine)["receipt"]["grounding"]
    assert grounding["precision"] == "fp32" and grounding["pictures"] == 1
    assert grounding["pictures_with_boxes"] == 1  # the rec box came from GroundingDINO, not the mask
    assert grounding["max_abs_logit_diff"] <= 1e-4 and grounding["max_abs_box_diff"] <= 1e-4
    assert grounding["rec_box_iou_min"] > 0.999


def test_fp32_graphs_match_the_reference(plain, engine, photo):
    onnx_model = OnnxUllava(engine).model
    model = plain.model
    picture = np.asarray(Image.open(photo).convert("RGB"))
    config = plain.config
    torch.manual_seed(0)
    embeds = torch.randn(1, 9, config.llm.hidden_size)
    step = torch.randn(1, 1, config.llm.hidden_size)
    model.llm.setup_caches(1, 64)
    onnx_model.llm.setup_caches(1, 64)
    frames = torch.from_numpy(clip_pixels(np.stack([picture] * 8), config.vision.image_size))
    sam, resized = sam_pixels(picture, sam_config(config.sam).img_size)
    seg_hidden = torch.randn(2, config.llm.hidden_size)
    with torch.inference_mode():
        pairs = [(model.llm(embeds, torch.arange(9), 9)[0][:, -1:], onnx_model.llm(embeds, torch.arange(9), 9)[0]),
                 (model.llm(step, torch.tensor([9]), 10)[0], onnx_model.llm(step, torch.tensor([9]), 10)[0])]
        image = torch.from_numpy(clip_crop_pixels(picture, config.vision.image_size))
        pairs += [(model.encode_image(image), onnx_model.encode_image(image)),
                  (model.encode_video(frames), onnx_model.encode_video(frames))]
        embedding = model.encode_sam(torch.from_numpy(sam))
        pairs += [(embedding, onnx_model.encode_sam(torch.from_numpy(sam)))]
        logits = model.mask_logits(seg_hidden, embedding, resized, picture.shape[:2])
        pairs += [(logits, onnx_model.mask_logits(seg_hidden, embedding, resized, picture.shape[:2]))]
    for index, (reference, exported) in enumerate(pairs):
        assert reference.shape == exported.shape, index
        assert (reference - exported).abs().max() <= 1e-4, index
    assert logits.shape == (2, *picture.shape[:2])


def test_fp32_engine_writes_the_references_greedy_text(plain, engine, photo):
    reference = Runtime(plain).run(photo, "ask", question="What is in the picture?", max_new_tokens=16)
    exported = Runtime.from_engine(engine).run(photo, "ask", question="What is in the picture?", max_new_tokens=16)
    assert exported.text == reference.text and len(plain.tokenizer.encode(reference.text)) > 3
    assert "onnx engine" in exported.model


def _input_axes(folder) -> dict[str, dict[str, list[str]]]:
    manifest = read_manifest(folder)
    graphs = {name: onnx.load(str(folder / entry["file"])) for name, entry in manifest["graphs"].items()}
    return {name: {value.name: [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
                   for value in graph.graph.input} for name, graph in graphs.items()}


def test_manifest_names_the_system_its_graphs_and_their_axes(engine):
    manifest = read_manifest(engine)
    assert manifest["system"] == "ullava" and manifest["precision"] == "fp32"
    assert manifest["components"] == PRECISIONS["fp32"].components
    axes = _input_axes(engine)
    assert axes == {"vision": {"pixels": ["frames"]}, "sam_encoder": {"pixels": ["images"]},
                    "sam_decoder": {"seg_hidden": ["masks"], "image_embedding": []},
                    "llm": {"inputs_embeds": ["tokens"], "past_length": [],
                            **{name: ["capacity"] for name in kv_names(manifest["config"]["llm"]["num_layers"])[0]}}}
    assert manifest["embed"] in manifest["files"] and "grounding_vocab" not in manifest


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_grounding_graph_takes_any_picture_and_caption_and_its_vocabulary_is_hashed(rigged_engine):
    manifest = read_manifest(rigged_engine)
    assert set(manifest["graphs"]) == GRAPHS | {"grounding"}
    assert _input_axes(rigged_engine)["grounding"] == {
        "pixel_values": ["height", "width"], "pixel_mask": ["height", "width"], "input_ids": ["tokens"],
        "attention_mask": ["tokens"], "token_type_ids": ["tokens"]}
    vocab = manifest["grounding_vocab"]
    assert vocab in manifest["files"] and (rigged_engine / vocab).read_text().splitlines()[101] == "[CLS]"


def test_every_fp32_graph_but_the_fused_llm_parses_in_tensorrt(engine):
    assert llm_tensorrt_problems(engine_graphs(engine)) == []


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_the_grounding_graph_parses_in_tensorrt(rigged_engine):
    assert check_graph(rigged_engine / read_manifest(rigged_engine)["graphs"]["grounding"]["file"]) == []


def _grounding_inputs(height: int, width: int, ids: list[int], seed: int, padded: bool = False):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, height, width, dtype=torch.long)
    if padded:  # a picture in the top-left of a bigger canvas, as the release batches pictures
        mask[:, height * 2 // 3:], mask[:, :, width * 3 // 4:] = 0, 0
    input_ids = torch.tensor([ids])
    return (torch.randn(1, 3, height, width, generator=generator), mask, input_ids, torch.ones_like(input_ids),
            torch.zeros_like(input_ids))


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_onnx_grounding_matches_torch_at_any_picture_size_and_caption(rigged, rigged_engine):
    exported, model = OnnxUllava(rigged_engine).grounding, rigged.grounding
    tokenizer = rigged.grounding_tokenizer
    captions = [tokenizer.encode(text).input_ids[0].tolist() for text in ("cat", "the red square . blue circle",
                                                                           "a man on the left . dog . cat")]
    traced = grounding_example_size(model.config)
    # the traced size; odd sizes (Swin pads patches, windows, merges); one window at the last stage; portrait,
    # landscape; a padded canvas
    cases = [(*traced, 1, False), (97, 131, 0, False), (225, 64, 2, False), (333, 250, 1, False),
             (120, 401, 0, False), (301, 283, 2, True)]
    for index, (height, width, caption, padded) in enumerate(cases):
        inputs = _grounding_inputs(height, width, captions[caption], seed=index, padded=padded)
        with torch.inference_mode():
            want_logits, want_boxes = model(*inputs)
        logits, boxes = exported(*inputs)
        finite = torch.isfinite(want_logits)
        assert torch.equal(torch.isfinite(logits), finite), (height, width)
        assert (logits - want_logits)[finite].abs().max() <= 1e-4, (height, width)
        assert (boxes - want_boxes).abs().max() <= 1e-4, (height, width)
        assert logits.shape == (1, model.config.num_queries, model.config.max_text_len)


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_cli_run_rec_with_the_engine_keeps_groundingdinos_box(rigged, rigged_engine, photo, capsys):
    reference = Runtime(rigged).run(photo, "ground", expression=EXPRESSION)
    assert reference.object_label == "red square" and reference.detections  # premise: GroundingDINO finds boxes
    r = cli(capsys, "run", photo, "--engine", rigged_engine, "--task", "rec", "--expression", EXPRESSION, "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert result["object_label"] == "red square" and len(result["masks"]) == 1
    assert not any("GroundingDINO" in note for note in result["notes"]), result["notes"]
    assert result["box"] == pytest.approx(reference.box, abs=1e-3)
    assert result["box"] != list(mask_box(reference.masks[0].mask))  # a GroundingDINO box, not the mask's
    exported = Runtime.from_engine(rigged_engine).run(photo, "ground", expression=EXPRESSION)
    assert len(exported.detections) == len(reference.detections)
    for got, want in zip(exported.detections, reference.detections):
        assert got.box == pytest.approx(want.box, abs=1e-3) and got.label == want.label


def test_an_engine_without_groundingdino_boxes_the_mask_and_says_so(engine, photo):
    runtime = Runtime.from_engine(engine)
    assert runtime.engine.grounding is None and runtime.engine.grounding_tokenizer is None
    result = runtime.run(photo, "rec", expression=EXPRESSION, max_new_tokens=4)
    assert any("no GroundingDINO" in note for note in result.notes), result.notes


def test_info_prints_the_receipt(engine, capsys):
    r = cli(capsys, "info", engine)
    assert r.rc == 0, r.err
    assert "system     ullava" in r.out and "hashes match" in r.out
    assert "2 generated pictures x 3 prompts" in r.out and "identical in 100% of runs" in r.out
    assert "IoU 1.000" in r.out and "GroundingDINO" not in r.out
    for graph in GRAPHS:
        assert f"\n{graph} " in r.out


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_cli_export_info_and_run_res_with_the_engine(rigged, rigged_engine, photo, capsys):
    r = cli(capsys, "info", rigged_engine)
    assert r.rc == 0, r.err
    assert re.search(r"\ngrounding +grounding +fp32 ", r.out)
    assert re.search(r"GroundingDINO +\(fp32\) max \|logit diff\| \S+, max \|box diff\| \S+, rec box IoU 1\.000 "
                     r"\(min 1\.000; 1 of 1 pictures with boxes", r.out), r.out
    r = cli(capsys, "run", photo, "--engine", rigged_engine, "--task", "res", "--expression", EXPRESSION, "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert result["text"] == Runtime(rigged).run(photo, "res", expression=EXPRESSION).text
    assert result["text"].startswith("[SEG]") and len(result["masks"]) == 1 and "onnx engine" in result["model"]


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_runtime_from_engine_runs_res_through_the_pipeline_like_the_reference(rigged, rigged_engine, photo):
    runtime = Runtime.from_engine(rigged_engine)
    assert runtime.system.name == "ullava" and isinstance(runtime.pipeline, UllavaPipeline)
    exported = runtime.run(photo, "res", expression=EXPRESSION)
    reference = Runtime(rigged).run(photo, "res", expression=EXPRESSION)
    assert exported.text == reference.text and reference.object_label == "red square"
    mask, expected = exported.masks[0].mask, reference.masks[0].mask
    assert mask.shape == expected.shape == (61, 83)
    assert expected.any() and not expected.all()  # a real mask, so agreeing on it means something
    intersection, union = (mask & expected).sum(), (mask | expected).sum()
    assert intersection / union == 1.0
    # The KV buffer is allocated once and reused by the next run.
    buffer = runtime.engine.model.llm._kv
    runtime.run(photo, "rec", expression=EXPRESSION)
    assert runtime.engine.model.llm._kv is buffer


def test_options_ullava_does_not_take_are_refused_before_exporting(tiny, tmp_path, capsys):
    with pytest.raises(OptionError, match="no LoRA to merge"):
        export_engine(tiny, tmp_path / "e", merge_lora=True)
    with pytest.raises(OptionError, match="one set of weights"):
        export_engine(tiny, tmp_path / "e", variants=("avs",))
    assert_user_error(cli(capsys, "export", "ullava-tiny", "-o", tmp_path / "e", "--merge-lora"), "--merge-lora",
                      "no LoRA")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("change, needle", [
    (lambda m: m["config"]["llm"].update(num_kv_heads=2), "past_key_0 is [1, 4, ?, 16], the config needs "
                                                          "[1, 2, ?, 16]"),
    (lambda m: m["config"].update(sam="vit_b"), "pixels is [?, 3, 256, 256], the config needs [?, 3, 1024, 1024]"),
    (lambda m: m.update(embed="other.npy"), "embed 'other.npy' is not listed in files"),
    (lambda m: m["graphs"].pop("sam_decoder"), "graphs has no sam_decoder graph"),
    (lambda m: m["config"].update(video_frames="8"), "config.video_frames must be a whole number >= 0, not str"),
    (lambda m: m.update(system="nope"), "system 'nope' is not one of"),
], ids=["layers", "sam-preset", "embed", "decoder", "config-kind", "system"])
def test_an_edited_manifest_is_refused_in_one_line(engine, tmp_path, change, needle):
    folder = tmp_path / "engine"
    shutil.copytree(engine, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape(needle)) as refused:
        OnnxUllava(folder)
    assert "\n" not in str(refused.value)


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
@pytest.mark.parametrize("change, needle", [
    (lambda m: m.pop("grounding_vocab"), "grounding_vocab is missing"),
    (lambda m: m["graphs"].pop("grounding"), "graphs has no grounding graph"),
    (lambda m: m["config"].update(grounding="swint_ogc"), "pred_logits is [1, 20, 32], the config needs "
                                                          "[1, 900, 256]"),
    (lambda m: m["receipt"]["grounding"].pop("rec_box_iou_min"), "receipt.grounding.rec_box_iou_min is missing"),
], ids=["vocab", "graph", "preset", "receipt"])
def test_an_edited_grounding_manifest_is_refused_in_one_line(rigged_engine, tmp_path, change, needle):
    test_an_edited_manifest_is_refused_in_one_line(rigged_engine, tmp_path, change, needle)


@pytest.mark.slow  # GroundingDINO's export takes about three minutes on 2 cores (the rigged_engine fixture)
def test_a_changed_grounding_vocabulary_is_refused(rigged_engine, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(rigged_engine, folder)
    vocab = folder / read_manifest(folder)["grounding_vocab"]
    vocab.write_text(vocab.read_text().replace("square", "circle", 1))
    with pytest.raises(CheckpointError, match="grounding_vocab.txt: its SHA-256 does not match"):
        OnnxUllava(folder)


@pytest.mark.slow  # about half a minute each: a whole export with its calibration and receipt
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantized_exports_run_and_load(tiny, photo, tmp_path, precision):
    folder = export_engine(tiny, tmp_path / precision, precision=precision, receipt_n=1)
    manifest = read_manifest(folder)
    assert manifest["components"] == PRECISIONS[precision].components
    receipt = manifest["receipt"]
    assert receipt["logits"]["steps"] > 20 and receipt["mask_iou_vs_reference"] is not None
    graphs = {name: onnx.load(str(folder / entry["file"])) for name, entry in manifest["graphs"].items()}
    ops = {name: {node.op_type for node in graph.graph.node} for name, graph in graphs.items()}
    if precision == "fp16":
        assert receipt["logits"]["max_abs_logit_diff"] < 1e-2 and receipt["greedy_text_agreement"] == 1.0
        assert all("Cast" in found for found in ops.values())
    if precision == "int8":
        assert all("DequantizeLinear" in ops[name] for name in ("vision", "sam_encoder", "sam_decoder"))
        assert "DequantizeLinear" not in ops["llm"] and "DequantizeLinear" not in ops["grounding"]
        assert receipt["logits"]["top1_agreement"] > 0.9
    # GroundingDINO: fp16 under fp16, fp32 under int8 (QDQ moves its boxes) and int4
    assert receipt["grounding"]["precision"] == manifest["components"]["grounding"] == (
        "fp16" if precision == "fp16" else "fp32")
    assert receipt["grounding"]["rec_box_iou_min"] > (0.9 if precision == "fp16" else 0.999)
    llm_problems = llm_tensorrt_problems(graphs)
    if precision in ("int8", "int4"):  # the LLM's weights in 8 or 4 bits
        nbits = [node for node in graphs["llm"].graph.node if node.op_type == "MatMulNBits"]
        assert len(nbits) == 7 * tiny.config.llm.num_layers + 1  # every projection and the LM head
        assert {onnx.helper.get_attribute_value(a) for n in nbits for a in n.attribute if a.name == "bits"} == {
            8 if precision == "int8" else 4}
        assert any("MatMulNBits" in problem for problem in llm_problems)
    result = Runtime.from_engine(folder).run(photo, "caption", max_new_tokens=4)
    assert result.text and precision in result.model
