"""OpenAVS's part of ``edgeav export``: its precisions, int8 calibration, receipt and engine layout (the graphs
are in :mod:`~edgeav.systems.openavs.export_graphs`; the generic machinery is :mod:`edgeav.export`).

An engine runs every stage the checkpoint holds: Pengi (its audio, prompt and prefix graphs and GPT-2),
GroundingDINO and SAM always; the fine-tuned BEATs (the ``edge`` variant), the Qwen2.5-Omni thinker (the
``default`` and ``large`` variants' describer, ``--translator local``) and SAM2 (``--segmenter sam2``) when
the checkpoint has them. Beside the graphs: GPT-2's and the thinker's token tables, the three cascade
tokenizers' files (:class:`~edgeav.systems.openavs.checkpoints.TokenizerFiles`), the Qwen tokenizer's files
under ``qwen_`` names and keys, and, in the manifest, the SHA-256 of each translator system prompt
(``translator_prompts``): the engine refuses to run with other prompts.

Calibration and receipts run generated clips (a coloured shape over a plain background, a tone) through
the PyTorch reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor

from edgeav.engines.manifest import precision_rows
from edgeav.engines.manifest_schema import ManifestCheck, check_logit_stats
from edgeav.engines.qwen_onnx import TOKENIZER_KEYS, audio_chunks, vision_slices
from edgeav.engines.spec import ROLE_LLM, ROLE_REST, SystemExport
from edgeav.errors import OptionError
from edgeav.export.graphs import GROUNDING
from edgeav.export.receipt import logit_stats
from edgeav.media import SAMPLE_RATE
from edgeav.media.synth import Shape, SynthSpec, Tone, render_audio, render_frame
from edgeav.metrics import mask_iou
from edgeav.models.pengi import Pengi, beam_search
from edgeav.models.sam import sam_config
from edgeav.preprocess.fbank import crab_fbank
from edgeav.preprocess.grounding_dino import grounding_dino_pixels
from edgeav.preprocess.pengi_audio import pengi_waveform
from edgeav.preprocess.qwen_vision import image_pixels, patchify
from edgeav.preprocess.sam import sam_coords, sam_pixels
from edgeav.preprocess.sam2 import sam2_pixels, sam2_prompt
from edgeav.preprocess.whisper_mel import log_mel
from edgeav.systems.openavs.config import OpenAVSConfig
from edgeav.systems.openavs.export_graphs import (
    OPTIONAL, examples, expected_shapes, graphs, held_graphs, profiles_for,
)
from edgeav.systems.openavs.checkpoints import QWEN, TOKENIZER_CONFIG, TOKENIZER_FILES
from edgeav.systems.openavs.onnx_engine import EMBED, THINKER_EMBED, TRANSLATOR_PROMPTS
from edgeav.systems.openavs.pipeline import AUDIO_PROMPT, IMAGE_PROMPT, PENGI_BEAM, PENGI_MAX_TOKENS, PENGI_PROMPTS
from edgeav.systems.openavs.segment import BoxSegmenter
from edgeav.systems.openavs.translator import caption, prompt_hashes

if TYPE_CHECKING:
    from edgeav.systems.openavs.checkpoints import LoadedOpenAVS

COMPONENTS = {"pengi_audio": ROLE_REST, "pengi_prompt": ROLE_REST, "pengi_prefix": ROLE_REST, "gpt2": ROLE_LLM,
              "grounding": ROLE_REST, "sam_encoder": ROLE_REST, "sam_decoder": ROLE_REST, "beats": ROLE_REST,
              "thinker_audio": ROLE_REST, "thinker_vision": ROLE_REST, "thinker_llm": ROLE_LLM,
              "sam2_encoder": ROLE_REST, "sam2_decoder": ROLE_REST}
PRECISIONS = precision_rows(COMPONENTS, {
    "fp32": "every graph in fp32: the reference's numbers",
    "fp16": "every graph in fp16 inside (inputs and outputs fp32); GPT-2's tied head runs from the fp32 token table",
    "int8": "Pengi's audio, prompt and prefix graphs, SAM's and SAM2's encoders and decoders, BEATs and the "
            "thinker's audio tower and ViT int8 (static QDQ, calibrated on generated clips); GPT-2's block "
            "weights and the thinker's LLM weights 8-bit (MatMulNBits; fp32 in a TensorRT engine); GroundingDINO "
            "fp32",
    "int4": "GPT-2's block weights and the thinker's LLM weights int4 (MatMulNBits; GPT-2's tied head runs from "
            "the fp32 token table); the rest fp32",
})
# GroundingDINO stays fp32 under int8, as u-LLaVA found: static QDQ moves its boxes to IoU ~0.
PRECISIONS["int8"] = dataclasses.replace(PRECISIONS["int8"],
                                         components={**PRECISIONS["int8"].components, "grounding": "fp32"})


def export_options(loaded: LoadedOpenAVS, *, variants: tuple[str, ...] | None = None,
                   merge_lora: bool = False) -> dict:
    """OpenAVS takes no system options: one set of third-party weights, no LoRA."""
    if variants is not None:
        raise OptionError(f"variants {tuple(variants)!r}: OpenAVS has one set of weights (its variants are run "
                          "options: edgeav run --variant); drop the variants")
    if merge_lora:
        raise OptionError("--merge-lora: OpenAVS has no LoRA to merge; drop it")
    return {}


def build(loaded: LoadedOpenAVS, writer, options: dict) -> dict:
    """Emit OpenAVS's graphs and token tables through ``writer``; -> the manifest's ``embed`` (and
    ``thinker_embed``), tokenizer keys (the Qwen tokenizer's too: the exporter writes its files with the
    others') and the translator prompts' hashes."""
    example = examples(loaded)
    thinker_keys = {key: name for key, (name, _) in loaded.tokenizer.qwen_entries().items()}
    runs: dict = {}

    def feeds(graph: str) -> Callable[[], list[dict[str, np.ndarray]]]:
        return lambda: calibration_inputs(loaded, graph, CALIBRATION_CLIPS, runs)

    with torch.no_grad():
        for name, (module, spec) in graphs(loaded, options["format"]).items():
            writer.emit(name, name, module, spec, example[name],
                        calibration=None if COMPONENTS[name] == ROLE_LLM else feeds(name))
    table = loaded.model.pengi.caption_decoder.gpt.transformer.wte.weight
    if loaded.model.thinker is not None:
        thinker_keys[THINKER_EMBED] = writer.save_table("thinker_embed.npy",
                                                        loaded.model.thinker.llm.model.embed_tokens.weight)
    return {"embed": writer.save_table(EMBED, table), "tokenizer": TOKENIZER_FILES["gpt2"][0],
            "tokenizer_config": TOKENIZER_CONFIG, TRANSLATOR_PROMPTS: prompt_hashes(), **thinker_keys}


def weights(loaded: LoadedOpenAVS) -> dict[str, dict[str, Tensor]]:
    """Every component's tensors, 0-d ones (BatchNorm's counters) as one element since the checkpoint digest
    reads every tensor as bytes."""
    return {name: {key: value.reshape(1) if value.dim() == 0 else value for key, value in module.state_dict().items()}
            for name, module in loaded.model.parts().items()}


# -- generated clips and the runs both sides share ---------------------------------------------------

RECEIPT_SEED = 7_000_000  # receipt and calibration clips come from seeds of their own
CALIBRATION_SEED = 8_000_000
CALIBRATION_CLIPS = 4
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


@dataclass(frozen=True)
class DemoClip:
    """One generated second: its frame, its 16-kHz audio, the shape's name and its box (frame pixels)."""

    picture: np.ndarray
    waveform: np.ndarray
    name: str
    box: tuple[float, float, float, float]


def demo_clips(n: int, seed: int) -> list[DemoClip]:
    """``n`` seconds of a coloured square or disc on a plain background, with a tone of its own pitch."""
    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(n):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        kind = ("rect", "circle")[int(rng.integers(2))]
        width, height = int(rng.integers(96, 200)), int(rng.integers(80, 160))
        centre = tuple(float(v) for v in rng.uniform(0.35, 0.65, 2))
        shape = Shape(kind, COLOURS[colour], float(rng.uniform(0.15, 0.3)), centre, centre)
        spec = SynthSpec(duration_s=1.0, width=width, height=height, sample_rate=SAMPLE_RATE, channels=1,
                         background=tuple(int(v) for v in rng.integers(0, 60, 3)), shapes=(shape,),
                         tones=(Tone(0.0, 1.0, float(rng.uniform(220, 880))),))
        x, y = centre[0] * width, centre[1] * height
        r = shape.size * height
        clips.append(DemoClip(render_frame(spec, 0.0), render_audio(spec, 0, SAMPLE_RATE),
                              f"{colour} {'square' if kind == 'rect' else 'disc'}", (x - r, y - r, x + r, y + r)))
    return clips


def clip_boxes(clip: DemoClip) -> list[tuple[float, float, float, float]]:
    """The boxes SAM is prompted with: the shape's and the frame's left half."""
    height, width = clip.picture.shape[:2]
    return [clip.box, (0.0, 0.0, width / 2, float(height))]


def grounding_inputs(loaded, picture: np.ndarray, phrase: str) -> tuple[np.ndarray, ...]:
    """GroundingDINO's five inputs for ``picture`` and the caption of ``phrase``, as the pipeline makes them
    (``loaded``: a reference or an engine, for its tokenizer)."""
    short, longest = loaded.config.grounding_size
    pixels = grounding_dino_pixels(picture, short, longest)
    tokens = loaded.grounding_tokenizer.encode(caption([phrase]))
    return pixels.pixel_values, pixels.pixel_mask, tokens.input_ids, tokens.attention_mask, tokens.token_type_ids


# -- int8 calibration ----------------------------------------------------------------------------------


def calibration_inputs(loaded: LoadedOpenAVS, graph: str, n: int, runs: dict | None = None
                       ) -> list[dict[str, np.ndarray]]:
    """Feeds for ``graph`` from ``n`` generated clips read as the pipeline reads them: Pengi's window and its
    three prompts, the prefix from the reference's embeddings, SAM and SAM2 on each frame prompted with the
    clip's boxes, GroundingDINO with the shape's name, BEATs on the second's fbank, the thinker's audio tower
    on the second's log-mel and its ViT on the frame. ``runs`` keeps them for the next graph."""
    names = tuple(name for name in held_graphs(loaded.model) if COMPONENTS[name] != ROLE_LLM)
    if graph not in names:
        raise OptionError(f"no calibration inputs for {graph!r}; expected one of {', '.join(names)}")
    runs = {} if runs is None else runs
    if "clips" not in runs:
        runs["clips"] = _calibration_runs(loaded, n)
    return [feed for run in runs["clips"] for feed in run[graph]]


def _calibration_runs(loaded: LoadedOpenAVS, n: int) -> list[dict[str, list[dict[str, np.ndarray]]]]:
    model, pengi = loaded.model, loaded.model.pengi
    img_size = sam_config(loaded.config.sam).img_size
    ids, mask = loaded.clip_tokenizer.encode_prompts(list(PENGI_PROMPTS), pengi.config.enc_text_len)
    runs = []
    with torch.inference_mode():
        prompts = pengi.prompt_embedding(ids, mask)
        for clip in demo_clips(n, CALIBRATION_SEED):
            waveform = torch.from_numpy(pengi_waveform(clip.waveform, SAMPLE_RATE))[None]
            audio = pengi.audio_embedding(waveform)
            pixels, _ = sam_pixels(clip.picture, img_size)
            embedding = model.sam.encode_image(torch.from_numpy(pixels))
            boxes = sam_coords(np.asarray(clip_boxes(clip)), clip.picture.shape[:2], img_size)
            run = {
                "pengi_audio": [{"waveform": waveform.numpy()}],
                "pengi_prompt": [{"input_ids": ids.numpy(), "attention_mask": mask.numpy()}],
                "pengi_prefix": [{"audio_embedding": audio.expand(len(prompts), -1).numpy(),
                                  "prompt_embedding": prompts.numpy()}],
                "grounding": [dict(zip(GROUNDING.inputs, grounding_inputs(loaded, clip.picture, clip.name)))],
                "sam_encoder": [{"pixels": pixels}],
                "sam_decoder": [{"boxes": boxes, "image_embedding": embedding.numpy()}],
            }
            if model.beats is not None:
                run["beats"] = [{"fbank": crab_fbank(clip.waveform)[None]}]
            if model.thinker is not None:
                shapes = model.thinker.shapes
                mel = torch.from_numpy(log_mel(clip.waveform))
                run["thinker_audio"] = [{"mel": chunk.numpy()} for chunk in audio_chunks(mel, shapes.audio)]
                patches, grid = patchify(image_pixels(clip.picture)[None])
                run["thinker_vision"] = [{"patches": rows.numpy()} for rows in vision_slices(
                    torch.from_numpy(patches), grid, shapes.vision.patch_dim)]
            if model.sam2 is not None:
                pixels = sam2_pixels(clip.picture, pre_size=None, resolution=model.sam2.config.image_size)
                run["sam2_encoder"] = [{"pixels": pixels.numpy()}]
                run["sam2_decoder"] = sam2_feeds(model.sam2, clip, pixels)
            runs.append(run)
    return runs


def sam2_feeds(sam2, clip: DemoClip, pixels: Tensor) -> list[dict[str, np.ndarray]]:
    """SAM2's decoder inputs for each of the clip's boxes (the prompt :class:`BoxSegmenter` makes), the
    features of ``pixels`` run by ``sam2``."""
    features = {name: t.numpy() for name, t in sam2.image_features(pixels)._asdict().items()}
    prompts = [sam2_prompt(box, [], space=clip.picture.shape[:2], resolution=sam2.config.image_size)
               for box in clip_boxes(clip)]
    return [{**features, "points": points.numpy(), "labels": labels.numpy()} for points, labels in prompts]


# -- the fidelity receipt ------------------------------------------------------------------------------


def _gpt(pengi):
    """The GPT-2 a Pengi (the reference's or an engine's) decodes with."""
    return pengi.caption_decoder.gpt if isinstance(pengi, Pengi) else pengi.gpt


def pengi_prefix(pengi, waveform: np.ndarray, ids: Tensor, mask: Tensor) -> Tensor:
    """GPT-2's prefix for one second of 16-kHz audio and one prompt, as the pipeline makes it."""
    window = torch.from_numpy(pengi_waveform(waveform, SAMPLE_RATE))[None]
    return pengi.prefix(pengi.audio_embedding(window), pengi.prompt_embedding(ids, mask))


def teacher_forced_logits(pengi, prefix: Tensor, caption_ids: list[int]) -> Tensor:
    """GPT-2's next-token logits [len(caption_ids), V] after the prefix and each caption token but the last."""
    gpt = _gpt(pengi)
    length = prefix.shape[1]
    gpt.setup_caches(1, length + max(len(caption_ids), 1))
    hidden = gpt.hidden_states(prefix, torch.arange(length), kv_len=length)
    steps = [gpt.lm_head(hidden[:, -1])[0]]
    for index, token in enumerate(caption_ids[:-1]):
        position = length + index
        embeds = gpt.transformer.wte(torch.tensor([[token]]))
        hidden = gpt.hidden_states(embeds, torch.tensor([position]), kv_len=position + 1)
        steps.append(gpt.lm_head(hidden[:, -1])[0])
    return torch.stack(steps[:max(len(caption_ids), 1)]).float()


def _beam_ids(pengi, prefix: Tensor) -> list[int]:
    return list(beam_search(_gpt(pengi), prefix, stop_token_id=pengi.config.stop_token_id, beam_size=PENGI_BEAM,
                            max_len=PENGI_MAX_TOKENS)[0].ids)


def grounding_agreement(reference: LoadedOpenAVS, engine, clip: DemoClip) -> dict[str, float]:
    """Both GroundingDINOs on the same inputs: max |logit diff| where the reference's logits are finite (inf
    if the engine's are not finite there), max |box diff|."""
    inputs = [torch.from_numpy(a) for a in grounding_inputs(reference, clip.picture, clip.name)]
    ref_logits, ref_boxes = (t.float() for t in reference.model.grounding(*inputs))
    eng_logits, eng_boxes = (t.float() for t in engine.model.grounding(*inputs))
    finite = torch.isfinite(ref_logits)
    logit_diff = float((ref_logits - eng_logits)[finite].abs().max()) if finite.any() else 0.0
    if not torch.equal(torch.isfinite(eng_logits), finite):
        logit_diff = float("inf")
    return {"logit_diff": logit_diff, "box_diff": float((ref_boxes - eng_boxes).abs().max())}


def _masks(loaded, clip: DemoClip, segmenter: str = "sam") -> np.ndarray:
    """The mask of each of the clip's boxes by ``loaded``'s SAM (or SAM2), as the pipeline draws them."""
    part = {segmenter: getattr(loaded.model, segmenter)}
    return BoxSegmenter(loaded.model.grounding, loaded.grounding_tokenizer, loaded.config.grounding_size,
                        **part).masks(clip.picture, clip_boxes(clip))


THINKER_PROMPTS = (IMAGE_PROMPT, AUDIO_PROMPT)  # the describers' prompts: on the frame, on the second's sound
THINKER_TOKENS = 24


def thinker_agreement(reference: LoadedOpenAVS, engine, clip: DemoClip
                      ) -> tuple[list[Tensor], list[Tensor], list[bool]]:
    """Both thinkers describing the clip's frame and its sound: the reference's greedy next-token logits, the
    engine's teacher-forced on the reference's description, and whether the two greedy descriptions agree."""
    ref_logits, eng_logits, same_text = [], [], []
    decode = reference.qwen_tokenizer.decode
    for prompt in THINKER_PROMPTS:
        kind, media = ("image", {"picture": clip.picture}) if prompt == IMAGE_PROMPT else (
            "audio", {"waveform": clip.waveform})
        parts = [(kind, 0), ("text", prompt)]
        ref_prompt = reference.model.thinker.chat_prompt(reference.qwen_tokenizer, parts, **media)
        eng_prompt = engine.model.thinker.chat_prompt(engine.qwen_tokenizer, parts, **media)
        ref_steps, eng_steps = [], []
        ref = reference.model.thinker.answer(ref_prompt, max_new_tokens=THINKER_TOKENS, logits_out=ref_steps)
        eng = engine.model.thinker.answer(eng_prompt, max_new_tokens=THINKER_TOKENS)
        engine.model.thinker.answer(eng_prompt, max_new_tokens=THINKER_TOKENS, forced=ref.token_ids,
                                    logits_out=eng_steps)
        ref_logits.append(torch.stack(ref_steps))
        eng_logits.append(torch.stack(eng_steps))
        same_text.append(decode(ref.token_ids, skip_special=True) == decode(eng.token_ids, skip_special=True))
    return ref_logits, eng_logits, same_text


def compare(reference: LoadedOpenAVS, engine, *, n: int,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """The receipt of ``engine`` (anything shaped like :class:`LoadedOpenAVS`) against ``reference`` on ``n``
    generated clips (:func:`demo_clips`).

    Pengi, for each of the pipeline's three prompts: the engine's next-token logits teacher-forced on the
    reference beam's best caption, and whether the two beam searches' best texts are identical.
    GroundingDINO: logits and boxes on the frame with the shape's name. SAM: each side's encoder and box
    decoder on the frame, IoU of the engine's mask against the reference's for each box (:func:`clip_boxes`).
    When both have them: BEATs' AudioSet probabilities of the second; the thinker's descriptions of the frame
    and of the sound (:func:`thinker_agreement`); SAM2's mask for each box, scored as SAM's.
    """
    ref_pengi, eng_pengi = reference.model.pengi, engine.model.pengi
    decode = reference.gpt2_tokenizer.decode
    ids, mask = reference.clip_tokenizer.encode_prompts(list(PENGI_PROMPTS), ref_pengi.config.enc_text_len)
    with_beats = reference.model.beats is not None and engine.model.beats is not None
    with_thinker = reference.model.thinker is not None and engine.model.thinker is not None
    with_sam2 = reference.model.sam2 is not None and engine.model.sam2 is not None
    ref_logits, eng_logits, same_text, grounding, ious, beats = [], [], [], [], [], []
    thinker: tuple[list, list, list] = ([], [], [])
    sam2_ious = []
    with torch.inference_mode():
        for index, clip in enumerate(demo_clips(n, RECEIPT_SEED)):
            for row in range(len(PENGI_PROMPTS)):
                ref_prefix = pengi_prefix(ref_pengi, clip.waveform, ids[row:row + 1], mask[row:row + 1])
                eng_prefix = pengi_prefix(eng_pengi, clip.waveform, ids[row:row + 1], mask[row:row + 1])
                ref_ids, eng_ids = _beam_ids(ref_pengi, ref_prefix), _beam_ids(eng_pengi, eng_prefix)
                same_text.append(decode(ref_ids) == decode(eng_ids))
                ref_logits.append(teacher_forced_logits(ref_pengi, ref_prefix, ref_ids))
                eng_logits.append(teacher_forced_logits(eng_pengi, eng_prefix, ref_ids))
            grounding.append(grounding_agreement(reference, engine, clip))
            ious += [mask_iou(e, r) for e, r in zip(_masks(engine, clip), _masks(reference, clip))]
            if with_beats:
                fbank = torch.from_numpy(crab_fbank(clip.waveform))[None]
                beats.append(float((reference.model.beats.classify(fbank) - engine.model.beats.classify(fbank))
                                   .abs().max()))
            if with_thinker:
                for kept, found in zip(thinker, thinker_agreement(reference, engine, clip)):
                    kept += found
            if with_sam2:
                sam2_ious += [mask_iou(e, r) for e, r in zip(_masks(engine, clip, "sam2"),
                                                             _masks(reference, clip, "sam2"))]
            progress(f"receipt: clip {index + 1} of {n} done")
    manifest = getattr(engine, "manifest", None)
    return {
        "clips": n,
        "pengi": {"prompts": list(PENGI_PROMPTS), "beam_size": PENGI_BEAM, "max_tokens": PENGI_MAX_TOKENS,
                  "logits": logit_stats(ref_logits, eng_logits),
                  "beam_text_agreement": float(np.mean(same_text)) if same_text else 1.0},
        "grounding": {"precision": manifest["graphs"]["grounding"]["precision"] if manifest else "fp32",
                      "max_abs_logit_diff": max(g["logit_diff"] for g in grounding) if grounding else 0.0,
                      "max_abs_box_diff": max(g["box_diff"] for g in grounding) if grounding else 0.0},
        "sam": _iou_summary(ious),
        "beats": {"max_abs_probability_diff": max(beats)} if beats else None,
        "thinker": {"prompts": list(THINKER_PROMPTS), "max_new_tokens": THINKER_TOKENS,
                    "logits": logit_stats(thinker[0], thinker[1]),
                    "greedy_text_agreement": float(np.mean(thinker[2]))} if with_thinker else None,
        "sam2": _iou_summary(sam2_ious) if with_sam2 else None,
    }


def _iou_summary(ious: list[float]) -> dict:
    return {"boxes": len(ious), "mask_iou_per_box": ious, "mask_iou_min": float(min(ious)) if ious else None}


def receipt(loaded: LoadedOpenAVS, engine_dir, *, n: int, options: dict,
            progress: Callable[[str], None] = lambda message: None) -> dict:
    """:func:`compare` of the engine in ``engine_dir`` against ``loaded`` run by the reference."""
    from edgeav.systems.openavs.onnx_engine import OnnxOpenAVS

    progress(f"receipt: comparing with the PyTorch reference on {n} generated clips")
    return compare(loaded, OnnxOpenAVS(engine_dir), n=n, progress=progress)


def check_receipt(receipt: dict, check: ManifestCheck) -> None:
    number = (int, float)
    check.need(receipt, "clips", int, "receipt")
    pengi = check.need(receipt, "pengi", dict, "receipt")
    check.need(pengi, "prompts", list, "receipt.pengi")
    for key in ("beam_size", "max_tokens"):
        check.need(pengi, key, int, "receipt.pengi")
    check.need(pengi, "beam_text_agreement", number, "receipt.pengi")
    check_logit_stats(check.need(pengi, "logits", dict, "receipt.pengi"), check, "receipt.pengi.logits")
    grounding = check.need(receipt, "grounding", dict, "receipt")
    check.need(grounding, "precision", str, "receipt.grounding")
    for key in ("max_abs_logit_diff", "max_abs_box_diff"):
        check.need(grounding, key, number, "receipt.grounding")
    _check_ious(check.need(receipt, "sam", dict, "receipt"), check, "receipt.sam")
    beats = check.need(receipt, "beats", (dict, type(None)), "receipt")
    if beats is not None:
        check.need(beats, "max_abs_probability_diff", number, "receipt.beats")
    # receipts from before the thinker and SAM2 were exported lack these two
    thinker = check.need(receipt, "thinker", (dict, type(None)), "receipt", optional=True)
    if thinker is not None:
        check.need(thinker, "prompts", list, "receipt.thinker")
        check.need(thinker, "max_new_tokens", int, "receipt.thinker")
        check.need(thinker, "greedy_text_agreement", number, "receipt.thinker")
        check_logit_stats(check.need(thinker, "logits", dict, "receipt.thinker"), check, "receipt.thinker.logits")
    sam2 = check.need(receipt, "sam2", (dict, type(None)), "receipt", optional=True)
    if sam2 is not None:
        _check_ious(sam2, check, "receipt.sam2")


def _check_ious(ious: dict, check: ManifestCheck, where: str) -> None:
    check.need(ious, "boxes", int, where)
    check.need(ious, "mask_iou_per_box", list, where)
    check.need(ious, "mask_iou_min", (int, float, type(None)), where)


def receipt_lines(receipt: dict) -> list[str]:
    """What ``edgeav info`` prints of an OpenAVS receipt."""
    pengi, grounding, sam, beats = receipt["pengi"], receipt["grounding"], receipt["sam"], receipt["beats"]
    clips = f"{receipt['clips']} generated clip{'s' if receipt['clips'] != 1 else ''}"
    lines = [f"receipt against the PyTorch reference, {clips}:"]
    logits = pengi["logits"]
    if logits:
        lines.append(f"  Pengi logits       max |diff| {logits['max_abs_logit_diff']:.3g}, mean |diff| "
                     f"{logits['mean_abs_logit_diff']:.3g}, KL mean {logits['kl_mean']:.3g}, top-1 agreement "
                     f"{logits['top1_agreement']:.3f} over {logits['steps']} steps (teacher-forced on the "
                     f"reference's best beam, {len(pengi['prompts'])} prompts)")
    else:
        lines.append("  Pengi logits       no step compared")
    lines.append(f"  Pengi beam text    identical in {pengi['beam_text_agreement']:.0%} of runs (beam "
                 f"{pengi['beam_size']}, up to {pengi['max_tokens']} tokens)")
    lines.append(f"  GroundingDINO      ({grounding['precision']}) max |logit diff| "
                 f"{grounding['max_abs_logit_diff']:.3g}, max |box diff| {grounding['max_abs_box_diff']:.3g}")
    if sam["mask_iou_min"] is not None:
        lines.append(f"  SAM masks          IoU min {sam['mask_iou_min']:.3f} over {sam['boxes']} boxes against the "
                     "reference's (both SAMs on the same boxes)")
    if beats is not None:
        lines.append(f"  BEATs              max |probability diff| {beats['max_abs_probability_diff']:.3g}")
    thinker, sam2 = receipt.get("thinker"), receipt.get("sam2")
    if thinker is not None:
        logits = thinker["logits"]
        lines.append(f"  thinker logits     max |diff| {logits['max_abs_logit_diff']:.3g}, mean |diff| "
                     f"{logits['mean_abs_logit_diff']:.3g}, KL mean {logits['kl_mean']:.3g}, top-1 agreement "
                     f"{logits['top1_agreement']:.3f} over {logits['steps']} steps (teacher-forced on the "
                     f"reference's greedy descriptions of the frame and the sound)" if logits
                     else "  thinker logits     no step compared")
        lines.append(f"  thinker text       identical in {thinker['greedy_text_agreement']:.0%} of runs (greedy, up "
                     f"to {thinker['max_new_tokens']} tokens)")
    if sam2 is not None and sam2["mask_iou_min"] is not None:
        lines.append(f"  SAM2 masks         IoU min {sam2['mask_iou_min']:.3f} over {sam2['boxes']} boxes against the "
                     "reference's (both SAM2s on the same boxes)")
    return lines


# -- the engine directory's layout ---------------------------------------------------------------------


def check_layout(manifest: dict, check: ManifestCheck) -> None:
    """OpenAVS's keys: a graph per component under its own name (BEATs', the thinker's and SAM2's exactly when
    the config has that part), the token tables, the tokenizers' map (and the Qwen tokenizer's files with the
    thinker) and the translator prompts' hashes."""
    graphs_found, config = manifest["graphs"], manifest["config"]
    for name in COMPONENTS:
        if name in OPTIONAL and config.get(OPTIONAL[name]) is None:
            if name in graphs_found:
                raise check.refuse(f"graphs.{name}", f"is there, yet the config has no {OPTIONAL[name]}")
            continue
        if graphs_found.get(name, {}).get("component") != name:
            raise check.refuse("graphs", f"has no {name} graph")
    check.listed_file(manifest, "embed", "")
    check.listed_file(manifest, "tokenizer_config", "")
    if config.get("thinker") is not None:
        check.listed_file(manifest, THINKER_EMBED, "")
        for key in TOKENIZER_KEYS:
            if (key != "tokenizer_merges" or QWEN + key in manifest
                    or manifest.get(QWEN + "tokenizer") == QWEN + "vocab.json"):
                check.listed_file(manifest, QWEN + key, "")
    prompts = check.need(manifest, TRANSLATOR_PROMPTS, dict, "")
    for name, digest in prompts.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise check.refuse(f"{TRANSLATOR_PROMPTS}.{name}", "must be a SHA-256 in 64 hex digits")


def embed_tables(manifest: dict) -> list[str]:
    """None for the generic check (it sizes tables by an LLM config): the engine checks GPT-2's table against
    the Pengi config as it loads it."""
    return []


EXPORT = SystemExport(
    system="openavs",
    components=COMPONENTS,
    precisions=PRECISIONS,
    config_class=OpenAVSConfig,
    config_from_dict=OpenAVSConfig.from_dict,
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

__all__ = ["COMPONENTS", "EXPORT", "PRECISIONS", "THINKER_PROMPTS", "TRANSLATOR_PROMPTS", "calibration_inputs",
           "compare", "demo_clips", "teacher_forced_logits", "thinker_agreement"]
