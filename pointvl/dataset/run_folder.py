"""Every path of a build's run folder, in one place (README "Run folder").

```
RUN/plan.json                                   the shard plan (pointvl.dataset.plan)
RUN/config.json                                 the input and the whole config the build was made with
RUN/build.lock                                  the build holding the folder (pointvl.dataset.runlock)
RUN/cache/clean/<synset>/<model>.json           clean's per-model validation
RUN/cache/annotate/                             the annotation replies
RUN/stages/<stage>/shard-{i:05d}.parquet        a stage's table for work shard i, and beside it
                 shard-{i:05d}.stats.json       its stats (written first)
                 shard-{i:05d}.key              its incremental key (pointvl.dataset.incremental)
                 shard-{i:05d}.items/           a GPU stage's finished items (pointvl.dataset.gpu_stage)
RUN/shards/{split}-{i:05d}-of-{n:05d}.parquet   the final shards, README.md (the dataset card),
RUN/shards/.keys/{split}-{i:05d}.key            and their incremental keys
RUN/previews/                                   the review's contact sheets (one per review page)
RUN/reports/review_pages/                       the review's answers, one file per page answered
RUN/reports/                                    cleaning.csv, review_log.jsonl, review_pending.json,
                                                last_build.json, handoff.json, preview_server.json
RUN/logs/                                       logs of helper processes (the preview server)
RUN/superseded/<time>/...                       what was moved aside (never deleted)
```

A run folder is any fsspec URL (a local path, ``s3://bucket/run``); :class:`RunFolder` only names
paths, it never touches storage, so it is cheap to make from a string where one is passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pointvl.core import io

if TYPE_CHECKING:
    from pointvl.dataset.plan import Shard


@dataclass(frozen=True)
class RunFolder:
    """The paths of the run folder at ``root`` (a local path or fsspec URL)."""

    root: str

    @classmethod
    def of(cls, run: RunFolder | str) -> RunFolder:
        """``run`` itself, or the run folder at the path ``run``."""
        return run if isinstance(run, RunFolder) else cls(str(run))

    def __str__(self) -> str:
        return self.root

    def __fspath__(self) -> str:  # so fsspec, open() and os.path take a RunFolder where they take a path
        return self.root

    def path(self, *parts: str) -> str:
        return io.join(self.root, *parts)

    # the build's own records
    @property
    def plan(self) -> str:
        return self.path("plan.json")

    @property
    def config(self) -> str:
        return self.path("config.json")

    @property
    def lock(self) -> str:
        return self.path("build.lock")

    def cache(self, stage: str) -> str:
        return self.path("cache", stage)

    # per-stage outputs
    def stage_dir(self, stage: str) -> str:
        return self.path("stages", stage)

    def stage_table(self, stage: str, shard_index: int) -> str:
        return self.path("stages", stage, f"shard-{shard_index:05d}.parquet")

    def stage_stats(self, stage: str, shard_index: int) -> str:
        return self.path("stages", stage, f"shard-{shard_index:05d}.stats.json")

    def stage_key(self, stage: str, shard_index: int) -> str:
        return self.path("stages", stage, f"shard-{shard_index:05d}.key")

    def stage_items(self, stage: str, shard_index: int) -> str:
        return self.path("stages", stage, f"shard-{shard_index:05d}.items")

    # the final shards
    @property
    def shards(self) -> str:
        return self.path("shards")

    @property
    def dataset_card(self) -> str:
        return self.path("shards", "README.md")

    def final_shard(self, shard: Shard) -> str:
        return self.path("shards", shard.final_name)

    def final_key(self, shard: Shard) -> str:
        """Named without the ``-of-{n}`` part, which changes when shards are added to the split."""
        return self.path("shards", ".keys", f"{shard.split}-{shard.split_index:05d}.key")

    # review, reports, logs
    @property
    def previews(self) -> str:
        return self.path("previews")

    @property
    def cleaning_report(self) -> str:
        """Every model folder found: kept, or dropped with its reason."""
        return self.path("reports", "cleaning.csv")

    @property
    def review_log(self) -> str:
        """Every review decision."""
        return self.path("reports", "review_log.jsonl")

    @property
    def review_pending(self) -> str:
        """The review waiting for an answer."""
        return self.path("reports", "review_pending.json")

    @property
    def last_build(self) -> str:
        """Where the latest build ran (what ``pointvl resume`` resumes)."""
        return self.path("reports", "last_build.json")

    @property
    def handoff(self) -> str:
        """The training run started for each build id."""
        return self.path("reports", "handoff.json")

    @property
    def preview_server(self) -> str:
        """The detached preview server's address and pid."""
        return self.path("reports", "preview_server.json")

    def log(self, name: str) -> str:
        return self.path("logs", name)

    def superseded_now(self) -> str:
        """A fresh ``RUN/superseded/<time>`` folder name for what is moved aside now."""
        return self.path("superseded", f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
