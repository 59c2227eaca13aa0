"""Crab's inputs built the way its authors' loaders build them, for parity checks.

Written from the semantics of GeWu-Lab/Crab's ``dataset/unified_dataset.py`` and
``dataset/quick_start_dataset.py`` with the libraries they use, never with edgeav's
own media or preprocessing code:

- video: ``decord.VideoReader(uri, height=224, width=224)`` (FFmpeg resizes while
  decoding), ``min(10, n)`` frames at ``arange(0, n, n / k)``, then transformers'
  ``CLIPImageProcessor``;
- images: PIL, RGB, ``resize((224, 224))`` (Pillow's bicubic), then the processor;
- audio: the clip's whole 16 kHz waveform cut into ``tot`` parts of ``int(len / tot)``
  samples; a 16-bit PCM WAV is read as soundfile hands it to librosa (int16 / 32768);
- prompt ids: transformers' ``LlamaTokenizer`` with Crab's tokens added, the Llama-2
  chat template rendered to text, then ``tokenize`` + ``convert_tokens_to_ids``.

decord and transformers are dev dependencies; nothing here runs at inference time.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
# The loaders' ``tot``: seconds a task's clip is cut into (AVQA: 60 one-second steps, 2-s windows).
TOT = {"ave": 10, "avvp": 10, "refavs": 10, "avss": 10, "s4": 5, "ms3": 5, "arig": 5, "avqa": 60}
# The Llama-2 chat rule for one system and one user message, as transformers renders chat templates.
LLAMA2_CHAT_TEMPLATE = ("{{ bos_token + '[INST] ' + ('<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' "
                        "+ messages[1]['content']).strip() + ' [/INST]' }}")
SYSTEM_PROMPT = "You are a helpful assistant."
_VIDEO = "This is a video:\n<video_start><video><video_end>\n"
_AUDIO = "This is an audio:\n<audio_start><audio><audio_end>\n"
_IMAGE = "This is an image:\n<image_start><image><image_end>\n"
# The instructions of the loaders' evaluation datasets, as they write them.
INSTRUCTIONS = {
    "ave": _VIDEO + _AUDIO + "Please describe the events and time range that occurred in the video.",
    "avvp": _VIDEO + _AUDIO + "Please determine the events that occur based on the visual and audio information in "
                              "the video, as well as the start and end times of these events.",
    "avqa": _VIDEO + _AUDIO + "Please answer this question: {question}",
    "s4": _VIDEO + _AUDIO + "Please recognize the category of object making sound in the video, and then segment out "
                            "the object that makes the sound at the {th} second of the video.",
    "arig": _IMAGE + _AUDIO + "Please recognize the category of object that makes the sound and then output the "
                              "location coordinates.",
    "avss": _IMAGE + _AUDIO + "Please recognize the category of the object making the sound in the image and segment "
                              "it out.",
    "refavs": _VIDEO + _AUDIO + _IMAGE + "Please segment out the corresponding object in the image based on the "
                                         "referential expression: {expression}",
}
INSTRUCTIONS["ms3"] = INSTRUCTIONS["s4"]
ORDINALS = ("first", "second", "third", "fourth", "fifth")


def instruction(task: str, *, question: str = "", expression: str = "", second: int = 0) -> str:
    """The instruction of ``task``; S4 and MS3 name the segmented second ("first" .. "fifth")."""
    return INSTRUCTIONS[task].format(question=question, expression=expression, th=ORDINALS[second % 5])


def read_wav(path: str | Path) -> np.ndarray:
    """A 16 kHz 16-bit PCM WAV as float32, averaged over its channels."""
    with wave.open(str(path), "rb") as f:
        if f.getframerate() != SAMPLE_RATE or f.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16 kHz 16-bit PCM")
        samples = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
        return samples.reshape(-1, f.getnchannels()).mean(axis=1, dtype=np.float32)


def read_audio(path: str | Path) -> np.ndarray:
    """A clip's 16 kHz mono waveform: a 16-bit PCM WAV with :func:`read_wav`, anything else with librosa
    (as the authors load every file; librosa is not a dependency of edgeav)."""
    try:
        return read_wav(path)
    except (wave.Error, ValueError, EOFError):
        pass
    try:
        import librosa
    except ImportError:
        raise SystemExit(f"{path}: reading it the authors' way needs librosa (pip install librosa)") from None
    return librosa.load(str(path), sr=SAMPLE_RATE, mono=True)[0]


def audio_pieces(audio: np.ndarray, task: str, second: int = 0) -> np.ndarray:
    """The audio pieces of ``task`` ([pieces, samples]); AVSS takes the piece of frame ``second``."""
    tot = TOT[task]
    nps = int(len(audio) / tot)
    if task == "avss":
        return audio[second * nps : (second + 1) * nps][None]
    pieces = []
    if task == "avqa":  # 2-s windows around 0, 6, ..., 54
        for i in range(0, 60, 6):
            start, end = max(0, i - 0.5), min(tot, i + 1.5)
            piece = audio[int(start * nps) : int(nps * end)]
            if i - 0.5 < 0:
                piece = np.concatenate((np.zeros(2 * nps - len(piece)), piece))
            if i + 1.5 > tot:
                piece = np.concatenate((piece, np.zeros(2 * nps - len(piece))))
            pieces.append(piece)
        return np.stack(pieces)
    for i in range(tot):
        piece = audio[int(max(0, i) * nps) : int(nps * min(tot, i + 1))]
        if len(piece) < nps:
            piece = np.concatenate((piece, np.zeros(nps - len(piece))))
        pieces.append(piece)
    return np.stack(pieces)


def video_frames(path: str | Path, n_frames: int = 10, size: int | None = 224) -> np.ndarray:
    """uint8 [F, H, W, 3]: decord resizing while decoding, at the loaders' frame indices."""
    import decord

    reader = decord.VideoReader(str(path), height=size or -1, width=size or -1)
    n = len(reader)
    indices = np.arange(0, n, n / min(n_frames, n)).astype(int).tolist()
    return reader.get_batch(indices).asnumpy()


def image_frame(path: str | Path) -> np.ndarray:
    """uint8 [224, 224, 3]: PIL, RGB, bicubic."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB").resize((224, 224)))


def clip_processor():
    """transformers' CLIP image processor with OpenAI CLIP's defaults (the PIL-backed one Crab's 4.x ran)."""
    import transformers

    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor()


def pixels(frames: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] -> normalised float32 [F, 3, 224, 224], through PIL images as the loaders pass them."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    return np.asarray(clip_processor()(images, return_tensors="np")["pixel_values"], np.float32)


def llama_tokenizer(folder: str | Path, added_tokens: list[str]):
    """transformers' LlamaTokenizer from a Llama folder, with Crab's 17 tokens added as its scripts add them
    (the first 11 special, ``<mask_0..5>`` ordinary)."""
    import transformers

    tokenizer = transformers.LlamaTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(list(added_tokens[:11]), special_tokens=True)
    tokenizer.add_tokens(list(added_tokens[11:]), special_tokens=False)
    return tokenizer


def chat_text(tokenizer, instruction: str) -> str:
    """The Llama-2 chat template rendered to text, the BOS token's text first."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": instruction}]
    return tokenizer.apply_chat_template(messages, chat_template=LLAMA2_CHAT_TEMPLATE, add_generation_prompt=True,
                                         tokenize=False)


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """:func:`chat_text`, then ``tokenize`` + ``convert_tokens_to_ids``."""
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(chat_text(tokenizer, instruction)))
