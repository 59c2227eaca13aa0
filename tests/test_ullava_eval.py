"""u-LLaVA's held-out suite (`edgeav eval --suite shapes`) and the RES/REC metrics it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import rig_llm_to_say
from edgeav.cli import main
from edgeav.errors import OptionError
from edgeav.metrics import box_iou, box_precision, mask_box, mask_ciou, mask_giou
from edgeav.results import Mask, Result
from edgeav.runtime import Runtime
from edgeav.systems.ullava.checkpoints import synthesize
from edgeav.systems.ullava.evaluate import (COLOURS, SHAPES_SEED, evaluate, run_forced, score,
                                            shapes_case, summarise, written_suite)


def _mask(shape, *boxes) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for top, left, bottom, right in boxes:
        mask[top:bottom, left:right] = True
    return mask


# -- metrics on hand-made masks ------------------------------------------------------------------------------


def test_giou_and_ciou_of_hand_made_masks():
    shape = (10, 10)
    pairs = [
        (_mask(shape, (0, 0, 2, 2)), _mask(shape, (0, 0, 2, 4))),  # I 4, U 8: IoU 0.5
        (_mask(shape), _mask(shape, (5, 5, 7, 10))),  # nothing predicted: I 0, U 10
        (_mask(shape), _mask(shape)),  # nothing to find, nothing found: IoU 1, adds nothing to cIoU
        (_mask(shape, (9, 0, 10, 5)), _mask(shape)),  # a mask where there is nothing: I 0, U 5
    ]
    predicted, truth = zip(*pairs)
    assert mask_giou(predicted, truth) == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert mask_ciou(predicted, truth) == pytest.approx(4 / (8 + 10 + 0 + 5))
    # cIoU weighs masks by their size, gIoU each mask alike.
    big, small = (_mask((20, 20), (0, 0, 20, 20)), _mask((20, 20), (0, 0, 20, 10))), (_mask(shape), _mask(shape, (0, 0, 1, 1)))
    assert mask_ciou(*zip(big, small)) == pytest.approx(200 / 401)
    assert mask_giou(*zip(big, small)) == pytest.approx(0.25)
    assert mask_giou([_mask(shape)], [_mask(shape)]) == 1.0 and mask_ciou([_mask(shape)], [_mask(shape)]) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        mask_giou([_mask((4, 4))], [_mask((4, 5))])
    with pytest.raises(ValueError, match="as many"):
        mask_ciou([_mask(shape)], [])


def test_rec_precision_counts_boxes_above_half_overlap():
    # 0.5 exactly is not above 0.5 (the REC script counts IoU > 0.5); a missing box is IoU 0.
    ious = [box_iou([0, 0, 10, 10], [0, 0, 10, 20]), 0.51, 0.9, box_iou(None, [0, 0, 1, 1])]
    assert ious[0] == 0.5 and ious[3] == 0.0
    assert box_precision(ious) == 0.5
    assert box_precision(ious, threshold=0.0) == 0.75
    with pytest.raises(ValueError):
        box_precision([])


# -- the suite's pictures ------------------------------------------------------------------------------------


def test_shapes_cases_are_drawn_from_their_seed_and_name_one_shape():
    for seed in range(SHAPES_SEED, SHAPES_SEED + 20):
        case, again = shapes_case(seed), shapes_case(seed)
        assert np.array_equal(case.picture, again.picture) and case.expression == again.expression
        colour, kind = case.expression.split()
        # The named shape is painted in its colour, alone in that colour, and its box encloses it.
        assert case.mask.any() and np.all(case.picture[case.mask] == COLOURS[colour])
        assert not np.any(np.all(case.picture[~case.mask] == COLOURS[colour], axis=-1))
        assert case.box == mask_box(case.mask)
        x1, y1, x2, y2 = (int(v) for v in case.box)
        assert case.mask[y1:y2 + 1, x1:x2 + 1].sum() == case.mask.sum()
        if kind == "square":
            assert case.mask.sum() == (x2 - x1 + 1) * (y2 - y1 + 1)
    assert len({shapes_case(s).expression for s in range(SHAPES_SEED, SHAPES_SEED + 20)}) > 5


def test_a_perfect_answer_scores_one_and_a_missing_one_zero():
    case = shapes_case(SHAPES_SEED)
    perfect = Result(task="res", text="", masks=[Mask(0.0, case.mask.copy(), "")], box=list(case.box))
    empty = Result(task="res", text="")
    for task in ("res", "rec"):
        scores: dict = {}
        score(task, case, perfect, case.mask.copy(), scores)
        assert set(summarise(task, scores).values()) == {1.0}
        scores = {}
        score(task, case, empty, None, scores)
        assert set(summarise(task, scores).values()) == {0.0}


# -- the runs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return Runtime(synthesize("ullava-tiny", seed=0))


def test_the_forced_protocol_decodes_the_mask_the_pipeline_decodes():
    """Fed the [SEG] a model writes, the benchmarks' protocol gives the pipeline's own mask, pixel for pixel."""
    loaded = synthesize("ullava-tiny", seed=1)
    rig_llm_to_say(loaded, ["[SEG]"])
    runtime = Runtime(loaded)
    with written_suite(1) as cases:
        (case, path), = cases
        answer = runtime.run(path, "res", expression=case.expression)
    forced = run_forced(runtime, case.picture, case.expression, forced=[runtime.config.token_id("[SEG]")])
    assert answer.masks and forced.mask is not None and forced.mask.shape == case.mask.shape
    assert np.array_equal(answer.masks[0].mask, forced.mask)


def test_eval_scores_res_and_rec_with_numbers_in_0_1(tiny):
    result = evaluate(tiny, "shapes", n=2)
    assert result.suite == "shapes" and result.n == 2
    assert set(result.metrics["res"]) == {"ciou", "giou", "ciou_forced", "giou_forced"}
    assert set(result.metrics["rec"]) == {"prec_at_0.5", "mean_iou", "prec_at_0.5_forced", "mean_iou_forced"}
    for metrics in result.metrics.values():
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    # Random weights never write [SEG]: generated masks are empty and score 0; forced ones are real masks.
    assert result.metrics["res"]["giou"] == 0.0
    assert result.metrics["rec"]["mean_iou_forced"] > 0.0
    with pytest.raises(OptionError, match="not scored by the shapes suite"):
        evaluate(tiny, "shapes", n=1, tasks=("caption",))
    with pytest.raises(OptionError, match="unknown suite 'demo' for u-LLaVA"):
        evaluate(tiny, "demo", n=1)


def test_eval_cli_json_on_random_weights(capsys):
    code = main(["eval", "--suite", "shapes", "--preset", "ullava-tiny", "--random-weights", "--n", "1", "--task",
                 "res", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    document = json.loads(out)
    assert document["suite"] == "shapes" and document["n"] == 1 and list(document["metrics"]) == ["res"]
    assert "random weights" in " ".join(document["notes"])


@pytest.mark.parametrize("args, needles", [
    (["--suite", "demo", "--preset", "ullava-tiny", "--random-weights"], ["--suite demo", "u-LLaVA", "shapes"]),
    (["--suite", "shapes"], ["--suite shapes", "Crab", "demo"]),  # no model given: the demo model, Crab's
    (["--preset", "ullava-tiny", "--random-weights", "--task", "caption"], ["caption", "res, rec"]),
])
def test_eval_suite_or_task_of_another_system_is_one_line(capsys, args, needles):
    code = main(["eval", "--n", "1", *args])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.slow
def test_an_fp32_engine_scores_what_the_reference_scores(tmp_path, tiny):
    """An fp32 ONNX export of the same weights scores the suite as the PyTorch reference does (about 40 s: an export)."""
    from edgeav.export.exporter import export_engine

    folder = export_engine(tiny.engine, tmp_path / "engine", receipt_n=0)
    engine = Runtime.from_engine(folder)
    reference, exported = evaluate(tiny, "shapes", n=3), evaluate(engine, "shapes", n=3)
    for task in ("res", "rec"):
        for name, value in reference.metrics[task].items():
            if task == "rec" and not name.endswith("_forced"):
                continue  # the engine holds no GroundingDINO: a generated rec box may differ by design
            assert exported.metrics[task][name] == pytest.approx(value, abs=2e-3), (task, name)
    assert exported.metrics["res"]["giou_forced"] > 0
