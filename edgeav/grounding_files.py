"""GroundingDINO's files, as u-LLaVA and OpenAVS both read and write them: the released
``groundingdino_swint_ogc.pth`` (``{"model": ...}``, read without executing code) or edgeav's
``groundingdino.safetensors``, with bert-base-uncased's ``vocab.txt`` for the caption.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeav.errors import CheckpointError
from edgeav.models.grounding_dino import GroundingDINO, GroundingDINOConfig, read_original_checkpoint
from edgeav.preprocess.grounding_dino import GroundingTokenizer
from edgeav.weight_files import read_safetensors, write_safetensors

GROUNDING_FILE = "groundingdino_swint_ogc.pth"
GROUNDING_CONVERTED = "groundingdino.safetensors"
GROUNDING_VOCAB = Path("bert-base-uncased") / "vocab.txt"


def load_grounding(path: Path, vocab: Path, preset: str) -> tuple[GroundingDINO, GroundingTokenizer]:
    """GroundingDINO of ``preset`` with the weights of ``path`` (released pickle or safetensors) and the
    caption tokenizer of ``vocab``."""
    if not vocab.is_file():
        raise CheckpointError(f"{path.parent}: {path.name} is there but not its caption vocabulary {vocab}; copy "
                              "bert-base-uncased's vocab.txt there")
    config = GroundingDINOConfig.from_preset(preset)
    state = read_safetensors(path) if path.suffix == ".safetensors" else read_original_checkpoint(path)
    model = GroundingDINO(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path}: not a GroundingDINO {preset} state dict ({first}); use the released "
                              f"{GROUNDING_FILE}") from None
    return model.eval(), read_grounding_vocab(vocab, config.max_text_len)


def read_grounding_vocab(vocab: Path, max_text_len: int) -> GroundingTokenizer:
    """The caption tokenizer of a ``vocab.txt``; a missing, binary or empty one is one line naming it."""
    try:
        return GroundingTokenizer(vocab, max_text_len)
    except (TypeError, ValueError, RuntimeError) as e:  # the tokenizers library's errors for a broken vocabulary
        raise CheckpointError(f"{vocab}: not a usable BERT vocabulary ({e}); copy bert-base-uncased's vocab.txt "
                              "again") from None


def save_grounding(model: GroundingDINO, tokenizer: GroundingTokenizer, folder: Path, *, released: bool) -> None:
    """Write GroundingDINO into ``folder``: as released (``{"model": ...}`` pickle) or as safetensors, and
    the vocabulary at :data:`GROUNDING_VOCAB`."""
    if released:
        torch.save({"model": model.state_dict()}, folder / GROUNDING_FILE)
    else:
        # The release's one box head sits at two paths; safetensors refuses shared storage, so each gets a copy.
        write_safetensors({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
                          folder / GROUNDING_CONVERTED)
    (folder / GROUNDING_VOCAB).parent.mkdir(parents=True, exist_ok=True)
    (folder / GROUNDING_VOCAB).write_text("".join(token + "\n" for token in tokenizer.vocabulary()))


# bert-base-uncased ids of the tokens GroundingDINO treats specially and of the synthetic corpora's words.
_BERT_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029,
             "the": 1996, "red": 2417, "square": 2675, "left": 2187, "on": 2006, "man": 2158, "dog": 3899,
             "cat": 4937, "circle": 4418, "blue": 2630}
BERT_VOCAB_SIZE = 30522


def synthetic_bert_vocab() -> list[str]:
    """A bert-base-uncased-sized vocabulary: the ids GroundingDINO needs at their real places, the rest unused."""
    by_id = {i: token for token, i in _BERT_IDS.items()}
    return [by_id.get(i, f"[unused{i}]") for i in range(BERT_VOCAB_SIZE)]


def synthetic_grounding(preset: str) -> tuple[GroundingDINO, GroundingTokenizer]:
    """GroundingDINO of ``preset`` with the current random state's weights and the synthetic vocabulary."""
    model = GroundingDINO(GroundingDINOConfig.from_preset(preset)).eval()
    return model, GroundingTokenizer.from_tokens(synthetic_bert_vocab(), model.config.max_text_len)


__all__ = ["BERT_VOCAB_SIZE", "GROUNDING_CONVERTED", "GROUNDING_FILE", "GROUNDING_VOCAB", "load_grounding",
           "read_grounding_vocab", "save_grounding", "synthetic_bert_vocab", "synthetic_grounding"]
