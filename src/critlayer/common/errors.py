"""The one exception critlayer raises for bad input: the CLI prints it as a single line."""


class CritlayerError(Exception):
    """A problem the user can fix (bad model, probes, options); its message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message, for a one-line CritlayerError."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
