"""Strict loading of config dataclasses, and the values that decide what a run writes.

Every entry point (the CLI, the flows and their deployments, training) builds its config through
:func:`load`: a section is a mapping of its dataclass's field names, an unknown key or a value of the
wrong type is an error naming it, and anything left out keeps its default. Files are read with
:func:`read_file`; overrides in dotted paths (``--set sft.max_steps=6``, a flow's ``overrides``) become
sections with :func:`nest` and meet their base (a file, a preset, a deployment's parameters) with
:func:`merge`; :func:`check` checks overrides alone, before they meet a base.

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

from pointvl.core import io
from pointvl.core.errors import InputError

OPERATIONAL = {"operational": True}
"""Metadata of a field that does not change what a build writes: ``field(default=..., metadata=OPERATIONAL)``."""


class ConfigError(InputError):
    """A config file or value is unusable; the message names the key and the fix."""


def load(cls: type, data: dict[str, Any] | None, where: str = "") -> Any:
    """``cls`` built from plain ``data``; a field whose default is a config dataclass is a section, loaded alike.

    ``where`` is the dotted path of ``data`` in the whole config (``"render"``), for the messages.
    """
    data = dict(data or {})
    check(cls, data, where)
    return _build(cls, data, where)


def check(cls: type, data: dict[str, Any], where: str = "") -> None:
    """Raise :class:`ConfigError` naming the first key of plain ``data`` that ``cls`` lacks or types otherwise,
    sections checked alike. Nothing is built: overrides are checked before they are merged into a base."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        if where:
            paths = [f"{where}.{k}" for k in unknown]
            raise ConfigError(f"unknown keys in {where!r}: {paths}; known: {sorted(fields)}")
        raise ConfigError(f"unknown config keys {unknown}; known: {sorted(fields)}")
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        check_type(value, str(fields[name].type), path, fields[name].default)
        section = _section(fields[name])
        if section is not None and not dataclasses.is_dataclass(value):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {path!r} must be a mapping, got {value!r}")
            check(section, value, path)


def _section(f: dataclasses.Field) -> type | None:
    """The config dataclass of a section field (one whose default is made by a dataclass), else None."""
    return f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[return-value]


def _sections(cls: type) -> dict[str, type | None]:
    """Field name of ``cls`` -> its section's dataclass, None where the field is not a section."""
    return {f.name: _section(f) for f in dataclasses.fields(cls)}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value, section = data[f.name], _section(f)
            if section is not None and isinstance(value, dict):
                value = _build(section, value, f"{where}.{f.name}" if where else f.name)
            kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}" if where else str(err)) from err
    check_types(obj, f"{where}." if where else "")
    return obj


def nest(cls: type, overrides: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Overrides of ``cls`` with dotted keys made sections: ``{"sft.max_steps": 6, "grpo": {"lam": 0.3}}`` ->
    ``{"sft": {"max_steps": 6}, "grpo": {"lam": 0.3}}``. Dotted and nested keys mix at any depth and a
    later key wins, merged into the sections an earlier one set; the value of a field that is not a
    section (a number, a list, a ``dict[str, str]``) is taken whole, as given."""
    sections = _sections(cls)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad config key {key!r}: use a dotted path of config fields (section.field)")
        head, dot, rest = key.partition(".")
        path = f"{where}.{head}" if where else head
        section = sections.get(head)
        if dot and section is None:
            if head in sections:
                raise ConfigError(f"config key {path}.{rest}: {path} is not a section; give its whole value")
            raise ConfigError(f"unknown config section {path!r} in {path + '.' + rest!r}")
        if dot:
            value = {rest: value}
        if section is not None and isinstance(value, dict):
            value = nest(section, value, path)
            if isinstance(out.get(head), dict):
                value = merge(section, out[head], value)
        out[head] = value
    return out


def merge(cls: type, base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested ``overrides`` of ``cls`` over ``base``: a section's mapping merged at every depth, any other
    value replaced whole (``gpu_deployments: {}`` clears them); neither argument is changed."""
    sections = _sections(cls)
    merged = dict(base)
    for k, v in overrides.items():
        section = sections.get(k)
        both = isinstance(v, dict) and isinstance(base.get(k), dict)
        merged[k] = merge(section, base[k], v) if section is not None and both else v
    return merged


def read_file(path: str) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file (``{}`` for an empty one), local or any fsspec URL;
    :class:`ConfigError` in one line for a missing, unreadable or invalid file, or one not holding a mapping."""
    fs, local = io.filesystem(path)
    if not fs.isfile(local):
        raise ConfigError(f"config file not found: {path}")
    try:
        data = io.read_yaml(path)
    except InputError as err:
        raise ConfigError(str(err)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


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
