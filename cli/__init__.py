"""Entry point of the ``edgeav`` console script.

User errors (bad input, wrong options) end with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import difflib
import re
import sys

import typer

from edgeav.errors import EdgeavError

# Typer ships its own copy of click in recent releases and plain click in older
# ones; BadParameter's base is the UsageError of whichever copy is in use.
UsageError = typer.BadParameter.__mro__[1]


def _usage_line(error: Exception) -> str:
    """One line for a usage error, with a close match for an unknown choice."""
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "edgeav"
    # Read the choices from the message itself: the error classes differ across typer releases.
    choice = re.search(r"'([^']*)' is not one of (.*?)\.?$", message)
    if choice:
        close = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
    return f"{where}: {message} (see '{where} --help')"


def main(argv: list[str] | None = None) -> int:
    from edgeav.cli.app import app

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="edgeav", standalone_mode=False)
    except UsageError as e:
        print(_usage_line(e), file=sys.stderr)
        return 2
    except EdgeavError as e:
        print(f"edgeav: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeav: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        # click turns Ctrl-C during a command into its Abort (a RuntimeError).
        if isinstance(e.__cause__, (KeyboardInterrupt, EOFError)):
            print("edgeav: interrupted", file=sys.stderr)
            return 130
        raise
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): nothing more to say
        return 0
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
