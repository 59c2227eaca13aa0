"""What a Crab engine directory holds and how its manifest is checked: the components and precisions, the
graphs' shapes, the system's keys, the receipt. Free of torch, so that opening an engine (its manifest
checked on every load) imports none.

:data:`SYSTEM_EXPORT` is Crab's :class:`~edgeav.engines.spec.SystemExport`: the reading parts from here,
the writing parts (``build``, ``weights``, ``options``, ``receipt``, ``profiles``, which need torch)
from :mod:`edgeav.systems.crab.export`, imported when an export calls them.
"""

from __future__ import annotations

from typing import Callable

from edgeav.engines.llm_io import llm_shapes
from edgeav.engines.manifest import precision_rows
from edgeav.engines.manifest_schema import ManifestCheck, check_logit_stats
from edgeav.engines.spec import ROLE_LLM, ROLE_REST, SystemExport
from edgeav.systems.crab.config import CrabConfig

COMPONENTS = {"visual": ROLE_REST, "audio": ROLE_REST, "llm": ROLE_LLM, "mask": ROLE_REST}
# The one table that drives validation, --help and the README's table (the rows are the generic precisions
# over Crab's components).
PRECISIONS = precision_rows(COMPONENTS, {
    "fp32": "every component in fp32: the reference's numbers",
    "fp16": "every component in fp16 (inputs and outputs stay fp32)",
    "int8": "encoders and mask decoder int8 (static QDQ, calibrated on the demo world); LLM weights 8-bit "
            "(MatMulNBits), I-LoRA and router fp32 (a TensorRT engine's LLM: fp32)",
    "int4": "LLM weights int4 (MatMulNBits), I-LoRA and router fp32; the rest fp32",
})


def expected_shapes(component: str, config: CrabConfig) -> dict[str, tuple]:
    """The input/output shapes a component's graph has under ``config`` (None: a dynamic or free axis)."""
    llm, vision, seg = config.llm, config.vision, config.seg
    grid, width = vision.grid, llm.hidden_size
    features = (None, vision.hidden_size, grid, grid)
    if component == "visual":
        return {"pixels": (None, 3, vision.image_size, vision.image_size), "visual_tokens": (None, None, width),
                "mask_low": features, "mask_high": features}
    if component == "audio":
        return {"fbank": (None, None, config.audio.mel_bins), "audio_tokens": (None, None, width)}
    if component == "llm":
        return llm_shapes(llm)
    if component == "mask":
        return {"mask_hidden": (1, seg.num_mask_tokens, width), "mask_low": features, "mask_high": features,
                "mask_logits": (1, None, seg.out_res, seg.out_res)}
    raise ValueError(f"no graph shapes for component {component!r}")


def check_layout(manifest: dict, check: ManifestCheck) -> None:
    """Crab's keys: the visual and audio graphs, ``variants`` (each an LLM, an embedding table and
    optionally a mask graph; "joint" always), ``lora``."""
    graphs = manifest["graphs"]
    for name in ("visual", "audio"):
        if graphs.get(name, {}).get("component") != name:
            raise check.refuse("graphs", f"has no {name} graph")
    variants = check.need(manifest, "variants", dict, "")
    if "joint" not in variants:
        raise check.refuse("variants", "has no joint entry")
    for name, entry in variants.items():
        where = f"variants.{name}"
        if not isinstance(entry, dict):
            raise check.refuse(where, f"must be an object, not {check.kind(entry)}")
        check.listed_file(entry, "embed", where)
        for key, component in (("llm", "llm"), ("mask", "mask")):
            graph = check.need(entry, key, str, where, optional=key == "mask")
            if graph is not None and graphs.get(graph, {}).get("component") != component:
                raise check.refuse(f"{where}.{key}", f"{graph!r} names no {component} graph in graphs")
    check.need(manifest, "lora", dict, "", optional=True)


def embed_tables(manifest: dict) -> list[str]:
    return list(dict.fromkeys(variant["embed"] for variant in manifest["variants"].values()))


def check_receipt(receipt: dict, check: ManifestCheck) -> None:
    number = (int, float)
    check.need(receipt, "clips_per_task", int, "receipt")
    check.need(receipt, "greedy_text_agreement", number, "receipt")
    check.need(receipt, "mask_iou_vs_reference", (*number, type(None)), "receipt")
    check_logit_stats(check.need(receipt, "logits", dict, "receipt"), check)
    for task, pair in check.need(receipt, "metrics", dict, "receipt").items():
        where = f"receipt.metrics.{task}"
        if not isinstance(pair, dict):
            raise check.refuse(where, f"must be an object, not {check.kind(pair)}")
        reference, engine = check.need(pair, "reference", dict, where), check.need(pair, "engine", dict, where)
        if not reference or set(reference) != set(engine):
            raise check.refuse(where, "must hold the same metrics for reference and engine")
        for side, values in (("reference", reference), ("engine", engine)):
            for metric in values:
                check.need(values, metric, number, f"{where}.{side}")


def receipt_lines(receipt: dict) -> list[str]:
    """What ``edgeav info`` prints of a Crab receipt."""
    logits = receipt["logits"]
    lines = [f"receipt against the PyTorch reference, {receipt['clips_per_task']} demo clips per task:"]
    if logits:
        lines.append(f"  next-token logits  max |diff| {logits['max_abs_logit_diff']:.3g}, mean |diff| "
                     f"{logits['mean_abs_logit_diff']:.3g}, KL mean {logits['kl_mean']:.3g} (max {logits['kl_max']:.3g}), "
                     f"top-1 agreement {logits['top1_agreement']:.3f} over {logits['steps']} steps")
    else:
        lines.append("  next-token logits  no step compared")
    lines.append(f"  greedy text        identical in {receipt['greedy_text_agreement']:.0%} of runs")
    if receipt.get("mask_iou_vs_reference") is not None:
        lines.append(f"  masks              IoU {receipt['mask_iou_vs_reference']:.3f} against the reference's")
    lines += ["", f"  {'task':<6} {'metric':<20} {'reference':>9} {'engine':>9}"]
    for task, pair in receipt["metrics"].items():
        metric = next(iter(pair["reference"]))
        lines.append(f"  {task:<6} {metric:<20} {pair['reference'][metric]:>9.3f} {pair['engine'][metric]:>9.3f}")
    return lines


def _exporter(name: str) -> Callable:
    """``edgeav.systems.crab.export``'s function ``name``, imported (with torch) when first called."""
    def call(*args, **kwargs):
        from edgeav.systems.crab import export

        return getattr(export, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


SYSTEM_EXPORT = SystemExport(
    system="crab",
    components=COMPONENTS,
    precisions=PRECISIONS,
    config_class=CrabConfig,
    config_from_dict=CrabConfig.from_dict,
    expected_shapes=expected_shapes,
    check_layout=check_layout,
    embed_tables=embed_tables,
    check_receipt=check_receipt,
    receipt_lines=receipt_lines,
    weights=_exporter("weights"),
    options=_exporter("export_options"),
    build=_exporter("build"),
    receipt=_exporter("receipt"),
    profiles=_exporter("profiles_for"),
)


__all__ = ["COMPONENTS", "PRECISIONS", "SYSTEM_EXPORT", "check_layout", "check_receipt", "embed_tables",
           "expected_shapes", "receipt_lines"]
