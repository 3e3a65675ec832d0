"""Errors that end in one clear line for the user (exit 2), as opposed to bugs (exit 1)."""


class UserError(Exception):
    """A mistake the user can fix: bad recipe key, missing file, missing column, unknown label.

    The message is always one line: newlines that come from the user's own values are escaped.
    """

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class RecipeError(UserError):
    """A recipe that does not validate; the message names the file and the key."""


class DataError(UserError):
    """Data that cannot be read as the task describes; the message names the file and, where known, the row."""


class TrainingDiverged(Exception):
    """The loss became non-finite; the last good checkpoint is kept."""


class Interrupted(Exception):
    """Training stopped by a signal after finishing its step and saving; exits with 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line, for one-line error messages (its type where it says nothing)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
