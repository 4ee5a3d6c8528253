"""Errors ram-trl reports to its users.

Every message names what is wrong and where (file, tensor, parameter), so that a user can fix the
input without reading a traceback. Anything else that escapes is a bug in ram-trl.
"""

from __future__ import annotations


class RAMError(Exception):
    """Base class of the errors ram-trl raises on purpose."""


class InputError(RAMError, ValueError):
    """An input model, snapshot, recipe or parameter is invalid. Nothing has been written."""


class OutputExistsError(InputError, FileExistsError):
    """The output folder exists (or another process published it first) and overwriting was not
    asked for. Concurrent writers catch this to choose another name."""
