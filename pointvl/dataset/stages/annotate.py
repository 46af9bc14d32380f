"""Stage `annotate`: attribute QA, a geometric description and a 2D grounding box per instance.

Paper §4.1.3: GPT-5 writes fine-grained attribute QA pairs and geometric descriptions; a Qwen VLM
at temperature 0 boxes the most prominent instance. Two backends:

- ``offline`` (the default; no keys, fully deterministic): template QA and a description from the
  category, the measured 3D box size and the dominant colours under the mask; ``bbox2d`` is the
  mask box. Provenance says ``"backend": "offline"``.
- ``openai``: an LLM (``llm_model``, any OpenAI-compatible ``llm_base_url``) answers with structured
  output validated against ``schemas/annotation.schema.json`` plus semantic checks (the category
  question's answer is the known category, every answer is among its choices); a VLM behind an
  OpenAI-compatible endpoint (vLLM) is asked for the box of the most prominent instance, the model
  family's coordinate convention is undone and the box clamped to the image. ``vlm_agreement`` is
  its IoU with the mask box; below ``agreement_threshold`` the item is flagged for review. Only such a
  disagreement flags an item: a grounding call that fails for good (an outage, no usable box after the
  re-asks) fails the item (``vlm_failed``), which ``redo_failed`` asks again.

Retries, re-asks, rate limiting, the response cache and the Batch API live in :mod:`pointvl.core.chat_client`.
An item whose call fails for good is written with ``annotate_status = "failed"`` and the reason;
the shard goes on. Inputs are the stage tables ``render``, ``geometry``, ``kpts2d`` and, when it
exists, ``synthesize`` (its ``image`` is what the models see; otherwise the render).
"""

from __future__ import annotations

import itertools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import SecretStr

from pointvl.core import io
from pointvl.core.chat_client import (
    CallFailed,
    ChatClient,
    ResponseCache,
    request_key,
    run_batch,
)
from pointvl.core.images import decode_mask, decode_rgb
from pointvl.core.spatial import iou_2d
from pointvl.dataset.annotation_config import AnnotateConfig
from pointvl.dataset.annotation_requests import AnnotationItem, AnnotationRequests, make_clients
from pointvl.dataset.annotation_rules import (
    category_choices,
    dominant_colours,
    template_annotation,
)
from pointvl.dataset.plan import load_plan
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.base import Drops, ShardOutput, Stage
from pointvl.dataset.tables import finished, ran, read_stage_table

logger = logging.getLogger(__name__)

STAGE = "annotate"
# ShapeNet category names that give a one-category benchmark's category question a wrong choice.
DISTRACTORS = ("airplane", "chair")

_BOX = pa.list_(pa.float32())
SCHEMA = pa.schema([
    ("instance_id", pa.string()),
    ("qa", pa.string()),
    ("description", pa.string()),
    ("bbox2d", _BOX),
    ("bbox2d_vlm", _BOX),
    ("vlm_agreement", pa.float64()),
    ("annotate_flagged", pa.bool_()),
    ("annotate_status", pa.string()),
    ("annotate_failure_reason", pa.string()),
    ("annotate_provenance", pa.string()),
])



def _with_distractor(categories: list[str]) -> list[str]:
    """The categories, sorted, with a second one when there is only one: the category question needs a distractor."""
    categories = sorted(set(categories))
    if len(categories) < 2:  # a one-category subset
        extra = next(c for c in DISTRACTORS if c != categories[0])
        logger.warning("one category (%s): the category question's distractor is %r", categories[0], extra)
        categories = sorted([*categories, extra])
    return categories


class Annotate(Stage):
    """Stage ``annotate``: ``Annotate(config).run_shard(run, shard_index)``.

    ``categories``: the benchmark's category list (the category question's choices come from it);
    by default the categories of the run's plan.
    Keys: pass ``api_key``/``vlm_api_key`` (e.g. from a Prefect Secret block), else they are read
    from the environment variables named in the config when the first shard runs.
    """

    name = STAGE
    inputs = ("render", "geometry", "kpts2d", "synthesize")  # synthesize when it ran
    schema = SCHEMA
    config_class = AnnotateConfig

    def __init__(
        self,
        config: AnnotateConfig | None = None,
        categories: list[str] | None = None,
        *,
        api_key: SecretStr | None = None,
        vlm_api_key: SecretStr | None = None,
    ) -> None:
        if categories is not None and not categories:
            raise ValueError("annotate needs the benchmark's category list (None: the plan's)")
        super().__init__(config)
        config = self.config
        self._from_plan = categories is None
        self.categories = _with_distractor(categories) if categories is not None else []
        self._api_key = api_key
        self._vlm_api_key = vlm_api_key
        self.requests = AnnotationRequests(config, self.categories)

    # 1. inputs -------------------------------------------------------------------------------
    def _load(self, run_dir: str, shard_index: int) -> tuple[list[AnnotationItem], tuple[str, ...]]:
        """The shard's items, and the stages whose tables they were read from."""
        inputs: tuple[str, ...] = ("render", "geometry", "kpts2d")
        tables = {stage: read_stage_table(run_dir, stage, shard_index).to_pylist() for stage in inputs}
        images = {}
        if ran(run_dir, "synthesize", shard_index):
            inputs += ("synthesize",)
            synthesized = read_stage_table(run_dir, "synthesize", shard_index).to_pylist()
            images = {r["instance_id"]: r["image"] for r in synthesized}
        bbox3d = {r["instance_id"]: r["bbox3d"] for r in tables["geometry"]}
        bbox2d = {r["instance_id"]: r["bbox2d"] for r in tables["kpts2d"]}
        items = []
        for r in tables["render"]:
            iid = r["instance_id"]
            if iid not in bbox3d or iid not in bbox2d:  # dropped by geometry or kpts2d, counted there
                logger.debug("%s: dropped by an earlier stage, not annotated", iid)
                continue
            if r["category"] not in self.categories:
                raise ValueError(f"{iid}: category {r['category']!r} is not in the categories given to Annotate")
            png = images.get(iid, r["render"])
            rgb = decode_rgb(png)
            mask = decode_mask(r["mask"])
            if mask.shape != rgb.shape[:2]:
                mask = np.asarray(Image.fromarray(mask).resize(rgb.shape[1::-1], Image.NEAREST))
            b = [float(v) for v in bbox3d[iid]]
            facts = {
                "category": r["category"],
                "size": {
                    "width_x": round(b[3] - b[0], 3),
                    "height_y": round(b[4] - b[1], 3),
                    "depth_z": round(b[5] - b[2], 3),
                    "units": "normalized ShapeNet model units",
                },
                "dominant_colours": dominant_colours(rgb, mask),
            }
            items.append(
                AnnotationItem(
                    iid,
                    r["category"],
                    png,
                    int(r["width"]),
                    int(r["height"]),
                    [float(v) for v in bbox2d[iid]],
                    facts,
                    category_choices(r["category"], self.categories, self.config.n_category_choices, iid),
                )
            )
        return items, inputs

    # 3. per item -----------------------------------------------------------------------------
    def _offline(self, item: AnnotationItem) -> dict[str, Any]:
        ann = template_annotation(item.facts, item.choices, item.instance_id)
        return {
            "qa": ann["qa"],
            "description": ann["description"],
            "bbox2d": item.mask_box,
            "bbox2d_vlm": None,
            "vlm_agreement": None,
            "flagged": False,
            "failures": [],
            "notes": [],
        }

    def _online(self, item: AnnotationItem, llm: ChatClient, vlm: ChatClient) -> dict[str, Any]:
        out: dict[str, Any] = {
            "qa": None,
            "description": None,
            "bbox2d_vlm": None,
            "vlm_agreement": None,
            "flagged": False,
            "failures": [],
            "notes": [],
        }
        try:
            ann = llm.complete(self.requests.qa_body(item), self.requests.qa_validator(item)).value
            out["qa"], out["description"] = ann["qa"], ann["description"]
        except CallFailed as e:
            out["failures"].append(f"qa: {e.reason}")
        try:
            box = vlm.complete(self.requests.ground_body(item), self.requests.ground_validator(item)).value
            out["bbox2d_vlm"] = box
            out["vlm_agreement"] = iou_2d(box, item.mask_box)
            out["flagged"] = out["vlm_agreement"] < self.config.agreement_threshold
        except CallFailed as e:  # an outage or a model that cannot answer is a failure, never a judgement
            out["failures"].append(f"vlm_failed: {e.reason}")
        out["bbox2d"] = item.mask_box if self.config.bbox2d_source == "mask" else out["bbox2d_vlm"]
        return out

    # 3. the shard ----------------------------------------------------------------------------
    def finished(self, run: RunFolder | str, shard_index: int) -> bool:
        """Finished when its table checks out, unless ``redo_failed`` and the shard has failed items."""
        if not finished(run, STAGE, shard_index):
            return False
        status = read_stage_table(run, STAGE, shard_index).column("annotate_status").to_pylist()
        return not (self.config.redo_failed and "failed" in status)

    def process_shard(self, run: RunFolder, shard_index: int, drops: Drops) -> ShardOutput:
        """Annotate the shard's items. Raises :class:`pointvl.core.chat_client.FatalAPIError` when the endpoint
        refuses the key/model/URL and :class:`pointvl.core.chat_client.BatchPending` when a batch outlives
        ``batch_max_wait_s``.
        """
        c = self.config
        # 1. check and load inputs (before any API call)
        if self._from_plan:
            self.categories = _with_distractor(load_plan(run).categories())
        items, inputs = self._load(run, shard_index)
        stats: dict[str, Any] = {"backend": c.backend}
        # 2. annotate
        if c.backend == "offline":
            results = [self._offline(it) for it in items]
        else:
            cache = ResponseCache(c.cache_dir or run.cache("annotate"))
            llm, vlm = make_clients(c, cache, self._api_key, self._vlm_api_key)
            if c.batch:
                self._run_batch(llm, cache, items, io.join(cache.root, "batches", f"shard-{shard_index:05d}.json"))
            counter = itertools.count(1)

            def work(it: AnnotationItem) -> dict[str, Any]:
                r = self._online(it, llm, vlm)
                logger.info(
                    "annotate shard %05d: %d/%d %s%s",
                    shard_index,
                    next(counter),
                    len(items),
                    it.instance_id,
                    " FAILED" if r["failures"] else "",
                )
                return r

            pool = ThreadPoolExecutor(max_workers=c.concurrency)
            try:
                results = list(pool.map(work, items))
            except BaseException:  # FatalAPIError or an interrupt: start no more items, keep the cache
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown()
            for k in ("api_calls", "cache_hits", "reasks"):
                stats[k] = llm.stats[k] + vlm.stats[k]
        # 3. the table and its counts
        table = _table(items, results, self.requests.provenance())
        status = table.column("annotate_status").to_pylist()
        stats.update(
            ok=status.count("ok"),
            failed=status.count("failed"),
            flagged=sum(table.column("annotate_flagged").to_pylist()),
        )
        for r in results:
            for f in r["failures"]:
                kind = f"failed_{f.split(':')[0].removesuffix('_failed')}"  # failed_qa, failed_vlm
                stats[kind] = stats.get(kind, 0) + 1
        logger.info("annotate shard %05d: %d ok, %d failed, %d flagged", shard_index, stats["ok"], stats["failed"],
                    stats["flagged"])
        return ShardOutput(table, stats, made_from=inputs)

    def _run_batch(self, llm: ChatClient, cache: ResponseCache, items: list[AnnotationItem], state_path: str) -> None:
        """QA requests not yet cached go through the Batch API; valid replies land in the cache."""
        bodies, validators = {}, {}
        for it in items:
            body = self.requests.qa_body(it)
            key = request_key(body)
            if cache.get(key) is None:
                bodies[key], validators[key] = body, self.requests.qa_validator(it)

        def store(key: str, content: str) -> None:
            if key not in validators:
                return
            try:
                validators[key](content)
            except ValueError as e:
                logger.info("batch reply %s… invalid (%s); it will be asked again live", key[:12], e)
                return
            cache.put(key, content, self.config.llm_model)

        failures = run_batch(
            llm,
            state_path,
            bodies,
            store,
            poll_interval_s=self.config.batch_poll_interval_s,
            max_wait_s=self.config.batch_max_wait_s,
        )
        if failures:
            logger.info("%d batch lines failed; asking them live", len(failures))


def _table(items: list[AnnotationItem], results: list[dict[str, Any]], provenance: str) -> pa.Table:
    rows = {
        "instance_id": [it.instance_id for it in items],
        "qa": [json.dumps(r["qa"], ensure_ascii=False) if r["qa"] is not None else None for r in results],
        "description": [r["description"] for r in results],
        "bbox2d": [r["bbox2d"] for r in results],
        "bbox2d_vlm": [r["bbox2d_vlm"] for r in results],
        "vlm_agreement": [r["vlm_agreement"] for r in results],
        "annotate_flagged": [bool(r["flagged"]) for r in results],
        "annotate_status": ["failed" if r["failures"] else "ok" for r in results],
        "annotate_failure_reason": ["; ".join(r["failures"] + r.get("notes", [])) or None for r in results],
        "annotate_provenance": [provenance] * len(items),
    }
    return pa.Table.from_pydict(rows, schema=SCHEMA)
