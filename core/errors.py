"""Errors a user can cause. The CLI prints them as one line and exits 1; bugs still raise."""

from __future__ import annotations


class MemauditError(Exception):
    """A problem with the user's input or environment, stated in one sentence that says what to do."""


class WorkspaceError(MemauditError):
    pass


class ImageError(MemauditError):
    pass


class ModelError(MemauditError):
    pass


class InputError(MemauditError):
    pass
