"""The packages of the wheel: ``pointvl`` and nothing else at the top of site-packages.

The orchestration (``flows/``, ``tasks/``) and what a user edits (``prompts/``, ``schemas/``) sit at the top of
the repository, as the design card lays it out, and install as ``pointvl.flows``, ``pointvl.tasks``,
``pointvl.prompts`` and ``pointvl.schemas`` (setuptools' ``package_dir``; an editable install maps them too).
Everything else is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

TOP_LEVEL = ("flows", "tasks", "prompts", "schemas")

setup(
    packages=find_packages(include=["pointvl", "pointvl.*"]) + [f"pointvl.{name}" for name in TOP_LEVEL],
    package_dir={f"pointvl.{name}": name for name in TOP_LEVEL},
)
