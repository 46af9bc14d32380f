"""Optional dependencies (the ``[project.optional-dependencies]`` extras), imported where used.

A missing one raises :class:`MissingExtra` with one message format that names the extra to install;
the CLI prints it as one line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pointvl.core.errors import InputError


class MissingExtra(InputError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtra`: ``"{purpose} needs {module}: pip install 'pointvl[{extra}]'"``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}: pip install 'pointvl[{extra}]'") from err
