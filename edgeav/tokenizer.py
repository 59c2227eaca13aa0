"""Crab's tokenizer: a Llama-2 sentencepiece model, Crab's 17 added tokens and the
Llama-2 chat template with Crab's system prompt.

Text between added tokens is encoded chunk by chunk, each chunk with
sentencepiece's dummy prefix, as Hugging Face's slow ``LlamaTokenizer`` does in
its legacy mode (the mode Crab's tokenizer was saved with).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from edgeav.config import ADDED_TOKENS, LLMConfig
from edgeav.errors import EdgeavError

SYSTEM_PROMPT = "You are a helpful assistant."
TOKENIZER_FILE = "tokenizer.model"
_ADDED_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in ADDED_TOKENS) + ")")


def chat_prompt(instruction: str, system: str = SYSTEM_PROMPT) -> str:
    """The Llama-2 chat prompt (without the BOS token, which :meth:`Tokenizer.encode_chat` adds)."""
    return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{instruction} [/INST]"


class Tokenizer:
    """Encode and decode Crab prompts and outputs.

    Args:
        model_proto: the serialised sentencepiece model (the bytes of ``tokenizer.model``).
        llm: the LLM config; its ``base_vocab_size`` must equal the model's piece count.
        source: where the model came from, for error messages.
    """

    def __init__(self, model_proto: bytes, llm: LLMConfig, source: str = "tokenizer") -> None:
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise EdgeavError(f"{source}: not a sentencepiece model ({e}); re-copy tokenizer.model") from None
        if self._sp.get_piece_size() != llm.base_vocab_size:
            raise EdgeavError(
                f"{source}: has {self._sp.get_piece_size()} pieces but the model config expects "
                f"{llm.base_vocab_size}; use the tokenizer that ships with this checkpoint"
            )
        self.model_proto = model_proto
        self.base_vocab_size = llm.base_vocab_size
        self.bos_id, self.eos_id = llm.bos_id, llm.eos_id
        self._added = {token: llm.token_id(token) for token in ADDED_TOKENS}
        self._added_by_id = {i: t for t, i in self._added.items()}

    @classmethod
    def from_file(cls, path: str | Path, llm: LLMConfig) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise EdgeavError(f"{path}: no tokenizer model; the checkpoint folder needs {TOKENIZER_FILE}")
        return cls(path.read_bytes(), llm, source=str(path))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        path.write_bytes(self.model_proto)
        return path

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self._added)

    def token_id(self, token: str) -> int:
        """Id of one of Crab's added tokens (``<video>``, ``<mask_0>``, ...)."""
        return self._added[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS); added tokens map to their own ids."""
        ids: list[int] = []
        for chunk in _ADDED_SPLIT.split(text):
            if chunk in self._added:
                ids.append(self._added[chunk])
            elif chunk:
                ids.extend(self._sp.encode(chunk))
        return ids

    def encode_chat(self, instruction: str) -> list[int]:
        """BOS + the chat prompt around ``instruction``."""
        return [self.bos_id, *self.encode(chat_prompt(instruction))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; added tokens are written out, BOS and EOS dropped."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i in self._added_by_id:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._added_by_id[i])
            elif i not in (self.bos_id, self.eos_id):
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)


# A synthetic corpus supports a few hundred learned pieces; larger vocabularies
# (crab-7b's 32000) are filled up with unused placeholder pieces.
LEARNED_PIECES = 512


def train_sentencepiece(corpus: Iterable[str], vocab_size: int) -> bytes:
    """Train a small Llama-style BPE sentencepiece model (unk 0, bos 1, eos 2, byte
    fallback so any text encodes) with exactly ``vocab_size`` pieces, for synthetic
    checkpoints. Deterministic for a given corpus: one thread, no sampling."""
    model = io.BytesIO()
    fillers = [f"<unused_{i}>" for i in range(max(0, vocab_size - LEARNED_PIECES))]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in corpus if line.strip()]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        hard_vocab_limit=True,
        user_defined_symbols=fillers,
        minloglevel=2,
    )
    return model.getvalue()
