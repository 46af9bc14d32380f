"""pointvl.core.chat_client against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/fake_openai.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from pydantic import SecretStr

from pointvl.core.chat_client import (
    BatchPending,
    CallFailed,
    ChatClient,
    FatalAPIError,
    InvalidReply,
    RateLimiter,
    ResponseCache,
    request_key,
    run_batch,
)

KEY = "sk-test-SECRET-0123456789"
SCHEMA_BODY = {
    "type": "json_schema",
    "json_schema": {
        "name": "annotation",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "category_question": {
                    "type": "object",
                    "properties": {
                        "choices": {"type": "array", "items": {"type": "string", "enum": ["chair", "table"]}},
                        "answer": {"type": "string", "enum": ["chair"]},
                    },
                }
            },
        },
    },
}


def body(n: int = 0) -> dict:
    return {
        "model": "gpt-5",
        "response_format": SCHEMA_BODY,
        "messages": [{"role": "user", "content": f"annotate item {n}"}],
    }


def validate(content: str) -> dict:
    obj = json.loads(content)
    if "category_question" not in obj or "attribute_qa" not in obj:
        raise InvalidReply("missing category_question or attribute_qa")
    return obj


def client(srv: FakeOpenAI, tmp_path: Path | None = None, **kw) -> ChatClient:
    opts = {"timeout_s": 5.0, "max_retries": 3, "max_reasks": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
    opts.update(kw)
    cache = ResponseCache(str(tmp_path / "cache")) if tmp_path is not None else None
    return ChatClient(srv.base_url, SecretStr(srv.api_key), cache=cache, **opts)


def test_reply_is_cached_by_request_and_never_paid_twice(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as srv:
        c = client(srv, tmp_path)
        first = c.complete(body(1), validate)
        again = client(srv, tmp_path).complete(body(1), validate)  # a new process: same cache folder
        other = c.complete(body(2), validate)
    assert not first.cached and again.cached and not other.cached
    assert again.value == first.value
    assert len(srv.paid()) == 2
    assert all(r.authorized for r in srv.records)


def test_request_key_ignores_dict_order_and_changes_with_content() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    b = {"messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert request_key(a) == request_key(b)
    assert request_key(a) != request_key({**a, "model": "n"})


@pytest.mark.parametrize("fault", ["429", "500", "timeout", "disconnect"])
def test_transport_faults_are_retried(tmp_path: Path, fault: str) -> None:
    with FakeOpenAI(api_key=KEY, timeout_sleep_s=1.0) as srv:
        srv.inject(fault, times=1)
        got = client(srv, tmp_path, timeout_s=0.3).complete(body(), validate)
    assert got.value["category_question"]["answer"] == "chair"
    assert len(srv.chat_records()) == 2  # the fault, then the retry


def test_invalid_json_and_schema_violations_are_reasked_with_the_reason(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject("bad_json", times=1)
        srv.inject("schema", times=1)
        c = client(srv, tmp_path)
        got = c.complete(body(), validate)
    assert got.attempts == 3 and c.stats["reasks"] == 2
    recs = srv.chat_records()
    assert len(recs) == 3
    last = recs[-1].body["messages"]
    assert "not usable" in last[-1]["content"] and "missing category_question" in last[-1]["content"]
    # the reply is cached under the original request, so a re-run does not pay for the re-asks either
    assert client(srv, tmp_path).complete(body(), validate).cached


@pytest.mark.parametrize("fault", ["text_plain", "null_message"])
def test_a_malformed_http_200_body_is_reasked_then_fails_with_its_reason(tmp_path: Path, fault: str) -> None:
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject(fault, times=1)
        c = client(srv, tmp_path)
        got = c.complete(body(), validate)  # one malformed reply, then a good one
        assert got.attempts == 2 and c.stats["reasks"] == 1
        srv.inject(fault, times=10)
        with pytest.raises(CallFailed, match="invalid reply after 3 attempts: the reply"):
            client(srv).complete(body(1), validate)
        assert len(srv.chat_records()) == 2 + 3


def test_persistent_failures_raise_call_failed_with_reason_and_cache_nothing(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject("schema", times=10)
        with pytest.raises(CallFailed, match="invalid reply after 3 attempts: missing category_question"):
            client(srv, tmp_path).complete(body(), validate)
        srv.faults.clear()
        srv.inject("500", times=10)
        with pytest.raises(CallFailed, match="InternalServerError"):
            client(srv, tmp_path, max_retries=1).complete(body(7), validate)
        assert len(srv.chat_records()) == 3 + 2  # 3 asks, then 1 try + 1 SDK retry
    assert not list(tmp_path.rglob("*.json"))


def test_bad_key_is_fatal_and_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(api_key="sk-the-right-one") as srv:
        c = ChatClient(srv.base_url, SecretStr(KEY), max_retries=0, cache=ResponseCache(str(tmp_path)))
        with pytest.raises(FatalAPIError) as e:
            c.complete(body(), validate)
    assert KEY not in str(e.value) and KEY not in caplog.text and KEY not in repr(c.__dict__)


def test_key_never_reaches_logs_or_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(api_key=KEY) as srv:
        srv.inject("429", times=1)
        srv.inject("schema", times=1)
        client(srv, tmp_path).complete(body(), validate)
    assert caplog.records  # the SDK and our client did log (retries, re-asks)
    assert KEY not in caplog.text
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text()


def test_rate_limiter_spaces_starts_and_bounds_concurrency() -> None:
    limiter = RateLimiter(requests_per_minute=1200, concurrency=2)  # 50 ms apart
    in_flight, peak, starts = [0], [0], []
    lock = threading.Lock()

    def work() -> None:
        with limiter:
            with lock:
                starts.append(time.monotonic())
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            time.sleep(0.02)
            with lock:
                in_flight[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(6)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts.sort()
    assert peak[0] <= 2
    # the k-th start is never before its slot, k intervals after the first could start (a thread woken late
    # on a loaded machine only starts later, so gaps between observed starts may be shorter)
    assert all(s - begin >= k * 0.05 - 1e-3 for k, s in enumerate(starts))


def test_batch_resumes_the_same_batch_after_a_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "batch.json")
    requests = {request_key(body(i)): body(i) for i in range(3)}
    with FakeOpenAI(api_key=KEY, batch_polls_to_complete=3) as srv:
        srv.inject("schema", times=1, match=lambda b: b["messages"][0]["content"].endswith("item 1"))
        stored: dict[str, str] = {}
        with pytest.raises(BatchPending):  # the process "dies" while the batch runs
            run_batch(client(srv), state, requests, stored.__setitem__, poll_interval_s=0.01, max_wait_s=0.0)
        assert json.loads(Path(state).read_text())["finished"] is False
        failures = run_batch(client(srv), state, requests, stored.__setitem__, poll_interval_s=0.01, max_wait_s=5)
        again = run_batch(client(srv), state, requests, stored.__setitem__, poll_interval_s=0.01, max_wait_s=5)
    assert len(srv.batches) == 1 and sum(r.path == "/v1/files" for r in srv.records) == 1
    assert set(stored) == set(requests) and not failures and again == {}
    assert "missing everything else" in stored[request_key(body(1))]  # stored raw; the caller validates
    assert not srv.chat_records()  # nothing went through the live endpoint
