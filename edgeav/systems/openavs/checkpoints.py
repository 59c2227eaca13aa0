"""OpenAVS checkpoints. OpenAVS trains nothing: its "release" is the third-party releases it cascades
(OPENAVS_SPEC section 3), gathered in one folder::

    pengi/base.pth                  Pengi ({"model": ...}), with its tokenizers' vocab.json + merges.txt
    pengi/gpt2/, pengi/clip/        (GPT-2's and CLIP ViT-B/16's, as the hub gives them)
    groundingdino_swint_ogc.pth     GroundingDINO ({"model": ...}) with
    bert-base-uncased/vocab.txt     its caption vocabulary
    sam_vit_h_4b8939.pth            SAM
    sam2.1_hiera_large.pt           (optional) SAM2.1, for --segmenter sam2
    BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt
                                    (optional) fine-tuned BEATs with its AudioSet head, the edge variant
    qwen2.5-omni/                   (optional) Qwen2.5-Omni: config.json, model*.safetensors (thinker.* read),
                                    tokenizer; the default and large variants and --translator local

Every pickle is read with ``torch.load(weights_only=True)``. Each component's size is read from its
weights' shapes (Pengi, GroundingDINO, SAM, SAM2), its ``cfg`` (BEATs) or its config.json (the thinker).

Converted layout (``edgeav convert``): ``config.json`` (format, ``system: openavs``, the model config),
``model.safetensors`` under :class:`~edgeav.systems.openavs.model.OpenAVSModel` names, the tokenizers
in the same sub-folders as above (``qwen2.5-omni/`` holding only the thinker's tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from edgeav.bpe_tokenizers import CLIPBPE, GPT2BPE, write_synthetic_bpe
from edgeav.engines.qwen_onnx import tokenizer_entries
from edgeav.errors import CheckpointError, EdgeavError
from edgeav.grounding_files import (
    GROUNDING_FILE, GROUNDING_VOCAB, read_grounding_vocab, save_grounding, synthetic_bert_vocab,
)
from edgeav.models.audio import beats_checkpoint_cfg, beats_config_from_checkpoint_cfg, BeatsEncoderConfig
from edgeav.models.grounding_dino import PRESETS as GROUNDING_PRESETS
from edgeav.models.grounding_dino import GroundingDINO, read_original_checkpoint
from edgeav.models.pengi import PENGI_PRESETS, Pengi, pengi_preset, read_pengi_checkpoint, write_pengi_checkpoint
from edgeav.models.sam import SAM_PRESETS, Sam, load_sam_state_dict, sam_config
from edgeav.models.sam2 import SAM2_PRESETS, Sam2, load_sam2_state_dict, sam2_config
from edgeav.preprocess.grounding_dino import GroundingTokenizer
from edgeav.qwen_thinker import THINKER_PREFIX, hf_config, released_thinker_key, thinker_shapes_from_hf
from edgeav.qwen_tokenizer import QwenTokenizer, write_synthetic_tokenizer
from edgeav.systems.openavs.config import PRESETS, OpenAVSConfig, preset
from edgeav.systems.openavs.model import OpenAVSModel
from edgeav.weight_files import (
    read_converted_config,
    CONFIG_FILE, FORMAT, FORMAT_VERSION, converted_system, read_json, read_safetensors, read_weights,
    write_safetensors,
)

PENGI_FILE = Path("pengi") / "base.pth"
GPT2_DIR = Path("pengi") / "gpt2"
CLIP_DIR = Path("pengi") / "clip"
SAM_FILE = "sam_vit_h_4b8939.pth"
SAM2_FILE = "sam2.1_hiera_large.pt"
BEATS_FILE = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
THINKER_DIR = "qwen2.5-omni"
MODEL_FILE = "model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"  # which engine file belongs to which tokenizer
QWEN = "qwen_"  # the Qwen tokenizer's manifest keys and file names start with this
TOKENIZER_FILES = {"gpt2": ("gpt2_vocab.json", "gpt2_merges.txt"), "clip": ("clip_vocab.json", "clip_merges.txt"),
                   "bert": ("bert_vocab.txt",)}


class TokenizerFiles:
    """OpenAVS's tokenizers as one, with the ``files``/``save`` an engine export reads (the checkpoint digest,
    the engine's files): GPT-2's and CLIP's ``vocab.json`` + ``merges.txt``, GroundingDINO's BERT
    ``vocab.txt``, :data:`TOKENIZER_CONFIG` naming which is which, and the thinker's Qwen tokenizer files
    under :data:`QWEN` names when there is a thinker (flat names: an engine directory has no folders).
    ``source`` names the checkpoint in the one-line errors."""

    def __init__(self, gpt2: GPT2BPE, clip: CLIPBPE, bert: GroundingTokenizer, qwen: QwenTokenizer | None = None,
                 source: str = "the checkpoint") -> None:
        self.gpt2, self.clip, self.bert, self.qwen, self.source = gpt2, clip, bert, qwen, source

    def qwen_entries(self) -> dict[str, tuple[str, bytes]]:
        """The Qwen tokenizer's files: manifest key -> (file name, bytes); empty without a thinker."""
        return {} if self.qwen is None else tokenizer_entries(self.qwen, self.source, prefix=QWEN)

    def files(self) -> dict[str, bytes]:
        found = {TOKENIZER_CONFIG: (json.dumps(TOKENIZER_FILES, indent=1) + "\n").encode()}
        with tempfile.TemporaryDirectory() as tmp:
            for kind, tokenizer in (("gpt2", self.gpt2), ("clip", self.clip)):
                folder = tokenizer.save(Path(tmp) / kind)
                for source, name in zip(("vocab.json", "merges.txt"), TOKENIZER_FILES[kind]):
                    found[name] = (folder / source).read_bytes()
        found[TOKENIZER_FILES["bert"][0]] = "".join(t + "\n" for t in self.bert.vocabulary()).encode("utf-8")
        found.update(self.qwen_entries().values())
        return found

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (folder / name).write_bytes(data)
        return folder


@dataclass
class LoadedOpenAVS:
    """An OpenAVS model with its weights and tokenizers."""

    system: ClassVar[str] = "openavs"
    config: OpenAVSConfig
    model: OpenAVSModel
    gpt2_tokenizer: GPT2BPE
    clip_tokenizer: CLIPBPE
    grounding_tokenizer: GroundingTokenizer
    qwen_tokenizer: QwenTokenizer | None
    source: str

    @property
    def tokenizer(self) -> TokenizerFiles:
        """The three tokenizers as one, with the ``files``/``save`` ``edgeav export`` reads (the checkpoint
        digest, the engine's tokenizer files)."""
        return TokenizerFiles(self.gpt2_tokenizer, self.clip_tokenizer, self.grounding_tokenizer, self.qwen_tokenizer,
                              self.source)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoadedOpenAVS":
        for name, module in self.model.parts().items():
            # GroundingDINO stays fp32 as released: its deformable sampling is not made for half floats.
            module.to(device=device, dtype=torch.float32 if name == "grounding" else dtype)
        return self


def recognises(folder: Path) -> bool:
    converted = converted_system(folder)
    if converted is not None:
        return converted == "openavs"
    return (folder / PENGI_FILE).is_file()


def _by_shapes(presets, build, state: dict[str, torch.Tensor], path: Path, what: str) -> str:
    """The preset whose model (built on the meta device) has exactly the shapes of ``state``."""
    for name in presets:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build(name).state_dict().items()}
        if all(k in state and tuple(state[k].shape) == shape for k, shape in shapes.items()):
            return name
    raise CheckpointError(f"{path}: matches none of the {what} sizes edgeav builds ({', '.join(presets)}); copy "
                          "the released file again")


def _load(module: nn.Module, state: dict[str, torch.Tensor], source) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"{source}: {detail}") from None


def _load_sam(model: OpenAVSModel, sam: dict, sam2: dict | None, source) -> None:
    try:
        load_sam_state_dict(model.sam, sam, source=str(source))
        if model.sam2 is not None:
            load_sam2_state_dict(model.sam2, sam2, source=str(source))
    except EdgeavError as e:
        raise CheckpointError(str(e)) from None


def _tokenizers(folder: Path, thinker_dir: Path | None, grounding_max_text: int) -> tuple:
    try:
        qwen = QwenTokenizer.from_dir(thinker_dir) if thinker_dir is not None else None
        grounding = read_grounding_vocab(folder / GROUNDING_VOCAB, grounding_max_text)
        return GPT2BPE.from_dir(folder / GPT2_DIR), CLIPBPE.from_dir(folder / CLIP_DIR), grounding, qwen
    except EdgeavError as e:
        raise CheckpointError(str(e)) from None


# -- the released layout --------------------------------------------------------------


def _thinker_state(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no model*.safetensors; give Qwen2.5-Omni's files in {THINKER_DIR}/")
    state = {}
    for path in files:
        state.update({ours: v for k, v in read_weights(path).items() if (ours := released_thinker_key(k)) is not None})
    return state


def load_released(folder: str | Path, preset_name: str | None = None) -> LoadedOpenAVS:
    folder = Path(folder)
    for name in (PENGI_FILE, GROUNDING_FILE, SAM_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name}; OpenAVS needs Pengi's base.pth, {GROUNDING_FILE} and "
                                  f"{SAM_FILE} in one folder (see `edgeav synth --system openavs`)")
    pengi = read_pengi_checkpoint(folder / PENGI_FILE)
    grounding = read_original_checkpoint(folder / GROUNDING_FILE)
    sam = read_weights(folder / SAM_FILE)
    sam2 = read_weights(folder / SAM2_FILE) if (folder / SAM2_FILE).is_file() else None
    if sam2 is not None and isinstance(sam2.get("model"), dict):
        sam2 = sam2["model"]
    beats_cfg, beats = None, None
    if (folder / BEATS_FILE).is_file():
        checkpoint = read_weights(folder / BEATS_FILE)
        if not isinstance(checkpoint.get("cfg"), dict) or not isinstance(checkpoint.get("model"), dict):
            raise CheckpointError(f"{folder / BEATS_FILE}: expected a BEATs checkpoint with 'cfg' and 'model'")
        beats_cfg, beats = checkpoint["cfg"], checkpoint["model"]
        if "predictor.weight" not in beats:
            raise CheckpointError(f"{folder / BEATS_FILE}: has no AudioSet head (predictor.*); the edge variant "
                                  "needs the fine-tuned BEATs (..._finetuned_on_AS2M_cpt2.pt): copy that file, or "
                                  "remove this one to run without the edge variant")
    thinker_dir = folder / THINKER_DIR if (folder / THINKER_DIR).is_dir() else None
    try:
        beats_config = beats_config_from_checkpoint_cfg(beats_cfg).audio if beats_cfg is not None else None
    except EdgeavError as e:
        raise CheckpointError(f"{folder / BEATS_FILE}: {e}") from None
    config = OpenAVSConfig(
        name="openavs-custom",
        pengi=_by_shapes(PENGI_PRESETS, lambda n: Pengi(pengi_preset(n)), pengi, folder / PENGI_FILE, "Pengi"),
        grounding=_by_shapes(GROUNDING_PRESETS, lambda n: GroundingDINO(GROUNDING_PRESETS[n]), grounding,
                             folder / GROUNDING_FILE, "GroundingDINO"),
        sam=_by_shapes(SAM_PRESETS, lambda n: Sam(sam_config(n)), sam, folder / SAM_FILE, "SAM"),
        sam2=(_by_shapes(SAM2_PRESETS, lambda n: Sam2(sam2_config(n)), sam2, folder / SAM2_FILE, "SAM2")
              if sam2 is not None else None),
        beats=beats_config, beats_classes=int(beats["predictor.weight"].shape[0]) if beats is not None else 0,
        thinker=(thinker_shapes_from_hf(read_json(thinker_dir / CONFIG_FILE), thinker_dir)
                 if thinker_dir is not None else None))
    config = _named(config, preset_name, folder)
    model = _build(config, folder)
    _load(model.pengi, pengi, folder / PENGI_FILE)
    _load(model.grounding, grounding, folder / GROUNDING_FILE)
    _load_sam(model, sam, sam2, folder)
    if beats is not None:
        _load(model.beats, beats, folder / BEATS_FILE)
    if thinker_dir is not None:
        _load(model.thinker, _thinker_state(thinker_dir), thinker_dir)
    tokenizers = _tokenizers(folder, thinker_dir, model.grounding.config.max_text_len)
    return _loaded(config, model, tokenizers, str(folder))


def _named(config: OpenAVSConfig, preset_name: str | None, folder: Path) -> OpenAVSConfig:
    """``config`` under the name of the preset with the same components (its GroundingDINO input size)."""
    same = [p for p in PRESETS.values()
            if dataclasses.replace(config, name=p.name, grounding_size=p.grounding_size) == p]
    if preset_name is not None:
        wanted = preset(preset_name)
        if wanted not in same:
            raise CheckpointError(f"{folder}: its components are not those of --preset {preset_name}; drop --preset")
        return wanted
    return same[0] if same else config


def _build(config: OpenAVSConfig, source) -> OpenAVSModel:
    try:
        return OpenAVSModel(config).eval()
    except (RuntimeError, ValueError, EdgeavError) as e:  # impossible sizes in a hand-edited config
        raise CheckpointError(f"{source}: its model config cannot build a model ({str(e).splitlines()[0]}); "
                              "convert the released weights again") from None


def _loaded(config, model, tokenizers, source: str) -> LoadedOpenAVS:
    if model.thinker is not None:
        model.thinker.llm.setup_caches(1, min(256, config.thinker.llm.max_seq_len))
    return LoadedOpenAVS(config, model, *tokenizers, source)


# -- the converted layout ------------------------------------------------------------


def load_converted(folder: Path, preset_name: str | None = None) -> LoadedOpenAVS:
    config = read_converted_config(folder, OpenAVSConfig.from_dict, preset_name)
    model = _build(config, folder / MODEL_FILE)
    state = read_safetensors(folder / MODEL_FILE)
    parts = {name: {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
             for name in ("pengi", "grounding", "sam", "sam2", "beats", "thinker")}
    strays = sorted(k for k in state if k.split(".", 1)[0] not in model.parts())
    if strays:
        raise CheckpointError(f"{folder / MODEL_FILE}: unexpected weight {strays[0]!r}; it belongs to no part of "
                              f"this {config.name} model")
    for name in ("pengi", "grounding", "beats", "thinker"):
        if getattr(model, name) is not None:
            _load(getattr(model, name), parts[name], folder / MODEL_FILE)
    _load_sam(model, parts["sam"], parts["sam2"], folder / MODEL_FILE)
    thinker_dir = folder / THINKER_DIR if model.thinker is not None else None
    tokenizers = _tokenizers(folder, thinker_dir, model.grounding.config.max_text_len)
    return _loaded(config, model, tokenizers, str(folder))


def load_checkpoint(folder: str | Path, preset_name: str | None = None) -> LoadedOpenAVS:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; check the path")
    if converted_system(folder) is not None:
        return load_converted(folder, preset_name)
    return load_released(folder, preset_name)


def _save_tokenizers(loaded: LoadedOpenAVS, folder: Path) -> None:
    loaded.gpt2_tokenizer.save(folder / GPT2_DIR)
    loaded.clip_tokenizer.save(folder / CLIP_DIR)
    (folder / GROUNDING_VOCAB).parent.mkdir(parents=True, exist_ok=True)
    (folder / GROUNDING_VOCAB).write_text("".join(t + "\n" for t in loaded.grounding_tokenizer.vocabulary()))
    if loaded.qwen_tokenizer is not None:
        loaded.qwen_tokenizer.save(folder / THINKER_DIR)


def save_converted(loaded: LoadedOpenAVS, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # GroundingDINO's one box head sits at two paths; safetensors refuses shared storage, so each gets a copy.
    write_safetensors({k: v.detach().clone().contiguous() for k, v in loaded.model.state_dict().items()},
                      folder / MODEL_FILE)
    _save_tokenizers(loaded, folder)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "system": "openavs",
            "config": loaded.config.to_dict(), "converted_from": loaded.source}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


# -- synthetic checkpoints -------------------------------------------------------------


def synthesize(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedOpenAVS:
    """A model of ``preset_name`` with random weights and small real tokenizers (nothing stays on disk)."""
    config = preset(preset_name)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = OpenAVSModel(config).eval()
        finally:
            torch.set_default_dtype(default_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2 = GPT2BPE.from_dir(write_synthetic_bpe(tmp / "gpt2", "gpt2"))
        clip = CLIPBPE.from_dir(write_synthetic_bpe(tmp / "clip", "clip"))
        qwen = None
        if model.thinker is not None:
            write_synthetic_tokenizer(tmp / "qwen")
            qwen = QwenTokenizer.from_dir(tmp / "qwen")
    grounding = GroundingTokenizer.from_tokens(synthetic_bert_vocab(), model.grounding.config.max_text_len)
    with torch.no_grad():
        # Head rows of ids the small tokenizers lack score 0: the noise is written in tokens that decode.
        _zero_unknown_rows(model.pengi.caption_decoder.gpt.lm_head.weight, gpt2.known_ids())
        if model.thinker is not None:
            _zero_unknown_rows(model.thinker.llm.lm_head.weight, qwen.known_ids())
    return _loaded(config, model, (gpt2, clip, grounding, qwen), f"{preset_name} (random weights, seed {seed})")


def _zero_unknown_rows(head: torch.Tensor, known) -> None:
    unknown = torch.ones(head.shape[0], dtype=torch.bool)
    unknown[sorted(i for i in known if i < head.shape[0])] = False
    head[unknown] = 0


def save_released(loaded: LoadedOpenAVS, folder: str | Path) -> Path:
    """Write ``loaded`` as the third-party releases it is made of (the layout above)."""
    folder = Path(folder)
    model = loaded.model
    (folder / PENGI_FILE).parent.mkdir(parents=True, exist_ok=True)
    write_pengi_checkpoint(model.pengi, folder / PENGI_FILE)
    save_grounding(model.grounding, loaded.grounding_tokenizer, folder, released=True)
    torch.save(model.sam.state_dict(), folder / SAM_FILE)
    if model.sam2 is not None:
        torch.save({"model": model.sam2.state_dict()}, folder / SAM2_FILE)
    if model.beats is not None:
        cfg = {**beats_checkpoint_cfg(BeatsEncoderConfig(audio=loaded.config.beats)), "finetuned_model": True,
               "predictor_class": loaded.config.beats_classes}
        torch.save({"cfg": cfg, "model": model.beats.state_dict()}, folder / BEATS_FILE)
    _save_tokenizers(loaded, folder)
    if model.thinker is not None:
        thinker = {THINKER_PREFIX + prefix + k: v.contiguous()
                   for prefix, part in (("audio_tower.", model.thinker.audio_tower), ("visual.", model.thinker.visual),
                                        ("model.", model.thinker.llm.model), ("lm_head.", model.thinker.llm.lm_head))
                   for k, v in part.state_dict().items()}
        write_safetensors(thinker, folder / THINKER_DIR / "model-00001-of-00001.safetensors")
        (folder / THINKER_DIR / CONFIG_FILE).write_text(json.dumps(hf_config(loaded.config.thinker), indent=2) + "\n")
    return folder


__all__ = ["LoadedOpenAVS", "load_checkpoint", "recognises", "save_converted", "save_released", "synthesize"]
