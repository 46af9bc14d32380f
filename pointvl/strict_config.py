"""Strict loading of config dataclasses, and the values that decide what a run writes.

Every entry point (the CLI, the flows and their deployments, training) builds its config through
:func:`load`: a section is a mapping of its dataclass's field names, an unknown key or a value of the
wrong type is an error naming it, and anything left out keeps its default.

**Which settings fingerprint a run.** :func:`output_values` keeps a field only when it decides
outputs and differs from its default. Fields marked ``metadata=OPERATIONAL`` (where GPU stages run,
the review gate, API pacing, key names) never enter it: they may change between a run and its resume.
Leaving defaults out means a release that *adds* a field with a default keeps every existing run
folder's plan fingerprint and stage keys. The rule it asks of us in return: an existing field's
default never changes in place (that would change outputs under an unchanged fingerprint); add a
new field or a new version value instead. ``tests/test_config_evolution.py`` holds the defaults to that.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pointvl.errors import InputError

OPERATIONAL = {"operational": True}
"""Metadata of a field that does not change what a build writes: ``field(default=..., metadata=OPERATIONAL)``."""


class ConfigError(InputError):
    """A config file or value is unusable; the message names the key and the fix."""


def load(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """``cls`` built from plain ``data``; a field whose default is a config dataclass is a section, loaded alike.

    ``where`` is the dotted path of ``data`` in the whole config (``"render"``), for the messages.
    """
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        if where:
            raise ConfigError(f"unknown keys in {where!r}: {unknown}; known: {sorted(fields)}")
        raise ConfigError(f"unknown config keys {unknown}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        check_type(value, str(fields[name].type), f"{where}.{name}" if where else name, fields[name].default)
        section = fields[name].default_factory
        if dataclasses.is_dataclass(section) and not dataclasses.is_dataclass(value):
            path = f"{where}.{name}" if where else name
            if not isinstance(value, dict):
                raise ConfigError(f"config section {path!r} must be a mapping, got {value!r}")
            value = load(section, value, path)
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}" if where else str(err)) from err
    check_types(obj, f"{where}." if where else "")
    return obj


def output_values(obj: Any) -> dict[str, Any]:
    """The fields of config ``obj`` that decide outputs and differ from their defaults, sections nested
    (a section left with nothing is left out). See the module docstring for why defaults are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("operational"):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            if nested := output_values(value):
                out[f.name] = nested
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if _plain(value) != _plain(default):
            out[f.name] = value
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists: ``[15, 35]`` read from YAML is the default ``(15.0, 35.0)``."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "int | None": (int, type(None)), "float | None": (int, float, type(None)), "str | None": (str, type(None)),
    "int | float": (int, float), "int | float | None": (int, float, type(None)),
}


def check_type(value: Any, annotation: str, key: str, default: Any = dataclasses.MISSING) -> None:
    """Reject a value of the wrong type for a scalar or list field (``width: "256"``), with the fix.

    Checked before construction too: a section's own checks compare numbers.
    """
    allowed = _SIMPLE_TYPES.get(annotation)
    wrong_bool = isinstance(value, bool) and bool not in (allowed or ()) and annotation != "bool"
    example = f" (default {default!r})" if default is not dataclasses.MISSING else ""
    if allowed is not None and (not isinstance(value, allowed) or wrong_bool):
        hint = " (write the number without quotes)" if isinstance(value, str) and annotation != "str" else ""
        raise ConfigError(f"{key} must be {annotation}{example}, got {value!r}{hint}")
    if annotation.startswith(("list[", "tuple[")) and not isinstance(value, list | tuple):
        raise ConfigError(f"{key} must be a list{example}, got {value!r}")


def check_types(obj: Any, where: str) -> None:
    """Reject a value of the wrong type for a scalar or list field (``shard_size: 2.5``) before any work.

    Dataclasses do not check their annotations; a YAML typo would otherwise fail deep in a stage.
    """
    for f in dataclasses.fields(obj):
        check_type(getattr(obj, f.name), str(f.type), f"{where}{f.name}", f.default)
