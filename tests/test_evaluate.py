"""`edgeav eval`: held-out world clips through the whole runtime, scored per task."""

import json

import pytest

from edgeav.cli import main
from edgeav.errors import OptionError
from edgeav.systems.crab.evaluate import evaluate
from edgeav.runtime import Runtime


def test_eval_scores_every_requested_task(tiny_released):
    runtime = Runtime.from_checkpoint(tiny_released)
    result = evaluate(runtime, "demo", n=1, tasks=("ave", "arig", "s4", "avqa"))
    assert set(result.metrics) == {"ave", "arig", "s4", "avqa"}
    assert set(result.metrics["arig"]) == {"iou_at_0.5", "mean_iou"}
    for metrics in result.metrics.values():
        assert all(0.0 <= value <= 1.0 for value in metrics.values())
    with pytest.raises(OptionError, match="not in the demo suite"):
        evaluate(runtime, "demo", n=1, tasks=("ask",))


def test_eval_cli_json(tiny_released, capsys):
    code = main(["eval", "--suite", "demo", "--checkpoint", str(tiny_released), "--n", "1", "--task", "avvp", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    document = json.loads(out)
    assert document["suite"] == "demo" and document["n"] == 1
    assert "segment_f1" in document["metrics"]["avvp"]
