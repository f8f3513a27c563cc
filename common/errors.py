"""The one base class of problems a user can fix: a config value, a file, an input.

Entry scripts catch UserError at the top and print `error: <message>` with exit code 2; any other exception is
a bug and keeps its traceback. Every subclass's message names the thing that is wrong and what would be right.
"""


class UserError(ValueError):
    """A bad config value, file or input; the message says what is wrong and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""
