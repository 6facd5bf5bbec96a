"""The one error type users see.

Anything the user can fix (a bad flag, a missing file, a malformed record) is raised as `DPOError` with a
one-line message that names the place (file, line, field) and what to do. The CLI prints it as one line and
exits with status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class DPOError(Exception):
    """A user-facing, one-line error: what is wrong, where, and what to do about it."""

    exit_code = 2


class TrainingFailure(DPOError):
    """Training started but could not go on (non-finite losses, a failed checkpoint write); exit status 1."""

    exit_code = 1


class ReportedElsewhere(DPOError):
    """The error another process of a torchrun launch has too and reports (rank 0): this process stops with the
    same status and prints nothing, so the line appears once."""


def import_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import an optional dependency, or say in one line which `dpokit[extra]` installs it, e.g.
    "--lora-r needs the peft package: pip install 'dpokit[lora]'"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DPOError(f"{needed_for} needs the {package} package: pip install 'dpokit[{extra}]'") from None
