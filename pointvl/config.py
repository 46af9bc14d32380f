"""The build's configuration: one dataclass per component, gathered for the flow and the CLI.

A config file (YAML or JSON) holds one section per component, each with that component's field
names; anything left out keeps the paper's default. Unknown sections or keys are errors that name
the key, so a typo never silently falls back to a default.

```yaml
shard_size: 64
clean: {test_size: 0.25, train_size: null}
render: {width: 256, height: 256}
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pointvl.errors import InputError
from pointvl.handoff import HandoffConfig
from pointvl.stages.annotate import AnnotateConfig
from pointvl.stages.clean import CleanConfig
from pointvl.stages.geometry import GeometryConfig
from pointvl.stages.kpts2d import Kpts2DConfig
from pointvl.stages.refine import RefineConfig
from pointvl.stages.render import RenderConfig
from pointvl.stages.review import ReviewConfig
from pointvl.stages.sample_points import SamplePointsConfig
from pointvl.stages.synthesize import SynthesizeConfig


class ConfigError(InputError):
    """A config file or value is unusable; the message names the key and the fix."""


OPERATIONAL_SECTIONS = ("gpu_deployments", "review", "handoff")


@dataclass
class BuildConfig:
    """Everything one benchmark build needs besides its input and output folders.

    Args:
        shard_size: instances per work shard (DESIGN: 64–512). Fixed once a run is planned.
        gpu_deployments: stage name (``refine``, ``synthesize``) → Prefect deployment that runs it
            on a GPU work pool; stages not listed run in-process.
        review: the human review gate before the shards (off for local builds, on for deployed ones).
        handoff: start the ``train`` deployment when the build completes.
    """

    shard_size: int = 256
    clean: CleanConfig = field(default_factory=CleanConfig)
    sample_points: SamplePointsConfig = field(default_factory=SamplePointsConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    kpts2d: Kpts2DConfig = field(default_factory=Kpts2DConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    review: ReviewConfig = field(default_factory=ReviewConfig)
    handoff: HandoffConfig = field(default_factory=HandoffConfig)
    gpu_deployments: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1, got {self.shard_size}")
        unknown = set(self.gpu_deployments) - {"refine", "synthesize"}
        if unknown:
            raise ConfigError(f"gpu_deployments: unknown stages {sorted(unknown)}; use refine, synthesize")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BuildConfig:
        data = dict(data or {})
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(sections))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            factory = sections[name].default_factory
            if dataclasses.is_dataclass(factory):
                kwargs[name] = _section(name, factory, value)
            else:
                kwargs[name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from err

    @classmethod
    def from_file(cls, path: str) -> BuildConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML/JSON: {err}") from err
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_dict(self) -> dict[str, Any]:
        """The sections that decide what the build writes; operational ones (where GPU stages run,
        the review gate, the training hand-off) can change between a run and its resume."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_SECTIONS}


def _section(name: str, cls: type, value: Any) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {name!r}: {unknown}; known: {sorted(known)}")
    try:
        return cls(**value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name}: {err}") from err
