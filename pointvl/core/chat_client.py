"""Chat-completions calls that are safe to run on thousands of items: retried, rate-limited, cached.

One :class:`ChatClient` talks to one OpenAI-compatible endpoint (OpenAI, or vLLM serving a VLM)
through the ``openai`` SDK. What each layer does:

- **Transport retries** are the SDK's own (``max_retries``): 408/409/429/5xx, timeouts and
  connection errors, exponential backoff from 0.5 s up to 8 s with up to 25 % jitter, honouring the
  server's ``Retry-After``/``retry-after-ms``.
- **Re-asks** are ours: a reply that is not valid JSON or breaks the caller's validation (JSON
  Schema plus any semantic check) is sent back with the error, up to ``max_reasks`` times, after a
  jittered exponential backoff. Then the call raises :class:`CallFailed` with the reason.
- **Rate limit** (:class:`RateLimiter`): at most ``concurrency`` requests in flight and request
  starts spaced ``60 / requests_per_minute`` seconds apart, shared by all threads of a client.
- **Disk cache** (:class:`ResponseCache`): every validated reply is stored under the SHA-256 of the
  original request body (model, messages, response format, sampling parameters; never the key or
  the URL), so a re-run or a resumed shard never pays for the same call twice.
- **Batch API** (:func:`run_batch`): upload a JSONL of requests, create a batch, poll it, hand each
  line back by ``custom_id`` (= the cache key). The batch id is saved before polling, so a process
  restarted mid-batch polls the same batch instead of paying for a second one.

API keys travel as :class:`pydantic.SecretStr`; they are never logged, cached or put in an error
reason, and a reply that echoes one (a proxy that copies the Authorization header into its answer)
is redacted before it is validated, cached or stored (:func:`redact`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from pointvl.core import io
from pointvl.core.extras import require

logger = logging.getLogger(__name__)

__all__ = [
    "BatchPending",
    "CallFailed",
    "ChatClient",
    "Completion",
    "FatalAPIError",
    "InvalidReply",
    "RateLimiter",
    "ResponseCache",
    "redact",
    "request_key",
    "resolve_api_key",
    "run_batch",
]

BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")


class CallFailed(RuntimeError):
    """One request gave no usable reply after all retries and re-asks; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FatalAPIError(RuntimeError):
    """The endpoint refuses every request (bad key, no such model or URL): fix the config, re-run."""


class InvalidReply(ValueError):
    """Raised by a validator: the reply is not what the request asked for (the message says how)."""


class BatchPending(RuntimeError):
    """A batch is still running after ``max_wait_s``; re-run later to pick it up where it is."""

    def __init__(self, batch_id: str, status: str) -> None:
        super().__init__(f"batch {batch_id} is still {status!r}; re-run later to collect it")
        self.batch_id = batch_id
        self.status = status


def _openai() -> Any:
    return require("openai", extra="annotate", purpose="the OpenAI backend")


def resolve_api_key(env_var: str) -> SecretStr | None:
    """The key in environment variable ``env_var`` (``None`` when unset or empty)."""
    value = os.environ.get(env_var, "") if env_var else ""
    return SecretStr(value) if value else None


MIN_SECRET_CHARS = 8
"""A shorter "key" is a placeholder (``EMPTY`` for a vLLM without auth), not a secret: redacting it would
cut every reply that holds the word."""


def redact(text: str, *secrets: SecretStr | None) -> str:
    """``text`` with every secret value (of at least :data:`MIN_SECRET_CHARS` characters) replaced by ``***``."""
    for s in secrets:
        if s is not None and len(s.get_secret_value()) >= MIN_SECRET_CHARS:
            text = text.replace(s.get_secret_value(), "***")
    return text


def request_key(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request body (the cache key and the batch ``custom_id``)."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


class ResponseCache:
    """Validated replies on disk (any fsspec path), one JSON file per request key, written atomically."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, key: str) -> str:
        return io.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> str | None:
        """The cached reply text for ``key``, or ``None``."""
        path = self._path(key)
        if not io.exists(path):
            return None
        return str(io.read_json(path)["content"])

    def put(self, key: str, content: str, model: str) -> None:
        io.write_json(self._path(key), {"key": key, "model": model, "content": content})


class RateLimiter:
    """At most ``concurrency`` requests in flight, starts spaced ``60 / requests_per_minute`` s apart.

    Use as a context manager around one request. ``requests_per_minute <= 0`` means no spacing.
    """

    def __init__(self, requests_per_minute: float, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._slots = threading.BoundedSemaphore(concurrency)
        self._interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._lock = threading.Lock()
        self._next_start = 0.0

    def __enter__(self) -> RateLimiter:
        self._slots.acquire()
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + self._interval
        if start > now:
            time.sleep(start - now)
        return self

    def __exit__(self, *exc: object) -> None:
        self._slots.release()


@dataclass
class Completion:
    """A validated reply: the parsed ``value``, its raw ``content``, and what it cost."""

    key: str
    content: str
    value: Any
    cached: bool
    attempts: int


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: ``min(initial * 2**attempt, max) * U(0.75, 1)``."""
    r = (rng or random).random()
    return min(initial_s * 2.0**attempt, max_s) * (1.0 - 0.25 * r)


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint, with the layers in the module docstring.

    Args:
        base_url: the endpoint (``None``: the SDK's default, api.openai.com or ``OPENAI_BASE_URL``).
        api_key: the key; an endpoint without auth (a local vLLM) takes any placeholder.
        timeout_s: per-attempt timeout.
        max_retries: SDK transport retries per attempt (429, 5xx, timeouts, connection errors).
        max_reasks: re-asks after an invalid reply before the call fails.
        backoff_initial_s, backoff_max_s: jittered exponential backoff between re-asks.
        limiter: shared rate limiter; cache: shared response cache (``None``: no cache).
        secrets: other secrets to scrub from replies besides ``api_key`` (another endpoint's key): every
            reply is redacted before it is validated, cached or used, whatever the server echoes.
    """

    def __init__(
        self,
        base_url: str | None,
        api_key: SecretStr,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        max_reasks: int = 2,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        limiter: RateLimiter | None = None,
        cache: ResponseCache | None = None,
        secrets: tuple[SecretStr, ...] = (),
    ) -> None:
        openai = _openai()
        self._api_key = api_key
        self.secrets = (api_key, *secrets)
        self._client = openai.OpenAI(
            api_key=api_key.get_secret_value(), base_url=base_url, timeout=timeout_s, max_retries=max_retries
        )
        self.max_reasks = max_reasks
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.limiter = limiter or RateLimiter(0, 1)
        self.cache = cache
        self._lock = threading.Lock()
        self.stats = {"api_calls": 0, "cache_hits": 0, "reasks": 0}

    @property
    def sdk(self) -> Any:
        """The underlying ``openai.OpenAI`` client (files and batches)."""
        return self._client

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _send(self, body: dict[str, Any]) -> tuple[str, str | None]:
        """One request (with the SDK's transport retries) -> (content, finish_reason)."""
        openai = _openai()
        try:
            with self.limiter:
                self._count("api_calls")
                resp = self._client.chat.completions.create(**body)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise FatalAPIError(redact(f"{type(e).__name__}: {e}", *self.secrets)) from None
        except openai.APIError as e:
            raise CallFailed(redact(f"{type(e).__name__}: {e}", *self.secrets)) from None
        # an HTTP 200 whose body is not a chat completion (text/plain, `message: null`, ...) is re-asked
        choices = getattr(resp, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise InvalidReply(f"the reply is not a chat completion with choices ({type(resp).__name__})")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if message is None or not isinstance(content, str | None):
            raise InvalidReply("the reply's first choice has no message")
        if getattr(message, "refusal", None):
            raise InvalidReply(redact(f"refusal: {message.refusal}", *self.secrets))
        return redact(content or "", *self.secrets), getattr(choices[0], "finish_reason", None)

    def complete(self, body: dict[str, Any], validate: Callable[[str], Any]) -> Completion:
        """Send ``body`` (chat-completions parameters) until ``validate(content)`` accepts the reply.

        ``validate`` parses the reply text and raises :class:`InvalidReply` (or ``ValueError``) when it
        is unusable. Raises :class:`CallFailed` when retries or re-asks run out, :class:`FatalAPIError`
        when the endpoint rejects the credentials, model or URL.
        """
        key = request_key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                hit = redact(hit, *self.secrets)  # an entry cached before replies were redacted
                try:
                    value = validate(hit)
                except ValueError as e:
                    logger.warning("cached reply %s… no longer validates (%s); asking again", key[:12], e)
                else:
                    self._count("cache_hits")
                    return Completion(key, hit, value, cached=True, attempts=0)
        messages = list(body["messages"])
        reason = ""
        for attempt in range(self.max_reasks + 1):
            if attempt:
                self._count("reasks")
                time.sleep(backoff_delay(attempt - 1, self.backoff_initial_s, self.backoff_max_s))
            content = ""
            try:
                content, finish = self._send({**body, "messages": messages})
                if finish == "length":
                    raise InvalidReply("the reply was cut off (finish_reason 'length')")
                value = validate(content)
            except ValueError as e:  # InvalidReply, json.JSONDecodeError, jsonschema errors wrapped by caller
                reason = redact(str(e), *self.secrets)
                logger.info(
                    "invalid reply to %s… (attempt %d/%d): %s",
                    key[:12],
                    attempt + 1,
                    self.max_reasks + 1,
                    reason[:200],
                )
                reply = {"role": "assistant", "content": content}
                messages = [*body["messages"], reply, _reask_message(reason)]
                continue
            if self.cache is not None:
                self.cache.put(key, content, str(body.get("model", "")))
            return Completion(key, content, value, cached=False, attempts=attempt + 1)
        raise CallFailed(f"invalid reply after {self.max_reasks + 1} attempts: {reason}")


def _reask_message(reason: str) -> dict[str, str]:
    return {
        "role": "user",
        "content": f"Your reply was not usable: {reason[:500]}\n"
        "Reply again with only the JSON object the instructions ask for.",
    }


def parse_json_reply(content: str) -> Any:
    """Parse a reply as JSON, accepting a Markdown code fence around it (as Qwen-VL models write)."""
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidReply(f"the reply is not valid JSON ({e.msg} at char {e.pos})") from None


def run_batch(
    client: ChatClient,
    state_path: str,
    requests: dict[str, dict[str, Any]],
    store: Callable[[str, str], None],
    *,
    endpoint: str = "/v1/chat/completions",
    poll_interval_s: float = 30.0,
    max_wait_s: float = 3600.0,
) -> dict[str, str]:
    """Run ``requests`` (custom_id -> body) as one OpenAI batch, resumable across restarts.

    The batch id is written to ``state_path`` right after the batch is created; a later call with a
    state file that is not finished polls that batch instead of creating another. Each successful
    line's reply text goes to ``store(custom_id, content)``; only then is the state marked finished.
    Returns custom_id -> failure reason for the lines that gave no reply (the caller retries them
    one by one). Raises :class:`BatchPending` when the batch is not done after ``max_wait_s``.
    """
    sdk = client.sdk
    state = io.read_json(state_path) if io.exists(state_path) else None
    if state is not None and state.get("finished"):
        return {}
    if state is None:
        if not requests:
            return {}
        lines = [
            json.dumps({"custom_id": cid, "method": "POST", "url": endpoint, "body": body}, sort_keys=True)
            for cid, body in requests.items()
        ]
        with client.limiter:
            upload = sdk.files.create(
                file=("requests.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl"),
                purpose="batch",
            )
        with client.limiter:
            batch = sdk.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
        state = {
            "batch_id": batch.id,
            "input_file_id": upload.id,
            "custom_ids": sorted(requests),
            "finished": False,
        }
        io.write_json(state_path, state)
        logger.info("batch %s created with %d requests", batch.id, len(requests))
    batch_id = state["batch_id"]
    deadline = time.monotonic() + max_wait_s
    while True:
        with client.limiter:
            batch = sdk.batches.retrieve(batch_id)
        if batch.status in BATCH_TERMINAL:
            break
        if time.monotonic() + poll_interval_s > deadline:
            raise BatchPending(batch_id, batch.status)
        logger.info("batch %s is %s; polling again in %.0f s", batch_id, batch.status, poll_interval_s)
        time.sleep(poll_interval_s)
    failures: dict[str, str] = {}
    if batch.output_file_id:
        for line in _file_lines(client, batch.output_file_id):
            cid, response = line["custom_id"], line.get("response") or {}
            if response.get("status_code") == 200 and not line.get("error"):
                try:
                    content = response["body"]["choices"][0]["message"]["content"] or ""
                except (KeyError, IndexError, TypeError):
                    failures[cid] = "batch reply has no message content"
                    continue
                store(cid, redact(content, *client.secrets))
            else:
                status = response.get("status_code")
                failures[cid] = redact(f"batch line failed: status {status}, {line.get('error')}", *client.secrets)
    if batch.error_file_id:
        for line in _file_lines(client, batch.error_file_id):
            err = line.get("error") or (line.get("response") or {}).get("body", {}).get("error")
            failures[line["custom_id"]] = redact(f"batch line failed: {err}", *client.secrets)
    io.write_json(state_path, {**state, "finished": True, "status": batch.status})
    logger.info("batch %s %s: %d lines failed", batch_id, batch.status, len(failures))
    return failures


def _file_lines(client: ChatClient, file_id: str) -> list[dict[str, Any]]:
    with client.limiter:
        data = client.sdk.files.content(file_id).content
    return [json.loads(s) for s in data.decode().splitlines() if s.strip()]
