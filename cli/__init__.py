"""Entry point of the ``edgeav`` console script.

User errors (bad input, wrong options) end with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

import typer

from edgeav.errors import EdgeavError

# Typer ships its own copy of click in recent releases and plain click in older
# ones; BadParameter's base is the UsageError of whichever copy is in use.
UsageError = typer.BadParameter.__mro__[1]


def _usage_line(error: Exception) -> str:
    """One line for a usage error, with a close match for an unknown choice."""
    message = " ".join(error.format_message().split()) or "missing command"
    ctx = getattr(error, "ctx", None)
    where = ctx.command_path if ctx is not None else "edgeav"
    # Read the choices from the message itself: the error classes differ across typer releases.
    choice = re.search(r"'([^']*)' is not one of (.*?)\.?$", message)
    if choice:
        close = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
    return f"{where}: {message} (see '{where} --help')"


def _one_line(text: str) -> str:
    """Control characters (a newline in a file name, say) escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _silence_stdout() -> None:
    """The reader went away (``| head``): point stdout at /dev/null so the final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    from edgeav.cli.app import app

    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # undecodable file names still print
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="edgeav", standalone_mode=False)
    except UsageError as e:
        print(_one_line(_usage_line(e)), file=sys.stderr)
        return 2
    except EdgeavError as e:
        print(f"edgeav: error: {_one_line(str(e))}", file=sys.stderr)
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
    except SystemExit as e:
        # typer answers a closed stdout (EPIPE) with exit 1; for `| head` that is success.
        if isinstance(e.__context__, BrokenPipeError):
            _silence_stdout()
            return 0
        raise
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as e:
        if e.filename is None:  # writing our own output failed (a full disk, a closed terminal)
            print(f"edgeav: error: cannot write output ({e.strerror})", file=sys.stderr)
            return 1
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
