"""The one exception critlayer raises for bad input: the CLI prints it as a single line."""


class CritlayerError(Exception):
    """A problem the user can fix (bad model, probes, options); its message is one line."""
