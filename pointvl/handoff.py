"""Training hand-off: which ``train`` deployment a finished build starts, and with what parameters.

A build that completes can start the training flow (``flows/train.py:train``) on its finished shards
as a deployment run, so training runs on its own (GPU) pool. The build id is the first 12 hex digits
of the build's plan fingerprint: the same input and config always give the same id, and the
training run folder is named after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pointvl import io
from pointvl.plan import fingerprint, load_plan
from pointvl.stages.write_shards import shards_dir


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
    """

    train: bool = False
    deployment: str = "train-pointvl/train"
    train_root: str = ""
    preset: str = "paper"
    variant: str = "grca_rpc"

    def __post_init__(self) -> None:
        if self.train and "/" not in self.deployment:
            raise ValueError(f"handoff.deployment must be '<flow name>/<deployment name>', got {self.deployment!r}")


def build_id(run_dir: str) -> str:
    """Names what was built: the plan's models (with mesh hashes) and config, so an incremental build
    that adds or changes models gets a new id, and its training run a new folder."""
    return fingerprint(load_plan(run_dir).to_json())[:12]


def train_parameters(run_dir: str, config: HandoffConfig) -> dict:
    """The ``train`` flow's parameters for this build's finished shards."""
    root = config.train_root or io.join(run_dir, "train")
    return {
        "shards": shards_dir(run_dir),
        "build_id": build_id(run_dir),
        "run_dir": io.join(root, build_id(run_dir)),
        "preset": config.preset,
        "variant": config.variant,
    }
