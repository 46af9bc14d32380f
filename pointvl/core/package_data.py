"""Files shipped with the package: prompt templates, JSON Schemas, configs.

The prompts and schemas a user edits sit at the top of the repository (``prompts/``, ``schemas/``) and install
as ``pointvl.prompts`` and ``pointvl.schemas`` (``setup.py``); found through :mod:`importlib.resources`, so an
installed wheel, an editable install and a checkout find the same files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def prompts_root() -> Path:
    """The folder of versioned prompt templates, one subfolder per stage (``annotate/``, ``refine/``, ...)."""
    return Path(str(files("pointvl.prompts")))


def schema_path(name: str) -> Path:
    """A JSON Schema of the package, e.g. ``schema_path("record.schema.json")``."""
    return Path(str(files("pointvl.schemas") / name))


def config_path(name: str) -> Path:
    """A default config of the package, e.g. ``config_path("views.yaml")``."""
    return Path(str(files("pointvl") / "configs" / name))
