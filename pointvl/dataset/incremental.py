"""Incremental builds: which finished outputs still match the plan and config; the stale ones move aside.

A scheduled build reuses one run folder while models are added and the config changes. Every work
shard's output of every stage gets a key: a hash of what decides that output (the stage's config
section, the keys of the stages it reads, the shard's models with their geometry hashes, the views
per model). The key is stored beside the output, ``stages/<stage>/shard-{i:05d}.key`` and
``shards/.keys/{split}-{i:05d}.key``. :func:`invalidate_stale` moves every output whose stored key
is not the current one to ``superseded/<time>/`` (nothing is deleted), so the usual skip-what-is-
finished logic then recomputes exactly the stale part and nothing else.
"""

from __future__ import annotations

import logging
from collections import Counter

from pointvl.core import io
from pointvl.dataset.config import BuildConfig
from pointvl.dataset.dag import STAGES, TABLE_STAGES
from pointvl.dataset.plan import Plan, Shard, fingerprint
from pointvl.dataset.run_folder import RunFolder

logger = logging.getLogger(__name__)

def stage_keys(shard: Shard, config: BuildConfig, categories: list[str]) -> dict[str, str]:
    """The current key of each stage's output for ``shard``.

    Only output-deciding config enters a key (``review`` is operational: a stage key must not change
    when the gate or its timeout does). ``annotate`` also depends on the benchmark's ``categories``:
    its category question draws its distractors from them.
    """
    sections = config.output_dict()
    models = [(m.synset_id, m.model_id, m.category, m.split, m.geometry) for m in shard.models]
    keys: dict[str, str] = {}
    for stage in STAGES:
        parts = [stage.name, sections.get(stage.name), [keys[s] for s in stage.inputs], models, shard.views_per_model]
        if stage.name == "annotate":
            parts.append(sorted(categories))
        keys[stage.name] = fingerprint(*parts)
    return keys


def invalidate_stale(run_dir: str, plan: Plan, config: BuildConfig) -> dict[str, int]:
    """Move outputs made for another key to ``RUN/superseded/<time>/``, record the current keys.

    Runs after (re)planning and before any stage, so a stage sees a shard as finished only when it
    was finished with its current key. A missing key counts as stale: the output's origin is
    unknown. Final shards whose key is current but whose ``-of-{n}`` is outdated are renamed.
    Returns the number of superseded shard outputs per stage.
    """
    folder = RunFolder.of(run_dir)
    fs, root = io.filesystem(run_dir)
    finals_dir = io.filesystem(folder.shards)[1]
    aside = io.filesystem(RunFolder.of(run_dir).superseded_now())[1]
    categories = sorted({m.category for s in plan.shards for m in s.models})
    superseded: Counter[str] = Counter()
    for shard in plan.shards:
        keys = stage_keys(shard, config, categories)
        for stage in TABLE_STAGES:
            outputs = [folder.stage_table(stage, shard.index), folder.stage_stats(stage, shard.index),
                       folder.stage_items(stage, shard.index)]
            paths = [io.filesystem(p)[1] for p in outputs]
            superseded[stage] += _refresh(folder.stage_key(stage, shard.index), keys[stage], paths, root, aside)
        finals = io.ls_matching(fs, finals_dir, f"{shard.split}-{shard.split_index:05d}-of-*.parquet")
        if _refresh(folder.final_key(shard), keys["write_shards"], finals, root, aside):
            superseded["write_shards"] += 1
            continue
        for path in finals:
            if path != f"{finals_dir}/{shard.final_name}":
                io.check_fence(folder.final_key(shard))
                fs.mv(path, f"{finals_dir}/{shard.final_name}")
                logger.info("renamed %s to %s", path.rsplit("/", 1)[1], shard.final_name)
    counts = {stage: n for stage, n in superseded.items() if n}
    if counts:
        logger.info("superseded (moved to %s): %s", aside, counts)
    return counts


def _refresh(key_path: str, key: str, paths: list[str], root: str, aside: str) -> bool:
    """Store ``key`` at ``key_path``; when it differs from the stored one, first move ``paths`` aside.

    Moving first: a build killed in between finds the outputs gone, never stale outputs under a
    current key. Returns whether anything was moved.
    """
    if io.exists(key_path) and io.read_bytes(key_path).decode() == key:
        return False
    fs, _ = io.filesystem(key_path)
    present = [p for p in paths if fs.exists(p)]
    for path in present:
        io.check_fence(key_path)
        target = f"{aside}/{path.removeprefix(root + '/')}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(path, target, recursive=True)
    io.write_bytes(key_path, key.encode())
    return bool(present)
