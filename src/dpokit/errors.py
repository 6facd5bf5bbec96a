"""The one error type users see.

Anything the user can fix (a bad flag, a missing file, a malformed record) is raised as `DPOError` with a
one-line message that names the place (file, line, field) and what to do. The CLI prints it as one line and
exits with status 2; everything else is a bug and keeps its traceback.
"""


class DPOError(Exception):
    """A user-facing, one-line error: what is wrong, where, and what to do about it."""

    exit_code = 2


class TrainingFailure(DPOError):
    """Training started but could not go on (non-finite losses, a failed checkpoint write); exit status 1."""

    exit_code = 1
