"""u-LLaVA export: ONNX graphs against the PyTorch reference, engine directories, receipts, the CLI.

Two exports of ullava-tiny are shared by the module (about half a minute each on a CPU): the
random-weight model with a receipt, and a model rigged to answer ``[SEG]`` exported through the
CLI from its released layout.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import rig_llm_to_say
from edgeav.cli import main
from edgeav.engines.manifest import read_manifest
from edgeav.engines.manifest_schema import MANIFEST
from edgeav.errors import CheckpointError, OptionError
from edgeav.export.exporter import export_engine
from edgeav.export.tensorrt import check_graph
from edgeav.models.sam import sam_config
from edgeav.preprocess.clip import clip_crop_pixels, clip_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.runtime import Runtime
from edgeav.systems.ullava.checkpoints import save_released, synthesize
from edgeav.systems.ullava.export import PRECISIONS
from edgeav.systems.ullava.onnx_engine import OnnxUllava
from edgeav.systems.ullava.pipeline import UllavaPipeline

from test_cli import assert_user_error, cli

EXPRESSION = "the red square"


@pytest.fixture(scope="module")
def tiny():
    return synthesize("ullava-tiny", seed=3)


@pytest.fixture(scope="module")
def engine(tiny, tmp_path_factory):
    """ullava-tiny (random weights) exported to fp32 ONNX with a receipt over two generated pictures."""
    return export_engine(tiny, tmp_path_factory.mktemp("engines") / "ullava-fp32", receipt_n=2)


@pytest.fixture(scope="module")
def rigged():
    loaded = synthesize("ullava-tiny", seed=3)
    rig_llm_to_say(loaded, ["[SEG]"])
    return loaded


@pytest.fixture(scope="module")
def rigged_engine(rigged, tmp_path_factory):
    """The rigged model written in the released layout and exported by ``edgeav export`` (no receipt)."""
    folder = tmp_path_factory.mktemp("ullava")
    save_released(rigged, folder / "checkpoint")
    assert main(["export", str(folder / "checkpoint"), "-o", str(folder / "engine"), "--receipt-n", "0"]) == 0
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


def test_fp32_graphs_match_the_reference(tiny, engine, photo):
    onnx_model = OnnxUllava(engine).model
    model = tiny.model
    picture = np.asarray(Image.open(photo).convert("RGB"))
    config = tiny.config
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


def test_fp32_engine_writes_the_references_greedy_text(tiny, engine, photo):
    reference = Runtime(tiny).run(photo, "ask", question="What is in the picture?", max_new_tokens=16)
    exported = Runtime.from_engine(engine).run(photo, "ask", question="What is in the picture?", max_new_tokens=16)
    assert exported.text == reference.text and len(tiny.tokenizer.encode(reference.text)) > 3
    assert "onnx engine" in exported.model


def test_manifest_names_the_system_its_graphs_and_their_axes(engine):
    manifest = read_manifest(engine)
    assert manifest["system"] == "ullava" and manifest["precision"] == "fp32"
    assert manifest["components"] == PRECISIONS["fp32"].components
    graphs = {name: onnx.load(str(engine / entry["file"])) for name, entry in manifest["graphs"].items()}
    assert set(graphs) == {"vision", "llm", "sam_encoder", "sam_decoder"}
    axes = {name: {value.name: [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param]
                   for value in graph.graph.input} for name, graph in graphs.items()}
    assert axes == {"vision": {"pixels": ["frames"]}, "sam_encoder": {"pixels": ["images"]},
                    "sam_decoder": {"seg_hidden": ["masks"], "image_embedding": []},
                    "llm": {"inputs_embeds": ["tokens"], "past_kv": ["past"]}}
    assert manifest["embed"] in manifest["files"]


def test_every_fp32_graph_parses_in_tensorrt(engine):
    for entry in read_manifest(engine)["graphs"].values():
        assert check_graph(engine / entry["file"]) == [], entry["file"]


def test_info_prints_the_receipt(engine, capsys):
    r = cli(capsys, "info", engine)
    assert r.rc == 0, r.err
    assert "system     ullava" in r.out and "hashes match" in r.out
    assert "2 generated pictures x 3 prompts" in r.out and "identical in 100% of runs" in r.out
    assert "IoU 1.000" in r.out
    for graph in ("vision", "llm", "sam_encoder", "sam_decoder"):
        assert f"\n{graph} " in r.out


def test_cli_export_info_and_run_res_with_the_engine(rigged, rigged_engine, photo, capsys):
    r = cli(capsys, "info", rigged_engine)
    assert r.rc == 0 and "no fidelity receipt" in r.out
    r = cli(capsys, "run", photo, "--engine", rigged_engine, "--task", "res", "--expression", EXPRESSION, "--json")
    assert r.rc == 0, r.err
    result = json.loads(r.out)
    assert result["text"] == "[SEG]" and len(result["masks"]) == 1 and "onnx engine" in result["model"]


def test_runtime_from_engine_runs_res_through_the_pipeline_like_the_reference(rigged, rigged_engine, photo):
    runtime = Runtime.from_engine(rigged_engine)
    assert runtime.system.name == "ullava" and isinstance(runtime.pipeline, UllavaPipeline)
    exported = runtime.run(photo, "res", expression=EXPRESSION)
    reference = Runtime(rigged).run(photo, "res", expression=EXPRESSION)
    assert exported.text == reference.text == "[SEG]"
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
    (lambda m: m["config"]["llm"].update(num_layers=3), "past_kv is [?, 2, 2, 1, 4, 16], the config needs "
                                                        "[?, 3, 2, 1, 4, 16]"),
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
        assert "DequantizeLinear" not in ops["llm"]
        assert receipt["logits"]["top1_agreement"] > 0.9
    if precision == "int4":
        nbits = [node for node in graphs["llm"].graph.node if node.op_type == "MatMulNBits"]
        assert len(nbits) == 7 * tiny.config.llm.num_layers + 1  # every projection and the LM head
        assert any("MatMulNBits" in problem for problem in check_graph(graphs["llm"]))
    else:
        for name, graph in graphs.items():
            assert check_graph(graph) == [], name
    result = Runtime.from_engine(folder).run(photo, "caption", max_new_tokens=4)
    assert result.text and precision in result.model
