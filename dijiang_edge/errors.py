"""The one exception type users see: a message that says what is wrong and what to do."""


class DiJiangError(Exception):
    """A problem with the user's input or environment (not a bug): the CLI prints
    its message on one line and exits non-zero instead of a traceback."""
