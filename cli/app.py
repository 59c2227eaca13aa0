"""The ``edgeav`` command line: parses options, calls the library, prints results.

The typer app is :data:`edgeav.cli.common.app`; importing the command modules below registers their
commands on it, in the order ``edgeav --help`` lists them. Torch-free at import, like each of them.
"""

from __future__ import annotations

from edgeav.cli.common import app

# Registration order is the order of --help; keep these in it.
from edgeav.cli import media  # noqa: F401 -- probe, make-clip
from edgeav.cli import inference  # noqa: F401 -- run, stream
from edgeav.cli import batch  # noqa: F401 -- batch
from edgeav.cli import models  # noqa: F401 -- synth, convert, eval, export, info
from edgeav.cli import benchmark  # noqa: F401 -- bench

__all__ = ["app"]
