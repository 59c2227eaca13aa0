"""u-LLaVA's part of ``edgeav export``: its graphs, example inputs, int8 calibration, receipt and
engine layout (the generic machinery is :mod:`edgeav.export`).

Graphs, each a thin wrapper over the reference modules:

- ``vision``: CLIP pixels ``[F,3,S,S]`` -> projected patch tokens ``[F,P,D]`` (one frame per
  image; a video's 8). The video pooling stays at run time: the projector is one affine
  Linear, so the means of its outputs equal the projection of the means (up to rounding);
- ``llm``: the Llama over an explicit KV cache (:class:`~edgeav.export.graphs.LLMGraph`), the
  token embedding table beside it as ``embed.npy``;
- ``sam_encoder``: SAM pixels ``[B,3,1024,1024]`` -> the image embedding ``[B,256,64,64]``;
- ``sam_decoder``: the states that produced each ``[SEG]`` ``[N,D]`` and one image embedding ->
  ``text_hidden_fcs`` -> one sparse prompt token each -> SAM's mask decoder -> low-res logits
  ``[N,1,256,256]`` (upsampled at run time by :func:`edgeav.models.sam.postprocess_masks`);
- ``grounding`` (when the checkpoint has GroundingDINO): pixels ``[1,3,H,W]`` at any size, their
  mask and the caption's ids ``[1,L]`` -> ``pred_logits [1,Q,T]``, ``pred_boxes [1,Q,4]``, the
  BERT vocabulary beside it as ``grounding_vocab.txt``. Height, width and caption length stay
  dynamic (free axes: the Swin's window padding is ceil arithmetic the exporter cannot prove).

Calibration and receipts run generated pictures (coloured shapes) through the PyTorch reference.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor, nn

from edgeav.engines.manifest import precision_rows
from edgeav.engines.manifest_schema import ManifestCheck, check_logit_stats
from edgeav.engines.spec import ROLE_LLM, ROLE_REST, SystemExport
from edgeav.errors import OptionError
from edgeav.engines.llm_io import llm_shapes
from edgeav.export.graphs import GROUNDING, GraphSpec, grounding_example_size, llm_example, llm_graph, llm_profiles
from edgeav.export.receipt import logit_stats
from edgeav.decoding import Generation
from edgeav.generate import generate
from edgeav.metrics import box_iou, mask_box, mask_iou
from edgeav.models.grounding_dino import GroundedBox, GroundingDINOConfig, detect
from edgeav.models.sam import sam_config
from edgeav.preprocess.clip import clip_crop_pixels
from edgeav.preprocess.grounding_dino import grounding_dino_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.systems.ullava.config import UllavaConfig, prompt_ids
from edgeav.systems.ullava.model import UllavaModel
from edgeav.systems.ullava.tasks import get_task

if TYPE_CHECKING:
    from edgeav.systems.ullava.checkpoints import LoadedUllava

COMPONENTS = {"vision": ROLE_REST, "llm": ROLE_LLM, "sam_encoder": ROLE_REST, "sam_decoder": ROLE_REST,
              "grounding": ROLE_REST}
PRECISIONS = precision_rows(COMPONENTS, {
    "int8": "CLIP + projector, SAM's encoder and the [SEG] mask decoder int8 (static QDQ, calibrated on "
            "generated pictures); LLM weights 8-bit (MatMulNBits; a TensorRT engine's LLM: fp32); GroundingDINO "
            "fp32",
    "int4": "LLM weights int4 (MatMulNBits); the rest fp32",
})
# GroundingDINO stays fp32 under int8: static QDQ moved its rec boxes to IoU ~0 on the generated pictures, with or
# without its deformable attention's offset and weight projections kept in fp32 (fp16 keeps IoU ~0.99)
PRECISIONS["int8"] = dataclasses.replace(PRECISIONS["int8"],
                                         components={**PRECISIONS["int8"].components, "grounding": "fp32"})
GROUNDING_VOCAB = "grounding_vocab.txt"  # GroundingDINO's BERT vocab.txt, one token a line

# -- graphs ------------------------------------------------------------------------------------------

VISION = GraphSpec(("pixels",), ("visual_tokens",), {"pixels": {0: "frames"}, "visual_tokens": {0: "frames"}})
SAM_ENCODER = GraphSpec(("pixels",), ("image_embedding",),
                        {"pixels": {0: "images"}, "image_embedding": {0: "images"}})
SAM_DECODER = GraphSpec(("seg_hidden", "image_embedding"), ("low_res_logits",),
                        {"seg_hidden": {0: "masks"}, "low_res_logits": {0: "masks"}})


class VisionGraph(nn.Module):
    """CLIP-normalised pixels [F, 3, S, S] -> projected patch tokens [F, P, D] (CLIP's ``hidden_states[-2]``)."""

    def __init__(self, model: UllavaModel) -> None:
        super().__init__()
        self.vision_encoder = model.vision_encoder
        self.vision_projector = model.vision_projector

    def forward(self, pixels: Tensor) -> Tensor:
        (patches,) = self.vision_encoder(pixels)
        return self.vision_projector(patches)


class SamEncoderGraph(nn.Module):
    """SAM pixels [B, 3, I, I] (resized, normalised, padded) -> image embeddings [B, C, g, g]."""

    def __init__(self, model: UllavaModel) -> None:
        super().__init__()
        self.visual_model = model.visual_model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.visual_model.encode_image(pixels)


class SamDecoderGraph(nn.Module):
    """The states that produced each ``[SEG]`` [N, D] and one image embedding [1, C, g, g] -> low-res mask
    logits [N, 1, 4g, 4g] (single-mask output)."""

    def __init__(self, model: UllavaModel) -> None:
        super().__init__()
        self.text_hidden_fcs = model.text_hidden_fcs
        self.visual_model = model.visual_model

    def forward(self, seg_hidden: Tensor, image_embedding: Tensor) -> Tensor:
        prompt = self.text_hidden_fcs(seg_hidden)[:, None, :]
        sparse, dense = self.visual_model.prompt_embeddings(sparse=prompt)
        low_res, _ = self.visual_model.decode_masks(image_embedding, sparse, dense, multimask_output=False)
        return low_res


def grounding_config(config: UllavaConfig) -> GroundingDINOConfig:
    return GroundingDINOConfig.from_preset(config.grounding)


def examples(loaded: LoadedUllava) -> dict[str, tuple[Tensor, ...]]:
    """One example input per component, for tracing (two of each dynamic axis: a size-1 axis would be
    specialised by the exporter)."""
    cfg = loaded.config
    sam = sam_config(cfg.sam)
    size, hidden = cfg.vision.image_size, cfg.llm.hidden_size
    grid = sam.image_embedding_size
    found = {
        "vision": (torch.randn(2, 3, size, size),),
        "llm": llm_example(cfg.llm),
        "sam_encoder": (torch.randn(2, 3, sam.img_size, sam.img_size),),
        "sam_decoder": (torch.randn(2, hidden), torch.randn(1, sam.prompt_embed_dim, grid, grid)),
    }
    if loaded.grounding is not None:
        height, width = grounding_example_size(loaded.grounding.config)
        ids = torch.from_numpy(loaded.grounding_tokenizer.encode("red square . blue circle").input_ids)
        found["grounding"] = (torch.randn(1, 3, height, width), torch.ones(1, height, width, dtype=torch.long), ids,
                              torch.ones_like(ids), torch.zeros_like(ids))
    return found


def export_options(loaded: LoadedUllava, *, variants: tuple[str, ...] | None = None,
                   merge_lora: bool = False) -> dict:
    """u-LLaVA takes no system options: one set of weights, no LoRA (the release is a full fine-tune)."""
    if variants is not None:
        raise OptionError(f"variants {tuple(variants)!r}: u-LLaVA has one set of weights; drop the variants")
    if merge_lora:
        raise OptionError("--merge-lora: u-LLaVA has no LoRA to merge (its release is a full fine-tune); drop it")
    return {}


def build(loaded: LoadedUllava, writer, options: dict) -> dict:
    """Emit u-LLaVA's graphs (``grounding`` when the checkpoint has GroundingDINO) and its embedding table
    through ``writer``; -> the manifest's ``embed`` (and ``grounding_vocab``)."""
    model = loaded.model
    example = examples(loaded)
    runs: dict = {}

    def feeds(graph: str) -> Callable[[], list[dict[str, np.ndarray]]]:
        return lambda: calibration_inputs(loaded, graph, CALIBRATION_PICTURES, runs)

    with torch.no_grad():
        writer.emit("vision", "vision", VisionGraph(model), VISION, example["vision"], calibration=feeds("vision"))
        writer.emit("llm", "llm", *llm_graph(model.llm, options["format"]), example["llm"])
        writer.emit("sam_encoder", "sam_encoder", SamEncoderGraph(model), SAM_ENCODER, example["sam_encoder"],
                    calibration=feeds("sam_encoder"))
        writer.emit("sam_decoder", "sam_decoder", SamDecoderGraph(model), SAM_DECODER, example["sam_decoder"],
                    calibration=feeds("sam_decoder"))
        if loaded.grounding is not None:
            writer.emit("grounding", "grounding", loaded.grounding.eval(), GROUNDING, example["grounding"],
                        calibration=feeds("grounding"))
    keys = {"embed": writer.save_table("embed.npy", model.llm.model.embed_tokens.weight)}
    if loaded.grounding is not None:
        (writer.work / GROUNDING_VOCAB).write_bytes(vocabulary_bytes(loaded))
        keys["grounding_vocab"] = GROUNDING_VOCAB
    return keys


def vocabulary_bytes(loaded: LoadedUllava) -> bytes:
    """GroundingDINO's caption vocabulary as a ``vocab.txt`` (one token a line, the line number is its id)."""
    return "".join(token + "\n" for token in loaded.grounding_tokenizer.vocabulary()).encode("utf-8")


def weights(loaded: LoadedUllava) -> dict[str, dict[str, Tensor]]:
    found = {"model": loaded.model.state_dict()}
    if loaded.grounding is not None:  # its weights and its vocabulary change the engine too
        vocab = torch.frombuffer(bytearray(vocabulary_bytes(loaded)), dtype=torch.uint8)
        found["grounding"] = {**loaded.grounding.state_dict(), "vocab.txt": vocab}
    return found


# -- generated pictures and the runs both sides share ------------------------------------------------

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
RECEIPT_SEED = 3_000_000  # receipt and calibration pictures come from seeds of their own
CALIBRATION_SEED = 4_000_000
CALIBRATION_PICTURES = 6
RECEIPT_TOKENS = 32  # the authors' evaluate default


def demo_pictures(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """``n`` pictures of a coloured square on a plain background, of varied sizes -> (uint8 [H,W,3], colour)."""
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(n):
        height, width = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        picture = np.empty((height, width, 3), np.uint8)
        picture[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        side = int(rng.integers(min(height, width) // 4, min(height, width) // 2 + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        picture[top:top + side, left:left + side] = COLOURS[colour]
        pictures.append((picture, colour))
    return pictures


def prompts(colour: str) -> list[tuple[str, dict[str, str]]]:
    """The receipt's prompts for a picture of a ``colour`` square: (task, its option)."""
    return [("caption", {}), ("ask", {"question": f"What colour is the square? It looks {colour}."}),
            ("res", {"expression": f"{colour} square"})]


def seg_answer(expression: str) -> str:
    """The answer u-LLaVA v1 was trained to give a segmentation request (ULLAVA_SPEC section 6)."""
    return f"Sure. Info: [SEG]; [tag]{expression}[/tag]."


def prompt_embeds(model, config: UllavaConfig, tokenizer, picture: np.ndarray, task: str, **option) -> Tensor:
    """The pipeline's image prompt for ``task`` on ``picture``: [1, L, D] (image block first, then a newline)."""
    tokens = model.encode_image(torch.from_numpy(clip_crop_pixels(picture, config.vision.image_size)))
    instruction = get_task(task).instruction(**option)
    ids = prompt_ids(tokenizer, instruction)
    return model.embed_prompt(ids, {config.token_id("<image_patch>"): tokens})


def run_prompt(model, config: UllavaConfig, tokenizer, embeds: Tensor, *, max_new_tokens: int = RECEIPT_TOKENS,
               forced: list[int] | None = None, logits_out: list[Tensor] | None = None) -> Generation:
    """Greedy generation (or teacher-forced on ``forced``) from ``embeds``, keeping the last ``[SEG]`` state."""
    llm = model.llm
    need = min(embeds.shape[1] + max(max_new_tokens, len(forced or ())) + 1, config.llm.max_seq_len)
    if need > llm.max_seq_len:
        llm.setup_caches(1, need)
    return generate(llm, embeds, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                    mask_token_ids=(config.token_id("[SEG]"),), n_mask_tokens=1, forced=forced, logits_out=logits_out)


def _picture_mask(model, config: UllavaConfig, picture: np.ndarray, seg_hidden: Tensor) -> np.ndarray:
    """Masks [N, H, W] (bool) of ``picture`` from the ``[SEG]`` states, SAM run by ``model``."""
    pixels, resized = sam_pixels(picture, sam_config(config.sam).img_size)
    embedding = model.encode_sam(torch.from_numpy(pixels))
    return (model.mask_logits(seg_hidden, embedding, resized, picture.shape[:2]) > 0).numpy()


# -- int8 calibration ----------------------------------------------------------------------------------


def calibration_inputs(loaded: LoadedUllava, graph: str, n: int, runs: dict | None = None
                       ) -> list[dict[str, np.ndarray]]:
    """Feeds for ``graph`` (vision, sam_encoder, sam_decoder or grounding) from ``n`` generated pictures.

    The decoder's ``[SEG]`` states come from the reference teacher-forced on the trained answer, so
    they exist whatever the weights would write; GroundingDINO reads each picture at its own size with
    the phrase of the trained answer. ``runs`` keeps the reference's runs for the next graph.
    """
    graphs = ("vision", "sam_encoder", "sam_decoder") + (("grounding",) if loaded.grounding is not None else ())
    if graph not in graphs:
        raise OptionError(f"no calibration inputs for {graph!r}; expected one of {', '.join(graphs)}")
    runs = {} if runs is None else runs
    if "pictures" not in runs:
        runs["pictures"] = _calibration_runs(loaded, n)
    return [run[graph] for run in runs["pictures"]]


def _calibration_runs(loaded: LoadedUllava, n: int) -> list[dict[str, dict[str, np.ndarray]]]:
    config, model, tokenizer = loaded.config, loaded.model, loaded.tokenizer
    img_size = sam_config(config.sam).img_size
    runs = []
    with torch.inference_mode():
        for picture, colour in demo_pictures(n, CALIBRATION_SEED):
            expression = f"{colour} square"
            embeds = prompt_embeds(model, config, tokenizer, picture, "res", expression=expression)
            generation = run_prompt(model, config, tokenizer, embeds, forced=tokenizer.encode(seg_answer(expression)))
            sam, _ = sam_pixels(picture, img_size)
            embedding = model.encode_sam(torch.from_numpy(sam))
            runs.append({
                "vision": {"pixels": clip_crop_pixels(picture, config.vision.image_size)},
                "sam_encoder": {"pixels": sam},
                "sam_decoder": {"seg_hidden": generation.mask_hidden.float().numpy(),
                                "image_embedding": embedding.float().numpy()},
            })
            if loaded.grounding is not None:
                runs[-1]["grounding"] = dict(zip(GROUNDING.inputs, grounding_inputs(loaded, picture, expression)))
    return runs


def grounding_inputs(loaded, picture: np.ndarray, phrase: str) -> tuple[np.ndarray, ...]:
    """GroundingDINO's five inputs for ``picture`` and ``phrase``, as the pipeline makes them (``loaded``: a
    reference or an engine, for its tokenizer)."""
    short, longest = loaded.config.grounding_size
    pixels = grounding_dino_pixels(picture, short, longest)
    caption = loaded.grounding_tokenizer.encode(phrase)
    return pixels.pixel_values, pixels.pixel_mask, caption.input_ids, caption.attention_mask, caption.token_type_ids


# -- the fidelity receipt ------------------------------------------------------------------------------


def compare(reference: LoadedUllava, engine, *, n: int, max_new_tokens: int = RECEIPT_TOKENS,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt of ``engine`` (anything shaped like :class:`LoadedUllava`) against ``reference`` on ``n``
    generated pictures, three prompts each (:func:`prompts`).

    Next-token distributions of the engine teacher-forced on the reference's greedy answer; the share of
    greedy answers with identical text; masks: both sides' SAM encoder and ``[SEG]`` decoder run on the
    same ``[SEG]`` state (the reference's, teacher-forced on the trained answer to the ``res`` prompt),
    the engine's mask scored by IoU against the reference's. GroundingDINO (when both have it): both run
    on the picture with the phrase of the ``res`` prompt (:func:`grounding_agreement`).
    """
    config, tokenizer = reference.config, reference.tokenizer
    ref_logits, eng_logits, same_text, ious, grounding = [], [], [], [], []
    with_grounding = reference.grounding is not None and getattr(engine, "grounding", None) is not None
    with torch.inference_mode():
        for index, (picture, colour) in enumerate(demo_pictures(n, RECEIPT_SEED)):
            for task, option in prompts(colour):
                ref_steps, eng_steps = [], []
                ref_embeds = prompt_embeds(reference.model, config, tokenizer, picture, task, **option)
                eng_embeds = prompt_embeds(engine.model, config, tokenizer, picture, task, **option)
                ref = run_prompt(reference.model, config, tokenizer, ref_embeds, max_new_tokens=max_new_tokens,
                                 logits_out=ref_steps)
                eng = run_prompt(engine.model, config, tokenizer, eng_embeds, max_new_tokens=max_new_tokens)
                run_prompt(engine.model, config, tokenizer, eng_embeds, forced=ref.token_ids, logits_out=eng_steps)
                ref_logits.append(torch.stack(ref_steps))
                eng_logits.append(torch.stack(eng_steps))
                same_text.append(tokenizer.decode(ref.token_ids) == tokenizer.decode(eng.token_ids))
            expression = prompts(colour)[-1][1]["expression"]
            embeds = prompt_embeds(reference.model, config, tokenizer, picture, "res", expression=expression)
            seg = run_prompt(reference.model, config, tokenizer, embeds,
                             forced=tokenizer.encode(seg_answer(expression))).mask_hidden
            ref_mask = _picture_mask(reference.model, config, picture, seg)
            eng_mask = _picture_mask(engine.model, config, picture, seg)
            ious += [mask_iou(e, r) for e, r in zip(eng_mask, ref_mask)]
            if with_grounding:
                grounding.append(grounding_agreement(reference, engine, picture, f"{colour} square", ref_mask[0]))
            progress(f"receipt: picture {index + 1} of {n} done")
    return {
        "pictures": n,
        "prompts": [task for task, _ in prompts("red")],
        "max_new_tokens": max_new_tokens,
        "logits": logit_stats(ref_logits, eng_logits),
        "greedy_text_agreement": float(np.mean(same_text)) if same_text else 1.0,
        "mask_iou_vs_reference": float(np.mean(ious)) if ious else None,
        "grounding": summarize_grounding(grounding, grounding_precision(engine)) if grounding else None,
    }


def rec_box(found: list[GroundedBox], mask_xyxy: list[float] | None) -> list[float] | None:
    """The box ``rec`` answers (the pipeline's rule): GroundingDINO's box that best overlaps the mask's box,
    ties to the higher score; without a mask its best-scoring box; without boxes the mask's box."""
    if not found:
        return mask_xyxy
    if mask_xyxy is None:
        return list(max(found, key=lambda f: f.score).box_xyxy)
    return list(max(found, key=lambda f: (box_iou(list(f.box_xyxy), mask_xyxy), f.score)).box_xyxy)


def grounding_agreement(reference: LoadedUllava, engine, picture: np.ndarray, phrase: str,
                        mask: np.ndarray) -> dict:
    """Both GroundingDINOs on the same inputs: max |logit diff| (where the reference's logits are finite; inf
    if the engine's are not finite there), max |box diff|, and the IoU of the two ``rec`` boxes, each picked
    against ``mask``'s box (the reference's mask)."""
    inputs = [torch.from_numpy(a) for a in grounding_inputs(reference, picture, phrase)]
    ref_logits, ref_boxes = (t.float() for t in reference.grounding(*inputs))
    eng_logits, eng_boxes = (t.float() for t in engine.grounding(*inputs))
    finite = torch.isfinite(ref_logits)
    logit_diff = float((ref_logits - eng_logits)[finite].abs().max()) if finite.any() else 0.0
    if not torch.equal(torch.isfinite(eng_logits), finite):
        logit_diff = float("inf")
    decode, size = reference.grounding_tokenizer.decode, picture.shape[:2]
    ref_found = detect(ref_logits, ref_boxes, inputs[2], size, decode)
    eng_found = detect(eng_logits, eng_boxes, inputs[2], size, decode)
    box = mask_box(mask)
    mask_xyxy = None if box is None else list(box)
    ref_box, eng_box = rec_box(ref_found, mask_xyxy), rec_box(eng_found, mask_xyxy)
    iou = box_iou(eng_box, ref_box) if ref_box is not None else (1.0 if eng_box is None else 0.0)
    return {"logit_diff": logit_diff, "box_diff": float((ref_boxes - eng_boxes).abs().max()), "rec_box_iou": iou,
            "boxes": bool(ref_found)}


def grounding_precision(engine) -> str:
    """The precision of an engine's ``grounding`` graph (a reference's GroundingDINO is fp32)."""
    manifest = getattr(engine, "manifest", None)
    return manifest["graphs"]["grounding"]["precision"] if manifest else "fp32"


def summarize_grounding(runs: list[dict], precision: str) -> dict:
    ious = [run["rec_box_iou"] for run in runs]
    return {"precision": precision, "pictures": len(runs), "max_abs_logit_diff": max(run["logit_diff"] for run in runs),
            "max_abs_box_diff": max(run["box_diff"] for run in runs), "rec_box_iou_mean": float(np.mean(ious)),
            "rec_box_iou_min": float(min(ious)), "pictures_with_boxes": sum(run["boxes"] for run in runs)}


def receipt(loaded: LoadedUllava, engine_dir, *, n: int, options: dict,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """:func:`compare` of the engine in ``engine_dir`` against ``loaded`` run by the reference."""
    from edgeav.systems.ullava.onnx_engine import OnnxUllava

    progress(f"receipt: comparing with the PyTorch reference on {n} generated pictures, {len(prompts('red'))} "
             "prompts each")
    return compare(loaded, OnnxUllava(engine_dir), n=n, progress=progress)


def check_receipt(receipt: dict, check: ManifestCheck) -> None:
    number = (int, float)
    check.need(receipt, "pictures", int, "receipt")
    check.need(receipt, "prompts", list, "receipt")
    check.need(receipt, "max_new_tokens", int, "receipt")
    check.need(receipt, "greedy_text_agreement", number, "receipt")
    check.need(receipt, "mask_iou_vs_reference", (*number, type(None)), "receipt")
    check_logit_stats(check.need(receipt, "logits", dict, "receipt"), check)
    grounding = check.need(receipt, "grounding", (dict, type(None)), "receipt", optional=True)
    if grounding:
        for key in ("max_abs_logit_diff", "max_abs_box_diff", "rec_box_iou_mean", "rec_box_iou_min"):
            check.need(grounding, key, number, "receipt.grounding")
        for key in ("pictures", "pictures_with_boxes"):
            check.need(grounding, key, int, "receipt.grounding")
        check.need(grounding, "precision", str, "receipt.grounding")


def receipt_lines(receipt: dict) -> list[str]:
    """What ``edgeav info`` prints of a u-LLaVA receipt."""
    logits = receipt["logits"]
    pictures = f"{receipt['pictures']} generated picture{'s' if receipt['pictures'] != 1 else ''}"
    lines = [f"receipt against the PyTorch reference, {pictures} x "
             f"{len(receipt['prompts'])} prompts ({', '.join(receipt['prompts'])}), greedy up to "
             f"{receipt['max_new_tokens']} tokens:"]
    if logits:
        lines.append(f"  next-token logits  max |diff| {logits['max_abs_logit_diff']:.3g}, mean |diff| "
                     f"{logits['mean_abs_logit_diff']:.3g}, KL mean {logits['kl_mean']:.3g} (max {logits['kl_max']:.3g}), "
                     f"top-1 agreement {logits['top1_agreement']:.3f} over {logits['steps']} steps")
    else:
        lines.append("  next-token logits  no step compared")
    lines.append(f"  greedy text        identical in {receipt['greedy_text_agreement']:.0%} of runs")
    if receipt.get("mask_iou_vs_reference") is not None:
        lines.append(f"  masks              IoU {receipt['mask_iou_vs_reference']:.3f} against the reference's "
                     "(both SAMs on the reference's [SEG] state)")
    grounding = receipt.get("grounding")
    if grounding:
        lines.append(f"  GroundingDINO      ({grounding['precision']}) max |logit diff| "
                     f"{grounding['max_abs_logit_diff']:.3g}, max |box diff| "
                     f"{grounding['max_abs_box_diff']:.3g}, rec box IoU {grounding['rec_box_iou_mean']:.3f} "
                     f"(min {grounding['rec_box_iou_min']:.3f}; {grounding['pictures_with_boxes']} of "
                     f"{grounding['pictures']} pictures with boxes above the threshold)")
    return lines


# -- the engine directory's layout ---------------------------------------------------------------------


def expected_shapes(component: str, config: UllavaConfig) -> dict[str, tuple]:
    """The input/output shapes a component's graph has under ``config`` (None: a dynamic or free axis)."""
    llm, vision, sam = config.llm, config.vision, sam_config(config.sam)
    width, grid = llm.hidden_size, sam.image_embedding_size
    embedding = (None, sam.prompt_embed_dim, grid, grid)
    if component == "vision":
        patches = (vision.image_size // vision.patch_size) ** 2
        return {"pixels": (None, 3, vision.image_size, vision.image_size), "visual_tokens": (None, patches, width)}
    if component == "llm":
        return llm_shapes(llm)
    if component == "sam_encoder":
        return {"pixels": (None, 3, sam.img_size, sam.img_size), "image_embedding": embedding}
    if component == "sam_decoder":
        return {"seg_hidden": (None, width), "image_embedding": embedding,
                "low_res_logits": (None, 1, sam.low_res_size, sam.low_res_size)}
    if component == "grounding":
        grounding = grounding_config(config)
        text = {name: (1, None) for name in GROUNDING.inputs[2:]}
        return {"pixel_values": (1, 3, None, None), "pixel_mask": (1, None, None), **text,
                "pred_logits": (1, grounding.num_queries, grounding.max_text_len),
                "pred_boxes": (1, grounding.num_queries, 4)}
    raise ValueError(f"no graph shapes for component {component!r}")


def check_layout(manifest: dict, check: ManifestCheck) -> None:
    """u-LLaVA's keys: one graph per component, under its own name, and the ``embed`` table; the
    ``grounding`` graph and its ``grounding_vocab`` together or neither (a checkpoint without GroundingDINO)."""
    graphs = manifest["graphs"]
    for name in COMPONENTS:
        if name == "grounding" and "grounding" not in graphs and "grounding_vocab" not in manifest:
            continue
        if graphs.get(name, {}).get("component") != name:
            raise check.refuse("graphs", f"has no {name} graph")
    check.listed_file(manifest, "embed", "")
    if "grounding" in graphs:
        check.listed_file(manifest, "grounding_vocab", "")


def embed_tables(manifest: dict) -> list[str]:
    return [manifest["embed"]]


def profiles_for(component: str, config: UllavaConfig) -> dict[str, tuple]:
    """TensorRT optimization profiles (batch 1): an image is one frame, a video eight; one image embedding
    decodes up to eight [SEG] states."""
    size, llm, sam = config.vision.image_size, config.llm, sam_config(config.sam)
    if component == "vision":
        frames = config.video_frames
        return {"pixels": ((1, 3, size, size), (1, 3, size, size), (frames, 3, size, size))}
    if component == "llm":  # prefill (past 0, up to the whole context) and decode (one token)
        return llm_profiles(llm, typical=384)
    if component == "sam_encoder":
        shape = (1, 3, sam.img_size, sam.img_size)
        return {"pixels": (shape, shape, shape)}
    if component == "sam_decoder":
        return {"seg_hidden": ((1, llm.hidden_size), (1, llm.hidden_size), (8, llm.hidden_size))}
    if component == "grounding":  # pictures as resized: longest side up to the limit (+2: the release's rounding)
        short, longest = config.grounding_size
        # 256 x 256 gives 1360 image tokens, enough for SwinT-OGC's 900 queries
        least = min(256, short)
        low, opt, top = (1, least, least), (1, short, short * 4 // 3), (1, longest + 2, longest + 2)
        text = ((1, 2), (1, 8), (1, grounding_config(config).max_text_len))
        return {"pixel_values": tuple((s[0], 3, *s[1:]) for s in (low, opt, top)), "pixel_mask": (low, opt, top),
                **{name: text for name in GROUNDING.inputs[2:]}}
    raise OptionError(f"no TensorRT profile for component {component!r}")


EXPORT = SystemExport(
    system="ullava",
    components=COMPONENTS,
    precisions=PRECISIONS,
    config_class=UllavaConfig,
    config_from_dict=UllavaConfig.from_dict,
    expected_shapes=expected_shapes,
    check_layout=check_layout,
    embed_tables=embed_tables,
    check_receipt=check_receipt,
    receipt_lines=receipt_lines,
    weights=weights,
    options=export_options,
    build=build,
    receipt=receipt,
    profiles=profiles_for,
)
