"""Checkpoints: Crab's released layout, edgeav's converted layout, synthetic weights.

Released layout (what the authors publish, plus the base models it builds on),
all in one folder::

    finetune_weights.bin          LoRA + both projectors          (required)
    avs_finetune_weights.bin      mask decoder + embeddings/head   (S4, MS3, Ref-AVS)
    avss_finetune_weights.bin     mask decoder + embeddings/head   (AVSS)
    <any>/config.json             a Hugging Face Llama folder (model_type llama) with tokenizer.model
                                  and tokenizer_config.json (optional; read as transformers 4.x reads it)
    <any>/config.json             a Hugging Face CLIP folder (model_type clip or clip_vision_model)
    <any>.pt                      the BEATs checkpoint ({"cfg": ..., "model": ...})

Converted layout (``edgeav convert``): ``config.json``, ``model.safetensors`` (every
joint weight under :class:`~edgeav.systems.crab.model.CrabModel` names), ``avs.safetensors``
and ``avss.safetensors`` (what the mask variants replace), ``tokenizer.model`` and
``tokenizer_config.json`` (its ``legacy`` setting changes prompt ids).

Pickles are read with ``torch.load(weights_only=True)`` only. Key renames live in
the modules' ``load_state_dict`` pre-hooks; this module only routes each file's
keys to the component they belong to, and turns every mismatch into a
:class:`~edgeav.errors.CheckpointError` naming the file, the component and the key.

Never saved by the release, so created here from fixed seeds: the 17 added token
rows of the embeddings and LM head for non-mask tasks (``EXTRA_TOKEN_SEED``, drawn
N(0, 0.02) as Crab's resize does). The mask decoder's Fourier matrices load from a
mask file that holds them (``seg_module.pe_layer.*``, ``seg_module.mask_decoder.pe1.*``);
where it does not, they come from :data:`edgeav.systems.crab.seg.FOURIER_SEED`.

An empty, truncated or foreign weight file (a Git LFS pointer, an interrupted copy)
is refused with one line naming the file and the fix, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch
from torch import nn

from edgeav.systems.crab.config import ADDED_TOKENS, PRESETS, VOCABULARY, CrabConfig, chat_prompt, preset as get_preset
from edgeav.errors import CheckpointError, EdgeavError
from edgeav.models.audio import BeatsEncoderConfig, beats_checkpoint_cfg, beats_config_from_checkpoint_cfg
from edgeav.systems.crab.model import CrabModel
from edgeav.systems.crab.seg import FOURIER_KEYS, SegModule
from edgeav.systems.crab.release_writer import write_beats_file, write_clip_folder, write_llama_folder
from edgeav.tokenizer import TOKENIZER_FILE, Tokenizer
from edgeav.weight_files import (
    CONFIG_FILE, FORMAT, FORMAT_VERSION, converted_system, read_json, read_pickle, read_safetensors, read_weights,
    write_safetensors,
)

log = logging.getLogger("edgeav")

JOINT_FILE = "finetune_weights.bin"
VARIANT_FILES = {"avs": "avs_finetune_weights.bin", "avss": "avss_finetune_weights.bin"}
VARIANTS = ("joint", *VARIANT_FILES)
RELEASED_PREFIX = "base_model.model."
EXTRA_TOKEN_SEED = 0
EXTRA_TOKEN_STD = 0.02

MODEL_FILE = "model.safetensors"

# What each mask variant replaces in the joint model.
_VARIANT_LLM_KEYS = ("model.embed_tokens.weight", "lm_head.weight")

# Released finetune files, after RELEASED_PREFIX: key prefix -> (component, prefix inside it).
_RELEASED_ROUTES = (
    ("model.vl_projector.", "visual_projector", ""),
    ("model.al_projector.", "audio_projector", ""),
    ("model.seg_module.", "seg", ""),
    ("model.embed_tokens.", "llm", "model.embed_tokens."),
    ("model.layers.", "llm", "model.layers."),
    ("lm_head.", "llm", "lm_head."),
)
COMPONENTS = ("vision", "audio", "visual_projector", "audio_projector", "llm", "seg")


@dataclass
class LoadedCrab:
    """A model with its weights and tokenizer, ready for any task.

    ``model`` starts with the joint weights; :meth:`variant` puts a mask variant's
    embeddings, LM head and mask decoder in place by swapping tensors (no copy).
    ``variants`` maps "avs"/"avss" to those tensors under CrabModel names.
    """

    system: ClassVar[str] = "crab"
    config: CrabConfig
    audio: BeatsEncoderConfig
    model: CrabModel
    tokenizer: Tokenizer
    source: str
    variants: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _joint: dict[str, torch.Tensor] = field(init=False, repr=False)
    _segs: dict[str, SegModule] = field(init=False, repr=False, default_factory=dict)
    _active: str = field(init=False, repr=False, default="joint")

    def __post_init__(self) -> None:
        self._joint = {key: self._llm_param(key).data for key in _VARIANT_LLM_KEYS}

    def _llm_param(self, key: str) -> nn.Parameter:
        return self.model.llm.get_parameter(key)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "LoadedCrab":
        """Move the model and every variant's tensors once, so later switches stay pointer swaps."""
        active = self._active
        self.variant("joint")
        self.model.to(device, dtype)
        self._joint = {key: self._llm_param(key).data for key in _VARIANT_LLM_KEYS}
        self.variants = {name: {k: v.to(device, dtype) for k, v in tensors.items()}
                         for name, tensors in self.variants.items()}
        self._segs.clear()
        self.variant(active)
        return self

    @torch.no_grad()
    def variant(self, name: str) -> CrabModel:
        """The model with ``name``'s weights in place ("joint", "avs" or "avss")."""
        if name not in VARIANTS:
            raise EdgeavError(f"unknown weight variant {name!r}; expected one of {', '.join(VARIANTS)}")
        if name == self._active:
            return self.model
        if name != "joint" and name not in self.variants:
            raise CheckpointError(
                f"{self.source}: has no {name} weights ({VARIANT_FILES[name]}); mask tasks need that file"
            )
        tensors = self._joint if name == "joint" else self.variants[name]
        for key in _VARIANT_LLM_KEYS:
            self._llm_param(key).data = tensors[key]
        if name != "joint":
            self.model.seg = self._seg(name)
        self._active = name
        return self.model

    def _seg(self, name: str) -> SegModule:
        if name not in self._segs:
            # Built outside any inference_mode block, so the weights stay ordinary tensors.
            with torch.inference_mode(False):
                reference = self._joint[_VARIANT_LLM_KEYS[0]]
                seg = SegModule(self.config, avss=name == "avss").to(reference.device, reference.dtype)
                prefix = "seg."
                seg.load_state_dict({k[len(prefix):]: v for k, v in self.variants[name].items()
                                     if k.startswith(prefix)})
            self._segs[name] = seg.eval()
        return self._segs[name]


# -- reading files -------------------------------------------------------------


def _strip(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _hf_weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin); copy the whole model folder")
    return files


# -- loading into the model ------------------------------------------------------


class _ComponentLoader:
    """Loads pieces of state dicts into one component and reports what is missing at the end."""

    def __init__(self, module: nn.Module, component: str) -> None:
        self.module, self.component = module, component
        self.expected = set(module.state_dict())
        self.loaded: set[str] = set()
        self.files: list[Path] = []

    def load(self, state: dict[str, torch.Tensor], path: Path) -> None:
        self.files.append(path)
        try:
            result = self.module.load_state_dict(state, strict=False)
        except RuntimeError as e:
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            detail = re.sub(r"copying a param with shape (torch\.Size\(\[.*?\]\)) from checkpoint, the shape in "
                            r"current model is (torch\.Size\(\[.*?\]\))", r"the file has \1, the model expects \2",
                            detail)
            raise CheckpointError(f"{path}: {self.component}: {detail.rstrip('.')}; is this the right preset?") from None
        if result.unexpected_keys:
            key = result.unexpected_keys[0]
            more = f" (and {len(result.unexpected_keys) - 1} more)" if len(result.unexpected_keys) > 1 else ""
            raise CheckpointError(f"{path}: {self.component}: unexpected key {key!r}{more}; is this the right preset?")
        self.loaded |= self.expected - set(result.missing_keys)

    def check_complete(self) -> None:
        missing = sorted(self.expected - self.loaded)
        if missing:
            where = ", ".join(str(p) for p in self.files) or "no file"
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{where}: {self.component}: missing key {missing[0]!r}{more}; "
                                  "the checkpoint is incomplete or of another model")


def extra_token_rows(config: CrabConfig, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 17 added-token rows of the embeddings and LM head that the release never saved."""
    generator = torch.Generator().manual_seed(EXTRA_TOKEN_SEED)
    shape = (len(ADDED_TOKENS), config.llm.hidden_size)
    embed = torch.randn(shape, generator=generator) * EXTRA_TOKEN_STD
    head = torch.randn(shape, generator=generator) * EXTRA_TOKEN_STD
    return embed.to(dtype), head.to(dtype)


def _with_extra_rows(state: dict[str, torch.Tensor], config: CrabConfig) -> dict[str, torch.Tensor]:
    """Grow a base Llama's [base_vocab, D] embeddings and head to Crab's vocabulary."""
    embed_rows, head_rows = extra_token_rows(config)
    for key, rows in (("model.embed_tokens.weight", embed_rows), ("lm_head.weight", head_rows)):
        if key in state and state[key].shape[0] == config.llm.base_vocab_size:
            state[key] = torch.cat([state[key].to(rows.dtype), rows])
    return state


def _route_released(state: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Split a released finetune file by component (keys relative to the component)."""
    routed: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} holds a {type(tensor).__name__}, not a tensor; "
                                  "is this a Crab weight file?")
        if not key.startswith(RELEASED_PREFIX):
            raise CheckpointError(f"{path}: unexpected key {key!r}; released Crab keys start with {RELEASED_PREFIX!r}")
        rest = key[len(RELEASED_PREFIX):]
        for prefix, component, inner in _RELEASED_ROUTES:
            if rest.startswith(prefix):
                routed.setdefault(component, {})[inner + rest[len(prefix):]] = tensor
                break
        else:
            raise CheckpointError(f"{path}: unexpected key {key!r}; it belongs to no part of Crab")
    return routed


# -- the released layout -------------------------------------------------------------


@dataclass
class ReleasedFiles:
    folder: Path
    joint: Path
    variants: dict[str, Path]
    llama: Path
    clip: Path
    beats: Path

    @classmethod
    def find(cls, folder: Path) -> "ReleasedFiles":
        joint = folder / JOINT_FILE
        if not joint.is_file():
            raise CheckpointError(f"{folder}: no {JOINT_FILE}; give the folder holding Crab's released weights")
        hf, untyped = {}, []
        for config in sorted(folder.glob("*/config.json")):
            model_type = read_json(config).get("model_type")
            if not isinstance(model_type, str):
                untyped.append(config)
                continue
            hf.setdefault("clip" if model_type in ("clip", "clip_vision_model") else model_type, config.parent)
        for kind, what in (("llama", "Llama-2-7b-chat-hf"), ("clip", "clip-vit-large-patch14")):
            if kind not in hf:
                if untyped:  # the folder is likely there, its config just does not say what it is
                    raise CheckpointError(f"{untyped[0]}: has no model_type string, so no {kind} model folder "
                                          f"(like {what}) was found; use that model's own config.json")
                raise CheckpointError(f"{folder}: no {kind} model folder (like {what}) with a config.json; copy it in")
        beats = sorted(folder.glob("*.pt"))
        if len(beats) != 1:
            found = ", ".join(p.name for p in beats) or "none"
            raise CheckpointError(f"{folder}: expected one BEATs .pt checkpoint, found {found}")
        variants = {name: folder / f for name, f in VARIANT_FILES.items() if (folder / f).is_file()}
        return cls(folder, joint, variants, hf["llama"], hf["clip"], beats[0])


LLM_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")


def _llm_shape(llama_config: dict, path: Path) -> tuple:
    """hidden size, layers and vocabulary of a Llama config.json, each a positive whole number."""
    shape = []
    for key in LLM_SHAPE_KEYS:
        value = llama_config.get(key)
        if key not in llama_config:
            raise CheckpointError(f"{path}: has no {key}; use the Llama model's own config.json")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{path}: {key} must be a positive whole number, got {value!r}; "
                                  "use the Llama model's own config.json")
        shape.append(value)
    return tuple(shape)


def _resolve_preset(files: ReleasedFiles, preset_name: str | None) -> CrabConfig:
    """The preset named, or the one whose LLM shape the Llama folder has; a disagreement is an error."""
    llama_config = read_json(files.llama / "config.json")
    found = _llm_shape(llama_config, files.llama / "config.json")
    shape_of = {name: (c.llm.hidden_size, c.llm.num_layers, c.llm.base_vocab_size) for name, c in PRESETS.items()}
    if preset_name is None:
        matches = [name for name, shape in shape_of.items() if shape == found]
        if not matches:
            raise CheckpointError(f"{files.llama}/config.json: hidden {found[0]}, {found[1]} layers, vocabulary "
                                  f"{found[2]} match no preset; pass --preset (one of {', '.join(PRESETS)})")
        preset_name = matches[0]
    config = get_preset(preset_name)
    if shape_of[preset_name] != found:
        raise CheckpointError(
            f"{files.llama}/config.json: hidden {found[0]}, {found[1]} layers, vocabulary {found[2]}; preset "
            f"{preset_name!r} has {shape_of[preset_name][0]}, {shape_of[preset_name][1]}, {shape_of[preset_name][2]}: "
            "pass the preset this checkpoint was made for"
        )
    return config


def load_released(folder: str | Path, preset: str | None = None) -> LoadedCrab:
    """Load Crab's released weights from ``folder`` (see the module docstring for its layout)."""
    files = ReleasedFiles.find(Path(folder))
    config = _resolve_preset(files, preset)
    beats = read_pickle(files.beats)
    if "cfg" not in beats or not isinstance(beats.get("model"), dict):
        raise CheckpointError(f"{files.beats}: expected a BEATs checkpoint with 'cfg' and 'model'")
    try:
        audio_config = beats_config_from_checkpoint_cfg(beats["cfg"])
    except EdgeavError as e:
        raise CheckpointError(f"{files.beats}: {e}") from None
    if audio_config.audio.hidden_size != config.audio.hidden_size:
        raise CheckpointError(f"{files.beats}: audio width {audio_config.audio.hidden_size}, preset {config.name!r} "
                              f"expects {config.audio.hidden_size}; pass the preset this checkpoint was made for")
    model = CrabModel(config, audio=audio_config).eval()
    loaders = {name: _ComponentLoader(getattr(model, name), name) for name in COMPONENTS}

    loaders["audio"].load(beats["model"], files.beats)
    for path in _hf_weight_files(files.clip):
        state = read_weights(path)
        loaders["vision"].load({k: v for k, v in state.items() if k.startswith("vision_model.")}, path)
    for path in _hf_weight_files(files.llama):
        loaders["llm"].load(_with_extra_rows(read_weights(path), config), path)
    for component, state in _route_released(read_pickle(files.joint), files.joint).items():
        if component == "seg":
            raise CheckpointError(f"{files.joint}: holds mask decoder weights; those belong in {VARIANT_FILES['avs']}")
        loaders[component].load(state, files.joint)
    for name in COMPONENTS:
        if name != "seg":  # the mask decoder comes with the variant files
            loaders[name].check_complete()

    variants = {name: _load_variant(model, config, path) for name, path in files.variants.items()}
    tokenizer = Tokenizer.from_file(files.llama / TOKENIZER_FILE, config.llm, VOCABULARY)
    return LoadedCrab(config, audio_config, model, tokenizer, str(files.folder), variants)


def _load_variant(model: CrabModel, config: CrabConfig, path: Path) -> dict[str, torch.Tensor]:
    """Read a mask-variant file into fresh tensors under CrabModel names."""
    seg = SegModule(config)
    llm_state: dict[str, torch.Tensor] = {}
    seg_loader = _ComponentLoader(seg, "seg")
    for component, state in _route_released(read_pickle(path), path).items():
        if component == "seg":
            seg_loader.load(state, path)
        elif component == "llm" and set(state) <= set(_VARIANT_LLM_KEYS):
            llm_state.update(state)
        else:
            raise CheckpointError(f"{path}: holds {component} weights; a mask-variant file carries only "
                                  "seg_module, embed_tokens and lm_head")
    seg_loader.check_complete()
    return _variant_tensors(model, llm_state, seg, path)


def _variant_tensors(model: CrabModel, llm_state: dict, seg: SegModule, path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for key in _VARIANT_LLM_KEYS:
        expected = model.llm.get_parameter(key)
        if key not in llm_state:
            raise CheckpointError(f"{path}: llm: missing key {key!r}; a mask-variant file carries the trained {key}")
        if llm_state[key].shape != expected.shape:
            raise CheckpointError(f"{path}: llm: {key} has shape {tuple(llm_state[key].shape)}, the model expects "
                                  f"{tuple(expected.shape)}; is this the right preset?")
        tensors[key] = llm_state[key].to(expected.dtype).clone()
    tensors.update({f"seg.{k}": v for k, v in seg.state_dict().items()})
    return tensors


# -- the converted layout -----------------------------------------------------------


def is_converted(folder: str | Path) -> bool:
    return converted_system(Path(folder)) is not None and (Path(folder) / MODEL_FILE).is_file()


def load_converted(folder: str | Path, preset: str | None = None) -> LoadedCrab:
    folder = Path(folder)
    meta = read_json(folder / CONFIG_FILE)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / CONFIG_FILE}: not an edgeav checkpoint of format version {FORMAT_VERSION}; "
                              "convert the released weights again with `edgeav convert`")
    try:
        config = CrabConfig.from_dict(meta["config"])
        audio_config = beats_config_from_checkpoint_cfg(meta["audio"])
    except (EdgeavError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad model config ({e}); convert the weights again") from None
    if preset is not None and preset != config.name:
        raise CheckpointError(f"{folder}: is a {config.name} checkpoint, not {preset}; drop --preset or pass {config.name}")
    model = CrabModel(config, audio=audio_config).eval()
    path = folder / MODEL_FILE
    state = read_safetensors(path)
    for name in COMPONENTS:
        if name == "seg":
            continue
        loader = _ComponentLoader(getattr(model, name), name)
        loader.load(_strip(name + ".", state), path)
        loader.check_complete()
    stray = sorted(k for k in state if k.split(".")[0] not in COMPONENTS or k.startswith("seg."))
    if stray:
        raise CheckpointError(f"{path}: unexpected key {stray[0]!r}; it belongs to no part of the joint model")
    variants = {}
    for name in VARIANT_FILES:
        variant_path = folder / f"{name}.safetensors"
        if variant_path.is_file():
            tensors = read_safetensors(variant_path)
            seg = SegModule(config)
            seg_loader = _ComponentLoader(seg, "seg")
            seg_loader.load(_strip("seg.", tensors), variant_path)
            seg_loader.check_complete()
            llm_state = _strip("llm.", tensors)
            stray = sorted(k for k in tensors if not k.startswith(("seg.", "llm.")))
            if stray:
                raise CheckpointError(f"{variant_path}: unexpected key {stray[0]!r}; a variant holds seg.* and llm.* only")
            variants[name] = _variant_tensors(model, llm_state, seg, variant_path)
    tokenizer = Tokenizer.from_file(folder / TOKENIZER_FILE, config.llm, VOCABULARY)
    return LoadedCrab(config, audio_config, model, tokenizer, str(folder), variants)


def save_converted(loaded: LoadedCrab, folder: str | Path) -> Path:
    """Write ``loaded`` in the converted layout (safetensors + config) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = loaded.variant("joint")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("seg.")}
    write_safetensors(state, folder / MODEL_FILE)
    for name, tensors in loaded.variants.items():
        renamed = {("llm." + k if not k.startswith("seg.") else k): v for k, v in tensors.items()}
        write_safetensors(renamed, folder / f"{name}.safetensors")
    loaded.tokenizer.save(folder)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "system": "crab",
        "config": loaded.config.to_dict(),
        "audio": beats_checkpoint_cfg(loaded.audio),
        "converted_from": loaded.source,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_checkpoint(folder: str | Path, preset: str | None = None) -> LoadedCrab:
    """Load a checkpoint folder in either layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; check the path")
    if is_converted(folder):
        return load_converted(folder, preset)
    return load_released(folder, preset)


# -- synthetic checkpoints ------------------------------------------------------------

BEATS_FILE = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"
LLAMA_FOLDER = "Llama-2-7b-chat-hf"
CLIP_FOLDER = "clip-vit-large-patch14"


def synthetic_corpus() -> list[str]:
    """Text a synthetic tokenizer learns from: every task's prompt and the answer formats."""
    from edgeav.systems.crab.tasks import TASKS

    options = {"question": "How many instruments are sounding?", "expression": "the red square on the left"}
    prompts = [chat_prompt(task.instruction(**({task.requires: options[task.requires]} if task.requires else {})))
               for task in TASKS.values()]
    answers = [
        "<event> dog barking </event>, and the time range is <range> 2,5 </range>",
        "<audio_event>Speech,(0 3),(5 10)</audio_event><visual_event>Car,(1 4)</visual_event>",
        "There are three instruments. <answer> three </answer>",
        "The sounding object is guitar. Its coordinate of top left corner is (12,34) and coordinate of "
        "bottom right corner is (100,200)",
        "The sounding object is a violin. <mask_start><mask_0><mask_1><mask_2><mask_3><mask_4><mask_5><mask_end>",
        "0123456789 red green blue yellow circle square triangle left right first second third",
    ]
    return (prompts + answers) * 4


def synthesize(preset_name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedCrab:
    """A model of ``preset_name`` with random weights (every LoRA head active), both mask
    variants and a tokenizer trained on :func:`synthetic_corpus`; nothing touches disk.

    The weights are created in ``dtype`` (crab-7b: about 30 GB in fp32, 15 GB in bf16)."""
    from edgeav.models.ilora import ILoRALinear
    from edgeav.tokenizer import train_sentencepiece

    config = get_preset(preset_name)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = CrabModel(config).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, ILoRALinear):
                    nn.init.normal_(module.lora_B, std=0.02)  # zero B would hide the LoRA
            embed_rows, head_rows = extra_token_rows(config, dtype)
            base = config.llm.base_vocab_size
            model.llm.get_parameter("model.embed_tokens.weight")[base:] = embed_rows
            model.llm.get_parameter("lm_head.weight")[base:] = head_rows
            variants = {}
            for name in VARIANT_FILES:
                seg = SegModule(config, avss=name == "avss")
                tensors = {key: model.llm.get_parameter(key).detach() + 0.01 * torch.randn_like(
                    model.llm.get_parameter(key)) for key in _VARIANT_LLM_KEYS}
                tensors.update({f"seg.{k}": v for k, v in seg.state_dict().items()})
                variants[name] = tensors
    tokenizer = Tokenizer(train_sentencepiece(synthetic_corpus(), config.llm.base_vocab_size), config.llm, VOCABULARY)
    return LoadedCrab(config, BeatsEncoderConfig(audio=config.audio), model, tokenizer,
                      f"synthetic {preset_name} (seed {seed})", variants)


def save_released(loaded: LoadedCrab, folder: str | Path) -> Path:
    """Write ``loaded`` in Crab's released layout with every key the real files hold, those the
    runtime drops included (see :mod:`edgeav.systems.crab.release_writer`). The finetune files hold parameters
    only, as Crab's trainer saved them (``named_parameters()``): no Fourier matrices."""
    from edgeav.models.ilora import ILoRALinear

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = loaded.config
    model = loaded.variant("joint")
    base = config.llm.base_vocab_size
    lora_state = {}
    for name, module in model.llm.named_modules():
        if isinstance(module, ILoRALinear):
            for part, tensor in module.peft_state_dict().items():
                lora_state[f"{RELEASED_PREFIX}{name}.{part}"] = tensor.clone()
    llm_state = {key: (tensor[:base] if key in _VARIANT_LLM_KEYS else tensor)
                 for key, tensor in model.llm.state_dict().items()
                 if key.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_route")}
    write_llama_folder(folder / LLAMA_FOLDER, config.llm, llm_state, loaded.tokenizer)
    write_clip_folder(folder / CLIP_FOLDER, config.vision, model.vision.state_dict())
    write_beats_file(folder / BEATS_FILE, loaded.audio, model.audio.state_dict())

    joint = dict(lora_state)
    for projector, stem in ((model.visual_projector, "vl_projector"), (model.audio_projector, "al_projector")):
        joint.update({f"{RELEASED_PREFIX}model.{stem}.{k}": t for k, t in projector.released_state_dict().items()})
    torch.save(joint, folder / JOINT_FILE)

    for name, tensors in loaded.variants.items():
        released = {f"{RELEASED_PREFIX}model.seg_module.{k}": t for k, t in _strip("seg.", tensors).items()
                    if k not in FOURIER_KEYS}
        released[f"{RELEASED_PREFIX}model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
        released[f"{RELEASED_PREFIX}lm_head.weight"] = tensors["lm_head.weight"]
        torch.save(released, folder / VARIANT_FILES[name])
    return folder
