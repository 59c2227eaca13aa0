"""Errors a user can act on: each names the input, the problem and the fix."""


class EdgeavError(Exception):
    """Base class of errors caused by the user's input, options or files.

    The CLI prints ``str(error)`` as one line on stderr and exits with code 2.
    """


class MediaError(EdgeavError):
    """A media source cannot be opened or read as asked."""


class OptionError(EdgeavError):
    """An option value is out of range or unknown."""


class CheckpointError(EdgeavError):
    """A checkpoint or engine file is missing, corrupted, or does not fit the model."""
