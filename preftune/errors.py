"""The errors a user can act on. Each carries one line (what is wrong, where, what to do); the CLI prints it
and exits with status 2, never a traceback. Imports nothing, so every layer can raise them.

They are ``ValueError``s, so code that calls the library and catches ``ValueError`` keeps working.
"""


class PreftuneError(ValueError):
    """A mistake the user fixes: the message is the one line the CLI prints (exit status 2)."""


class ConfigError(PreftuneError):
    """A config key or value (or what it points at: a model, a directory, a launcher) the user must fix."""


class DataError(PreftuneError):
    """Bad input data: the message names the file, the line or row and what to do."""


class CheckpointError(PreftuneError):
    """A checkpoint could not be written or read; the message says what to do."""


class NonFiniteError(PreftuneError):
    """The run cannot go on: its loss, gradients or weights are no longer finite."""


class RunLockError(PreftuneError):
    """Another live run uses this output directory."""


class PushError(PreftuneError):
    """``export --push-to-hub`` could not upload; ``user_fixable`` errors (no token, offline mode) exit with
    status 2, the others (the Hub refused or failed) with 1."""

    def __init__(self, message: str, *, user_fixable: bool):
        super().__init__(message)
        self.user_fixable = user_fixable
