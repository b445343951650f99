"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class RtqError(Exception):
    """A user-facing error: says what is wrong and what was expected, in one line."""
