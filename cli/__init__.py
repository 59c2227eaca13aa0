"""Entry point of the ``edgeav`` console script.

User errors (bad input, wrong options) end with one line on stderr and exit
code 2, never a traceback. Ctrl-C ends with "edgeav: interrupted" and exit code
130 whenever it comes, start-up included; a second Ctrl-C exits at once.
This module imports nothing heavy before :func:`main` has installed that handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED = "edgeav: interrupted"
_interrupted = False  # our SIGINT handler fired (typer turns the KeyboardInterrupt into a quiet exit code)
_said_interrupted = False


def _say_interrupted() -> None:
    """Print the one line once; on a terminal it starts after the ``^C`` the terminal echoed."""
    global _said_interrupted
    if not _said_interrupted:
        _said_interrupted = True
        start = "\n" if os.isatty(2) else ""
        os.write(2, f"{start}{INTERRUPTED}\n".encode())  # no Python buffer: safe inside a signal handler


def _force_exit(signum, frame) -> None:
    _say_interrupted()
    os._exit(130)


def _interrupt(signum, frame) -> None:
    # The first Ctrl-C unwinds (files close, temporary files go); a second one does not wait for that.
    global _interrupted
    _interrupted = True
    signal.signal(signal.SIGINT, _force_exit)
    raise KeyboardInterrupt


def second_interrupt_forces_exit() -> None:
    """Wrap the SIGINT handler now installed (a graceful stop, say): it runs on the first Ctrl-C only; the
    second exits at once with code 130. Whoever installed it restores its predecessor as usual."""
    graceful = signal.getsignal(signal.SIGINT)
    seen = []

    def handler(signum, frame) -> None:
        if seen:
            _force_exit(signum, frame)
        seen.append(signum)
        if callable(graceful):
            graceful(signum, frame)

    signal.signal(signal.SIGINT, handler)


def _usage_line(error: Exception) -> str:
    """One line for a usage error, with a close match for an unknown choice."""
    import difflib
    import re

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


def one_line(text: str) -> str:
    """Control characters (a newline in a file name, say) escaped, so an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _silence_stdout() -> None:
    """The reader went away (``| head``): point stdout at /dev/null so the final flush is quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    global _interrupted, _said_interrupted
    _interrupted = _said_interrupted = False
    # Only where Python handles SIGINT itself: not off the main thread, nor where it is ignored (nohup, `cmd &`).
    handled = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
    previous = signal.signal(signal.SIGINT, _interrupt) if handled else None
    try:
        code = _main(argv)
    except KeyboardInterrupt:
        code = 130
    finally:
        if handled:
            # Once interrupted, a Ctrl-C during the interpreter's shutdown still exits at once.
            signal.signal(signal.SIGINT, _force_exit if _interrupted else previous)
    if _interrupted:
        _say_interrupted()
        return 130
    return code


def entry() -> None:
    """The ``edgeav`` command and ``python -m edgeav``: :func:`main`, then exit with its code.

    After Ctrl-C the unwinding has already closed files and removed temporary ones, so the process ends
    at once with 130 instead of going through the interpreter's shutdown, where CPython would still turn
    the interrupt into death by SIGINT (exit -2): once its signal handlers are reset (a second Ctrl-C
    landing there), or when the interrupt had escaped an ``exec`` of source text (torch's and dataclasses'
    start-up run many), which CPython remembers even after an ``except`` handled it.
    """
    code = main()
    if _interrupted:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or terminal: nothing more can be said there
                pass
        os._exit(code)
    sys.exit(code)


def _main(argv: list[str] | None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # answered before typer and the commands load
        from edgeav import __version__

        print(f"edgeav {__version__}")
        return 0
    import typer

    from edgeav.cli.app import app
    from edgeav.errors import EdgeavError

    # Typer ships its own copy of click in recent releases and plain click in older
    # ones; BadParameter's base is the UsageError of whichever copy is in use.
    usage_error = typer.BadParameter.__mro__[1]
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")  # undecodable file names still print
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="edgeav", standalone_mode=False)
    except usage_error as e:
        print(one_line(_usage_line(e)), file=sys.stderr)
        return 2
    except EdgeavError as e:
        print(f"edgeav: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # click turns Ctrl-C during a command into its Abort (a RuntimeError).
        if isinstance(e.__cause__, (KeyboardInterrupt, EOFError)):
            _say_interrupted()
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
