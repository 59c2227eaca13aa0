"""Crab+'s prompt wording, character for character as its dataset code builds it for evaluation
(GeWu-Lab/Crab_Plus ``dataset/qwen2_5_omni/omni_dataset.py``, ``OmniTestDataset``): the model was
fine-tuned on these strings, so a changed space or quote is a different prompt.

A user turn is a list of parts: a leading text naming the media, the media blocks, then the
instruction. :mod:`edgeav.systems.crabplus.tasks` says which parts each task uses.
"""

from __future__ import annotations

# The thinker's system turn (the same for every task).
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)

# Leading texts: the first part of the user turn.
VIDEO_AND_AUDIO = "This is a video and an audio:"
IMAGE_AND_AUDIO = "This is an image and an audio:"

# Instructions: the last part of the user turn. {question} and {expression} are filled in.
AVE = "Please describe the events and time range that occurred in the video."
AVVP = (
    "Please determine the events that occur based on the visual and audio information in the video, as well as "
    "the start and end times of these events."
)
AVQA = "Please answer this question: {question}"
EMOTION = "Please judge the person's emotion at the moment."
ARIG = "Please recognize the category of object that makes the sound and then output its bounding box."
# S4 and MS3 share it.
SEGMENT = (
    "Please identify the category of the object producing the sound in the video frame. Then, provide the bounding "
    "box and three pixel points of the object that is making the sound within the frame."
)
# The expression is lower-cased before it is put between <des> tags (the authors' ``exp.lower()``).
REF_AVS = (
    "Please analyze the video frame and audio to find the object described as <des>{expression}</des>. Answer "
    'with "true" or "false" whether the object exists. If it exists, respond with a sentence identifying the '
    "object's name, its bounding box, and three pixel points; if not, state that the object is absent."
)
# edgeav's free question: the user's words verbatim (no instruction of the authors').
ASK = "{question}"
