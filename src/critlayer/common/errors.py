"""The one exception critlayer raises for bad input: the CLI prints it as a single line."""


class CritlayerError(Exception):
    """A problem the user can fix (bad model, probes, options); its message is one line."""


def require_at_least(options, **minimums: int) -> None:
    """Refuse the first option (a config field, named as its CLI flag) below its minimum; None means unset."""
    for name, least in minimums.items():
        value = getattr(options, name)
        if value is not None and value < least:
            raise CritlayerError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def first_line(exc: BaseException) -> str:
    """The first line of a library's error message, for a one-line CritlayerError."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
