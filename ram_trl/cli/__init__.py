"""The ``ram-trl`` command line (also ``python -m ram_trl``): :func:`main` and :func:`build_parser`.

Each command family is a module with an ``add_parser(subparsers)`` that registers its commands
and sets ``func`` on them: :mod:`~ram_trl.cli.demo` (``demo``), :mod:`~ram_trl.cli.merge`
(``merge``, ``methods``), :mod:`~ram_trl.cli.probe` (``probe``), :mod:`~ram_trl.cli.snapshot`
(``snapshot``, ``store``), :mod:`~ram_trl.cli.watch` (``watch``).
Adding a family is one line in ``COMMANDS``. Imports stay lean (no torch, no transformers) until
a command runs, so ``--help`` is instant and start-up does not eat into merge time. Library code
never imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: modules with an ``add_parser(subparsers)``, in the order ``--help`` lists their commands
COMMANDS = (
    "ram_trl.cli.demo",
    "ram_trl.cli.merge",
    "ram_trl.cli.probe",
    "ram_trl.cli.snapshot",
    "ram_trl.cli.watch",
)


def build_parser() -> argparse.ArgumentParser:
    from ram_trl import __version__

    parser = argparse.ArgumentParser(
        prog="ram-trl", description="Reinforced Agent Merging (RAM/RAM+) for RL-trained agents."
    )
    parser.add_argument("--version", action="version", version=f"ram-trl {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks in the heap instead of returning them to the kernel.

    A merge allocates and frees the same few chunk-sized float32 buffers thousands of times;
    by default glibc unmaps each one and the next is page-faulted in afresh (about 20 ms per
    32 MiB on a small VM). Reusing them makes merging 2-3x faster, and peak memory stays that of
    the few live chunks. Process-wide, so only the ``ram-trl`` command does it, never the library
    inside a user's process. Returns False where glibc's ``mallopt`` is not available.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 1 << 30) == 1
    return mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok


def _one_line_warnings() -> None:
    """Show library warnings as ``ram-trl: warning: ...`` lines, like the errors: the command's
    user needs the message, not the module and line that raised it."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"ram-trl: warning: {message}", file=sys.stderr if file is None else file)

    warnings.showwarning = show


def main(argv: Sequence[str] | None = None) -> int:
    from ram_trl.errors import RAMError, describe_os_error

    args = build_parser().parse_args(argv)
    if argv is None:  # the ram-trl process itself, not a caller's
        keep_freed_memory()
        _one_line_warnings()
    try:
        return args.func(args)
    except RAMError as error:
        print(f"ram-trl: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment (a full disk, a vanished folder): not a bug
        print(f"ram-trl: error: {describe_os_error(error)}", file=sys.stderr)
        return 2
