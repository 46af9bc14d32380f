"""Files shipped inside the package: prompt templates (``prompts/``), JSON Schemas (``schemas/``), configs.

Found through :mod:`importlib.resources`, so an installed wheel finds them as a checkout does.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def prompts_root() -> Path:
    """The folder of versioned prompt templates, one subfolder per stage (``annotate/``, ``refine/``, ...)."""
    return Path(str(files("pointvl") / "prompts"))


def schema_path(name: str) -> Path:
    """A JSON Schema of the package, e.g. ``schema_path("record.schema.json")``."""
    return Path(str(files("pointvl") / "schemas" / name))


def config_path(name: str) -> Path:
    """A default config of the package, e.g. ``config_path("views.yaml")``."""
    return Path(str(files("pointvl") / "configs" / name))
