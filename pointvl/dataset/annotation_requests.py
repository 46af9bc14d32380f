"""What stage ``annotate`` sends and accepts: the QA and grounding request bodies (prompt templates filled
in, the output schema narrowed to the item's choices), their reply validators, the two API clients, and
the provenance that names prompts and schema by hash."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from string import Template
from typing import Any

from PIL import Image
from pydantic import SecretStr

from pointvl.core.chat_client import ChatClient, RateLimiter, ResponseCache, parse_json_reply, resolve_api_key
from pointvl.dataset.annotation_config import AnnotateConfig
from pointvl.dataset.annotation_rules import check_annotation, parse_grounding, strict_schema


@dataclass
class AnnotationItem:
    """One instance as the models see it: its image, the facts they describe, the category choices."""

    instance_id: str
    category: str
    image_png: bytes
    width: int
    height: int
    mask_box: list[float]
    facts: dict[str, Any]
    choices: list[str]


class AnnotationRequests:
    """The requests of one config over the benchmark's ``categories`` (the category question's choices)."""

    def __init__(self, config: AnnotateConfig, categories: list[str]) -> None:
        self.config = config
        self.categories = categories
        self.schema = json.loads(config.schema_file().read_text())
        self.prompts = {k: config.prompt_file(k).read_text() for k in ("qa", "ground")}

    def qa_schema(self, item: AnnotationItem) -> dict:
        schema = copy.deepcopy(self.schema)
        cq = schema["properties"]["category_question"]["properties"]
        cq["choices"] = {
            "type": "array",
            "items": {"type": "string", "enum": item.choices},
            "minItems": len(item.choices),
            "maxItems": len(item.choices),
        }
        cq["answer"] = {"type": "string", "enum": [item.category]}
        return schema

    def qa_body(self, item: AnnotationItem) -> dict[str, Any]:
        text = Template(self.prompts["qa"]).substitute(
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
                        {"type": "image_url", "image_url": {"url": data_url(item.image_png)}},
                    ],
                }
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "annotation",
                    "strict": True,
                    "schema": strict_schema(self.qa_schema(item)),
                },
            },
        }
        if self.config.llm_temperature is not None:
            body["temperature"] = self.config.llm_temperature
        return body

    def ground_body(self, item: AnnotationItem) -> dict[str, Any]:
        text = Template(self.prompts["ground"]).substitute(category=item.category)
        return {
            "model": self.config.vlm_model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(item.image_png)}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "temperature": 0.0,
            "max_completion_tokens": 256,
        }

    def qa_validator(self, item: AnnotationItem) -> Callable[[str], dict[str, Any]]:
        schema = self.qa_schema(item)
        return lambda content: check_annotation(parse_json_reply(content), schema, item.category, self.categories)

    def ground_validator(self, item: AnnotationItem) -> Callable[[str], list[float]]:
        def validate(content: str) -> list[float]:
            with Image.open(BytesIO(item.image_png)) as im:
                w, h = im.size
            c = self.config
            box = parse_grounding(content, c.vlm_coordinates, w, h, c.vlm_min_pixels, c.vlm_max_pixels)
            sx, sy = item.width / w, item.height / h  # the record's frame, if the image was resized
            return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]

        return validate

    def provenance(self) -> str:
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
                "prompt_sha256": {k: hashlib.sha256(v.encode()).hexdigest()[:16] for k, v in self.prompts.items()},
                "schema_sha256": hashlib.sha256(json.dumps(self.schema, sort_keys=True).encode()).hexdigest()[:16],
            }
        return json.dumps(prov, sort_keys=True)


def make_clients(c: AnnotateConfig, cache: ResponseCache, api_key: SecretStr | None = None,
             vlm_api_key: SecretStr | None = None) -> tuple[ChatClient, ChatClient]:
    """The LLM and VLM clients; keys given (a Prefect Secret block's) win over the environment's."""
    key = api_key or resolve_api_key(c.llm_api_key_env)
    if key is None:
        raise ValueError(
            f"the openai backend needs an LLM key: set ${c.llm_api_key_env} or a Prefect "
            "Secret block (annotate.api_key_secret_block)"
        )
    vlm_key = vlm_api_key or resolve_api_key(c.vlm_api_key_env) or SecretStr("EMPTY")
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


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
