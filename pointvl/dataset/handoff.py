"""Training hand-off: which ``train`` deployment a finished build starts, and with what parameters.

A build that completes can start the training flow (``flows/train.py:train``) on its finished shards
as a deployment run, so training runs on its own (GPU) pool. The build id is the first 12 hex digits
of the build's plan fingerprint: the same input and config always give the same id, and the
training run folder is named after it.

Before a build with a hand-off starts, :func:`check_can_start` makes sure the training job could
start (its weights are on this machine, or the preset needs none), so a doomed training run is
refused in seconds instead of after the build. Each started training run is recorded in
``RUN/reports/handoff.json``: a resume that built nothing new (same build id) does not start it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pointvl.core import io
from pointvl.core.errors import InputError
from pointvl.dataset.plan import fingerprint, load_plan
from pointvl.dataset.run_folder import RunFolder


@dataclass
class HandoffConfig:
    """Start training when a build completes (off by default).

    Args:
        train: start the ``train`` deployment when the build completes.
        deployment: the deployment to start, ``<flow name>/<deployment name>`` (``prefect.yaml``'s
            ``train`` entry).
        train_root: the folder under which each build's training run folder ``<build id>/`` is made
            (default ``RUN/train``).
        preset, variant: the training flow's ``preset`` (``paper`` | ``tiny``) and Table 3 variant.
        overrides: TrainConfig values to change, as the training flow's ``config`` (nested sections,
            e.g. ``{"model": {"checkpoint": "/weights/Qwen2.5-VL-3B-Instruct"}}``).
    """

    train: bool = False
    deployment: str = "train-pointvl/train"
    train_root: str = ""
    preset: str = "paper"
    variant: str = "grca_rpc"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, dict):
            raise ValueError(f"handoff.overrides must be a mapping of TrainConfig sections, got {self.overrides!r}")
        if self.train and "/" not in self.deployment:
            raise ValueError(f"handoff.deployment must be '<flow name>/<deployment name>', got {self.deployment!r}")


def build_id(run_dir: str) -> str:
    """Names what was built: the plan's models (with mesh hashes) and config, so an incremental build
    that adds or changes models gets a new id, and its training run a new folder."""
    return fingerprint(load_plan(run_dir).to_json())[:12]


def train_parameters(run_dir: str, config: HandoffConfig, build_flow_run_id: str = "") -> dict:
    """The ``train`` flow's parameters for this build's finished shards."""
    root = config.train_root or io.join(run_dir, "train")
    return {
        "shards": RunFolder.of(run_dir).shards,
        "build_id": build_id(run_dir),
        "run_dir": io.join(root, build_id(run_dir)),
        "preset": config.preset,
        "variant": config.variant,
        "config": config.overrides or None,
        "build_flow_run_id": build_flow_run_id,
    }


def check_can_start(config: HandoffConfig) -> None:
    """Raise :class:`InputError` (one line, prefixed ``handoff:``) when the hand-off's training job could not
    start here (:func:`pointvl.train.config.preflight`: weights present, or a preset that needs none)."""
    from pointvl.train.config import preflight, preset_config

    try:
        preflight(preset_config(config.preset, config.variant, config.overrides))
    except (TypeError, ValueError) as err:
        raise InputError(f"handoff (preset {config.preset!r}): {err}; set handoff.overrides, use handoff.preset "
                         "tiny, or set handoff.train false") from err


def started_run(run_dir: str, bid: str) -> str | None:
    """The training flow run already started for build ``bid``, if any."""
    folder = RunFolder.of(run_dir)
    if not io.exists(folder.handoff):
        return None
    return io.read_json(folder.handoff).get(bid, {}).get("flow_run_id")


def record_start(run_dir: str, bid: str, flow_run_id: str, deployment: str) -> None:
    folder = RunFolder.of(run_dir)
    records = io.read_json(folder.handoff) if io.exists(folder.handoff) else {}
    records[bid] = {"flow_run_id": flow_run_id, "deployment": deployment}
    io.write_json(folder.handoff, records)
