"""OpenAVS's translator: describer texts in, one object list per frame out (OPENAVS_SPEC.md sections 2, 6, 7).

The five system prompts are the paper's appendix F, stored verbatim in ``prompts/*.txt`` (their hashes go
into engine manifests). The user input follows the paper's examples; the answer contract is one line
``<answer>obj1, obj2</answer>`` per frame. Two translators share one interface: a local LLM's chat
function, or an OpenAI-compatible chat-completions server (an explicit opt-in; nothing leaves the machine
otherwise). What the paper leaves open (alignment of answers to frames, empty answers, the caption form)
is decided here and documented where it is decided.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

from edgeav.errors import OptionError
from edgeav.preprocess.grounding_dino import prepare_caption

__all__ = ["STRATEGIES", "FrameTexts", "HttpTranslator", "LocalTranslator", "Translator", "TranslatorCall",
           "calls", "caption", "check_endpoint", "parse_answers", "prompt_hashes", "raw_caption",
           "run_translation", "system_prompt", "user_input"]

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"

# strategy -> its system prompt's file: basic; prompt, frame and both consistencies; model consistency.
STRATEGIES = {
    "basic": "basic.txt",
    "prompt": "prompt.txt",
    "frame": "frame.txt",
    "prompt_frame": "prompt_frame.txt",
    "model": "model.txt",
}
PER_FRAME_STRATEGIES = ("model",)
CLIP_FRAMES = 10  # the most frames one per-clip call answers  # one call per frame; every other strategy makes one call per clip

MAX_REPLY_BYTES = 1 << 20  # a chat reply past this is no translation

# An answer line, stripped, is exactly this; angle brackets inside make it malformed (two answers on a line).
ANSWER_LINE = re.compile(r"<answer>([^<>]*)</answer>")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise OptionError(f"unknown translator strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


@cache
def system_prompt(strategy: str) -> str:
    """The strategy's system prompt, exactly as its file holds it (one trailing newline included)."""
    _check_strategy(strategy)
    return (PROMPT_DIR / STRATEGIES[strategy]).read_text(encoding="utf-8")


def prompt_hashes() -> dict[str, str]:
    """File name -> sha256 hex of its bytes, for engine manifests: a changed prompt is a different system."""
    return {name: hashlib.sha256((PROMPT_DIR / name).read_bytes()).hexdigest() for name in STRATEGIES.values()}


@dataclass(frozen=True)
class FrameTexts:
    """One frame's describer outputs, each as (label, text); labels (e.g. the Pengi prompt or the model
    name) are for results and debugging, the translator sees only the texts, in this order."""

    audio: list[tuple[str, str]] = field(default_factory=list)
    image: list[tuple[str, str]] = field(default_factory=list)


def user_input(frames: list[FrameTexts], strategy: str) -> str:
    """The translator's user turn in the paper's format for ``strategy``; each text is stripped.

    - basic, frame: ``<frame{i}>\\n{text}\\n</frame{i}>`` per frame, i from 0; a frame with several audio
      texts has them joined with " " (the paper's example shows one text a frame).
    - prompt, prompt_frame: ``<exp{k}>{text}</exp{k}>`` lines, k from 1, between the frame tags.
    - model: exactly one frame (the paper's example describes one image): ``Image agent {j}: {text}`` then
      ``Audio agent {k}: {text}`` (j, k from 0), separated by blank lines.
    Per-clip strategies read audio texts only: image texts there are refused, not silently dropped.
    """
    _check_strategy(strategy)
    if not frames:
        raise ValueError("user_input needs at least one frame")
    if strategy in PER_FRAME_STRATEGIES:
        if len(frames) != 1:
            raise ValueError(f"strategy {strategy!r} translates one frame a call, got {len(frames)}")
        frame = frames[0]
        agents = [f"Image agent {j}: {text.strip()}" for j, (_, text) in enumerate(frame.image)]
        agents += [f"Audio agent {k}: {text.strip()}" for k, (_, text) in enumerate(frame.audio)]
        if not agents:
            raise ValueError("the frame has no describer texts to translate")
        return "\n\n".join(agents)
    if any(frame.image for frame in frames):
        raise OptionError(f"translator strategy {strategy!r} reads audio descriptions only, but the frames carry "
                          "image descriptions: use strategy 'model' or run without the image describer")
    blocks = []
    for i, frame in enumerate(frames):
        if strategy in ("prompt", "prompt_frame"):
            body = "\n".join(f"<exp{k}>{text.strip()}</exp{k}>" for k, (_, text) in enumerate(frame.audio, 1))
        else:
            body = " ".join(text.strip() for _, text in frame.audio)
        blocks.append(f"<frame{i}>\n{body}\n</frame{i}>")
    return "\n".join(blocks)


class TranslatorCall(NamedTuple):
    system: str  # the strategy's system prompt
    user: str  # the user turn
    frames: tuple[int, ...]  # the clip's frame indices the reply answers, in answer order


def calls(frames: list[FrameTexts], strategy: str) -> list[TranslatorCall]:
    """The translator calls a clip needs: for model consistency one a frame; else one per run of at most
    :data:`CLIP_FRAMES` frames (the paper's clips: 5 frames for S4/MS3, 10 for AVSS), so a long video does not
    become one prompt whose answers run past the reply's length."""
    system = system_prompt(strategy)
    if strategy in PER_FRAME_STRATEGIES:
        return [TranslatorCall(system, user_input([frame], strategy), (i,)) for i, frame in enumerate(frames)]
    return [TranslatorCall(system, user_input(frames[start:start + CLIP_FRAMES], strategy),
                           tuple(range(start, min(start + CLIP_FRAMES, len(frames)))))
            for start in range(0, len(frames), CLIP_FRAMES)]


def _objects(content: str) -> list[str]:
    """Comma-separated objects, stripped and lower-cased (GroundingDINO lower-cases its caption anyway);
    an entry with no letter or digit (".", "...") names nothing and is dropped."""
    return [name for name in (part.strip().lower() for part in content.split(","))
            if any(ch.isalnum() for ch in name)]


def parse_answers(text: str, n_frames: int, strategy: str = "basic") -> tuple[list[list[str] | None], list[str]]:
    """A reply's object list for each of ``n_frames`` frames (None: no answer), and notes on what was off.

    Rules (the paper gives the format, not the handling):
    - an answer line is a line that, stripped, is exactly ``<answer>...</answer>`` (tags in lower case, no
      ``<`` or ``>`` inside); any other line mentioning ``<answer>`` is ignored with a note;
    - objects are split on commas, stripped, lower-cased, empty ones dropped; an answer with no objects
      (``<answer></answer>``, ``<answer> , </answer>``) is an empty list, i.e. an empty mask, with a note;
    - per-clip strategies: answer lines are taken in order for frames 0..n-1; too few leave the last frames
      None (empty masks) with a note; too many are noted and only the first n are used;
    - model strategy (``n_frames`` must be 1): the LAST answer line answers, since the reasoning comes first.
    """
    _check_strategy(strategy)
    if n_frames < 1:
        raise ValueError(f"n_frames must be at least 1, got {n_frames}")
    if strategy in PER_FRAME_STRATEGIES and n_frames != 1:
        raise ValueError(f"strategy {strategy!r} answers one frame a call, got n_frames={n_frames}")
    notes: list[str] = []
    contents: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        match = ANSWER_LINE.fullmatch(line.strip())
        if match:
            contents.append(match.group(1))
        elif "<answer>" in line:
            notes.append(f"line {number} is not a well-formed answer line and was ignored: {line.strip()[:80]!r}")
    if strategy in PER_FRAME_STRATEGIES:
        if not contents:
            notes.append("no answer line (empty mask)")
        elif len(contents) > 1:
            notes.append(f"{len(contents)} answer lines; the last one is used")
        contents = contents[-1:]
    elif len(contents) > n_frames:
        notes.append(f"{len(contents)} answer lines for {n_frames} frames; the first {n_frames} are used")
        contents = contents[:n_frames]
    elif len(contents) < n_frames:
        missing = (f"frame {n_frames - 1} gets" if len(contents) == n_frames - 1
                   else f"frames {len(contents)}-{n_frames - 1} get")
        notes.append(f"{len(contents)} answer lines for {n_frames} frames; {missing} no answer (empty mask)")
    answers: list[list[str] | None] = [None] * n_frames
    for i, content in enumerate(contents):
        answers[i] = _objects(content)
        if not answers[i]:
            whose = "the answer" if strategy in PER_FRAME_STRATEGIES else f"frame {i}: the answer"
            notes.append(f"{whose} names no object (empty mask)")
    return answers, notes


def caption(objects: list[str]) -> str:
    """GroundingDINO's caption for an answer: one phrase an object, "car . dog ." (GroundingDINO splits
    phrases at "."; a phrase's own trailing dots are dropped so none ends up empty)."""
    phrases = [" ".join(name.split()).rstrip(".").strip() for name in objects]
    phrases = [phrase for phrase in phrases if phrase]
    if not phrases:
        raise ValueError("no object to ground: an empty answer is an empty mask, not a caption")
    return prepare_caption(" . ".join(phrases) + " .")


def raw_caption(text: str) -> str:
    """A describer's text as the caption (translator "none"): whitespace collapsed, GroundingDINO's rule."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("no describer text to ground: an empty text is an empty mask, not a caption")
    return prepare_caption(text)


class Translator(Protocol):
    def translate(self, system: str, user: str) -> str:
        """The model's reply to one system prompt and user turn."""


class LocalTranslator:
    """A local LLM's chat function, ``chat(system, user) -> reply``, used as the translator."""

    def __init__(self, chat: Callable[[str, str], str]):
        self.chat = chat

    def translate(self, system: str, user: str) -> str:
        return self.chat(system, user)


def _endpoint_parts(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL; anything else is refused with the fix."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as error:
        raise OptionError(f"translator URL {url!r} cannot be parsed ({error}): pass e.g. "
                          "http://127.0.0.1:8000/v1") from None
    if parts.scheme not in ("http", "https"):
        raise OptionError(f"translator URL {url!r} is not http(s): pass the http:// or https:// address of an "
                          "OpenAI-compatible server")
    try:
        port = parts.port
    except ValueError:
        raise OptionError(f"translator URL {url!r} has an invalid port: pass host:port with a port "
                          "from 1 to 65535") from None
    if not parts.hostname:
        raise OptionError(f"translator URL {url!r} names no host: pass e.g. http://127.0.0.1:8000/v1")
    if parts.username or parts.password:
        raise OptionError("the translator URL holds a user name or password: drop them from the URL and give "
                          "the key in EDGEAV_TRANSLATOR_KEY")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def check_endpoint(url: str, timeout_s: float = 5) -> None:
    """Refuse a non-http(s) or host-less URL and make sure something listens there (a TCP connect), so a
    run fails before any model is loaded rather than after."""
    _, host, port = _endpoint_parts(url)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise OptionError(f"translator {url} is not reachable ({_one_line(error)}): start the server or drop "
                          "--translator http") from None


def _one_line(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _server_message(body: bytes) -> str:
    """The error message of an HTTP error body: OpenAI's ``{"error": {"message": ...}}``, else the text."""
    text = body.decode("utf-8", errors="replace")
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return _one_line(text) or "no message"
    message = error.get("message") if isinstance(error, dict) else error
    return _one_line(message or text) or "no message"


class HttpTranslator:
    """An OpenAI-compatible chat-completions server (GPT-4o-mini in the paper), at temperature 0.

    ``url`` is the API base (``.../v1``) or the full ``.../chat/completions`` address. The bearer key is
    read once, here, from the environment variable ``key_env``; without it no Authorization is sent (local
    servers). Every failure is an :class:`OptionError` naming the endpoint and the fix.
    """

    def __init__(self, url: str, *, model: str = "gpt-4o-mini", key_env: str = "EDGEAV_TRANSLATOR_KEY",
                 timeout_s: float = 30):
        _endpoint_parts(url)
        parts = urllib.parse.urlsplit(url)
        path = parts.path.rstrip("/")
        path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        self.endpoint = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
        self.model = model
        self.key_env = key_env
        self.timeout_s = timeout_s
        self._key = os.environ.get(key_env) or None

    def __repr__(self) -> str:  # never shows the key
        return f"HttpTranslator({self.endpoint!r}, model={self.model!r}, timeout_s={self.timeout_s})"

    def translate(self, system: str, user: str) -> str:
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers,
                                         method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = self._read_within(response, deadline)
        except urllib.error.HTTPError as error:
            fix = (f"set {self.key_env} to a valid key" if error.code in (401, 403)
                   else "check the URL, the model name (--translator-model) and the server's log")
            raise OptionError(f"translator {self.endpoint} answered HTTP {error.code}: "
                              f"{_server_message(error.read())}: {fix}") from None
        except TimeoutError:
            raise self._timed_out() from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise self._timed_out() from None
            raise OptionError(f"translator {self.endpoint} is not reachable ({_one_line(error.reason)}): start "
                              "the server or drop --translator http") from None
        except (OSError, http.client.HTTPException) as error:
            raise OptionError(f"translator {self.endpoint} broke off its reply ({type(error).__name__}: "
                              f"{_one_line(error)}): check the server's log and retry") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise self._not_chat(raw, type(error).__name__) from None
        if not isinstance(content, str):
            raise self._not_chat(raw, f"content is {type(content).__name__}")
        return content

    def _read_within(self, response, deadline: float) -> bytes:
        """The reply body, refused when it is not whole by ``deadline`` (a server trickling bytes never trips
        the per-read socket timeout) or grows past :data:`MAX_REPLY_BYTES`."""
        chunks, size = [], 0
        while chunk := response.read1(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError
            if size > MAX_REPLY_BYTES:
                raise OptionError(f"translator {self.endpoint} sent more than {MAX_REPLY_BYTES >> 20} MB: point the "
                                  "URL at a chat-completions server")
        return b"".join(chunks)

    def _timed_out(self) -> OptionError:
        return OptionError(f"translator {self.endpoint} did not answer within {self.timeout_s:g} s: use a faster "
                           "server or model (--translator-model)")

    def _not_chat(self, raw: bytes, problem: str) -> OptionError:
        reply = _one_line(raw.decode("utf-8", errors="replace"), 120)
        return OptionError(f"translator {self.endpoint} sent no chat-completion text ({problem}; reply {reply!r}): "
                           "point the URL at an OpenAI-compatible chat-completions server")


def run_translation(translator: Translator, frames: list[FrameTexts],
                    strategy: str) -> tuple[list[list[str] | None], list[str], list[str]]:
    """Translate a clip: every call of :func:`calls`, each reply parsed for the frames it answers ->
    (answers, notes, the replies as written). Notes from a one-frame call are prefixed with its frame."""
    answers: list[list[str] | None] = [None] * len(frames)
    notes: list[str] = []
    replies: list[str] = []
    for call in calls(frames, strategy):
        reply = translator.translate(call.system, call.user)
        replies.append(reply)
        call_answers, call_notes = parse_answers(reply, len(call.frames), strategy)
        for index, answer in zip(call.frames, call_answers):
            answers[index] = answer
        prefix = f"frame {call.frames[0]}: " if strategy in PER_FRAME_STRATEGIES else ""
        notes += [prefix + note for note in call_notes]
    return answers, notes, replies
