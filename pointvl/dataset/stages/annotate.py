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

import base64
import copy
import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import SecretStr

from pointvl.core import io
from pointvl.core.chat_client import (
    CallFailed,
    ChatClient,
    RateLimiter,
    ResponseCache,
    parse_json_reply,
    request_key,
    resolve_api_key,
    run_batch,
)
from pointvl.core.errors import check_range
from pointvl.core.geometry import iou_2d
from pointvl.core.images import decode_mask, decode_rgb
from pointvl.core.package_data import prompts_root, schema_path
from pointvl.core.strict_config import OPERATIONAL
from pointvl.dataset.run_folder import RunFolder
from pointvl.dataset.stages.annotate_rules import (
    category_choices,
    check_annotation,
    dominant_colours,
    parse_grounding,
    strict_schema,
    template_annotation,
)
from pointvl.dataset.stages.base import Drops, ShardOutput, Stage, finished, ran, read_stage_table

logger = logging.getLogger(__name__)

__all__ = ["Annotate", "AnnotateConfig"]

STAGE = "annotate"
COORDINATES = ("qwen2.5-vl", "qwen3-vl", "absolute", "relative1000")
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


@dataclass
class AnnotateConfig:
    """LLM/VLM annotation (paper §4.1.3).

    Args:
        backend: ``"offline"`` (template annotator, no keys; the default) or ``"openai"``.
        llm_model: the QA/description model. Paper: GPT-5 (no temperature is sent to it).
        llm_base_url: any OpenAI-compatible endpoint; ``None`` = the SDK default (api.openai.com).
        llm_api_key_env: environment variable holding the LLM key.
        llm_temperature: sampling temperature for the LLM; ``None`` sends none (GPT-5 accepts only 1).
        vlm_model: the grounding checkpoint. The paper's "Qwen2.5-VL-30B-Instruct" does not exist
            (3B/7B/32B/72B; 30B-A3B is Qwen3-VL); the default is the nearest size, 32B.
        vlm_base_url: the VLM's OpenAI-compatible endpoint (e.g. ``vllm serve`` on port 8000).
        vlm_api_key_env: variable holding the VLM key; unset = a placeholder (vLLM without auth).
        vlm_coordinates: how the VLM writes boxes: ``"qwen2.5-vl"`` (absolute pixels of its resized
            input, sides multiples of 28), ``"qwen3-vl"``/``"relative1000"`` (0–1000 relative),
            ``"absolute"`` (pixels of the image sent).
        vlm_min_pixels, vlm_max_pixels: the Qwen2.5-VL processor's resize bounds (its defaults).
        bbox2d_source: which box becomes ``bbox2d``: ``"mask"`` or ``"vlm"``.
        agreement_threshold: IoU(VLM box, mask box) below this flags the item for review.
        n_attribute_qa: attribute questions asked of the LLM (3–8; the category question is extra).
        n_category_choices: choices of the category question (the true category + distractors).
        timeout_s, max_retries: per-request timeout and the SDK's transport retries (429, 5xx,
            timeouts, connection errors; exponential backoff with jitter).
        max_reasks: re-asks after invalid JSON or a schema violation, then the item fails.
        backoff_initial_s, backoff_max_s: jittered exponential backoff between re-asks.
        requests_per_minute, concurrency: the rate limit, per endpoint.
        cache_dir: response cache; ``""`` = ``RUN/cache/annotate``.
        prompt_version: selects ``prompts_dir/qa_{version}.txt`` and ``ground_{version}.txt``.
        prompts_dir, schema_path: the prompt templates and the LLM output schema (``None``: the
            package's ``prompts/annotate`` and ``schemas/annotation.schema.json``).
        batch: send the QA requests through the OpenAI Batch API (resumable); grounding stays live.
        batch_poll_interval_s, batch_max_wait_s: batch polling; past the wait the shard raises
            :class:`pointvl.core.chat_client.BatchPending` and a re-run picks the batch up.
        redo_failed: re-run a finished shard that has failed items (cached replies cost nothing).
        api_key_secret_block, vlm_api_key_secret_block: Prefect Secret blocks the task reads the keys
            from (used by ``tasks/annotate.py`` only; the library reads the environment).
    """

    backend: str = "offline"
    llm_model: str = "gpt-5"
    llm_base_url: str | None = None
    llm_api_key_env: str = field(default="OPENAI_API_KEY", metadata=OPERATIONAL)
    llm_temperature: float | None = None
    vlm_model: str = "Qwen/Qwen2.5-VL-32B-Instruct"
    vlm_base_url: str = "http://127.0.0.1:8000/v1"
    vlm_api_key_env: str = field(default="VLM_API_KEY", metadata=OPERATIONAL)
    vlm_coordinates: str = "qwen2.5-vl"
    vlm_min_pixels: int = 4 * 28 * 28
    vlm_max_pixels: int = 16384 * 28 * 28
    bbox2d_source: str = "mask"
    agreement_threshold: float = 0.5
    n_attribute_qa: int = 4
    n_category_choices: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    max_reasks: int = 2
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    requests_per_minute: float = field(default=60.0, metadata=OPERATIONAL)
    concurrency: int = field(default=4, metadata=OPERATIONAL)
    cache_dir: str = ""
    prompt_version: str = "v1"
    prompts_dir: str | None = None
    schema_path: str | None = None
    batch: bool = False
    batch_poll_interval_s: float = field(default=30.0, metadata=OPERATIONAL)
    batch_max_wait_s: float = field(default=3600.0, metadata=OPERATIONAL)
    redo_failed: bool = field(default=False, metadata=OPERATIONAL)
    api_key_secret_block: str = field(default="", metadata=OPERATIONAL)
    vlm_api_key_secret_block: str = field(default="", metadata=OPERATIONAL)

    def __post_init__(self) -> None:
        if self.backend not in ("offline", "openai"):
            raise ValueError(f"annotate.backend must be 'offline' or 'openai', got {self.backend!r}")
        if self.vlm_coordinates not in COORDINATES:
            raise ValueError(f"annotate.vlm_coordinates must be one of {COORDINATES}, got {self.vlm_coordinates!r}")
        if self.bbox2d_source not in ("mask", "vlm"):
            raise ValueError(f"annotate.bbox2d_source must be 'mask' or 'vlm', got {self.bbox2d_source!r}")
        if self.backend == "offline" and self.bbox2d_source == "vlm":
            raise ValueError("the offline backend has no VLM: set annotate.bbox2d_source='mask' or backend='openai'")
        if self.llm_model.startswith("gpt-5") and self.llm_temperature not in (None, 1, 1.0):
            raise ValueError("GPT-5 rejects any temperature but 1: set annotate.llm_temperature=None")
        if not 0.0 <= self.agreement_threshold <= 1.0:
            raise ValueError(f"annotate.agreement_threshold is an IoU in [0, 1], got {self.agreement_threshold}")
        if not 3 <= self.n_attribute_qa <= 8:
            raise ValueError(
                f"annotate.n_attribute_qa must be in [3, 8] (the schema's bounds), got {self.n_attribute_qa}"
            )
        if not 2 <= self.n_category_choices <= 8:
            raise ValueError(f"annotate.n_category_choices must be in [2, 8], got {self.n_category_choices}")
        for name in ("timeout_s", "backoff_initial_s", "backoff_max_s", "batch_poll_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"annotate.{name} must be > 0, got {getattr(self, name)}")
        check_range("annotate.timeout_s", self.timeout_s, 0, 3600, 120.0)
        check_range("annotate.backoff_max_s", self.backoff_max_s, self.backoff_initial_s, 3600, 30.0,
                    "at least backoff_initial_s")
        check_range("annotate.max_retries", self.max_retries, 0, 20, 5)
        check_range("annotate.max_reasks", self.max_reasks, 0, 10, 2, "each re-ask is a paid call")
        check_range("annotate.concurrency", self.concurrency, 1, 256, 4)
        check_range("annotate.requests_per_minute", self.requests_per_minute, 0, 1e6, 60.0, "0 = no spacing")
        check_range("annotate.vlm_min_pixels", self.vlm_min_pixels, 28 * 28, self.vlm_max_pixels, 4 * 28 * 28,
                    "at most vlm_max_pixels")
        for kind in ("qa", "ground"):
            p = self.prompt_file(kind)
            if not p.is_file():
                raise ValueError(f"annotate.prompt_version {self.prompt_version!r}: no prompt file {p}")
        if not self.schema_file().is_file():
            raise ValueError(f"annotate.schema_path: no such file {str(self.schema_file())!r}")

    def prompt_file(self, kind: str) -> Path:
        """The ``qa`` or ``ground`` prompt template of :attr:`prompt_version`."""
        root = Path(self.prompts_dir) if self.prompts_dir else prompts_root() / STAGE
        return root / f"{kind}_{self.prompt_version}.txt"

    def schema_file(self) -> Path:
        return Path(self.schema_path) if self.schema_path else schema_path("annotation.schema.json")


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class _Item:
    instance_id: str
    category: str
    image_png: bytes
    width: int
    height: int
    mask_box: list[float]
    facts: dict[str, Any]
    choices: list[str]


class Annotate(Stage):
    """Stage ``annotate``: ``Annotate(config, categories).run_shard(run, shard_index)``.

    ``categories`` is the benchmark's category list (the category question's choices come from it).
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
        if not categories:
            raise ValueError("annotate needs the benchmark's category list")
        super().__init__(config)
        config = self.config
        self.categories = sorted(set(categories))
        if len(self.categories) < 2:  # the category question needs a distractor (a one-category subset)
            extra = next(c for c in DISTRACTORS if c != self.categories[0])
            logger.warning("one category (%s): the category question's distractor is %r", self.categories[0], extra)
            self.categories = sorted([*self.categories, extra])
        self._api_key = api_key
        self._vlm_api_key = vlm_api_key
        self._schema = json.loads(config.schema_file().read_text())
        self._prompts = {k: config.prompt_file(k).read_text() for k in ("qa", "ground")}

    # 1. inputs -------------------------------------------------------------------------------
    def _load(self, run_dir: str, shard_index: int) -> tuple[list[_Item], tuple[str, ...]]:
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
                _Item(
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

    # 2. requests -----------------------------------------------------------------------------
    def _qa_schema(self, item: _Item) -> dict:
        schema = copy.deepcopy(self._schema)
        cq = schema["properties"]["category_question"]["properties"]
        cq["choices"] = {
            "type": "array",
            "items": {"type": "string", "enum": item.choices},
            "minItems": len(item.choices),
            "maxItems": len(item.choices),
        }
        cq["answer"] = {"type": "string", "enum": [item.category]}
        return schema

    def _qa_body(self, item: _Item) -> dict[str, Any]:
        text = Template(self._prompts["qa"]).substitute(
            facts=json.dumps(item.facts, indent=2),
            choices=json.dumps(item.choices),
            category=item.category,
            n_attribute_qa=self.config.n_attribute_qa,
        )
        body: dict[str, Any] = {
            "model": self.config.llm_model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": text},
                        {"type": "image_url", "image_url": {"url": _data_url(item.image_png)}},
                    ],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "annotation",
                    "strict": True,
                    "schema": strict_schema(self._qa_schema(item)),
                },
            },
        }
        if self.config.llm_temperature is not None:
            body["temperature"] = self.config.llm_temperature
        return body

    def _ground_body(self, item: _Item) -> dict[str, Any]:
        text = Template(self._prompts["ground"]).substitute(category=item.category)
        return {
            "model": self.config.vlm_model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(item.image_png)}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "temperature": 0.0,
            "max_completion_tokens": 256,
        }

    def _qa_validator(self, item: _Item) -> Callable[[str], dict[str, Any]]:
        schema = self._qa_schema(item)
        return lambda content: check_annotation(parse_json_reply(content), schema, item.category, self.categories)

    def _ground_validator(self, item: _Item) -> Callable[[str], list[float]]:
        def validate(content: str) -> list[float]:
            with Image.open(BytesIO(item.image_png)) as im:
                w, h = im.size
            c = self.config
            box = parse_grounding(content, c.vlm_coordinates, w, h, c.vlm_min_pixels, c.vlm_max_pixels)
            sx, sy = item.width / w, item.height / h  # the record's frame, if the image was resized
            return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]

        return validate

    # 3. per item -----------------------------------------------------------------------------
    def _offline(self, item: _Item) -> dict[str, Any]:
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

    def _online(self, item: _Item, llm: ChatClient, vlm: ChatClient) -> dict[str, Any]:
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
            ann = llm.complete(self._qa_body(item), self._qa_validator(item)).value
            out["qa"], out["description"] = ann["qa"], ann["description"]
        except CallFailed as e:
            out["failures"].append(f"qa: {e.reason}")
        try:
            box = vlm.complete(self._ground_body(item), self._ground_validator(item)).value
            out["bbox2d_vlm"] = box
            out["vlm_agreement"] = iou_2d(box, item.mask_box)
            out["flagged"] = out["vlm_agreement"] < self.config.agreement_threshold
        except CallFailed as e:  # an outage or a model that cannot answer is a failure, never a judgement
            out["failures"].append(f"vlm_failed: {e.reason}")
        out["bbox2d"] = item.mask_box if self.config.bbox2d_source == "mask" else out["bbox2d_vlm"]
        return out

    # 4. the shard ----------------------------------------------------------------------------
    def _clients(self, cache: ResponseCache) -> tuple[ChatClient, ChatClient]:
        c = self.config
        key = self._api_key or resolve_api_key(c.llm_api_key_env)
        if key is None:
            raise ValueError(
                f"the openai backend needs an LLM key: set ${c.llm_api_key_env} or a Prefect "
                "Secret block (annotate.api_key_secret_block)"
            )
        vlm_key = self._vlm_api_key or resolve_api_key(c.vlm_api_key_env) or SecretStr("EMPTY")
        common = {
            "timeout_s": c.timeout_s,
            "max_retries": c.max_retries,
            "max_reasks": c.max_reasks,
            "backoff_initial_s": c.backoff_initial_s,
            "backoff_max_s": c.backoff_max_s,
            "cache": cache,
        }
        llm = ChatClient(c.llm_base_url, key, limiter=RateLimiter(c.requests_per_minute, c.concurrency),
                         secrets=(vlm_key,), **common)
        vlm = ChatClient(c.vlm_base_url, vlm_key, limiter=RateLimiter(c.requests_per_minute, c.concurrency),
                         secrets=(key,), **common)
        return llm, vlm

    def _provenance(self) -> str:
        c = self.config
        if c.backend == "offline":
            prov: dict[str, Any] = {"backend": "offline", "annotator": "template", "bbox2d_source": "mask"}
        else:
            prov = {
                "backend": "openai",
                "llm_model": c.llm_model,
                "vlm_model": c.vlm_model,
                "vlm_coordinates": c.vlm_coordinates,
                "bbox2d_source": c.bbox2d_source,
                "prompt_version": c.prompt_version,
                "batch": c.batch,
                "prompt_sha256": {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in self._prompts.items()},
                "schema_sha256": hashlib.sha256(json.dumps(self._schema, sort_keys=True).encode()).hexdigest()[:16],
            }
        return json.dumps(prov, sort_keys=True)

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
        items, inputs = self._load(run, shard_index)
        stats: dict[str, Any] = {"backend": c.backend}
        # 2. annotate
        if c.backend == "offline":
            results = [self._offline(it) for it in items]
        else:
            cache = ResponseCache(c.cache_dir or run.cache("annotate"))
            llm, vlm = self._clients(cache)
            if c.batch:
                self._run_batch(llm, cache, items, io.join(cache.root, "batches", f"shard-{shard_index:05d}.json"))
            counter = itertools.count(1)

            def work(it: _Item) -> dict[str, Any]:
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
        table = _table(items, results, self._provenance())
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

    def _run_batch(self, llm: ChatClient, cache: ResponseCache, items: list[_Item], state_path: str) -> None:
        """QA requests not yet cached go through the Batch API; valid replies land in the cache."""
        bodies, validators = {}, {}
        for it in items:
            body = self._qa_body(it)
            key = request_key(body)
            if cache.get(key) is None:
                bodies[key], validators[key] = body, self._qa_validator(it)

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


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _table(items: list[_Item], results: list[dict[str, Any]], provenance: str) -> pa.Table:
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
