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
  ``[N,1,256,256]`` (upsampled at run time by :func:`edgeav.models.sam.postprocess_masks`).

Calibration and receipts run generated pictures (coloured shapes) through the PyTorch reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor, nn

from edgeav.engines.manifest import precision_rows
from edgeav.engines.manifest_schema import ManifestCheck, check_logit_stats
from edgeav.engines.spec import ROLE_LLM, ROLE_REST, SystemExport
from edgeav.errors import OptionError
from edgeav.export.graphs import LLM, GraphSpec, LLMGraph, kv_shape
from edgeav.export.receipt import logit_stats
from edgeav.generate import Generation, generate
from edgeav.metrics import mask_iou
from edgeav.models.sam import sam_config
from edgeav.preprocess.clip import clip_crop_pixels
from edgeav.preprocess.sam import sam_pixels
from edgeav.systems.ullava.config import UllavaConfig, chat_prompt
from edgeav.systems.ullava.model import UllavaModel
from edgeav.systems.ullava.tasks import get_task

if TYPE_CHECKING:
    from edgeav.systems.ullava.checkpoints import LoadedUllava

COMPONENTS = {"vision": ROLE_REST, "llm": ROLE_LLM, "sam_encoder": ROLE_REST, "sam_decoder": ROLE_REST}
PRECISIONS = precision_rows(COMPONENTS, {
    "int8": "CLIP + projector, SAM's encoder and the [SEG] mask decoder int8 (static QDQ, calibrated on "
            "generated pictures), LLM fp32",
    "int4": "LLM weights int4 (MatMulNBits); the rest fp32",
})

# -- graphs ------------------------------------------------------------------------------------------

VISION = GraphSpec(("pixels",), ("visual_tokens",), {"pixels": {0: "frames"}, "visual_tokens": {0: "frames"}})
SAM_ENCODER = GraphSpec(("pixels",), ("image_embedding",),
                        {"pixels": {0: "images"}, "image_embedding": {0: "images"}})
SAM_DECODER = GraphSpec(("seg_hidden", "image_embedding"), ("low_res_logits",),
                        {"seg_hidden": {0: "masks"}, "low_res_logits": {0: "masks"}})
SPECS = {"vision": VISION, "llm": LLM, "sam_encoder": SAM_ENCODER, "sam_decoder": SAM_DECODER}


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


def examples(loaded: LoadedUllava) -> dict[str, tuple[Tensor, ...]]:
    """One example input per component, for tracing (two of each dynamic axis: a size-1 axis would be
    specialised by the exporter)."""
    cfg = loaded.config
    sam = sam_config(cfg.sam)
    size, hidden = cfg.vision.image_size, cfg.llm.hidden_size
    grid = sam.image_embedding_size
    return {
        "vision": (torch.randn(2, 3, size, size),),
        "llm": (torch.randn(1, 3, hidden), torch.zeros(kv_shape(loaded.model.llm, 5))),
        "sam_encoder": (torch.randn(2, 3, sam.img_size, sam.img_size),),
        "sam_decoder": (torch.randn(2, hidden), torch.randn(1, sam.prompt_embed_dim, grid, grid)),
    }


def export_options(loaded: LoadedUllava, *, variants: tuple[str, ...] | None = None,
                   merge_lora: bool = False) -> dict:
    """u-LLaVA takes no system options: one set of weights, no LoRA (the release is a full fine-tune)."""
    if variants is not None:
        raise OptionError(f"variants {tuple(variants)!r}: u-LLaVA has one set of weights; drop the variants")
    if merge_lora:
        raise OptionError("--merge-lora: u-LLaVA has no LoRA to merge (its release is a full fine-tune); drop it")
    return {}


def build(loaded: LoadedUllava, writer, options: dict) -> dict:
    """Emit u-LLaVA's four graphs and its embedding table through ``writer``; -> the manifest's ``embed``."""
    model = loaded.model
    example = examples(loaded)
    runs: dict = {}

    def feeds(graph: str) -> Callable[[], list[dict[str, np.ndarray]]]:
        return lambda: calibration_inputs(loaded, graph, CALIBRATION_PICTURES, runs)

    with torch.no_grad():
        writer.emit("vision", "vision", VisionGraph(model), VISION, example["vision"], calibration=feeds("vision"))
        writer.emit("llm", "llm", LLMGraph(model.llm), LLM, example["llm"])
        writer.emit("sam_encoder", "sam_encoder", SamEncoderGraph(model), SAM_ENCODER, example["sam_encoder"],
                    calibration=feeds("sam_encoder"))
        writer.emit("sam_decoder", "sam_decoder", SamDecoderGraph(model), SAM_DECODER, example["sam_decoder"],
                    calibration=feeds("sam_decoder"))
    return {"embed": writer.save_table("embed.npy", model.llm.model.embed_tokens.weight)}


def weights(loaded: LoadedUllava) -> dict[str, dict[str, Tensor]]:
    return {"model": loaded.model.state_dict()}


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
    ids = tokenizer.encode(chat_prompt(f"<img_beg><image_patch></img_end>\n{instruction}"), add_special_tokens=True)
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
    """Feeds for ``graph`` (vision, sam_encoder or sam_decoder) from ``n`` generated pictures.

    The decoder's ``[SEG]`` states come from the reference teacher-forced on the trained answer, so
    they exist whatever the weights would write. ``runs`` keeps the reference's runs for the next graph.
    """
    graphs = ("vision", "sam_encoder", "sam_decoder")
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
    return runs


# -- the fidelity receipt ------------------------------------------------------------------------------


def compare(reference: LoadedUllava, engine, *, n: int, max_new_tokens: int = RECEIPT_TOKENS,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt of ``engine`` (anything shaped like :class:`LoadedUllava`) against ``reference`` on ``n``
    generated pictures, three prompts each (:func:`prompts`).

    Next-token distributions of the engine teacher-forced on the reference's greedy answer; the share of
    greedy answers with identical text; masks: both sides' SAM encoder and ``[SEG]`` decoder run on the
    same ``[SEG]`` state (the reference's, teacher-forced on the trained answer to the ``res`` prompt),
    the engine's mask scored by IoU against the reference's.
    """
    config, tokenizer = reference.config, reference.tokenizer
    ref_logits, eng_logits, same_text, ious = [], [], [], []
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
            progress(f"receipt: picture {index + 1} of {n} done")
    return {
        "pictures": n,
        "prompts": [task for task, _ in prompts("red")],
        "max_new_tokens": max_new_tokens,
        "logits": logit_stats(ref_logits, eng_logits),
        "greedy_text_agreement": float(np.mean(same_text)) if same_text else 1.0,
        "mask_iou_vs_reference": float(np.mean(ious)) if ious else None,
    }


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
    return lines


# -- the engine directory's layout ---------------------------------------------------------------------


def expected_shapes(component: str, config: UllavaConfig) -> dict[str, tuple]:
    """The input/output shapes a component's graph has under ``config`` (None: a dynamic or free axis)."""
    llm, vision, sam = config.llm, config.vision, sam_config(config.sam)
    width, grid = llm.hidden_size, sam.image_embedding_size
    kv = (None, llm.num_layers, 2, 1, llm.num_kv_heads, llm.head_dim)
    embedding = (None, sam.prompt_embed_dim, grid, grid)
    if component == "vision":
        patches = (vision.image_size // vision.patch_size) ** 2
        return {"pixels": (None, 3, vision.image_size, vision.image_size), "visual_tokens": (None, patches, width)}
    if component == "llm":
        return {"inputs_embeds": (1, None, width), "past_kv": kv, "new_kv": kv,
                "logits": (1, llm.vocab_size), "hidden": (1, width)}
    if component == "sam_encoder":
        return {"pixels": (None, 3, sam.img_size, sam.img_size), "image_embedding": embedding}
    if component == "sam_decoder":
        return {"seg_hidden": (None, width), "image_embedding": embedding,
                "low_res_logits": (None, 1, sam.low_res_size, sam.low_res_size)}
    raise ValueError(f"no graph shapes for component {component!r}")


def check_layout(manifest: dict, check: ManifestCheck) -> None:
    """u-LLaVA's keys: one graph per component, under its own name, and the ``embed`` table."""
    graphs = manifest["graphs"]
    for name in COMPONENTS:
        if graphs.get(name, {}).get("component") != name:
            raise check.refuse("graphs", f"has no {name} graph")
    check.listed_file(manifest, "embed", "")


def embed_tables(manifest: dict) -> list[str]:
    return [manifest["embed"]]


def profiles_for(component: str, config: UllavaConfig) -> dict[str, tuple]:
    """TensorRT optimization profiles (batch 1): an image is one frame, a video eight; one image embedding
    decodes up to eight [SEG] states."""
    size, llm, sam = config.vision.image_size, config.llm, sam_config(config.sam)
    kv = (llm.num_layers, 2, 1, llm.num_kv_heads, llm.head_dim)
    longest = llm.max_seq_len
    if component == "vision":
        frames = config.video_frames
        return {"pixels": ((1, 3, size, size), (1, 3, size, size), (frames, 3, size, size))}
    if component == "llm":  # prefill (past 0, up to the whole context) and decode (one token)
        return {"inputs_embeds": ((1, 1, llm.hidden_size), (1, 1, llm.hidden_size), (1, longest, llm.hidden_size)),
                "past_kv": ((0, *kv), (min(384, longest - 1), *kv), (longest - 1, *kv))}
    if component == "sam_encoder":
        shape = (1, 3, sam.img_size, sam.img_size)
        return {"pixels": (shape, shape, shape)}
    if component == "sam_decoder":
        return {"seg_hidden": ((1, llm.hidden_size), (1, llm.hidden_size), (8, llm.hidden_size))}
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
