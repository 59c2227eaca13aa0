"""OpenAVS translator glue: verbatim prompts, the paper's user-input formats, strict answer parsing,
GroundingDINO captions, and the chat-completions client against a real local HTTP server."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgeav.errors import OptionError
from edgeav.systems.openavs import translator as tr
from edgeav.systems.openavs.translator import (STRATEGIES, FrameTexts, HttpTranslator, LocalTranslator, calls,
                                               caption, check_endpoint, parse_answers, prompt_hashes,
                                               raw_caption, run_translation, system_prompt, user_input)

PAPER_PROMPTS = Path("/work/shared/OPENAVS_PROMPTS.md")  # the appendix as extracted; only on the dev machine
PENGI_PROMPTS = ("This is a sound of", "Generate metadata", "Generate audio caption")

# The paper's appendix F examples, one text a frame (basic and frame consistency).
BASIC_TEXTS = [
    "wind is blowing and a car engine is running",
    "rain is falling and the wind is blowing",
    "a motor is running and a car engine is revving.",
    "a car engine is revving up and revving down.",
    "a car engine is running and a car engine is running.",
]
# Three Pengi prompts a frame (prompt consistency), trailing spaces as the paper prints them.
PROMPT_TEXTS = [
    ["wind is blowing and a car engine is running ", "a stream of water is flowing. ",
     "the sounds of water, wind and wind noise (microphone)"],
    ["rain is falling and the wind is blowing.", "a sound is being recorded. ", "wind "],
    ["a motor is running and a car engine is revving.", "engine2. sound of an engine ", "engine "],
    ["a car engine is revving up and revving down.", "engine sound. i recorded a sound from a car engine.",
     "engine "],
    ["a car engine is running and a car engine is running.", "a sound is being played. ", "engine "],
]
IMAGE_TEXT = (
    "The image shows a person with long dark hair wearing a white sleeveless top with a black pattern. They are "
    "are holding a green parrot on their shoulder. The parrot has has a light-colored beak and is perched calmly "
    "on the person's hand. In the background, there is a black metal cage with a white cushion inside, and some "
    "other of the room is visible, including a white wall and a dark-colored object that appears to be a piece "
    "of furniture or a shelf. The overall setting seems to be indoors, possibly in a living room or a similar "
    "space."
)
AUDIO_TEXTS = [
    "The audio contains a single word spoken by a female voice in a neutral tone. The word is 'yes'.",
    "a person is walking on a carpet. someone is making a sound. this audio contains sound events: clothing, "
    "domestic sounds and home sounds.",
]

TASK_LINES = {
    "analyze": "- Analyze the outputs from all audio AIs in each frame together.",
    "relations": "- Consider the relationships among frames.",
    "identify": "- Identify and output only the object(s) producing sound in each frame.",
    "answer": "- For each frame, provide your guess in one line, (seperate by comma if multiple objects), enclosed "
              "in with <answer> and </answer> tag pair.",
}
OPENING = ("You are participating in a competitive game where your goal is to identify the most likely abstract "
           "source(s) (e.g., human, instrumental, etc.) that is/are producing sound in a given audio clip.")
CLOSING = ("Each frame corresponds to a different moment in the same video clip and some frames may contain no "
           "sound-producing objects at all, or the text output could provide misleading information.")


def audio_frames(texts: list[list[str]]) -> list[FrameTexts]:
    return [FrameTexts(audio=list(zip(PENGI_PROMPTS, frame))) for frame in texts]


# ---- prompts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_prompt_files_are_clean_text(strategy):
    raw = (tr.PROMPT_DIR / STRATEGIES[strategy]).read_bytes()
    text = raw.decode("utf-8")
    assert text == system_prompt(strategy)
    assert text.endswith("\n") and not text.endswith("\n\n") and not text.startswith((" ", "\n"))
    lines = text.splitlines()
    assert not any(re.fullmatch(r"[\d\s]+", line) for line in lines if line), "stray PDF line numbers"
    assert all(line == line.strip() for line in lines), "layout indentation or trailing spaces left"
    assert "```" not in text and "\\dots" not in text and "System Prompt for" not in text


@pytest.mark.parametrize("strategy,tasks", [
    ("basic", ["identify", "answer"]),
    ("prompt", ["analyze", "identify", "answer"]),
    ("frame", ["relations", "identify", "answer"]),
    ("prompt_frame", ["analyze", "relations", "identify", "answer"]),
])
def test_per_clip_prompts_hold_the_papers_sentences(strategy, tasks):
    text = system_prompt(strategy)
    assert text.startswith(OPENING) and CLOSING in text and "(seperate by comma" in text
    task_lines = text.split("Your task:\n", 1)[1].splitlines()
    expected = [TASK_LINES[name] for name in tasks]
    if strategy == "frame":  # the paper's frame-consistency prompt lacks this line's full stop
        expected[1] = expected[1].rstrip(".")
    assert task_lines == expected


def test_model_prompt_holds_the_papers_sentences():
    text = system_prompt("model")
    assert text.startswith("You are participating in a competitive game: identify the most likely abstract "
                           "source(s) (e.g., human, animal, instrumental, mechanical) producing sound in a video "
                           "clip - based only on textual descriptions.\n")
    for sentence in [
        "- Multiple image descriptions (Image 0, Image 1, ...). Each is a frame caption or visual summary",
        "- Within- and cross-modality synthesis.\n",
        "it should capture the best generalization of the sound.\n",
        "(e.g., \"Image 2 shows a lawnmower; Audio 1 describes a low rumble similar to lawnmower idling "
        "supports lawnmower\").\n",
        "- Enclose the single-line final answer in '<answer>' and '</answer>' tags and place nothing else on "
        "that line.\n",
    ]:
        assert sentence in text


def _paper_prompt(document: str, title: str) -> str:
    """The appendix's prompt under ``title`` up to "User input:", PDF line numbers and fences dropped."""
    section = document.split(title + "\n", 1)[1].split("\nUser input:", 1)[0]
    kept = [line for line in section.splitlines() if not re.fullmatch(r"[\d\s]*|```", line.strip())]
    return " ".join(" ".join(kept).split())


@pytest.mark.skipif(not PAPER_PROMPTS.is_file(), reason="the extracted appendix is only on the dev machine")
@pytest.mark.parametrize("strategy,title", [
    ("basic", "System Prompt for basic Translator"),
    ("prompt", "System Prompt for Translator with Prompt Consistency"),
    ("frame", "System Prompt for Translator with Frame Consistency"),
    ("prompt_frame", "System Prompt for Translator with Prompt and Frame Consistency"),
    ("model", "System Prompt for Translator with Model Consistency"),
])
def test_prompt_words_equal_the_appendix(strategy, title):
    # Same words in the same order; only line layout differs (and the extraction's LaTeX "\dots" is "...").
    expected = _paper_prompt(PAPER_PROMPTS.read_text(encoding="utf-8"), title).replace("\\dots", "...")
    assert " ".join(system_prompt(strategy).split()) == expected


def test_prompt_hashes_are_the_file_bytes():
    hashes = prompt_hashes()
    assert sorted(hashes) == sorted(STRATEGIES.values())
    assert hashes == prompt_hashes()
    for name, digest in hashes.items():
        assert digest == hashlib.sha256((tr.PROMPT_DIR / name).read_bytes()).hexdigest()
    assert len(set(hashes.values())) == 5


def test_unknown_strategy_is_refused_with_the_choices():
    with pytest.raises(OptionError, match="expected one of basic, prompt, frame, prompt_frame, model"):
        system_prompt("prompts")


# ---- user input and calls ------------------------------------------------------------------------------


BASIC_EXPECTED = (
    "<frame0>\nwind is blowing and a car engine is running\n</frame0>\n"
    "<frame1>\nrain is falling and the wind is blowing\n</frame1>\n"
    "<frame2>\na motor is running and a car engine is revving.\n</frame2>\n"
    "<frame3>\na car engine is revving up and revving down.\n</frame3>\n"
    "<frame4>\na car engine is running and a car engine is running.\n</frame4>"
)
PROMPT_EXPECTED = (
    "<frame0>\n<exp1>wind is blowing and a car engine is running</exp1>\n<exp2>a stream of water is flowing."
    "</exp2>\n<exp3>the sounds of water, wind and wind noise (microphone)</exp3>\n</frame0>\n"
    "<frame1>\n<exp1>rain is falling and the wind is blowing.</exp1>\n<exp2>a sound is being recorded.</exp2>\n"
    "<exp3>wind</exp3>\n</frame1>\n"
    "<frame2>\n<exp1>a motor is running and a car engine is revving.</exp1>\n<exp2>engine2. sound of an engine"
    "</exp2>\n<exp3>engine</exp3>\n</frame2>\n"
    "<frame3>\n<exp1>a car engine is revving up and revving down.</exp1>\n<exp2>engine sound. i recorded a "
    "sound from a car engine.</exp2>\n<exp3>engine</exp3>\n</frame3>\n"
    "<frame4>\n<exp1>a car engine is running and a car engine is running.</exp1>\n<exp2>a sound is being "
    "played.</exp2>\n<exp3>engine</exp3>\n</frame4>"
)


@pytest.mark.parametrize("strategy", ["basic", "frame"])
def test_user_input_one_text_a_frame(strategy):
    assert user_input(audio_frames([[text] for text in BASIC_TEXTS]), strategy) == BASIC_EXPECTED


def test_user_input_joins_several_texts_under_basic():
    frames = audio_frames([["wind ", " a car engine"]])
    assert user_input(frames, "basic") == "<frame0>\nwind a car engine\n</frame0>"


@pytest.mark.parametrize("strategy", ["prompt", "prompt_frame"])
def test_user_input_one_exp_a_prompt(strategy):
    assert user_input(audio_frames(PROMPT_TEXTS), strategy) == PROMPT_EXPECTED


def test_user_input_model_lists_agents():
    frame = FrameTexts(audio=[("qwen2.5-omni", AUDIO_TEXTS[0]), ("pengi", AUDIO_TEXTS[1])],
                       image=[("qwen2.5-omni", IMAGE_TEXT)])
    expected = f"Image agent 0: {IMAGE_TEXT}\n\nAudio agent 0: {AUDIO_TEXTS[0]}\n\nAudio agent 1: {AUDIO_TEXTS[1]}"
    assert user_input([frame], "model") == expected
    with pytest.raises(ValueError, match="one frame a call"):
        user_input([frame, frame], "model")


def test_per_clip_strategy_refuses_image_texts():
    frames = [FrameTexts(audio=[("pengi", "engine")], image=[("vlm", "a car")])]
    with pytest.raises(OptionError, match="use strategy 'model'"):
        user_input(frames, "prompt_frame")


def test_calls_one_per_clip_or_one_per_frame():
    frames = audio_frames(PROMPT_TEXTS)
    (call,) = calls(frames, "prompt_frame")
    assert call == (system_prompt("prompt_frame"), PROMPT_EXPECTED, (0, 1, 2, 3, 4))
    per_frame = calls(frames, "model")
    assert [c.frames for c in per_frame] == [(i,) for i in range(5)]
    assert per_frame[2].system == system_prompt("model")
    assert per_frame[2].user == ("Audio agent 0: a motor is running and a car engine is revving.\n\n"
                                 "Audio agent 1: engine2. sound of an engine\n\nAudio agent 2: engine")


# ---- answers -------------------------------------------------------------------------------------------


def test_parse_answers_in_frame_order():
    reply = "<answer>Car Engine, wind</answer>\n  <answer> wind ,, rain </answer>  \n<answer>engine</answer>"
    answers, notes = parse_answers(reply, 3)
    assert answers == [["car engine", "wind"], ["wind", "rain"], ["engine"]] and notes == []


def test_parse_answers_missing_frames_are_none():
    answers, notes = parse_answers("Here you go:\n<answer>engine</answer>", 3, "prompt")
    assert answers == [["engine"], None, None]
    assert notes == ["1 answer lines for 3 frames; frames 1-2 get no answer (empty mask)"]


def test_parse_answers_extra_lines_keep_the_first():
    answers, notes = parse_answers("<answer>a</answer>\n<answer>b</answer>\n<answer>c</answer>", 2)
    assert answers == [["a"], ["b"]] and notes == ["3 answer lines for 2 frames; the first 2 are used"]


def test_parse_answers_empty_answer_is_an_empty_list():
    answers, notes = parse_answers("<answer></answer>\n<answer> , </answer>", 2)
    assert answers == [[], []]
    assert notes == ["frame 0: the answer names no object (empty mask)",
                     "frame 1: the answer names no object (empty mask)"]


def test_parse_answers_is_strict_about_lines():
    reply = ("frame 0: <answer>dog</answer>\n<answer>a</answer><answer>b</answer>\n<ANSWER>cat</ANSWER>\n"
             "<answer>bird</answer>")
    answers, notes = parse_answers(reply, 1)
    assert answers == [["bird"]]
    assert len(notes) == 2 and notes[0].startswith("line 1 ") and notes[1].startswith("line 2 ")


def test_parse_answers_model_takes_the_last_line():
    reply = ("Image 0 shows a person holding a parrot; Audio 0 describes a female voice saying 'yes'.\n"
             "Audio 1 describes footsteps on a carpet, which no image supports.\n"
             "<answer>parrot</answer>\n"
             "On reflection the voice is the person's.\n"
             "<answer>woman, parrot</answer>\n")
    answers, notes = parse_answers(reply, 1, "model")
    assert answers == [["woman", "parrot"]] and notes == ["2 answer lines; the last one is used"]
    assert parse_answers("no tags at all", 1, "model") == ([None], ["no answer line (empty mask)"])


# ---- captions ------------------------------------------------------------------------------------------


def test_caption_is_groundingdino_phrases():
    assert caption(["car engine", " Wind ", "dog.", "", "  "]) == "car engine . wind . dog ."
    assert caption(["Parrot"]) == "parrot ."
    with pytest.raises(ValueError, match="empty mask"):
        caption([" ", "."])


def test_raw_caption_is_the_describer_text():
    assert raw_caption("  A car engine is\nrunning ") == "a car engine is running."
    assert raw_caption("a motor is running and a car engine is revving.") == \
        "a motor is running and a car engine is revving."
    with pytest.raises(ValueError):
        raw_caption(" \n")


# ---- translators ---------------------------------------------------------------------------------------


def test_an_answer_of_dots_names_nothing():
    answers, notes = parse_answers("<answer>.</answer>\n<answer> . , ... , car </answer>", 2)
    assert answers == [[], ["car"]]
    assert notes == ["frame 0: the answer names no object (empty mask)"]


def test_a_long_video_is_translated_in_clips_of_ten_frames():
    frames = [FrameTexts(audio=[("pengi", f"sound {i}")]) for i in range(23)]
    made = calls(frames, "frame")
    assert [call.frames for call in made] == [tuple(range(0, 10)), tuple(range(10, 20)), tuple(range(20, 23))]
    assert "<frame0>\nsound 10\n</frame0>" in made[1].user and "<frame10>" not in made[1].user


def test_local_translator_answers_a_clip_and_model_frames():
    seen = []

    def chat(system: str, user: str) -> str:
        seen.append((system, user))
        return "<answer>car engine</answer>\n<answer>wind</answer>" if "<frame" in user else "why\n<answer>Engine</answer>"

    frames = audio_frames(PROMPT_TEXTS[:3])
    answers, notes, replies = run_translation(LocalTranslator(chat), frames, "prompt")
    assert len(replies) == 1
    assert answers == [["car engine"], ["wind"], None]
    assert notes == ["2 answer lines for 3 frames; frame 2 gets no answer (empty mask)"]
    assert seen == [(system_prompt("prompt"), user_input(frames, "prompt"))]
    answers, notes, replies = run_translation(LocalTranslator(chat), frames, "model")
    assert len(replies) == len(frames)
    assert answers == [["engine"]] * 3 and notes == [] and len(seen) == 4


class ChatServer:
    """A local chat-completions server: records each request, answers as ``reply(handler)`` says."""

    def __init__(self, reply):
        self.requests: list[tuple[dict, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, dict(self.headers), body))
                status, payload, delay = reply(body)
                time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up, as the timeout test wants

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        # A short poll interval: shutdown() waits for the next poll.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(content) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                        "content": content}}]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_http_translator_speaks_chat_completions(monkeypatch):
    monkeypatch.setenv("TEST_TRANSLATOR_KEY", "sk-test")
    with ChatServer(lambda body: (200, completion("<answer>engine</answer>"), 0)) as server:
        check_endpoint(server.url, timeout_s=2)
        client = HttpTranslator(server.url + "/", model="tiny-llm", key_env="TEST_TRANSLATOR_KEY", timeout_s=5)
        assert client.translate("be brief", "<frame0>\nengine\n</frame0>") == "<answer>engine</answer>"
        assert "sk-test" not in repr(client)
        monkeypatch.delenv("TEST_TRANSLATOR_KEY")
        keyless = HttpTranslator(server.url + "/chat/completions", key_env="TEST_TRANSLATOR_KEY")
        keyless.translate("s", "u")
    (path, headers, body), (path2, headers2, body2) = server.requests
    assert path == path2 == "/v1/chat/completions"
    assert body == {"model": "tiny-llm", "temperature": 0, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "<frame0>\nengine\n</frame0>"}]}
    assert headers["Authorization"] == "Bearer sk-test" and headers["Content-Type"] == "application/json"
    assert "Authorization" not in headers2 and body2["model"] == "gpt-4o-mini"


def test_http_translator_connection_refused():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(OptionError, match=r"^translator http://127\.0\.0\.1:\d+/v1/chat/completions is not "
                                          r"reachable \(.*\): start the server or drop --translator http$"):
        HttpTranslator(url, timeout_s=2).translate("s", "u")


def test_http_translator_timeout():
    with ChatServer(lambda body: (200, completion("late"), 0.6)) as server:
        with pytest.raises(OptionError, match=r"did not answer within 0\.15 s: use a faster server"):
            HttpTranslator(server.url, timeout_s=0.15).translate("s", "u")


def test_http_translator_timeout_bounds_a_trickling_reply():
    """A server that sends a byte every 0.1 s never trips the per-read socket timeout; the total one holds."""

    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps(completion("slow")).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        with pytest.raises(OptionError, match=r"did not answer within 0\.5 s"):
            HttpTranslator(f"http://127.0.0.1:{httpd.server_address[1]}/v1", timeout_s=0.5).translate("s", "u")
        assert time.monotonic() - start < 3  # not the reply's whole trickle (several seconds)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_http_translator_keeps_the_query_and_refuses_credentials():
    translator = HttpTranslator("https://host.example/openai/v1?api-version=2024-10")
    assert translator.endpoint == "https://host.example/openai/v1/chat/completions?api-version=2024-10"
    with pytest.raises(OptionError, match="user name or password") as refused:
        HttpTranslator("http://user:secret@127.0.0.1:8000/v1")
    assert "secret" not in str(refused.value)
    with pytest.raises(OptionError, match="cannot be parsed"):
        check_endpoint("http://[::1")


@pytest.mark.parametrize("status,payload,message", [
    (500, {"error": {"message": "model\noverloaded", "type": "server_error"}},
     r"answered HTTP 500: model overloaded: check the URL, the model name \(--translator-model\) and the server's "
     r"log$"),
    (401, {"error": {"message": "Incorrect API key provided"}},
     r"answered HTTP 401: Incorrect API key provided: set EDGEAV_TRANSLATOR_KEY to a valid key$"),
    (404, b"Not Found", r"answered HTTP 404: Not Found: check the URL"),
    (200, b"<html>not json</html>", r"sent no chat-completion text \(JSONDecodeError; reply '<html>not json"),
    (200, {"choices": []}, r"sent no chat-completion text \(IndexError"),
    (200, completion(None), r"sent no chat-completion text \(content is NoneType"),
])
def test_http_translator_server_errors(status, payload, message):
    with ChatServer(lambda body: (status, payload, 0)) as server:
        with pytest.raises(OptionError, match=message) as caught:
            HttpTranslator(server.url, timeout_s=5).translate("s", "u")
    assert "\n" not in str(caught.value) and server.url in str(caught.value)


@pytest.mark.parametrize("url,message", [
    ("ftp://127.0.0.1/v1", "is not http"),
    ("localhost:8000/v1", "is not http"),
    ("http:///v1", "names no host"),
    ("http://:8000/v1", "names no host"),
    ("http://127.0.0.1:99999/v1", "invalid port"),
])
def test_check_endpoint_refuses_bad_urls(url, message):
    with pytest.raises(OptionError, match=message):
        check_endpoint(url)
    with pytest.raises(OptionError, match=message):
        HttpTranslator(url)


def test_check_endpoint_refuses_a_silent_port():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OptionError, match=r"is not reachable .*: start the server or drop --translator http$"):
        check_endpoint(url, timeout_s=2)
