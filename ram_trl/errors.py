"""Errors ram-trl reports to its users.

Every message names what is wrong and where (file, tensor, parameter), so that a user can fix the
input without reading a traceback. Anything else that escapes is a bug in ram-trl.
"""

from __future__ import annotations

import os


class RAMError(Exception):
    """Base class of the errors ram-trl raises on purpose."""


class InputError(RAMError, ValueError):
    """An input model, snapshot, recipe or parameter is invalid. Nothing has been written."""


class OutputExistsError(InputError, FileExistsError):
    """The output folder exists (or another process published it first) and overwriting was not
    asked for. Concurrent writers catch this to choose another name."""


class OutputError(RAMError, OSError):
    """Writing an output failed in the environment (full disk, read-only or missing folder,
    permissions). Whatever was half written has been removed before this is raised."""


def describe_os_error(error: OSError) -> str:
    """``strerror [errno N] (path)``: the cause of an OSError in words a user can act on."""
    cause = error.strerror or str(error)
    if error.errno is not None:
        cause += f" [errno {error.errno}]"
    if error.filename is not None:
        cause += f" ({os.fsdecode(error.filename)})"
    return cause


class RankError(RAMError):
    """Another rank of a job split across processes failed (its message is in this one): every
    rank stops together, none waits forever at a collective."""
