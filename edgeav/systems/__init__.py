"""The registry: every system edgeav runs, by name. The only module that lists them.

A system's package is imported when it is first asked for, so ``edgeav --help`` and a run
of one system never import another's code.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from edgeav.errors import CheckpointError, OptionError
from edgeav.systems.base import System
from edgeav.weight_files import CONFIG_FILE, converted_system, read_json

# The bundled demo model (an edgeav-converted checkpoint: its config names its system) and clip.
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_CLIP = DEMO_DIR / "demo.mp4"

# name -> package; the package's ``SYSTEM`` is its :class:`System` record.
SYSTEMS = {
    "crab": "edgeav.systems.crab",
    "ullava": "edgeav.systems.ullava",
    "crabplus": "edgeav.systems.crabplus",
    "openavs": "edgeav.systems.openavs",
}


def get_system(name: str) -> System:
    """The system called ``name``; an unknown name gets the list and the closest match."""
    if name not in SYSTEMS:
        close = difflib.get_close_matches(str(name).lower(), SYSTEMS, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"unknown system {name!r}; expected one of {', '.join(SYSTEMS)}.{hint}")
    return importlib.import_module(SYSTEMS[name]).SYSTEM


def demo_system() -> System:
    """The system of the bundled demo model."""
    name = converted_system(DEMO_DIR)
    if name is None:
        raise CheckpointError(f"{DEMO_DIR}: the demo model is not installed; pass --checkpoint DIR")
    return get_system(name)


def system_of_preset(preset: str, system: str | None = None) -> System:
    """The system a preset belongs to (``system`` when given, which must own it)."""
    candidates = [system] if system is not None else list(SYSTEMS)
    owners = [s for s in map(get_system, candidates) if preset in s.presets]
    if owners:
        return owners[0]
    known = [p for s in map(get_system, candidates) for p in s.presets]
    close = difflib.get_close_matches(preset, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = f"system {system!r}" if system is not None else "any system"
    raise OptionError(f"unknown preset {preset!r} for {where}; expected one of {', '.join(known)}.{hint}")


def system_of_checkpoint(folder: str | Path, system: str | None = None) -> System:
    """The system whose checkpoint ``folder`` holds; ``system`` (``--system``) settles an ambiguous folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; check the path")
    if (folder / "manifest.json").is_file():
        raise CheckpointError(f"{folder}: is an engine directory (it has manifest.json); pass it with --engine")
    owners = [s for s in map(get_system, SYSTEMS) if s.recognises(folder)]
    if system is not None:
        chosen = get_system(system)
        if owners and chosen not in owners:
            raise CheckpointError(f"{folder}: holds a {' or '.join(s.title for s in owners)} checkpoint, not "
                                  f"{chosen.title}; drop --system {system}")
        return chosen
    if len(owners) == 1:
        return owners[0]
    if owners:
        names = " or ".join(s.name for s in owners)
        raise CheckpointError(f"{folder}: holds checkpoints of {names}; pass --system to pick one")
    config = folder / CONFIG_FILE
    if config.is_file():
        read_json(config, "copy the checkpoint's config.json again")  # an unreadable one is named as such
    layouts = "; ".join(f"{s.title}: {s.released_layout}" for s in map(get_system, SYSTEMS))
    raise CheckpointError(f"{folder}: not a checkpoint of any system edgeav runs (expected an edgeav-converted "
                          f"folder or a released layout: {layouts}); check the path or pass --system")


__all__ = ["DEMO_CLIP", "DEMO_DIR", "SYSTEMS", "System", "demo_system", "get_system", "system_of_checkpoint",
           "system_of_preset"]
