"""Predictions from any served VLM: ``pointvl predict --endpoint URL --model NAME`` (paper Table 1).

Every record of the split is one chat-completions request to an OpenAI-compatible endpoint (vLLM,
SGLang, OpenAI): the record's final ``image`` as a PNG data URL in an ``image_url`` content part and
the benchmark's instruction (``prompts/predict/v1.txt``: the category question ``qa[0]``, the
attribute questions ``qa[1:]``, the six-field JSON and ``attribute_answers``). Requests go through
:class:`pointvl.core.chat_client.ChatClient`: the SDK's transport retries, the rate limit shared by ``concurrency``
threads, and the request cache (a re-run sends nothing that was answered before).

``coords`` says how the model writes coordinates; each is converted to the benchmark's bins
(:class:`pointvl.core.geometry.QuantConfig`) before the line is written:

- ``bins`` (default): the benchmark's own integer bins, written as they are;
- ``norm1000``: 0-1000 relative to the image (Qwen3-VL, InternVL), 3D as 0-1000 over ``[lo3d, hi3d]``;
- ``qwen2.5-vl``: absolute pixels of the image as Qwen2.5-VL's processor resized it (its smart-resize
  rule, :func:`pointvl.dataset.stages.annotate_rules.smart_resize`), 3D as 0-1000 over ``[lo3d, hi3d]``.

A line is ``{"instance_id", "output", "attribute_answers", "raw"}``: ``output`` is the converted
object's JSON (fields the reply lacks, or holds in the wrong shape, are left out: they score 0),
or the raw reply itself when it holds no JSON object (``pointvl evaluate`` counts it unparsable);
``raw`` keeps the reply. A request that fails after every retry gives ``output: ""`` and ``error``.
The file is written atomically once every record has an answer.
"""

from __future__ import annotations

import base64
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from string import Template
from typing import Any

import numpy as np

from pointvl.core import io as pio
from pointvl.core.chat_client import (
    CallFailed,
    ChatClient,
    FatalAPIError,
    InvalidReply,
    RateLimiter,
    ResponseCache,
    parse_json_reply,
    resolve_api_key,
)
from pointvl.core.errors import InputError
from pointvl.core.geometry import QuantConfig
from pointvl.core.package_data import prompts_root
from pointvl.core.record import image_bytes, list_shards
from pointvl.dataset.stages.annotate_rules import smart_resize
from pointvl.grca.parse import FIELDS, GEOMETRIC_FIELDS, parse_output

logger = logging.getLogger(__name__)

COORDS: tuple[str, ...] = ("bins", "norm1000", "qwen2.5-vl")
PROMPTS_DIR = prompts_root() / "predict"
_ANY_INT = 2**62  # parse the model's integers in any range; conversion clamps them to the bins


@dataclass
class EndpointConfig:
    """One served model and how to ask it.

    Attributes:
        base_url: the OpenAI-compatible ``/v1`` URL; model: the served model's name.
        coords: the model's coordinate convention (:data:`COORDS`).
        api_key_env: environment variable with the key (unset: a placeholder, as vLLM needs none).
        concurrency, requests_per_minute: threads in flight and the request spacing (0 = none).
        max_tokens: the reply budget; temperature: ``None`` sends none (GPT-5 accepts only its default).
        timeout_s, max_retries: per request, the SDK's transport retries.
        prompt_version: selects ``prompts/predict/{version}.txt`` and ``coords_{coords}_{version}.txt``.
        cache_dir: the request cache (default: ``OUT.cache`` beside the predictions file).
        min_pixels, max_pixels: Qwen2.5-VL's processor bounds, for ``coords="qwen2.5-vl"``.
        quant: the benchmark's bins.
    """

    base_url: str
    model: str
    coords: str = "bins"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    requests_per_minute: float = 0.0
    max_tokens: int = 1024
    temperature: float | None = 0.0
    timeout_s: float = 120.0
    max_retries: int = 3
    prompt_version: str = "v1"
    cache_dir: str | None = None
    min_pixels: int = 3136
    max_pixels: int = 12845056
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self) -> None:
        if self.coords not in COORDS:
            raise InputError(f"--coords must be one of {', '.join(COORDS)}, got {self.coords!r}")
        if self.concurrency < 1 or self.max_tokens < 1:
            raise InputError("--concurrency and --max-tokens must be >= 1")
        for name in (f"{self.prompt_version}.txt", f"coords_{self.coords}_{self.prompt_version}.txt"):
            if not (PROMPTS_DIR / name).is_file():
                raise InputError(f"prompt version {self.prompt_version!r}: no prompt file {PROMPTS_DIR / name}")


def prompt_text(record: dict[str, Any], cfg: EndpointConfig) -> str:
    """The instruction of one record (the versioned templates filled in)."""
    qa = json.loads(record["qa"]) if isinstance(record["qa"], str) else record["qa"]
    size = {"width": int(record["width"]), "height": int(record["height"])}
    attrs = "".join(f"{i}. {q['question']} (choices: {', '.join(map(str, q['choices']))})\n"
                    for i, q in enumerate(qa[1:], 1))
    coords = Template((PROMPTS_DIR / f"coords_{cfg.coords}_{cfg.prompt_version}.txt").read_text()).substitute(size)
    return Template((PROMPTS_DIR / f"{cfg.prompt_version}.txt").read_text()).substitute(
        size, question=qa[0]["question"], choices=", ".join(map(str, qa[0]["choices"])),
        attribute_block=f"Attribute questions:\n{attrs}" if attrs else "", coords=coords.strip(),
    ).strip()


def request_body(record: dict[str, Any], cfg: EndpointConfig) -> dict[str, Any]:
    png = base64.b64encode(image_bytes(record["image"])).decode()
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
            {"type": "text", "text": prompt_text(record, cfg)},
        ]}],
        "max_tokens": cfg.max_tokens,
    }
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    return body


def to_bins(name: str, values: np.ndarray, cfg: EndpointConfig, width: int, height: int) -> list:
    """The model's coordinates of field ``name`` in ``cfg.coords`` -> the benchmark's bins."""
    q = cfg.quant
    v = values.astype(np.float64)
    if cfg.coords == "bins":
        return values.tolist()
    if name in ("bbox3d", "kpts3d"):
        return q.quantize_3d(q.lo3d + v / 1000.0 * (q.hi3d - q.lo3d)).tolist()
    if cfg.coords == "norm1000":
        scale = np.array([width / 1000.0, height / 1000.0])
    else:
        rh, rw = smart_resize(height, width, 28, cfg.min_pixels, cfg.max_pixels)
        scale = np.array([width / rw, height / rh])
    pixels = v.reshape(-1, 2) * scale
    return q.quantize_2d(pixels.reshape(v.shape), width, height).tolist()


def convert_reply(reply: str, record: dict[str, Any], cfg: EndpointConfig) -> tuple[str, list[str]]:
    """(the ``output`` text in the benchmark's bins, the attribute answers) of one reply."""
    parsed = parse_output(reply, bins=_ANY_INT)
    try:
        obj = parse_json_reply(reply)
        answers = obj.get("attribute_answers") if isinstance(obj, dict) else None
    except InvalidReply:
        answers = None
    answers = [a for a in answers if isinstance(a, str)] if isinstance(answers, list) else []
    if not any(parsed[f].valid for f in FIELDS):
        return reply, answers
    out: dict[str, Any] = {}
    for name in FIELDS:
        if not parsed[name].valid:
            continue
        value = parsed[name].value
        out[name] = to_bins(name, value, cfg, int(record["width"]), int(record["height"])) \
            if name in GEOMETRIC_FIELDS else value
    return json.dumps(out, ensure_ascii=False), answers


def _client(cfg: EndpointConfig, cache_dir: str) -> ChatClient:
    import openai
    from pydantic import SecretStr

    key = resolve_api_key(cfg.api_key_env) or SecretStr("EMPTY")
    client = ChatClient(cfg.base_url, key, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, max_reasks=0,
                        limiter=RateLimiter(cfg.requests_per_minute, cfg.concurrency), cache=ResponseCache(cache_dir))
    try:  # one free request first: a wrong URL, key or model name is one line, before any paid call
        served = [m.id for m in client.sdk.models.list()]
    except openai.APIConnectionError as e:
        raise InputError(f"cannot reach the endpoint {cfg.base_url} ({type(e).__name__}): is the server up?") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise InputError(f"{cfg.base_url} refused the key in ${cfg.api_key_env} ({e.status_code})") from None
    except openai.APIStatusError as e:
        raise InputError(f"{cfg.base_url} is not an OpenAI-compatible endpoint (GET models: {e.status_code})") from None
    if cfg.model not in served:
        raise InputError(f"the endpoint {cfg.base_url} does not serve {cfg.model!r}; it serves {served[:5]}")
    return client


def predict_endpoint(shards_dir: str, out_path: str, cfg: EndpointConfig, split: str = "test") -> dict[str, int]:
    """Ask the endpoint about every record of ``split``; write the predictions JSONL; return the counts
    ``{n, api_calls, cache_hits, failed}``."""
    paths = list_shards(shards_dir, split)  # no shards: one line, before the endpoint is asked anything
    client = _client(cfg, cfg.cache_dir or f"{out_path}.cache")

    def ask(record: dict[str, Any]) -> dict[str, Any]:
        line: dict[str, Any] = {"instance_id": record["instance_id"]}
        try:
            reply = client.complete(request_body(record, cfg), validate=str).content
        except CallFailed as e:
            logger.warning("%s: no reply (%s)", record["instance_id"], e.reason[:200])
            return {**line, "output": "", "attribute_answers": [], "error": e.reason}
        output, answers = convert_reply(reply, record, cfg)
        return {**line, "output": output, "attribute_answers": answers, "raw": reply}

    lines: list[dict[str, Any]] = []
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            for k, path in enumerate(paths, 1):  # one shard's images in memory at a time
                lines.extend(pool.map(ask, pio.read_table(path).to_pylist()))
                logger.info("predict %s: shard %d/%d, %d records", cfg.model, k, len(paths), len(lines))
    except FatalAPIError as e:
        raise InputError(f"the endpoint {cfg.base_url} refuses the requests: {e}") from None
    pio.write_bytes(out_path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode())
    failed = sum("error" in x for x in lines)
    logger.info("predict %s: %d records, %d API calls, %d cached, %d failed", cfg.model, len(lines),
                client.stats["api_calls"], client.stats["cache_hits"], failed)
    return {"n": len(lines), "api_calls": client.stats["api_calls"], "cache_hits": client.stats["cache_hits"],
            "failed": failed}
