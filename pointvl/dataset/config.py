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
from typing import Any

from pointvl.core.errors import check_range
from pointvl.core.strict_config import (
    OPERATIONAL,
    ConfigError,
    check_types,
    load,
    merge,
    nest,
    output_values,
    read_file,
)
from pointvl.dataset.handoff import HandoffConfig
from pointvl.dataset.stages.annotate import AnnotateConfig
from pointvl.dataset.stages.clean import CleanConfig
from pointvl.dataset.stages.geometry import GeometryConfig
from pointvl.dataset.stages.kpts2d import Kpts2DConfig
from pointvl.dataset.stages.refine import RefineConfig
from pointvl.dataset.stages.render import RenderConfig
from pointvl.dataset.stages.review import ReviewConfig
from pointvl.dataset.stages.sample_points import SamplePointsConfig
from pointvl.dataset.stages.synthesize import SynthesizeConfig


@dataclass
class BuildConfig:
    """Everything one benchmark build needs besides its input and output folders.

    Args:
        shard_size: instances per work shard (DESIGN: 64–512). Fixed once a run is planned.
        gpu_deployments: stage name (``refine``, ``synthesize``) → Prefect deployment that runs it
            on a GPU work pool; stages not listed run in-process.
        gpu_workers: GPU workers serving those deployments: a deployed GPU stage starts this many
            flow runs, each over its share of the shards, so each worker loads the model once.
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
    review: ReviewConfig = field(default_factory=ReviewConfig, metadata=OPERATIONAL)
    handoff: HandoffConfig = field(default_factory=HandoffConfig, metadata=OPERATIONAL)
    gpu_deployments: dict[str, str] = field(default_factory=dict, metadata=OPERATIONAL)
    gpu_workers: int = field(default=1, metadata=OPERATIONAL)

    def __post_init__(self) -> None:
        check_types(self, "")
        try:
            check_range("gpu_workers", self.gpu_workers, 1, 1024, 1)
            check_range("shard_size", self.shard_size, 1, 100_000, 256, "DESIGN: 64-512")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.geometry.num_keypoints > self.sample_points.num_points:
            raise ConfigError(f"geometry.num_keypoints ({self.geometry.num_keypoints}) must be <= "
                              f"sample_points.num_points ({self.sample_points.num_points})")
        if self.kpts2d.k != self.geometry.num_keypoints:
            raise ConfigError(f"kpts2d.k ({self.kpts2d.k}) must equal geometry.num_keypoints "
                              f"({self.geometry.num_keypoints}): records hold as many 2D as 3D keypoints")
        unknown = set(self.gpu_deployments) - {"refine", "synthesize"}
        if unknown:
            raise ConfigError(f"gpu_deployments: unknown stages {sorted(unknown)}; use refine, synthesize")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BuildConfig:
        return load(cls, data)

    @classmethod
    def from_parameters(cls, config: dict[str, Any] | None, overrides: dict[str, Any] | None = None,
                        handoff: dict[str, Any] | None = None) -> BuildConfig:
        """The config of a flow run: ``config``, then ``handoff`` merged key by key into its ``handoff``
        section, then ``overrides`` (dotted ``section.field`` keys, e.g. ``{"review.preview_port": 9000}``),
        through the same strict checks as a file. A deployment's run changes one value this way
        without restating the whole config; the deployment's parameters are never changed."""
        data = _mapping("config", config or {})
        if handoff is not None:
            data = merge(cls, data, {"handoff": _mapping("handoff", handoff)})
        return cls.from_dict(merge(cls, data, nest(cls, _mapping("overrides", overrides or {}))))

    @classmethod
    def from_file(cls, path: str) -> BuildConfig:
        return cls.from_dict(read_file(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def output_dict(self) -> dict[str, Any]:
        """The settings that decide what the build writes and differ from their defaults (the plan
        fingerprint and the stage keys hash them): operational ones (where GPU stages run, the review
        gate, the training hand-off, API pacing) can change between a run and its resume, and a field
        added with a default keeps existing run folders valid (:mod:`pointvl.core.strict_config`)."""
        return output_values(self)


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping, got {value!r}")
    return value
