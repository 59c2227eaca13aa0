"""Train edgeav's demo model: crab-tiny, every weight from scratch, on the synthetic world.

    python bench/train_demo.py --out edgeav/demo [--steps 1350] [--seed 0] [--batch 8]

A tool, not part of the runtime: it renders world clips in memory (no codec),
runs them through the same preprocessing the runtime uses, and trains the whole
model with the LM loss on Crab's target texts plus a mask loss (BCE + Dice) on
the mask decoder for the segmentation tasks. The result is written in edgeav's
converted layout (safetensors + config + tokenizer); the mask variants carry
the same embeddings and head as the joint weights, with the trained decoder.

Reproducible from --seed on one machine: data, initialisation and the order of
tasks all derive from it (thread scheduling aside, PyTorch's CPU kernels are
deterministic here).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeav.bench import world
from edgeav.systems.crab.checkpoints import LoadedCrab, save_converted
from edgeav.systems.crab.config import VOCABULARY, chat_prompt, preset
from edgeav.systems.crab.evaluate import frame_second
from edgeav.media.segment import clip_frame_indices
from edgeav.models.audio import BeatsEncoderConfig
from edgeav.systems.crab.model import CrabModel
from edgeav.preprocess.clip import CLIP_SIZE, clip_pixels
from edgeav.preprocess.fbank import crab_fbank_batch
from edgeav.systems.crab.tasks import get_task
from edgeav.tokenizer import Tokenizer, train_sentencepiece

SAMPLE_RATE = 16000
MASK_KINDS = {"s4": 1, "ms3": 1, "avss": 71}
PATCH_GRID = CLIP_SIZE // preset("crab-tiny").vision.patch_size
IGNORE = -100
PROJECTOR_LR_SCALE = 0.5


@dataclass
class Example:
    """One training sample, preprocessed."""

    kind: str
    video: np.ndarray | None  # uint8 [F, 224, 224, 3]
    image: np.ndarray | None  # uint8 [224, 224, 3]
    fbank: np.ndarray  # [S, T, 128]
    prompt_ids: list[int]
    target_ids: list[int]
    mask: np.ndarray | None  # [224, 224]: bool (s4, ms3) or class ids (avss)
    video_objects: np.ndarray | None  # [F, classes, 5]: world.frame_objects of each video frame
    image_objects: np.ndarray | None  # [1, classes, 5]
    video_patches: np.ndarray | None  # [F, g, g, classes + 1]: patch_classes of each video frame
    image_patches: np.ndarray | None  # [1, g, g, classes + 1]
    window_sounds: np.ndarray  # [S, classes]: world.sounds_between of each audio window


def yuv420_roundtrip(frame: np.ndarray) -> np.ndarray:
    """What an H.264 yuv420p round trip does to colour edges: chroma averaged over 2x2 blocks (BT.601)."""
    rgb = frame.astype(np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    cb, cr = (rgb[..., 2] - luma) * 0.564, (rgb[..., 0] - luma) * 0.713
    h, w = luma.shape
    cb, cr = (c.reshape(h // 2, 2, w // 2, 2).mean((1, 3)).repeat(2, 0).repeat(2, 1) for c in (cb, cr))
    out = np.stack([luma + 1.403 * cr, luma - 0.344 * cb - 0.714 * cr, luma + 1.773 * cb], -1)
    return out.clip(0, 255).round().astype(np.uint8)


def resize_frame(frame: np.ndarray) -> np.ndarray:
    """To the 224x224 model grid the way the runtime's decoder does (a straight, bicubic resize)."""
    pixels = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
    resized = F.interpolate(pixels, size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()


def resize_mask(mask: np.ndarray) -> np.ndarray:
    index_y = (np.arange(CLIP_SIZE) + 0.5) * mask.shape[0] / CLIP_SIZE
    index_x = (np.arange(CLIP_SIZE) + 0.5) * mask.shape[1] / CLIP_SIZE
    return mask[index_y.astype(int)[:, None], index_x.astype(int)[None, :]]


def audio_window(clip: world.WorldClip, start_s: float, length_s: float) -> np.ndarray:
    """The clip's audio over [start, start + length), silence outside the clip."""
    n = round(length_s * SAMPLE_RATE)
    start = round(start_s * SAMPLE_RATE)
    end_of_clip = clip.duration_s * SAMPLE_RATE
    out = np.zeros(n, np.float32)
    lo, hi = max(start, 0), min(start + n, end_of_clip)
    if hi > lo:
        out[lo - start : hi - start] = world.render_audio(clip, lo, hi - lo, SAMPLE_RATE)
    return out


def make_example(clip: world.WorldClip, kind: str, tokenizer: Tokenizer, rng: np.random.Generator) -> Example:
    task = get_task(kind)
    second = frame_second(kind, clip.duration_s, rng)
    truth = world.truth(clip, kind, second=second)
    video = video_objects = video_patches = None
    if task.video_frames:
        n_frames = int(clip.duration_s * clip.fps)
        times = clip_frame_indices(n_frames, task.video_frames) / clip.fps
        video = np.stack([model_frame(clip, t) for t in times])
        video_objects = np.stack([world.frame_objects(clip, t) for t in times])
        video_patches = np.stack([patch_classes(clip, t) for t in times])
    image = image_objects = image_patches = None
    if task.image_frame:
        image = model_frame(clip, float(second))
        image_objects = world.frame_objects(clip, float(second))[None]
        image_patches = patch_classes(clip, float(second))[None]
    plan = task.plan_audio(duration_s=clip.duration_s, frame_time_s=second)
    windows = np.stack([audio_window(clip, s, plan.length_s) for s in plan.starts_s])
    instruction = task.instruction(question=truth.question, second=second if kind in ("s4", "ms3") else None)
    mask = None
    if kind in MASK_KINDS:
        mask = resize_mask(truth.mask)
    sounds = np.stack([world.sounds_between(clip, s, s + plan.length_s) for s in plan.starts_s])
    return Example(kind, video, image, crab_fbank_batch(windows), tokenizer.encode_chat(instruction),
                   tokenizer.encode(truth.text) + [tokenizer.eos_id], mask, video_objects, image_objects,
                   video_patches, image_patches, sounds)


def patch_classes(clip: world.WorldClip, t: float, grid: int = PATCH_GRID) -> np.ndarray:
    """Float32 [grid, grid, classes + 1]: the share of each patch of the 224 grid that shows each class
    (index 0: background)."""
    labels = resize_mask(world.class_map(clip, t))
    cell = CLIP_SIZE // grid
    one_hot = np.eye(len(world.CLASSES) + 1, dtype=np.float32)[labels]
    return one_hot.reshape(grid, cell, grid, cell, -1).mean((1, 3))


def model_frame(clip: world.WorldClip, t: float) -> np.ndarray:
    """Frame ``t`` as the runtime sees it after the codec and the resize to 224."""
    return resize_frame(yuv420_roundtrip(world.render_frame(clip, t)))


def corpus(seed: int, n: int) -> list[str]:
    """Prompts and answers the tokenizer learns from."""
    lines = []
    for clip, kind in world.dataset(seed, n):
        truth = world.truth(clip, kind)
        task = get_task(kind)
        lines.append(chat_prompt(task.instruction(question=truth.question)))
        lines.append(truth.text)
    return lines


def dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


class AuxHeads(torch.nn.Module):
    """Training-only linear read-outs of the projected tokens (dropped when saving).

    From scratch, the LM loss alone reaches the encoders too weakly: the LLM learns the
    answers' priors and ignores the media. These heads ask each frame's tokens for the
    classes on screen and their boxes, and each audio window's tokens for the classes
    heard, so the encoders learn the world's structure directly.
    """

    def __init__(self, queries: int, width: int, vision_width: int, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.visual = torch.nn.Linear(queries * width, classes * 5)
        self.audio = torch.nn.Linear(queries * width, classes)
        self.patches = torch.nn.Conv2d(vision_width, classes + 1, 1)

    def patch_loss(self, grid: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CLIP features [F, C, g, g] against each patch's class shares [F, g, g, classes + 1]:
        dense supervision that gets a ViT trained from scratch going within minutes."""
        log_probs = self.patches(grid).permute(0, 2, 3, 1).log_softmax(-1)
        return -(target * log_probs).sum(-1).mean()

    def visual_loss(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.visual(tokens.flatten(1)).view(-1, self.classes, 5)
        present = target[..., 0]
        box_error = (out[..., 1:] - target[..., 1:]).abs().sum(-1) * present
        return F.binary_cross_entropy_with_logits(out[..., 0], present) + 2 * box_error.sum() / present.sum().clamp(min=1)

    def audio_loss(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.audio(tokens.flatten(1)), target)


def batch_loss(model: CrabModel, heads: AuxHeads, batch: list[Example], tokenizer: Tokenizer
               ) -> tuple[torch.Tensor, dict]:
    ids = {name: tokenizer.token_id(name) for name in ("<video>", "<audio>", "<image>")}
    frames = [e.video for e in batch if e.video is not None] + [e.image[None] for e in batch if e.image is not None]
    features = model.encode_frames(torch.from_numpy(clip_pixels(np.concatenate(frames)))) if frames else None
    aux = {"objects": torch.zeros(()), "patches": torch.zeros(()), "sounds": torch.zeros(())}
    if features is not None:
        objects = [e.video_objects for e in batch if e.video is not None] + [e.image_objects for e in batch
                                                                              if e.image is not None]
        patches = [e.video_patches for e in batch if e.video is not None] + [e.image_patches for e in batch
                                                                              if e.image is not None]
        aux["objects"] = heads.visual_loss(features.tokens, torch.from_numpy(np.concatenate(objects)))
        aux["patches"] = heads.patch_loss(features.mask_high, torch.from_numpy(np.concatenate(patches)))
    # AVQA's 2-s windows have more fbank frames than the 1-s ones: one encoder call per length.
    audio_of = {}
    for length in {e.fbank.shape[1] for e in batch}:
        members = [i for i, e in enumerate(batch) if e.fbank.shape[1] == length]
        tokens = model.encode_audio(torch.from_numpy(np.concatenate([batch[i].fbank for i in members])))
        sounds = torch.from_numpy(np.concatenate([batch[i].window_sounds for i in members]))
        aux["sounds"] = aux["sounds"] + heads.audio_loss(tokens, sounds) * len(members) / len(batch)
        for i, chunk in zip(members, tokens.split([len(batch[i].fbank) for i in members])):
            audio_of[i] = chunk.flatten(0, 1)
    video_at, image_at, offset = {}, {}, 0
    for i, e in enumerate(batch):
        if e.video is not None:
            video_at[i] = slice(offset, offset + len(e.video))
            offset += len(e.video)
    for i, e in enumerate(batch):
        if e.image is not None:
            image_at[i] = offset
            offset += 1

    sequences, labels, mask_positions = [], [], []
    for i, e in enumerate(batch):
        blocks = {ids["<audio>"]: audio_of[i]}
        if i in video_at:
            blocks[ids["<video>"]] = features.tokens[video_at[i]].flatten(0, 1)
        if i in image_at:
            blocks[ids["<image>"]] = features.tokens[image_at[i]]
        embeds = model.embed_prompt(e.prompt_ids + e.target_ids, blocks)[0]
        target_start = embeds.shape[0] - len(e.target_ids)
        label = torch.full((embeds.shape[0],), IGNORE)
        label[target_start - 1 : -1] = torch.tensor(e.target_ids)  # position p predicts token p + 1
        sequences.append(embeds)
        labels.append(label)
        mask_ids = [tokenizer.token_id(f"<mask_{k}>") for k in range(6)]
        mask_positions.append([target_start + j - 1 for j, t in enumerate(e.target_ids) if t in mask_ids])
    length = max(s.shape[0] for s in sequences)
    inputs = torch.stack([F.pad(s, (0, 0, 0, length - s.shape[0])) for s in sequences])
    label = torch.stack([F.pad(l, (0, length - l.shape[0]), value=IGNORE) for l in labels])
    model.llm.setup_caches(len(batch), length)
    logits, hidden = model.llm(inputs, torch.arange(length), length)
    lm_loss = F.cross_entropy(logits.flatten(0, 1), label.flatten(), ignore_index=IGNORE)

    mask_loss = torch.zeros(())
    n_masks = 0
    for i, e in enumerate(batch):
        if e.mask is None or len(mask_positions[i]) != 6:
            continue
        frame = image_at[i]
        model.seg.avss = e.kind == "avss"
        out = model.seg(hidden[i, mask_positions[i]][None], features.mask_low[frame : frame + 1],
                        features.mask_high[frame : frame + 1])
        if e.kind == "avss":
            mask_loss = mask_loss + F.cross_entropy(out, torch.from_numpy(e.mask.astype(np.int64))[None])
        else:
            mask_loss = mask_loss + dice_bce(out[0, 0], torch.from_numpy(e.mask.astype(np.float32)))
        n_masks += 1
    model.seg.avss = False
    mask_loss = mask_loss / max(n_masks, 1)
    parts = {"lm": float(lm_loss.detach()), "mask": float(mask_loss.detach()),
             **{name: float(value.detach()) for name, value in aux.items()}}
    return lm_loss + mask_loss + sum(aux.values()), parts


class Batches(torch.utils.data.IterableDataset):
    """Endless batches of examples, rendered in a worker process while the model trains."""

    def __init__(self, seed: int, tokenizer_proto: bytes, batch: int) -> None:
        self.seed, self.tokenizer_proto, self.batch = seed, tokenizer_proto, batch

    def __iter__(self):
        tokenizer = Tokenizer(self.tokenizer_proto, preset("crab-tiny").llm, VOCABULARY)
        rng = np.random.default_rng(self.seed)
        data = world.dataset(self.seed, None)
        while True:
            yield [make_example(clip, kind, tokenizer, rng) for clip, kind in (next(data) for _ in range(self.batch))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1350, help="optimizer steps (the schedule's length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = preset("crab-tiny")
    tokenizer = Tokenizer(train_sentencepiece(corpus(args.seed + 1, 400), config.llm.base_vocab_size), config.llm, VOCABULARY)
    model = CrabModel(config).train()
    heads = AuxHeads(config.qformer.num_queries, config.llm.hidden_size, config.vision.hidden_size,
                     len(world.CLASSES))
    parameters = [*model.parameters(), *heads.parameters()]
    # The post-LN Q-Formers diverge from scratch at the rate the rest trains best at.
    projectors = {id(p) for m in (model.visual_projector, model.audio_projector) for p in m.parameters()}
    groups = [{"params": [p for p in parameters if id(p) in projectors], "scale": PROJECTOR_LR_SCALE},
              {"params": [p for p in parameters if id(p) not in projectors], "scale": 1.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start = time.perf_counter()
    batches = iter(torch.utils.data.DataLoader(Batches(args.seed, tokenizer.model_proto, args.batch), batch_size=None,
                                               num_workers=1, prefetch_factor=4, collate_fn=lambda b: b))
    log = []
    warmup = min(100, args.steps // 10)
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / warmup) * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        loss, parts = batch_loss(model, heads, next(batches), tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 20 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            log.append({"step": step, "seconds": round(elapsed), "lr": lr, **parts})
            eta = elapsed / step * (args.steps - step)
            print(f"step {step:5d}/{args.steps}  {elapsed / 60:5.1f} min (eta {eta / 60:4.1f})  lr {lr:.2e}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()), flush=True)

    model.eval()
    # The added-token rows that the runtime recreates for non-mask tasks are trained here, so keep them.
    variant = {"model.embed_tokens.weight": model.llm.model.embed_tokens.weight.detach().clone(),
               "lm_head.weight": model.llm.lm_head.weight.detach().clone()}
    variants = {}
    for name in ("avs", "avss"):
        variants[name] = {**variant, **{f"seg.{k}": v.clone() for k, v in model.seg.state_dict().items()}}
    loaded = LoadedCrab(config, BeatsEncoderConfig(audio=config.audio), model, tokenizer,
                        f"edgeav demo model (seed {args.seed})", variants)
    save_converted(loaded, args.out)
    minutes = (time.perf_counter() - start) / 60
    (args.out / "training.json").write_text(json.dumps({"seed": args.seed, "steps": args.steps, "batch": args.batch,
                                                        "lr": args.lr, "minutes": round(minutes, 1), "log": log},
                                                       indent=1))
    print(f"wrote {args.out} after {args.steps} steps, {minutes:.1f} min")


if __name__ == "__main__":
    main()
