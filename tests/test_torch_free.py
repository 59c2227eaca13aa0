"""A Crab engine runs without torch: ``Runtime.from_engine(dir).run(...)``, its stream and ``edgeav run --engine``
import no torch (checked in fresh interpreters), and give what the PyTorch reference gives.

The numpy pieces that replace torch on that path are compared with torch's own functions, the independent
implementation: the antialiased bicubic resize of CLIP's frames, the bilinear resize of mask logits, the
sampling distribution; the shared token loop gives the same tokens from numpy as from torch.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeav.decoding import generate_numpy
from edgeav.generate import generate, token_probabilities
from edgeav.media import open_source
from edgeav.numpy_ops import NumpyOps
from edgeav.preprocess.clip import CLIP_MEAN, CLIP_STD, clip_pixels
from edgeav.preprocess.resize import resize_bicubic_antialiased, resize_bilinear
from edgeav.runtime import DEMO_CLIP, Runtime
from edgeav.sampling import SAMPLING_PRESETS, Sampling, next_token_numpy, token_probabilities_numpy
from edgeav.systems.crab.onnx_engine import OnnxEngine
from edgeav.torch_ops import TorchOps

ROOT = Path(__file__).resolve().parents[1]
# Every task the demo engine serves, with the options its demo-clip run needs.
TASK_RUNS = {
    "ave": {},
    "avvp": {},
    "avqa": {"question": "What is making the sound?"},
    "arig": {"at_seconds": [1]},
    "s4": {"at_seconds": [1]},
    "ms3": {"at_seconds": [2]},
    "avss": {"at_seconds": [3]},
}
STREAM = {"task": "ave", "window": 5, "stride": 5}


def _demo_size() -> tuple[int, int]:
    """(height, width) of the bundled demo clip's frames."""
    with open_source(DEMO_CLIP) as source:
        return source.info.video.height, source.info.video.width


def _python(code: str, *args, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``code`` (or, without it, ``args`` alone: ``-m edgeav ...``) in a fresh interpreter of this environment."""
    done = subprocess.run([sys.executable, *flags, *(["-c", code] if code else []), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# -- the engine path in a fresh interpreter ----------------------------------------------------------------------

API_RUN = textwrap.dedent("""
    import json, pickle, sys
    from edgeav.runtime import DEMO_CLIP, Runtime

    engine, out, tasks, stream = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    runtime = Runtime.from_engine(engine, threads=1)
    results = {task: runtime.run(DEMO_CLIP, task, **options) for task, options in tasks.items()}
    with runtime.stream(DEMO_CLIP, stream["task"], window=stream["window"], stride=stream["stride"]) as windows:
        texts = [w.result.text for w in windows]
    for result in results.values():
        result.frames, result.timings_ms = {}, {}
    with open(out, "wb") as file:
        pickle.dump({"results": results, "stream": texts, "torch": sorted(m for m in sys.modules
                                                                          if m.split(".")[0] == "torch")}, file)
""")


@pytest.fixture(scope="module")
def engine_runs(demo_engine, tmp_path_factory):
    """Every task and a stream run through the Python API on the demo engine, in an interpreter of their own."""
    out = tmp_path_factory.mktemp("torch-free") / "runs.pkl"
    _python(API_RUN, demo_engine, out, json.dumps(TASK_RUNS), json.dumps(STREAM))
    with open(out, "rb") as file:
        return pickle.load(file)


def test_the_python_api_runs_an_engine_without_importing_torch(engine_runs):
    assert engine_runs["torch"] == []
    assert set(engine_runs["results"]) == set(TASK_RUNS)


@pytest.fixture(scope="module")
def demo():
    return Runtime.demo()


@pytest.mark.parametrize("task", TASK_RUNS)
def test_every_task_on_the_engine_answers_as_the_reference(engine_runs, demo, task):
    engine = engine_runs["results"][task]
    reference = demo.run(DEMO_CLIP, task, **TASK_RUNS[task])
    assert engine.text == reference.text
    assert engine.events == reference.events
    assert engine.answer == reference.answer and engine.object_label == reference.object_label
    assert (engine.box is None) == (reference.box is None)
    if engine.box is not None:
        np.testing.assert_allclose(engine.box, reference.box)
    assert [m.time_s for m in engine.masks] == [m.time_s for m in reference.masks]
    for ours, theirs in zip(engine.masks, reference.masks):
        assert ours.mask.shape == theirs.mask.shape and ours.mask.dtype == theirs.mask.dtype
        assert (ours.mask == theirs.mask).mean() > 0.999
    if task in ("s4", "ms3", "avss"):
        assert engine.masks, f"{task}: no mask to compare"


def test_the_engine_gives_the_same_results_with_torch_loaded(engine_runs, demo_engine):
    """The torch-free process and this one (torch loaded) run the same engine path, to the bit."""
    runtime = Runtime.from_engine(demo_engine, threads=1)
    for task, options in TASK_RUNS.items():
        here, there = runtime.run(DEMO_CLIP, task, **options), engine_runs["results"][task]
        assert (here.text, here.events, here.box, here.notes) == (there.text, there.events, there.box, there.notes)
        assert all((a.mask == b.mask).all() for a, b in zip(here.masks, there.masks))


def test_an_engine_streams_without_torch_like_the_reference(engine_runs, demo):
    with demo.stream(DEMO_CLIP, STREAM["task"], window=STREAM["window"], stride=STREAM["stride"]) as windows:
        reference = [w.result.text for w in windows]
    assert engine_runs["stream"] == reference and len(reference) == 2


def test_edgeav_run_engine_imports_no_torch(demo_engine, tmp_path):
    """The console command itself (``python -m edgeav``), with Python's import log: no torch module loads."""
    done = _python("", "-m", "edgeav", "run", "--engine", demo_engine, "--task", "s4", "--at", "1", "--json",
                   "--threads", "1", "--out", tmp_path / "masks", flags=("-X", "importtime"))
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "edgeav.systems.crab.onnx_engine" in imported and "onnxruntime" in imported
    assert not [name for name in imported if name.split(".")[0] == "torch"]
    cli = json.loads(done.stdout)
    reference = Runtime.from_engine(demo_engine, threads=1).run(DEMO_CLIP, "s4", at_seconds=[1])
    assert cli["text"] == reference.text and cli["task"] == "s4"
    assert len(list((tmp_path / "masks").iterdir())) == len(reference.masks) == 1


# -- the shared token loop: numpy and torch give the same tokens --------------------------------------------------


def test_the_numpy_loop_decodes_the_engine_llm_as_the_torch_loop(demo_engine):
    """The demo engine's LLM decoded twice from a real prompt: through its torch face by :func:`generate` and
    in numpy by :func:`generate_numpy`; greedy tokens, mask states and every step's logits agree exactly."""
    engine = OnnxEngine(demo_engine, threads=1)
    model = engine.variant("avs")
    tokenizer = engine.tokenizer
    ids = tokenizer.encode_chat("Please segment the object making the sound.")
    embeds = model.embed_prompt(ids, {})
    masks = tuple(tokenizer.token_id(f"<mask_{i}>") for i in range(6))
    forced = [*tokenizer.encode("The object is a bell."), *masks, *tokenizer.encode("done")]
    options = {"max_new_tokens": 40, "eos_id": tokenizer.eos_id, "mask_token_ids": masks}
    model.llm.setup_caches(1, 256)
    for extra in ({}, {"forced": forced}):
        numpy_logits, torch_logits = [], []
        ours = generate_numpy(model.llm, embeds, logits_out=numpy_logits, **options, **extra)
        theirs = generate(model.llm, torch.from_numpy(embeds), logits_out=torch_logits, **options, **extra)
        assert ours.token_ids == theirs.token_ids and ours.stopped_by == theirs.stopped_by
        assert len(numpy_logits) == len(torch_logits) >= 1
        assert all((a == b.numpy()).all() for a, b in zip(numpy_logits, torch_logits))
        if extra:
            assert ours.token_ids == forced and len(numpy_logits) == len(forced) + 1
            assert ours.mask_hidden.shape == (6, engine.config.llm.hidden_size)
            assert (ours.mask_hidden == theirs.mask_hidden.numpy()).all()


# -- numpy kernels against torch's -------------------------------------------------------------------------------

RESIZE_SIZES = [(240, 320), (176, 400), (720, 1280), (150, 100), (224, 300), (300, 224), (37, 53), (448, 300)]


def _torch_clip_pixels(frames: np.ndarray, size: int = 224) -> np.ndarray:
    """clip_pixels as torch computes it (edgeav's implementation before it moved to numpy)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0, 255).round_()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std).numpy()


@pytest.mark.parametrize("shape", [*RESIZE_SIZES, "demo"])
def test_antialiased_bicubic_resize_matches_torch(shape):
    height, width = _demo_size() if shape == "demo" else shape
    frames = np.random.default_rng(height * width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    ours = resize_bicubic_antialiased(frames.astype(np.float32), (224, 224), axes=(1, 2))
    theirs = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic",
                           align_corners=False, antialias=True).permute(0, 2, 3, 1).numpy()
    assert np.abs(ours - theirs).max() < 1e-3  # float32 rounding on a 0..255 scale
    pixels, reference = clip_pixels(frames), _torch_clip_pixels(frames)
    level = 1 / 255 / min(CLIP_STD)  # one pixel level, normalised
    assert np.abs(pixels - reference).max() <= level * 1.001
    assert (pixels == reference).mean() > 0.9999


def test_clip_pixels_at_model_size_is_torchs_to_the_bit_and_layout():
    """Frames already at 224 (what Crab's decoding gives): the same values, and the same memory layout, so the
    reference's CLIP sees exactly the tensor it saw when torch normalised the frames."""
    frames = np.random.default_rng(5).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    ours, theirs = clip_pixels(frames), _torch_clip_pixels(frames)
    assert ours.dtype == theirs.dtype == np.float32
    assert (ours == theirs).all() and ours.strides == theirs.strides


MASK_SIZES = [(224, 224), (100, 60), (960, 540), (300, 224), (225, 223), "demo"]


@pytest.mark.parametrize("size", MASK_SIZES)
@pytest.mark.parametrize("classes", [1, 71])
def test_mask_resize_matches_torch(size, classes):
    width, height = _demo_size()[::-1] if size == "demo" else size
    rng = np.random.default_rng(classes * width + height)
    # Smooth logits (upsampled noise) crossing zero often, as a decoder's do.
    logits = resize_bilinear(rng.normal(0, 3, (1, classes, 28, 28)).astype(np.float32), (224, 224))
    ours = resize_bilinear(logits[0], (height, width))
    theirs = F.interpolate(torch.from_numpy(logits), size=(height, width), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=1e-6)  # float32 rounding
    numpy_mask = NumpyOps().mask_at_size(logits, (width, height))
    torch_mask = TorchOps().mask_at_size(torch.from_numpy(logits), (width, height))
    assert numpy_mask.shape == torch_mask.shape == (height, width) and numpy_mask.dtype == torch_mask.dtype
    assert (numpy_mask == torch_mask).mean() > 0.9999
    if classes == 1:
        assert 0.05 < numpy_mask.mean() < 0.95  # both sides of the threshold were tested
    else:
        assert len(np.unique(numpy_mask)) > 10


SAMPLINGS = [SAMPLING_PRESETS["crab"], Sampling(temperature=0.7), Sampling(temperature=1.3, top_k=5),
             Sampling(temperature=0.9, top_p=0.5), Sampling(temperature=0.6, top_k=40, top_p=0.95)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=str)
@pytest.mark.parametrize("vocab", [50, 32000])
def test_sampling_distribution_matches_torch(sampling, vocab):
    logits = np.random.default_rng(vocab).normal(0, 3, vocab).astype(np.float32)
    ours = token_probabilities_numpy(logits, sampling)
    theirs = token_probabilities(torch.from_numpy(logits)[None], sampling)[0].numpy()
    assert ((ours > 0) == (theirs > 0)).all()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


def test_numpy_draws_follow_the_distribution_and_repeat_by_seed():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4, 1e-9], np.float32))
    sampling = Sampling(temperature=1.0, top_k=4)

    def draws(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return [next_token_numpy(logits, sampling, rng) for _ in range(4000)]

    first = draws(0)
    frequencies = np.bincount(first, minlength=5) / len(first)
    np.testing.assert_allclose(frequencies[:4], [0.1, 0.2, 0.3, 0.4], atol=0.03)
    assert frequencies[4] == 0  # cut by top-k
    assert draws(0) == first and draws(1) != first


def test_greedy_picks_the_first_of_equal_maxima_as_torch():
    logits = np.array([0.5, 2.0, 1.0, 2.0], np.float32)
    assert next_token_numpy(logits, SAMPLING_PRESETS["greedy"], None) == int(torch.from_numpy(logits).argmax()) == 1
