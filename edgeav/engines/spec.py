"""What a system tells the generic export and engine code: :class:`SystemExport`.

A system's package builds one record (``edgeav/systems/NAME/export.py``) and hands it out through
its :class:`~edgeav.systems.base.System` record's ``export``. The generic exporter
(:mod:`edgeav.export.exporter`), the manifest checks (:mod:`edgeav.engines.manifest`) and
``edgeav info`` read it and never name a system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

# A component's role decides what a precision makes of it: the LLM, or one of the encoders and decoders.
ROLE_LLM = "llm"
ROLE_REST = "rest"
ROLES = (ROLE_LLM, ROLE_REST)


@dataclass(frozen=True)
class SystemExport:
    """How one system's checkpoints become engine directories, and how its manifests are checked.

    Attributes:
        system: the system's name, written to the manifest's ``system`` field.
        components: component name -> role (``llm`` or ``rest``), in graph order.
        precisions: ``--precision`` name -> :class:`~edgeav.engines.manifest_schema.Precision` over
            ``components`` (:func:`edgeav.engines.manifest.precision_rows`).
        config_class: the model config dataclass; the manifest's ``config`` must have its fields and kinds.
        config_from_dict: the manifest's ``config`` -> the config object.
        expected_shapes: ``(component, config) -> {input or output name: shape}`` (None: a free axis).
        check_layout: ``(manifest, check)`` refuses, through ``check`` (a
            :class:`~edgeav.engines.manifest_schema.ManifestCheck`), a manifest whose system keys are wrong.
        embed_tables: ``manifest -> [file]``: the token embedding tables the engine holds.
        check_receipt: ``(receipt, check)`` refuses a malformed receipt.
        receipt_lines: ``receipt -> [line]``: what ``edgeav info`` prints of it.
        weights: ``loaded -> {name: state dict}``: every tensor the export reads (the source digest).
        options: ``(loaded, variants=, merge_lora=) -> {option: value}``: the system's export options,
            checked (a user error for one it does not take); they key the export cache.
        build: ``(loaded, writer, options) -> {manifest key: value}``: emits every graph through
            ``writer`` (:class:`edgeav.export.exporter.GraphWriter`) and returns the system's manifest keys.
        receipt: ``(loaded, engine_dir, n=, options=, progress=) -> dict``: the fidelity receipt.
        profiles: ``(component, config) -> {input: (min, opt, max) shape}``: TensorRT optimization profiles.
    """

    system: str
    components: Mapping[str, str]
    precisions: Mapping[str, Any]
    config_class: type
    config_from_dict: Callable[[dict], Any]
    expected_shapes: Callable[[str, Any], dict[str, tuple]]
    check_layout: Callable[[dict, Any], None]
    embed_tables: Callable[[dict], list[str]]
    check_receipt: Callable[[dict, Any], None]
    receipt_lines: Callable[[dict], list[str]]
    weights: Callable[[Any], dict[str, dict]]
    options: Callable[..., dict]
    build: Callable[..., dict]
    receipt: Callable[..., dict]
    profiles: Callable[[str, Any], dict]


def system_export(name, where: str | Path) -> SystemExport:
    """The export record of the system called ``name`` (a manifest's ``system`` field), or a one-line
    :class:`~edgeav.errors.CheckpointError` naming ``where`` the name was read."""
    from edgeav.errors import CheckpointError
    from edgeav.systems import SYSTEMS, get_system  # the registry: the one place that lists systems

    if not isinstance(name, str) or name not in SYSTEMS:
        raise CheckpointError(f"{where}: system {name!r} is not one of {', '.join(SYSTEMS)}; export the engine "
                              "again")
    owner = get_system(name)
    if owner.export is None:
        raise CheckpointError(f"{where}: {owner.title} engines cannot be read by this edgeav; run the checkpoint "
                              "instead")
    return owner.export()


__all__ = ["ROLES", "ROLE_LLM", "ROLE_REST", "SystemExport", "system_export"]
