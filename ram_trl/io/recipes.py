"""YAML recipes (merge recipes, training configs): read with one clear error, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError


def load_yaml(path: str | os.PathLike, what: str = "recipe") -> Any:
    """The parsed YAML file at ``path``; a missing or malformed one is an InputError naming
    ``what`` it was meant to be and where."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a folder, not a YAML file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {path} is not a text (YAML) file") from None
    except OSError as error:
        raise InputError(f"{what} {path} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise InputError(f"{what} {path} is not valid YAML: {error}") from None
